"""The objects that travel between this pack's nodes, and conversions to and from ComfyUI's types.

ComfyUI passes outputs by reference to every consumer and keeps them in its cache, so a state never
changes after it is made: a node that advances a stream works on `state.stream.fork()` and returns a new
state. The fork takes over the device buffers (KV cache, decoder cache) instead of copying them, so a
chain of samplers holds one KV cache; an earlier state that is used again (a re-run of a later node, a
branch) rebuilds its buffers from its journal first, with the same numbers (causvid_core/stream.py).
That makes re-running a node reproduce its result, and lets an interrupted run leave every earlier
state as it was.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from ..causvid_core.pipeline import Components
from ..causvid_core.stream import CausalStream
from ..causvid_core.validate import all_finite
from ..causvid_core.video_io import frames_uint8


@dataclass(frozen=True)
class CausalModel:
    """CAUSAL_MODEL: the DiT, the stream settings it runs with, and (for the built-in model or an
    exported checkpoint) its own VAE and text encoder. `patcher` / `vae_patcher`: ComfyUI's ModelPatchers
    of the DiT and of its own VAE, through which ComfyUI loads and offloads them."""
    components: Components
    settings: dict  # StreamSettings fields: steps, shift, chunk_frames, window_frames, sink_frames, ...
    name: str = ""
    patcher: Any = None
    vae_patcher: Any = None

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
    vae_patcher: Any = None  # the patcher of the VAE this stream decodes with (ComfyUI's or the model's)
    comfy_vae: Any = None  # ComfyUI's VAE object when the stream decodes with it

    def load(self) -> None:
        """Have ComfyUI load the DiT, the VAE and this stream's KV cache for its next chunks (host.load).

        The KV cache is a model to ComfyUI too: one ModelPatcher per stream lineage (forks share the
        buffers, so they share it), made on the offload device with untouched pages and moved to the GPU
        with the weights. When another workflow needs the memory, ComfyUI offloads it like any model
        (to host memory, contents kept) and the next sampler loads it back."""
        from . import host

        store = self.stream.cache.store
        if store.k is None:
            store.allocate(device=host.offload_device(), zero=False)
        if getattr(store, "patcher", None) is None:
            store.patcher = host.model_patcher(store.module)
        host.load((*self.patchers, store.patcher), self.stream.memory_needed())
        if self.comfy_vae is not None:
            bind_comfy_vae(self.stream.vae, self.comfy_vae)

    def advanced(self, stream: CausalStream, **changes) -> "StreamState":
        return replace(self, stream=stream, **changes)

    @property
    def patchers(self) -> tuple:
        return (self.model.patcher, self.vae_patcher)


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
    if cond.numel() == 0 or not all_finite(cond):
        raise ValueError("the conditioning is empty or holds NaN/Inf: check the text encoder and what feeds it")
    return cond


def to_conditioning(cond: Tensor) -> list:
    return [[cond, {}]]


def images_to_video(images: Tensor) -> Tensor:
    """IMAGE [T, H, W, 3] in 0..1 -> [1, 3, T, H, W] in [-1, 1]."""
    if images.dim() != 4 or images.shape[-1] != 3:
        raise ValueError(f"IMAGE must be [frames, height, width, 3], got {tuple(images.shape)}")
    if images.shape[0] == 0 or images.shape[1] == 0 or images.shape[2] == 0:
        raise ValueError(f"the IMAGE input is empty ({tuple(images.shape)}): connect a node that gives frames")
    if not all_finite(images):
        raise ValueError("the IMAGE input holds NaN/Inf values: check the node that made it")
    return images.permute(3, 0, 1, 2).unsqueeze(0).float() * 2 - 1


def frames_to_host(frames: Tensor, device) -> Tensor:
    """A decoded chunk [1, 3, n, H, W] in [-1, 1] on the model's device -> uint8 [n, H, W, 3] on `device`
    (ComfyUI's intermediate device): frames leave the GPU as bytes, a quarter of float32."""
    return frames_uint8(frames).to(device)


def uint8_to_images(frames: list[Tensor]) -> Tensor:
    """uint8 chunks [n, H, W, 3] -> IMAGE [T, H, W, 3] float32 in 0..1 (ComfyUI's IMAGE is float32)."""
    return torch.cat(frames, dim=0).float().div_(255.0)


def latent_out(latents: Tensor, vae, device="cpu") -> dict:
    """Our normalised latents -> ComfyUI LATENT in raw VAE space (z * std + mean), as ComfyUI's Wan uses,
    float32 on `device` (ComfyUI's intermediate device)."""
    samples = latents.to(device, torch.float32)
    mean, std = vae.latent_stats(samples)
    return {"samples": samples * std + mean}


def latent_in(latent: dict, vae) -> Tensor:
    samples = latent["samples"]
    mean, std = vae.latent_stats(samples)
    return (samples - mean) / std


def causal_vae_from_comfy(vae: Any):
    """ComfyUI's VAE object (VAELoader with wan_2.1_vae.safetensors) -> (our streaming WanVAE, its patcher).

    Ours holds the very Parameter objects of ComfyUI's module (no copy): when ComfyUI loads the VAE to
    its device through the patcher, or offloads it, ours moves with it (ComfyUI moves weights with
    Module.to, which keeps the Parameter objects). The Wan VAE has no buffers."""
    from ..causvid_core.checkpoints import CheckpointError, check_keys
    from ..causvid_core.vae import WanVAE, infer_vae_config, normalize_vae_keys

    inner = getattr(vae, "first_stage_model", None)
    if inner is None:
        raise ValueError("the VAE input must come from ComfyUI's VAELoader (a Wan 2.1 VAE)")
    sd = normalize_vae_keys(dict(inner.state_dict(keep_vars=True)))
    try:
        cfg = infer_vae_config(sd)
    except CheckpointError as exc:
        raise ValueError(f"this VAE is not a Wan 2.1 VAE: {exc}") from exc
    with torch.device("meta"):
        ours = WanVAE(cfg)
    check_keys(ours, sd, "VAE input")
    ours.load_state_dict(sd, assign=True)
    return ours.eval(), getattr(vae, "patcher", None)


def bind_comfy_vae(ours, vae: Any) -> None:
    """Point our view at the Parameters ComfyUI's VAE module holds now (after a load): a no-op where
    ComfyUI moved them in place, a re-bind where it replaced them (e.g. after applying weight patches)."""
    from ..causvid_core.vae import normalize_vae_keys

    ours.load_state_dict(normalize_vae_keys(dict(vae.first_stage_model.state_dict(keep_vars=True))), assign=True)
