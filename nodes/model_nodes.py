"""LoadCausalModel and CausalTextEncode."""
from __future__ import annotations

from pathlib import Path

import torch

from ..causvid_core.checkpoints import load_dit
from ..causvid_core.stream_presets import STREAM_PRESETS, stream_preset
from ..causvid_core.pipeline import BUILTIN_FILES, Components, builtin_available, load_components, stream_defaults_of
from . import host
from .types import CausalModel, require, to_conditioning

FROM_FILE = "from the file"
NO_LORA = "none"
DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CATEGORY = "causvid/stream"


# the stream settings a model node may override (0: the model's or the preset's own)
STREAM_WIDGETS = {
    "frames_per_chunk": ("INT", {"default": 0, "min": 0, "max": 21,
                                 "tooltip": "latent frames per chunk; 0 = the model's own (usually 3)"}),
    "window_frames": ("INT", {"default": 0, "min": 0, "max": 1024,
                              "tooltip": "rolling KV window in latent frames for endless streams; 0 = the model's "
                                         "own (built-in: 9) or, without one, keep all"}),
    "sink_frames": ("INT", {"default": 0, "min": 0, "max": 64,
                            "tooltip": "first frames never evicted from the window (LongLive: 3)"}),
}


class LoadCausalModel:
    DESCRIPTION = ("A causal Wan DiT for streaming: the built-in Shapes World model (runs on a CPU, nothing to "
                   "download), or a Wan2.1 / CausVid / Self-Forcing / LongLive file from models/diffusion_models.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("CAUSAL_MODEL",)
    RETURN_NAMES = ("model",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model_name": ([host.BUILTIN_NAME] + host.model_files(),),
            "dtype": (list(DTYPES), {"default": "auto",
                                     "tooltip": "auto: bfloat16 on a GPU that has it (else float32), float32 on the CPU"}),
            **STREAM_WIDGETS,
        }, "optional": {
            "lora_name": ([NO_LORA] + host.lora_files(), {
                "default": NO_LORA, "tooltip": "a LoRA from models/loras (LongLive's, a CausVid LoRA), merged as the "
                                               "model loads; for ComfyUI's own MODEL use LoraLoaderModelOnly"}),
            "lora_strength": ("FLOAT", {"default": 1.0, "min": -4.0, "max": 4.0, "step": 0.05}),
            "preset": ([FROM_FILE] + list(STREAM_PRESETS), {
                "default": FROM_FILE,
                "tooltip": "the model's stream settings (chunk size, steps, window, Krea's recomputation); "
                           "from the file: its metadata or its name (e.g. causal_forcing_framewise.pt)"}),
        }}

    def load(self, model_name, dtype, frames_per_chunk, window_frames, sink_frames, preset=FROM_FILE,
             lora_name=None, lora_strength=1.0):
        # weights go to ComfyUI's offload device; the samplers ask ComfyUI to load them when they run
        device, where = host.torch_device(), host.offload_device()
        dt = DTYPES[dtype] or host.model_dtype(device)
        if model_name == host.BUILTIN_NAME:
            if not builtin_available():
                raise FileNotFoundError("the built-in model files are missing from causvid_core/builtin/ "
                                        f"({', '.join(BUILTIN_FILES.values())}); reinstall the pack")
            if lora_name not in (None, NO_LORA):
                raise ValueError("the built-in model takes no LoRA: set lora_name to none")
            comps = load_components(device=where, dtype=dt)
        else:
            lora = host.lora_path(lora_name) if lora_name not in (None, NO_LORA) else None
            path = host.model_path(model_name)
            folder = Path(path).parent
            if all((folder / BUILTIN_FILES[p]).exists() for p in ("vae", "text_encoder")):
                comps = load_components(path, device=where, dtype=dt, lora=lora, lora_strength=lora_strength)
            else:  # a Wan / CausVid / Self-Forcing file: ComfyUI's VAE and text encoder come in by sockets
                # fp8 files stay fp8 (cast per layer) when the model will run on a GPU
                dit = load_dit(path, dtype=dt, device=where, keep_fp8=torch.device(device).type != "cpu", lora=lora,
                               lora_strength=lora_strength)
                comps = Components(dit, None, None, stream_defaults_of(path), path)
        settings = dict(comps.stream_defaults)
        if preset != FROM_FILE:
            settings.update(stream_preset(preset))
        if window_frames and settings.get("kv_recompute_frames"):
            raise ValueError(f"{preset if preset != FROM_FILE else model_name} rebuilds its KV cache every chunk "
                             "(Krea's recomputation) and has no window: set window_frames to 0")
        if frames_per_chunk:
            settings["chunk_frames"] = frames_per_chunk
        if window_frames:
            settings.update(window_frames=window_frames, sink_frames=sink_frames)
        vae_patcher = host.model_patcher(comps.vae) if comps.vae is not None else None
        return (CausalModel(comps, settings, model_name, host.model_patcher(comps.model), vae_patcher),)


