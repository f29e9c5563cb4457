"""The Wan2.1 causal video VAE: full and streaming encode/decode, loading and saving.

Parameter names are Wan2.1's, so `Wan2.1_VAE.pth` and ComfyUI's `wan_2.1_vae.safetensors` load with
strict=True. The layers (vae_layers.py) compute whole-sequence results chunk by chunk through an
explicit `FeatureCache`, so a full decode and any streaming of the same latents give the same frames.

- encode: video [B, 3, T, H, W] in [-1, 1], T = 4k+1 -> latent [B, 16, k+1, H/8, W/8], the
  normalised mean (mu - latent_mean) / latent_std (no sampling); run as chunks of 1, 4, 4, ... frames.
- decode: latent [B, 16, F, h, w] -> video [B, 3, 1 + 4 (F-1), 8h, 8w]: de-normalise, conv2, decoder
  one latent frame at a time; clamped to [-1, 1] unless clamp=False (the parity vectors are unclamped).
(x4 / x8 are Wan2.1's; other configs use their own `time_factor` / `space_factor`.)

Shapes: B batch, T pixel frames, H x W pixels, F latent frames, h x w latent grid, Z latent channels.
"""
from __future__ import annotations

import copy
import json
import os
import re
from typing import Any, Optional

import torch
import torch.nn as nn
from torch import Tensor

from .checkpoints import (FORMAT_TAG, META_CONFIG, META_FORMAT, META_KIND, CheckpointError,
                          atomic_save_safetensors, check_keys, read_checkpoint)
from .vae_config import VAE_PRESETS, WAN_LATENT_MEAN, WAN_LATENT_STD, VAEConfig, vae_preset
from .vae_layers import CausalConv3d, Decoder3d, Encoder3d, FeatureCache, conv3d, use_circular_padding

__all__ = ["VAEConfig", "VAE_PRESETS", "vae_preset", "WanVAE", "FeatureCache", "StreamingEncoder",
           "StreamingDecoder", "decode_memory", "load_vae", "save_vae", "infer_vae_config", "random_vae"]

# prefixes under which bundles and converters store the VAE's own keys
VAE_PREFIXES = ("first_stage_model.", "vae.", "model.", "module.")


