"""ComfyUI's own Wan MODEL (UNETLoader with any weight dtype, after LoraLoaderModelOnly, ...) driving this
pack's causal stream, with ComfyUI's weights: no second copy, LoRA patches and fp8 storage as ComfyUI applies
them, loading and offloading by ComfyUI's ModelPatcher.

How: our WanDiT (the causal forward: KV cache, RoPE positions, block-causal masks) is built on the meta
device and each of its leaf layers is replaced by the layer object of ComfyUI's WanModel at the same path
(the names are Wan2.1's in both). Every weight is then used by calling ComfyUI's layer, which casts fp8
storage per forward and applies low-VRAM LoRA patches, and a patch merged by ComfyUI into a weight is seen
because the layer is the same object. The blocks' `modulation` parameters are not layers: ours read them
from ComfyUI's blocks at every forward. Activations run in ComfyUI's compute dtype (its manual cast dtype
or the weights').
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..causvid_core.config import DiTConfig
from ..causvid_core.model import WanDiT

HINT = ("connect ComfyUI's MODEL of a Wan 2.1 text-to-video model (Load Diffusion Model / UNETLoader with a Wan "
        "2.1 file, optionally through LoRA loaders)")


def wan_module(model: Any) -> nn.Module:
    """The WanModel inside a ComfyUI MODEL (a ModelPatcher), or a clear error."""
    base = getattr(model, "model", None)
    wan = getattr(base, "diffusion_model", None)
    if wan is None:
        raise ValueError(f"this is not a ComfyUI MODEL ({type(model).__name__}): {HINT}")
    if type(wan).__name__ != "WanModel":
        raise ValueError(f"this MODEL is a {type(wan).__name__}, not Wan 2.1: {HINT}")
    if getattr(wan, "model_type", "t2v") != "t2v":
        raise ValueError(f"this Wan MODEL is a {wan.model_type} model; the causal stream runs text-to-video "
                         f"Wan 2.1 models (image-to-video comes from CausalImageToVideo): {HINT}")
    return wan


def config_of(wan: nn.Module) -> DiTConfig:
    return DiTConfig(model_type="t2v", patch_size=tuple(wan.patch_size), text_len=wan.text_len, in_dim=wan.in_dim,
                     dim=wan.dim, ffn_dim=wan.ffn_dim, freq_dim=wan.freq_dim, text_dim=wan.text_dim,
                     out_dim=wan.out_dim, num_heads=wan.num_heads, num_layers=wan.num_layers,
                     window_size=tuple(wan.window_size), qk_norm=wan.qk_norm, cross_attn_norm=wan.cross_attn_norm,
                     eps=wan.eps)


def causal_dit_from_comfy(model: Any) -> WanDiT:
    """Our causal WanDiT running on the layers of ComfyUI's MODEL (see the module docstring)."""
    wan = wan_module(model)
    with torch.device("meta"):
        ours = WanDiT(config_of(wan))
    for name, layer in list(ours.named_modules()):
        if not name or next(layer.children(), None) is not None:
            continue
        try:
            theirs = wan.get_submodule(name)
        except AttributeError:
            raise ValueError(f"ComfyUI's Wan model has no layer {name!r}: an unsupported Wan variant") from None
        parent, _, attr = name.rpartition(".")
        setattr(ours.get_submodule(parent) if parent else ours, attr, theirs)
    for mine, block in zip([*ours.blocks, ours.head], [*wan.blocks, wan.head]):
        del mine.modulation  # read from ComfyUI's block at every forward (ComfyUI may replace the Parameter)
        mine.modulation_source = _Ref(block)
    left = [n for n, p in ours.named_parameters() if p.is_meta]
    if left:
        raise ValueError(f"ComfyUI's Wan model does not provide {left[:3]}: an unsupported Wan variant")
    base = model.model
    ours.compute_dtype_override = getattr(base, "manual_cast_dtype", None) or base.get_dtype()
    return ours.eval()


class _Ref:
    """A reference to a module that is not registered as a submodule (no second path to its weights)."""

    def __init__(self, module: nn.Module):
        self.module = module

    @property
    def modulation(self) -> torch.Tensor:
        return self.module.modulation
