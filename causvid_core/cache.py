"""KV cache for chunk-by-chunk causal inference.

One preallocated buffer per K and V holds every layer: [layers, B, H, capacity_tokens, d]. Bookkeeping
is in whole latent frames and plain Python ints, updated once per forward call (`begin`), never per
layer, so the hot path has no host sync.

Semantics (Self-Forcing's rolling cache, shared/reference/causal-wan.md section 4):
- `global_end`: absolute frames written so far; `local_end`: frames held in the buffer.
- A call for frames [start, start+n) that ends past `global_end` appends; if it does not fit and the
  cache is rolling, the oldest non-sink frames are evicted (the first `sink_frames` slots stay),
  the rest shift left and the chunk is written at the end.
- A call that ends at or before `global_end` (re-denoising a chunk, or the t = 0 refresh pass)
  overwrites that chunk's slots in place. Like the reference, the call's end becomes the new end:
  attention reads the buffer up to the end of the current chunk.
- Keys are stored after RoPE. Time positions are absolute frame indices (exactly the reference)
  while they fit Wan's 1024-position table. A rolling stream that outgrows it switches, once, to
  window-relative positions: a frame's position becomes its slot in the buffer (sinks at 0..S-1, the
  window right after them, as LongLive's endless mode does). The stored keys are rotated once by the
  position change, and again by -evicted frames at each later eviction, so the buffer stays
  consistent and positions stay below the capacity. Attention within the window then sees the sinks
  adjacent to the window instead of an ever-growing distance: a deliberate change of behaviour
  after 1024 frames (64 s at 16 fps), documented in the README. `rope="absolute"` refuses to pass
  the table instead; `rope="window"` uses slot positions from the start.

The cross-attention K/V (per layer, computed once per prompt) lives here too and is dropped by
`reset_cross()` or automatically when a different context tensor is passed.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn as nn
from torch import Tensor

from .config import ROPE_TABLE_POSITIONS, DiTConfig
from .rope import Rope, shift_time

ROPE_MODES = ("auto", "absolute", "window")


class KVCacheBuffers(nn.Module):
    """Holds a KV cache's two buffers, `k` and `v` (its name is what a host's memory log shows)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("k", None)
        self.register_buffer("v", None)


