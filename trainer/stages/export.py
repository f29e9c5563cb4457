"""Export: the distilled student (its EMA) as our safetensors (Wan's keys, so ComfyUI's UNETLoader reads it as it
reads its own Wan repacks; in student.export_dtype) with its config and the stream settings
it was trained for in the metadata, beside the VAE and text encoder it belongs with, so
`causvid generate --model DIR/student.safetensors` and the LoadCausalModel node need nothing else."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from causvid_core.checkpoints import load_dit, save_dit
from causvid_core.pipeline import META_STREAM

from ..config import TrainConfig
from ..run import StageRun
from .common import require, student_steps, vae_stage


def stream_settings(cfg: TrainConfig) -> dict:
    shift, steps = student_steps(cfg)
    out = {"steps": steps, "shift": shift, "chunk_frames": cfg.student.chunk_frames}
    if cfg.student.window_frames:
        out.update(window_frames=cfg.student.window_frames, sink_frames=cfg.student.sink_frames)
    return out


def run(cfg: TrainConfig, root: str | Path, accelerator=None, source: str = "dmd") -> None:
    root = Path(root)
    r = StageRun(root, "export", cfg.seed, accelerator)
    if r.done:
        return
    if r.is_main:
        student = load_dit(require(root, source))
        dtype = getattr(torch, cfg.student.export_dtype)
        save_dit(student, root / "student.safetensors",
                 {META_STREAM: json.dumps(stream_settings(cfg)), "causvid.trained": json.dumps(
                     {"preset": cfg.name, "source": source})},
                 state_dict={k: v.to(dtype) if v.is_floating_point() else v for k, v in student.state_dict().items()})
        if not cfg.inputs.active:  # a user's own VAE and text encoder stay where they are
            for part, name in ((vae_stage(cfg), "vae.safetensors"), ("text", "text.safetensors")):
                tmp = root / (name + ".tmp")
                shutil.copyfile(require(root, part), tmp)
                os.replace(tmp, root / name)  # atomic: never a half-copied file under the final name
    vae = cfg.inputs.vae if cfg.inputs.active else str(root / "vae.safetensors")
    text = cfg.inputs.text_encoder if cfg.inputs.active else str(root / "text.safetensors")
    r.finish(student=str(root / "student.safetensors"), vae=vae, text=text, source=source)
