"""LiveStream: a stream made chunk after chunk until Stop, shown in the node's player as it is made, steered
by prompts typed there, recorded as it goes (causvid_core/live; the routes are host.live_hub's)."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..causvid_core.live.recorder import SegmentRecorder
from ..causvid_core.live.session import LEAD_S, LiveSession
from ..causvid_core.live.sources import CameraSource, VideoFileSource, WorldSource
from ..causvid_core.schedule import SWITCH_MODES
from ..causvid_core.video_io import FPS
from . import host
from .types import StreamState, require

CATEGORY = "causvid/stream"
SOURCES = ("text", "camera", "video file", "shapes world")
DEFAULT_PROMPT = "a red circle moving right on a black background"


class LiveStream:
    DESCRIPTION = ("Live: makes the stream chunk after chunk and plays it in this node while it is made, until "
                   "you press Stop (or `seconds` of video, or ComfyUI's Cancel). Type a prompt in the player to "
                   "steer it from the next chunk. source: text to video, or restyle the browser's camera, a video "
                   "file from the input folder, or a Shapes World clip. Everything shown is recorded in the output "
                   "folder (a playable MP4 at any stop) with the schedule of the prompts applied.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("VIDEO",)
    RETURN_NAMES = ("video",)
    OUTPUT_NODE = True
    FUNCTION = "run"

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        return float("nan")  # never cached: queueing it again starts a new live stream

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "state": ("CAUSAL_KV_STATE",),
            "prompt": ("STRING", {"multiline": True, "default": DEFAULT_PROMPT}),
            "mode": (list(SWITCH_MODES), {"default": "recache",
                                          "tooltip": "how a prompt typed while it plays takes over"}),
            "seconds": ("FLOAT", {"default": 600.0, "min": 0.0, "max": 86400.0, "step": 1.0,
                                  "tooltip": "seconds of video before it ends by itself; 0 = until Stop"}),
            "source": (list(SOURCES), {"default": "text"}),
            "strength": ("FLOAT", {"default": 0.6, "min": 0.05, "max": 1.0, "step": 0.05,
                                   "tooltip": "video-to-video: 1 ignores the input; lower keeps more of it"}),
            "source_input": ("STRING", {"default": "", "tooltip":
                                        "video file: a file in ComfyUI's input folder; shapes world: the clip's "
                                        f"prompt (default '{DEFAULT_PROMPT}')"}),
            "filename_prefix": ("STRING", {"default": "causvid_live"}),
        }, "optional": {"clip": ("CLIP",),
                        "video": ("VIDEO", {"tooltip": "source 'video file': ComfyUI's VIDEO (LoadVideo) instead of "
                                                       "source_input, read as it plays"})},
                "hidden": {"unique_id": "UNIQUE_ID"}}

    def run(self, state, prompt, mode, seconds, source, strength, source_input, filename_prefix, clip=None,
            unique_id=None, video=None):
        state = require(state, StreamState, "state", "connect CausalKVState or CausalImageToVideo")
        if source not in SOURCES:
            raise ValueError(f"source must be one of {', '.join(SOURCES)}, got {source!r}")
        if not (seconds >= 0 and seconds == seconds):
            raise ValueError(f"seconds must be 0 (until Stop) or more, got {seconds}")
        h, w = (n * state.stream.vae.config.space_factor for n in state.stream.latent_hw)
        folder = _recording_folder(filename_prefix)
        encode = _encoder(state, clip)
        hub = host.live_hub()
        state.load()
        stream = state.stream.fork()  # the input state stays as it is (ComfyUI caches it)
        holder: list[LiveSession] = []
        src = _source(source, source_input, h, w, stream.settings.seed, lambda: bool(holder) and holder[0].stopped,
                      video)
        camera = src if isinstance(src, CameraSource) else None
        session = LiveSession(stream, prompt, mode=mode, max_frames=max(1, round(seconds * FPS)) if seconds else None,
                              check=host.check_interrupt, source=src, strength=strength,
                              lead_s=None if camera else LEAD_S, encode=encode, image=state.pending_image)
        holder.append(session)
        recorder = SegmentRecorder(folder)
        sid = hub.add(session, camera=camera, node=str(unique_id) if unique_id is not None else None,
                      source="text" if src is None else src.kind, width=w, height=h, folder=str(folder))
        total = session.max_frames or 0
        progress = host.Progress(total) if total else None
        session.sinks = (recorder, hub.sink(sid)) + ((_progress_sink(progress),) if progress else ())
        error = recording = None
        try:
            session.run()
        except BaseException as exc:  # Cancel in ComfyUI, out of memory, ...: what was shown stays recorded
            error = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            stream.park(host.offload_device())
            try:
                if recorder.segments:
                    recording = recorder.finalize(session.schedule_text())
            finally:
                hub.finish(sid, str(recording) if recording else None, error)
        if recording is None:
            raise ValueError("the live stream ended before its first chunk: "
                             + ("no camera frames arrived (allow the camera in the browser)" if camera
                                else "its input had too few frames"))
        out = Path(host.output_directory()).resolve()
        item = {"filename": recording.name, "subfolder": str(recording.parent.relative_to(out)), "type": "output",
                "format": "video/mp4", "frames": session.stats.frames, "fps": FPS}
        from .video_types import video_output

        return {"ui": {"causvid_videos": [item], "causvid_live": [{"session": sid, **session.stats.to_dict()}]},
                "result": (video_output(recording),)}


def _recording_folder(prefix: str) -> Path:
    """A new folder for this run's recording under ComfyUI's output folder: <prefix>_NNNNN/."""
    out = Path(host.output_directory()).resolve()
    sub, name = os.path.dirname(prefix), os.path.basename(prefix) or "causvid_live"
    parent = (out / sub).resolve()
    if out not in (parent, *parent.parents):
        raise ValueError(f"filename_prefix {prefix!r} points outside the output folder")
    parent.mkdir(parents=True, exist_ok=True)
    n = 1 + max([int(p.name.rsplit("_", 1)[-1]) for p in parent.glob(f"{name}_*")
                 if p.name.rsplit("_", 1)[-1].isdigit()] or [0])
    return parent / f"{name}_{n:05d}"


def _encoder(state: StreamState, clip):
    """text -> conditioning with ComfyUI's CLIP (then the DiT is loaded back: encoding may have evicted it),
    or None for the model's built-in encoder (the stream encodes text itself)."""
    if clip is None:
        if state.stream.text_encoder is None:
            raise ValueError("this model has no text encoder of its own: connect a CLIP (Wan umT5) to LiveStream")
        return None

    def encode(text: str) -> torch.Tensor:
        cond = clip.encode_from_tokens(clip.tokenize(text))
        state.load()
        return cond
    return encode


def _source(kind: str, value: str, h: int, w: int, seed: int, stopped, video=None):
    if kind == "text":
        return None
    if kind == "video file" and video is not None:
        from .video_types import VideoInputSource

        return VideoInputSource(video, h, w)
    if kind == "camera":
        return CameraSource(h, w, stopped=stopped, check=host.check_interrupt)
    if kind == "shapes world":
        return WorldSource(value.strip() or DEFAULT_PROMPT, h, w, seed=seed)
    if not value.strip():
        raise ValueError("source 'video file' needs source_input: the name of a video in ComfyUI's input folder")
    root = Path(host.input_directory()).resolve()
    path = (root / value.strip()).resolve()
    if root not in path.parents:
        raise ValueError(f"source_input {value!r} points outside ComfyUI's input folder")
    return VideoFileSource(path, h, w, loop=True)


def _progress_sink(progress):
    def sink(chunk) -> None:
        progress.set(min(chunk.stats.frames, progress.total))
    return sink
