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


def output_directory() -> str:
    import folder_paths

    return folder_paths.get_output_directory()


def check_interrupt() -> None:
    import comfy.model_management

    comfy.model_management.throw_exception_if_processing_interrupted()


class Progress:
    """ComfyUI's progress bar counted in denoising steps, with a JPEG preview of each decoded chunk."""

    def __init__(self, total: int):
        import comfy.utils

        self.bar = comfy.utils.ProgressBar(total)
        self.total, self.done = total, 0

    def step(self, preview=None) -> None:
        self.done += 1
        self.bar.update_absolute(self.done, self.total, preview)

    def preview(self, frame_uint8) -> None:
        """Show a frame (uint8 [H, W, 3]) on the node without advancing."""
        from PIL import Image

        self.bar.update_absolute(self.done, self.total, ("JPEG", Image.fromarray(frame_uint8), 512))
