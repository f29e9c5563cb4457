"""Samplers: plain functions over a model and its cache.

`causal_rollout` is CausVid's Algorithm 2 (reference/causal-wan.md section 4): per chunk, for each
step t_i: x0 = G(x, t_i) from the KV-cached forward; if not the last step, re-noise x0 to t_{i+1}
with fresh noise; the chunk is the last x0; then one t = 0 pass writes the clean chunk into the cache.
"""
from __future__ import annotations

import hashlib
import math
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from .cache import KVCache
from .flow import FlowGrid
from .model import chunk_sizes
from .precision import exact_dtype

# (chunk index, step index, shape of the chunk) -> Gaussian noise for re-noising that chunk at that step
NoiseFn = Callable[[int, int, tuple[int, ...]], Tensor]


def noise_seed(*parts: int) -> int:
    """A stable 63-bit seed from integers (the same on every platform and Python version)."""
    digest = hashlib.sha256(":".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFFFFFFFFFFFFFF


def model_dtype(model) -> torch.dtype:
    """The dtype a model computes in, and so its KV cache's: its compute dtype where it has one (fp8 storage,
    ComfyUI's manual cast), else its parameters'."""
    return getattr(model, "compute_dtype", None) or next(model.parameters()).dtype


def seeded_noise(seed: int, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> NoiseFn:
    """Noise for chunk c, step s derived from (seed, c, s) alone: one call or chunk-at-a-time, same stream.

    Drawn on the CPU in float32 and copied to `device` in one transfer (a chunk's latents: 1.2 MB at
    832x480 for 3 latent frames), so a seed gives the same noise on every device and every torch build;
    device generators differ between CUDA, ROCm and MPS."""
    def noise(chunk: int, step: int, shape: tuple[int, ...]) -> Tensor:
        g = torch.Generator(device="cpu").manual_seed(noise_seed(seed, chunk, step))
        return torch.randn(shape, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)
    return noise


@torch.no_grad()
def denoise_chunk(model, x: Tensor, context: Tensor, steps: Sequence[float], grid: FlowGrid, *,
                  cache: KVCache, start_frame: int, chunk_index: int, noise_fn: NoiseFn,
                  fixed: Optional[Tensor] = None, callback: Optional[Callable[[int, Tensor], None]] = None,
                  **model_kw) -> Tensor:
    """Few-step denoising of one chunk x [B, C, f, H, W] (noise at steps[0]); returns its x0.

    fixed [B, C, k, H, W]: the chunk's first k frames are known clean latents (image-to-video with a
    chunk-multiple layout): they enter every pass at t = 0 and are kept in x0. The chunk's cache slots
    hold the last pass; the caller runs the t = 0 refresh. callback(i, x0) runs after step i (progress,
    previews of x0, interruption: an exception there leaves the caller's state as it was before the chunk)."""
    B, f = x.shape[0], x.shape[2]
    k = 0 if fixed is None else fixed.shape[2]
    x0 = x
    for i, t in enumerate(steps):
        if k:
            x = torch.cat([fixed.to(x), x[:, :, k:]], dim=2)
        tt = torch.full((B, f), float(t), dtype=torch.float32, device=x.device)
        tt[:, :k] = 0.0
        flow = model(x, tt, context, cache=cache, start_frame=start_frame, **model_kw)
        x0 = grid.flow_to_x0(flow, x, float(t))
        if callback is not None:
            callback(i, x0)
        if k:
            x0 = torch.cat([fixed.to(x0), x0[:, :, k:]], dim=2)
        if i + 1 < len(steps):
            x = grid.add_noise(x0, noise_fn(chunk_index, i, tuple(x.shape)).to(x.dtype), float(steps[i + 1]))
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


# -- many-step samplers with classifier-free guidance (the teacher side) ------------------------------

def flow_sigmas(num_steps: int, shift: float) -> Tensor:
    """[num_steps + 1] float64 sigmas from 1 to 0 on the shifted schedule (Wan's sampling grid)."""
    s = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    return shift * s / (1 + (shift - 1) * s)


def guided_flow(model, x: Tensor, t: Tensor, cond: Tensor, uncond: Optional[Tensor], guidance: float,
                caches: tuple = (None, None), negatives: Sequence[Tensor] = (), contrast: float = 0.0,
                negative_caches: Sequence = (), **kw) -> Tensor:
    """uncond + g * (cond - uncond); a single pass when g == 1 or there is no uncond.

    negatives / contrast: attribute-contrastive guidance, + contrast * (cond - mean over negatives),
    each negative the prompt with one attribute word swapped for a rival; negative_caches: one KV
    cache per negative for causal sampling."""
    def flow(ctx: Tensor, cache) -> Tensor:
        return model(x, t, ctx, **({"cache": cache, **kw} if cache is not None else kw))

    c_cache, u_cache = caches
    v_cond = flow(cond, c_cache)
    v = v_cond
    if uncond is not None and guidance != 1.0:
        v_uncond = flow(uncond, u_cache)
        v = v_uncond + guidance * (v_cond - v_uncond)
    if negatives and contrast:
        n_caches = list(negative_caches) or [None] * len(negatives)
        if len(n_caches) != len(negatives) or (c_cache is not None and None in n_caches):
            raise ValueError("contrastive guidance with KV caches needs one cache per negative")
        v = v + contrast * (v_cond - torch.stack([flow(n, c) for n, c in zip(negatives, n_caches)]).mean(0))
    return v


def _t_like(sigma: Tensor, B: int, frames: Optional[int], device) -> Tensor:
    t = torch.full((B,), float(sigma) * 1000.0, device=device)
    return t if frames is None else t.unsqueeze(1).expand(B, frames)


@torch.no_grad()
def sample_flow(velocity: Callable[[Tensor, Tensor], Tensor], noise: Tensor, sigmas: Tensor,
                solver: str = "euler", keep: Sequence[int] = (), per_frame: bool = False, eta: float = 0.0,
                step_noise: Optional[Callable[[int], Tensor]] = None) -> tuple[Tensor, dict[int, Tensor]]:
    """Integrate the flow ODE from noise (sigmas[0] = 1) to sigmas[-1] = 0.

    velocity(x, t) returns the (guided) flow at raw timesteps t [B] (or [B, F] when per_frame).
    solver: "euler" or "dpmpp2m" (DPM-Solver++(2M) in data prediction, alpha = 1 - sigma).
    keep: indices of the trajectory to return (0 = the noise, len(sigmas) - 1 = the result).
    eta (Euler only): stochastic steps. Each step goes to x0_hat (1 - s') + s' n, n the step's predicted
    noise eps_hat = x + (1 - s) v mixed with fresh noise: sqrt(1 - eta^2) eps_hat + eta z, z = step_noise(i)
    [B, ...] (same shape as noise). eta 0 is the Euler step exactly; eta 1 re-noises the x0 prediction with
    fresh noise at every step (ancestral, like the few-step students' own sampling)."""
    if solver not in ("euler", "dpmpp2m"):
        raise ValueError(f"solver must be 'euler' or 'dpmpp2m', got {solver!r}")
    if not 0.0 <= eta <= 1.0 or (eta and (solver != "euler" or step_noise is None)):
        raise ValueError(f"eta must be in [0, 1] (got {eta}); eta > 0 needs the euler solver and step_noise")
    B = noise.shape[0]
    frames = noise.shape[2] if per_frame else None
    dt = exact_dtype(noise.device)  # float64 on the CPU, float32 elsewhere
    x = noise.to(dt)
    kept = {0: noise.clone()} if 0 in keep else {}
    prev_x0, prev_h = None, None
    n = len(sigmas) - 1
    for i in range(n):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        v = velocity(x.to(noise.dtype), _t_like(s, B, frames, noise.device)).to(dt)
        x0 = x - s * v
        if s_next == 0.0:
            x = x0
        elif eta:
            fresh = step_noise(i).to(device=x.device, dtype=dt)
            x = (1 - s_next) * x0 + s_next * (math.sqrt(1 - eta ** 2) * (x + (1 - s) * v) + eta * fresh)
        elif solver == "euler" or s >= 1.0:  # at sigma = 1, lambda = -inf: DPM++ starts with an Euler step
            x = x + (s_next - s) * v
        else:
            lam, lam_next = math.log((1 - s) / s), math.log((1 - s_next) / s_next)
            h = lam_next - lam
            d = x0
            if prev_x0 is not None and prev_h is not None:
                r = prev_h / h
                d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * prev_x0
            x = (s_next / s) * x - (1 - s_next) * math.expm1(-h) * d
            prev_h = h
        prev_x0 = x0
        if i + 1 in keep or i + 1 - (n + 1) in keep:
            kept[i + 1] = x.to(noise.dtype)
    return x.to(noise.dtype), kept


@torch.no_grad()
def sample_bidirectional(model, noise: Tensor, cond: Tensor, uncond: Optional[Tensor] = None, *,
                         steps: int = 50, shift: float = 8.0, guidance: float = 5.0, solver: str = "euler",
                         keep: Sequence[int] = (), negatives: Sequence[Tensor] = (),
                         contrast: float = 0.0, start_sigma: float = 1.0, eta: float = 0.0,
                         step_noise: Optional[Callable[[int], Tensor]] = None) -> tuple[Tensor, dict[int, Tensor]]:
    """The teacher: many steps over the whole clip at once, with classifier-free guidance (and
    attribute-contrastive guidance when negatives are given, see `guided_flow`). start_sigma < 1: `noise` is
    a clip already noised to that sigma, integrated over the grid's sigmas below it (SDEdit). eta,
    step_noise: stochastic steps (`sample_flow`)."""
    sigmas = flow_sigmas(steps, shift)
    if start_sigma < 1.0:
        sigmas = torch.cat([torch.tensor([start_sigma], dtype=sigmas.dtype), sigmas[sigmas < start_sigma]])
    return sample_flow(lambda x, t: guided_flow(model, x, t, cond, uncond, guidance, negatives=negatives,
                                                contrast=contrast), noise, sigmas, solver, keep,
                       eta=eta, step_noise=step_noise)


@torch.no_grad()
def sample_causal_teacher(model, noise: Tensor, cond: Tensor, uncond: Optional[Tensor] = None, *,
                          chunk_frames: int | Sequence[int] = 3, steps: int = 50, shift: float = 8.0,
                          guidance: float = 5.0, solver: str = "euler", window_frames: Optional[int] = None,
                          sink_frames: int = 0, negatives: Sequence[Tensor] = (), contrast: float = 0.0) -> Tensor:
    """A causal model sampled chunk by chunk with many steps and guidance (the causal-teacher ablation).
    One KV cache per conditioning (and per contrastive negative); each finished chunk is written to all
    of them at t = 0."""
    B, F = noise.shape[0], noise.shape[2]
    T = model.config.tokens_per_frame(*noise.shape[-2:])
    dtype = model_dtype(model)

    def make_cache() -> KVCache:
        if window_frames:
            return KVCache.window(model.config, batch=B, tokens_per_frame=T, window_frames=window_frames,
                                  sink_frames=sink_frames, dtype=dtype, device=noise.device)
        return KVCache.full(model.config, batch=B, tokens_per_frame=T, frames=F, dtype=dtype, device=noise.device)

    caches = (make_cache(), make_cache() if uncond is not None and guidance != 1.0 else None)
    negatives = list(negatives) if contrast else []
    neg_caches = [make_cache() for _ in negatives]
    sigmas = flow_sigmas(steps, shift)
    out, s = [], 0
    for n in chunk_sizes(F, chunk_frames):
        def velocity(x: Tensor, t: Tensor, s=s) -> Tensor:
            return guided_flow(model, x, t, cond, uncond, guidance, caches=caches, negatives=negatives,
                               contrast=contrast, negative_caches=neg_caches, start_frame=s)
        x0, _ = sample_flow(velocity, noise[:, :, s:s + n], sigmas, solver, per_frame=True)
        for cache, ctx in zip([*caches, *neg_caches], [cond, uncond, *negatives]):
            if cache is not None:
                refresh_cache(model, x0, ctx, cache=cache, start_frame=s)
        out.append(x0)
        s += n
    return torch.cat(out, dim=2)
