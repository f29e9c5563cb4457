"""A live session: one stream made chunk by chunk until it is stopped, steered by prompts that arrive
from another thread (a web route) and take effect at the next chunk boundary.

Memory stays flat: each chunk's frames leave the device as uint8, go to the sinks (recorder, transport)
and are not kept. The prompts applied are logged by the pixel frame where they took effect, so
`schedule_text()` written beside the video replays the stream frame for frame (same seed, same mode):
every change sits on a chunk start, where a schedule's snapping leaves it.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch
from torch import Tensor

from ..schedule import SWITCH_MODES
from ..stream import CausalStream
from ..video_io import FPS, frames_uint8, from_uint8
from .sources import FrameSource, frames_per_chunk

MAX_PROMPT_CHARS = 2000  # a prompt is a sentence or a paragraph; anything longer is a mistake or abuse

LEAD_S = 1.5  # a paced session runs at most this far ahead of real time: prompt changes show quickly
PACE_POLL_S = 0.05  # how often a paced wait looks at Stop and the interrupt

ChunkSink = Callable[["LiveChunk"], None]


class PromptInbox:
    """Prompts submitted from any thread, taken by the session at chunk boundaries (the last one wins)."""

    def __init__(self, max_chars: int = MAX_PROMPT_CHARS):
        self.max_chars = max_chars
        self._lock = threading.Lock()
        self._pending: Optional[str] = None

    def submit(self, text: str) -> str:
        """Queue a prompt for the next chunk; returns it cleaned. Empty or oversized text is refused."""
        if not isinstance(text, str):
            raise ValueError(f"a prompt must be text, got {type(text).__name__}")
        text = " ".join(text.split())
        if not text:
            raise ValueError("the prompt is empty: type what the video should show")
        if len(text) > self.max_chars:
            raise ValueError(f"the prompt has {len(text)} characters; at most {self.max_chars} are taken")
        with self._lock:
            self._pending = text
        return text

    def take(self) -> Optional[str]:
        with self._lock:
            text, self._pending = self._pending, None
        return text


@dataclass
class LiveStats:
    chunks: int = 0
    frames: int = 0
    first_frame_s: Optional[float] = None  # from start() to the first decoded frames
    compute_s: float = 0.0  # time spent making chunks
    started: float = field(default_factory=time.perf_counter)
    first_frame_at: Optional[float] = None  # perf_counter() when the first frames were ready
    prompt: Optional[str] = None  # in effect for the last chunk
    source: str = "text"  # text, or the kind of input a video-to-video stream restyles
    input_errors: int = 0  # input frames refused (a camera frame that is not an image, ...)
    ended: Optional[str] = None  # why the session ended: stop, limit, source, error

    @property
    def fps(self) -> float:
        return self.frames / self.compute_s if self.compute_s else 0.0

    @property
    def real_time_factor(self) -> float:
        return self.fps / FPS

    def to_dict(self) -> dict:
        return {"chunks": self.chunks, "frames": self.frames, "fps": round(self.fps, 2),
                "real_time_factor": round(self.real_time_factor, 2),
                "first_frame_s": None if self.first_frame_s is None else round(self.first_frame_s, 3),
                "prompt": self.prompt, "source": self.source, "input_errors": self.input_errors,
                "ended": self.ended}


@dataclass
class LiveChunk:
    """What a sink gets per chunk: the decoded frames on the host and, for video-to-video, the input
    frames they restyle (uint8 [n, H, W, 3] each)."""
    index: int  # chunk number in this session, from 0
    first_frame: int  # pixel frame of frames[0] in the session
    frames: Tensor
    inputs: Optional[np.ndarray]
    stats: LiveStats


class LiveSession:
    """Runs `stream` (a rolling window for endless streams) until stop(), a frame limit, a time limit, the
    stream's own length or the end of its input; `sinks` get every chunk as it is made.

    source: restyle its frames chunk by chunk at `strength` (video-to-video) instead of text to video.
    lead_s: pace the session to real time, at most this many seconds of video ahead of the wall clock
    (None: as fast as it goes; a camera paces itself). encode: text -> conditioning [1, L, D] for a stream
    whose prompts are encoded outside it (ComfyUI's CLIP); otherwise the stream's own text encoder.
    image: image-to-video, the video starts from it.
    """

    def __init__(self, stream: CausalStream, prompt: str, *, mode: str = "recache",
                 sinks: tuple[ChunkSink, ...] = (), max_frames: Optional[int] = None,
                 max_seconds: Optional[float] = None, check: Optional[Callable[[], None]] = None,
                 source: Optional[FrameSource] = None, strength: float = 0.6, lead_s: Optional[float] = None,
                 encode: Optional[Callable[[str], Tensor]] = None, image: Optional[Tensor] = None):
        if mode not in SWITCH_MODES:
            raise ValueError(f"mode must be one of {SWITCH_MODES}, got {mode!r}")
        if source is not None and not 0.0 < strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        if source is not None and stream.vae is None:
            raise ValueError("video-to-video needs a stream with a VAE to encode its input")
        self.stream, self.mode, self.sinks = stream, mode, tuple(sinks)
        self.max_frames, self.max_seconds, self.check = max_frames, max_seconds, check
        self.source, self.strength, self.lead_s, self.encode = source, strength, lead_s, encode
        self.image = image  # image-to-video: the first frame [B, 3, H, W] in [-1, 1]
        self.inbox = PromptInbox()
        self.first_prompt = self.inbox.submit(prompt)
        self.inbox.take()
        self.applied: list[tuple[int, str]] = []  # (pixel frame, prompt) where each prompt took effect
        self.stats = LiveStats()
        self._stop = threading.Event()
        stream.stop_journal()  # nothing may grow with the stream's length

    def submit_prompt(self, text: str) -> str:
        """From any thread: the prompt takes effect at the next chunk boundary."""
        if self._stop.is_set():
            raise ValueError("this stream has ended: start a new one")
        return self.inbox.submit(text)

    def stop(self) -> None:
        """From any thread: the chunk in flight is finished and shown, then the session ends."""
        self._stop.set()

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def _limit(self) -> Optional[str]:
        s = self.stream.settings
        if self._stop.is_set():
            return "stop"
        if ((s.max_frames is not None and self.stream.frame >= s.max_frames)
                or (self.max_frames is not None and self.stats.frames >= self.max_frames)
                or (self.max_seconds is not None and time.perf_counter() - self.stats.started >= self.max_seconds)):
            return "limit"
        return None

    def _set_prompt(self, text: str, mode: Optional[str]) -> None:
        self.stream.set_prompt(self.encode(text) if self.encode is not None else text, mode)

    def _pace(self) -> None:
        """Wait until the video made is at most lead_s ahead of real time (Stop and interrupts still work)."""
        st = self.stats
        if self.lead_s is None or st.first_frame_at is None:
            return
        while not self._stop.is_set():
            ahead = st.frames / FPS - (time.perf_counter() - st.first_frame_at)
            if ahead <= self.lead_s:
                return
            if self.check is not None:
                self.check()
            self._stop.wait(min(PACE_POLL_S, ahead - self.lead_s))

    def _next_inputs(self) -> tuple[Optional[np.ndarray], Optional[Tensor]]:
        """A video-to-video chunk's input frames and their latents; (None, None) when the source has ended."""
        stream = self.stream
        f = stream.settings.chunk_size(stream.chunk_index)
        if stream.settings.max_frames is not None:
            f = min(f, stream.settings.max_frames - stream.frame)
        frames = self.source.take(frames_per_chunk(f, stream.frame == 0, stream.vae.config.time_factor))
        self.stats.input_errors = getattr(self.source, "bad", 0)
        if frames is None:
            return None, None
        video = from_uint8(frames).to(stream.vae_device)  # [1, 3, n, H, W]: one chunk to the device
        return frames, self._encoder.encode(video)

    @torch.no_grad()
    def run(self) -> LiveStats:
        """Make chunks until done; returns the stats. An exception from a sink or `check` (an interrupt)
        ends the session after the chunks already shown."""
        self.stats = LiveStats(source=self.source.kind if self.source is not None else "text")
        if self.source is not None:
            from ..vae import StreamingEncoder
            self._encoder = StreamingEncoder(self.stream.vae)
        self._set_prompt(self.first_prompt, None)
        self.applied.append((0, self.first_prompt))
        self.stats.prompt = self.first_prompt
        try:
            if self.image is not None:
                first = self.stream.start_from_image(self.image)
                if first is not None:  # a model whose first chunk is the image alone: shown as a chunk
                    self._show(first, None, time.perf_counter())
            while True:
                self._pace()
                if (why := self._limit()) is not None:
                    break
                if self.check is not None:
                    self.check()
                text = self.inbox.take()
                if text is not None and text != self.stats.prompt:
                    self._set_prompt(text, self.mode)
                    self.applied.append((self.stats.frames, text))
                    self.stats.prompt = text
                t0 = time.perf_counter()
                inputs = latents = None
                if self.source is not None:
                    inputs, latents = self._next_inputs()
                    if inputs is None:
                        why = "source"
                        break
                    t0 = time.perf_counter()  # waiting for a camera is not compute
                    chunk = self.stream.step(v2v_latents=latents, strength=self.strength)
                else:
                    chunk = self.stream.step()
                self._show(chunk, inputs, t0)
            self.stats.ended = why
        except BaseException:
            self.stats.ended = "error"
            raise
        finally:
            self._stop.set()
            if self.source is not None:
                self.source.close()
        return self.stats

    def _show(self, chunk, inputs: Optional[np.ndarray], t0: float) -> None:
        """Count a made chunk and hand its frames to the sinks."""
        frames = frames_uint8(chunk.frames).cpu()  # the one copy to the host
        self.stats.compute_s += time.perf_counter() - t0
        shown = LiveChunk(self.stats.chunks, self.stats.frames, frames, inputs, self.stats)
        self.stats.chunks += 1
        self.stats.frames += frames.shape[0]
        if self.stats.first_frame_s is None:
            self.stats.first_frame_at = time.perf_counter()
            self.stats.first_frame_s = self.stats.first_frame_at - self.stats.started
        for sink in self.sinks:
            sink(shown)

    def release(self) -> None:
        """Drop what a finished session holds on to (its stream with the KV cache and decoder cache, the text
        encoder's closure, the source): a server remembers ended sessions by their stats alone."""
        if not self._stop.is_set():
            raise RuntimeError("release() is for a session that has ended")
        self.stream = self.encode = self.source = self.check = self.image = None
        self.sinks = ()

    def schedule_text(self) -> str:
        """The prompts as applied, as a schedule file ('FRAME: prompt'); with this session's seed and mode
        it reproduces the stream frame for frame (text to video; a video-to-video stream also needs its input)."""
        s = self.stream.settings
        head = f"# causvid live: seed {s.seed}, switch mode {self.mode}, {FPS} fps\n"
        return head + "".join(f"{frame}: {text}\n" for frame, text in self.applied)
