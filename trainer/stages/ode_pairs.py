"""ODE pairs: the teacher's many-step guided trajectories from noise, kept at the student's steps.

With a teacher grid of `teacher_steps` Euler steps on the student's shift, the student's warped steps
are points of that grid (Self-Forcing: 48 steps, indices 0, 12, 24, 36 -> t = 1000, 937.5, 833.3, 625),
so the kept states are exact trajectory points, not interpolations."""
from __future__ import annotations

from pathlib import Path

import torch

from causvid_core.checkpoints import load_dit
from causvid_core.sampler import flow_sigmas, sample_bidirectional

from ..config import TrainConfig
from ..data import prompt_batch, save_ode_shard
from ..run import StageRun, autocast
from .common import (contrast_negatives, dit_config, encode, latent_shape, load_frozen, run_prompts, student_steps,
                     teacher_path, text_source)
from .teacher import latent_set


def keep_indices(teacher_steps: int, shift: float, steps: list[float]) -> list[int]:
    ts = (flow_sigmas(teacher_steps, shift) * 1000).tolist()
    out = []
    for t in steps:
        i = min(range(len(ts)), key=lambda j: abs(ts[j] - t))
        if abs(ts[i] - t) > 1e-2:
            raise ValueError(f"student step t={t} is not on a {teacher_steps}-step shift-{shift} teacher grid; "
                             "use teacher_steps a multiple of 4 with a warped step preset")
        out.append(i)
    return out + [teacher_steps]


@torch.no_grad()
def run(cfg: TrainConfig, root: str | Path, accelerator=None) -> None:
    root = Path(root)
    r = StageRun(root, "ode-pairs", cfg.seed, accelerator)
    if r.done:
        return
    sc = cfg.ode_pairs
    shift, steps = student_steps(cfg)
    keep = keep_indices(sc.teacher_steps, shift, steps)
    dev = r.device
    # under autocast the teacher computes in bf16 anyway: its weights are kept in bf16 too (14B: 29 GB, not 57)
    dtype = torch.bfloat16 if sc.autocast else None
    teacher = load_frozen(teacher_path(cfg, root), lambda p: load_dit(p, dtype=dtype)).to(dev)
    if sc.compile:
        teacher.compile()
    text = text_source(cfg, root)
    user = cfg.inputs.active
    dcfg = teacher.config if user else dit_config(cfg)
    F = (cfg.data.clip_frames - 1) // 4 + 1
    if user:
        hw, all_prompts = latent_shape(cfg, dcfg)[2:], run_prompts(cfg)
    else:  # encodes the data set if no stage has yet (restored runs)
        hw = tuple(latent_set(cfg, root, r).latents.shape[-2:])
    batches = range(0, sc.num_pairs, sc.batch)
    from tqdm import tqdm
    for b in tqdm(list(batches)[r.rank::r.world], desc="ode-pairs", disable=not r.is_main, dynamic_ncols=True):
        path = r.dir / f"shard_{b // sc.batch:05d}.safetensors"
        if path.exists():
            continue  # resumable: shards are written atomically, one per batch
        idx = list(range(b, min(b + sc.batch, sc.num_pairs)))
        prompts = [all_prompts[i % len(all_prompts)] for i in idx] if user else prompt_batch(cfg.data.seed + 1, idx)
        cond, uncond = encode(text, prompts).to(dev), encode(text, [""] * len(idx)).to(dev)
        noise = r.randn(0, idx, (dcfg.out_dim, F, *hw)).to(dev)
        negatives = [n.to(dev) for n in contrast_negatives(text, prompts, sc.active_contrast, sc.contrast_words)]
        with autocast(sc.autocast, r.acc.device):
            _, kept = sample_bidirectional(teacher, noise, cond, uncond, steps=sc.teacher_steps, shift=shift,
                                           guidance=sc.guidance, keep=keep, negatives=negatives,
                                           contrast=sc.active_contrast, eta=sc.eta,
                                           step_noise=lambda i, idx=idx: r.randn(i + 1, idx, noise.shape[1:]))
        states = torch.stack([kept[i] for i in keep], dim=1).cpu()  # [B, K+1, C, F, h, w]
        save_ode_shard(path, states, prompts, list(steps) + [0.0])
        r.save_seconds()
    r.acc.wait_for_everyone()
    r.finish(pairs=sc.num_pairs, teacher_steps=sc.teacher_steps, keep=keep, timesteps=list(steps) + [0.0],
             contrast=sc.active_contrast, eta=sc.eta)

