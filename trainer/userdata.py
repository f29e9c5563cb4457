"""A user's own data for distillation: a prompt file, its text embeddings computed once (the text encoder, umT5
at 5.7B parameters, is never in memory while a DiT trains), and the prompt-only data set the stages sample.

Prompt files: plain text (a prompt a line), JSONL (a "prompt", "text" or "caption" field) or CSV (a column of
that name, else the first). Rows that cannot be read are counted and reported, never silently dropped.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import torch
from torch import Tensor

from causvid_core.checkpoints import atomic_save_safetensors

PROMPT_FIELDS = ("prompt", "text", "caption")
EMBED_BATCH = 8
SHARD_PROMPTS = 256


def read_prompts(path: str | Path) -> tuple[list[str], list[str]]:
    """(prompts, problems): every readable prompt in file order, and one line per row that was not."""
    from causvid_core.validate import read_text

    text = read_text(path, "--prompts")
    p = Path(path)
    prompts, problems = [], []
    if p.suffix.lower() in (".jsonl", ".json"):
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                value = next(row[k] for k in PROMPT_FIELDS if k in row) if isinstance(row, dict) else None
            except (json.JSONDecodeError, StopIteration):
                value = None
            if isinstance(value, str) and value.strip():
                prompts.append(value.strip())
            else:
                problems.append(f"{p.name} line {n}: no prompt (a JSON object with {'/'.join(PROMPT_FIELDS)})")
    elif p.suffix.lower() == ".csv":
        rows = list(csv.reader(io.StringIO(text)))
        header = [h.strip().lower() for h in rows[0]] if rows else []
        col = next((header.index(k) for k in PROMPT_FIELDS if k in header), None)
        for n, row in enumerate(rows[1:] if col is not None else rows, start=2 if col is not None else 1):
            value = row[col if col is not None else 0].strip() if len(row) > (col or 0) else ""
            if value:
                prompts.append(value)
            else:
                problems.append(f"{p.name} row {n}: empty prompt")
    else:
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts {path}: no prompts in the file" + (f" ({problems[0]})" if problems else ""))
    return prompts, problems


class EmbeddingBank:
    """Text embeddings looked up by prompt, from the text-embeds stage's shards: the `encode` of a text encoder."""

    def __init__(self, folder: str | Path):
        from safetensors.torch import load_file

        folder = Path(folder)
        index = json.loads((folder / "prompts.json").read_text())
        self.rows: dict[str, Tensor] = {}
        for shard, names in index["shards"].items():
            tensors = load_file(str(folder / shard))
            for i, prompt in enumerate(names):
                self.rows[prompt] = tensors[f"e{i}"]
        self.text_len, self.text_dim = index["text_len"], index["text_dim"]

    def encode(self, prompts) -> Tensor:
        """[B, text_len, text_dim] for prompts of the file (and the empty prompt of guidance)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        missing = [p for p in prompts if p not in self.rows]
        if missing:
            raise ValueError(f"no stored embedding for {missing[0]!r}: the prompt file changed since the text-embeds "
                             "stage finished; delete the run's text-embeds folder to encode it again")
        return torch.stack([self.rows[p].float() for p in prompts])


def embed_prompts(prompts: list[str], text_encoder, folder: Path, log=print) -> dict:
    """Encode every distinct prompt (and "") once; shards of SHARD_PROMPTS embeddings, written atomically."""
    unique = list(dict.fromkeys(["", *prompts]))
    shards: dict[str, list[str]] = {}
    dim = length = None
    for s in range(0, len(unique), SHARD_PROMPTS):
        names = unique[s:s + SHARD_PROMPTS]
        rows = []
        for b in range(0, len(names), EMBED_BATCH):
            with torch.no_grad():
                rows.append(text_encoder.encode(names[b:b + EMBED_BATCH]).float().cpu())
        emb = torch.cat(rows)  # [n, L, D]
        length, dim = emb.shape[1], emb.shape[2]
        name = f"embeds_{s // SHARD_PROMPTS:05d}.safetensors"
        atomic_save_safetensors({f"e{i}": emb[i].to(torch.bfloat16).contiguous() for i in range(len(names))},
                                folder / name)
        shards[name] = names
        log(f"text-embeds: {min(s + SHARD_PROMPTS, len(unique))}/{len(unique)} prompts")
    index = {"shards": shards, "text_len": length, "text_dim": dim, "prompts": len(prompts)}
    tmp = folder / "prompts.json.part"
    tmp.write_text(json.dumps(index))
    tmp.replace(folder / "prompts.json")
    return index


class PromptSet:
    """The data set of a prompt-only run: sample i is prompt i (cycling), with latents of the run's shape that
    only give the stages their sizes (DMD's rollout generator input needs no data)."""

    def __init__(self, prompts: list[str], shape: tuple[int, ...]):
        self.prompts, self.shape = prompts, shape
        self.latents = torch.zeros(1, *shape)  # [1, C, F, h, w]: its shape is what is read

    def batch(self, idx: list[int]) -> tuple[Tensor, list[str]]:
        return torch.zeros(len(idx), *self.shape), [self.prompts[i % len(self.prompts)] for i in idx]


# -- a video set: clips with captions, encoded once -------------------------------------------------------------

VIDEO_SUFFIXES = (".mp4", ".mov", ".webm", ".mkv", ".avi")
SHARD_CLIPS = 64


def read_video_set(path: str | Path) -> tuple[list[tuple[Path, str]], list[str]]:
    """(clips as (file, caption), problems): a folder of videos each with a caption sidecar (same name, .txt), or a
    CSV with a path column (`path`, `video`, `file`) and a caption column (`caption`, `prompt`, `text`)."""
    from causvid_core.validate import read_text

    p = Path(path)
    items, problems = [], []
    if p.is_dir():
        for video in sorted(f for f in p.iterdir() if f.suffix.lower() in VIDEO_SUFFIXES):
            side = video.with_suffix(".txt")
            caption = read_text(side, "caption").strip() if side.exists() else ""
            if caption:
                items.append((video, caption))
            else:
                problems.append(f"{video.name}: no caption ({side.name} missing or empty)")
    elif p.suffix.lower() == ".csv":
        rows = list(csv.reader(io.StringIO(read_text(p, "--videos"))))
        header = [h.strip().lower() for h in rows[0]] if rows else []
        pcol = next((header.index(k) for k in ("path", "video", "file") if k in header), None)
        ccol = next((header.index(k) for k in ("caption", "prompt", "text") if k in header), None)
        if pcol is None or ccol is None:
            raise ValueError(f"--videos {p}: the CSV needs a path column and a caption column (header row)")
        for n, row in enumerate(rows[1:], start=2):
            if len(row) <= max(pcol, ccol) or not row[pcol].strip() or not row[ccol].strip():
                problems.append(f"{p.name} row {n}: no path or no caption")
                continue
            video = (p.parent / row[pcol].strip()).resolve()
            items.append((video, row[ccol].strip()))
    else:
        raise ValueError(f"--videos {p}: give a folder of videos with caption .txt files, or a CSV")
    if not items:
        raise ValueError(f"--videos {p}: no usable clips" + (f" ({problems[0]})" if problems else ""))
    return items, problems


def load_clip(path: Path, frames: int, height: int, width: int):
    """uint8 [frames, height, width, 3]: the clip's first frames, scaled to cover and centre-cropped; ValueError
    for a file that is not a video or is too short."""
    import av
    import numpy as np

    from causvid_core.live.sources import fit

    out = []
    try:
        with av.open(str(path)) as c:
            for f in c.decode(video=0):
                out.append(fit(f.to_ndarray(format="rgb24"), height, width))
                if len(out) == frames:
                    break
    except (av.error.FFmpegError, OSError) as exc:
        raise ValueError(f"{path.name}: not a readable video ({type(exc).__name__})") from None
    if len(out) < frames:
        raise ValueError(f"{path.name}: {len(out)} frames, {frames} needed")
    return np.stack(out)


class VideoLatentSet:
    """The video-latents stage's shards: latents [N, C, F, h, w] and their captions."""

    def __init__(self, folder: str | Path):
        from safetensors.torch import load_file

        folder = Path(folder)
        index = json.loads((folder / "clips.json").read_text())
        parts = [load_file(str(folder / s))["latents"] for s in index["shards"]]
        self.latents, self.prompts = torch.cat(parts).float(), index["captions"]

    def batch(self, idx: list[int]) -> tuple[Tensor, list[str]]:
        rows = [i % len(self.prompts) for i in idx]
        return self.latents[rows], [self.prompts[i] for i in rows]
