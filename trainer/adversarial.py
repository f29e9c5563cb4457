"""The adversarial terms of the decoder fine-tune and of ODE init. `Adversary` holds a discriminator and
its optimiser for either stage. Decoder: a small patch discriminator on single frames, hinge losses, and
the adaptive weight of taming-transformers (VQGAN): the adversarial gradient at the decoder's last layer
scaled to the reconstruction gradient's size, so one weight works at any loss scale. ODE init: a
matching-aware latent discriminator conditioned on the prompt (`LatentDiscriminator`).

Why: an L1/MSE decoder asked to draw a shape its latent leaves slightly uncertain draws the average,
a blurred dome that the evaluator reads as a circle, although a latent shape classifier still reads
the triangle in those latents (session 9). A discriminator prices that blur directly."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Adversary:
    """A discriminator and its optimiser inside a stage's loss: `train` takes one discriminator step, `frozen`
    hands the discriminator to the generator's loss, which flows through it while its weights stay.
    `state` joins the stage's checkpoint (keys STATE, which may be missing from a state saved without it)."""
    STATE = ("disc", "disc_optimizer")

    def __init__(self, disc: nn.Module, opt: torch.optim.Optimizer):
        self.disc, self.opt = disc, opt

    @classmethod
    def build(cls, make: Callable[[], nn.Module], lr: float, seed: int, run) -> "Adversary":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # every process (and every resume) builds the same initial discriminator
            disc = make()
        opt = torch.optim.AdamW(disc.parameters(), lr=lr, betas=(0.5, 0.9), weight_decay=0.0)
        return cls(*run.acc.prepare(disc, opt))

    def state(self) -> dict:
        return {"disc": self.disc, "disc_optimizer": self.opt}

    def train(self, loss_of: Callable[[nn.Module], tuple[Tensor, dict]]) -> dict:
        """One step on loss_of(disc) -> (loss, metrics); returns the metrics with d_loss."""
        self.disc.requires_grad_(True)
        self.opt.zero_grad(set_to_none=True)
        loss, metrics = loss_of(self.disc)
        loss.backward()
        self.opt.step()
        return {**metrics, "d_loss": loss.item()}

    def frozen(self) -> nn.Module:
        self.disc.requires_grad_(False)
        return self.disc


class PatchDiscriminator(nn.Module):
    """Frames [B, 3, T, H, W] -> patch logits [B * T, 1, H / 2^n, W / 2^n] (n = len(channels)).

    Circular padding: Shapes World is a torus, so an edge-crossing shape is real, not an artefact."""

    def __init__(self, channels: Sequence[int] = (32, 64, 128), groups: int = 8):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for i, c in enumerate(channels):
            layers += [nn.Conv2d(c_in, c, 4, stride=2, padding=1, padding_mode="circular"),
                       nn.GroupNorm(groups, c) if i else nn.Identity(), nn.LeakyReLU(0.2)]
            c_in = c
        layers.append(nn.Conv2d(c_in, 1, 3, padding=1, padding_mode="circular"))
        self.net = nn.Sequential(*layers)

    def forward(self, video: Tensor) -> Tensor:
        B, C, T, H, W = video.shape
        return self.net(video.transpose(1, 2).reshape(B * T, C, H, W))


def discriminator_loss(disc: nn.Module, real: Tensor, fake: Tensor) -> Tensor:
    """Hinge loss of the discriminator (fake is detached here)."""
    return F.relu(1.0 - disc(real)).mean() + F.relu(1.0 + disc(fake.detach())).mean()


def generator_loss(disc: nn.Module, fake: Tensor) -> Tensor:
    return -disc(fake).mean()


def adaptive_weight(rec_loss: Tensor, adv_loss: Tensor, last_weight: Tensor, max_weight: float = 1e4) -> Tensor:
    """|d rec / d last| / |d adv / d last| (detached), the VQGAN balance of the two terms."""
    g_rec = torch.autograd.grad(rec_loss, last_weight, retain_graph=True)[0]
    g_adv = torch.autograd.grad(adv_loss, last_weight, retain_graph=True)[0]
    return (g_rec.norm() / (g_adv.norm() + 1e-4)).clamp(0.0, max_weight).detach()



class LatentDiscriminator(nn.Module):
    """Is a clean latent clip [B, C, F, h, w] a real clip of its prompt? Prompt tokens [B, L, D_text] are
    mean-pooled and enter by projection (Miyato and Koyama 2018): logit = w . h + <embed(text), h>, h the
    max-pooled features of a 3D conv stack (circular in space, as the world wraps; causal zero padding in
    time). Trained on real latents (true), the generator's (false) and real latents under a prompt with one
    attribute word swapped (false), it checks the attributes a prompt names, not only realism [B]."""

    def __init__(self, in_dim: int, text_dim: int, width: int = 64, depth: int = 3):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv3d(in_dim if i == 0 else width, width, 3) for i in range(depth))
        self.out = nn.Linear(width, 1)
        self.embed = nn.Linear(text_dim, width, bias=False)

    def forward(self, z: Tensor, text: Tensor) -> Tensor:
        h = z.float()
        for conv in self.convs:
            h = F.pad(F.pad(h, (1, 1, 1, 1, 0, 0), mode="circular"), (0, 0, 0, 0, 2, 0))  # [B, C, F + 2, h + 2, w + 2]
            h = F.silu(conv(h))
        h = h.amax(dim=(2, 3, 4))  # [B, width]
        return self.out(h).squeeze(-1) + (self.embed(text.float().mean(dim=1)) * h).sum(-1)


def matching_d_loss(disc: nn.Module, real: Tensor, real_text: Tensor, fake: Tensor, fake_text: Tensor,
                    mismatched_text: Tensor) -> tuple[Tensor, dict]:
    """Non-saturating loss of a matching-aware discriminator (Reed et al. 2016): real clips with their prompts
    are true; the generator's clips (detached) and real clips with a mismatched prompt are false."""
    r, f, m = disc(real, real_text), disc(fake.detach(), fake_text), disc(real, mismatched_text)
    loss = F.softplus(-r).mean() + 0.5 * (F.softplus(f).mean() + F.softplus(m).mean())
    return loss, {"d_real": r.mean().item(), "d_fake": f.mean().item(), "d_mismatch": m.mean().item()}


def matching_g_loss(disc: nn.Module, fake: Tensor, text: Tensor) -> Tensor:
    """The generator's non-saturating loss against the matching-aware discriminator."""
    return F.softplus(-disc(fake, text)).mean()
