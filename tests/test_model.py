"""The DiT: Wan2.1 key layout, config presets, the three forward modes and their validation."""
from __future__ import annotations

import json

import pytest
import torch

from causvid_core.checkpoints import infer_dit_config
from causvid_core.config import DIT_PRESETS, DiTConfig, dit_preset
from causvid_core.model import WanDiT, chunk_sizes
from conftest import MANIFESTS, assert_close, tiny_model


@pytest.mark.parametrize("name", ["wan2.1-t2v-1.3b", "wan2.1-t2v-14b", "wan2.1-i2v-14b"])
def test_presets_match_the_released_state_dicts(name, shared_dir):
    manifest = json.loads(MANIFESTS.read_text())[name]
    with torch.device("meta"):
        model = WanDiT(dit_preset(name))
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: list(v) for k, v in manifest["keys"].items()}
    assert sorted(set(theirs) - set(ours)) == [], "keys missing from our module"
    assert sorted(set(ours) - set(theirs)) == [], "keys Wan does not have"
    assert {k: v for k, v in ours.items() if theirs[k] != v} == {}, "shape mismatches"
    assert sum(p.numel() for p in model.parameters()) == manifest["num_params"]
    for field, value in manifest["config"].items():
        assert getattr(model.config, field) == value, field


@pytest.mark.parametrize("name", ["wan2.1-t2v-1.3b", "wan2.1-t2v-14b", "wan2.1-i2v-14b"])
def test_config_inferred_from_manifest_shapes(name, shared_dir):
    manifest = json.loads(MANIFESTS.read_text())[name]
    sd = {k: torch.empty(v, device="meta") for k, v in manifest["keys"].items()}
    assert infer_dit_config(sd) == DIT_PRESETS[name]


def test_config_json_round_trip_and_validation():
    cfg = DIT_PRESETS["wan-tiny-i2v"]
    assert DiTConfig.from_dict(json.loads(cfg.to_json())) == cfg
    assert DiTConfig.from_dict({"_class_name": "WanModel", **cfg.to_dict()}) == cfg
    with pytest.raises(ValueError, match="divisible"):
        DiTConfig(dim=100, num_heads=3)
    with pytest.raises(ValueError, match="unknown DiT preset"):
        dit_preset("nope")


