"""Streaming generation: each chunk comes out the moment it is ready.

`CausalStream` holds one stream's state: the model's KV cache, the position, the current prompt,
the clean latents the cache was built from (for recaching), and a streaming VAE decoder. Each
`step()` makes one chunk with the few-step causal sampler (sampler.py) and returns it, decoded.
Everything random comes from (seed, chunk index, step), so a stream made in one call equals the same
stream made a chunk at a time.

Prompt changes happen at chunk boundaries, in one of three modes:
- cut:     the new prompt's cross-attention K/V replace the old; the self-attention cache is kept.
- recache: as LongLive: the cache is rebuilt from the last clean frames it held (at most the cache's
           capacity, `recache_frames` if set), run at t = 0 under the new prompt, then generation goes on.
- blend:   the conditioning moves linearly from the old to the new prompt over `blend_chunks` chunks.

Image-to-video: the image is encoded to one latent frame. With an independent first frame (chunk
layout [1, 3, 3, ...]) that latent is the first chunk, written to the cache at t = 0. With chunk-multiple
layouts ([3, 3, ...]) it is frame 0 of the first chunk, held clean at t = 0 while the chunk's other
frames are denoised. Video extension writes a given clip's latents to the cache at t = 0, chunk by chunk.
Video-to-video: each input chunk is encoded by the streaming encoder, noised to t = strength * 1000
and denoised by the steps below that.

Continuing a stream without copying its buffers (`fork`): at 832x480 a 1.3B model's KV cache is 6 GB
and the streaming decoder's cache over 1 GB, so a chain of nodes must not copy them per node. A stream
made with `journal=True` records every write into them (the clean latents, their positions and
conditioning, and what was decoded): 1.2 MB a chunk at 832x480, each tensor copied once. `fork()` returns a stream that continues this one and
takes over the buffers; the forked-from stream stays valid and, if it is used again (a branch, or a
re-run of a later node in a graph), first rebuilds its buffers by replaying its journal: one t = 0
pass per chunk and a re-decode, which gives the same numbers as the first time. Exactly one stream of
a lineage owns the buffers at any time (`_Lease`).

Shapes: B batch, C latent channels, f frames in a chunk, h x w latent grid, 3 x n x H x W pixels.
"""
from __future__ import annotations

import copy
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor

from .cache import KVCache
from .flow import FlowGrid, step_preset
from .sampler import denoise_chunk, model_dtype, seeded_noise
from .schedule import SWITCH_MODES, latent_to_pixel
from .validate import check_finite_chunk
from .vae import decode_memory

INIT_NOISE_STEP = -1  # the step index under which a chunk's starting noise is drawn
JOURNAL_MEMO = 8  # recently recorded tensors whose journal copy is reused (latents: write then decode)


@dataclass(frozen=True)
class StreamSettings:
    steps: tuple[float, ...] = tuple(step_preset("self-forcing-4step")[1])
    shift: float = step_preset("self-forcing-4step")[0]
    chunk_frames: int = 3  # latent frames per chunk
    independent_first_frame: bool = False  # layout [1, f, f, ...] instead of [f, f, ...]
    window_frames: Optional[int] = None  # rolling KV window (latent frames); None: hold every frame
    sink_frames: int = 0  # first frames never evicted from the window
    max_frames: Optional[int] = None  # latent frames of the whole stream (sizes a full cache; with a window: where
    # a finite stream stops, None = endless)
    seed: int = 0
    switch_mode: str = "cut"
    blend_chunks: int = 2
    recache_frames: Optional[int] = None  # frames re-encoded by `recache`; default: all the cache holds
    rope: str = "auto"
    # the first chunk's own steps (Causal Forcing's few-step students denoise the first chunk with more)
    first_chunk_steps: Optional[tuple[float, ...]] = None
    # Krea Realtime's KV-cache recomputation: before every chunk the cache is rebuilt at t = 0 from the first
    # frame and the last (this - 1) frames, at positions counted from 0; no t = 0 refresh after a chunk
    kv_recompute_frames: Optional[int] = None

    def __post_init__(self) -> None:
        if self.switch_mode not in SWITCH_MODES:
            raise ValueError(f"switch_mode must be one of {SWITCH_MODES}, got {self.switch_mode!r}")
        if self.window_frames is None and self.max_frames is None and self.kv_recompute_frames is None:
            raise ValueError("give max_frames (the stream's length in latent frames) or window_frames "
                             "(a rolling window for endless streams)")
        for name, steps in (("steps", self.steps), ("first_chunk_steps", self.first_chunk_steps)):
            if steps is not None and (not steps or list(steps) != sorted(steps, reverse=True)):
                raise ValueError(f"{name} must be a non-empty decreasing list of timesteps, got {list(steps)}")
        if self.kv_recompute_frames is not None:
            if self.kv_recompute_frames < 1:
                raise ValueError(f"kv_recompute_frames must be >= 1, got {self.kv_recompute_frames}")
            if self.window_frames is not None:
                raise ValueError("kv_recompute_frames rebuilds the cache every chunk: it takes no window_frames")

    @classmethod
    def from_fields(cls, fields: dict) -> "StreamSettings":
        """From a plain dict (a checkpoint's metadata, CLI or node options): lists become tuples."""
        return cls(**{k: tuple(v) if k in ("steps", "first_chunk_steps") and v is not None else v
                      for k, v in fields.items()})

    def steps_for(self, chunk_index: int) -> tuple[float, ...]:
        return self.first_chunk_steps if chunk_index == 0 and self.first_chunk_steps else self.steps

    @classmethod
    def from_preset(cls, name: str, **kw) -> "StreamSettings":
        shift, steps = step_preset(name)
        return cls(steps=tuple(steps), shift=shift, **kw)

    def chunk_size(self, chunk_index: int) -> int:
        return 1 if self.independent_first_frame and chunk_index == 0 else self.chunk_frames


