"""ODE-regression initialisation (CausVid): the causal student starts from the teacher's weights and
learns, with the block-causal mask, to map each chunk's trajectory state at a random student step
(frames of a chunk share it) to the trajectory's end."""
from __future__ import annotations

from pathlib import Path

import torch

from causvid_core.flow import FlowGrid

from ..adversarial import Adversary
from ..config import TrainConfig
from ..data import load_ode_pairs
from ..losses import ode_regression_loss
from ..run import StageRun, train_steps
from .common import encode, output, save_stage_dit, stage_dits, student_steps, teacher_path, text_source
from .matching import MatchingGame


def run(cfg: TrainConfig, root: str | Path, accelerator=None) -> None:
    root = Path(root)
    r = StageRun(root, "ode-init", cfg.seed, accelerator)
    if r.done:
        return
    sc, chunk = cfg.ode_init, cfg.student.chunk_frames
    shift, _ = student_steps(cfg)
    states, prompts, timesteps = load_ode_pairs(root / "ode-pairs")  # [N, K+1, C, F, h, w]
    K = states.shape[1] - 1
    text = text_source(cfg, root)
    (student,) = stage_dits(r, cfg.parallel, teacher_path(cfg, root), sc.attention, checkpointing=sc.checkpointing)
    opt = torch.optim.AdamW(student.parameters(), lr=sc.lr, betas=(0.9, 0.999), weight_decay=sc.weight_decay)
    grid = FlowGrid(shift)
    ts = torch.tensor(timesteps, dtype=torch.float32)

    def loss_fn(step: int, idx: list[int], m) -> tuple[torch.Tensor, dict]:
        rows = [i % len(prompts) for i in idx]
        traj = states[rows].float()  # [B, K+1, C, F, h, w], on the CPU until the chunk states are picked
        F = traj.shape[3]
        chunks = -(-F // chunk)
        k = (r.rand(step, idx, (chunks,), purpose=4) * K).long().clamp(max=K - 1)  # [B, chunks]
        k_frames = k.repeat_interleave(chunk, dim=1)[:, :F]  # [B, F]
        b = torch.arange(len(idx)).unsqueeze(1)
        dev = r.device
        x_t = traj[b, k_frames, :, torch.arange(F)].permute(0, 2, 1, 3, 4).to(dev)  # [B, C, F, h, w]
        cond = encode(text, [prompts[i] for i in rows]).to(dev)
        t = ts[k_frames].to(dev)
        traj = traj.to(dev)
        x0 = grid.flow_to_x0(m(x_t, t, cond, chunk_frames=chunk), x_t, t)
        loss = ode_regression_loss(x0, t, traj[:, K])
        if game is None:
            return loss, {}
        metrics = game.train(step, idx, x0, cond)
        metrics["regression"] = loss.item()
        if game.active(step):
            g_loss = game.g_loss(x0, cond)
            metrics["g_loss"] = g_loss.item()
            loss = loss + sc.adv_weight * g_loss
        return loss, metrics

    game = MatchingGame.build(sc, cfg, root, r, text)
    student = train_steps(r, sc, student, opt, loss_fn, extra_state=game.state() if game is not None else None,
                          optional_state=Adversary.STATE)
    save_stage_dit(r, student, output(root, "ode-init"))
    r.finish(model=str(output(root, "ode-init")), steps=sc.steps)
