"""The Wan2.1 VAE config and its named presets.

`VAEConfig` holds the constructor fields of Wan2.1's WanVAE_ (upstream spelling `temperal_downsample`
kept, so a config dict from the reference maps one to one) plus the per-channel latent
normalisation, which is part of the model: latent = (mu - latent_mean) / latent_std.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Optional

# Wan2.1's latent statistics (wan/modules/vae.py, WanVAE.__init__), one value per latent channel.
WAN_LATENT_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                   0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN_LATENT_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                  3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)


PADDINGS = ("zeros", "circular")


@dataclass(frozen=True)
class VAEConfig:
    dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    # residual blocks per decoder level, less one (Wan: num_res_blocks + 1 blocks); None -> num_res_blocks.
    # Ours only: a decoder deeper than the encoder, trained later against the same frozen latents.
    decoder_res_blocks: Optional[int] = None
    attn_scales: tuple[float, ...] = ()
    temperal_downsample: tuple[bool, ...] = (False, True, True)  # [sic], per level; decoder reversed
    dropout: float = 0.0
    # spatial padding of every conv: "zeros" (Wan2.1) or "circular" (ours only: frames are a torus, as Shapes
    # World's are; an object crossing an edge is drawn whole on both sides instead of against a zero border)
    padding: str = "zeros"
    # None -> Wan2.1's statistics when z_dim is 16, else identity (mean 0, std 1)
    latent_mean: Optional[tuple[float, ...]] = None
    latent_std: Optional[tuple[float, ...]] = None

    def __post_init__(self) -> None:
        put = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)
        # tuples survive a JSON round trip as lists: normalise
        put("dim_mult", tuple(int(m) for m in self.dim_mult))
        put("attn_scales", tuple(float(s) for s in self.attn_scales))
        put("temperal_downsample", tuple(bool(t) for t in self.temperal_downsample))
        wan = self.z_dim == len(WAN_LATENT_MEAN)
        mean = self.latent_mean if self.latent_mean is not None else (WAN_LATENT_MEAN if wan else (0.0,) * self.z_dim)
        std = self.latent_std if self.latent_std is not None else (WAN_LATENT_STD if wan else (1.0,) * self.z_dim)
        put("latent_mean", tuple(float(m) for m in mean))
        put("latent_std", tuple(float(s) for s in std))
        if self.padding not in PADDINGS:
            raise ValueError(f"padding must be one of {PADDINGS}, got {self.padding!r}")
        if len(self.dim_mult) < 2:
            raise ValueError(f"dim_mult needs at least 2 levels, got {self.dim_mult}")
        if len(self.temperal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(f"temperal_downsample needs one entry per downsampling "
                             f"({len(self.dim_mult) - 1}), got {self.temperal_downsample}")
        if len(self.latent_mean) != self.z_dim or len(self.latent_std) != self.z_dim:
            raise ValueError(f"latent_mean / latent_std need z_dim={self.z_dim} values, got "
                             f"{len(self.latent_mean)} / {len(self.latent_std)}")
        if min(self.latent_std) <= 0:
            raise ValueError(f"latent_std must be positive, got {self.latent_std}")
        if self.dim < 1 or self.num_res_blocks < 0:
            raise ValueError(f"bad dim {self.dim} or num_res_blocks {self.num_res_blocks}")
        if self.decoder_res_blocks is not None and self.decoder_res_blocks < 0:
            raise ValueError(f"decoder_res_blocks must be >= 0 (or None: num_res_blocks), got {self.decoder_res_blocks}")

    @property
    def decoder_blocks(self) -> int:
        """num_res_blocks of the decoder (each level has one more residual block than this)."""
        return self.num_res_blocks if self.decoder_res_blocks is None else self.decoder_res_blocks

    @property
    def time_factor(self) -> int:
        """Pixel frames per latent frame after the first (4 for Wan2.1): T = 1 + 4 (F - 1)."""
        return 2 ** sum(self.temperal_downsample)

    @property
    def space_factor(self) -> int:
        """Pixels per latent pixel along each axis (8 for Wan2.1)."""
        return 2 ** (len(self.dim_mult) - 1)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "VAEConfig":
        """Build from a dict that may carry extra keys (a parity file's vae_config, a metadata blob)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def replace(self, **changes: Any) -> "VAEConfig":
        return dataclasses.replace(self, **changes)


VAE_PRESETS: dict[str, VAEConfig] = {
    # The released Wan2.1 VAE (Wan2.1_VAE.pth; shared/reference/causal-wan.md section 6).
    "wan2.1": VAEConfig(),
    # The parity vectors' random-weight VAE (shared/parity/wan-tiny-seed0.json).
    "wan-tiny": VAEConfig(dim=8, num_res_blocks=1),
    # The built-in model's VAE for 64x64 Shapes World clips (shared/specs/shapes-world.md): wan-tiny's
    # layout at twice its width. Solid shapes on solid backgrounds need little capacity, but their
    # anti-aliased edges are drawn at the 64x64 and 32x32 levels, which hold nearly all of the decode
    # cost: 16 and 32 channels there decode ~2.5x faster than the 64 frames/s target on 2 CPU cores,
    # and half the width (8) would halve the cost with visibly less room for edges. z_dim 16 with x4
    # time / x8 space keeps the latents Wan-shaped ([16, F, 8, 8]) for the DiT. Latent statistics start
    # as identity; the VAE trainer measures them and saves them in the checkpoint's config.
    "shapes": VAEConfig(dim=16, dim_mult=(1, 2, 4, 4), num_res_blocks=1,
                        latent_mean=(0.0,) * 16, latent_std=(1.0,) * 16),
    # Tried and dropped (session 8): the same one level shorter, x4 space / x4 time ([16, F, 16, 16] latents,
    # a shape ~3 latent cells across; DiT patch (1, 4, 4) keeps the 16 tokens a frame). Its first temporal
    # downsample then sits at full resolution on 16 channels, and it trains on a plateau where the object
    # is drawn as background: object PSNR 10-13 dB over 1000 steps (this preset: 16-19 dB by step 500),
    # round trip 40% all-four, colour 67% (1.3-1.6 s a step against this preset's 0.8). Still on the plateau
    # in 120-340-step probes with lr 1e-3, with 2 encoder blocks a level, with a 4x object weight, and with
    # this preset's own layout whose last level compresses time alone (a stride-1 Resample: time ops at 32
    # and 16 pixels, as here), also with a KL weight of 1e-3 (mu bounded: KL 2-4 instead of 20-400).
    # Without temporal downsampling the 16x16 layout learns as this one does, and with x2 time
    # (temperal_downsample (False, True), 17 latent frames, 2.4 s a step) it trails by ~2 dB to step 420,
    # then draws level (object PSNR 17-22 over steps 700-960): x4 space and x4 time together are what
    # fails, wherever the time ops sit. 32 channels at full resolution run at under a quarter of this preset's speed.
}


def vae_preset(name: str) -> VAEConfig:
    try:
        return VAE_PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown VAE preset {name!r}; choose one of {sorted(VAE_PRESETS)}") from None