@dataclass
class Chunk:
    index: int  # generated-chunk number (context chunks keep the number of the next generated one)
    start_frame: int  # first latent frame
    latents: Tensor  # [B, C, f, h, w]
    frames: Optional[Tensor]  # decoded pixels [B, 3, n, H, W] in [-1, 1], when the stream has a VAE
    prompt: Optional[str]
    is_context: bool = False  # given (image, clip) rather than generated
    seconds: float = 0.0  # wall time to make (and decode) it

    @property
    def first_pixel_frame(self) -> int:
        return latent_to_pixel(self.start_frame)


class _Lease:
    """Which stream of a lineage (forks of one stream) currently owns the shared device buffers."""

    def __init__(self, owner: object):
        self.owner = owner


class CausalStream:
    def __init__(self, model, settings: StreamSettings, *, latent_hw: tuple[int, int], batch: int = 1,
                 vae=None, text_encoder=None, device: torch.device | str = "cpu", journal: bool = False,
                 journal_device: torch.device | str | None = None):
        self.model, self.settings = model, settings
        self.vae, self.text_encoder = vae, text_encoder
        self.device = torch.device(device)
        self.dtype = model_dtype(model)
        cfg = model.config
        self.batch, self.latent_hw = batch, tuple(latent_hw)
        self.channels = cfg.out_dim
        T = cfg.tokens_per_frame(*latent_hw)
        kw = dict(batch=batch, tokens_per_frame=T, rope=settings.rope, dtype=self.dtype, device=self.device)
        if settings.kv_recompute_frames is not None:  # the context frames and the chunk being made
            self.cache = KVCache.full(cfg, frames=settings.kv_recompute_frames + settings.chunk_frames, **kw)
        elif settings.window_frames is not None:
            self.cache = KVCache.window(cfg, window_frames=settings.window_frames,
                                        sink_frames=settings.sink_frames, **kw)
        else:
            self.cache = KVCache.full(cfg, frames=settings.max_frames, **kw)
        self.grid = FlowGrid(settings.shift)
        self.noise = seeded_noise(settings.seed, device=self.device, dtype=self.dtype)
        self.decoder = None
        if vae is not None:
            from .vae import StreamingDecoder
            self.decoder = StreamingDecoder(vae)
        self.frame = 0  # next latent frame
        self.chunk_index = 0  # next generated chunk
        self.prompt: Optional[str] = None
        self.context: Optional[Tensor] = None  # [B, L, text_dim]
        self.prompt_source: Optional[str | Tensor] = None
        self._blend: Optional[tuple[Tensor, Tensor, int]] = None  # (from, to, chunks done)
        self.history: deque[Tensor] = deque()  # clean latent chunks the cache holds, oldest first
        self._image_latent: Optional[Tensor] = None  # i2v with a chunk-multiple layout: frame 0 to hold
        self._first_latent: Optional[Tensor] = None  # frame 0, always in a recomputed cache (Krea)
        # every write into the KV and decoder caches, to rebuild them (fork); None: not recorded. Latents
        # are kept on journal_device (default: the stream's device)
        self.journal: Optional[list[tuple]] = [] if journal else None
        self.journal_device = torch.device(journal_device) if journal_device is not None else self.device
        self._journal_copies: dict[int, tuple[Tensor, Tensor]] = {}  # id -> (tensor, its journal copy)
        self._token = object()
        self._lease = _Lease(self._token)

    def clone(self) -> "CausalStream":
        """An independent copy of this stream's state (cache, position, prompt, history, decoder):
        advancing the copy never changes this one. Model, VAE and text encoder are shared. Copies the KV
        cache: a chain of nodes uses `fork` instead."""
        self._acquire()
        new = copy.copy(self)
        new.cache = self.cache.clone()
        new.history = deque(self.history)
        new.decoder = self.decoder.clone() if self.decoder is not None else None
        new.journal = list(self.journal) if self.journal is not None else None
        new._journal_copies = dict(self._journal_copies)
        new._token = object()
        new._lease = _Lease(new._token)
        return new

    def fork(self) -> "CausalStream":
        """A stream that continues this one and takes over its KV and decoder caches (no copy). This
        stream stays usable: its next use rebuilds its caches from its journal (same numbers)."""
        if self.journal is None:
            raise ValueError("fork() needs a stream made with journal=True (it rebuilds from the journal)")
        self._acquire()
        new = copy.copy(self)
        new.cache = self.cache.share()
        new.history = deque(self.history)
        new.decoder = self.decoder.share() if self.decoder is not None else None
        new.journal = list(self.journal)
        new._journal_copies = dict(self._journal_copies)
        new._token = object()
        self._lease.owner = new._token
        return new

    def stop_journal(self) -> None:
        """Keep no journal from now on (a live stream that runs for hours: memory stays flat). The stream can
        no longer be forked; streams it was forked from keep their own journals."""
        self.journal = None
        self._journal_copies = {}

    def memory_needed(self) -> int:
        """Device bytes the next chunks need beyond the weights: the KV buffers if they are not allocated
        yet, the cross-attention K/V, and the larger of a chunk's activations and a decode, plus the
        decoder cache when it is not on the device (parked, or not made yet). An estimate with headroom
        for ComfyUI's model management; `causvid bench memory` measures the real peak."""
        cfg, item = self.model.config, self.dtype.itemsize
        tokens = self.settings.chunk_frames * cfg.tokens_per_frame(*self.latent_hw)
        kv = self.cache.store.nbytes if self.cache.store.k is None else 0
        cross = 2 * cfg.num_layers * max(cfg.text_len, 512) * cfg.dim * item
        # a block's peak: the FFN hidden state twice (before / after GELU) and float32 residual and
        # modulation copies of the tokens
        chunk = tokens * (2 * cfg.ffn_dim * item + 8 * cfg.dim * 4)
        decode = decoder_cache = 0
        if self.vae is not None:
            decode = decode_memory(self.vae, self.latent_hw)
            slots = [t for t in self.decoder.cache.slots if t is not None]
            if not slots:
                decoder_cache = decode  # made at the first decode; about the size of a decode's peak
            elif slots[0].device != self.vae_device:
                decoder_cache = self.decoder.nbytes  # parked: it comes back at the next decode
        return kv + cross + max(chunk, decode) + decoder_cache

    @property
    def vae_device(self) -> torch.device:
        """Where the VAE runs: its weights' device (ComfyUI may keep it apart from the DiT, e.g. --cpu-vae)."""
        return next(self.vae.parameters()).device

    @property
    def owns_buffers(self) -> bool:
        """False once a fork has taken the caches over (the next use here rebuilds them)."""
        return self._lease.owner is self._token

    def _acquire(self) -> None:
        """Make sure this stream's caches hold its own state: replay the journal if a fork took them.
        Ownership is taken only once the replay has finished: a replay that fails (out of memory, an
        interruption) leaves the buffers owned by nobody, so the next use of any stream rebuilds."""
        if self.owns_buffers:
            return
        self._lease.owner = None
        self.cache.reset()
        if self.decoder is not None:
            self.decoder.reset()  # in place: forks share one decoder cache, as they share the KV buffers
        on_device: dict[int, Tensor] = {}  # one device copy per recorded tensor (contexts recur)

        def back(t: Tensor) -> Tensor:
            if id(t) not in on_device:
                on_device[id(t)] = t.to(self.device)  # the recorded dtype: the numbers of the first time
            return on_device[id(t)]

        with torch.no_grad():
            for op, *args in self.journal:
                if op == "reset":
                    self.cache.reset(start_frame=args[0])
                elif op == "write":
                    start, latents, context = args
                    self._run_clean(back(latents), start, back(context))
                else:  # "decode"
                    self.decoder.cache.to_(self.vae_device)
                    self.decoder.decode(args[0].to(self.vae_device))
        self._lease.owner = self._token

    def _record(self, op: str, *args) -> None:
        """Append an op with its tensors copied to the journal's device, each tensor once (a chunk's latents
        are written and decoded; a prompt's context is written with every chunk)."""
        if self.journal is None:
            return
        out = []
        for a in args:
            if isinstance(a, Tensor):
                key = id(a)
                held = self._journal_copies.get(key)
                if held is None or held[0] is not a:
                    held = self._journal_copies[key] = (a, a.to(self.journal_device))
                    if len(self._journal_copies) > JOURNAL_MEMO:  # only recent tensors recur
                        self._journal_copies.pop(next(iter(self._journal_copies)))
                a = held[1]
            out.append(a)
        self.journal.append((op, *out))

    def set_steps(self, preset: str) -> None:
        """Use another step preset from the next chunk on (e.g. causvid-3step for speed)."""
        shift, steps = step_preset(preset)
        self.settings = replace(self.settings, steps=tuple(steps), shift=shift)
        self.grid = FlowGrid(shift)

    # -- conditioning --------------------------------------------------------------------------------
    def encode_prompt(self, prompt: str | Tensor) -> Tensor:
        if isinstance(prompt, Tensor):
            ctx = prompt
        else:
            if self.text_encoder is None:
                raise ValueError("this stream has no text encoder: pass the conditioning tensor instead of text")
            with torch.no_grad():
                ctx = self.text_encoder.encode([prompt] * self.batch)
        if ctx.dim() == 2:
            ctx = ctx.unsqueeze(0)
        if ctx.shape[0] == 1 and self.batch > 1:
            ctx = ctx.expand(self.batch, -1, -1)
        return ctx.to(self.device)

    def set_prompt(self, prompt: str | Tensor, mode: Optional[str] = None) -> None:
        """Change the prompt from the next chunk on (mode: cut / recache / blend; default the settings')."""
        mode = mode or self.settings.switch_mode
        if mode not in SWITCH_MODES:
            raise ValueError(f"mode must be one of {SWITCH_MODES}, got {mode!r}")
        new = self.encode_prompt(prompt)
        self.prompt = prompt if isinstance(prompt, str) else "<conditioning>"
        self.prompt_source = prompt  # as given (text, or a conditioning tensor wherever it lives)
        old, self.context, self._blend = self.context, new, None
        if old is None:
            return
        if mode == "blend" and self.settings.blend_chunks > 1:
            self._blend = (_pad_rows(old, new), _pad_rows(new, old), 0)
        elif mode == "recache":
            self.recache()
        # cut: the new context tensor makes the model rebuild the cross-attention K/V on the next call

    def _chunk_context(self) -> Tensor:
        if self._blend is None:
            return self.context
        old, new, done = self._blend
        n = self.settings.blend_chunks
        a = (done + 1) / n
        ctx = torch.lerp(old, new, a)
        self._blend = None if done + 1 >= n else (old, new, done + 1)
        return ctx

    @torch.no_grad()
    def recache(self) -> None:
        """Rebuild the cache from the held clean frames under the current prompt, at t = 0 (LongLive)."""
        self._acquire()
        limit = self.settings.recache_frames or self.cache.capacity_frames
        while self.history and sum(c.shape[2] for c in self.history) > limit:
            self.history.popleft()
        held = sum(c.shape[2] for c in self.history)
        self.cache.reset(start_frame=self.frame - held)
        self._record("reset", self.frame - held)
        s = self.frame - held
        for chunk in self.history:
            self._write_clean(chunk, s, self.context)
            s += chunk.shape[2]

    # -- writing context ------------------------------------------------------------------------------
    def _write_clean(self, latents: Tensor, start: int, context: Tensor) -> None:
        self._run_clean(latents, start, context)
        self._record("write", start, latents, context)

    def _run_clean(self, latents: Tensor, start: int, context: Tensor) -> None:
        B, f = latents.shape[0], latents.shape[2]
        self.model(latents, torch.zeros(B, f, device=self.device), context, cache=self.cache, start_frame=start)

    def _remember(self, latents: Tensor) -> None:
        self.history.append(latents)
        while sum(c.shape[2] for c in self.history) > self.cache.capacity_frames:
            self.history.popleft()

    def _decode(self, latents: Tensor) -> Optional[Tensor]:
        """Pixels [B, 3, n, H, W] in [-1, 1], in the VAE's dtype, on the stream's device."""
        if self.decoder is None:
            return None
        self._record("decode", latents)
        self.decoder.cache.to_(self.vae_device)  # back from park() if it was parked
        return self.decoder.decode(latents.to(self.vae_device))

    def park(self, device: torch.device | str) -> None:
        """Free this stream's device memory other than the KV buffers, between uses: the decoder cache
        moves to `device` (1.8 GB at 832x480 in bf16; it comes back at the next decode) and the
        cross-attention K/V are dropped (recomputed from the prompt at the next chunk)."""
        if self.decoder is not None:
            self.decoder.cache.to_(device)
        self.cache.reset_cross()

    @torch.no_grad()
    def add_context(self, latents: Tensor) -> Chunk:
        """Write given clean latents [B, C, f, h, w] (an encoded image or clip) at the current position."""
        self._require_prompt()
        self._acquire()
        t0 = time.perf_counter()
        latents = latents.to(self.device, self.dtype)
        if self.frame == 0:
            self._first_latent = latents[:, :, :1]
        s = 0
        for n in self._layout_for(latents.shape[2]):
            self._write_clean(latents[:, :, s:s + n], self.frame + s, self.context)
            self._remember(latents[:, :, s:s + n])
            s += n
        chunk = Chunk(self.chunk_index, self.frame, latents, self._decode(latents), self.prompt, is_context=True)
        self.frame += latents.shape[2]
        chunk.seconds = time.perf_counter() - t0
        return chunk

    def _layout_for(self, frames: int) -> list[int]:
        """Chunk sizes for `frames` context frames written from the current position on."""
        sizes, pos = [], self.frame
        while frames > 0:
            n = min(self.settings.chunk_size(0) if pos == 0 else self.settings.chunk_frames, frames)
            sizes.append(n)
            pos, frames = pos + n, frames - n
        return sizes

    @torch.no_grad()
    def start_from_image(self, image: Tensor) -> Optional[Chunk]:
        """Image-to-video. image [B, 3, H, W] in [-1, 1] (or an encoded latent [B, C, 1, h, w])."""
        if self.frame != 0:
            raise ValueError("start_from_image must come before the first chunk")
        latent = self._encode_image(image)
        if self.settings.independent_first_frame:
            chunk = self.add_context(latent)
            self.chunk_index = 1  # the image is chunk 0 of the [1, f, f, ...] layout
            return chunk
        self._image_latent = latent  # held clean as frame 0 of the first chunk
        return None

    def _encode_image(self, image: Tensor) -> Tensor:
        if image.dim() == 5:
            return image.to(self.device, self.dtype)
        if self.vae is None:
            raise ValueError("image-to-video needs a VAE (or pass the encoded latent [B, C, 1, h, w])")
        from .vae import StreamingEncoder
        with torch.no_grad():
            latent = StreamingEncoder(self.vae).encode(image.unsqueeze(2).to(self.vae_device))
        if latent.shape[-2:] != self.latent_hw:
            raise ValueError(f"the image encodes to a {tuple(latent.shape[-2:])} latent; the stream is {self.latent_hw}")
        return latent.to(self.device, self.dtype)

    # -- generating -----------------------------------------------------------------------------------
    def _require_prompt(self) -> None:
        if self.context is None:
            raise ValueError("set a prompt first (set_prompt)")

    def initial_noise(self, chunk_index: int, frames: int) -> Tensor:
        h, w = self.latent_hw
        return self.noise(chunk_index, INIT_NOISE_STEP, (self.batch, self.channels, frames, h, w))

    @torch.no_grad()
    def step(self, v2v_latents: Optional[Tensor] = None, strength: float = 1.0,
             callback: Optional[Callable[[int, Tensor], None]] = None) -> Chunk:
        """Make the next chunk. v2v_latents [B, C, f, h, w]: restyle these latents at `strength` instead.
        callback(i, x0) runs after each denoising step (progress bars, previews of x0, interruption)."""
        self._require_prompt()
        self._acquire()
        t0 = time.perf_counter()
        ci, s = self.chunk_index, self.frame
        f = self.settings.chunk_size(ci) if v2v_latents is None else v2v_latents.shape[2]
        if self.settings.max_frames is not None:  # a budget, with or without a rolling window
            f = min(f, self.settings.max_frames - s)
            if f <= 0:
                raise ValueError(f"the stream is complete: all {self.settings.max_frames} latent frames are made")
        ctx = self._chunk_context()
        x = self.initial_noise(ci, f)
        steps = list(self.settings.steps_for(ci))
        if v2v_latents is not None:
            steps = restyle_steps(steps, strength)
            x = self.grid.add_noise(v2v_latents.to(x), x, float(steps[0]))
        fixed = self._image_latent if s == 0 else None
        recompute = self.settings.kv_recompute_frames is not None
        at = self._recompute_cache(ctx) if recompute else s  # where the chunk sits in the cache
        x0 = denoise_chunk(self.model, x, ctx, steps, self.grid, cache=self.cache, start_frame=at,
                           chunk_index=ci, noise_fn=self.noise, fixed=fixed, callback=callback)
        if not recompute:
            self._write_clean(x0, s, ctx)  # the t = 0 refresh: the cache holds the clean chunk
        if self._first_latent is None:
            self._first_latent = x0[:, :, :1]
        self._remember(x0)
        if fixed is not None:
            self._image_latent = None  # used by the first chunk only
        frames = self._decode(x0)
        check_finite_chunk(x0, frames, context=ctx, model=self.model, index=ci)  # never a black video written
        self.frame, self.chunk_index = s + f, ci + 1
        return Chunk(ci, s, x0, frames, self.prompt, seconds=time.perf_counter() - t0)

    def _recompute_cache(self, context: Tensor) -> int:
        """Krea's recomputation: rebuild the cache at t = 0 from frame 0 and the frames since
        max(1, frame - (K - 1)), in groups of chunk_frames at slots counted from 0 (their block-causal
        mask), under the current conditioning; returns the slot where the new chunk goes."""
        K, c = self.settings.kv_recompute_frames, self.frame
        self.cache.reset(start_frame=0)
        self._record("reset", 0)
        if c == 0:
            return 0
        held = torch.cat(list(self.history), dim=2)  # the clean frames ending at frame c - 1
        lo = max(1, c - (K - 1))
        recent = held[:, :, held.shape[2] - (c - lo):]
        frames = torch.cat([self._first_latent if self._first_latent is not None else held[:, :, :1], recent], 2)
        n, fpb = frames.shape[2], self.settings.chunk_frames
        for g in range(0, n, fpb):
            self._write_clean(frames[:, :, g:g + fpb], g, context)
        return n

    def chunks(self, count: Optional[int] = None) -> Iterator[Chunk]:
        """Yield `count` chunks (None: until max_frames; forever with a rolling window and no max_frames)."""
        made = 0
        while count is None or made < count:
            if self.settings.max_frames is not None and self.frame >= self.settings.max_frames:
                return
            yield self.step()
            made += 1