class KVStore:
    """The K and V buffers [layers, B, H, capacity_tokens, d], allocated at their first use, so a stream
    made early in a graph takes no device memory before it runs. Shared by `KVCache.share` views.

    The buffers are the two buffers of a small nn.Module (`module`), so a host that manages module memory
    (ComfyUI's model management, through a ModelPatcher) can load and offload them like weights; they are
    always read from the module, which such a host may give new tensors when it moves it."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str):
        self.shape, self.dtype, self.device = shape, dtype, torch.device(device)
        self.module = KVCacheBuffers()

    @property
    def k(self) -> Optional[Tensor]:
        return self.module._buffers["k"]  # the dict itself: Module.__getattr__ costs a lookup per layer

    @property
    def v(self) -> Optional[Tensor]:
        return self.module._buffers["v"]

    def allocate(self, device: Optional[torch.device | str] = None, zero: bool = True) -> None:
        """Make the buffers (on `device`, default the cache's). zero=False leaves them uninitialised: only
        written slots are ever read, and untouched host pages cost no memory until they are moved."""
        if self.k is None:
            make = torch.zeros if zero else torch.empty
            where = torch.device(device) if device is not None else self.device
            self.module.k = make(self.shape, dtype=self.dtype, device=where)
            self.module.v = make(self.shape, dtype=self.dtype, device=where)

    @property
    def nbytes(self) -> int:
        return 2 * math.prod(self.shape) * self.dtype.itemsize


@dataclass
class ChunkSlots:
    """Where the current call writes: buffer slots (frames) and the RoPE time position of its first frame."""
    local_start: int
    local_end: int
    rope_start: int


class KVCache:
    def __init__(self, config: DiTConfig, *, batch: int, tokens_per_frame: int, capacity_frames: int,
                 sink_frames: int = 0, rolling: bool = False, rope: str = "auto",
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        if rope not in ROPE_MODES:
            raise ValueError(f"rope must be one of {ROPE_MODES}, got {rope!r}")
        if capacity_frames < 1:
            raise ValueError(f"capacity_frames must be >= 1, got {capacity_frames}")
        if not 0 <= sink_frames < capacity_frames:
            raise ValueError(f"sink_frames must be in [0, capacity_frames), got {sink_frames}")
        if capacity_frames > ROPE_TABLE_POSITIONS:
            raise ValueError(f"capacity_frames {capacity_frames} exceeds the {ROPE_TABLE_POSITIONS}-position "
                             "RoPE table; use a rolling window")
        self.config = config
        self.batch = batch
        self.tokens_per_frame = tokens_per_frame
        self.capacity_frames = capacity_frames
        self.sink_frames = sink_frames
        self.rolling = rolling
        self.rope_mode = rope
        H, d = config.num_heads, config.head_dim
        shape = (config.num_layers, batch, H, capacity_frames * tokens_per_frame, d)
        self.store = KVStore(shape, dtype, device)  # [layers, B, H, T_cap, d] each for K and V
        self.dtype, self.device = dtype, torch.device(device)
        self._rope = Rope(d, device)
        self.cross: list[Optional[tuple[Tensor, ...]]] = [None] * config.num_layers
        self.cross_source: Any = None
        self.reset()

    # -- constructors ------------------------------------------------------------------------
    @classmethod
    def full(cls, config: DiTConfig, *, batch: int, tokens_per_frame: int, frames: int, **kw) -> "KVCache":
        """A cache holding every frame of a stream of `frames` latent frames (CausVid)."""
        return cls(config, batch=batch, tokens_per_frame=tokens_per_frame, capacity_frames=frames, **kw)

    @classmethod
    def window(cls, config: DiTConfig, *, batch: int, tokens_per_frame: int, window_frames: int,
               sink_frames: int = 0, **kw) -> "KVCache":
        """A rolling cache of `window_frames` frames whose first `sink_frames` are never evicted."""
        return cls(config, batch=batch, tokens_per_frame=tokens_per_frame, capacity_frames=window_frames,
                   sink_frames=sink_frames, rolling=True, **kw)

    # -- state -------------------------------------------------------------------------------
    def reset(self, start_frame: int = 0) -> None:
        """Forget every frame and the prompt (buffers are kept, not zeroed); the next chunk written
        starts at absolute frame `start_frame` (recaching rebuilds a window from the middle of a stream)."""
        self.first_frame = start_frame  # the sinks are frames first_frame .. first_frame + sink_frames - 1
        self.global_end = start_frame
        self.local_end = 0
        self.window_positions = self.rope_mode == "window"  # "auto" switches again in begin() if needed
        self._slots: Optional[ChunkSlots] = None
        self.reset_cross()

    def reset_cross(self) -> None:
        """Drop the cross-attention K/V: call when the prompt changes."""
        self.cross = [None] * self.config.num_layers
        self.cross_source = None

    def buffers(self) -> tuple[Tensor, Tensor]:
        """(K, V), each [layers, B, H, T_cap, d], allocated at the first use."""
        if self.store.k is None:
            self.store.allocate()
        return self.store.k, self.store.v

    @property
    def k(self) -> Tensor:
        return self.buffers()[0]

    @property
    def v(self) -> Tensor:
        return self.buffers()[1]

    def clone(self) -> "KVCache":
        """An independent copy (the K/V buffers are copied; the cross-attention K/V, never written in
        place, are shared): advancing the copy leaves this cache as it was."""
        new = copy.copy(self)
        new.store = KVStore(self.store.shape, self.store.dtype, self.store.device)
        if self.store.k is not None:
            new.store.module.k, new.store.module.v = self.store.k.clone(), self.store.v.clone()
        new.cross = list(self.cross)
        return new

    def share(self) -> "KVCache":
        """A second view of the same K/V buffers with its own bookkeeping (position, cross-attention
        K/V): what a stream hands on when it is continued without copying its cache (CausalStream.fork)."""
        new = copy.copy(self)
        new.cross = list(self.cross)
        return new

    @property
    def frames(self) -> int:
        """Frames currently held (and attended to by the next appended chunk)."""
        return self.local_end

    @property
    def nbytes(self) -> int:
        """The K/V buffers (allocated or not) and the cross-attention K/V held now."""
        return self.store.nbytes + self.cross_nbytes

    @property
    def cross_nbytes(self) -> int:
        return sum(t.nbytes for layer in self.cross if layer is not None for t in layer)

    # -- the per-call protocol used by the model ------------------------------------------------
    def begin(self, start_frame: int, num_frames: int) -> ChunkSlots:
        """Reserve slots for frames [start_frame, start_frame + num_frames); called once per forward."""
        n, end = num_frames, start_frame + num_frames
        if start_frame < 0 or n < 1:
            raise ValueError(f"bad chunk: start_frame={start_frame}, frames={n}")
        if start_frame > self.global_end:
            raise ValueError(f"chunk starts at frame {start_frame} but the cache ends at frame "
                             f"{self.global_end}: chunks must be written in order")
        if not self.window_positions and end > ROPE_TABLE_POSITIONS:
            if self.rope_mode == "absolute" or not self.rolling:
                raise ValueError(f"frame {end - 1} is past the {ROPE_TABLE_POSITIONS}-position RoPE table; "
                                 "use a rolling cache with rope='auto' or 'window'")
            self._switch_to_window_positions()
        new_frames = max(0, end - self.global_end)
        local_end = self.local_end + end - self.global_end
        if new_frames and self.local_end + n > self.capacity_frames:
            if not self.rolling:
                raise ValueError(f"KV cache full: it holds {self.capacity_frames} frames and frame {end - 1} "
                                 "does not fit; make the cache larger or use a rolling window")
            if n > self.capacity_frames - self.sink_frames:
                raise ValueError(f"a {n}-frame chunk does not fit a window of {self.capacity_frames} frames "
                                 f"with {self.sink_frames} sink frames")
            evict = n + self.local_end - self.capacity_frames
            self._evict(evict)
            local_end -= evict
        local_start = local_end - n
        if local_start < 0 or (local_start < self.sink_frames and start_frame >= self.first_frame + self.sink_frames):
            raise ValueError(f"frames {start_frame}..{end - 1} were evicted from the window and cannot be rewritten")
        rope_start = local_start if self.window_positions else start_frame
        self.global_end, self.local_end = end, local_end
        self._slots = ChunkSlots(local_start, local_end, rope_start)
        return self._slots

    def update(self, layer: int, k: Tensor, v: Tensor, slots: Optional[ChunkSlots] = None) -> tuple[Tensor, Tensor]:
        """Write this chunk's k, v [B, H, n*T, d] for `layer`; return the attended window [B, H, L, d]. slots:
        the chunk's (its begin()'s; default the last begun): a block recomputed in the backward pass
        (activation checkpointing) writes and reads where its chunk did, not where the stream is now."""
        s = slots if slots is not None else self._slots
        T = self.tokens_per_frame
        K, V = (buf[layer] for buf in self.buffers())  # [B, H, T_cap, d]
        if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad):
            # Training through the cache (Self-Forcing): the attended window is built from the cached
            # past (no gradient into it) and this chunk's own K/V (with gradient), as a new tensor; the
            # buffer gets a detached copy, so later chunks see this one and backward never reads the
            # buffer, which later calls overwrite in place.
            past = s.local_start * T
            kw = torch.cat([K[:, :, :past], k.to(K.dtype)], dim=2)
            vw = torch.cat([V[:, :, :past], v.to(V.dtype)], dim=2)
            if s is self._slots:  # not a block recomputed later for checkpointing: its chunk was written then
                K[:, :, s.local_start * T: s.local_end * T] = k.detach()
                V[:, :, s.local_start * T: s.local_end * T] = v.detach()
            return kw, vw
        K[:, :, s.local_start * T: s.local_end * T] = k
        V[:, :, s.local_start * T: s.local_end * T] = v
        return K[:, :, : s.local_end * T], V[:, :, : s.local_end * T]

    # -- internals ---------------------------------------------------------------------------
    def _evict(self, evict: int) -> None:
        """Drop `evict` oldest non-sink frames, shifting the rest left. Layer by layer: a copy of every
        layer's window at once would be 1.7 GB of transient device memory at 832x480 (1.3B, 12 frames)."""
        T, S = self.tokens_per_frame, self.sink_frames
        rolled = self.local_end - evict - S
        if rolled > 0:
            src = slice((S + evict) * T, (S + evict + rolled) * T)
            dst = slice(S * T, (S + rolled) * T)
            rotation = self._rope.time_shift(-evict) if self.window_positions else None
            for buf in (self.k, self.v):
                for layer in range(buf.shape[0]):
                    moved = buf[layer, :, :, src].clone()  # source and destination overlap
                    if rotation is not None and buf is self.k:  # slot positions: keys move `evict` frames
                        moved = shift_time(moved, rotation)
                    buf[layer, :, :, dst] = moved

    def _switch_to_window_positions(self) -> None:
        """Re-base the held non-sink keys from absolute positions to their slot positions (once; layer by
        layer, for the same reason as _evict)."""
        T, S = self.tokens_per_frame, self.sink_frames
        delta = self.local_end - self.global_end  # slot - absolute frame, the same for every non-sink slot
        if delta and self.local_end > S:
            region = slice(S * T, self.local_end * T)
            rotation = self._rope.time_shift(delta)
            for layer in range(self.k.shape[0]):
                self.k[layer, :, :, region] = shift_time(self.k[layer, :, :, region], rotation)
        self.window_positions = True
