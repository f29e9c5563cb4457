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

import torch
from torch import Tensor

from ..schedule import SWITCH_MODES
from ..stream import CausalStream
from ..video_io import FPS, frames_uint8

MAX_PROMPT_CHARS = 2000  # a prompt is a sentence or a paragraph; anything longer is a mistake or abuse

# (uint8 frames [n, H, W, 3] on the host, the stats after this chunk) -> None
ChunkSink = Callable[[Tensor, "LiveStats"], None]


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
    prompt: Optional[str] = None  # in effect for the last chunk

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
                "prompt": self.prompt}


class LiveSession:
    """Runs `stream` (a rolling window for endless streams) until stop(), a frame limit, a time limit or
    the stream's own length; `sinks` get every chunk's frames as they are made."""

    def __init__(self, stream: CausalStream, prompt: str, *, mode: str = "recache",
                 sinks: tuple[ChunkSink, ...] = (), max_frames: Optional[int] = None,
                 max_seconds: Optional[float] = None, check: Optional[Callable[[], None]] = None):
        if mode not in SWITCH_MODES:
            raise ValueError(f"mode must be one of {SWITCH_MODES}, got {mode!r}")
        self.stream, self.mode, self.sinks = stream, mode, tuple(sinks)
        self.max_frames, self.max_seconds, self.check = max_frames, max_seconds, check
        self.inbox = PromptInbox()
        self.first_prompt = self.inbox.submit(prompt)
        self.inbox.take()
        self.applied: list[tuple[int, str]] = []  # (pixel frame, prompt) where each prompt took effect
        self.stats = LiveStats()
        self._stop = threading.Event()

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

    def _done(self) -> bool:
        s = self.stream.settings
        return (self._stop.is_set()
                or (s.max_frames is not None and self.stream.frame >= s.max_frames)
                or (self.max_frames is not None and self.stats.frames >= self.max_frames)
                or (self.max_seconds is not None and time.perf_counter() - self.stats.started >= self.max_seconds))

    @torch.no_grad()
    def run(self) -> LiveStats:
        """Make chunks until done; returns the stats. An exception from a sink or `check` (an interrupt)
        ends the session after the chunks already shown."""
        self.stats = LiveStats()
        self.stream.set_prompt(self.first_prompt)
        self.applied.append((0, self.first_prompt))
        self.stats.prompt = self.first_prompt
        try:
            while not self._done():
                if self.check is not None:
                    self.check()
                text = self.inbox.take()
                if text is not None and text != self.stats.prompt:
                    self.stream.set_prompt(text, self.mode)
                    self.applied.append((self.stats.frames, text))
                    self.stats.prompt = text
                t0 = time.perf_counter()
                chunk = self.stream.step()
                frames = frames_uint8(chunk.frames).cpu()  # the one copy to the host
                self.stats.compute_s += time.perf_counter() - t0
                self.stats.chunks += 1
                self.stats.frames += frames.shape[0]
                if self.stats.first_frame_s is None:
                    self.stats.first_frame_s = time.perf_counter() - self.stats.started
                for sink in self.sinks:
                    sink(frames, self.stats)
        finally:
            self._stop.set()
        return self.stats

    def schedule_text(self) -> str:
        """The prompts as applied, as a schedule file ('FRAME: prompt'); with this session's seed and mode
        it reproduces the stream frame for frame."""
        s = self.stream.settings
        head = f"# causvid live: seed {s.seed}, switch mode {self.mode}, {FPS} fps\n"
        return head + "".join(f"{frame}: {text}\n" for frame, text in self.applied)
