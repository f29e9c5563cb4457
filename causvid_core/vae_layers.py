"""Layers of the Wan2.1 VAE, each written for a stream of frames with an explicit cache.

Module and parameter names are Wan2.1's (wan/modules/vae.py), so its state dicts load strictly.
Every layer that looks back in time takes a chunk of frames plus a `FeatureCache` and returns exactly
what the whole-sequence computation gives for those frames; a fresh cache is the start of a stream.
Whole-sequence semantics (the reference reaches the same numbers with its 1, 4, 4, ... chunking):
- CausalConv3d: a conv zero-padded on the left in time only; its cache slot holds its last 2 inputs.
- downsample3d: spatial stride-2 conv per frame, then the first frame passes through and the rest go
  through a stride-2 time conv over (f0 f1 f2), (f2 f3 f4), ...; the slot holds the last frame seen.
- upsample3d: the first frame passes through untouched in time (the reference's 'Rep' path); the rest
  go through a causal time conv (zero padding) that doubles the channels, each input frame becoming two
  interleaved output frames; then nearest 2x + conv per frame. The slot is empty until the first frame,
  then holds the last 2 time-conv inputs (zeros before there are any).

Shapes: B batch, C channels, T frames of the chunk, H x W grid of the level.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


# PyTorch sends batch-1 conv3d with small kernels to its slow native kernel (a heuristic in
# aten/src/ATen/native/Convolution.cpp); oneDNN is ~10x faster for this VAE's shapes on CPU.
_ONEDNN = torch.backends.mkldnn.is_available()


def conv3d(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: Sequence[int] = (1, 1, 1),
           padding: Sequence[int] = (0, 0, 0), circular: bool = False) -> Tensor:
    """F.conv3d, through oneDNN for float32 on CPU (same result up to float rounding; autograd works).

    circular: the spatial padding wraps around (a torus) instead of adding zeros; time padding is always
    the caller's (causal convs pad time themselves). Under CPU autocast the conv runs in the autocast
    dtype (bfloat16 convs are ~2x faster than float32 on CPUs with AVX-512 BF16), and a wrapped input is
    cast before it is padded, so the padded copy is made once, in the small dtype."""
    ph, pw = padding[1], padding[2]
    if circular and (ph or pw):
        x = wrap_pad(_autocast_input(x), (pw, pw, ph, ph))
        padding = (padding[0], 0, 0)
    if x.device.type == "cpu" and x.dtype == torch.float16 and not torch.is_autocast_enabled("cpu"):
        # CPUs without AVX512-FP16 have no fast float16 conv (PyTorch's fallback was ~160x slower than
        # float32 here): compute in float32, return float16
        return conv3d(x.float(), weight.float(), None if bias is None else bias.float(), stride, padding).half()
    if (_ONEDNN and x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and torch.backends.mkldnn.enabled and not torch.is_autocast_enabled("cpu")):
        return torch.mkldnn_convolution(x.contiguous(), weight, bias, padding, stride, (1, 1, 1), 1)
    return F.conv3d(x, weight, bias, stride=stride, padding=padding)


def _autocast_input(x: Tensor) -> Tensor:
    """x in the dtype CPU autocast will run the next conv in (unchanged outside autocast)."""
    if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        return x.to(torch.get_autocast_dtype("cpu"))
    return x


def wrap_pad(x: Tensor, pad: Sequence[int]) -> Tensor:
    """Circular padding of the last two dims by (left, right, top, bottom), each at most the dim's size.
    The same numbers as F.pad(mode="circular"), built from two concatenations (several times faster on CPU)."""
    left, right, top, bottom = pad
    x = torch.cat([x[..., x.shape[-1] - left:], x, x[..., :right]], dim=-1)
    return torch.cat([x[..., x.shape[-2] - top:, :], x, x[..., :bottom, :]], dim=-2)


class FeatureCache:
    """The streaming state of one encoder or decoder: one slot per causal layer, fixed in number.

    Each call replaces a slot's tensor with one of the same size (after the first call), so memory is
    flat over an endless stream. Owned by whoever streams (a StreamingDecoder, one full decode).
    """

    def __init__(self, num_slots: int):
        self.slots: list[Optional[Tensor]] = [None] * num_slots

    def reset(self) -> None:
        for i in range(len(self.slots)):
            self.slots[i] = None

    @property
    def empty(self) -> bool:
        return all(s is None for s in self.slots)

    def to_(self, device: torch.device | str) -> None:
        """Move every slot to `device`, in place (a no-op for slots already there)."""
        for i, t in enumerate(self.slots):
            if t is not None:
                self.slots[i] = t.to(device)

    @property
    def nbytes(self) -> int:
        return sum(s.numel() * s.element_size() for s in self.slots if s is not None)


class CausalConv3d(nn.Conv3d):
    """Conv3d padded 2*p_t frames on the left in time only (Wan), those frames taken from the cache."""

    def __init__(self, in_dim: int, out_dim: int, kernel: int | Sequence[int], stride: int | Sequence[int] = 1,
                 padding: int | Sequence[int] = 0, circular: bool = False):
        p = (padding,) * 3 if isinstance(padding, int) else tuple(padding)
        super().__init__(in_dim, out_dim, kernel, stride=stride, padding=(0, p[1], p[2]))
        self.history = 2 * p[0]  # input frames this conv looks back
        self.circular = circular  # spatial padding wraps around (VAEConfig.padding "circular")
        self.slot = -1  # this conv's slot in its network's FeatureCache; -1 = stateless

    def _conv_forward(self, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        return conv3d(x, weight, bias, self.stride, self.padding, self.circular)

    def forward(self, x: Tensor, cache: Optional[FeatureCache] = None) -> Tensor:
        n = self.history
        if n == 0:
            return super().forward(x)
        prev = cache.slots[self.slot] if cache is not None else None
        B, C, T, H, W = x.shape
        if prev is None:  # the start of a stream: zero padding, as the reference's F.pad
            prev = x.new_zeros(B, C, n, H, W)
        x = torch.cat([prev, x], dim=2)  # [B, C, n + T, H, W]
        if cache is not None:
            cache.slots[self.slot] = x[:, :, -n:].clone()  # a copy, so the chunk is not kept alive
        return super().forward(x)


class RMS_norm(nn.Module):  # noqa: N801 (Wan's name)
    """F.normalize over channels * sqrt(C) * gamma; gamma [C, 1, 1] (images) or [C, 1, 1, 1] (video)."""

    def __init__(self, dim: int, images: bool = True):
        super().__init__()
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones((dim, 1, 1) if images else (dim, 1, 1, 1)))

    def forward(self, x: Tensor) -> Tensor:
        # = F.normalize(x, dim=1). On the CPU: PyTorch's vector_norm over the strided channel dim is ~50x
        # slower than this sum of squares (half of the whole decode time at 64x64 before this change).
        # Elsewhere vector_norm accumulates in float32 without a float32 copy of x (at 832x480 that copy
        # and its square are 1.2 GB of a bf16 decode's peak)
        if x.device.type == "cpu":
            xf = x if x.dtype in (torch.float32, torch.float64) else x.float()
            norm = (xf * xf).sum(dim=1, keepdim=True).sqrt()
        else:
            norm = torch.linalg.vector_norm(x, 2, dim=1, keepdim=True, dtype=torch.float32)
        return x / norm.clamp_min(1e-12).to(x.dtype) * (self.gamma * self.scale)  # norm [B, 1, ...]


class ResidualBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.0):
        super().__init__()
        # indices 0, 2, 3, 6 carry weights: Wan's key names
        self.residual = nn.Sequential(
            RMS_norm(in_dim, images=False), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMS_norm(out_dim, images=False), nn.SiLU(), nn.Dropout(dropout),
            CausalConv3d(out_dim, out_dim, 3, padding=1))
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: Tensor, cache: Optional[FeatureCache] = None) -> Tensor:
        norm1, _, conv1, norm2, _, dropout, conv2 = self.residual
        h = conv1(F.silu(norm1(x)), cache)
        h = conv2(dropout(F.silu(norm2(h))), cache)
        return h + self.shortcut(x)


class AttentionBlock(nn.Module):
    """Single-head self-attention within each frame (no time mixing, so no cache)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMS_norm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)
        nn.init.zeros_(self.proj.weight)  # the block starts as the identity (Wan)

    def forward(self, x: Tensor, cache: Optional[FeatureCache] = None) -> Tensor:
        B, C, T, H, W = x.shape
        y = x.transpose(1, 2).reshape(B * T, C, H, W)  # (B T) C H W
        qkv = self.to_qkv(self.norm(y)).view(B * T, 3 * C, H * W).transpose(1, 2)  # [BT, HW, 3C]
        q, k, v = (t.unsqueeze(1) for t in qkv.chunk(3, dim=-1))  # each [BT, 1, HW, C]
        y = F.scaled_dot_product_attention(q, k, v).squeeze(1).transpose(1, 2)  # [BT, C, HW]
        y = self.proj(y.reshape(B * T, C, H, W))
        return x + y.view(B, T, C, H, W).transpose(1, 2)  # back to [B, C, T, H, W]


