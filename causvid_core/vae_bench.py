"""VAE benchmark (`causvid bench vae --json`): streaming exactness and steady-state speed.

Targets on 2 CPU cores for the "shapes" preset at 64x64: stream_vs_full_max_abs <= 1e-5 and
decode_fps_64 >= 64 pixel frames per second (4x real time at 16 fps).
"""
from __future__ import annotations

import os
import statistics
import time

import torch

from .vae import StreamingDecoder, StreamingEncoder, random_vae, vae_preset


def _rate(step, units_per_step: int, seconds: float, min_steps: int = 5) -> float:
    """Units per second of `step()`, from the median of repeated calls over about `seconds`.

    The median, not the mean: on a shared machine a few calls stall on other processes' threads.
    """
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_steps or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return units_per_step / statistics.median(times)


@torch.no_grad()
def bench_vae(preset: str = "shapes", size: int = 64, chunks: int = 4, seconds: float = 3.0,
              latents_per_chunk: int = 3, seed: int = 0) -> dict:
    """Streaming vs full decode on `chunks` chunks of random latents, then decode and encode rates.

    Decoding streams chunks of `latents_per_chunk` latents (3 = a CausVid block), each giving
    4 * latents_per_chunk frames once the stream is past its first latent; encoding streams chunks of
    4 * latents_per_chunk frames. Rates are measured after a warm-up, on a stream that keeps going,
    with torch's thread count as set (`threads`); decode is measured once more on one thread, since
    on a CPU crowded by other jobs two-thread runs stall waiting for each other.
    """
    cfg = vae_preset(preset)
    vae = random_vae(cfg, seed=seed)
    sf, tf = cfg.space_factor, cfg.time_factor
    if size % sf:
        raise ValueError(f"size must be a multiple of {sf}, got {size}")
    h = size // sf
    g = torch.Generator().manual_seed(seed)
    n = latents_per_chunk

    # exactness: one full decode against the same latents streamed chunk by chunk
    z = torch.randn(1, cfg.z_dim, chunks * n, h, h, generator=g)
    full = vae.decode(z, clamp=False)
    dec = StreamingDecoder(vae, clamp=False)
    streamed = torch.cat([dec.decode(z[:, :, i * n:(i + 1) * n]) for i in range(chunks)], dim=2)
    max_abs = (streamed - full).abs().max().item()

    # decode rate: keep decoding the stream past its start (steady state)
    zc = torch.randn(1, cfg.z_dim, n, h, h, generator=g)
    dec.decode(zc)  # warm-up
    decode_fps = _rate(lambda: dec.decode(zc), tf * n, seconds)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same on one thread: tells a slow machine from a crowded one
    try:
        decode_fps_1t = _rate(lambda: dec.decode(zc), tf * n, seconds / 2)
    finally:
        torch.set_num_threads(threads)
    cache_bytes = dec.nbytes

    # encode rate
    enc = StreamingEncoder(vae)
    enc.encode(torch.rand(1, 3, 1, size, size, generator=g) * 2 - 1)
    xc = torch.rand(1, 3, tf * n, size, size, generator=g) * 2 - 1
    enc.encode(xc)  # warm-up
    encode_fps = _rate(lambda: enc.encode(xc), tf * n, seconds)

    return {
        "bench": "vae", "preset": preset, "size": size, "threads": threads,
        "load_avg_1m": round(os.getloadavg()[0], 2),  # other jobs on the CPU slow multi-threaded ops a lot
        "latents_per_chunk": n, "chunks": chunks,
        "params": sum(p.numel() for p in vae.parameters()),
        "stream_vs_full_max_abs": max_abs,
        "decode_fps": round(decode_fps, 1), f"decode_fps_{size}": round(decode_fps, 1),
        f"decode_fps_{size}_1thread": round(decode_fps_1t, 1),
        "encode_fps": round(encode_fps, 1), f"encode_fps_{size}": round(encode_fps, 1),
        "decoder_cache_bytes": cache_bytes,
    }