class CausalTextEncode:
    DESCRIPTION = ("Text to CONDITIONING with the model's own text encoder (the built-in model). For real Wan "
                   "models use ComfyUI's CLIPTextEncode with the umT5 text encoder instead.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("CAUSAL_MODEL",),
                             "text": ("STRING", {"multiline": True,
                                                 "default": "a red circle moving right on a black background"})}}

    def encode(self, model, text):
        model = require(model, CausalModel, "model", "connect LoadCausalModel")
        enc = model.components.text_encoder
        if enc is None:
            raise ValueError("this model has no text encoder of its own: use CLIPTextEncode with a Wan umT5 "
                             "text encoder (models/text_encoders) instead")
        with torch.no_grad():
            cond = to_conditioning(enc.encode([text]).cpu())
        warnings = prompt_warnings(enc, [text])
        for w in warnings:
            print(f"[causvid] {w}")
        return {"ui": {"causvid_warnings": warnings}, "result": (cond,)} if warnings else (cond,)


def prompt_warnings(encoder, prompts) -> list[str]:
    """What the built-in text encoder cannot represent: empty prompts and words outside its vocabulary."""
    unknown = getattr(encoder, "unknown_words", None)
    out = []
    for p in prompts:
        if not p.strip():
            out.append("an empty prompt: the model gets no text to follow")
        elif unknown is not None and (dropped := unknown(p)):
            out.append(f"the built-in text encoder does not know {', '.join(map(repr, dropped))} in {p!r}: "
                       "those words are dropped")
    return out


class CausalModelFromComfy:
    DESCRIPTION = ("Use ComfyUI's own Wan 2.1 MODEL (Load Diffusion Model with any weight dtype, LoRA loaders) as a "
                   "causal streaming model: its weights stay ComfyUI's (fp8 storage, LoRA patches, offloading). "
                   "Choose the stream settings the model was distilled for (Self-Forcing, CausVid, LongLive, Causal "
                   "Forcing, Krea); use ComfyUI's CLIP text encoder and Wan VAE with it. The causal forward is "
                   "this pack's: patches that replace ComfyUI's own Wan forward (block patches, TeaCache, "
                   "torch.compile or attention patch nodes, ModelSamplingSD3's shift) have no effect.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("CAUSAL_MODEL",)
    RETURN_NAMES = ("model",)
    FUNCTION = "convert"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL",),
            "preset": (list(STREAM_PRESETS), {"default": "self-forcing",
                                              "tooltip": "the stream settings the causal model was made for"}),
            **STREAM_WIDGETS,
        }}

    def convert(self, model, preset, frames_per_chunk, window_frames, sink_frames):
        from .comfy_model import causal_dit_from_comfy

        dit = causal_dit_from_comfy(model)
        settings = stream_preset(preset)
        if window_frames and settings.get("kv_recompute_frames"):
            raise ValueError(f"{preset} rebuilds its KV cache every chunk and has no window: set window_frames to 0")
        if frames_per_chunk:
            settings["chunk_frames"] = frames_per_chunk
        if window_frames:
            settings.update(window_frames=window_frames, sink_frames=sink_frames)
        name = f"ComfyUI MODEL ({preset})"
        return (CausalModel(Components(dit, None, None, settings, name), settings, name, patcher=model),)
