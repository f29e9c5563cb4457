"""The teacher fine-tuned with the block-causal mask (the paper's "causal teacher" ablation): each
chunk gets its own timestep, as a causal model sees noisy chunks after cleaner ones."""
from __future__ import annotations

from pathlib import Path

import torch

from causvid_core.flow import FlowGrid

from ..config import TrainConfig
from ..losses import flow_matching_loss
from ..run import StageRun, train_steps
from .common import encode, grid_index, output, save_stage_dit, stage_dits, teacher_path
from .teacher import latent_batch, training_data


def chunk_timesteps(grid: FlowGrid, u: torch.Tensor, frames: int, chunk: int) -> torch.Tensor:
    """u [B, chunks] uniforms -> per-frame t [B, F], one timestep per chunk."""
    t = grid_index(grid, u.flatten()).view(u.shape)
    return t.repeat_interleave(chunk, dim=1)[:, :frames]


def run(cfg: TrainConfig, root: str | Path, accelerator=None) -> None:
    root = Path(root)
    r = StageRun(root, "causal-teacher", cfg.seed, accelerator)
    if r.done:
        return
    sc, chunk = cfg.causal_teacher, cfg.student.chunk_frames
    text, data = training_data(cfg, root, r)
    (model,) = stage_dits(r, cfg.parallel, teacher_path(cfg, root), sc.attention, checkpointing=sc.checkpointing)
    opt = torch.optim.AdamW(model.parameters(), lr=sc.lr, betas=(0.9, 0.999), weight_decay=sc.weight_decay)
    grid = FlowGrid(cfg.teacher.shift)

    def loss_fn(step: int, idx: list[int], m) -> tuple[torch.Tensor, dict]:
        x0, prompts = latent_batch(cfg, r, data, step, idx)
        F = x0.shape[2]
        drop = r.rand(step, idx, purpose=2) < cfg.teacher.cond_dropout
        cond = encode(text, ["" if d else p for d, p in zip(drop.tolist(), prompts)])
        noise = r.randn(step, idx, tuple(x0.shape[1:]))
        t = chunk_timesteps(grid, r.rand(step, idx, (-(-F // chunk),), purpose=3), F, chunk)
        dev = r.device
        return flow_matching_loss(m, x0.to(dev), noise.to(dev), t.to(dev), cond.to(dev), grid, chunk_frames=chunk), {}

    model = train_steps(r, sc, model, opt, loss_fn)
    save_stage_dit(r, model, output(root, "causal-teacher"))
    r.finish(model=str(output(root, "causal-teacher")), steps=sc.steps)
