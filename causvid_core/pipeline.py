"""The three parts a generation needs (DiT, VAE, text encoder), loaded from files or the built-in model."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from .checkpoints import CheckpointError, load_dit, read_checkpoint

BUILTIN_DIR = Path(__file__).resolve().parent / "builtin"
BUILTIN_FILES = {"model": "student.safetensors", "vae": "vae.safetensors", "text_encoder": "text.safetensors"}
META_STREAM = "causvid.stream"  # the stream settings a checkpoint was trained for (JSON)


@dataclass
class Components:
    model: Any
    vae: Any
    text_encoder: Any
    stream_defaults: dict = field(default_factory=dict)  # StreamSettings fields the model was trained with
    model_path: str = ""


def builtin_path(part: str) -> Path:
    return BUILTIN_DIR / BUILTIN_FILES[part]


def builtin_available() -> bool:
    return all(builtin_path(p).exists() for p in BUILTIN_FILES)


def _resolve(path: Optional[str | os.PathLike], part: str, beside: Optional[Path] = None) -> Path:
    """A given file; else the file of that part next to the model (what `causvid-train export` writes);
    else the built-in one."""
    if path is not None:
        return Path(path)
    if beside is not None and (beside.parent / BUILTIN_FILES[part]).exists():
        return beside.parent / BUILTIN_FILES[part]
    p = builtin_path(part)
    if not p.exists():
        raise CheckpointError(f"the built-in {part.replace('_', ' ')} ({p.name}) is not in this install; "
                              f"pass a file with --{part.replace('_', '-')}")
    return p


def stream_defaults_of(path: str | os.PathLike) -> dict:
    """The stream settings a checkpoint runs with: from its metadata (our safetensors), else from the preset
    its name points to (stream_presets.py: Causal Forcing, Krea, LongLive, ...), else none (the defaults)."""
    from .stream_presets import preset_for_file, stream_preset

    p = Path(path)
    if p.suffix == ".safetensors":
        meta = read_checkpoint_metadata(p)
        if META_STREAM in meta:
            return json.loads(meta[META_STREAM])
    name = preset_for_file(p)
    return stream_preset(name) if name else {}


def read_checkpoint_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file: {exc}") from exc


def load_text(path: Path, device: torch.device | str = "cpu", text_len: int = 512):
    """Our word encoder (safetensors with causvid metadata), else umT5-XXL for real Wan models: a Wan
    .pth, a ComfyUI umt5 safetensors or a Wan2.1 model folder (tokenizer found beside or embedded)."""
    from .text import load_text_encoder

    if path.suffix == ".safetensors" and read_checkpoint_metadata(path).get("causvid.kind") == "text":
        return load_text_encoder(path, device=device)
    from .umt5 import load_umt5_text_encoder
    return load_umt5_text_encoder(path, text_len=text_len, device=device)


def load_components(model: Optional[str | os.PathLike] = None, vae: Optional[str | os.PathLike] = None,
                    text_encoder: Optional[str | os.PathLike] = None, *, device: torch.device | str = "cpu",
                    dtype: Optional[torch.dtype] = None,
                    text_device: Optional[torch.device | str] = None,
                    lora: Optional[str | os.PathLike] = None, lora_strength: float = 1.0) -> Components:
    """dtype None: float32 on CPU (the built-in weights are stored in float16 to stay small; half
    precision on a CPU is slow and loses accuracy), the stored dtype elsewhere. It applies to the DiT
    and the VAE. text_device: where the text encoder runs (default: `device`); its output is moved to
    the model's device by the stream. lora: a LoRA file applied to the DiT as it loads (merged, at
    lora_strength)."""
    from .vae import load_vae

    if dtype is None and torch.device(device).type == "cpu":
        dtype = torch.float32
    model_path = _resolve(model, "model")
    dit = load_dit(model_path, dtype=dtype, device=device, lora=lora, lora_strength=lora_strength)
    beside = model_path if model is not None else None
    vae_model = load_vae(_resolve(vae, "vae", beside), dtype=dtype, device=device)
    text = load_text(_resolve(text_encoder, "text_encoder", beside), device=text_device or device,
                     text_len=dit.config.text_len)
    if text.text_dim != dit.config.text_dim:
        raise CheckpointError(f"the text encoder gives {text.text_dim}-dim embeddings, the model expects "
                              f"text_dim={dit.config.text_dim}: they do not belong together")
    if vae_model.config.z_dim != dit.config.out_dim:
        raise CheckpointError(f"the VAE has {vae_model.config.z_dim} latent channels, the model "
                              f"{dit.config.out_dim}: they do not belong together")
    return Components(dit, vae_model, text, stream_defaults_of(model_path), str(model_path))
