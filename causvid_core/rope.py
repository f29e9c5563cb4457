"""Wan's 3-D rotary position embedding.

Per head, the head_dim channels split into time / height / width parts of d - 4*(d//6), 2*(d//6),
2*(d//6) channels; channel pairs (2i, 2i+1) are one complex number (interleaved, not rotate-half).
Each part has its own frequencies 1/10000^(arange(0, n, 2)/n). Like the reference, factors are
float64 complex and the rotation is done in float64 on the CPU; on other devices both are float32
(precision.py). The factors are made on the model's device, so no table crosses from the host.

Positions: time = latent-frame index (absolute, or window-relative for endless streams; see
cache.py), height/width = token row/column. The reference keeps a 1024-position table; we compute
the same values from the formula for the positions asked for.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .config import ROPE_TABLE_POSITIONS
from .precision import exact_dtype

THETA = 10000.0
# factor tables kept per Rope: a chunk's passes share one; each is 2.4 MB on a GPU at 832x480 (3 frames)
FACTOR_CACHE_ENTRIES = 4


def _part_sizes(head_dim: int) -> tuple[int, int, int]:
    """Complex frequencies per part (time, height, width)."""
    c = head_dim // 2
    return c - 2 * (c // 3), c // 3, c // 3


def _inv_freq(channels: int, device: torch.device) -> Tensor:
    # 1 / theta^(arange(0, n, 2) / n), float64 as in Wan's rope_params, then moved (once, per Rope) to the
    # device in its exact dtype
    freq = 1.0 / torch.pow(THETA, torch.arange(0, channels, 2, dtype=torch.float64) / channels)
    return freq.to(device=device, dtype=exact_dtype(device))


class Rope:
    """RoPE factors for one head_dim. Plain object (never a module buffer: Wan's state dict has none)."""

    def __init__(self, head_dim: int, device: torch.device | str = "cpu"):
        ct, ch, cw = _part_sizes(head_dim)
        self.head_dim = head_dim
        self.time_complex = ct  # complex channels of the time part (the first ones)
        self.device = torch.device(device)
        self.dtype = exact_dtype(self.device)
        self.inv_freq = [_inv_freq(2 * n, self.device) for n in (ct, ch, cw)]
        self._cache: dict[tuple[int, int, int, int], Tensor] = {}

    def factors(self, frame_start: int, frames: int, height: int, width: int) -> Tensor:
        """[frames*height*width, head_dim/2] complex (128 on the CPU, 64 elsewhere) for frames
        frame_start.. and a h x w grid."""
        key = (frame_start, frames, height, width)
        out = self._cache.get(key)
        if out is None:
            ft, fh, fw = (torch.polar(torch.ones_like(torch.outer(p, f)), torch.outer(p, f))
                          for p, f in ((torch.arange(frame_start, frame_start + frames,
                                                     dtype=self.dtype, device=self.device),
                                        self.inv_freq[0]),
                                       (torch.arange(height, dtype=self.dtype, device=self.device),
                                        self.inv_freq[1]),
                                       (torch.arange(width, dtype=self.dtype, device=self.device),
                                        self.inv_freq[2])))
            out = torch.cat([
                ft.view(frames, 1, 1, -1).expand(frames, height, width, -1),
                fh.view(1, height, 1, -1).expand(frames, height, width, -1),
                fw.view(1, 1, width, -1).expand(frames, height, width, -1),
            ], dim=-1).reshape(frames * height * width, -1)
            if len(self._cache) >= FACTOR_CACHE_ENTRIES:  # bounded: streams walk through many start frames
                self._cache.clear()
            self._cache[key] = out
        return out

    def time_shift(self, delta: int) -> Tensor:
        """[time_complex] complex: rotation that moves a key by `delta` frames in time."""
        ang = float(delta) * self.inv_freq[0]
        return torch.polar(torch.ones_like(ang), ang)


def apply_rope(x: Tensor, factors: Tensor) -> Tensor:
    """x [B, L, H, d] rotated by factors [L, d/2]; in float64 like Wan on the CPU, float32 elsewhere."""
    B, L, H, d = x.shape
    xc = torch.view_as_complex(x.to(exact_dtype(x.device)).reshape(B, L, H, d // 2, 2))
    out = torch.view_as_real(xc * factors.view(1, L, 1, d // 2)).reshape(B, L, H, d)
    return out.to(x.dtype)


def shift_time(k: Tensor, rotation: Tensor) -> Tensor:
    """Rotate already-RoPE'd keys k [..., d] along time by `rotation` [ct] (from Rope.time_shift)."""
    ct = rotation.shape[0]
    head = k[..., : 2 * ct]
    hc = torch.view_as_complex(head.to(exact_dtype(k.device)).reshape(*head.shape[:-1], ct, 2).contiguous())
    rotated = torch.view_as_real(hc * rotation).reshape(head.shape).to(k.dtype)
    return torch.cat([rotated, k[..., 2 * ct:]], dim=-1)


__all__ = ["Rope", "apply_rope", "shift_time", "ROPE_TABLE_POSITIONS"]