class WanVAE(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        cfg = self.config = config
        Z = cfg.z_dim
        self.encoder = Encoder3d(cfg.dim, 2 * Z, cfg.dim_mult, cfg.num_res_blocks, cfg.attn_scales,
                                 cfg.temperal_downsample, cfg.dropout)
        self.conv1 = CausalConv3d(2 * Z, 2 * Z, 1)  # -> (mu, log_var)
        self.conv2 = CausalConv3d(Z, Z, 1)
        self.decoder = Decoder3d(cfg.dim, Z, cfg.dim_mult, cfg.decoder_blocks, cfg.attn_scales,
                                 cfg.temperal_downsample[::-1], cfg.dropout)
        use_circular_padding(self, cfg.padding == "circular")

    # -- caches and checks -----------------------------------------------------------------------

    def encoder_cache(self) -> FeatureCache:
        return FeatureCache(self.encoder.num_slots)

    def decoder_cache(self) -> FeatureCache:
        return FeatureCache(self.decoder.num_slots)

    def latent_stats(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """latent_mean, latent_std as [1, Z, 1, 1, 1] tensors of like's dtype and device."""
        shape = (1, self.config.z_dim, 1, 1, 1)
        mean = torch.tensor(self.config.latent_mean, dtype=like.dtype, device=like.device).view(shape)
        std = torch.tensor(self.config.latent_std, dtype=like.dtype, device=like.device).view(shape)
        return mean, std

    def check_video(self, x: Tensor, first: bool = True, where: str = "encode") -> None:
        """video [B, 3, T, H, W]: T = 4k+1 for a whole clip / first chunk, 4k (k >= 1) for later chunks."""
        tf, sf = self.config.time_factor, self.config.space_factor
        if x.ndim != 5 or x.shape[1] != 3:
            raise ValueError(f"{where}: expected a video [B, 3, T, H, W] (RGB, channels first), got shape "
                             f"{tuple(x.shape)}")
        T, H, W = x.shape[2:]
        if first and (T - 1) % tf:
            raise ValueError(f"{where}: frame count must be {tf}k+1 (1, {tf + 1}, {2 * tf + 1}, ...), got {T}")
        if not first and (T == 0 or T % tf):
            raise ValueError(f"{where}: after the first chunk, frame counts must be multiples of {tf}, got {T}")
        if H % sf or W % sf or H == 0 or W == 0:
            raise ValueError(f"{where}: height and width must be multiples of {sf}, got {H}x{W}")

    def check_latent(self, z: Tensor, where: str = "decode") -> None:
        if z.ndim != 5 or z.shape[1] != self.config.z_dim:
            raise ValueError(f"{where}: expected a latent [B, {self.config.z_dim}, F, h, w], got shape "
                             f"{tuple(z.shape)}")
        if min(z.shape[2:]) == 0:
            raise ValueError(f"{where}: empty latent {tuple(z.shape)}")

    # -- chunk steps: the whole-sequence result for the chunk, given the cache --------------------

    def encode_moments(self, x: Tensor, cache: Optional[FeatureCache] = None) -> tuple[Tensor, Tensor]:
        """Pixels -> raw (mu, log_var), each [B, Z, f, h, w], before normalisation (VAE training).

        Without a cache, x is a whole clip (4k+1 frames) in one pass: the same result as the chunked encode.
        """
        h = self.encoder(x.to(self.conv1.weight.dtype), cache)
        return self.conv1(h).chunk(2, dim=1)

    def encode_chunk(self, x: Tensor, cache: FeatureCache) -> Tensor:
        """One chunk of pixels -> normalised latents; only mu is computed (conv1's first Z outputs)."""
        Z = self.config.z_dim
        h = self.encoder(x.to(self.conv1.weight.dtype), cache)
        mu = conv3d(h, self.conv1.weight[:Z], self.conv1.bias[:Z])
        mean, std = self.latent_stats(mu)
        return (mu - mean) / std

    def decode_chunk(self, z: Tensor, cache: FeatureCache) -> Tensor:
        """Normalised latents -> pixel frames (unclamped): 1 for the stream's first latent, then 4 each."""
        z = z.to(self.conv2.weight.dtype)
        mean, std = self.latent_stats(z)
        return self.decoder(self.conv2(z * std + mean), cache)

    # -- whole clips ------------------------------------------------------------------------------

    def encode(self, video: Tensor, frames_per_pass: Optional[int] = None) -> Tensor:
        """video [B, 3, 4k+1, H, W] in [-1, 1] -> latent [B, Z, k+1, H/8, W/8].

        Passes of 1, then `frames_per_pass` (default 4, the reference's chunking; any multiple of 4
        gives the same result up to float rounding and runs faster with fewer, larger convs).
        """
        self.check_video(video)
        tf = self.config.time_factor
        step = frames_per_pass or tf
        if step % tf:
            raise ValueError(f"frames_per_pass must be a multiple of {tf}, got {step}")
        cache = self.encoder_cache()
        outs = [self.encode_chunk(video[:, :, :1], cache)]
        for s in range(1, video.shape[2], step):
            outs.append(self.encode_chunk(video[:, :, s:s + step], cache))
        return torch.cat(outs, dim=2)

    def decode(self, latent: Tensor, clamp: bool = True, latents_per_pass: int = 1) -> Tensor:
        """latent [B, Z, F, h, w] -> video [B, 3, 1 + 4 (F-1), 8h, 8w], in [-1, 1] when clamp.

        Passes of `latents_per_pass` latent frames (1, the reference's; more is faster, same result).
        """
        self.check_latent(latent)
        if latents_per_pass < 1:
            raise ValueError(f"latents_per_pass must be >= 1, got {latents_per_pass}")
        cache = self.decoder_cache()
        outs = [self.decode_chunk(latent[:, :, s:s + latents_per_pass], cache)
                for s in range(0, latent.shape[2], latents_per_pass)]
        video = torch.cat(outs, dim=2)
        return video.clamp(-1.0, 1.0) if clamp else video


def decode_memory(vae: "WanVAE", latent_hw: tuple[int, int]) -> int:
    """Device bytes a one-latent-frame streaming decode needs above its inputs (an estimate with headroom:
    six tensors of the last level's channels over its 4 output frames; `causvid bench memory` measures)."""
    cfg = vae.config
    h, w = latent_hw
    pixels = cfg.time_factor * h * w * cfg.space_factor ** 2
    return 6 * pixels * cfg.dim * next(vae.parameters()).dtype.itemsize


# -- streaming -------------------------------------------------------------------------------------

class _Stream:
    """Shared bookkeeping: one cache, the shape the stream was started with, and a position."""

    def __init__(self, vae: WanVAE, cache: FeatureCache):
        self.vae, self.cache = vae, cache
        self.chunks = 0  # chunks consumed since the last reset
        self._key: Optional[tuple] = None

    def reset(self) -> None:
        self.cache.reset()
        self.chunks, self._key = 0, None

    def clone(self):
        """An independent copy of the stream position (slots are replaced, never written in place, so
        copying the slot list is enough)."""
        new = copy.copy(self)
        new.cache = FeatureCache(len(self.cache.slots))
        new.cache.slots = list(self.cache.slots)
        return new

    def share(self):
        """A view that continues this stream in the same cache object (no copy): after it is used, this
        one is stale (CausalStream.fork rebuilds it from its journal when needed)."""
        return copy.copy(self)

    @property
    def nbytes(self) -> int:
        """Bytes held by the cache: constant after the first chunk, however long the stream."""
        return self.cache.nbytes

    def _check_same_stream(self, x: Tensor, where: str) -> None:
        key = (x.shape[0], *x.shape[3:], x.device)
        if self._key is None:
            self._key = key
        elif key != self._key:
            raise ValueError(f"{where}: this chunk (batch, height, width, device = {key}) does not continue "
                             f"the stream ({self._key}); call reset() to start a new stream")


class StreamingDecoder(_Stream):
    """Decode a latent stream chunk by chunk; equal to `vae.decode` of the concatenated latents.

    The first latent of a stream gives 1 pixel frame, every later one 4. The cache (the last inputs of
    every causal conv) is kept between calls and has a fixed size, so memory is flat over endless streams.
    It is in the VAE's dtype and on its device. Off the CPU a chunk is decoded one latent frame at a time
    (`latents_per_pass`, the reference's own chunking): the same frames, and the activation peak of one
    latent frame instead of a whole chunk (at 832x480: 4 frames of 96+ channels at full size). On the CPU,
    where memory is not the limit, the whole chunk goes in one pass (larger convs are faster there).
    """

    def __init__(self, vae: WanVAE, clamp: bool = True, latents_per_pass: Optional[int] = None):
        super().__init__(vae, vae.decoder_cache())
        if latents_per_pass is not None and latents_per_pass < 1:
            raise ValueError(f"latents_per_pass must be >= 1, got {latents_per_pass}")
        self.clamp, self.latents_per_pass = clamp, latents_per_pass

    @torch.no_grad()
    def decode(self, latent: Tensor) -> Tensor:
        """latent [B, Z, n, h, w] -> frames [B, 3, 4n (or 4n-3 for the first chunk), 8h, 8w], VAE dtype."""
        self.vae.check_latent(latent, "StreamingDecoder.decode")
        self._check_same_stream(latent, "StreamingDecoder.decode")
        n = latent.shape[2]
        step = self.latents_per_pass or (n if latent.device.type == "cpu" else 1)
        parts = [self.vae.decode_chunk(latent[:, :, s:s + step], self.cache) for s in range(0, n, step)]
        frames = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
        self.chunks += 1
        return frames.clamp_(-1.0, 1.0) if self.clamp else frames


class StreamingEncoder(_Stream):
    """Encode a pixel stream chunk by chunk; equal to `vae.encode` of the concatenated frames.

    Chunks keep to the 1, 4, 4, ... grid: the first has 4k+1 frames (usually 1), later ones 4k (usually 4);
    each 4 frames give one latent (the first frame alone gives the first latent).
    """

    def __init__(self, vae: WanVAE):
        super().__init__(vae, vae.encoder_cache())

    @torch.no_grad()
    def encode(self, frames: Tensor) -> Tensor:
        """frames [B, 3, t, H, W] in [-1, 1] -> latents [B, Z, t/4 (or (t-1)/4 + 1 first), H/8, W/8]."""
        self.vae.check_video(frames, first=self.chunks == 0, where="StreamingEncoder.encode")
        self._check_same_stream(frames, "StreamingEncoder.encode")
        latent = self.vae.encode_chunk(frames, self.cache)
        self.chunks += 1
        return latent


# -- building, loading, saving ----------------------------------------------------------------------

def random_vae(config: VAEConfig | str, seed: int = 0, std: Optional[float] = None,
               dtype: torch.dtype = torch.float32) -> WanVAE:
    """A VAE with seeded random weights (tests, benchmarks); std=None keeps PyTorch's default init."""
    cfg = vae_preset(config) if isinstance(config, str) else config
    g = torch.random.fork_rng()
    with g:
        torch.manual_seed(seed)
        vae = WanVAE(cfg)
        if std is not None:
            with torch.no_grad():
                for name, p in vae.named_parameters():
                    if not name.endswith("gamma"):
                        p.normal_(0.0, std)
    return vae.to(dtype).eval()


def normalize_vae_keys(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Strip a known prefix (ComfyUI bundles: `first_stage_model.`, converters: `vae.` ...) to Wan's keys.

    When some keys carry a prefix and others do not (a bundle with a DiT or text encoder inside),
    only the prefixed VAE keys are kept.
    """
    if "encoder.conv1.weight" in tensors:
        return dict(tensors)
    for prefix in VAE_PREFIXES:
        if prefix + "encoder.conv1.weight" in tensors:
            n = len(prefix)
            return {k[n:]: v for k, v in tensors.items() if k.startswith(prefix)}
    return dict(tensors)


def infer_vae_config(sd: dict[str, Tensor], **overrides: Any) -> VAEConfig:
    """A VAEConfig from tensor shapes (Wan keys).

    dim: encoder.conv1 out channels; z_dim: conv2; each encoder level is its residual blocks up to the
    next Resample (a time_conv there means a temporal downsample), so num_res_blocks is the count in the
    first level and dim_mult the levels' out channels / dim; attn_scales from attention blocks among
    them. latent_mean/std: Wan2.1's when z_dim is 16 (every released Wan2.1 VAE), else identity;
    pass latent_mean / latent_std (or use a file that carries its config) for anything else.
    """
    if "encoder.conv1.weight" not in sd or "conv2.weight" not in sd:
        raise CheckpointError(f"unknown architecture: this is not a Wan2.1 VAE (no encoder.conv1.weight / "
                              f"conv2.weight; its keys look like {sorted(sd)[:6]})")
    dim = sd["encoder.conv1.weight"].shape[0]
    z_dim = sd["conv2.weight"].shape[0]
    blocks = sorted({int(m.group(1)) for k in sd if (m := re.match(r"encoder\.downsamples\.(\d+)\.", k))})
    levels: list[dict[str, Any]] = [{"blocks": 0, "out": dim, "attn": False}]
    temporal: list[bool] = []
    for i in blocks:
        p = f"encoder.downsamples.{i}."
        if p + "residual.2.weight" in sd:
            levels[-1]["blocks"] += 1
            levels[-1]["out"] = sd[p + "residual.2.weight"].shape[0]
        elif p + "to_qkv.weight" in sd:
            levels[-1]["attn"] = True
        elif p + "resample.1.weight" in sd:
            temporal.append(p + "time_conv.weight" in sd)
            levels.append({"blocks": 0, "out": levels[-1]["out"], "attn": False})
    if any(lv["out"] % dim for lv in levels) or not levels[0]["blocks"]:
        raise CheckpointError(f"cannot infer the VAE config from the encoder's shapes (levels {levels}); "
                              "use a file that carries its config or pass config=")
    fields: dict[str, Any] = dict(
        dim=dim, z_dim=z_dim, dim_mult=[lv["out"] // dim for lv in levels], num_res_blocks=levels[0]["blocks"],
        attn_scales=[1.0 / 2 ** i for i, lv in enumerate(levels) if lv["attn"]], temperal_downsample=temporal)
    decoder_blocks = _decoder_level_blocks(sd) - 1  # Wan's decoder levels have num_res_blocks + 1
    if decoder_blocks >= 0 and decoder_blocks != fields["num_res_blocks"]:
        fields["decoder_res_blocks"] = decoder_blocks
    if z_dim == len(WAN_LATENT_MEAN):
        fields.update(latent_mean=WAN_LATENT_MEAN, latent_std=WAN_LATENT_STD)
    fields.update(overrides)
    return VAEConfig.from_dict(fields)


def _decoder_level_blocks(sd: dict[str, Tensor]) -> int:
    """Residual blocks in the decoder's first level (before its first Resample); -1 without decoder keys."""
    blocks = sorted({int(m.group(1)) for k in sd if (m := re.match(r"decoder\.upsamples\.(\d+)\.", k))})
    count = 0
    for i in blocks:
        p = f"decoder.upsamples.{i}."
        if p + "resample.1.weight" in sd:
            break
        count += p + "residual.2.weight" in sd
    return count if blocks else -1


def load_vae(path: str | os.PathLike, dtype: Optional[torch.dtype] = None, device: torch.device | str = "cpu",
             config: Optional[VAEConfig] = None) -> WanVAE:
    """Load `Wan2.1_VAE.pth`, ComfyUI's `wan_2.1_vae.safetensors` (prefixes stripped) or our own file.

    Config: `config` if given, else the file's `causvid.config` metadata, else inferred from shapes
    (`infer_vae_config`). Strict: missing, unexpected or mis-shaped keys raise CheckpointError.
    """
    raw = read_checkpoint(path, dtype=dtype)
    if raw.metadata.get(META_KIND) not in (None, "vae"):
        raise CheckpointError(f"{path}: this file holds a {raw.metadata[META_KIND]!r}, not a VAE")
    sd = normalize_vae_keys(raw.tensors)
    if config is None and META_CONFIG in raw.metadata:
        config = VAEConfig.from_dict(json.loads(raw.metadata[META_CONFIG]))
    cfg = config or infer_vae_config(sd)
    with torch.device("meta"):
        vae = WanVAE(cfg)
    check_keys(vae, sd, str(path))
    vae.load_state_dict(sd, strict=True, assign=True)
    vae.checkpoint_layout = raw.layout
    return vae.to(device).eval()


def save_vae(vae: WanVAE, path: str | os.PathLike, extra_metadata: Optional[dict[str, str]] = None) -> None:
    """Our own format: Wan keys + the config (with the latent statistics) in the metadata."""
    meta = {META_FORMAT: FORMAT_TAG, META_KIND: "vae", META_CONFIG: vae.config.to_json()}
    meta.update(extra_metadata or {})
    atomic_save_safetensors(vae.state_dict(), path, meta)
