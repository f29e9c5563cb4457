"""Model configs and named presets.

`DiTConfig` holds exactly the constructor fields of Wan2.1's WanModel, so a config read from a
Wan `config.json`, a parity file or our own checkpoint metadata maps onto it one to one. How a model
is *run* (chunk size, rolling window, sinks) is not architecture and lives with the cache and the
sampler, not here.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

ROPE_TABLE_POSITIONS = 1024  # Wan's rope_params(1024, ...) table: positions per axis


@dataclass(frozen=True)
class DiTConfig:
    model_type: str = "t2v"  # "t2v" | "i2v" (i2v adds CLIP image cross-attention)
    patch_size: tuple[int, int, int] = (1, 2, 2)
    text_len: int = 512
    in_dim: int = 16
    dim: int = 1536
    ffn_dim: int = 8960
    freq_dim: int = 256
    text_dim: int = 4096
    out_dim: int = 16
    num_heads: int = 12
    num_layers: int = 30
    window_size: tuple[int, int] = (-1, -1)
    qk_norm: bool = True
    cross_attn_norm: bool = True
    eps: float = 1e-6
    clip_dim: int = 1280  # i2v only: CLIP ViT-H penultimate features
    clip_tokens: int = 257  # i2v only: image tokens prepended to the text context

    def __post_init__(self) -> None:
        if self.model_type not in ("t2v", "i2v"):
            raise ValueError(f"model_type must be 't2v' or 'i2v', got {self.model_type!r}")
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for RoPE")
        # tuples survive a JSON round trip as lists: normalise
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
        object.__setattr__(self, "window_size", tuple(int(w) for w in self.window_size))

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    def tokens_per_frame(self, height: int, width: int) -> int:
        """Tokens of one latent frame of height x width latent pixels."""
        _, ph, pw = self.patch_size
        if height % ph or width % pw:
            raise ValueError(f"latent size {height}x{width} is not a multiple of the patch {ph}x{pw}")
        return (height // ph) * (width // pw)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DiTConfig":
        """Build from a dict that may carry extra keys (Wan's config.json has `_class_name` etc.)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def replace(self, **changes: Any) -> "DiTConfig":
        return dataclasses.replace(self, **changes)


DIT_PRESETS: dict[str, DiTConfig] = {
    # The released Wan2.1 models (shared/reference/causal-wan.md section 1).
    "wan2.1-t2v-1.3b": DiTConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
    "wan2.1-t2v-14b": DiTConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
    "wan2.1-i2v-14b": DiTConfig(model_type="i2v", in_dim=36, dim=5120, ffn_dim=13824,
                                num_heads=40, num_layers=40),
    # The built-in model for 64x64 Shapes World video (8x8 latents, 16 tokens a frame), with the
    # built-in word encoder's 64-dim, 16-token text: small enough to train and stream on 2 CPU cores.
    "shapes": DiTConfig(dim=192, ffn_dim=576, num_heads=3, num_layers=4, text_dim=64, text_len=16),
    # Small configs of the same design for tests and CPU work.
    "wan-tiny": DiTConfig(dim=96, ffn_dim=160, num_heads=2, num_layers=2, text_dim=32, text_len=16),
    "wan-tiny-i2v": DiTConfig(model_type="i2v", in_dim=36, dim=64, ffn_dim=128, num_heads=2,
                              num_layers=2, text_dim=32, text_len=16, clip_dim=48, clip_tokens=5),
}


def dit_preset(name: str) -> DiTConfig:
    try:
        return DIT_PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown DiT preset {name!r}; choose one of {sorted(DIT_PRESETS)}") from None