def restyle_steps(steps: Sequence[float], strength: float) -> list[float]:
    """Video-to-video: start at t = strength * 1000 and keep the preset's steps below it."""
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    t0 = 1000.0 * strength
    return [t0] + [float(t) for t in steps if t < t0]


def _pad_rows(a: Tensor, b: Tensor) -> Tensor:
    """Zero-pad a's rows to b's length (conditionings of different lengths, for blending)."""
    if a.shape[1] >= b.shape[1]:
        return a
    return torch.cat([a, a.new_zeros(a.shape[0], b.shape[1] - a.shape[1], a.shape[2])], dim=1)


def run_schedule(stream: CausalStream, prompts: dict[int, str | Tensor], count: Optional[int] = None,
                 mode: Optional[str] = None) -> Iterator[Chunk]:
    """Yield chunks, switching prompts where `prompts` (chunk index -> prompt) says (see schedule.py)."""
    if 0 in prompts and stream.context is None:
        stream.set_prompt(prompts[0])
    made = 0
    while count is None or made < count:
        if stream.settings.max_frames is not None and stream.frame >= stream.settings.max_frames:
            return
        if stream.chunk_index in prompts and stream.chunk_index > 0:
            stream.set_prompt(prompts[stream.chunk_index], mode)
        yield stream.step()
        made += 1
