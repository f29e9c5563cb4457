"""The losses every stage is built from: flow matching, ODE regression, the DMD generator loss and
the critic's denoising loss. All go through the same parameterisation (causvid_core.flow.FlowGrid):
x_t = (1 - sigma) x0 + sigma noise, the models predict the flow v = noise - x0."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from causvid_core.flow import FlowGrid
from causvid_core.sampler import guided_flow


def per_frame(t: Tensor, frames: int) -> Tensor:
    """[B] -> [B, F] (a per-frame timestep table)."""
    return t.unsqueeze(1).expand(-1, frames) if t.dim() == 1 else t


def flow_matching_loss(model, x0: Tensor, noise: Tensor, t: Tensor, cond: Tensor, grid: FlowGrid,
                       chunk_frames=None) -> Tensor:
    """MSE between the predicted and the true flow at x_t (t [B] or per-frame [B, F])."""
    x_t = grid.add_noise(x0, noise, t)
    v = model(x_t, t, cond, chunk_frames=chunk_frames)
    return F.mse_loss(v.float(), (noise - x0).float())


def ode_regression_loss(x0: Tensor, t: Tensor, x0_target: Tensor) -> Tensor:
    """CausVid's ODE initialisation: the student's x0 [B, C, F, h, w] from one block-causal pass over the
    trajectory states at per-frame t [B, F]; MSE to the trajectory's end on frames with t != 0."""
    err = ((x0.float() - x0_target.float()) ** 2).mean(dim=(1, 3, 4))  # [B, F]
    mask = (t != 0).float()
    return (err * mask).sum() / mask.sum().clamp_min(1.0)


def guided_x0(model, x_t: Tensor, t: Tensor, cond: Tensor, uncond: Optional[Tensor], guidance: float,
              grid: FlowGrid, chunk_frames=None, negatives: Sequence[Tensor] = (), contrast: float = 0.0) -> Tensor:
    """x0 from a (guided) score: cond + g * (cond - uncond) on x0 (effective CFG 1 + g, as in CausVid),
    plus contrast * (cond - mean over negatives) (see `contrast_prompts`). x0 is affine in the flow, so this
    is the x0 of the sampler's guided flow at CFG 1 + g."""
    flow = guided_flow(model, x_t, t, cond, uncond, 1.0 + guidance, negatives=negatives, contrast=contrast,
                       chunk_frames=chunk_frames)
    return grid.flow_to_x0(flow, x_t, t)


def contrast_prompts(prompts: Sequence[str], groups: Sequence[Sequence[str]]) -> list[list[str]]:
    """Negatives for attribute-contrastive guidance: [K][B] prompts, K = sum(len(group) - 1).

    Negative k of a prompt swaps its word of one group for another word of that group ("a red circle"
    -> "a red square", "a red triangle"); a prompt without a word of the group is its own negative
    (no contrast), so every batch has the same K."""
    out: list[list[str]] = []
    for group in groups:
        for k in range(1, len(group)):
            row = []
            for p in prompts:
                words = p.split(" ")
                hits = [i for i, w in enumerate(words) if w in group]
                if hits:
                    i = hits[0]
                    words[i] = group[(list(group).index(words[i]) + k) % len(group)]
                row.append(" ".join(words))
            out.append(row)
    return out


def dmd_generator_loss(x_gen: Tensor, x0_real: Tensor, x0_fake: Tensor) -> Tensor:
    """Distribution matching: move x_gen along (x_fake - x_real), normalised by |x_gen - x_real|.

    grad = (x0_fake - x0_real) / mean(|x_gen - x0_real|) over (C, F, H, W), per sample, nan_to_num;
    loss = 0.5 * MSE(x_gen, stopgrad(x_gen - grad)) in float64, whose gradient wrt x_gen is grad / numel."""
    x_gen64 = x_gen.double()
    with torch.no_grad():
        norm = (x_gen64 - x0_real.double()).abs().mean(dim=tuple(range(1, x_gen.dim())), keepdim=True)
        grad = torch.nan_to_num((x0_fake.double() - x0_real.double()) / norm)
        target = x_gen64 - grad
    return 0.5 * F.mse_loss(x_gen64, target)


def critic_loss(fake, x_gen: Tensor, noise: Tensor, t: Tensor, cond: Tensor, grid: FlowGrid) -> Tensor:
    """The fake score learns the generator's distribution: the flow-matching loss on x_gen (detached).
    (The reference converts the critic's x0 back to a flow; with one parameterisation that is its output.)"""
    return flow_matching_loss(fake, x_gen.detach(), noise, t, cond, grid)
