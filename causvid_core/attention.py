"""Attention backends: functions (q, k, v) -> out over [B, H, L, d] tensors, swappable per model.

The default is torch's scaled_dot_product_attention (flash kernel on CPU). "math" is an explicit
float32 softmax used to cross-check the fused kernel.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

AttentionFn = Callable[[Tensor, Tensor, Tensor], Tensor]


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return F.scaled_dot_product_attention(q, k, v)


def math_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])  # [B, H, Lq, Lk]
    return (scores.softmax(dim=-1) @ v.float()).to(q.dtype)


ATTENTION_BACKENDS: dict[str, AttentionFn] = {"sdpa": sdpa_attention, "math": math_attention}


def get_attention(backend: str | AttentionFn) -> AttentionFn:
    if callable(backend):
        return backend
    try:
        return ATTENTION_BACKENDS[backend]
    except KeyError:
        raise ValueError(f"unknown attention backend {backend!r}; "
                         f"choose one of {sorted(ATTENTION_BACKENDS)} or pass a function") from None
