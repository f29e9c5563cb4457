"""Recording a live stream so that it plays at any stop: every chunk becomes a complete MP4 segment
(written to a temporary name and renamed), listed in `segments.ffconcat`; `finalize()` joins them into one
MP4 beside them. After a crash (kill -9) the segments written so far all play and at most the chunk in
flight is lost; `SegmentRecorder.recover(folder)` joins them then."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np
from torch import Tensor

from ..video_io import FPS, Mp4Writer, read_video, write_mp4

LIST_NAME = "segments.ffconcat"


class SegmentRecorder:
    """A sink for LiveSession: each chunk's uint8 frames [n, H, W, 3] -> one segment file."""

    def __init__(self, folder: str | os.PathLike, fps: int = FPS, name: str = "stream.mp4"):
        self.folder, self.fps, self.name = Path(folder), fps, name
        self.folder.mkdir(parents=True, exist_ok=True)
        if any(self.folder.glob("seg_*.mp4")) or (self.folder / name).exists():
            raise FileExistsError(f"{self.folder} already holds a recording: choose an empty folder")
        self.segments: list[Path] = []
        self.frames = 0

    def __call__(self, chunk) -> None:
        """A LiveChunk from a session (or bare uint8 frames)."""
        frames = getattr(chunk, "frames", chunk)
        arr = frames.numpy() if isinstance(frames, Tensor) else np.asarray(frames)
        path = self.folder / f"seg_{len(self.segments):06d}.mp4"
        write_mp4(path, arr, fps=self.fps)  # atomic: complete or absent
        self.segments.append(path)
        self.frames += len(arr)
        self._write_list()

    def _write_list(self) -> None:
        text = "ffconcat version 1.0\n" + "".join(f"file {p.name}\n" for p in self.segments)
        tmp = self.folder / (LIST_NAME + ".part")
        tmp.write_text(text)
        os.replace(tmp, self.folder / LIST_NAME)

    def finalize(self, schedule: Optional[str] = None) -> Path:
        """Join the segments into one MP4 (and write the schedule beside it); the segments are removed."""
        return self.join(self.folder, self.segments, self.fps, self.name, schedule)

    @classmethod
    def recover(cls, folder: str | os.PathLike, fps: int = FPS, name: str = "stream.mp4") -> Path:
        """Join what a crashed session left: every complete segment, in order."""
        folder = Path(folder)
        segments = sorted(folder.glob("seg_*.mp4"))
        if not segments:
            raise FileNotFoundError(f"{folder}: no recorded segments")
        return cls.join(folder, segments, fps, name, None)

    @staticmethod
    def join(folder: Path, segments: list[Path], fps: int, name: str, schedule: Optional[str]) -> Path:
        out = folder / name
        with Mp4Writer(out, fps=fps) as writer:
            for seg in segments:
                writer.write(read_video(seg))
        if schedule is not None:
            tmp = folder / (Path(name).stem + ".schedule.txt.part")
            tmp.write_text(schedule)
            os.replace(tmp, folder / (Path(name).stem + ".schedule.txt"))
        for seg in segments:
            seg.unlink()
        (folder / LIST_NAME).unlink(missing_ok=True)
        return out
