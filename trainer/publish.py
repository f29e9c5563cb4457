"""Publish a finished run as the pack's built-in model: `causvid_core/builtin/` gets the exported
student, its VAE and text encoder (and the bidirectional teacher, for the teacher-vs-student results),
the DiT and VAE weights in float16 so the whole set stays small enough for git (load_components
upcasts to float32 on CPU), plus PROVENANCE.json (run config, stage results, file hashes).

    causvid-train publish --preset shapes --out runs/shapes
"""
from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path
from typing import Optional, Sequence

import torch

from causvid_core.checkpoints import load_dit, save_dit
from causvid_core.pipeline import BUILTIN_DIR, BUILTIN_FILES, read_checkpoint_metadata
from causvid_core.text import load_text_encoder, save_text_encoder
from causvid_core.vae import load_vae, save_vae

from .config import TrainConfig
from .run import atomic_write_text
from .stages.common import output, require

MAX_BYTES = 20 * 2**20  # everything committed for the built-in model (DEVELOPERS.md: under 20 MB)
TEACHER_FILE = "teacher.safetensors"
STORED_DTYPE = torch.float16


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _git_commit() -> Optional[str]:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


def _stage_results(root: Path) -> dict:
    out = {}
    for done in sorted(root.glob("*/DONE.json")):
        info = json.loads(done.read_text())
        out[done.parent.name] = {k: v for k, v in info.items() if k not in ("latent_mean", "latent_std")}
    return out


def publish(root: str | Path, dest: str | Path = BUILTIN_DIR, teacher: Optional[str] = "teacher",
            note: Optional[str] = None) -> dict[str, int]:
    """Write the built-in files into dest; returns their sizes. Refuses a set over MAX_BYTES. `teacher` is the
    stage whose weights are the run's final teacher (stages.common.teacher_stage; None: publish no teacher).
    `note` records how the run departed from a straight run of its config (e.g. a stage resumed with new
    settings)."""
    root, dest = Path(root), Path(dest)
    student_src = root / BUILTIN_FILES["model"]
    if not (root / "export" / "DONE.json").exists() or not student_src.exists():
        raise FileNotFoundError(f"{root}: no exported student; run `causvid-train pipeline` (its export stage) first")
    dest.mkdir(parents=True, exist_ok=True)
    meta = read_checkpoint_metadata(student_src)
    keep = {k: v for k, v in meta.items() if k.startswith("causvid.") and k not in ("causvid.config", "causvid.kind",
                                                                                    "causvid.format")}
    save_dit(load_dit(student_src).to(STORED_DTYPE), dest / BUILTIN_FILES["model"], keep)
    save_vae(load_vae(root / BUILTIN_FILES["vae"]).to(STORED_DTYPE), dest / BUILTIN_FILES["vae"])
    save_text_encoder(load_text_encoder(root / BUILTIN_FILES["text_encoder"]), dest / BUILTIN_FILES["text_encoder"])
    files = list(BUILTIN_FILES.values())
    if teacher:
        save_dit(load_dit(require(root, teacher)).to(STORED_DTYPE), dest / TEACHER_FILE)
        files.append(TEACHER_FILE)
    sizes = {f: (dest / f).stat().st_size for f in files}
    if sum(sizes.values()) > MAX_BYTES:
        raise ValueError(f"the built-in files take {sum(sizes.values()) / 2**20:.1f} MB, over the "
                         f"{MAX_BYTES / 2**20:.0f} MB budget: publish without the teacher or train a smaller model")
    provenance = {"run": str(root), "commit": _git_commit(), "stored_dtype": str(STORED_DTYPE).replace("torch.", ""),
                  "files": {f: {"bytes": sizes[f], "sha256": _sha256(dest / f)} for f in files},
                  "config": json.loads((root / "config.json").read_text()) if (root / "config.json").exists() else None,
                  "stages": _stage_results(root)}
    if note:
        provenance["note"] = note
    atomic_write_text(dest / "PROVENANCE.json", json.dumps(provenance, indent=2) + "\n")
    return sizes


