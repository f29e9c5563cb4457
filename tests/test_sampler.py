"""Flow utilities and the teacher-side samplers: grid rule, warped step presets, solver convergence
on a flow with a known solution, guidance arithmetic, the causal many-step sampler."""
from __future__ import annotations

import pytest
import torch

from causvid_core.flow import STEP_PRESETS, FlowGrid, shift_sigma, step_preset
from causvid_core.sampler import flow_sigmas, guided_flow, sample_causal_teacher, sample_flow
from conftest import assert_close, tiny_model


def test_step_presets_are_the_published_lists():
    assert step_preset("causvid-3step") == (8.0, [1000.0, 757.0, 522.0])
    shift, steps = step_preset("causvid-4step")
    assert shift == 8.0 and [round(s, 1) for s in steps] == [1000.0, 960.0, 888.9, 727.3]
    shift, steps = step_preset("self-forcing-4step")
    assert shift == 5.0 and [round(s, 1) for s in steps] == [1000.0, 937.5, 833.3, 625.0]
    with pytest.raises(ValueError, match="unknown step preset"):
        step_preset("turbo")
    assert set(STEP_PRESETS) == {"causvid-3step", "causvid-4step", "self-forcing-4step"}


def test_grid_uses_the_nearest_point_and_never_zero():
    grid = FlowGrid(8.0)
    assert grid.sigma(1000.0) == 1.0
    # t = 0 maps to the smallest grid sigma (about 0.008 at shift 8), not 0
    assert 0.007 < float(grid.sigma(0.0)) < 0.009
    t = torch.tensor([757.0, 522.0])
    nearest = grid.timesteps[(grid.timesteps.unsqueeze(0) - t.unsqueeze(1)).abs().argmin(1)]
    assert torch.equal(grid.sigma(t), grid.sigmas[(grid.timesteps.unsqueeze(0) - t.unsqueeze(1)).abs().argmin(1)])
    assert (nearest - t).abs().max() < 1.0
    assert abs(float(shift_sigma(0.5, 3.0)) - 0.75) < 1e-12


def test_flow_x0_round_trip_and_add_noise():
    grid = FlowGrid(5.0)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 3, 2, 2, generator=g), torch.randn(2, 4, 3, 2, 2, generator=g)
    t = torch.tensor([937.5, 100.0])
    xt = grid.add_noise(x0, noise, t)
    flow = noise - x0
    assert_close(grid.flow_to_x0(flow, xt, t), x0, atol=1e-5, what="x0 from the true flow")
    assert_close(grid.x0_to_flow(x0, xt, t), flow, atol=1e-4, what="flow from x0")
    tf = torch.tensor([[937.5, 937.5, 0.0], [100.0, 100.0, 100.0]])  # per-frame timesteps
    xt2 = grid.add_noise(x0, noise, tf)
    assert_close(xt2[:, :, 2][1], xt[:, :, 2][1], atol=1e-6, what="per-frame")
    assert (xt2[0, :, 2] - x0[0, :, 2]).abs().max() < 0.05  # t = 0: (almost) clean


def _gaussian_velocity(m: float, c: float):
    """The exact flow of data N(m, c^2): its ODE maps noise e to m + c * e."""
    def velocity(x, t):
        s = (t.double() / 1000).view(-1, *[1] * (x.dim() - 1))
        xd = x.double()
        x0 = m + (1 - s) * c ** 2 / ((1 - s) ** 2 * c ** 2 + s ** 2) * (xd - (1 - s) * m)
        return ((xd - x0) / s).float()
    return velocity


@pytest.mark.parametrize("solver,order", [("euler", 1), ("dpmpp2m", 2)])
def test_solvers_converge_to_the_exact_solution(solver, order):
    eps = torch.randn(2, 4, 3, 2, 2, generator=torch.Generator().manual_seed(1))
    exact = 0.7 + 0.3 * eps
    errs = []
    for n in (10, 20, 40):
        x, _ = sample_flow(_gaussian_velocity(0.7, 0.3), eps, flow_sigmas(n, 3.0), solver)
        errs.append((x - exact).abs().max().item())
    assert errs[0] > errs[1] > errs[2]
    assert errs[1] / errs[2] > (1.6 if order == 1 else 3.0), errs
    if solver == "dpmpp2m":
        x, _ = sample_flow(_gaussian_velocity(0.7, 0.3), eps, flow_sigmas(40, 3.0), "euler")
        assert errs[2] < (x - exact).abs().max().item() / 3  # better than Euler at equal steps


def test_trajectory_keeps_requested_states():
    eps = torch.randn(1, 2, 1, 1, 1)
    x, kept = sample_flow(_gaussian_velocity(0.0, 1.0), eps, flow_sigmas(8, 1.0), keep=(0, 2, 4, -1))
    assert sorted(kept) == [0, 2, 4, 8] and torch.equal(kept[0], eps) and torch.equal(kept[8], x)


