"""Text embeddings of a user's prompt file, computed once with their text encoder (umT5 for Wan models) and stored
in shards, so later stages look prompts up instead of keeping the encoder in memory (userdata.py)."""
from __future__ import annotations

import sys
from pathlib import Path

from causvid_core.checkpoints import load_dit
from causvid_core.pipeline import load_text

from ..config import TrainConfig
from ..run import StageRun
from ..userdata import embed_prompts, read_prompts, read_video_set


def run(cfg: TrainConfig, root: str | Path, accelerator=None) -> None:
    r = StageRun(Path(root), "text-embeds", cfg.seed, accelerator)
    if r.done:
        return
    prompts, problems = read_prompts(cfg.inputs.prompts)
    if cfg.inputs.videos is not None:  # the video set's captions condition its clips
        prompts = prompts + [caption for _, caption in read_video_set(cfg.inputs.videos)[0]]
    for line in problems:
        print(f"text-embeds: skipped {line}", file=sys.stderr)
    if r.is_main:
        text_len = load_dit(cfg.inputs.teacher, device="meta").config.text_len
        encoder = load_text(Path(cfg.inputs.text_encoder), text_len=text_len)
        embed_prompts(prompts, encoder, r.dir, log=lambda m: print(m, file=sys.stderr))
    r.finish(prompts=len(prompts), unreadable=len(problems), problems=problems[:20])
