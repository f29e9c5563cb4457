"""All stages in order, each resumable and skipped once done: vae, vae-decoder (optional), text, teacher,
teacher-refine (optional), causal-teacher, ode-pairs, ode-init, dmd, export."""
from __future__ import annotations

import time
from pathlib import Path

from .config import TrainConfig
from .stages import causal_teacher, dmd, export, ode_init, ode_pairs, teacher, text, vae, vae_decoder

STAGES = {
    "vae": vae.run,
    "vae-decoder": vae_decoder.run,
    "text": text.run,
    "teacher": teacher.run,
    "teacher-refine": teacher.refine,
    "causal-teacher": causal_teacher.run,
    "ode-pairs": ode_pairs.run,
    "ode-init": ode_init.run,
    "dmd": dmd.run,
    "export": export.run,
}


def run_stage(name: str, cfg: TrainConfig, root: str | Path, accelerator=None) -> float:
    t0 = time.perf_counter()
    STAGES[name](cfg, root, accelerator)
    return time.perf_counter() - t0


def run_pipeline(cfg: TrainConfig, root: str | Path, stages=None, accelerator=None, log=print) -> dict[str, float]:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(cfg.to_json())
    times = {}
    for name in stages or STAGES:
        if (name == "causal-teacher" and cfg.causal_teacher.steps <= 0) or (
                name == "teacher-refine" and cfg.teacher_refine.steps <= 0):
            continue
        times[name] = run_stage(name, cfg, root, accelerator)
        log(f"[pipeline] {name}: {times[name]:.1f} s")
    return times
