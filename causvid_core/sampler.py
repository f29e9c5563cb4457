"""Samplers: plain functions over a model and its cache.

`causal_rollout` is CausVid's Algorithm 2 (reference/causal-wan.md section 4): per chunk, for each
step t_i: x0 = G(x, t_i) from the KV-cached forward; if not the last step, re-noise x0 to t_{i+1}
with fresh noise; the chunk is the last x0; then one t = 0 pass writes the clean chunk into the cache.
"""
from __future__ import annotations

import hashlib
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from .cache import KVCache
from .flow import FlowGrid
from .model import chunk_sizes

# (chunk index, step index, shape of the chunk) -> Gaussian noise for re-noising that chunk at that step
NoiseFn = Callable[[int, int, tuple[int, ...]], Tensor]


def noise_seed(*parts: int) -> int:
    """A stable 63-bit seed from integers (the same on every platform and Python version)."""
    digest = hashlib.sha256(":".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFFFFFFFFFFFFFF


def seeded_noise(seed: int, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> NoiseFn:
    """Noise for chunk c, step s derived from (seed, c, s) alone: one call or chunk-at-a-time, same stream."""
    def noise(chunk: int, step: int, shape: tuple[int, ...]) -> Tensor:
        g = torch.Generator(device="cpu").manual_seed(noise_seed(seed, chunk, step))
        return torch.randn(shape, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)
    return noise


@torch.no_grad()
def denoise_chunk(model, x: Tensor, context: Tensor, steps: Sequence[float], grid: FlowGrid, *,
                  cache: KVCache, start_frame: int, chunk_index: int, noise_fn: NoiseFn, **model_kw) -> Tensor:
    """Few-step denoising of one chunk x [B, C, f, H, W] (pure noise at steps[0]); returns its x0.
    Leaves the chunk's slots holding the last pass; the caller runs the t = 0 refresh."""
    B, f = x.shape[0], x.shape[2]
    x0 = x
    for i, t in enumerate(steps):
        tt = torch.full((B, f), float(t), dtype=torch.float32, device=x.device)
        flow = model(x, tt, context, cache=cache, start_frame=start_frame, **model_kw)
        x0 = grid.flow_to_x0(flow, x, tt[:, 0])
        if i + 1 < len(steps):
            x = grid.add_noise(x0, noise_fn(chunk_index, i, tuple(x.shape)).to(x.dtype),
                               torch.full((B,), float(steps[i + 1])))
    return x0


@torch.no_grad()
def refresh_cache(model, x0: Tensor, context: Tensor, *, cache: KVCache, start_frame: int, **model_kw) -> None:
    """Run the clean chunk at t = 0 so the cache holds its K/V (its output is discarded)."""
    B, f = x0.shape[0], x0.shape[2]
    model(x0, torch.zeros(B, f, device=x0.device), context, cache=cache, start_frame=start_frame, **model_kw)


@torch.no_grad()
def causal_rollout(model, noise: Tensor, context: Tensor, steps: Sequence[float], grid: FlowGrid, *,
                   cache: KVCache, chunk_frames: int | Sequence[int] = 3, noise_fn: Optional[NoiseFn] = None,
                   seed: int = 0, start_frame: int = 0, **model_kw) -> Tensor:
    """Generate every chunk of noise [B, C, F, H, W] in order; returns x0 [B, C, F, H, W]."""
    noise_fn = noise_fn or seeded_noise(seed, device=noise.device, dtype=noise.dtype)
    out = []
    s = 0
    for c, n in enumerate(chunk_sizes(noise.shape[2], chunk_frames)):
        x0 = denoise_chunk(model, noise[:, :, s:s + n], context, steps, grid, cache=cache,
                           start_frame=start_frame + s, chunk_index=c, noise_fn=noise_fn, **model_kw)
        refresh_cache(model, x0, context, cache=cache, start_frame=start_frame + s, **model_kw)
        out.append(x0)
        s += n
    return torch.cat(out, dim=2)
