"""The decoder fine-tune's adversarial term: the patch discriminator respects the torus, the adaptive
weight balances the two gradients at the decoder's last layer, and the hinge losses train a
discriminator that tells sharp frames from blurred ones."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from trainer.adversarial import PatchDiscriminator, adaptive_weight, discriminator_loss, generator_loss


def test_discriminator_is_equivariant_on_the_torus():
    """Shapes World wraps: a clip rolled by one patch (8 px for three stride-2 layers) gives the same
    logits rolled by one cell, so an object crossing an edge is judged as anywhere else."""
    torch.manual_seed(0)
    disc = PatchDiscriminator((8, 16, 16), groups=4).eval()
    x = torch.rand(2, 3, 3, 64, 64) * 2 - 1
    out = disc(x)
    assert out.shape == (6, 1, 8, 8)
    rolled = disc(torch.roll(x, shifts=(8, -16), dims=(3, 4)))
    torch.testing.assert_close(rolled, torch.roll(out, shifts=(1, -2), dims=(2, 3)), atol=1e-5, rtol=1e-5)


def test_adaptive_weight_is_the_ratio_of_gradient_norms():
    w = torch.randn(4, 3, requires_grad=True)
    x = torch.randn(5, 3)
    rec = (x @ w.t()).square().mean()
    adv = -7.0 * rec  # the same gradient direction, 7x the size
    torch.testing.assert_close(adaptive_weight(rec, adv, w), torch.tensor(1 / 7), atol=1e-4, rtol=1e-4)
    assert w.grad is None  # measured with autograd.grad: nothing is accumulated
    rec.backward()  # the graph is kept for the real backward pass
    assert w.grad is not None


def _blur(x: torch.Tensor) -> torch.Tensor:
    B, C, T, H, W = x.shape
    frames = x.transpose(1, 2).reshape(B * T, C, H, W)
    k = torch.ones(C, 1, 5, 5) / 25
    out = F.conv2d(F.pad(frames, (2, 2, 2, 2), mode="circular"), k, groups=C)
    return out.reshape(B, T, C, H, W).transpose(1, 2)


def test_hinge_losses_train_a_discriminator_to_tell_sharp_from_blurred():
    """A discriminator trained with discriminator_loss separates sharp squares from their blur, and the
    generator loss is then higher on the blurred frames: the gradient a decoder gets points at sharpness."""
    torch.manual_seed(0)
    disc = PatchDiscriminator((8, 16, 16), groups=4)
    opt = torch.optim.Adam(disc.parameters(), lr=2e-3, betas=(0.5, 0.9))

    def batch() -> torch.Tensor:
        x = -torch.ones(4, 3, 2, 64, 64)
        for b in range(4):
            i, j = torch.randint(0, 48, (2,)).tolist()
            x[b, :, :, i:i + 14, j:j + 14] = torch.rand(3, 1, 1, 1)
        return x

    start = discriminator_loss(disc, batch(), _blur(batch())).item()
    for _ in range(150):
        real = batch()
        loss = discriminator_loss(disc, real, _blur(real))
        opt.zero_grad()
        loss.backward()
        opt.step()
    real = batch()
    with torch.no_grad():
        end = discriminator_loss(disc, real, _blur(real)).item()
        assert generator_loss(disc, _blur(real)) > generator_loss(disc, real) + 0.5
    assert end < 0.5 * start, (start, end)
