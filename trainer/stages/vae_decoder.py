"""Decoder fine-tune: the VAE stage's encoder (and so every latent the DiT stages train on) frozen, its
decoder trained further on whole clips, at a decaying learning rate, with an edge term in the loss.

Why a stage of its own: an L1/MSE-trained decoder draws small shapes with soft, bloated edges (the
evaluator then confuses a blurred triangle with a circle), and fixing that needs more steps at a lower
learning rate plus a loss that prices blur (`vae.edge_l1`). With the encoder frozen the latents do not
change, so nothing the DiT stages learn depends on this stage, as Stable Diffusion's ft-MSE decoder was
trained. Latent statistics are the VAE stage's (same encoder).

The data are the teacher's cached latents (`latents.safetensors`, built here when the teacher has not
yet) of whole clips, paired with the same clips rendered again: no encoder pass per step, and every
frame position of a clip, so the causal caches are trained as they are used.

`decoder_res_blocks` grows the decoder: each level gets extra residual blocks that start as the
identity (last conv zeroed), so the grown decoder starts as exactly the VAE stage's and only adds room.
Measured on the decoder this replaces (same width, 400 steps on 9-frame windows): triangles came back
from a round trip as rounded bullets, 11 of 20 read as triangles.

`adv_weight` > 0 adds a patch discriminator (trainer/adversarial.py), trained from the first step; from
`adv_start` the decoder's loss adds its generator term at the VQGAN adaptive weight. The L1, MSE and edge
terms still hedge between the shapes a latent leaves open and draw their blurred average; the
discriminator prices exactly that average."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from causvid_core.vae import WanVAE, load_vae, save_vae
from causvid_core.vae_layers import AttentionBlock, ResidualBlock

from ..adversarial import Adversary, PatchDiscriminator, adaptive_weight, discriminator_loss, generator_loss
from ..config import TrainConfig
from ..data import clip_batch
from ..run import StageRun, train_steps
from ..schedules import lr_at
from .common import output, require
from .teacher import latent_set
from .vae import reconstruction_loss


def _levels(upsamples: nn.Sequential) -> list[list[list[nn.Module]]]:
    """The decoder's levels, each a list of units (a residual block and the attention after it), then
    the level's Resample as a unit of its own (the last level has none)."""
    levels: list[list[list[nn.Module]]] = [[]]
    for m in upsamples:
        if isinstance(m, ResidualBlock):
            levels[-1].append([m])
        elif isinstance(m, AttentionBlock):
            levels[-1][-1].append(m)
        else:  # Resample: closes the level
            levels[-1].append([m])
            levels.append([])
    return levels


def _residual(level: list[list[nn.Module]]) -> list[list[nn.Module]]:
    return [u for u in level if isinstance(u[0], ResidualBlock)]


def _other(level: list[list[nn.Module]]) -> list[list[nn.Module]]:
    return [u for u in level if not isinstance(u[0], ResidualBlock)]


@torch.no_grad()
def grow_decoder(vae: WanVAE, decoder_res_blocks: int) -> WanVAE:
    """A copy of vae whose decoder has `decoder_res_blocks` (+ 1) residual blocks per level: the old blocks
    first, then new ones whose last conv is zero (each starts as its identity shortcut), so the grown
    VAE decodes exactly as vae does."""
    old_blocks = vae.config.decoder_blocks
    if decoder_res_blocks < old_blocks:
        raise ValueError(f"decoder_res_blocks={decoder_res_blocks} would shrink the decoder "
                         f"({old_blocks}); it can only grow")
    grown = WanVAE(vae.config.replace(decoder_res_blocks=decoder_res_blocks)).to(vae.conv2.weight.dtype)
    own = {k: v for k, v in vae.state_dict().items() if not k.startswith("decoder.upsamples.")}
    missing, unexpected = grown.load_state_dict(own, strict=False)  # everything outside the levels, as is
    assert not unexpected and all(k.startswith("decoder.upsamples.") for k in missing), (missing, unexpected)
    for old_level, new_level in zip(_levels(vae.decoder.upsamples), _levels(grown.decoder.upsamples)):
        pairs = [*zip(_residual(old_level), _residual(new_level)), *zip(_other(old_level), _other(new_level))]
        for old_unit, new_unit in pairs:
            for o, n in zip(old_unit, new_unit):
                n.load_state_dict(o.state_dict())
        for unit in _residual(new_level)[len(_residual(old_level)):]:  # the new blocks: identity at the start
            unit[0].residual[6].weight.zero_()
            unit[0].residual[6].bias.zero_()
            for attn in unit[1:]:
                attn.proj.weight.zero_()
                attn.proj.bias.zero_()
    return grown


def run(cfg: TrainConfig, root: str | Path, accelerator=None) -> None:
    root = Path(root)
    sc = cfg.vae_decoder
    if sc.steps <= 0:
        return
    r = StageRun(root, "vae-decoder", cfg.seed, accelerator)
    if r.done:
        return
    data = latent_set(cfg, root, r)
    vae = load_vae(require(root, "vae")).float()
    if sc.decoder_res_blocks is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)  # the new blocks' inner convs start random: the same in every process
            vae = grow_decoder(vae, sc.decoder_res_blocks)
    for part in (vae.encoder, vae.conv1):
        part.requires_grad_(False)
    params = [p for p in vae.parameters() if p.requires_grad]  # conv2 + decoder
    opt = torch.optim.AdamW(params, lr=sc.lr, betas=(0.9, 0.99), weight_decay=sc.weight_decay)
    warmup = max(1, min(sc.warmup, sc.steps // 10))

    last = vae.decoder.head[-1].weight  # the adaptive adversarial weight is measured here
    adv = Adversary.build(lambda: PatchDiscriminator(sc.disc_channels), sc.lr_disc, cfg.seed, r) \
        if sc.adv_weight > 0 else None

    def loss_fn(step: int, idx: list[int], m) -> tuple[torch.Tensor, dict]:
        z, _ = data.batch(idx)  # [B, Z, F, h, w] normalised latents of whole clips
        x, _ = clip_batch(cfg.data.seed, [i % len(data) for i in idx], cfg.data.clip_frames)  # their pixels
        recon = m.decode_chunk(z, m.decoder_cache())  # one pass = the chunked decode (causal)
        loss, metrics = reconstruction_loss(recon, x, sc.fg_weight, sc.edge_weight)
        if adv is not None:
            metrics.update(adv.train(lambda disc: (discriminator_loss(disc, x, recon), {})))
            if step >= sc.adv_start:
                g_loss = generator_loss(adv.frozen(), recon)
                weight = sc.adv_weight * adaptive_weight(loss, g_loss, last)
                metrics.update(g_loss=g_loss.item(), adv_weight=weight.item())
                loss = loss + weight * g_loss
        return loss, metrics

    vae = train_steps(r, sc, vae, opt, loss_fn, lr_fn=lambda step: lr_at(step, sc.steps, sc.lr, warmup),
                      compilable=False, extra_state=adv.state() if adv is not None else None,
                      optional_state=Adversary.STATE).eval()
    if r.is_main:
        save_vae(vae, output(root, "vae-decoder"))
    r.finish(model=str(output(root, "vae-decoder")), steps=sc.steps,
             final=r.metrics()[-1] if r.metrics() else {})
