"""A LoRA of a fine-tuned DiT against its base: student - teacher, each linear layer's difference cut to a chosen
rank by a truncated SVD, saved in ComfyUI's LoRA layout (`diffusion_model.<layer>.lora_up / lora_down` with an
`alpha` equal to the rank, scale 1), which LoraLoaderModelOnly and this pack's loaders read.

Only linear layers' weights are carried. The other differences are left out: the blocks' `modulation`
parameters (ComfyUI patches no parameter of a non-leaf module), biases, norms and the patch embedding.
`reconstruction_error` says how far base + LoRA is from the fine-tuned weights, that part included, and that is
the error a ComfyUI user gets.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
from torch import Tensor

LORA_PREFIX = "diffusion_model."


@dataclass
class LoraReport:
    layers: int  # linear layers carried
    rank: int
    rel_error: float  # ||tuned - (base + LoRA)|| / ||tuned - base|| over every tensor
    rel_error_linear: float  # the same over the linear layers only (what the rank loses)
    left_out: float  # share of the difference's squared norm outside the linear layers

    def line(self) -> str:
        return (f"LoRA rank {self.rank} over {self.layers} linear layers: reconstruction error "
                f"{self.rel_error:.2%} of the fine-tune's difference ({self.rel_error_linear:.2%} on the linear "
                f"layers; {self.left_out:.2%} of the difference lies outside them: modulations, biases, norms)")


def _is_linear(key: str, w: Tensor) -> bool:
    return key.endswith(".weight") and w.dim() == 2 and not key.startswith("patch_embedding")


def extract_lora(base: dict[str, Tensor], tuned: dict[str, Tensor], rank: int) -> tuple[dict[str, Tensor], LoraReport]:
    """(the LoRA's tensors, its report) for tuned - base at `rank` (per layer, at most the layer's own rank)."""
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    missing = sorted(set(tuned) ^ set(base))
    if missing:
        raise ValueError(f"the two models differ in their keys (e.g. {missing[:3]}): not a fine-tune of this base")
    lora: dict[str, Tensor] = {}
    total = lin_total = lin_resid = other = 0.0
    layers = 0
    for key, w in tuned.items():
        d = w.float() - base[key].float()
        sq = float(d.pow(2).sum())
        total += sq
        if not _is_linear(key, w):
            other += sq
            continue
        layers += 1
        lin_total += sq
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        r = min(rank, s.numel())
        up, down = (u[:, :r] * s[:r]).contiguous(), vh[:r].contiguous()
        lin_resid += float(s[r:].pow(2).sum())
        name = LORA_PREFIX + key[: -len(".weight")]
        lora[f"{name}.lora_up.weight"] = up
        lora[f"{name}.lora_down.weight"] = down
        lora[f"{name}.alpha"] = torch.tensor(float(r), dtype=torch.float32, device=up.device)
    norm = math.sqrt(total) or 1.0
    report = LoraReport(layers, rank, math.sqrt(lin_resid + other) / norm,
                        math.sqrt(lin_resid) / (math.sqrt(lin_total) or 1.0), other / (total or 1.0))
    return lora, report


def save_lora(lora: dict[str, Tensor], path: str | os.PathLike, dtype: torch.dtype = torch.float16) -> None:
    from .checkpoints import atomic_save_safetensors

    atomic_save_safetensors({k: v.to(dtype) if v.dim() else v.float() for k, v in lora.items()}, path,
                            {"causvid.kind": "lora", "format": "comfyui"})
