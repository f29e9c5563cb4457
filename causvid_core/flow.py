"""Flow-matching parameterisation in one place: sigma <-> t, shift, step lists, flow <-> x0.

x_t = (1 - sigma) * x0 + sigma * noise, model timestep t = 1000 * sigma, the model predicts the flow
v = noise - x0, so x0 = x_t - sigma * v (computed in float64 on the CPU, as the reference does, and in
float32 on other devices: precision.py).

Timesteps are Python floats in the samplers (one t for the whole chunk): the sigma lookup then runs on
the host, before any kernel, and no timestep tensor has to live on the model's device. Tensors of
timesteps (training: one t per sample) are looked up on their own device.

The CausVid / Self-Forcing schedulers look sigma up on a 1000-point shifted grid at the grid
timestep NEAREST to t (reference/causal-wan.md section 3): `FlowGrid` reproduces that rule, in the
reference's float32 arithmetic, and is the default for their checkpoints.
"""
from __future__ import annotations

import functools
from typing import Sequence

import torch
from torch import Tensor

from .precision import exact_dtype

NUM_TRAIN_TIMESTEPS = 1000


def shift_sigma(sigma: Tensor | float, shift: float) -> Tensor | float:
    """sigma' = s * sigma / (1 + (s - 1) * sigma)."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def sigma_to_t(sigma: Tensor | float) -> Tensor | float:
    return sigma * NUM_TRAIN_TIMESTEPS


def t_to_sigma(t: Tensor | float) -> Tensor | float:
    return t / NUM_TRAIN_TIMESTEPS


@functools.lru_cache(maxsize=32)
def _grid_values(shift: float, num_points: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(sigmas, timesteps) of the grid as Python floats (float32 values): host constants, computed once
    per shift on the real CPU even while a fake-tensor harness is active (fakedevice.py)."""
    with _real_cpu():
        sigmas = torch.linspace(1.0, 0.0, num_points + 1, dtype=torch.float32)[:-1]
        sigmas = shift_sigma(sigmas, shift)  # [num_points] float32, decreasing from 1
        return tuple(sigmas.tolist()), tuple((sigmas * NUM_TRAIN_TIMESTEPS).tolist())


@functools.lru_cache(maxsize=4096)  # streams ask for the same few timesteps every chunk
def _nearest_sigma(shift: float, num_points: int, t: float) -> float:
    sigmas, ts = _grid_values(shift, num_points)
    idx = min(range(len(ts)), key=lambda i: abs(ts[i] - t))  # the first of equals, like argmin
    return sigmas[idx]


def _real_cpu():
    try:
        from torch._subclasses.fake_tensor import unset_fake_temporarily
    except ImportError:  # older torch: no fake mode to step out of
        import contextlib
        return contextlib.nullcontext()
    return unset_fake_temporarily()


class FlowGrid:
    """The reference schedulers' grid: sigmas = shift(linspace(1, 0, 1001)[:-1]) in float32."""

    def __init__(self, shift: float, num_points: int = NUM_TRAIN_TIMESTEPS):
        self.shift = float(shift)
        self.sigma_values, self.timestep_values = _grid_values(self.shift, num_points)
        self._device_tables: dict[str, tuple[Tensor, Tensor]] = {}

    @property
    def sigmas(self) -> Tensor:
        """[num_points] float32 on the CPU, decreasing from 1."""
        return self._on(torch.device("cpu"))[0]

    @property
    def timesteps(self) -> Tensor:
        return self._on(torch.device("cpu"))[1]

    def sigma(self, t: Tensor | float) -> Tensor | float:
        """Sigma of the grid point nearest to each t: a float for a float t (looked up on the host, no
        tensor made), else a float32 tensor of t's shape on t's device."""
        if not isinstance(t, Tensor):
            return _nearest_sigma(self.shift, len(self.sigma_values), float(t))
        dt = exact_dtype(t.device)
        sigmas, timesteps = self._on(t.device)
        idx = (timesteps.to(dt).view(*([1] * t.dim()), -1) - t.to(dt).unsqueeze(-1)).abs().argmin(dim=-1)
        return sigmas[idx]

    def _on(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """(sigmas, timesteps) on `device`, copied there once."""
        key = str(device)
        if key not in self._device_tables:
            self._device_tables[key] = (torch.tensor(self.sigma_values, dtype=torch.float32, device=device),
                                        torch.tensor(self.timestep_values, dtype=torch.float32, device=device))
        return self._device_tables[key]

    def warped_steps(self, base: Sequence[float]) -> list[float]:
        """Grid timesteps at indices 1000 - base (Self-Forcing's warp: [1000,750,500,250] at shift 5
        -> [1000, 937.5, 833.3, 625]). A base of 0 gives t = 0."""
        table = list(self.timestep_values) + [0.0]
        return [float(table[NUM_TRAIN_TIMESTEPS - int(b)]) for b in base]

    def flow_to_x0(self, flow: Tensor, xt: Tensor, t: Tensor | float) -> Tensor:
        dt = exact_dtype(flow.device)
        sigma = self._exact_sigma(t, flow, dt)
        return (xt.to(dt) - sigma * flow.to(dt)).to(flow.dtype)

    def x0_to_flow(self, x0: Tensor, xt: Tensor, t: Tensor | float) -> Tensor:
        dt = exact_dtype(x0.device)
        sigma = self._exact_sigma(t, x0, dt)
        return ((xt.to(dt) - x0.to(dt)) / sigma).to(x0.dtype)

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor | float) -> Tensor:
        sigma = self.sigma(t)
        if isinstance(sigma, Tensor):
            sigma = _per_sample(sigma, x0).to(x0.dtype)
        return ((1 - sigma) * x0 + sigma * noise).type_as(noise)

    def _exact_sigma(self, t: Tensor | float, like: Tensor, dtype: torch.dtype) -> Tensor | float:
        sigma = self.sigma(t)
        return sigma if not isinstance(sigma, Tensor) else _per_sample(sigma.to(dtype), like)


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
