"""Flow-matching parameterisation in one place: sigma <-> t, shift, step lists, flow <-> x0.

x_t = (1 - sigma) * x0 + sigma * noise, model timestep t = 1000 * sigma, the model predicts the flow
v = noise - x0, so x0 = x_t - sigma * v (computed in float64, as the reference does).

The CausVid / Self-Forcing schedulers look sigma up on a 1000-point shifted grid at the grid
timestep NEAREST to t (reference/causal-wan.md section 3): `FlowGrid` reproduces that rule, in the
reference's float32 arithmetic, and is the default for their checkpoints.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

NUM_TRAIN_TIMESTEPS = 1000


def shift_sigma(sigma: Tensor | float, shift: float) -> Tensor | float:
    """sigma' = s * sigma / (1 + (s - 1) * sigma)."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def sigma_to_t(sigma: Tensor | float) -> Tensor | float:
    return sigma * NUM_TRAIN_TIMESTEPS


def t_to_sigma(t: Tensor | float) -> Tensor | float:
    return t / NUM_TRAIN_TIMESTEPS


class FlowGrid:
    """The reference schedulers' grid: sigmas = shift(linspace(1, 0, 1001)[:-1]) in float32."""

    def __init__(self, shift: float, num_points: int = NUM_TRAIN_TIMESTEPS):
        self.shift = float(shift)
        sigmas = torch.linspace(1.0, 0.0, num_points + 1, dtype=torch.float32)[:-1]
        self.sigmas = shift_sigma(sigmas, self.shift)  # [num_points] float32, decreasing from 1
        self.timesteps = self.sigmas * NUM_TRAIN_TIMESTEPS

    def sigma(self, t: Tensor | float) -> Tensor:
        """float32 sigma of the grid point nearest to each t (t any shape)."""
        t = torch.as_tensor(t, dtype=torch.float64)
        idx = (self.timesteps.double().view(*([1] * t.dim()), -1) - t.unsqueeze(-1)).abs().argmin(dim=-1)
        return self.sigmas[idx]

    def warped_steps(self, base: Sequence[float]) -> list[float]:
        """Grid timesteps at indices 1000 - base (Self-Forcing's warp: [1000,750,500,250] at shift 5
        -> [1000, 937.5, 833.3, 625]). A base of 0 gives t = 0."""
        table = torch.cat([self.timesteps, torch.zeros(1)])
        return [float(table[NUM_TRAIN_TIMESTEPS - int(b)]) for b in base]

    def flow_to_x0(self, flow: Tensor, xt: Tensor, t: Tensor | float) -> Tensor:
        sigma = _per_sample(self.sigma(t).double(), flow)
        return (xt.double() - sigma * flow.double()).to(flow.dtype)

    def x0_to_flow(self, x0: Tensor, xt: Tensor, t: Tensor | float) -> Tensor:
        sigma = _per_sample(self.sigma(t).double(), x0)
        return ((xt.double() - x0.double()) / sigma).to(x0.dtype)

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor | float) -> Tensor:
        sigma = _per_sample(self.sigma(t), x0).to(x0.dtype)
        return ((1 - sigma) * x0 + sigma * noise).type_as(noise)


def _per_sample(sigma: Tensor, like: Tensor) -> Tensor:
    """A scalar, [B] or [B, F] sigma broadcast against [B, C, F, H, W]."""
    if sigma.dim() == 0:
        return sigma
    if sigma.dim() == 1:
        return sigma.view(-1, 1, 1, 1, 1) if like.dim() == 5 else sigma.view(-1, *([1] * (like.dim() - 1)))
    if sigma.dim() == 2 and like.dim() == 5:  # per-frame [B, F]
        return sigma.view(sigma.shape[0], 1, sigma.shape[1], 1, 1)
    raise ValueError(f"sigma of shape {tuple(sigma.shape)} does not broadcast against {tuple(like.shape)}")


STEP_PRESETS: dict[str, tuple[float, list[float]]] = {
    # name: (shift, timesteps); shared/reference/causal-wan.md section 4
    "causvid-3step": (8.0, [1000.0, 757.0, 522.0]),
    "causvid-4step": (8.0, FlowGrid(8.0).warped_steps([1000, 750, 500, 250])),
    "self-forcing-4step": (5.0, FlowGrid(5.0).warped_steps([1000, 750, 500, 250])),
}


def step_preset(name: str) -> tuple[float, list[float]]:
    try:
        shift, steps = STEP_PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown step preset {name!r}; choose one of {sorted(STEP_PRESETS)}") from None
    return shift, list(steps)
