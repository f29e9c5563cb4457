"""`causvid bench memory`: the device memory of one stream at real size, measured without a GPU.

The stream runs exactly as `causvid generate` / the nodes run it (CausalStream: few-step chunks, the t = 0
refresh, the streaming decoder, frames leaving the device as uint8 per chunk) on fake CUDA tensors
(fakedevice.py) with the real model and VAE architectures of a preset, in bf16, the text encoder
unloaded (its conditioning arrives from the host, as ComfyUI's CLIPTextEncode gives it). A
MemoryTracker counts every live tensor; the parts are read from it at the chunk and decode boundaries.

DiT attention is counted as CUDA runs it for bf16 and head_dim 128 on the cards this pack targets
(sm80+): the flash kernel, which keeps no attention matrix. Not counted: the CUDA context (~0.3-0.5 GB
per process) and the caching allocator's fragmentation (often 5-15%): leave that headroom on the card.
"""
from __future__ import annotations

import time
from typing import Optional

import torch
from torch import Tensor

from .config import dit_preset
from .fakedevice import FakeDevice, MemoryTracker, build_on_meta
from .generate import latent_frames
from .model import WanDiT
from .stream import CausalStream, StreamSettings
from .vae import WanVAE
from .vae_config import vae_preset
from .video_io import frames_uint8

GIB = 1024 ** 3
FPS = 16


def flash_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """The CUDA flash kernel's own op: its output and log-sum-exp, no [Lq, Lk] matrix (what SDPA runs on
    sm80+ for these shapes; a fake CUDA tensor has no device to choose a kernel by)."""
    return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v)[0]


def _vae_for(dit_preset_name: str) -> str:
    return "wan2.1" if dit_preset_name.startswith("wan2.1") else dit_preset_name


@torch.no_grad()
def bench_memory(preset: str = "wan2.1-t2v-1.3b", size: tuple[int, int] = (832, 480), frames: Optional[int] = 81,
                 seconds: Optional[float] = None, window: Optional[int] = None, sinks: int = 0,
                 device: str = "cuda", dtype: torch.dtype = torch.bfloat16, steps: str = "self-forcing-4step",
                 chunk_frames: int = 3, vae: Optional[str] = None) -> dict:
    """Peak device bytes of one stream and its parts. size = (width, height) in pixels; frames: pixel
    frames (4k+1), or seconds of video at 16 fps (an endless stream needs window)."""
    cfg = dit_preset(preset)
    vcfg = vae_preset(vae or _vae_for(preset))
    width, height = size
    sf = vcfg.space_factor
    if width % (sf * 2) or height % (sf * 2):
        raise ValueError(f"width and height must be multiples of {sf * 2}, got {width}x{height}")
    if seconds is not None:
        frames = int(seconds * FPS) // vcfg.time_factor * vcfg.time_factor + 1
    F = latent_frames(frames, vcfg.time_factor)
    settings = StreamSettings.from_preset(steps, chunk_frames=chunk_frames, max_frames=F,
                                          window_frames=window, sink_frames=sinks if window else 0)
    fd = FakeDevice(device)
    dev = str(fd.device)
    model = fd.module(build_on_meta(lambda: WanDiT(cfg, attention=flash_attention)), dtype)
    vae_model = fd.module(build_on_meta(lambda: WanVAE(vcfg)), dtype)
    t0 = time.perf_counter()
    with fd, MemoryTracker() as tr:
        tr.track(model)
        w_dit = tr.current_bytes(dev)
        tr.track(vae_model)
        w_vae = tr.current_bytes(dev) - w_dit
        stream = CausalStream(model, settings, latent_hw=(height // sf, width // sf), vae=vae_model, device=fd.device)
        cond = torch.zeros(1, cfg.text_len, cfg.text_dim, dtype=dtype)  # the host's conditioning
        stream.set_prompt(cond)
        stream.cache.store.allocate()  # at the first chunk anyway; here so the parts below separate it
        resident = tr.current_bytes(dev)  # weights + KV buffers
        overall, decode_peak, sample_peak, frame_bytes, chunks = tr.peak_bytes(dev), 0, 0, 0, 0
        decode = stream.decoder.decode

        def tracked_decode(latents: Tensor) -> Tensor:
            nonlocal decode_peak, frame_bytes, sample_peak, overall
            before = tr.current_bytes(dev)
            sample_peak = max(sample_peak, tr.peak_bytes(dev) - chunk_start)  # the chunk's DiT passes
            overall = max(overall, tr.peak_bytes(dev))
            tr.reset_peak(dev)
            out = decode(latents)
            decode_peak = max(decode_peak, tr.peak_bytes(dev) - before)
            frame_bytes = max(frame_bytes, out.nbytes)
            return out

        stream.decoder.decode = tracked_decode
        while stream.frame < F:
            chunk_start = tr.current_bytes(dev)
            tr.reset_peak(dev)
            chunk = stream.step()
            frames_uint8(chunk.frames).to("cpu")  # the frames leave the device as bytes
            overall = max(overall, tr.peak_bytes(dev))
            del chunk
            chunks += 1
        kv = stream.cache.store.nbytes
        cross = stream.cache.cross_nbytes
        decoder_cache = stream.decoder.nbytes
    return {
        "bench": "memory", "preset": preset, "vae": vae or _vae_for(preset), "size": f"{width}x{height}",
        "frames": frames, "latent_frames": F, "seconds_of_video": round(frames / FPS, 2),
        "window_frames": window, "sink_frames": settings.sink_frames, "chunk_frames": chunk_frames,
        "steps": list(settings.steps), "dtype": str(dtype).replace("torch.", ""), "device": device,
        "measured_on": "fake tensors (causvid_core.fakedevice), DiT attention as the flash kernel",
        "chunks": chunks, "peak_bytes": overall, "peak_gib": round(overall / GIB, 2),
        "parts": {
            "dit_weights": w_dit, "vae_weights": w_vae, "kv_cache": kv, "cross_attention_cache": cross,
            "decoder_cache": decoder_cache,
            "resident_before_first_chunk": resident,
            "sampling_peak_over_resident": sample_peak,  # a chunk's DiT activations above what stays
            "vae_decode_peak_over_resident": decode_peak,
            "decoded_chunk_frames": frame_bytes,
        },
        "not_counted": "CUDA context (~0.3-0.5 GB) and allocator fragmentation",
        "wall_s": round(time.perf_counter() - t0, 1),
    }
