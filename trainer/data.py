"""Training data: Shapes World clips (training split only: the held-out colour-shape pairs never
appear), their prompts, and their VAE latents cached once per run; ODE-pair shards."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from causvid_core import world
from causvid_core.checkpoints import atomic_save_safetensors
from causvid_core.video_io import from_uint8


def clip(seed: int, index: int, frames: int, split: str = "train") -> tuple[world.ClipSpec, np.ndarray]:
    """Clip `index` of a data set: a pure function of (seed, index)."""
    rng = np.random.default_rng([seed, index])
    spec = world.sample_spec(rng, split)
    return spec, world.render(spec, frames)


def clip_batch(seed: int, indices: list[int], frames: int, split: str = "train") -> tuple[Tensor, list[str]]:
    """[B, 3, T, 64, 64] in [-1, 1] and the prompts."""
    specs, videos = zip(*(clip(seed, i, frames, split) for i in indices))
    return torch.cat([from_uint8(v) for v in videos]), [s.prompt for s in specs]


def crop_batch(seed: int, indices: list[int], frames: int, size: int, centre_frame: int, jitter: Tensor
               ) -> Tensor:
    """[B, 3, T, size, size] in [-1, 1]: object-centred windows of clips `indices`. Each clip is rolled so its
    object's centre at `centre_frame` lands at the window's centre plus jitter[b] ([B, 2] pixels, x and y), then
    the central size x size window is cut. The roll is exact: the world is a torus, so a rolled clip is
    another clip of the world (another start position). Most of a full frame is background the VAE learns in
    a few steps; a window spends the same pixels on the object."""
    h = world.FRAME_SIZE
    if not 0 < size <= h or size % 8:
        raise ValueError(f"crop size must be a multiple of 8 in (0, {h}], got {size}")
    lo = (h - size) // 2
    out = []
    for i, j in zip(indices, jitter.tolist()):
        spec, video = clip(seed, i, frames)
        x, y = world.positions(spec, np.array([centre_frame]))[0]
        shift = (round(h / 2 - y + j[1]), round(h / 2 - x + j[0]))  # rows, columns
        out.append(np.roll(video, shift, axis=(1, 2))[:, lo:lo + size, lo:lo + size])
    return torch.cat([from_uint8(v) for v in out])


def torus_roll(x: Tensor, u: Tensor) -> Tensor:
    """x [B, C, F, h, w] latents, u [B, 2] uniforms in [0, 1): sample b rolled by (floor(u[b, 0] h),
    floor(u[b, 1] w)) latent cells. For a circular-padded VAE this is exactly the latent of the same clip
    moved by 8x those pixels on the torus (VAE encoding commutes with such rolls), so it adds clips for free."""
    h, w = x.shape[-2:]
    cells = (u * torch.tensor([h, w], dtype=u.dtype)).long().tolist()
    return torch.stack([torch.roll(xb, (dy, dx), dims=(-2, -1)) for xb, (dy, dx) in zip(x, cells)])


def prompt_batch(seed: int, indices: list[int], split: str = "train") -> list[str]:
    return [world.sample_spec(np.random.default_rng([seed, i]), split).prompt for i in indices]


class LatentSet:
    """num_clips clips encoded once by the VAE: latents [N, C, F, h, w] and prompts, in one safetensors file."""

    def __init__(self, latents: Tensor, prompts: list[str]):
        self.latents, self.prompts = latents, prompts

    def __len__(self) -> int:
        return len(self.prompts)

    def batch(self, indices: list[int]) -> tuple[Tensor, list[str]]:
        idx = [i % len(self) for i in indices]
        return self.latents[idx].float(), [self.prompts[i] for i in idx]

    @classmethod
    @torch.no_grad()
    def build(cls, path: str | os.PathLike, vae, seed: int, num_clips: int, frames: int,
              chunk: int = 8, is_main: bool = True, wait=lambda: None) -> "LatentSet":
        """Encode (once; the file is reused by later stages and resumed runs)."""
        from safetensors.torch import load_file

        path = Path(path)
        if is_main and not path.exists():
            from tqdm import tqdm

            outs, prompts = [], []
            for s in tqdm(range(0, num_clips, chunk), desc="encode clips", dynamic_ncols=True):
                x, p = clip_batch(seed, list(range(s, min(s + chunk, num_clips))), frames)
                outs.append(vae.encode(x).half())
                prompts += p
            atomic_save_safetensors({"latents": torch.cat(outs)}, path, {"prompts": json.dumps(prompts)})
        wait()
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            prompts = json.loads(f.metadata()["prompts"])
        return cls(load_file(str(path))["latents"], prompts)


def save_ode_shard(path: str | os.PathLike, states: Tensor, prompts: list[str], timesteps: list[float]) -> None:
    """states [N, K+1, C, F, h, w]: the trajectory at the student's K steps, then its end (t = 0)."""
    atomic_save_safetensors({"states": states.contiguous()}, path,
                            {"prompts": json.dumps(prompts), "timesteps": json.dumps(timesteps)})


def load_ode_pairs(folder: str | os.PathLike) -> tuple[Tensor, list[str], list[float]]:
    from safetensors import safe_open

    states, prompts, timesteps = [], [], None
    for p in sorted(Path(folder).glob("shard_*.safetensors")):
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata()
            states.append(f.get_tensor("states"))
        prompts += json.loads(meta["prompts"])
        timesteps = json.loads(meta["timesteps"])
    if not states:
        raise FileNotFoundError(f"no ODE-pair shards (shard_*.safetensors) in {folder}")
    return torch.cat(states), prompts, timesteps
