"""The built-in text encoder: word and position embeddings through a small transformer, pre-trained to
tell every attribute of a prompt (colour, shape, motion, background) from its pooled output, with
attributes randomly left out so partial prompts embed sensibly. Frozen for every later stage."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from causvid_core import world
from causvid_core.text import WordEncoderConfig, WordTextEncoder, save_text_encoder

from ..config import TrainConfig
from ..run import StageRun, train_steps
from .common import output

ATTRIBUTES = {"colour": list(world.COLOURS), "shape": list(world.SHAPES), "motion": list(world.MOTIONS),
              "background": list(world.BACKGROUNDS)}


class Probe(nn.Module):
    """The encoder plus one linear head per attribute (the heads are discarded after training)."""

    def __init__(self, encoder: WordTextEncoder):
        super().__init__()
        self.encoder = encoder
        self.heads = nn.ModuleDict({k: nn.Linear(encoder.text_dim, len(v)) for k, v in ATTRIBUTES.items()})

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.encoder(ids, lengths)  # [B, L, D], zero rows past the length
        pooled = h.sum(1) / lengths.clamp_min(1).unsqueeze(1)
        return {k: head(pooled) for k, head in self.heads.items()}


def partial_prompt(seed: int, step: int, index: int) -> tuple[str, dict[str, int]]:
    """A template prompt with each attribute kept with probability 0.85; targets -100 where left out."""
    rng = np.random.default_rng([seed, step, index])
    spec = world.sample_spec(rng, "train")
    keep = rng.random(4) < 0.85
    values = {"colour": spec.colour, "shape": spec.shape, "motion": spec.motion, "background": spec.background}
    words = [("a", None), (spec.colour, "colour"), (spec.shape, "shape"), (spec.motion, "motion"),
             ("on a", None), (spec.background, "background"), ("background", None)]
    kept = {a: bool(k) for a, k in zip(ATTRIBUTES, keep)}
    text = " ".join(w for w, a in words if a is None or kept[a])
    targets = {a: ATTRIBUTES[a].index(values[a]) if kept[a] else -100 for a in ATTRIBUTES}
    return text, targets


def run(cfg: TrainConfig, root: str | Path, accelerator=None) -> None:
    root = Path(root)
    r = StageRun(root, "text", cfg.seed, accelerator)
    if r.done:
        return
    sc = cfg.text
    torch.manual_seed(cfg.seed)
    enc_cfg = WordEncoderConfig(text_dim=sc.text_dim, text_len=sc.text_len, num_layers=sc.num_layers,
                                num_heads=sc.num_heads, ffn_dim=sc.ffn_dim)
    probe = Probe(WordTextEncoder(enc_cfg))
    opt = torch.optim.AdamW(probe.parameters(), lr=sc.lr, weight_decay=sc.weight_decay)

    def loss_fn(step: int, idx: list[int], m) -> tuple[torch.Tensor, dict]:
        texts, targets = zip(*(partial_prompt(cfg.seed, step, i) for i in idx))
        ids, lengths = probe.encoder.tokenize(texts)
        logits = m(ids, lengths)
        losses, accs = [], {}
        for a in ATTRIBUTES:
            y = torch.tensor([t[a] for t in targets])
            losses.append(F.cross_entropy(logits[a], y, ignore_index=-100))
            seen = y != -100
            accs[f"acc_{a}"] = float((logits[a].argmax(-1)[seen] == y[seen]).float().mean()) if seen.any() else 1.0
        return torch.stack(losses).sum(), accs

    probe = train_steps(r, sc, probe, opt, loss_fn)
    if r.is_main:
        save_text_encoder(probe.encoder.eval(), output(root, "text"))
    r.finish(model=str(output(root, "text")), steps=sc.steps, final=r.metrics()[-1] if r.metrics() else {})
