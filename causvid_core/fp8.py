"""fp8 checkpoints (`*_fp8_e4m3fn.safetensors`, ComfyUI's `*_fp8_scaled.safetensors`): dequantised on load, or kept
in fp8 in memory and cast to the compute dtype by each layer as it runs (half the memory of bf16 weights).

ComfyUI's scaled fp8 layout: a `scaled_fp8` marker tensor, and for each fp8 weight a `*.scale_weight` (per tensor or
per output row) with weight = fp8 * scale; `*.scale_input` are activation scales for fp8 matmuls, unused here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checkpoints import CheckpointError

FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
                   if hasattr(torch, n))
SCALE_SUFFIXES = (".scale_weight", ".weight_scale")
INPUT_SCALE_SUFFIXES = (".scale_input", ".input_scale")


def has_fp8(sd: dict[str, Tensor]) -> bool:
    return "scaled_fp8" in sd or any(v.dtype in FP8_DTYPES for v in sd.values())


def _scale_for(scale: Tensor, w: Tensor, key: str, where: str) -> Tensor:
    scale = scale.float()
    if scale.numel() == 1:
        return scale.reshape(())
    if scale.numel() == w.shape[0]:
        return scale.reshape(-1, *([1] * (w.dim() - 1)))  # one scale per output row
    raise CheckpointError(f"{where}: {key} has shape {tuple(scale.shape)}; only per-tensor or per-row scales of fp8 "
                          f"weights are supported (weight {tuple(w.shape)})")


def dequantize(sd: dict[str, Tensor], dtype: torch.dtype, where: str) -> None:
    """Every tensor to `dtype`, fp8 ones times their scale, in place, tensor by tensor (the peak stays near the
    dequantised model's size); other quantisation schemes raise a CheckpointError naming the file."""
    if any(k.endswith(".comfy_quant") for k in sd):
        raise CheckpointError(f"{where}: ComfyUI mixed-precision quantisation (`comfy_quant`) is not supported here; "
                              "use an fp16/bf16, fp8 or fp8_scaled file")
    sd.pop("scaled_fp8", None)
    for key in [k for k in sd if k.endswith(SCALE_SUFFIXES)]:
        wkey = key.rsplit(".", 1)[0] + ".weight"
        if wkey not in sd:
            raise CheckpointError(f"{where}: {key} scales a weight {wkey} that is not in the file")
        w = sd[wkey]
        sd[wkey] = (w.float() * _scale_for(sd.pop(key), w, key, where)).to(dtype)
    for key in [k for k in sd if k.endswith(INPUT_SCALE_SUFFIXES)]:
        del sd[key]
    for k, v in sd.items():
        if not v.is_floating_point():
            raise CheckpointError(f"{where}: {k} is {v.dtype}, a quantised format that is not supported")
        sd[k] = v.to(dtype)  # unscaled fp8: the cast is the whole dequantisation; the rest to the same dtype


class CastLinear(nn.Linear):
    """A Linear whose weight stays in fp8 (with an optional scale) and is cast to the input's dtype per call."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, scale_shape: tuple = ()):
        super().__init__(in_features, out_features, bias=bias, device="meta")
        self.register_buffer("scale_weight", torch.ones(scale_shape, device="meta"))

    def forward(self, x: Tensor) -> Tensor:
        # one cast copy of the weight per call (as ComfyUI's manual cast); the scale (per tensor or per output
        # row) multiplies the output, which is far smaller than the weight
        y = F.linear(x, self.weight.to(x.dtype))
        y = y * self.scale_weight.reshape(-1).to(y.dtype)
        return y if self.bias is None else y + self.bias.to(y.dtype)


def keep_fp8(model: nn.Module, sd: dict[str, Tensor], compute_dtype: torch.dtype, where: str) -> None:
    """Prepare a model built on the meta device and its state dict for fp8 storage: each Linear whose weight
    is fp8 becomes a CastLinear (its scale from the file, 1 without one); every other fp8 tensor (modulations,
    norms, biases) is dequantised to compute_dtype. The model then loads `sd` with assign=True."""
    sd.pop("scaled_fp8", None)
    for key in [k for k in sd if k.endswith(INPUT_SCALE_SUFFIXES)]:
        del sd[key]
    file_scales = {k for k in sd if k.endswith(SCALE_SUFFIXES)}
    for name, layer in list(model.named_modules()):
        w = sd.get(f"{name}.weight")
        if not isinstance(layer, nn.Linear) or w is None or w.dtype not in FP8_DTYPES:
            continue
        scale_key = next((f"{name}{s}" for s in SCALE_SUFFIXES if f"{name}{s}" in sd), None)
        scale = _scale_for(sd.pop(scale_key), w, scale_key, where) if scale_key \
            else torch.ones((), dtype=torch.float32, device=w.device)
        file_scales.discard(scale_key)
        sd[f"{name}.scale_weight"] = scale
        cast = CastLinear(layer.in_features, layer.out_features, layer.bias is not None, tuple(scale.shape))
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, cast)
        if cast.bias is not None and f"{name}.bias" in sd:
            sd[f"{name}.bias"] = sd[f"{name}.bias"].to(compute_dtype)
    if file_scales:
        raise CheckpointError(f"{where}: {sorted(file_scales)[0]} scales a tensor that is not a linear layer's weight")
    for k, v in sd.items():  # everything but the fp8 linear weights runs in the compute dtype
        if v.is_floating_point() and not (v.dtype in FP8_DTYPES and _is_cast(model, k)) \
                and not k.endswith(".scale_weight"):
            sd[k] = v.to(compute_dtype)


def _is_cast(model: nn.Module, key: str) -> bool:
    name = key.rsplit(".", 1)[0]
    try:
        return isinstance(model.get_submodule(name), CastLinear)
    except AttributeError:
        return False


def file_has_fp8(path) -> bool:
    """Whether a safetensors file stores fp8 tensors (read from its header, no tensor loaded)."""
    import json
    import struct
    from pathlib import Path

    p = Path(path)
    if p.suffix != ".safetensors" or not p.is_file():
        return False
    try:
        with open(p, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error):
        return False  # read_checkpoint reports what is wrong with the file
    return any(isinstance(v, dict) and str(v.get("dtype", "")).startswith("F8") for v in header.values())