class Resample(nn.Module):
    """x2 down/up in space (per frame), optionally x2 in time; `resample.1` is the spatial Conv2d."""

    MODES = ("upsample2d", "upsample3d", "downsample2d", "downsample3d")

    def __init__(self, dim: int, mode: str):
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}, got {mode!r}")
        self.mode = mode
        self.circular = False  # spatial padding wraps around (set by use_circular_padding)
        if mode.startswith("upsample"):
            self.resample = nn.Sequential(nn.Upsample(scale_factor=(2.0, 2.0), mode="nearest-exact"),
                                          nn.Conv2d(dim, dim // 2, 3, padding=1))
            if mode == "upsample3d":
                self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        else:
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=(2, 2)))
            if mode == "downsample3d":
                self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    @property
    def stateful(self) -> bool:
        return self.mode.endswith("3d")

    def forward(self, x: Tensor, cache: Optional[FeatureCache] = None) -> Tensor:
        if self.mode == "upsample3d":
            x = self._time_up(x, cache)
        x = self._space(x)
        if self.mode == "downsample3d":
            x = self._time_down(x, cache)
        return x

    def _space(self, x: Tensor) -> Tensor:
        """Per frame, as Conv2d over (B T) frames, without moving frames into the batch."""
        conv = self.resample[1]
        w = conv.weight.unsqueeze(2)  # [Co, Ci, 1, 3, 3]
        if self.mode.startswith("upsample"):
            x = F.interpolate(x, scale_factor=(1.0, 2.0, 2.0), mode="nearest-exact")
            return conv3d(x, w, conv.bias, padding=(0, 1, 1), circular=self.circular)
        # Wan pads one zero column / row on the right and bottom before the stride-2 conv
        x = wrap_pad(_autocast_input(x), (0, 1, 0, 1)) if self.circular else F.pad(x, (0, 1, 0, 1))
        return conv3d(x, w, conv.bias, stride=(1, 2, 2))

    def _state(self, cache: Optional[FeatureCache]) -> Optional[Tensor]:
        return cache.slots[self.time_conv.slot] if cache is not None else None

    def _put(self, cache: Optional[FeatureCache], t: Tensor) -> None:
        if cache is not None:
            cache.slots[self.time_conv.slot] = t

    def _time_up(self, x: Tensor, cache: Optional[FeatureCache]) -> Tensor:
        B, C, T, H, W = x.shape
        first = None
        if self._state(cache) is None:  # the stream's first frame: no time conv (the reference's 'Rep')
            first, x = x[:, :, :1], x[:, :, 1:]
            self._put(cache, x.new_zeros(B, C, 2, H, W))  # later frames start from zero padding
        n = x.shape[2]
        if n == 0:
            return first
        y = self.time_conv(x, cache)  # [B, 2C, n, H, W]
        y = y.view(B, 2, C, n, H, W).permute(0, 2, 3, 1, 4, 5).reshape(B, C, 2 * n, H, W)  # interleave
        return y if first is None else torch.cat([first, y], dim=2)

    def _time_down(self, x: Tensor, cache: Optional[FeatureCache]) -> Tensor:
        prev, first = self._state(cache), None
        if prev is None:  # the stream's first frame passes through and starts the stride-2 windows
            first, x = x[:, :, :1], x[:, :, 1:]
            prev = first
        n = x.shape[2]
        if n % 2:
            raise ValueError(f"a temporal downsample got {n} new frames, which breaks the 1, 4, 4, ... frame "
                             "grid: give the encoder 4k+1 frames first, then multiples of 4")
        if n == 0:
            self._put(cache, prev.clone())
            return first
        y = self.time_conv(torch.cat([prev, x], dim=2))  # stride 2: [B, C, n / 2, H, W]
        self._put(cache, x[:, :, -1:].clone())
        return y if first is None else torch.cat([first, y], dim=2)


