"""ComfyUI's VIDEO type (comfy_api: LoadVideo, CreateVideo, SaveVideo) in and out of this pack's nodes.

In: frames are read from the VIDEO's file as a stream (PyAV), never all at once, when it has one (LoadVideo's
VideoFromFile); a VIDEO made from components (CreateVideo) already holds its frames. Out: a saved MP4 as a
VideoFromFile. ComfyUI before 2025 has no comfy_api: VIDEO outputs are None there.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

from ..causvid_core.live.sources import _IterSource


def stream_source(video: Any):
    """The file (path or BytesIO) behind a VIDEO, or None when it has none."""
    get = getattr(video, "get_stream_source", None)
    if get is not None:
        return get()
    return getattr(video, "_VideoFromFile__file", None)  # comfy_api before get_stream_source


def iter_frames(video: Any) -> Iterator[np.ndarray]:
    """uint8 frames [H, W, 3] of a VIDEO, one at a time."""
    if not hasattr(video, "get_components"):
        raise ValueError(f"video must be ComfyUI's VIDEO (LoadVideo, CreateVideo), got {type(video).__name__}")
    source = stream_source(video)
    if source is not None:
        import av

        if hasattr(source, "seek"):
            source.seek(0)
        with av.open(source) as container:
            for frame in container.decode(video=0):
                yield frame.to_ndarray(format="rgb24")
        return
    images = video.get_components().images  # [T, H, W, 3] float in 0..1
    for f in images:
        yield (f.clamp(0, 1) * 255).round().byte().cpu().numpy()


def read_frames(video: Any, limit: Optional[int] = None) -> np.ndarray:
    out = []
    for f in iter_frames(video):
        out.append(f)
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise ValueError("the VIDEO has no frames")
    return np.stack(out)


class VideoInputSource(_IterSource):
    """A live stream's input from a VIDEO, read as it plays and started again at its end."""

    kind = "video"

    def __init__(self, video: Any, height: int, width: int):
        self.video = video
        if next(iter_frames(video), None) is None:
            raise ValueError("the VIDEO has no frames")
        super().__init__(self._loop(), height, width)

    def _loop(self) -> Iterator[np.ndarray]:
        while True:
            yield from iter_frames(self.video)


def video_output(path: Path) -> Any:
    """A saved MP4 as ComfyUI's VIDEO (VideoFromFile), or None where ComfyUI has no VIDEO type."""
    for module in ("comfy_api.latest", "comfy_api.input_impl"):
        try:
            mod = __import__(module, fromlist=["InputImpl", "VideoFromFile"])
        except ImportError:
            continue
        impl = getattr(mod, "InputImpl", mod)
        cls = getattr(impl, "VideoFromFile", None)
        if cls is not None:
            return cls(str(path))
    return None
