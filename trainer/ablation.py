"""The paper's Table 4 at our scale: the DMD variants that share a run's VAE, text encoder, teachers
and ODE initialisation, each trained in `RUN/ablation/<variant>/` (the shared stages linked in, so
nothing is retrained and the main run is never touched).

    causvid-train ablation --preset shapes --out runs/shapes          # after the pipeline
    causvid-train ablation --preset shapes --out runs/shapes --variants no-ode-init

Rows of the table and where their model comes from (`trainer/results.py` reads this mapping):
bidirectional many-step = RUN/teacher, causal many-step = RUN/causal-teacher, ODE init only =
RUN/ode-init, ODE init + bidirectional DMD = RUN/dmd (the main student), and the variants below."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from .config import TrainConfig
from .stages.common import teacher_stage

SHARED = ("vae", "vae-decoder", "text", "teacher", "teacher-refine", "causal-teacher", "ode-pairs", "ode-init",
          "latents.safetensors")
# variant -> DMD config fields changed from the main run's
VARIANTS = {
    "no-ode-init": {"init": "teacher"},  # generator starts from the bidirectional teacher's weights
    "causal-teacher-dmd": {"real_score": "causal-teacher"},  # real score from the causal teacher
}


def variant_root(root: str | Path, name: str) -> Path:
    return Path(root) / "ablation" / name


def link_shared(root: Path, dest: Path) -> None:
    """Symlink the main run's finished stages into dest (relative links: the run folder can move)."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in SHARED:
        src, link = root / name, dest / name
        if src.exists() and not link.exists():
            os.symlink(os.path.relpath(src, dest), link)


def run_ablation(cfg: TrainConfig, root: str | Path, variants=None, accelerator=None, log=print) -> dict[str, Path]:
    from .pipeline import run_stage

    root = Path(root)
    missing = [s for s in (teacher_stage(cfg), "ode-init") if not (root / s / "DONE.json").exists()]
    if "causal-teacher-dmd" in (variants or VARIANTS) and not (root / "causal-teacher" / "DONE.json").exists():
        missing.append("causal-teacher")
    if missing:
        raise FileNotFoundError(f"{root}: stages {missing} are not finished; run `causvid-train pipeline` first")
    out = {}
    for name in variants or VARIANTS:
        if name not in VARIANTS:
            raise ValueError(f"unknown ablation variant {name!r}; choose from {sorted(VARIANTS)}")
        dest = variant_root(root, name)
        link_shared(root, dest)
        vcfg = dataclasses.replace(cfg, dmd=dataclasses.replace(cfg.dmd, **VARIANTS[name]))
        (dest / "config.json").write_text(vcfg.to_json())
        seconds = run_stage("dmd", vcfg, dest, accelerator)
        log(f"[ablation] {name}: {seconds:.1f} s")
        out[name] = dest / "dmd" / "student.safetensors"
    return out
