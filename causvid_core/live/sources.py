"""Where a live video-to-video stream gets its input frames, a chunk's worth at a time.

A source hands out uint8 frames [n, H, W, 3] at the stream's size, or None when it has ended. None of them
holds more than a chunk or a bounded buffer: a video file is decoded as it is read, the Shapes World clip is
rendered frame by frame, and a camera's frames arrive from a page and wait in a short queue.
"""
from __future__ import annotations

import io
import threading
import time
from collections import deque
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np

CAMERA_QUEUE_FRAMES = 48  # 3 s at 16 fps: a camera that runs ahead of the model loses its oldest frames
CAMERA_WAIT_S = 10.0  # no frames for this long: the page has gone; the stream ends instead of hanging
MAX_CAMERA_FRAME_BYTES = 4 * 1024 * 1024  # one JPEG of a 4K frame is well under this
MAX_CAMERA_PIXELS = 4096 * 4096


def fit(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    """Scale a uint8 frame [h, w, 3] to cover height x width and crop the middle (no stretching)."""
    from PIL import Image

    h, w = frame.shape[:2]
    if (h, w) == (height, width):
        return frame
    scale = max(height / h, width / w)
    nh, nw = max(height, round(h * scale)), max(width, round(w * scale))
    img = Image.fromarray(frame).resize((nw, nh), Image.BILINEAR)
    top, left = (nh - height) // 2, (nw - width) // 2
    return np.asarray(img.crop((left, top, left + width, top + height)))


class FrameSource:
    """take(n) -> uint8 [n, H, W, 3] or None once the source has ended (a short last chunk is dropped:
    a chunk's frame count is fixed by the model)."""

    kind = "source"

    def __init__(self, height: int, width: int):
        self.height, self.width = height, width

    def take(self, n: int) -> Optional[np.ndarray]:
        raise NotImplementedError

    def close(self) -> None:
        pass


class _IterSource(FrameSource):
    """A source over an iterator of single frames, scaled to the stream."""

    def __init__(self, frames: Iterator[np.ndarray], height: int, width: int):
        super().__init__(height, width)
        self._frames = frames

    def take(self, n: int) -> Optional[np.ndarray]:
        out = []
        for f in self._frames:
            out.append(fit(f, self.height, self.width))
            if len(out) == n:
                return np.stack(out)
        return None


class VideoFileSource(_IterSource):
    """A video file decoded as it is read (PyAV); `loop` starts it again at its end."""

    kind = "file"

    def __init__(self, path: str | Path, height: int, width: int, loop: bool = False):
        import av

        self.path, self.loop = Path(path), loop
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such video file")
        try:  # fail now, not at the first chunk, on a file that is not a video
            with av.open(str(self.path)) as c:
                if not c.streams.video:
                    raise ValueError(f"{self.path}: the file has no video stream")
        except av.error.FFmpegError as exc:
            raise ValueError(f"{self.path}: not a video file PyAV can read ({exc})") from None
        super().__init__(self._decode(), height, width)

    def _decode(self) -> Iterator[np.ndarray]:
        import av

        while True:
            got = 0
            with av.open(str(self.path)) as c:
                for frame in c.decode(video=0):
                    got += 1
                    yield frame.to_ndarray(format="rgb24")
            if not self.loop or got == 0:
                return


class WorldSource(_IterSource):
    """An endless Shapes World clip for a prompt (the built-in model's world): an input that needs no file,
    for demos and tests."""

    kind = "world"

    def __init__(self, prompt: str, height: int, width: int, seed: int = 0):
        from .. import world

        self.spec = world.spec_from_prompt(prompt, np.random.default_rng(seed))
        super().__init__((f for chunk in world.iter_frames(self.spec) for f in chunk), height, width)


class CameraSource(FrameSource):
    """Frames pushed by a page (JPEG or PNG bytes from the browser's camera) and taken by the session.

    `put` runs on the server's event loop and only queues the bytes; decoding happens in the session's
    thread at `take`. A frame that does not decode, or is too large, is counted and reported in `errors`,
    never raised into the server. `take` waits for enough frames and uses the newest ones (a model slower
    than the camera skips the older ones instead of falling behind), and gives up (None) when no frame has
    come for `wait_s` or `stopped()` says the session ended."""

    kind = "camera"

    def __init__(self, height: int, width: int, wait_s: float = CAMERA_WAIT_S,
                 stopped: Callable[[], bool] = lambda: False, check: Callable[[], None] = lambda: None):
        super().__init__(height, width)
        self.wait_s, self.stopped, self.check = wait_s, stopped, check
        self._queue: deque[bytes] = deque(maxlen=CAMERA_QUEUE_FRAMES)
        self._cond = threading.Condition()
        self.received = self.bad = self.skipped = 0
        self.errors: deque[str] = deque(maxlen=8)
        self._last = time.monotonic()

    def put(self, data: bytes) -> Optional[str]:
        """Queue one encoded frame; returns why it was refused, or None."""
        if not isinstance(data, (bytes, bytearray)) or not data:
            return self._refuse("an empty camera frame")
        if len(data) > MAX_CAMERA_FRAME_BYTES:
            return self._refuse(f"a camera frame of {len(data)} bytes (at most {MAX_CAMERA_FRAME_BYTES})")
        with self._cond:
            self._queue.append(bytes(data))
            self.received += 1
            self._last = time.monotonic()
            self._cond.notify_all()
        return None

    def _refuse(self, why: str) -> str:
        self.bad += 1
        self.errors.append(why)
        return why

    def _decode(self, data: bytes) -> Optional[np.ndarray]:
        from PIL import Image

        try:
            img = Image.open(io.BytesIO(data))
            if img.width * img.height > MAX_CAMERA_PIXELS:
                self._refuse(f"a camera frame of {img.width}x{img.height} pixels")
                return None
            return fit(np.asarray(img.convert("RGB")), self.height, self.width)
        except Exception as exc:  # any undecodable bytes: counted, the stream goes on
            self._refuse(f"a camera frame that is not an image ({type(exc).__name__})")
            return None

    def take(self, n: int) -> Optional[np.ndarray]:
        out: list[np.ndarray] = []
        with self._cond:
            if self._queue.maxlen < 2 * n:  # room for a whole chunk (long chunks need more than 3 s)
                self._queue = deque(self._queue, maxlen=2 * n)
        while len(out) < n:
            with self._cond:
                while len(self._queue) < n - len(out):
                    if self.stopped() or time.monotonic() - self._last > self.wait_s:
                        return None
                    self._cond.wait(timeout=0.05)
                    self.check()  # ComfyUI's Cancel while the camera is slow
                want = n - len(out)
                self.skipped += len(self._queue) - want  # older than the newest `want`: live, not late
                batch = list(self._queue)[-want:]
                self._queue.clear()
            out += [f for f in map(self._decode, batch) if f is not None]
        return np.stack(out)

    def close(self) -> None:
        with self._cond:
            self._queue.clear()
            self._cond.notify_all()


def frames_per_chunk(chunk_frames: int, first: bool, time_factor: int) -> int:
    """Pixel frames that make `chunk_frames` latent frames: 1 + 4(f - 1) for the first chunk, 4f after."""
    return 1 + time_factor * (chunk_frames - 1) if first else time_factor * chunk_frames


__all__ = ["CameraSource", "FrameSource", "VideoFileSource", "WorldSource", "fit", "frames_per_chunk"]
