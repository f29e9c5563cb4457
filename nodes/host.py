"""Everything that touches ComfyUI itself, imported lazily so the node classes can be unit-tested
with these few host modules stubbed: folders, progress bar with previews, interruption."""
from __future__ import annotations

from typing import Optional

BUILTIN_NAME = "built-in: Shapes World (CPU)"
MODEL_FOLDERS = ("diffusion_models", "unet")


def model_files() -> list[str]:
    import folder_paths

    names: list[str] = []
    for folder in MODEL_FOLDERS:
        try:
            names += folder_paths.get_filename_list(folder)
        except Exception:  # older ComfyUI without "diffusion_models", or no such folder
            continue
    parts = ("vae.safetensors", "text.safetensors")  # an exported model's companions, not models
    return sorted(n for n in set(names) if n.rsplit("/", 1)[-1] not in parts)


def model_path(name: str) -> str:
    import folder_paths

    for folder in MODEL_FOLDERS:
        try:
            path = folder_paths.get_full_path(folder, name)
        except Exception:
            path = None
        if path:
            return path
    raise FileNotFoundError(f"{name} is not in models/diffusion_models (or models/unet): put the file there")


def lora_files() -> list[str]:
    import folder_paths

    try:
        return sorted(folder_paths.get_filename_list("loras"))
    except Exception:
        return []


def lora_path(name: str) -> str:
    import folder_paths

    path = folder_paths.get_full_path("loras", name)
    if not path:
        raise FileNotFoundError(f"{name} is not in models/loras: put the LoRA file there")
    return path


def output_directory() -> str:
    import folder_paths

    return folder_paths.get_output_directory()


def check_interrupt() -> None:
    import comfy.model_management

    comfy.model_management.throw_exception_if_processing_interrupted()


class Progress:
    """ComfyUI's progress bar counted in denoising steps, with a JPEG preview of each decoded chunk."""

    def __init__(self, total: int, wan_latents: bool = False):
        import comfy.utils

        self.bar = comfy.utils.ProgressBar(total)
        self.total, self.done = total, 0
        # ComfyUI's previewer of Wan latents (--preview-method: latent2rgb, or TAEHV from models/vae_approx)
        # for the denoising steps between decoded chunks; only for streams in the Wan VAE's latent space
        self.previewer = wan_previewer() if wan_latents else None

    def step(self, preview=None) -> None:
        self.done += 1
        self.bar.update_absolute(self.done, self.total, preview)

    def denoised(self, x0) -> None:
        """A denoising step done: advance, with ComfyUI's latent preview of its x0 (Wan latents only)."""
        preview = None
        if self.previewer is not None:
            try:
                preview = self.previewer.decode_latent_to_preview_image("JPEG", x0)
            except Exception as exc:  # a preview must never stop the run, but Cancel must
                if type(exc).__name__ == "InterruptProcessingException":
                    raise
                self.previewer = None
        self.step(preview)

    def set(self, done: int) -> None:
        self.done = done
        self.bar.update_absolute(done, self.total)

    def preview(self, frame_uint8) -> None:
        """Show a frame (uint8 [H, W, 3], a host tensor or array) on the node without advancing."""
        import numpy as np
        from PIL import Image

        if hasattr(frame_uint8, "cpu"):  # a tensor, possibly on the GPU with --gpu-only
            frame_uint8 = frame_uint8.cpu()
        self.bar.update_absolute(self.done, self.total, ("JPEG", Image.fromarray(np.asarray(frame_uint8)), 512))


def wan_previewer():
    """ComfyUI's latent previewer for Wan 2.1 latents under its --preview-method, or None (no previews asked,
    or a ComfyUI without Wan's latent format)."""
    import importlib

    try:
        formats = importlib.import_module("comfy.latent_formats")
        return importlib.import_module("latent_preview").get_previewer(torch_device(), formats.Wan21())
    except Exception:
        return None


# -- devices and ComfyUI's model management --------------------------------------------------------------
# The DiT and the VAE run where ComfyUI says (CUDA, ROCm, MPS, XPU, or the CPU with --cpu), and their
# weights are loaded and offloaded by ComfyUI: each module is wrapped in one long-lived ModelPatcher
# and `load` asks ComfyUI for it right before use, passing the memory a stream needs on top of the
# weights (KV cache, activations), so ComfyUI unloads the text encoder or other models first.

def torch_device():
    import comfy.model_management as mm

    return mm.get_torch_device()


