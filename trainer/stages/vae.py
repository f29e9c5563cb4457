"""The built-in model's VAE: a small Wan-design causal VAE trained on Shapes World clips.

Loss: L1 + MSE reconstruction of short clips, with the object's pixels weighted `fg_weight` times the
background's (the object covers 2-12% of a frame; an unweighted loss first learns the background and
then sits for hundreds of steps on a plateau where the object is drawn as background). The latent is the
encoder's mean (deterministic) unless `sample_latent`; a tiny KL keeps (mu, log_var) bounded.
The weights start from a unit-gain init with every residual block's last conv zeroed (each block starts
as its shortcut): with PyTorch's default init the same recipe stays near 12 dB for 400 steps.
`crop` > 0 trains on object-centred windows of torus-rolled clips (data.crop_batch) instead of whole frames:
the convolutional VAE still encodes whole frames, and the steps spend their pixels on the object.
`image_steps` > 0 first trains single frames (the first-frame path) from "inflated" weights, then video
(VAEStage's comment); with circular padding (`overrides.padding`) windows and whole frames are the same torus.
Afterwards the per-channel latent mean/std are measured on fresh clips and stored in the config, so the
DiT sees normalised latents, as Wan's do."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from causvid_core.vae import WanVAE, save_vae, vae_preset
from causvid_core.vae_layers import AttentionBlock, CausalConv3d, Resample, ResidualBlock

from ..config import TrainConfig
from ..data import clip_batch, crop_batch
from ..run import StageRun, train_steps
from ..schedules import lr_at
from .common import output


@torch.no_grad()
def init_weights(vae: WanVAE, inflate: bool = False) -> None:
    """Unit-gain conv init (std 1/sqrt(fan_in), zero bias); residual blocks and attention start as identity.
    inflate: every causal 3x3x3 conv starts with its past-frame taps zero and every temporal resampler as a
    pass-through of the current frame (down: the last frame of its window; up: the frame repeated), so the
    video VAE starts as an image autoencoder applied to each frame (what the image phase trains)."""
    for m in vae.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv3d)):
            m.weight.normal_(0.0, 1.0 / math.sqrt(m.weight[0].numel()))
            if m.bias is not None:
                m.bias.zero_()
    for m in vae.modules():
        if isinstance(m, ResidualBlock):
            m.residual[6].weight.zero_()
        elif isinstance(m, AttentionBlock):
            m.proj.weight.zero_()
    if not inflate:
        return
    for m in vae.modules():
        if isinstance(m, Resample) and m.stateful:  # time_conv [C_out, C, 3, 1, 1]: identity on the current frame
            w = m.time_conv.weight
            w.zero_()
            m.time_conv.bias.zero_()
            eye = torch.eye(w.shape[1], dtype=w.dtype)[:, :, None, None]
            for half in range(w.shape[0] // w.shape[1]):  # upsample: both output frames
                w[half * w.shape[1]:(half + 1) * w.shape[1], :, -1] = eye
        elif isinstance(m, CausalConv3d) and m.history > 0 and m.kernel_size[1] > 1:
            m.weight[:, :, :-1] = 0.0  # only the current frame's taps


def foreground(x: torch.Tensor, threshold: float = 0.05) -> torch.Tensor:
    """[B, 1, T, H, W] 1 where a pixel differs from its clip's background (per-channel median) colour."""
    bg = x.flatten(2).median(dim=2).values[:, :, None, None, None]
    return ((x - bg).abs().amax(1, keepdim=True) > threshold).to(x.dtype)


