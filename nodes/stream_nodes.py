"""CausalKVState, StreamChunkSampler, CausalImageToVideo, PromptSchedule: a stream as a chain of nodes.

Chaining N StreamChunkSamplers equals one sampler of N chunks exactly: noise comes from (seed, chunk,
step), and each node advances a clone of its input state."""
from __future__ import annotations

from dataclasses import replace

import torch

from ..causvid_core.flow import STEP_PRESETS
from ..causvid_core.generate import latent_frames
from ..causvid_core.schedule import SWITCH_MODES, PromptEvent, ScheduleError, parse_schedule, snap_schedule
from ..causvid_core.stream import CausalStream, StreamSettings
from . import host
from .model_nodes import prompt_warnings
from .types import (CausalModel, PromptScheduleValue, StreamState, causal_vae_from_comfy, conditioning_tensor,
                    frames_to_host, images_to_video, latent_out, require, uint8_to_images)

CATEGORY = "causvid/stream"
MODEL_DEFAULT = "model default"


class CausalKVState:
    DESCRIPTION = ("A fresh stream: size, length (or endless with the model's rolling window), seed. "
                   "Connect ComfyUI's Wan VAE to decode with it; otherwise the model's own VAE is used.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("CAUSAL_KV_STATE",)
    RETURN_NAMES = ("state",)
    FUNCTION = "create"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("CAUSAL_MODEL",),
            "width": ("INT", {"default": 64, "min": 16, "max": 4096, "step": 16}),
            "height": ("INT", {"default": 64, "min": 16, "max": 4096, "step": 16}),
            "length": ("INT", {"default": 81, "min": 0, "max": 100001, "step": 4,
                               "tooltip": "pixel frames, 4k+1 (81 = 5 s); 0 = endless (needs a window)"}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF}),
        }, "optional": {"vae": ("VAE",)}}

    def create(self, model, width, height, length, seed, vae=None):
        model = require(model, CausalModel, "model", "connect LoadCausalModel")
        if vae is not None:
            causal_vae, vae_patcher = causal_vae_from_comfy(vae)
        else:
            causal_vae, vae_patcher = model.components.vae, model.vae_patcher
        if causal_vae is None:
            raise ValueError("this model has no VAE of its own: connect ComfyUI's VAELoader with wan_2.1_vae.safetensors")
        fields = dict(model.settings, seed=seed)
        if length:
            fields["max_frames"] = latent_frames(length, causal_vae.config.time_factor)
        elif not fields.get("window_frames") and not fields.get("kv_recompute_frames"):
            raise ValueError("length 0 means an endless stream: set window_frames on LoadCausalModel "
                             "(e.g. 12 with 3 sink frames for LongLive; the built-in model brings its own, 9)")
        sf = causal_vae.config.space_factor
        mult = sf * model.model.config.patch_size[1]
        if width % mult or height % mult:
            raise ValueError(f"width and height must be multiples of {mult}, got {width}x{height}")
        settings = StreamSettings.from_fields(fields)
        # the device ComfyUI runs the model on (its weights may still be offloaded); the KV cache is
        # allocated there at the first chunk, the journal of clean latents stays on the host
        stream = CausalStream(model.model, settings, latent_hw=(height // sf, width // sf), vae=causal_vae,
                              text_encoder=model.components.text_encoder, device=host.torch_device(),
                              journal=True, journal_device=host.intermediate_device())
        return (StreamState(stream, model, vae_patcher=vae_patcher, comfy_vae=vae),)


class CausalImageToVideo:
    DESCRIPTION = "Start a fresh stream from an image (its first frame): the video begins with it."
    CATEGORY = CATEGORY
    RETURN_TYPES = ("CAUSAL_KV_STATE",)
    RETURN_NAMES = ("state",)
    FUNCTION = "seed_image"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"state": ("CAUSAL_KV_STATE",), "image": ("IMAGE",)}}

    def seed_image(self, state, image):
        state = require(state, StreamState, "state", "connect CausalKVState")
        if state.stream.frame != 0:
            raise ValueError("image-to-video needs a fresh state (straight from CausalKVState)")
        H, W = state.stream.latent_hw
        sf = state.stream.vae.config.space_factor
        if tuple(image.shape[1:3]) != (H * sf, W * sf):
            raise ValueError(f"the image is {image.shape[2]}x{image.shape[1]}, the stream {W * sf}x{H * sf}: "
                             "resize it (ImageScale) or change the state's size")
        return (state.advanced(state.stream, pending_image=images_to_video(image[:1])[:, :, 0].to(state.stream.device)),)


class PromptSchedule:
    DESCRIPTION = ("Prompts that change over time: one line per change, 'FRAME: prompt' in pixel frames (16 per "
                   "second), snapped to chunk starts. cut: new text at once; recache: re-encode the recent frames "
                   "under the new text (LongLive); blend: move between the texts over blend_chunks chunks.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("PROMPT_SCHEDULE",)
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "schedule": ("STRING", {"multiline": True, "default":
                                    "0: a red circle moving right on a black background\n"
                                    "45: a blue circle moving right on a black background"}),
            "mode": (list(SWITCH_MODES), {"default": "recache"}),
            "blend_chunks": ("INT", {"default": 2, "min": 1, "max": 64}),
        }, "optional": {"clip": ("CLIP",), "model": ("CAUSAL_MODEL",)}}

    def build(self, schedule, mode, blend_chunks, clip=None, model=None):
        events = parse_schedule(schedule)
        if clip is not None:
            def encode(text):
                return clip.encode_from_tokens(clip.tokenize(text))
        elif model is not None:
            enc = require(model, CausalModel, "model", "connect LoadCausalModel").components.text_encoder
            if enc is None:
                raise ValueError("this model has no text encoder of its own: connect a CLIP (Wan umT5) instead")

            def encode(text):
                for w in prompt_warnings(enc, [text]):
                    print(f"[causvid] {w}")
                with torch.no_grad():
                    return enc.encode([text]).cpu()
        else:
            raise ValueError("connect a CLIP (ComfyUI's Wan umT5 text encoder) or the CAUSAL_MODEL "
                             "(its built-in text encoder) to encode the prompts")
        return (PromptScheduleValue(tuple((e.frame, e.prompt, encode(e.prompt)) for e in events), mode, blend_chunks),)