def use_circular_padding(net: nn.Module, circular: bool = True) -> None:
    """Every spatial padding of net's convs wraps around (a torus) instead of adding zeros, or back to zeros."""
    for m in net.modules():
        if isinstance(m, (CausalConv3d, Resample)):
            m.circular = circular


def assign_slots(net: nn.Module) -> int:
    """Number the stateful layers of one network (registration order); returns the slot count."""
    n = 0
    for m in net.modules():
        if isinstance(m, Resample):
            if m.stateful:
                m.time_conv.slot, n = n, n + 1
        elif isinstance(m, CausalConv3d) and m.history > 0 and m.slot < 0:
            m.slot, n = n, n + 1
    return n


def _run(layers: nn.Sequential, x: Tensor, cache: Optional[FeatureCache]) -> Tensor:
    for layer in layers:
        if isinstance(layer, (ResidualBlock, AttentionBlock, Resample, CausalConv3d)):
            x = layer(x, cache)
        else:
            x = layer(x)
    return x


class Encoder3d(nn.Module):
    def __init__(self, dim: int, z_dim: int, dim_mult: Sequence[int], num_res_blocks: int,
                 attn_scales: Sequence[float], temperal_downsample: Sequence[bool], dropout: float = 0.0):
        super().__init__()
        dims = [dim * m for m in [1, *dim_mult]]
        scale = 1.0
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        blocks: list[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(num_res_blocks):
                blocks.append(ResidualBlock(in_dim, out_dim, dropout))
                if scale in attn_scales:
                    blocks.append(AttentionBlock(out_dim))
                in_dim = out_dim
            if i != len(dim_mult) - 1:
                blocks.append(Resample(out_dim, "downsample3d" if temperal_downsample[i] else "downsample2d"))
                scale /= 2.0
        self.downsamples = nn.Sequential(*blocks)
        top = dims[-1]
        self.middle = nn.Sequential(ResidualBlock(top, top, dropout), AttentionBlock(top),
                                    ResidualBlock(top, top, dropout))
        self.head = nn.Sequential(RMS_norm(top, images=False), nn.SiLU(), CausalConv3d(top, z_dim, 3, padding=1))
        self.num_slots = assign_slots(self)

    def forward(self, x: Tensor, cache: Optional[FeatureCache] = None) -> Tensor:
        x = self.conv1(x, cache)
        x = _run(self.downsamples, x, cache)
        x = _run(self.middle, x, cache)
        return _run(self.head, x, cache)


class Decoder3d(nn.Module):
    def __init__(self, dim: int, z_dim: int, dim_mult: Sequence[int], num_res_blocks: int,
                 attn_scales: Sequence[float], temperal_upsample: Sequence[bool], dropout: float = 0.0):
        super().__init__()
        dims = [dim * m for m in [dim_mult[-1], *dim_mult[::-1]]]
        scale = 1.0 / 2 ** (len(dim_mult) - 2)
        self.conv1 = CausalConv3d(z_dim, dims[0], 3, padding=1)
        self.middle = nn.Sequential(ResidualBlock(dims[0], dims[0], dropout), AttentionBlock(dims[0]),
                                    ResidualBlock(dims[0], dims[0], dropout))
        blocks: list[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                in_dim //= 2  # every upsample halves the channels (Wan hard-codes i in (1, 2, 3))
            for _ in range(num_res_blocks + 1):
                blocks.append(ResidualBlock(in_dim, out_dim, dropout))
                if scale in attn_scales:
                    blocks.append(AttentionBlock(out_dim))
                in_dim = out_dim
            if i != len(dim_mult) - 1:
                blocks.append(Resample(out_dim, "upsample3d" if temperal_upsample[i] else "upsample2d"))
                scale *= 2.0
        self.upsamples = nn.Sequential(*blocks)
        self.head = nn.Sequential(RMS_norm(dims[-1], images=False), nn.SiLU(),
                                  CausalConv3d(dims[-1], 3, 3, padding=1))
        self.num_slots = assign_slots(self)

    def forward(self, x: Tensor, cache: Optional[FeatureCache] = None) -> Tensor:
        x = self.conv1(x, cache)
        x = _run(self.middle, x, cache)
        x = _run(self.upsamples, x, cache)
        return _run(self.head, x, cache)
