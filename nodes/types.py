"""The objects that travel between this pack's nodes, and conversions to and from ComfyUI's types.

ComfyUI passes outputs by reference to every consumer and keeps them in its cache, so nothing here is
ever changed after it is made: a node that advances a stream works on `state.stream.clone()` and
returns a new state. That makes re-running a node reproduce its result, and lets an interrupted run
leave every earlier state as it was.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from ..causvid_core.pipeline import Components
from ..causvid_core.stream import CausalStream


@dataclass(frozen=True)
class CausalModel:
    """CAUSAL_MODEL: the DiT, the stream settings it runs with, and (for the built-in model or an
    exported checkpoint) its own VAE and text encoder."""
    components: Components
    settings: dict  # StreamSettings fields: steps, shift, chunk_frames, window_frames, sink_frames, ...
    name: str = ""

    @property
    def model(self):
        return self.components.model


@dataclass(frozen=True)
class StreamState:
    """CAUSAL_KV_STATE: a stream at a chunk boundary. `stream` must never be advanced in place."""
    stream: CausalStream
    model: CausalModel
    pending_image: Optional[Tensor] = None  # image-to-video, applied once the first prompt is known
    prompt_events: tuple = ()  # the schedule applied so far (for display)

    def advanced(self, stream: CausalStream, **changes) -> "StreamState":
        return replace(self, stream=stream, **changes)


@dataclass(frozen=True)
class PromptScheduleValue:
    """PROMPT_SCHEDULE: prompts by pixel frame, each already encoded, and how to switch between them."""
    events: tuple  # ((frame, text, conditioning [1, L, D]), ...), the first at frame 0
    mode: str = "cut"
    blend_chunks: int = 2


def require(obj: Any, cls: type, what: str, hint: str) -> Any:
    """Custom sockets accept anything a workflow file puts there: check and say what to connect."""
    if not isinstance(obj, cls):
        raise ValueError(f"{what} must be a {cls.__name__} ({hint}), got {type(obj).__name__}")
    return obj


def conditioning_tensor(conditioning: Any) -> Tensor:
    """ComfyUI CONDITIONING [[tensor [1, L, D], {...}], ...] -> [1, L, D] (the first entry)."""
    hint = ("conditioning must come from a text-encode node (CLIPTextEncode with the Wan umT5 encoder, or "
            "CausalTextEncode)")
    try:
        cond = conditioning[0][0]
    except (TypeError, IndexError, KeyError):
        raise ValueError(hint) from None
    if not isinstance(cond, Tensor) or cond.dim() != 3:
        raise ValueError(f"{hint}; got {type(conditioning).__name__}")
    return cond


def to_conditioning(cond: Tensor) -> list:
    return [[cond, {}]]


def images_to_video(images: Tensor) -> Tensor:
    """IMAGE [T, H, W, 3] in 0..1 -> [1, 3, T, H, W] in [-1, 1]."""
    if images.dim() != 4 or images.shape[-1] != 3:
        raise ValueError(f"IMAGE must be [frames, height, width, 3], got {tuple(images.shape)}")
    return images.permute(3, 0, 1, 2).unsqueeze(0).float() * 2 - 1


def video_to_images(video: Tensor) -> Tensor:
    """[1, 3, T, H, W] in [-1, 1] -> IMAGE [T, H, W, 3] in 0..1."""
    return ((video[0].float().clamp(-1, 1) + 1) / 2).permute(1, 2, 3, 0).contiguous()


def latent_out(latents: Tensor, vae) -> dict:
    """Our normalised latents -> ComfyUI LATENT in raw VAE space (z * std + mean), as ComfyUI's Wan uses."""
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latent_mean, dtype=latents.dtype).view(shape)
    std = torch.tensor(vae.config.latent_std, dtype=latents.dtype).view(shape)
    return {"samples": latents.float().cpu() * std + mean}


def latent_in(latent: dict, vae) -> Tensor:
    samples = latent["samples"]
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latent_mean, dtype=samples.dtype).view(shape)
    std = torch.tensor(vae.config.latent_std, dtype=samples.dtype).view(shape)
    return (samples - mean) / std


def causal_vae_from_comfy(vae: Any):
    """ComfyUI's VAE object (VAELoader with wan_2.1_vae.safetensors) -> our streaming WanVAE, same weights."""
    from ..causvid_core.checkpoints import CheckpointError, check_keys
    from ..causvid_core.vae import WanVAE, infer_vae_config, normalize_vae_keys

    inner = getattr(vae, "first_stage_model", None)
    if inner is None:
        raise ValueError("the VAE input must come from ComfyUI's VAELoader (a Wan 2.1 VAE)")
    sd = normalize_vae_keys({k: v for k, v in inner.state_dict().items()})
    try:
        cfg = infer_vae_config(sd)
    except CheckpointError as exc:
        raise ValueError(f"this VAE is not a Wan 2.1 VAE: {exc}") from exc
    with torch.device("meta"):
        ours = WanVAE(cfg)
    check_keys(ours, sd, "VAE input")
    ours.load_state_dict(sd, assign=True)
    return ours.float().eval()
