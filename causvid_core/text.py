"""Text conditioning: the contract every text encoder here keeps, and the built-in word encoder.

Contract (the one Wan's umT5 keeps): `encode(prompts) -> [B, text_len, text_dim]`, rows past the
prompt's length are zero, and the DiT attends to all rows unmasked. An empty prompt is all zeros,
which is also the unconditional input used for classifier-free guidance.

The built-in encoder is small: a tokenizer over the Shapes World vocabulary (any text is accepted;
words outside the vocabulary are ignored, not errors) and a two-layer transformer over word and
position embeddings. Real Wan models use umT5-XXL (umt5.py); in ComfyUI the conditioning comes from
ComfyUI's own text encoder nodes.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Protocol, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from . import world
from .checkpoints import (FORMAT_TAG, META_CONFIG, META_FORMAT, META_KIND, CheckpointError,
                          atomic_save_safetensors, read_checkpoint)


class TextEncoder(Protocol):
    text_dim: int
    text_len: int

    def encode(self, prompts: Sequence[str]) -> Tensor:  # [B, text_len, text_dim]
        ...


def world_vocabulary() -> tuple[str, ...]:
    """Every word of the Shapes World prompts, in a fixed order (template words first)."""
    words: list[str] = []
    template = re.sub(r"\{\w+\}", " ", world.PROMPT_TEMPLATE)  # the fixed words, without placeholders
    for source in ([template], world.COLOURS, world.SHAPES, world.MOTIONS, world.BACKGROUNDS):
        for phrase in source:
            for w in re.findall(r"[a-z]+", phrase.lower()):
                if w not in words:
                    words.append(w)
    return tuple(words)


@dataclass(frozen=True)
class WordEncoderConfig:
    vocab: tuple[str, ...] = field(default_factory=world_vocabulary)
    text_dim: int = 64
    text_len: int = 16
    num_layers: int = 2
    num_heads: int = 4
    ffn_dim: int = 128

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "WordEncoderConfig":
        d = json.loads(text)
        d["vocab"] = tuple(d["vocab"])
        return cls(**d)


class WordTokenizer:
    """Lower-case words; known words become ids, the rest are dropped; at most text_len tokens."""

    def __init__(self, vocab: Sequence[str], max_len: int):
        self.index = {w: i for i, w in enumerate(vocab)}
        self.max_len = max_len

    def __call__(self, text: str) -> list[int]:
        ids = [self.index[w] for w in re.findall(r"[a-z]+", text.lower()) if w in self.index]
        return ids[: self.max_len]

    def unknown(self, text: str) -> list[str]:
        """The words of `text` the vocabulary does not have (dropped when encoding), in order, once each."""
        return list(dict.fromkeys(w for w in re.findall(r"[a-z]+", text.lower()) if w not in self.index))


class WordTextEncoder(nn.Module):
    def __init__(self, config: WordEncoderConfig = WordEncoderConfig()):
        super().__init__()
        self.config = config
        self.text_dim, self.text_len = config.text_dim, config.text_len
        self.tokenizer = WordTokenizer(config.vocab, config.text_len)
        D = config.text_dim
        self.token_embedding = nn.Embedding(len(config.vocab), D)
        self.pos_embedding = nn.Parameter(torch.randn(config.text_len, D) * 0.02)
        self.layers = nn.ModuleList([
            nn.TransformerEncoderLayer(D, config.num_heads, config.ffn_dim, dropout=0.0, batch_first=True,
                                       norm_first=True, activation="gelu")
            for _ in range(config.num_layers)])
        self.norm = nn.LayerNorm(D)

    def unknown_words(self, prompt: str) -> list[str]:
        """What this encoder cannot represent in a prompt: its words outside the vocabulary."""
        return self.tokenizer.unknown(prompt)

    def tokenize(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """ids [B, L] (0-padded) and lengths [B]."""
        rows = [self.tokenizer(p) for p in prompts]
        ids = torch.zeros(len(rows), self.text_len, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        return ids, torch.tensor([len(r) for r in rows])

    def forward(self, ids: Tensor, lengths: Tensor) -> Tensor:
        B, L = ids.shape
        valid = torch.arange(L, device=ids.device).unsqueeze(0) < lengths.to(ids.device).unsqueeze(1)  # [B, L]
        x = self.token_embedding(ids) + self.pos_embedding[:L]
        # an empty prompt has no valid key: let it attend to itself, its rows are zeroed below anyway
        pad = ~valid & (lengths.to(ids.device) > 0).unsqueeze(1)
        for layer in self.layers:
            x = layer(x, src_key_padding_mask=pad)
        return self.norm(x) * valid.unsqueeze(-1)  # [B, L, D], rows past the length zero

    def encode(self, prompts: Sequence[str] | str) -> Tensor:
        if isinstance(prompts, str):
            prompts = [prompts]
        ids, lengths = self.tokenize(prompts)
        device = self.token_embedding.weight.device
        return self(ids.to(device), lengths.to(device))


def save_text_encoder(encoder: WordTextEncoder, path: str | os.PathLike) -> None:
    meta = {META_FORMAT: FORMAT_TAG, META_KIND: "text", META_CONFIG: encoder.config.to_json()}
    atomic_save_safetensors(encoder.state_dict(), path, meta)


def load_text_encoder(path: str | os.PathLike, device: torch.device | str = "cpu") -> WordTextEncoder:
    raw = read_checkpoint(path)
    if raw.metadata.get(META_KIND) != "text":
        raise CheckpointError(f"{path}: not a causvid-stream text encoder (for umT5 use umt5.py)")
    encoder = WordTextEncoder(WordEncoderConfig.from_json(raw.metadata[META_CONFIG]))
    encoder.load_state_dict(raw.tensors, strict=True)
    return encoder.to(device).eval()
