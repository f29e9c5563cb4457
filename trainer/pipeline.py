"""All stages in order, each resumable and skipped once done: vae, vae-decoder (optional), text, teacher,
teacher-refine (optional), causal-teacher, ode-pairs, ode-init, dmd, export."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

from .config import TrainConfig
from .run import atomic_write_text
from .stages import (causal_teacher, dmd, export, ode_init, ode_pairs, teacher, text, text_embeds, vae, vae_decoder,
                     video_latents)

STAGES = {
    "text-embeds": text_embeds.run,
    "video-latents": video_latents.run,
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


def active_stages(cfg: TrainConfig) -> list[str]:
    """The stages this config runs, in order (the optional ones with steps 0 are left out)."""
    if cfg.inputs.active:  # a user's teacher, VAE and text encoder: distillation from their prompts (and clips)
        videos = ["video-latents"] if cfg.inputs.videos is not None else []
        tuned = [name for name, sc in (("teacher", cfg.teacher), ("causal-teacher", cfg.causal_teacher))
                 if sc.steps > 0]
        return ["text-embeds", *videos, *tuned, "ode-pairs", "ode-init", "dmd", "export"]
    off = {"vae-decoder": cfg.vae_decoder.steps <= 0, "causal-teacher": cfg.causal_teacher.steps <= 0,
           "teacher-refine": cfg.teacher_refine.steps <= 0, "text-embeds": True, "video-latents": True}
    return [name for name in STAGES if not off.get(name, False)]


def stage_seconds(cfg: TrainConfig, root: str | Path) -> dict[str, Optional[float]]:
    """Wall-clock seconds each finished stage of the run took, resumed work included (DONE.json's
    `seconds`); None for a stage not finished, or finished before stages recorded their time."""
    out: dict[str, Optional[float]] = {}
    for name in active_stages(cfg):
        done = Path(root) / name / "DONE.json"
        out[name] = json.loads(done.read_text()).get("seconds") if done.exists() else None
    return out


def restored_stages(cfg: TrainConfig, root: str | Path) -> dict[str, Optional[str]]:
    """The finished stages of the run restored from published files (`causvid-train restore`), each with the
    run whose measured time its DONE.json carries (None: restored without a time)."""
    out: dict[str, Optional[str]] = {}
    for name in active_stages(cfg):
        done = Path(root) / name / "DONE.json"
        info = json.loads(done.read_text()) if done.exists() else {}
        if "restored_from" in info:
            out[name] = info.get("seconds_from")
    return out


def config_changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    """`section.field: old -> new` for every setting that differs between two config dicts."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_changes(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {json.dumps(a)} -> {json.dumps(b)}")
    return out


def record_config(cfg: TrainConfig, root: Path, log=print) -> None:
    """Write the run's config.json; when resuming a run begun with other settings, say which changed (a stage
    under way goes on from its checkpoint with the new values; finished stages keep what they were run with)."""
    path, text = root / "config.json", cfg.to_json()
    if path.exists():
        changes = config_changes(json.loads(path.read_text()), json.loads(text))  # as stored: tuples as lists
        if changes:
            log(f"[pipeline] {root} was begun with other settings; resuming with {len(changes)} changed "
                f"(pass the first run's --preset and --set to keep them): " + "; ".join(changes))
    atomic_write_text(path, text)


def run_pipeline(cfg: TrainConfig, root: str | Path, stages=None, accelerator=None, log=print) -> dict[str, float]:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    record_config(cfg, root, log)
    unknown = [name for name in stages or () if name not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; the stages are {', '.join(STAGES)}")
    times, active = {}, active_stages(cfg)
    for name in stages or active:
        if name not in active:
            continue  # an optional stage this config turns off
        times[name] = run_stage(name, cfg, root, accelerator)
        log(f"[pipeline] {name}: {times[name]:.1f} s")
    spent = stage_seconds(cfg, root)
    untimed = [k for k, v in spent.items() if v is None]
    restored = restored_stages(cfg, root)
    log(f"[pipeline] training time of the run (all its stages, resumed work included): "
        f"{sum(v for v in spent.values() if v) / 3600:.2f} h"
        + (f"; not timed: {', '.join(untimed)}" if untimed else "")
        + "".join(f"; {k} restored (time of {v})" for k, v in restored.items() if v))
    return times