class StreamChunkSampler:
    DESCRIPTION = ("Advance a stream by N chunks (3 latent frames = 12 video frames each) with a few-step causal "
                   "sampler; outputs the new state, these chunks' LATENT and their decoded frames.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("CAUSAL_KV_STATE", "LATENT", "IMAGE")
    RETURN_NAMES = ("state", "latent", "images")
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "state": ("CAUSAL_KV_STATE",),
            "chunks": ("INT", {"default": 3, "min": 1, "max": 100000}),
            "steps": ([MODEL_DEFAULT] + sorted(STEP_PRESETS), {"default": MODEL_DEFAULT}),
        }, "optional": {"conditioning": ("CONDITIONING",), "prompt_schedule": ("PROMPT_SCHEDULE",)}}

    def sample(self, state, chunks, steps, conditioning=None, prompt_schedule=None):
        state = require(state, StreamState, "state", "connect CausalKVState or another StreamChunkSampler")
        state.load()
        # a continuation that takes over the input's device buffers; the input state itself is never
        # advanced (ComfyUI caches and shares it) and rebuilds its buffers if it is used again
        stream = state.stream.fork()
        if steps != MODEL_DEFAULT:
            stream.set_steps(steps)
        plan = _prompt_plan(stream, chunks, conditioning, prompt_schedule)
        settings = stream.settings
        if settings.max_frames is not None:  # a length (with or without a rolling window) ends the stream
            remaining = -(-(settings.max_frames - stream.frame) // settings.chunk_frames)
            if remaining <= 0:
                raise ValueError(f"the stream is complete ({settings.max_frames} latent frames); "
                                 "start a new CausalKVState or raise its length")
            chunks = min(chunks, remaining)
        progress = host.Progress(sum(len(settings.steps_for(stream.chunk_index + i)) for i in range(chunks)),
                                 wan_latents=state.comfy_vae is not None)
        out = host.intermediate_device()
        latents, frames = [], []
        pending = state.pending_image
        try:
            for i in range(chunks):
                if stream.chunk_index in plan:
                    text_or_cond, mode = plan[stream.chunk_index]
                    stream.set_prompt(text_or_cond, mode)
                if pending is not None:
                    first = stream.start_from_image(pending)
                    pending = None
                    if first is not None:
                        latents.append(first.latents.to(out))
                        frames.append(frames_to_host(first.frames, out))
                chunk = stream.step(callback=lambda _i, x0: (host.check_interrupt(), progress.denoised(x0)))
                latents.append(chunk.latents.to(out))
                frames.append(frames_to_host(chunk.frames, out))
                progress.preview(frames[-1][-1])
        finally:  # also when interrupted: the decoder cache leaves the GPU between nodes
            stream.park(host.offload_device())
        lat = torch.cat(latents, dim=2)
        return (state.advanced(stream, pending_image=None), latent_out(lat, stream.vae, out), uint8_to_images(frames))


def _prompt_plan(stream: CausalStream, chunks: int, conditioning, schedule) -> dict:
    """{chunk index: (conditioning, mode)} for the chunks this node makes."""
    if schedule is not None:
        schedule = require(schedule, PromptScheduleValue, "prompt_schedule", "connect PromptSchedule")
        stream.settings = _with_blend(stream.settings, schedule.blend_chunks)
        last = stream.chunk_index + chunks
        layout = [stream.settings.chunk_size(i) for i in range(last + 1)]
        events = [PromptEvent(f, str(i)) for i, (f, _, _) in enumerate(schedule.events)]
        by_chunk, notices = snap_schedule(events, layout, stream.vae.config.time_factor)
        for n in notices:
            print(f"[causvid] {n}")
        plan = {}
        # the prompt in force at this node's first chunk, then every switch inside its range
        start = stream.chunk_index
        current = max((c for c in by_chunk if c <= start), default=0)
        plan[start] = (schedule.events[int(by_chunk[current])][2], "cut" if stream.context is None else schedule.mode)
        for c, idx in by_chunk.items():
            if start < c < last:
                plan[c] = (schedule.events[int(idx)][2], schedule.mode)
        if stream.context is not None and current < start and _same(stream, plan[start][0]):
            del plan[start]  # continuing under the same prompt: nothing to switch
        return plan
    if conditioning is None:
        if stream.context is None:
            raise ValueError("connect a conditioning (CLIPTextEncode / CausalTextEncode) or a prompt_schedule")
        return {}
    cond = conditioning_tensor(conditioning)
    if stream.context is not None and _same(stream, cond):
        return {}
    return {stream.chunk_index: (cond, "cut")}


def _same(stream: CausalStream, cond: torch.Tensor) -> bool:
    """Whether a conditioning is the stream's current one, compared with the tensor the stream was given
    (on ComfyUI's intermediate device), never with the copy on the model's device: ComfyUI hands the same
    object down a chain, and another object is compared by value on the host."""
    source = stream.prompt_source
    if source is cond:
        return True
    return (isinstance(source, torch.Tensor) and source.shape == cond.shape and source.device == cond.device
            and torch.equal(source, cond))


def _with_blend(settings: StreamSettings, blend_chunks: int) -> StreamSettings:
    return replace(settings, blend_chunks=blend_chunks)
