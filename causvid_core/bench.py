"""Benchmarks that print one JSON line each (`causvid bench ...`). Targets live here, not in tests."""
from __future__ import annotations

import os
import time
from typing import Callable, Optional

import torch

from .cache import KVCache
from .config import DiTConfig, dit_preset
from .model import WanDiT


def _best_time(fn: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def matmul_peak_flops(n: int = 4096, repeats: int = 3) -> float:
    """FLOP/s of a large fp32 matmul on this machine, now: the denominator of MFU."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    return 2 * n ** 3 / _best_time(lambda: a @ b, repeats)


def chunk_forward_flops(cfg: DiTConfig, chunk_tokens: int, window_tokens: int, context_tokens: int) -> float:
    """Matmul FLOPs of one KV-cached chunk forward (cross-attention K/V already cached)."""
    n, D = chunk_tokens, cfg.dim
    per_layer = (4 * 2 * n * D * D          # self-attention q, k, v, o
                 + 2 * 2 * n * window_tokens * D  # QK^T and AV over the window
                 + 2 * 2 * n * D * D        # cross-attention q, o
                 + 2 * 2 * n * context_tokens * D  # cross-attention scores and values
                 + 2 * 2 * n * D * cfg.ffn_dim)   # feed-forward
    return cfg.num_layers * per_layer


def random_model(cfg: DiTConfig, dtype: torch.dtype = torch.float32) -> WanDiT:
    """A model of the preset's size with small random weights, built without a slow init."""
    with torch.device("meta"):
        model = WanDiT(cfg)
    model = model.to_empty(device="cpu").to(dtype)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=g)
    return model.eval()


@torch.no_grad()
def bench_model(preset: str, latent_hw: tuple[int, int] = (32, 32), frames: int = 21, chunk: int = 3,
                repeats: int = 2) -> dict:
    """KV-cached chunk forward against recomputing the whole sequence without a cache.

    The cached chunk is the last one of a `frames`-frame stream: its queries attend to all `frames`
    frames. The cache is filled with random K/V (its content does not change the cost).
    """
    cfg = dit_preset(preset)
    H, W = latent_hw
    T = cfg.tokens_per_frame(H, W)
    model = random_model(cfg)
    context = torch.randn(1, cfg.text_len, cfg.text_dim)
    cache = KVCache.full(cfg, batch=1, tokens_per_frame=T, frames=frames)
    past = frames - chunk
    cache.k.normal_()
    cache.v.normal_()
    cache.global_end = cache.local_end = past  # as if `past` frames had been generated
    x = torch.randn(1, cfg.in_dim, chunk, H, W)
    t = torch.full((1, chunk), 757.0)

    def cached() -> None:  # a re-denoising pass over the last chunk: overwrites its slots
        model(x, t, context, cache=cache, start_frame=past)

    cached()  # warm-up; also computes the cross-attention K/V once, as a stream does
    peak = matmul_peak_flops()
    t_chunk = _best_time(cached, repeats)
    flops = chunk_forward_flops(cfg, chunk * T, frames * T, max(cfg.text_len, context.shape[1]))

    x_all = torch.randn(1, cfg.in_dim, frames, H, W)
    t_all = torch.full((1, frames), 757.0)
    t_full = _best_time(lambda: model(x_all, t_all, context, chunk_frames=chunk), 1)
    return {
        "bench": "model", "preset": preset, "latent": f"{H}x{W}", "frames": frames, "chunk_frames": chunk,
        "tokens_per_frame": T, "threads": torch.get_num_threads(),
        "chunk_s": round(t_chunk, 4), "recompute_21f_s": round(t_full, 4),
        "achieved_gflops": round(flops / t_chunk / 1e9, 1), "matmul_peak_gflops": round(peak / 1e9, 1),
        "mfu": round(flops / t_chunk / peak, 3),
        "cache_speedup_21f": round(t_full / t_chunk, 2),
        "tokens_per_s": round(chunk * T / t_chunk, 1),
        "kv_bytes": cache.nbytes,
    }


