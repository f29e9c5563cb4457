"""Which dtype the small exact computations (RoPE, timestep embedding, flow <-> x0) run in, by device.

On the CPU they run in float64, as the Wan reference does, so outputs match the parity vectors bit for
bit. Elsewhere they run in float32: Apple's MPS has no float64 at all, consumer NVIDIA cards run it at
1/32-1/64 of float32, and the error (about 1e-4 rad at RoPE position 1024) is far below bf16's.
The fake-device tests run the float32 path, which is what a GPU runs.
"""
from __future__ import annotations

import torch


def exact_dtype(device: torch.device | str) -> torch.dtype:
    kind = device.type if isinstance(device, torch.device) else torch.device(device).type  # per layer: cheap
    return torch.float64 if kind == "cpu" else torch.float32

