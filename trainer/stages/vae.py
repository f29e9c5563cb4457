"""The built-in model's VAE: a small Wan-design causal VAE trained on Shapes World clips.

Loss: L1 + MSE reconstruction of short clips plus a small KL on (mu, log_var) with a sampled latent.
Afterwards the per-channel latent mean/std are measured on fresh clips and stored in the config, so the
DiT sees normalised latents, as Wan's do."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from causvid_core.vae import WanVAE, save_vae, vae_preset

from ..config import TrainConfig
from ..data import clip_batch
from ..run import StageRun, train_steps
from .common import output


def reconstruct(vae: WanVAE, x: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Whole-clip encode, reparameterised sample, whole-clip decode (unnormalised latent space)."""
    mu, log_var = vae.encode_moments(x)
    log_var = log_var.clamp(-30.0, 20.0)
    z = mu + torch.exp(0.5 * log_var) * eps
    recon = vae.decoder(vae.conv2(z), vae.decoder_cache())
    return recon, mu, log_var


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
    opt = torch.optim.AdamW(vae.parameters(), lr=sc.lr, betas=(0.9, 0.99), weight_decay=sc.weight_decay)
    data_seed = cfg.data.seed + 7  # not the DiT stages' clips

    def loss_fn(step: int, idx: list[int], m) -> tuple[torch.Tensor, dict]:
        x, _ = clip_batch(data_seed, idx, sc.clip_frames)
        Z, tf, sf = m.config.z_dim, m.config.time_factor, m.config.space_factor
        F_lat = (x.shape[2] - 1) // tf + 1
        eps = r.randn(step, idx, (Z, F_lat, x.shape[3] // sf, x.shape[4] // sf))
        recon, mu, log_var = reconstruct(m, x, eps)
        l1, mse = F.l1_loss(recon, x), F.mse_loss(recon, x)
        kl = 0.5 * (mu.pow(2) + log_var.exp() - 1 - log_var).mean()
        psnr = (10 * torch.log10(4.0 / mse.detach().clamp_min(1e-10))).item()
        return l1 + mse + sc.kl_weight * kl, {"l1": l1.item(), "psnr": psnr, "kl": kl.item()}

    vae = train_steps(r, sc, vae, opt, loss_fn).eval()
    mean, std = latent_stats(vae, data_seed + 1, sc.stats_clips, sc.clip_frames)
    final = WanVAE(vae.config.replace(latent_mean=tuple(mean), latent_std=tuple(std)))
    final.load_state_dict(vae.state_dict())
    if r.is_main:
        save_vae(final, output(root, "vae"))
    r.finish(model=str(output(root, "vae")), steps=sc.steps, latent_mean=mean, latent_std=std,
             final=r.metrics()[-1] if r.metrics() else {})