def test_stochastic_steps_mix_predicted_and_fresh_noise():
    """eta 0 is the Euler ODE bit for bit; eta > 0 takes each step to (1 - s') x0_hat + s' (sqrt(1 - eta^2)
    eps_hat + eta z) with the caller's fresh noise z; eta 1 re-noises x0_hat with z alone (ancestral)."""
    torch.manual_seed(0)
    eps, sigmas = torch.randn(3, 2, 1, 2, 2), flow_sigmas(6, 3.0)
    fresh = [torch.randn(3, 2, 1, 2, 2) for _ in range(6)]

    def velocity(x, t):  # a flow that depends on x and t, so a wrong step formula shows
        return torch.tanh(x) * (0.3 + t.view(-1, 1, 1, 1, 1) / 1000) - 0.5

    ode, _ = sample_flow(velocity, eps, sigmas)
    assert torch.equal(sample_flow(velocity, eps, sigmas, eta=0.0, step_noise=lambda i: fresh[i])[0], ode)
    for eta in (0.5, 1.0):
        x = eps.double()
        for i in range(6):
            s, s_next = float(sigmas[i]), float(sigmas[i + 1])
            v = velocity(x.float(), torch.full((3,), s * 1000.0)).double()
            x0, eps_hat = x - s * v, x + (1 - s) * v
            x = x0 if s_next == 0 else (1 - s_next) * x0 + s_next * ((1 - eta ** 2) ** 0.5 * eps_hat + eta * fresh[i])
        out, _ = sample_flow(velocity, eps, sigmas, eta=eta, step_noise=lambda i: fresh[i])
        assert_close(out, x.float(), atol=1e-6, what=f"eta {eta}")
        assert not torch.allclose(out, ode, atol=1e-3)
    with pytest.raises(ValueError, match="step_noise"):
        sample_flow(velocity, eps, sigmas, eta=0.5)
    with pytest.raises(ValueError, match="euler"):
        sample_flow(velocity, eps, sigmas, "dpmpp2m", eta=0.5, step_noise=lambda i: fresh[i])


def test_guidance_is_uncond_plus_scale_times_difference():
    model = tiny_model()
    x = torch.randn(1, 16, 3, 2, 2)
    t = torch.tensor([500.0])
    c, u = torch.randn(1, 4, 24), torch.zeros(1, 4, 24)
    with torch.no_grad():
        vc, vu = model(x, t, c), model(x, t, u)
        assert_close(guided_flow(model, x, t, c, u, 4.0), vu + 4.0 * (vc - vu), atol=1e-5, what="cfg")
        assert_close(guided_flow(model, x, t, c, u, 1.0), vc, atol=0, rtol=0, what="g = 1 is one pass")
        n1, n2 = torch.randn(1, 4, 24), torch.randn(1, 4, 24)
        vn = (model(x, t, n1) + model(x, t, n2)) / 2
        assert_close(guided_flow(model, x, t, c, u, 4.0, negatives=[n1, n2], contrast=2.0),
                     vu + 4.0 * (vc - vu) + 2.0 * (vc - vn), atol=1e-5, what="contrastive guidance")


@pytest.mark.parametrize("contrast", [0.0, 1.5])
def test_causal_teacher_sampler_equals_a_cache_free_computation(contrast):
    """Each chunk integrated with many guided steps, conditioned on the clean past; one cache per
    conditioning (and per contrastive negative) in the sampler, the block-causal forward over
    [past; chunk] here."""
    model = tiny_model(seed=2)
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(1, 16, 6, 2, 2, generator=g)
    c, u = torch.randn(1, 4, 24, generator=g), torch.zeros(1, 4, 24)
    negs = [torch.randn(1, 4, 24, generator=g) for _ in range(2)]
    with torch.no_grad():
        out = sample_causal_teacher(model, noise, c, u, chunk_frames=3, steps=6, shift=3.0, guidance=2.0,
                                    negatives=negs, contrast=contrast)
        past = []
        for s in (0, 3):
            def velocity(x, t, s=s):
                seq = torch.cat(past + [x], dim=2)
                tt = torch.cat([torch.zeros(1, s), t], dim=1)
                vc, vu, *vn = (model(seq, tt, ctx, chunk_frames=3)[:, :, s:] for ctx in [c, u, *negs])
                return vu + 2.0 * (vc - vu) + contrast * (vc - (vn[0] + vn[1]) / 2)
            x0, _ = sample_flow(velocity, noise[:, :, s:s + 3], flow_sigmas(6, 3.0), per_frame=True)
            past.append(x0)
    assert_close(out, torch.cat(past, dim=2), atol=1e-4, what="causal teacher")
