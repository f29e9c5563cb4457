"""Decoder fine-tune: the VAE stage's encoder (and so every latent the DiT stages train on) frozen, its
decoder trained further at a decaying learning rate with an edge term in the loss.

Why a stage of its own: an L1/MSE-trained decoder draws small shapes with soft, bloated edges (the
evaluator then confuses a blurred triangle with a circle), and fixing that needs more steps at a lower
learning rate plus a loss that prices blur (`vae.edge_l1`). With the encoder frozen the latents do not
change, so this stage can run beside the teacher and every DiT stage, as Stable Diffusion's ft-MSE
decoder was trained. Latent statistics are the VAE stage's (same encoder)."""
from __future__ import annotations

from pathlib import Path

import torch

from causvid_core.vae import load_vae, save_vae

from ..config import TrainConfig
from ..data import clip_batch
from ..run import StageRun, train_steps
from ..schedules import lr_at
from .common import output, require
from .vae import reconstruction_loss


def run(cfg: TrainConfig, root: str | Path, accelerator=None) -> None:
    root = Path(root)
    sc = cfg.vae_decoder
    if sc.steps <= 0:
        return
    r = StageRun(root, "vae-decoder", cfg.seed, accelerator)
    if r.done:
        return
    vae = load_vae(require(root, "vae")).float()
    for part in (vae.encoder, vae.conv1):
        part.requires_grad_(False)
    params = [p for p in vae.parameters() if p.requires_grad]  # conv2 + decoder
    opt = torch.optim.AdamW(params, lr=sc.lr, betas=(0.9, 0.99), weight_decay=sc.weight_decay)
    data_seed = cfg.data.seed + 7  # the VAE stage's clips
    warmup = max(1, min(sc.warmup, sc.steps // 10))

    def loss_fn(step: int, idx: list[int], m) -> tuple[torch.Tensor, dict]:
        tf = m.config.time_factor
        history = tf * int(r.rand(step, idx[:1], purpose=5)[0] * (sc.burn_in_frames // tf + 1))
        x, _ = clip_batch(data_seed + 1000, idx, sc.clip_frames + history)  # fresh clips
        with torch.no_grad():
            mu = m.encode_moments(x)[0]  # [B, Z, f, h, w] whole clip = chunked (causal)
        cache = m.decoder_cache()
        if history:
            past = 1 + history // tf  # latents of the burn-in frames
            with torch.no_grad():
                m.decoder(m.conv2(mu[:, :, :past]), cache)
            mu, x = mu[:, :, past:], x[:, :, 1 + history:]
        recon = m.decoder(m.conv2(mu), cache)
        return reconstruction_loss(recon, x, sc.fg_weight, sc.edge_weight)

    vae = train_steps(r, sc, vae, opt, loss_fn, lr_fn=lambda step: lr_at(step, sc.steps, sc.lr, warmup)).eval()
    if r.is_main:
        save_vae(vae, output(root, "vae-decoder"))
    r.finish(model=str(output(root, "vae-decoder")), steps=sc.steps,
             final=r.metrics()[-1] if r.metrics() else {})
