"""Learning-rate schedule and weight EMA shared by the training stages. The schedule is a pure function
of the step, so a resumed run needs no scheduler state."""
from __future__ import annotations

import math
from typing import Optional

import torch


def lr_at(step: int, steps: int, lr: float, warmup: int = 0, decay_from: Optional[int] = None) -> float:
    """Linear warm-up over `warmup` steps, constant until `decay_from` (default: the end of the warm-up),
    then cosine decay to zero at the last step."""
    if step < warmup:
        return lr * (step + 1) / warmup
    start = warmup if decay_from is None else max(warmup, decay_from)
    if step < start:
        return lr
    return 0.5 * lr * (1.0 + math.cos(math.pi * (step - start) / max(1, steps - start)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model (decay 0 copies the model)."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1.0 - decay)
