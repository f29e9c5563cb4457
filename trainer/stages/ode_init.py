"""ODE-regression initialisation (CausVid): the causal student starts from the teacher's weights and
learns, with the block-causal mask, to map each chunk's trajectory state at a random student step
(frames of a chunk share it) to the trajectory's end."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from causvid_core.checkpoints import load_dit, save_dit
from causvid_core.flow import FlowGrid
from causvid_core.text import load_text_encoder

from ..adversarial import LatentDiscriminator, matching_d_loss
from ..config import TrainConfig
from ..data import load_ode_pairs
from ..losses import contrast_prompts, ode_regression, ode_regression_loss
from ..run import StageRun, train_steps
from .common import encode, load_frozen, output, require, student_steps, teacher_stage
from .teacher import latent_set


class Adversary:
    """The matching-aware latent discriminator: each step it trains once on real clips of the data set
    (their prompts: true; a prompt with a swapped word: false) and the student's x0 (false); from
    `adv_start` the student's loss adds adv_weight x softplus(-D(x0, prompt))."""
    STATE = ("disc", "disc_optimizer")

    def __init__(self, sc, text, data, disc: torch.nn.Module, opt: torch.optim.Optimizer):
        self.sc, self.text, self.data, self.disc, self.opt = sc, text, data, disc, opt

    @classmethod
    def build(cls, cfg: TrainConfig, root: Path, run: StageRun, text) -> "Adversary":
        sc = cfg.ode_init
        data = latent_set(cfg, root, run)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            disc = LatentDiscriminator(data.latents.shape[1], encode(text, [""]).shape[-1], sc.disc_width)
        opt = torch.optim.AdamW(disc.parameters(), lr=sc.lr_disc, betas=(0.5, 0.9), weight_decay=0.0)
        return cls(sc, text, data, *run.acc.prepare(disc, opt))

    def state(self) -> dict:
        return {"disc": self.disc, "disc_optimizer": self.opt}

    def add(self, step: int, idx: list[int], loss: torch.Tensor, x0: torch.Tensor, cond: torch.Tensor
            ) -> tuple[torch.Tensor, dict]:
        real, real_prompts = self.data.batch(idx)
        swapped = contrast_prompts(real_prompts, self.sc.mismatch_words)  # K x [B]; [] without word groups
        # without word groups: each clip under its neighbour's prompt (mostly another prompt)
        mismatched = encode(self.text, swapped[step % len(swapped)] if swapped else real_prompts[1:] + real_prompts[:1])
        self.disc.requires_grad_(True)
        self.opt.zero_grad(set_to_none=True)
        d_loss, metrics = matching_d_loss(self.disc, real, encode(self.text, real_prompts), x0, cond, mismatched)
        d_loss.backward()
        self.opt.step()
        metrics.update(regression=loss.item(), d_loss=d_loss.item())
        if step < self.sc.adv_start:
            return loss, metrics
        self.disc.requires_grad_(False)
        g_loss = F.softplus(-self.disc(x0, cond)).mean()
        metrics["g_loss"] = g_loss.item()
        return loss + self.sc.adv_weight * g_loss, metrics


def run(cfg: TrainConfig, root: str | Path, accelerator=None) -> None:
    root = Path(root)
    r = StageRun(root, "ode-init", cfg.seed, accelerator)
    if r.done:
        return
    sc, chunk = cfg.ode_init, cfg.student.chunk_frames
    shift, _ = student_steps(cfg)
    states, prompts, timesteps = load_ode_pairs(root / "ode-pairs")  # [N, K+1, C, F, h, w]
    K = states.shape[1] - 1
    text = load_frozen(require(root, "text"), load_text_encoder)
    student = load_dit(require(root, teacher_stage(cfg))).train()
    student.requires_grad_(True)
    opt = torch.optim.AdamW(student.parameters(), lr=sc.lr, betas=(0.9, 0.999), weight_decay=sc.weight_decay)
    grid = FlowGrid(shift)
    ts = torch.tensor(timesteps, dtype=torch.float32)

    def loss_fn(step: int, idx: list[int], m) -> tuple[torch.Tensor, dict]:
        rows = [i % len(prompts) for i in idx]
        traj = states[rows].float()  # [B, K+1, C, F, h, w]
        F = traj.shape[3]
        chunks = -(-F // chunk)
        k = (r.rand(step, idx, (chunks,), purpose=4) * K).long().clamp(max=K - 1)  # [B, chunks]
        k_frames = k.repeat_interleave(chunk, dim=1)[:, :F]  # [B, F]
        b = torch.arange(len(idx)).unsqueeze(1)
        x_t = traj[b, k_frames, :, torch.arange(F)].permute(0, 2, 1, 3, 4)  # [B, C, F, h, w]
        cond = encode(text, [prompts[i] for i in rows])
        t = ts[k_frames]
        if adv is None:
            return ode_regression_loss(m, x_t, t, cond, traj[:, K], grid, chunk), {}
        x0 = grid.flow_to_x0(m(x_t, t, cond, chunk_frames=chunk), x_t, t)
        loss = ode_regression(x0, t, traj[:, K])
        return adv.add(step, idx, loss, x0, cond)

    adv = Adversary.build(cfg, root, r, text) if sc.adv_weight > 0 else None
    student = train_steps(r, sc, student, opt, loss_fn, extra_state=adv.state() if adv is not None else None,
                          optional_state=Adversary.STATE)
    if r.is_main:
        save_dit(student, output(root, "ode-init"))
    r.finish(model=str(output(root, "ode-init")), steps=sc.steps)
