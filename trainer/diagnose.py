"""Where does the teacher lose a prompt? Real clips of the result prompts are encoded, noised to sigma s0
and sampled back by the teacher (the tail of its many-step grid below s0, its guidance), then judged like
every other row. s0 = 1 starts from the very noise of the teacher row of RESULTS (so it is that row);
s0 = 0 is the VAE round trip. The sigma where all-four falls is where the model decides, and loses, an
attribute: in the shapes teacher, shapes go between sigma 0.6 and 0.93. The sampling is the ODE pairs'
(guidance, contrast, eta): `--set ode_pairs.eta=1` measures the teacher with stochastic steps.

    causvid-train diagnose --preset shapes --out runs/shapes --sigmas 0,0.4,0.6,0.75,0.9,1
"""
from __future__ import annotations

import collections
from pathlib import Path
from typing import Sequence

import torch

from causvid_core import evaluate, world

from .config import TrainConfig
from .results import FULL, QUICK, ManyStep, clip_seed, many_step_batch, prompt_sets
from .stages.common import require, teacher_stage, vae_stage

DEFAULT_SIGMAS = (0.0, 0.25, 0.5, 0.75, 0.9, 1.0)


@torch.no_grad()
def renoised_clips(components, specs: Sequence[world.ClipSpec], seeds: Sequence[int], s0: float, ms: ManyStep,
                   frames: int) -> list:
    """The teacher's clips from the real clips noised to s0 (uint8 [T, H, W, 3] each)."""
    from causvid_core.video_io import from_uint8, to_uint8

    vae = components.vae
    x0 = torch.cat([vae.encode(from_uint8(world.render(s, frames))) for s in specs])  # [B, C, F, h, w]
    if s0 == 0:
        return [to_uint8(v) for v in vae.decode(x0)]  # nothing to sample: the VAE round trip
    return many_step_batch(components, "bidirectional", [s.prompt for s in specs], list(seeds), ms, frames,
                           start=x0, start_sigma=s0)


def renoise_sweep(cfg: TrainConfig, root: str | Path, sigmas: Sequence[float] = DEFAULT_SIGMAS,
                  quick: bool = False, log=print) -> dict:
    """All-four accuracy and the shape confusion of the run's final teacher at each starting sigma, on the
    in-distribution prompts the teacher row of RESULTS sees."""
    from causvid_core.pipeline import load_components

    root = Path(root)
    if any(not 0.0 <= s <= 1.0 for s in sigmas):
        raise ValueError(f"sigmas must lie in [0, 1], got {list(sigmas)}")
    teacher = require(root, teacher_stage(cfg))  # the stages' own files: no student or export needed
    components = load_components(teacher, require(root, vae_stage(cfg)), require(root, "text"))
    counts = QUICK if quick else FULL
    sets = [(i, s) for split, i, s in prompt_sets(counts) if split == "train"][:counts.teacher_n_in]
    specs, seeds = [s for _, s in sets], [clip_seed("train", i) for i, _ in sets]
    ms = ManyStep.from_config(cfg)
    out = dict(teacher=str(teacher), prompts=len(specs), steps=ms.steps, shift=ms.shift, guidance=ms.guidance,
               contrast=ms.contrast, eta=ms.eta, sigmas={})
    for s0 in sigmas:
        clips = renoised_clips(components, specs, seeds, float(s0), ms, cfg.data.clip_frames)
        right, shapes = 0, collections.defaultdict(collections.Counter)
        for clip, spec in zip(clips, specs):
            r = evaluate.evaluate_clip(clip, spec.prompt, value_range="uint8")
            right += all(r["correct"].values())
            shapes[spec.shape][str(r["detected"]["shape"])] += 1
        out["sigmas"][f"{float(s0):g}"] = dict(all_four=right / len(specs),
                                               shapes={k: dict(v) for k, v in sorted(shapes.items())})
        log(f"[diagnose] sigma {float(s0):g}: all-four {right}/{len(specs)}")
    return out