def _inputs(model, B=1, F=6, H=4, W=6, Lc=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    x = torch.randn(B, cfg.in_dim, F, H, W, generator=g)
    ctx = torch.randn(B, Lc, cfg.text_dim, generator=g)
    return x, ctx


def test_per_frame_timesteps_equal_to_one_timestep_give_the_same_output():
    model = tiny_model()
    x, ctx = _inputs(model)
    a = model(x, torch.tensor([400.0]), ctx)
    b = model(x, torch.full((1, 6), 400.0), ctx)
    assert_close(b, a, what="t [B] vs t [B, F]")


def test_per_frame_timesteps_modulate_each_frame():
    model = tiny_model()
    x, ctx = _inputs(model)
    t = torch.full((1, 6), 400.0)
    base = model(x, t, ctx)
    t2 = t.clone()
    t2[0, 5] = 900.0
    out = model(x, t2, ctx)
    # bidirectional attention: every frame changes, but the changed frame most
    assert (out[:, :, 5] - base[:, :, 5]).abs().max() > (out[:, :, 0] - base[:, :, 0]).abs().max()


def test_batch_elements_are_independent():
    model = tiny_model()
    x, ctx = _inputs(model, B=2)
    t = torch.tensor([100.0, 800.0])
    both = model(x, t, ctx)
    for i in range(2):
        one = model(x[i:i + 1], t[i:i + 1], ctx[i:i + 1])
        assert_close(both[i:i + 1], one, atol=1e-5, what=f"sample {i}")


def test_attention_backend_is_swappable_and_equivalent():
    model = tiny_model()
    x, ctx = _inputs(model)
    t = torch.tensor([500.0])
    ref = model(x, t, ctx)
    model.set_attention("math")
    assert_close(model(x, t, ctx), ref, atol=1e-5, what="sdpa vs math")
    calls = []

    def spy(q, k, v):
        calls.append(q.shape)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    model.set_attention(spy)
    model(x, t, ctx)
    assert len(calls) == 2 * model.config.num_layers  # self + cross per layer
    with pytest.raises(ValueError, match="unknown attention backend"):
        model.set_attention("flash9000")


def test_block_causal_mask_hides_the_future():
    model = tiny_model()
    x, ctx = _inputs(model, F=6)
    t = torch.full((1, 6), 500.0)
    out = model(x, t, ctx, chunk_frames=3)
    x2 = x.clone()
    x2[:, :, 3:] += 1.0  # change only the second chunk
    out2 = model(x2, t, ctx, chunk_frames=3)
    assert_close(out2[:, :, :3], out[:, :, :3], atol=1e-6, what="first chunk must not see the second")
    assert (out2[:, :, 3:] - out[:, :, 3:]).abs().max() > 1e-3
    # and the bidirectional model does see the future
    assert (model(x2, t, ctx)[:, :, :3] - model(x, t, ctx)[:, :, :3]).abs().max() > 1e-3


def test_chunk_sizes():
    assert chunk_sizes(9, 3) == [3, 3, 3]
    assert chunk_sizes(7, 3) == [3, 3, 1]
    assert chunk_sizes(7, [1, 3, 3]) == [1, 3, 3]
    with pytest.raises(ValueError):
        chunk_sizes(7, [3, 3])


def test_context_shorter_than_text_len_is_zero_padded_unmasked():
    model = tiny_model()
    x, ctx = _inputs(model, Lc=5)
    t = torch.tensor([300.0])
    padded = torch.cat([ctx, torch.zeros(1, model.config.text_len - 5, model.config.text_dim)], dim=1)
    assert_close(model(x, t, ctx), model(x, t, padded), atol=1e-6, what="explicit vs implicit padding")
    # Wan does not mask the padding: dropping it entirely changes the output
    short = model.config.replace(text_len=5)
    m2 = WanDiT(short)
    m2.load_state_dict(model.state_dict())
    assert (m2.eval()(x, t, ctx) - model(x, t, ctx)).abs().max() > 1e-4


def test_i2v_model_runs_in_every_mode():
    model = tiny_model(model_type="i2v", in_dim=36, clip_dim=12, clip_tokens=5)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 6, 4, 4, generator=g)
    y = torch.randn(1, 20, 6, 4, 4, generator=g)
    ctx = torch.randn(1, 5, model.config.text_dim, generator=g)
    clip = torch.randn(1, 5, 12, generator=g)
    bi = model(x, torch.tensor([500.0]), ctx, clip_fea=clip, y=y)
    assert bi.shape == (1, 16, 6, 4, 4) and torch.isfinite(bi).all()
    causal = model(x, torch.full((1, 6), 500.0), ctx, clip_fea=clip, y=y, chunk_frames=3)
    from causvid_core.cache import KVCache
    cache = KVCache.full(model.config, batch=1, tokens_per_frame=4, frames=6)
    chunks = [model(x[:, :, s:s + 3], torch.full((1, 3), 500.0), ctx, clip_fea=clip, y=y[:, :, s:s + 3],
                    cache=cache, start_frame=s) for s in (0, 3)]
    assert_close(torch.cat(chunks, 2), causal, atol=1e-5, what="i2v cached vs block-causal")
    # the image features matter
    other = model(x, torch.tensor([500.0]), ctx, clip_fea=torch.randn(1, 5, 12, generator=g), y=y)  # (a constant shift would be normalised away)
    assert (other - bi).abs().max() > 1e-4
    with pytest.raises(ValueError, match="clip_fea"):
        model(x, torch.tensor([500.0]), ctx, y=y)


def test_bad_inputs_are_named():
    model = tiny_model()
    x, ctx = _inputs(model)
    with pytest.raises(ValueError, match="in_dim"):
        model(x[:, :8], torch.tensor([1.0]), ctx)
    with pytest.raises(ValueError, match=r"t must be"):
        model(x, torch.ones(1, 4), ctx)
    with pytest.raises(ValueError, match="text_dim"):
        model(x, torch.tensor([1.0]), ctx[..., :5])
    with pytest.raises(ValueError, match=r"\[B, C, F, H, W\]"):
        model(x[0], torch.tensor([1.0]), ctx)


def test_activation_checkpointing_gives_the_same_gradients():
    """gradient_checkpointing recomputes each block in the backward pass: the same loss and gradients, and a
    KV-cached forward is never checkpointed (its cache writes happen once)."""
    from conftest import tiny_model

    x, t, ctx = torch.randn(1, 16, 6, 4, 4), torch.rand(1, 6) * 1000, torch.randn(1, 5, 24)
    grads = []
    for ckpt in (False, True):
        model = tiny_model(seed=3).train()
        model.gradient_checkpointing = ckpt
        loss = model(x, t, ctx, chunk_frames=3).square().mean()
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