def rss_mb() -> float:
    """Resident memory of this process in MB (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _stream_components(model_path: Optional[str]):
    """The built-in model when it is installed (or a given one), else random weights of its presets."""
    from .pipeline import Components, builtin_available, load_components
    from .text import WordEncoderConfig, WordTextEncoder
    from .vae import random_vae

    if model_path or builtin_available():
        return load_components(model_path), "builtin" if not model_path else model_path
    cfg = dit_preset("shapes")
    torch.manual_seed(0)
    text = WordTextEncoder(WordEncoderConfig(text_dim=cfg.text_dim, text_len=cfg.text_len)).eval()
    return Components(random_model(cfg), random_vae("shapes", seed=0), text), "random weights, presets shapes/shapes"


@torch.no_grad()
def bench_stream(seconds: float = 600.0, model_path: Optional[str] = None, size: int = 64,
                 window_frames: int = 12, sink_frames: int = 3) -> dict:
    """An endless stream at size x size: throughput, latency to the first frames, memory growth."""
    from .stream import CausalStream, StreamSettings

    comps, source = _stream_components(model_path)
    sf = comps.vae.config.space_factor
    fields = {**comps.stream_defaults, "window_frames": window_frames, "sink_frames": sink_frames, "max_frames": None}
    settings = StreamSettings.from_fields(fields)
    prompt = "a red circle moving right on a black background"
    fps_video = 16

    def new_stream() -> CausalStream:
        return CausalStream(comps.model, settings, latent_hw=(size // sf, size // sf), vae=comps.vae,
                            text_encoder=comps.text_encoder)

    warm = new_stream()  # warm-up: first-call costs (allocations, kernels) are not the stream's
    warm.set_prompt(prompt)
    warm.step()
    del warm

    stream = new_stream()
    t0 = time.perf_counter()
    stream.set_prompt(prompt)
    first = stream.step()
    first_chunk_s = time.perf_counter() - t0
    frames = first.frames.shape[2]
    rss_minute = None
    while frames < seconds * fps_video:
        chunk = stream.step()
        frames += chunk.frames.shape[2]
        if rss_minute is None and frames >= 60 * fps_video:
            rss_minute = rss_mb()
    wall = time.perf_counter() - t0
    rss_end = rss_mb()

    # cache speed-up: the last chunk's forward with the cache against recomputing every frame it sees
    cfg = comps.model.config
    f = settings.chunk_frames
    hw = (size // sf, size // sf)
    x = torch.randn(1, cfg.in_dim, f, *hw)
    t = torch.full((1, f), float(settings.steps[0]))
    ctx = stream.context
    cached = _best_time(lambda: comps.model(x, t, ctx, cache=stream.cache, start_frame=stream.frame - f), 5)
    seen = stream.cache.frames
    x_all = torch.randn(1, cfg.in_dim, seen, *hw)
    t_all = torch.full((1, seen), float(settings.steps[0]))
    full = _best_time(lambda: comps.model(x_all, t_all, ctx, chunk_frames=f), 5)
    return {
        "bench": "stream", "model": source, "size": f"{size}x{size}", "seconds_of_video": round(frames / fps_video, 1),
        "window_frames": window_frames, "sink_frames": sink_frames, "steps": list(settings.steps),
        "threads": torch.get_num_threads(),
        "fps": round(frames / wall, 1), "first_chunk_s": round(first_chunk_s, 3),
        "rss_growth_mb": round(rss_end - rss_minute, 1) if rss_minute is not None else None,
        "rss_mb": round(rss_end, 1), "wall_s": round(wall, 1),
        "cache_speedup": round(full / cached, 2),
    }


def bench_stream_cuda(args) -> int:
    """`causvid bench stream --device cuda --model FILE --size 832x480`: a stream on a real GPU in bf16 with
    SDPA: frames per second, seconds to the first decoded chunk, peak device memory. Prints one JSON line;
    exits 1 where there is no CUDA device (never run by CI)."""
    import json
    import sys

    if not torch.cuda.is_available():
        print("causvid bench stream --device cuda: no CUDA device here (torch.cuda.is_available() is False); "
              "run it on a machine with an NVIDIA GPU", file=sys.stderr)
        return 1
    if not args.model:
        print("causvid bench stream --device cuda: give --model (a Wan / CausVid / Self-Forcing DiT file)",
              file=sys.stderr)
        return 2
    from .checkpoints import load_dit
    from .stream import CausalStream, StreamSettings
    from .vae import load_vae, random_vae
    from .video_io import frames_uint8

    device, dtype = torch.device("cuda"), torch.bfloat16
    model = load_dit(args.model, dtype=dtype, device=device)
    vae_path = getattr(args, "vae", None)
    vae = (load_vae(vae_path, dtype=dtype, device=device) if vae_path
           else random_vae("wan2.1", dtype=dtype).to(device))  # same cost as the real weights
    compiled = False
    if args.compile:
        try:
            for i, blk in enumerate(model.blocks):
                model.blocks[i] = torch.compile(blk, dynamic=False)
            compiled = True
        except Exception as exc:  # compile is optional: the eager model is the reference
            print(f"[bench] torch.compile unavailable ({exc}); running eager", file=sys.stderr)
    width, height = args.size
    seconds = args.seconds if args.seconds_given else 10.0
    frames = int(seconds * 16) // 4 * 4 + 1
    F = (frames - 1) // 4 + 1
    settings = StreamSettings.from_preset("self-forcing-4step", max_frames=F, window_frames=args.window,
                                          sink_frames=args.sinks if args.window else 0)
    cond = torch.randn(1, model.config.text_len, model.config.text_dim, dtype=dtype)

    def run() -> tuple[float, float, int]:
        stream = CausalStream(model, settings, latent_hw=(height // 8, width // 8), vae=vae, device=device)
        stream.set_prompt(cond)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        first, made = None, 0
        while stream.frame < F:
            chunk = stream.step()
            made += frames_uint8(chunk.frames).cpu().shape[0]  # the copy to the host synchronises
            first = first if first is not None else time.perf_counter() - t0
        return time.perf_counter() - t0, first, made

    try:
        run_warm = run()  # warm-up (kernels, compile)
    except Exception as exc:
        if not compiled:
            raise
        print(f"[bench] compiled model failed ({exc}); running eager", file=sys.stderr)
        for i, blk in enumerate(model.blocks):
            model.blocks[i] = getattr(blk, "_orig_mod", blk)
        compiled, run_warm = False, run()
    del run_warm
    torch.cuda.reset_peak_memory_stats()
    wall, first, made = run()
    result = {
        "bench": "stream", "device": torch.cuda.get_device_name(), "model": args.model, "size": f"{width}x{height}",
        "dtype": "bfloat16", "compiled": compiled, "frames": made, "window_frames": args.window,
        "sink_frames": settings.sink_frames, "fps": round(made / wall, 2), "real_time_factor": round(made / wall / 16, 2),
        "first_chunk_s": round(first, 3), "peak_allocated_bytes": torch.cuda.max_memory_allocated(),
        "peak_reserved_bytes": torch.cuda.max_memory_reserved(), "wall_s": round(wall, 2),
    }
    print(json.dumps(result) if args.json else json.dumps(result, indent=2), flush=True)
    return 0