def reconstruct(vae: WanVAE, x: torch.Tensor, eps: Optional[torch.Tensor] = None, history: int = 0
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Encode, latent = mu (or mu + sigma * eps), decode (unnormalised latent space).

    history > 0: the clip's first 1 + history frames are only a burn-in, run without gradient to fill
    the causal caches; the rest (a multiple of the time factor) is reconstructed and returned. Without
    it the VAE only learns positions inside its short training clips: its causal convs see further back
    than a clip, and later frames of a long video come out wrong (measured: error 24-45/255 at frames
    16-32 after 9-frame training, 4/255 after burn-in training)."""
    enc, dec = vae.encoder_cache(), vae.decoder_cache()
    if history:
        tf = vae.config.time_factor
        with torch.no_grad():
            past = [vae.encode_moments(x[:, :, :1], enc)[0]]
            past += [vae.encode_moments(x[:, :, s:s + tf], enc)[0] for s in range(1, 1 + history, tf)]
            vae.decoder(vae.conv2(torch.cat(past, 2)), dec)
        x = x[:, :, 1 + history:]
    mu, log_var = vae.encode_moments(x, enc if history else None)
    mu, log_var = mu.float(), log_var.float().clamp(-30.0, 20.0)  # float32 also under autocast
    z = mu if eps is None else mu + torch.exp(0.5 * log_var) * eps
    return vae.decoder(vae.conv2(z), dec).float(), mu, log_var


def edge_l1(d: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Weighted L1 of the spatial finite differences of d = recon - x: zero only when the edges are where
    the target's are and as steep (a blurred edge costs its full height, spread or not)."""
    dx = (d[..., :, 1:] - d[..., :, :-1]).abs() * torch.maximum(w[..., :, 1:], w[..., :, :-1])
    dy = (d[..., 1:, :] - d[..., :-1, :]).abs() * torch.maximum(w[..., 1:, :], w[..., :-1, :])
    return (dx.mean() + dy.mean()) / w.mean()


def reconstruction_loss(recon: torch.Tensor, x: torch.Tensor, fg_weight: float, edge_weight: float = 0.0
                        ) -> tuple[torch.Tensor, dict]:
    """Object-weighted L1 + MSE (+ edge_weight x edge L1) of recon against x, both [B, 3, T, H, W] in [-1, 1],
    and the logged metrics (PSNR of the frame and of the object's pixels; 4 = the [-1, 1] range squared)."""
    fg = foreground(x)
    w = 1.0 + fg_weight * fg
    d = recon - x
    loss = (w * (d.abs() + d * d)).mean() / w.mean()
    metrics = {}
    if edge_weight:
        edge = edge_l1(d, w)
        loss = loss + edge_weight * edge
        metrics["edge"] = edge.item()
    with torch.no_grad():
        se = d.pow(2)
        mse = se.mean()
        fg_mse = (se * fg).sum() / (fg.sum() * 3).clamp_min(1.0)
        metrics.update(l1=d.abs().mean().item(), psnr=(10 * torch.log10(4.0 / mse.clamp_min(1e-10))).item(),
                       fg_psnr=(10 * torch.log10(4.0 / fg_mse.clamp_min(1e-10))).item())
    return loss, metrics


@torch.no_grad()
def latent_stats(vae: WanVAE, seed: int, clips: int, frames: int) -> tuple[list[float], list[float]]:
    mus = []
    for s in range(0, clips, 8):
        x, _ = clip_batch(seed, list(range(s, min(s + 8, clips))), frames)
        mus.append(vae.encode_moments(x)[0])
    mu = torch.cat(mus).transpose(0, 1).flatten(1)  # [Z, N]
    return mu.mean(1).tolist(), mu.std(1).clamp_min(1e-3).tolist()


def run(cfg: TrainConfig, root: str | Path, accelerator=None) -> None:
    root = Path(root)
    r = StageRun(root, "vae", cfg.seed, accelerator)
    if r.done:
        return
    sc = cfg.vae
    torch.manual_seed(cfg.seed)
    vae = WanVAE(vae_preset(sc.preset).replace(**sc.overrides))
    init_weights(vae, inflate=sc.image_steps > 0)
    opt = torch.optim.AdamW(vae.parameters(), lr=sc.lr, betas=(0.9, 0.99), weight_decay=sc.weight_decay)
    data_seed = cfg.data.seed + 7  # not the DiT stages' clips
    image_seed = data_seed + 2  # the image phase's clips (image_batch_factor per index)
    warmup = max(1, min(sc.warmup, sc.steps // 10))
    video_lr = sc.lr if sc.video_lr is None else sc.video_lr

    def lr_fn(step: int) -> float:
        if step < sc.image_steps:
            return lr_at(step, sc.image_steps, sc.lr, warmup, decay_from=sc.image_steps)
        return lr_at(step - sc.image_steps, sc.steps - sc.image_steps, video_lr, warmup,
                     decay_from=sc.steps if sc.decay_from is None else sc.decay_from - sc.image_steps)

    def before_step(step: int) -> None:
        if step == sc.image_steps > 0:  # the video phase starts with fresh optimizer moments
            opt.state.clear()

    def image_loss(step: int, idx: list[int], m) -> tuple[torch.Tensor, dict]:
        k = sc.image_batch_factor
        frames = [i * k + j for i in idx for j in range(k)]
        jitter = (r.rand(step, frames, (2,), purpose=6) * 2 - 1) * sc.crop_jitter
        x = crop_batch(image_seed, frames, 1, sc.image_crop, 0, jitter)  # [B * k, 3, 1, c, c]
        recon, _, _ = reconstruct(m, x)
        return reconstruction_loss(recon, x, sc.fg_weight)

    def loss_fn(step: int, idx: list[int], m) -> tuple[torch.Tensor, dict]:
        if step < sc.image_steps:
            return image_loss(step, idx, m)
        tf = m.config.time_factor
        # history shared by the step's samples: 0 (the whole clip, first frame included) .. burn_in_frames
        history = tf * int(r.rand(step, idx[:1], purpose=5)[0] * (sc.burn_in_frames // tf + 1))
        if sc.crop:  # object-centred windows, the object centred mid-way through the reconstructed frames
            jitter = (r.rand(step, idx, (2,), purpose=6) * 2 - 1) * sc.crop_jitter  # [B, 2] pixels
            centre = (1 + history if history else 0) + sc.clip_frames // 2
            x = crop_batch(data_seed, idx, sc.clip_frames + history, sc.crop, centre, jitter)
        else:
            x, _ = clip_batch(data_seed, idx, sc.clip_frames + history)
        eps = None
        if sc.sample_latent:
            Z, sf = m.config.z_dim, m.config.space_factor
            F_lat = (sc.clip_frames - 1) // tf + (0 if history else 1)
            eps = r.randn(step, idx, (Z, F_lat, x.shape[3] // sf, x.shape[4] // sf))
        recon, mu, log_var = reconstruct(m, x, eps, history)
        x = x[:, :, 1 + history:] if history else x
        rec, metrics = reconstruction_loss(recon, x, sc.fg_weight)
        kl = 0.5 * (mu.pow(2) + log_var.exp() - 1 - log_var).mean()
        return rec + sc.kl_weight * kl, {**metrics, "kl": kl.item()}

    vae = train_steps(r, sc, vae, opt, loss_fn, compilable=False, lr_fn=lr_fn, before_step=before_step).eval()
    mean, std = latent_stats(vae, data_seed + 1, sc.stats_clips, sc.clip_frames)
    final = WanVAE(vae.config.replace(latent_mean=tuple(mean), latent_std=tuple(std)))
    final.load_state_dict(vae.state_dict())
    if r.is_main:
        save_vae(final, output(root, "vae"))
    r.finish(model=str(output(root, "vae")), steps=sc.steps, latent_mean=mean, latent_std=std,
             final=r.metrics()[-1] if r.metrics() else {})