# The config sections each restorable stage's training reads (besides the run's seed): a published stage's
# time counts for a restored run only when these match, since they fix how long the stage trains.
RESTORE_SECTIONS = {"vae": ("vae", "data"), "vae-decoder": ("vae_decoder", "vae", "data"), "text": ("text",),
                    "teacher": ("teacher", "data", "dit"),
                    "teacher-refine": ("teacher_refine", "teacher", "data", "dit")}


def _published_seconds(provenance: dict, stage: str, cfg: Optional[TrainConfig]) -> Optional[float]:
    """The wall-clock seconds the published run spent on `stage`, if cfg trains that stage exactly as the
    published run did (its config, defaults filled in for fields added since, matches on the stage's sections
    and the seed); None otherwise."""
    published, timing = provenance.get("config"), provenance.get("stages", {}).get(stage, {})
    if cfg is None or published is None or timing.get("seconds") is None:
        return None
    try:
        old, new = TrainConfig.from_dict(published).to_dict(), cfg.to_dict()
    except (TypeError, AttributeError):  # a config of fields this version no longer has: not comparable
        return None
    same = old["seed"] == new["seed"] and all(old[k] == new[k] for k in RESTORE_SECTIONS[stage])
    return timing["seconds"] if same else None


def restore(root: str | Path, src: str | Path = BUILTIN_DIR, cfg: Optional[TrainConfig] = None,
            stages: Optional[Sequence[str]] = None) -> list[str]:
    """The reverse, to continue training on another machine: the published VAE, text encoder and teacher
    become the finished vae, vae-decoder, text, teacher and teacher-refine stages of run folder `root` (float32,
    each with a DONE.json), so `causvid-train pipeline` goes on from the causal teacher / ODE pairs. The
    published VAE carries the VAE stage's encoder unchanged, so it stands in for both VAE stages; the published
    teacher is the final one, refined or not, so it stands in for both teacher stages. `stages` picks some of
    them (the others then train anew). With `cfg`, a stage that cfg trains as the published run did keeps that
    run's wall-clock `seconds` in its DONE.json (with `seconds_from`), so the run's training time stays whole."""
    root, src = Path(root), Path(src)
    unknown = sorted(set(stages or ()) - set(RESTORE_SECTIONS))
    if unknown:
        raise ValueError(f"cannot restore {unknown}: the published files hold {', '.join(RESTORE_SECTIONS)}")
    wanted = list(stages or RESTORE_SECTIONS)
    teacher_src = src / TEACHER_FILE
    if {"teacher", "teacher-refine"} & set(wanted) and not teacher_src.exists():
        raise FileNotFoundError(f"{src} has no {TEACHER_FILE}: it was published without the teacher")
    prov_path = src / "PROVENANCE.json"
    provenance = json.loads(prov_path.read_text()) if prov_path.exists() else {}
    loaders = {"vae": (save_vae, lambda: load_vae(src / BUILTIN_FILES["vae"], dtype=torch.float32)),
               "text": (save_text_encoder, lambda: load_text_encoder(src / BUILTIN_FILES["text_encoder"])),
               "teacher": (save_dit, lambda: load_dit(teacher_src, dtype=torch.float32))}
    restored = []
    for stage in RESTORE_SECTIONS:
        if stage not in wanted:
            continue
        save, load = loaders[stage.split("-")[0]]
        path = output(root, stage)
        save(load(), path)
        done = {"stage": stage, "model": str(path), "restored_from": str(src)}
        seconds = _published_seconds(provenance, stage, cfg)
        if seconds is not None:
            done.update(seconds=seconds, seconds_from=f"{provenance.get('run')} at {provenance.get('commit')}")
        atomic_write_text(path.parent / "DONE.json", json.dumps(done))
        restored.append(stage)
    return restored
