"""The matching-aware latent discriminator as ODE init uses it (trainer/adversarial.py): real
clips of the data set under their own prompts are true; the generator's clean latents, and real clips under a
prompt with one attribute word swapped, are false. So it checks the attributes a prompt names, not only realism.

In DMD (session 10, generator term on the rollout, discriminator stepping with the critic) it did not help:
1200 DMD steps gave 79.2% / 20.8% all-four (in distribution / held-out pairs) with it and 81.2% / 29.2%
without; after an ODE init without it, triangles stayed 1 of 20. So only ODE init uses it."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from torch import Tensor

from ..adversarial import Adversary, LatentDiscriminator, matching_d_loss, matching_g_loss
from ..config import ODEInitStage, TrainConfig
from ..data import LatentSet
from ..losses import contrast_prompts
from .common import encode
from .teacher import latent_set


def mismatched_prompts(step: int, prompts: list[str], words: list) -> list[str]:
    """The prompts with one word of a group swapped for a rival (the group and rival cycling with the step);
    without word groups, each clip under its neighbour's prompt (mostly another prompt)."""
    swapped = contrast_prompts(prompts, words)  # K x [B]; [] without word groups
    return swapped[step % len(swapped)] if swapped else prompts[1:] + prompts[:1]


class MatchingGame:
    """The discriminator with its data: `train` takes one discriminator step against a generated batch;
    from adv_start (`active`) the generator's loss adds adv_weight x `g_loss`."""

    def __init__(self, sc: ODEInitStage, adv: Adversary, data: LatentSet, text):
        self.sc, self.adv, self.data, self.text = sc, adv, data, text

    @classmethod
    def build(cls, sc: ODEInitStage, cfg: TrainConfig, root: Path, run, text) -> Optional["MatchingGame"]:
        """None when the section's adv_weight is 0 (off)."""
        if sc.adv_weight <= 0:
            return None
        data = latent_set(cfg, root, run)
        text_dim = encode(text, [""]).shape[-1]
        adv = Adversary.build(lambda: LatentDiscriminator(data.latents.shape[1], text_dim, sc.disc_width),
                              sc.lr_disc, cfg.seed, run)
        return cls(sc, adv, data, text)

    def state(self) -> dict:
        return self.adv.state()

    def train(self, step: int, idx: list[int], fake: Tensor, fake_cond: Tensor) -> dict:
        """One discriminator step: real clips idx of the data set against fake [B, C, F, h, w] (detached)."""
        real, prompts = self.data.batch(idx)
        wrong = encode(self.text, mismatched_prompts(step, prompts, self.sc.mismatch_words))
        return self.adv.train(lambda disc: matching_d_loss(disc, real, encode(self.text, prompts), fake,
                                                           fake_cond, wrong))

    def active(self, step: int) -> bool:
        return step >= self.sc.adv_start

    def g_loss(self, fake: Tensor, cond: Tensor) -> Tensor:
        """The generator's non-saturating term, unweighted (the discriminator's weights stay)."""
        return matching_g_loss(self.adv.frozen(), fake, cond)