def offload_device():
    import comfy.model_management as mm

    return mm.unet_offload_device()


def intermediate_device():
    """Where IMAGE / LATENT outputs live between nodes (the CPU unless --gpu-only)."""
    import comfy.model_management as mm

    return mm.intermediate_device()


def model_dtype(device):
    """auto: bfloat16 where the device has it (CUDA sm80+, recent ROCm / XPU / MPS), else float32; float32
    on the CPU. float16 is not offered: Wan's activations overflow it."""
    import comfy.model_management as mm
    import torch

    if torch.device(device).type == "cpu":
        return torch.float32
    try:
        use_bf16 = mm.should_use_bf16(device)
    except Exception:  # a ComfyUI without the helper
        use_bf16 = True
    return torch.bfloat16 if use_bf16 else torch.float32


def model_patcher(module):
    """A ModelPatcher for one of our modules (weights on the offload device until `load`)."""
    import comfy.model_patcher

    return comfy.model_patcher.ModelPatcher(module, load_device=torch_device(), offload_device=offload_device())


def load(patchers, memory_required: int = 0) -> None:
    """Load the modules behind `patchers` onto their device, fully: our layers are plain torch layers,
    which ComfyUI's partial (lowvram) loading would leave on the CPU. ComfyUI >= mid-2024 takes
    force_full_load; the March 2024 tree has no such flag and partial-loads only models larger than free
    memory, so there a full load is forced by the high-VRAM state for the call."""
    import inspect

    import comfy.model_management as mm

    patchers = [p for p in patchers if p is not None]
    if not patchers:
        return
    kw = {"memory_required": int(memory_required)}
    # ComfyUI's own MODEL (CausalModelFromComfy): its comfy.ops layers cast weights left on the CPU per call,
    # so ComfyUI may load it partly (--lowvram, a big model on a small card). It goes first: loading ours after
    # it may then offload more of it, never the other way round.
    comfy = [p for p in patchers if _is_comfy_model(p)]
    patchers = [p for p in patchers if not _is_comfy_model(p)]
    if comfy:
        mm.load_models_gpu(comfy, **kw)
    if not patchers:
        return
    params = inspect.signature(mm.load_models_gpu).parameters
    if "force_full_load" in params:
        mm.load_models_gpu(patchers, force_full_load=True, **kw)
    else:
        state = getattr(mm, "vram_state", None)
        high = getattr(getattr(mm, "VRAMState", None), "HIGH_VRAM", None)
        if high is not None and state not in (high, getattr(mm.VRAMState, "DISABLED", None)):
            mm.vram_state = high
            try:
                mm.load_models_gpu(patchers, **kw)
            finally:
                mm.vram_state = state
        else:
            mm.load_models_gpu(patchers, **kw)
    for p in patchers:
        _check_loaded(p)


def _is_comfy_model(patcher) -> bool:
    return type(getattr(patcher, "model", None)).__module__.startswith("comfy.")


def _check_loaded(patcher) -> None:
    import torch

    device = torch.device(patcher.load_device)
    stray = [n for n, t in patcher.model.state_dict(keep_vars=True).items()
             if t.device.type != device.type]
    if stray:
        raise RuntimeError(f"ComfyUI left {len(stray)} weights of the causal model off {device} (e.g. {stray[0]}): "
                           "free memory (close other workflows) or run ComfyUI without --novram")


def input_directory() -> str:
    import folder_paths

    return folder_paths.get_input_directory()


# -- live streaming: the hub on ComfyUI's own server ---------------------------------------------------------
LIVE_PREFIX = "/causvid/live"  # ComfyUI >= 2025 also serves it under /api


def live_hub():
    """The live hub of this ComfyUI server: made, and its routes added to the server's route table, the first
    time. Routes must exist before ComfyUI builds its app (after custom nodes are imported), so the pack's
    __init__ calls this at import; a hub made later still serves sessions through the routes of the first."""
    from server import PromptServer

    from ..causvid_core.live.hub import LiveHub

    srv = PromptServer.instance
    hub = getattr(srv, "causvid_live_hub", None)
    if hub is None:
        hub = srv.causvid_live_hub = LiveHub()
        for method, path, handler in hub.routes(LIVE_PREFIX):
            srv.routes.route(method, path)(handler)
    if hub.loop is None:
        hub.loop = getattr(srv, "loop", None)
    return hub
