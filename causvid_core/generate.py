"""Whole-video generation on top of the streaming API: validation, schedules, image-to-video,
video-to-video. The CLI and the ComfyUI nodes call these functions."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from .pipeline import Components
from .schedule import PromptEvent, chunk_starts, snap_schedule
from .stream import CausalStream, Chunk, StreamSettings, run_schedule


@dataclass
class GenerationRequest:
    prompts: Sequence[PromptEvent]  # at least one, the first at frame 0
    frames: int = 33  # pixel frames, 4k+1
    height: int = 64
    width: int = 64
    seed: int = 0
    settings: dict = field(default_factory=dict)  # StreamSettings overrides (steps, shift, window, ...)
    image: Optional[np.ndarray] = None  # uint8 [H, W, 3]: image-to-video
    video: Optional[np.ndarray] = None  # uint8 [T, H, W, 3]: video-to-video
    extend: Optional[np.ndarray] = None  # uint8 [T, H, W, 3], T = 4k+1: continue this clip to `frames`
    strength: float = 0.7  # video-to-video: how far the input is noised (1 = ignore it)


def latent_frames(pixel_frames: int, time_factor: int = 4) -> int:
    if pixel_frames < 1 or (pixel_frames - 1) % time_factor:
        k = max(0, round((pixel_frames - 1) / time_factor))
        raise ValueError(f"frames must be {time_factor}k+1 (1, 5, 9, ..., 33, ..., 81), got {pixel_frames}; "
                         f"try {time_factor * k + 1}")
    return (pixel_frames - 1) // time_factor + 1


def latent_size(components: Components, height: int, width: int) -> tuple[int, int]:
    sf = components.vae.config.space_factor
    mult = sf * components.model.config.patch_size[1]
    if height % mult or width % mult or height <= 0 or width <= 0:
        raise ValueError(f"height and width must be positive multiples of {mult}, got {height}x{width}")
    return height // sf, width // sf


def make_stream(components: Components, req: GenerationRequest) -> CausalStream:
    F = latent_frames(req.frames, components.vae.config.time_factor)
    fields = {**components.stream_defaults, **req.settings, "seed": req.seed}
    fields["max_frames"] = F  # the requested length, also with a rolling window (it must end)
    settings = StreamSettings.from_fields(fields)
    hw = latent_size(components, req.height, req.width)
    device = next(components.model.parameters()).device
    return CausalStream(components.model, settings, latent_hw=hw, vae=components.vae,
                        text_encoder=components.text_encoder, device=device)


def _layout(settings: StreamSettings, frames: int) -> list[int]:
    sizes, ci = [], 0
    while sum(sizes) < frames:
        sizes.append(min(settings.chunk_size(ci), frames - sum(sizes)))
        ci += 1
    return sizes


def generate_chunks(components: Components, req: GenerationRequest,
                    notice: Callable[[str], None] = print) -> Iterator[Chunk]:
    """Yield every chunk of the requested video, decoded, in order (context chunks included)."""
    if not req.prompts:
        raise ValueError("give a prompt")
    stream = make_stream(components, req)
    F = stream.settings.max_frames or latent_frames(req.frames)
    if sum(x is not None for x in (req.image, req.video, req.extend)) > 1:
        raise ValueError("give one of: an image (image-to-video), a video (video-to-video), a clip to extend")
    if req.extend is not None:
        yield from _extend(stream, req, F, notice)
        return
    layout = _layout(stream.settings, F)
    by_chunk, notices = snap_schedule(req.prompts, layout, components.vae.config.time_factor)
    for n in notices:
        notice(n)
    stream.set_prompt(by_chunk[0])
    if req.image is not None:
        img = _pixels(req.image[None], req.height, req.width, "image")[:, :, 0]
        first = stream.start_from_image(img)
        if first is not None:
            yield first
    if req.video is not None:
        yield from _restyle(stream, req, by_chunk)
        return
    yield from run_schedule(stream, by_chunk)


def _extend(stream: CausalStream, req: GenerationRequest, F: int, notice) -> Iterator[Chunk]:
    """Video extension: the clip's latents go into the cache at t = 0, then generation continues."""
    clip = req.extend
    L = latent_frames(len(clip), stream.vae.config.time_factor)
    if L >= F:
        raise ValueError(f"the clip to extend has {len(clip)} frames; ask for more (--frames > {len(clip)})")
    with torch.no_grad():
        latents = stream.vae.encode(_pixels(clip, req.height, req.width, "clip to extend").to(stream.device))
    # the schedule's chunk 0 is the given clip; generated chunks follow
    layout = [L] + [stream.settings.chunk_frames] * -(-(F - L) // stream.settings.chunk_frames)
    by_layout, notices = snap_schedule(req.prompts, layout, stream.vae.config.time_factor)
    for n in notices:
        notice(n)
    stream.set_prompt(by_layout[0])
    yield stream.add_context(latents)
    yield from run_schedule(stream, {c - 1: p for c, p in by_layout.items() if c > 0})


def _pixels(frames: np.ndarray, height: int, width: int, what: str) -> Tensor:
    """uint8 [T, H, W, 3] -> [1, 3, T, H, W] in [-1, 1], with its size checked."""
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"the {what} must be RGB frames [T, H, W, 3], got shape {frames.shape}")
    if frames.shape[1:3] != (height, width):
        raise ValueError(f"the {what} is {frames.shape[2]}x{frames.shape[1]}, the video is {width}x{height}: "
                         "resize it or pass --width/--height to match")
    from .video_io import from_uint8
    return from_uint8(frames)


def _restyle(stream: CausalStream, req: GenerationRequest, by_chunk: dict) -> Iterator[Chunk]:
    """Video-to-video, streaming: encode each input chunk, noise it to `strength`, denoise."""
    from .vae import StreamingEncoder

    video = req.video
    if len(video) != req.frames:
        raise ValueError(f"the input video has {len(video)} frames; pass --frames {len(video)} "
                         f"(a 4k+1 count) or trim it")
    encoder = StreamingEncoder(stream.vae)
    tf = stream.vae.config.time_factor
    pix = 0
    ci = 0
    while stream.frame < stream.settings.max_frames:
        f = min(stream.settings.chunk_size(ci), stream.settings.max_frames - stream.frame)
        n_pix = 1 + tf * (f - 1) if stream.frame == 0 else tf * f
        chunk_pixels = _pixels(video[pix:pix + n_pix], req.height, req.width, "video")
        latents = encoder.encode(chunk_pixels.to(stream.device))
        if ci in by_chunk and ci > 0:
            stream.set_prompt(by_chunk[ci])
        yield stream.step(v2v_latents=latents, strength=req.strength)
        pix += n_pix
        ci += 1


def generate_video(components: Components, req: GenerationRequest,
                   notice: Callable[[str], None] = print) -> np.ndarray:
    """The whole video as uint8 [T, H, W, 3]."""
    from .video_io import to_uint8
    return np.concatenate([to_uint8(c.frames) for c in generate_chunks(components, req, notice)], axis=0)
