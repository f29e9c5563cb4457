"""Memory accounting: the tracker counts what is allocated and freed; `causvid bench memory` (fake CUDA
tensors) agrees with a real CPU run of the same stream at small size; the CLI prints its JSON."""
from __future__ import annotations

import gc
import json
import subprocess
import sys

import pytest
import torch

from causvid_core.config import dit_preset
from causvid_core.fakedevice import CUDA_BLOCK_BYTES, FakeDevice, MemoryTracker
from causvid_core.memory import bench_memory
from causvid_core.model import WanDiT
from causvid_core.stream import CausalStream, StreamSettings
from causvid_core.vae import WanVAE
from causvid_core.vae_config import vae_preset


def _blocks(nbytes: int) -> int:
    return -(-nbytes // CUDA_BLOCK_BYTES) * CUDA_BLOCK_BYTES


def test_the_tracker_counts_allocations_views_and_frees():
    with MemoryTracker() as tr:
        a = torch.zeros(1000)  # 4000 bytes -> 4096 in 512-byte blocks
        view = a[10:20]
        b = a * 2
        assert tr.current_bytes("cpu") == 2 * _blocks(4000)
        del b
        gc.collect()
        assert tr.current_bytes("cpu") == _blocks(4000) and tr.peak_bytes("cpu") == 2 * _blocks(4000)
        del a, view
        gc.collect()
        assert tr.current_bytes("cpu") == 0
    fd = FakeDevice()
    with fd, MemoryTracker() as tr:
        x = torch.empty(3, 512, dtype=torch.bfloat16, device=fd.device)
        assert tr.current_bytes(str(fd.device)) == 3 * 512 * 2 and tr.current_bytes("cpu") == 0
        del x


def _real_cpu_run(dtype=torch.float32) -> dict:
    """The same stream as bench_memory(preset="wan-tiny", 64x64, 33 frames) on the real CPU, tracked."""
    torch.manual_seed(0)
    model, vae = WanDiT(dit_preset("wan-tiny")).to(dtype).eval(), WanVAE(vae_preset("wan-tiny")).to(dtype).eval()
    settings = StreamSettings.from_preset("self-forcing-4step", max_frames=9)
    with torch.no_grad(), MemoryTracker() as tr:
        tr.track(model, vae)
        weights = tr.current_bytes("cpu")
        s = CausalStream(model, settings, latent_hw=(8, 8), vae=vae)
        s.decoder.latents_per_pass = 1  # as on a GPU (the CPU decodes a chunk in one pass)
        s.set_prompt(torch.zeros(1, 16, 32, dtype=dtype))
        while s.frame < 9:
            s.step()
        gc.collect()
        return {"weights": weights, "kv_cache": s.cache.store.nbytes, "cross_attention_cache": s.cache.cross_nbytes,
                "decoder_cache": s.decoder.nbytes, "peak": tr.peak_bytes("cpu")}


def test_bench_memory_agrees_with_a_real_cpu_run_at_small_size():
    fake = bench_memory("wan-tiny", size=(64, 64), frames=33, dtype=torch.float32, vae="wan-tiny")
    real = _real_cpu_run()
    parts = fake["parts"]
    assert parts["dit_weights"] + parts["vae_weights"] == real["weights"]
    for key in ("kv_cache", "cross_attention_cache", "decoder_cache"):
        assert parts[key] == real[key], key
    # peaks differ only by kernels: CUDA's flash attention and float32 RoPE against the CPU's float64
    assert 0.8 < fake["peak_bytes"] / real["peak"] < 1.25, (fake["peak_bytes"], real["peak"])
    assert fake["peak_bytes"] >= real["weights"] + real["kv_cache"] + real["decoder_cache"]


def test_a_rolling_window_keeps_the_peak_flat():
    # 6 chunks: past the few RoPE tables a stream keeps (rope.FACTOR_CACHE_ENTRIES), as 81 frames are
    short = bench_memory("wan-tiny", size=(64, 64), frames=65, window=6, sinks=2, vae="wan-tiny")
    long = bench_memory("wan-tiny", size=(64, 64), seconds=20, window=6, sinks=2, vae="wan-tiny")
    assert long["latent_frames"] > 3 * short["latent_frames"]
    assert long["peak_bytes"] == short["peak_bytes"] and long["parts"]["kv_cache"] == short["parts"]["kv_cache"]


def test_cli_bench_memory_and_the_cuda_stream_bench_without_cuda():
    run = lambda *a: subprocess.run([sys.executable, "-m", "causvid_core.cli", "bench", *a],  # noqa: E731
                                    capture_output=True, text=True, timeout=300)
    out = run("memory", "--device", "cuda", "--preset", "wan-tiny", "--size", "64x64", "--frames", "9", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["peak_bytes"] > 0 and {"dit_weights", "kv_cache", "vae_decode_peak_over_resident"} <= set(result["parts"])
    if not torch.cuda.is_available():
        out = run("stream", "--device", "cuda", "--model", "x.safetensors")
        assert out.returncode == 1 and "no CUDA" in out.stderr
    out = run("memory", "--device", "cuda", "--seconds", "60")
    assert out.returncode == 2 and "--window" in out.stderr
