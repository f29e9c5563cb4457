"""Video and image files through PyAV / Pillow: MP4 writing (atomic: a .part file renamed at the end), reading.

Frames are uint8 [T, H, W, 3] numpy arrays or float tensors [3, T, H, W] in [-1, 1] (`to_uint8`).
"""
from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import torch
from torch import Tensor

FPS = 16


def frames_uint8(frames: Tensor) -> Tensor:
    """[3, T, H, W] (or [B=1, 3, T, H, W]) in [-1, 1] -> uint8 [T, H, W, 3] on the same device."""
    if frames.dim() == 5:
        frames = frames[0]
    x = ((frames.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(1, 2, 3, 0)


def to_uint8(frames: Tensor) -> np.ndarray:
    """[3, T, H, W] (or [B=1, 3, T, H, W]) in [-1, 1] -> uint8 [T, H, W, 3] numpy (the one copy to the host)."""
    return frames_uint8(frames).cpu().numpy()


def from_uint8(frames: np.ndarray) -> Tensor:
    """uint8 [T, H, W, 3] -> [1, 3, T, H, W] float in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).float() / 127.5 - 1.0
    return x.permute(3, 0, 1, 2).unsqueeze(0)


class Mp4Writer:
    """Writes frames as they come; the file appears under its name only once it is complete."""

    def __init__(self, path: str | os.PathLike, fps: int = FPS, crf: int = 18):
        import av

        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(self.path.name + ".part")
        self.container = av.open(str(self._tmp), mode="w", format="mp4")
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
        self.stream = self.container.add_stream(codec, rate=Fraction(fps, 1))
        self.stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            self.stream.options = {"crf": str(crf), "preset": "veryfast"}
        self.frames = 0

    def write(self, frames: np.ndarray) -> None:
        import av

        if self.frames == 0:
            self.stream.height, self.stream.width = frames.shape[1], frames.shape[2]
        for f in frames:
            for packet in self.stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                self.container.mux(packet)
        self.frames += len(frames)

    def close(self) -> None:
        for packet in self.stream.encode():
            self.container.mux(packet)
        self.container.close()
        os.replace(self._tmp, self.path)  # atomic: never a half-written file at the final name

    def __enter__(self) -> "Mp4Writer":
        return self

    def abort(self) -> None:
        """Drop a half-written file (an error or an interruption mid-video)."""
        try:
            self.container.close()
        except Exception:
            pass
        if self._tmp.exists():
            self._tmp.unlink()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_mp4(path: str | os.PathLike, frames: np.ndarray | Iterable[np.ndarray], fps: int = FPS) -> int:
    with Mp4Writer(path, fps) as w:
        for chunk in ([frames] if isinstance(frames, np.ndarray) else frames):
            w.write(chunk)
        return w.frames


def read_video(path: str | os.PathLike, max_frames: Optional[int] = None) -> np.ndarray:
    """uint8 [T, H, W, 3] from any video file PyAV reads."""
    import av

    if not Path(path).exists():
        raise FileNotFoundError(f"{path}: no such video file")
    out = []
    with av.open(str(path)) as c:
        for frame in c.decode(video=0):
            out.append(frame.to_ndarray(format="rgb24"))
            if max_frames is not None and len(out) >= max_frames:
                break
    if not out:
        raise ValueError(f"{path}: no video frames could be decoded")
    return np.stack(out)


def read_image(path: str | os.PathLike) -> np.ndarray:
    """uint8 [H, W, 3] from a PNG/JPEG/... file."""
    from PIL import Image

    if not Path(path).exists():
        raise FileNotFoundError(f"{path}: no such image file")
    return np.asarray(Image.open(path).convert("RGB"))
