"""VideoToVideoStream, CausalGenerate (one node), CausalDecodeStream, SaveCausalVideo (MP4 via PyAV)."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..causvid_core.flow import STEP_PRESETS
from ..causvid_core.generate import latent_frames
from ..causvid_core.vae import StreamingDecoder, StreamingEncoder, decode_memory
from ..causvid_core.video_io import Mp4Writer
from . import host
from .stream_nodes import MODEL_DEFAULT, CausalKVState, StreamChunkSampler
from .types import (CausalModel, bind_comfy_vae, causal_vae_from_comfy, conditioning_tensor, frames_to_host, images_to_video,
                    latent_in, latent_out, require, uint8_to_images)

CATEGORY = "causvid/stream"


class VideoToVideoStream:
    DESCRIPTION = ("Restyle a video chunk by chunk: each input chunk is encoded by the streaming VAE encoder, "
                   "noised to `strength` and denoised under the prompt. Frames come out as they are made.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE", "LATENT")
    RETURN_NAMES = ("images", "latent")
    FUNCTION = "restyle"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("CAUSAL_MODEL",),
            "conditioning": ("CONDITIONING",),
            "strength": ("FLOAT", {"default": 0.6, "min": 0.05, "max": 1.0, "step": 0.05,
                                   "tooltip": "1 ignores the input; lower keeps more of it"}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF}),
            "steps": ([MODEL_DEFAULT] + sorted(STEP_PRESETS), {"default": MODEL_DEFAULT}),
        }, "optional": {"images": ("IMAGE",), "video": ("VIDEO", {"tooltip": "instead of images: ComfyUI's "
                                                                             "VIDEO (LoadVideo), trimmed to 4k+1 frames"}),
                        "vae": ("VAE",)}}

    def restyle(self, model, conditioning, strength, seed, steps, images=None, vae=None, video=None):
        model = require(model, CausalModel, "model", "connect LoadCausalModel")
        if (images is None) == (video is None):
            raise ValueError("connect either images (IMAGE) or video (VIDEO) to restyle")
        if video is not None:
            from .video_types import read_frames

            frames = read_frames(video)
            frames = frames[:4 * ((len(frames) - 1) // 4) + 1]  # the causal VAE's 4k+1 frames
            images = torch.from_numpy(frames).float().div_(255.0)
        if images.dim() != 4 or images.shape[0] == 0:
            raise ValueError(f"the images input is empty ({tuple(images.shape)}): connect frames to restyle")
        T, H, W = images.shape[0], images.shape[1], images.shape[2]
        if (T - 1) % 4:
            raise ValueError(f"video-to-video needs 4k+1 frames (…, 33, 81), got {T}: trim the input "
                             f"to {4 * ((T - 1) // 4) + 1} frames")
        (state,) = CausalKVState().create(model, W, H, T, seed, vae)
        state.load()
        stream = state.stream
        if steps != MODEL_DEFAULT:
            stream.set_steps(steps)
        stream.set_prompt(conditioning_tensor(conditioning))
        encoder = StreamingEncoder(stream.vae)
        tf = stream.vae.config.time_factor
        dev, out_dev = stream.vae_device, host.intermediate_device()  # the encoder runs where the VAE is
        F = latent_frames(T, tf)
        n_chunks = -(-F // stream.settings.chunk_frames)
        progress = host.Progress(n_chunks * (sum(1 for t in stream.settings.steps if t < 1000 * strength) + 1),
                                 wan_latents=state.comfy_vae is not None)
        lat, out, pix = [], [], 0
        while stream.frame < F:
            f = min(stream.settings.chunk_size(stream.chunk_index), F - stream.frame)
            n_pix = 1 + tf * (f - 1) if stream.frame == 0 else tf * f
            # the input goes to the device a chunk at a time
            z = encoder.encode(images_to_video(images[pix:pix + n_pix]).to(dev))
            chunk = stream.step(v2v_latents=z, strength=strength,
                                callback=lambda _i, x0: (host.check_interrupt(), progress.denoised(x0)))
            lat.append(chunk.latents.to(out_dev))
            out.append(frames_to_host(chunk.frames, out_dev))
            progress.preview(out[-1][-1])
            pix += n_pix
        return uint8_to_images(out), latent_out(torch.cat(lat, 2), stream.vae, out_dev)


class CausalGenerate:
    DESCRIPTION = "Text to video in one node: a fresh stream run to the end (the simple graph)."
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE", "LATENT")
    RETURN_NAMES = ("images", "latent")
    FUNCTION = "generate"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("CAUSAL_MODEL",),
            "conditioning": ("CONDITIONING",),
            "width": ("INT", {"default": 64, "min": 16, "max": 4096, "step": 16}),
            "height": ("INT", {"default": 64, "min": 16, "max": 4096, "step": 16}),
            "length": ("INT", {"default": 33, "min": 1, "max": 100001, "step": 4}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF}),
            "steps": ([MODEL_DEFAULT] + sorted(STEP_PRESETS), {"default": MODEL_DEFAULT}),
        }, "optional": {"vae": ("VAE",)}}

    def generate(self, model, conditioning, width, height, length, seed, steps, vae=None):
        (state,) = CausalKVState().create(model, width, height, length, seed, vae)
        _, latent, images = StreamChunkSampler().sample(state, 100000, steps, conditioning=conditioning)
        return images, latent


class CausalDecodeStream:
    DESCRIPTION = "Decode a LATENT chunk by chunk with the streaming VAE decoder (flat memory for long videos)."
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "decode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"latent": ("LATENT",),
                             "latents_per_chunk": ("INT", {"default": 3, "min": 1, "max": 64})},
                "optional": {"model": ("CAUSAL_MODEL",), "vae": ("VAE",)}}

    def decode(self, latent, latents_per_chunk, model=None, vae=None):
        if vae is not None:
            causal_vae, patcher = causal_vae_from_comfy(vae)
        elif model is not None and require(model, CausalModel, "model", "connect LoadCausalModel").components.vae:
            causal_vae, patcher = model.components.vae, model.vae_patcher
        else:
            raise ValueError("connect ComfyUI's Wan VAE or a CAUSAL_MODEL that has its own VAE")
        z = latent_in(latent, causal_vae)
        host.load([patcher], decode_memory(causal_vae, tuple(z.shape[-2:])))
        if vae is not None:
            bind_comfy_vae(causal_vae, vae)
        weight = next(causal_vae.parameters())
        dec = StreamingDecoder(causal_vae)
        n, out_dev = z.shape[2], host.intermediate_device()
        progress = host.Progress(-(-n // latents_per_chunk))
        out = []
        for s in range(0, n, latents_per_chunk):
            host.check_interrupt()
            # one chunk of latents to the device, its frames back as uint8
            out.append(frames_to_host(dec.decode(z[:, :, s:s + latents_per_chunk].to(weight.device, weight.dtype)),
                                      out_dev))
            progress.step()
        return (uint8_to_images(out),)


class SaveCausalVideo:
    DESCRIPTION = ("Save frames as an H.264 MP4 (PyAV) in ComfyUI's output folder and play it in the node; its VIDEO "
                   "output is the saved file (for ComfyUI's video nodes; None in ComfyUI before 2025).")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("VIDEO",)
    RETURN_NAMES = ("video",)
    OUTPUT_NODE = True
    FUNCTION = "save"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",),
                             "fps": ("INT", {"default": 16, "min": 1, "max": 120}),
                             "filename_prefix": ("STRING", {"default": "causvid"})}}

    def save(self, images, fps, filename_prefix):
        if images.dim() != 4 or images.shape[0] == 0:
            raise ValueError(f"the images input is empty ({tuple(images.shape)}): there is nothing to save")
        out_dir = Path(host.output_directory())
        sub = os.path.dirname(filename_prefix)
        prefix = os.path.basename(filename_prefix) or "causvid"
        folder = (out_dir / sub).resolve()
        if out_dir.resolve() not in (folder, *folder.parents):
            raise ValueError(f"filename_prefix {filename_prefix!r} points outside the output folder")
        folder.mkdir(parents=True, exist_ok=True)
        n = 1 + max([int(p.stem.rsplit("_", 1)[-1]) for p in folder.glob(f"{prefix}_*.mp4")
                     if p.stem.rsplit("_", 1)[-1].isdigit()] or [0])
        name = f"{prefix}_{n:05d}.mp4"
        frames = (images.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
        with Mp4Writer(folder / name, fps=fps) as w:
            w.write(frames)
        item = {"filename": name, "subfolder": sub, "type": "output", "format": "video/mp4",
                "frames": int(frames.shape[0]), "fps": fps}
        from .video_types import video_output

        return {"ui": {"causvid_videos": [item]}, "result": (video_output(folder / name),)}
