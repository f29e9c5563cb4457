"""A user's video set encoded once with their VAE into latent shards (userdata.py): clips read with PyAV, scaled
and centre-cropped to the run's size; unreadable or too short clips are counted and reported."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from causvid_core.checkpoints import atomic_save_safetensors
from causvid_core.vae import load_vae
from causvid_core.video_io import from_uint8

from ..config import TrainConfig
from ..run import StageRun
from ..userdata import SHARD_CLIPS, load_clip, read_video_set


def run(cfg: TrainConfig, root: str | Path, accelerator=None) -> None:
    r = StageRun(Path(root), "video-latents", cfg.seed, accelerator)
    if r.done:
        return
    items, problems = read_video_set(cfg.inputs.videos)
    captions, shards = [], []
    if r.is_main:
        vae = load_vae(cfg.inputs.vae).eval()
        batch = []

        def flush() -> None:
            if batch:
                name = f"latents_{len(shards):05d}.safetensors"
                atomic_save_safetensors({"latents": torch.cat(batch).to(torch.bfloat16).contiguous()}, r.dir / name)
                shards.append(name)
                batch.clear()
        for path, caption in items:
            try:
                clip = load_clip(path, cfg.data.clip_frames, cfg.data.height, cfg.data.width)
            except (ValueError, FileNotFoundError) as exc:
                problems.append(str(exc))
                continue
            with torch.no_grad():
                batch.append(vae.encode(from_uint8(clip)))  # [1, C, F, h, w]
            captions.append(caption)
            if len(batch) == SHARD_CLIPS:
                flush()
        flush()
        for line in problems:
            print(f"video-latents: skipped {line}", file=sys.stderr)
        if not captions:
            raise ValueError(f"--videos {cfg.inputs.videos}: none of the clips could be used ({problems[0]})")
        tmp = r.dir / "clips.json.part"
        tmp.write_text(json.dumps({"shards": shards, "captions": captions}))
        tmp.replace(r.dir / "clips.json")
    r.finish(clips=len(captions), unreadable=len(problems), problems=problems[:20])
