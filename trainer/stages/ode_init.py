"""ODE-regression initialisation (CausVid): the causal student starts from the teacher's weights and
learns, with the block-causal mask, to map each chunk's trajectory state at a random student step
(frames of a chunk share it) to the trajectory's end."""
from __future__ import annotations

from pathlib import Path

import torch

from causvid_core.checkpoints import load_dit, save_dit
from causvid_core.flow import FlowGrid
from causvid_core.text import load_text_encoder

from ..adversarial import Adversary, LatentDiscriminator, matching_d_loss, matching_g_loss
from ..config import TrainConfig
from ..data import load_ode_pairs
from ..losses import contrast_prompts, ode_regression_loss
from ..run import StageRun, train_steps
from .common import encode, load_frozen, output, require, student_steps, teacher_stage
from .teacher import latent_set


def mismatched_prompts(step: int, prompts: list[str], words: list) -> list[str]:
    """The prompts with one word of a group swapped for a rival (the group and rival cycling with the step);
    without word groups, each clip under its neighbour's prompt (mostly another prompt)."""
    swapped = contrast_prompts(prompts, words)  # K x [B]; [] without word groups
    return swapped[step % len(swapped)] if swapped else prompts[1:] + prompts[:1]


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
        x0 = grid.flow_to_x0(m(x_t, t, cond, chunk_frames=chunk), x_t, t)
        loss = ode_regression_loss(x0, t, traj[:, K])
        if adv is None:
            return loss, {}
        # the discriminator: real clips of the data set under their prompts (true) and under mismatched ones,
        # and the student's x0 (false); from adv_start the student's loss adds its generator term
        real, real_prompts = data.batch(idx)
        wrong = mismatched_prompts(step, real_prompts, sc.mismatch_words)
        real_text, wrong_text = encode(text, real_prompts), encode(text, wrong)
        metrics = adv.train(lambda disc: matching_d_loss(disc, real, real_text, x0, cond, wrong_text))
        metrics["regression"] = loss.item()
        if step >= sc.adv_start:
            g_loss = matching_g_loss(adv.frozen(), x0, cond)
            metrics["g_loss"] = g_loss.item()
            loss = loss + sc.adv_weight * g_loss
        return loss, metrics

    adv, data = None, None
    if sc.adv_weight > 0:
        data = latent_set(cfg, root, r)
        adv = Adversary.build(lambda: LatentDiscriminator(data.latents.shape[1], encode(text, [""]).shape[-1],
                                                          sc.disc_width), sc.lr_disc, cfg.seed, r)
    student = train_steps(r, sc, student, opt, loss_fn, extra_state=adv.state() if adv is not None else None,
                          optional_state=Adversary.STATE)
    if r.is_main:
        save_dit(student, output(root, "ode-init"))
    r.finish(model=str(output(root, "ode-init")), steps=sc.steps)
