"""KV cache: cached chunk-by-chunk forwards equal the block-causal forward; window, sinks, eviction,
overwrite, RoPE positions past the 1024 table, the cross-attention cache."""
from __future__ import annotations

import pytest
import torch

from causvid_core.cache import KVCache
from causvid_core.flow import FlowGrid
from causvid_core.model import chunk_sizes
from causvid_core.sampler import causal_rollout, seeded_noise
from conftest import assert_close, assert_rel, tiny_model


def _stream_inputs(model, B, F, H, W, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, model.config.in_dim, F, H, W, generator=g)
    t = torch.rand(B, F, generator=g) * 1000
    ctx = torch.randn(B, 6, model.config.text_dim, generator=g)
    return x, t, ctx


@pytest.mark.parametrize("cfg,B,F,H,W,chunks", [
    (dict(), 1, 9, 4, 4, 3),
    (dict(dim=48, num_heads=2, num_layers=3, ffn_dim=64), 2, 7, 4, 6, [1, 3, 3]),
    (dict(dim=96, num_heads=6, num_layers=1, qk_norm=False, cross_attn_norm=False), 1, 8, 6, 2, 2),
    (dict(dim=32, num_heads=1, num_layers=2, text_len=3), 3, 5, 2, 2, 1),
])
def test_cached_chunks_equal_the_block_causal_forward(cfg, B, F, H, W, chunks):
    model = tiny_model(seed=3, **cfg)
    x, t, ctx = _stream_inputs(model, B, F, H, W)
    with torch.no_grad():
        full = model(x, t, ctx, chunk_frames=chunks)
        cache = KVCache.full(model.config, batch=B, tokens_per_frame=model.config.tokens_per_frame(H, W), frames=F)
        outs, s = [], 0
        for n in chunk_sizes(F, chunks):
            outs.append(model(x[:, :, s:s + n], t[:, s:s + n], ctx, cache=cache, start_frame=s))
            s += n
    assert_rel(torch.cat(outs, dim=2), full, 1e-5, what="cached chunks vs block-causal")


def test_redenoising_a_chunk_overwrites_its_slots():
    model = tiny_model()
    x, t, ctx = _stream_inputs(model, 1, 6, 4, 4)
    cache = KVCache.full(model.config, batch=1, tokens_per_frame=4, frames=6)
    with torch.no_grad():
        model(x[:, :, :3], t[:, :3], ctx, cache=cache, start_frame=0)
        model(torch.randn_like(x[:, :, 3:]), t[:, 3:], ctx, cache=cache, start_frame=3)  # a noisy pass...
        model(x[:, :, :3] * 0, t[:, :3] * 0, ctx, cache=cache, start_frame=0)  # rewinds to chunk 0 ...
        model(x[:, :, :3], t[:, :3], ctx, cache=cache, start_frame=0)  # ... and rewrites it
        second = model(x[:, :, 3:], t[:, 3:], ctx, cache=cache, start_frame=3)  # overwrites the noisy pass
        full = model(x, t, ctx, chunk_frames=3)
    assert cache.frames == 6
    assert_close(second, full[:, :, 3:], atol=2e-5, what="after overwrites")


def _rollout_without_cache(model, noise, ctx, steps, grid, chunk, noise_fn):
    """Algorithm 2 with no cache at all: each step runs the block-causal forward over [clean past; x]."""
    outs = []
    F = noise.shape[2]
    for c, s in enumerate(range(0, F, chunk)):
        x = noise[:, :, s:s + chunk]
        for i, tv in enumerate(steps):
            seq = torch.cat(outs + [x], dim=2)
            t = torch.cat([torch.zeros(1, s), torch.full((1, x.shape[2]), float(tv))], dim=1)
            flow = model(seq, t, ctx, chunk_frames=chunk)[:, :, s:]
            x0 = grid.flow_to_x0(flow, x, torch.tensor([float(tv)]))
            if i + 1 < len(steps):
                x = grid.add_noise(x0, noise_fn(c, i, tuple(x.shape)), torch.tensor([float(steps[i + 1])]))
        outs.append(x0)
    return torch.cat(outs, dim=2)


def test_cached_rollout_equals_recomputing_everything_without_cache():
    model = tiny_model(seed=5)
    g = torch.Generator().manual_seed(2)
    noise = torch.randn(1, 16, 9, 4, 4, generator=g)
    ctx = torch.randn(1, 4, model.config.text_dim, generator=g)
    grid = FlowGrid(8.0)
    steps = [1000.0, 757.0, 522.0]
    nf = seeded_noise(11)
    with torch.no_grad():
        cache = KVCache.full(model.config, batch=1, tokens_per_frame=4, frames=9)
        cached = causal_rollout(model, noise, ctx, steps, grid, cache=cache, chunk_frames=3, noise_fn=nf)
        plain = _rollout_without_cache(model, noise, ctx, steps, grid, 3, nf)
    assert_close(cached, plain, atol=2e-5, what="cached rollout vs no cache")


def _labelled(cache, start, n):
    """Write frames [start, start+n) with K = V = absolute frame index, through the real protocol."""
    slots = cache.begin(start, n)
    T = cache.tokens_per_frame
    cfg = cache.config
    val = torch.arange(start, start + n, dtype=torch.float32).repeat_interleave(T)
    kv = val.view(1, 1, -1, 1).expand(cache.batch, cfg.num_heads, n * T, cfg.head_dim)
    for layer in range(cfg.num_layers):
        k, v = cache.update(layer, kv, kv)
    return slots, v[0, 0, ::T, 0].tolist()  # the frames the chunk attends to, in buffer order


def test_rolling_window_keeps_sinks_and_evicts_the_oldest():
    model = tiny_model()
    cache = KVCache.window(model.config, batch=1, tokens_per_frame=2, window_frames=6, sink_frames=2, rope="absolute")
    assert _labelled(cache, 0, 2)[1] == [0, 1]
    assert _labelled(cache, 2, 2)[1] == [0, 1, 2, 3]
    assert _labelled(cache, 4, 2)[1] == [0, 1, 2, 3, 4, 5]
    slots, seen = _labelled(cache, 6, 2)  # full: evict frames 2, 3
    assert seen == [0, 1, 4, 5, 6, 7] and slots.rope_start == 6
    assert _labelled(cache, 6, 2)[1] == [0, 1, 4, 5, 6, 7]  # re-denoise: overwrite in place, no eviction
    assert _labelled(cache, 8, 2)[1] == [0, 1, 6, 7, 8, 9]
    nbytes = cache.nbytes
    for s in range(10, 200, 2):  # endless: constant size
        seen = _labelled(cache, s, 2)[1]
    assert seen == [0, 1, 196, 197, 198, 199] and cache.nbytes == nbytes
    with pytest.raises(ValueError, match="evicted"):
        cache.begin(100, 2)


def test_parity_style_window_of_one_chunk_plus_sinks():
    # Self-Forcing semantics with window 6 = 3 sinks + 3: each chunk after the first sees the sinks and itself
    model = tiny_model()
    cache = KVCache.window(model.config, batch=1, tokens_per_frame=1, window_frames=6, sink_frames=3)
    seen = [_labelled(cache, s, 3)[1] for s in range(0, 12, 3)]
    assert seen == [[0, 1, 2], [0, 1, 2, 3, 4, 5], [0, 1, 2, 6, 7, 8], [0, 1, 2, 9, 10, 11]]


def _rolling_outputs(model, rope, frames, window=6, sinks=0, chunk=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    ctx = torch.randn(1, 4, model.config.text_dim, generator=g)
    cache = KVCache.window(model.config, batch=1, tokens_per_frame=1, window_frames=window, sink_frames=sinks, rope=rope)
    outs = []
    with torch.no_grad():
        for s in range(0, frames, chunk):
            x = torch.randn(1, 16, chunk, 2, 2, generator=g)
            t = torch.full((1, chunk), 500.0)
            outs.append(model(x, t, ctx, cache=cache, start_frame=s))
            model(x, t * 0, ctx, cache=cache, start_frame=s)  # clean refresh, as a stream does
    return torch.cat(outs, dim=2), cache


def test_window_relative_positions_equal_absolute_ones_without_sinks():
    # RoPE attention depends only on position differences: with no sinks the window is contiguous,
    # so slot positions and absolute positions must give the same outputs (up to rounding).
    model = tiny_model(seed=7)
    absolute, _ = _rolling_outputs(model, "absolute", 60)
    window, _ = _rolling_outputs(model, "window", 60)
    assert_close(window, absolute, atol=5e-5, what="window vs absolute positions")


def test_streams_past_the_rope_table_switch_to_window_positions():
    model = tiny_model(seed=7, num_layers=1)
    frames = 1032  # past the 1024-position table
    auto, cache = _rolling_outputs(model, "auto", frames)
    window, _ = _rolling_outputs(model, "window", frames)
    assert cache.window_positions and cache.global_end == frames
    assert_close(auto, window, atol=2e-5, what="auto (switched at 1024) vs window from the start")
    with pytest.raises(ValueError, match="RoPE table"):
        _rolling_outputs(model, "absolute", frames)


def test_sinks_change_meaning_after_the_switch_only():
    model = tiny_model(seed=7, num_layers=1)
    auto, _ = _rolling_outputs(model, "auto", 1032, sinks=3, window=9)
    absolute, _ = _rolling_outputs(model, "absolute", 1020, sinks=3, window=9)
    assert_close(auto[:, :, :1020], absolute, atol=1e-5, what="identical before the switch")
    assert torch.isfinite(auto).all()


def test_full_cache_refuses_overflow_and_out_of_order_chunks():
    model = tiny_model()
    cache = KVCache.full(model.config, batch=1, tokens_per_frame=4, frames=6)
    cache.begin(0, 3)
    with pytest.raises(ValueError, match="in order"):
        cache.begin(6, 3)
    cache.begin(3, 3)
    with pytest.raises(ValueError, match="KV cache full"):
        cache.begin(6, 3)
    with pytest.raises(ValueError, match="RoPE table"):
        KVCache.full(model.config, batch=1, tokens_per_frame=4, frames=2000)


def test_cross_attention_cache_is_computed_once_per_prompt():
    model = tiny_model()
    calls = []
    model.text_embedding.register_forward_hook(lambda *a: calls.append(1))
    x, t, ctx = _stream_inputs(model, 1, 6, 2, 2)
    cache = KVCache.full(model.config, batch=1, tokens_per_frame=1, frames=6)
    with torch.no_grad():
        a = model(x[:, :, :3], t[:, :3], ctx, cache=cache, start_frame=0)
        model(x[:, :, :3], t[:, :3], ctx, cache=cache, start_frame=0)
        assert len(calls) == 1
        assert cache.nbytes > cache.k.nbytes + cache.v.nbytes
        new_ctx = ctx + 1.0  # a new prompt: a different tensor resets the cross cache automatically
        b = model(x[:, :, :3], t[:, :3], new_ctx, cache=cache, start_frame=0)
        assert len(calls) == 2 and (a - b).abs().max() > 1e-4
        cache.reset_cross()
        model(x[:, :, :3], t[:, :3], new_ctx, cache=cache, start_frame=0)
        assert len(calls) == 3


def test_reset_forgets_frames_and_prompt():
    model = tiny_model()
    x, t, ctx = _stream_inputs(model, 1, 3, 2, 2)
    cache = KVCache.full(model.config, batch=1, tokens_per_frame=1, frames=6)
    with torch.no_grad():
        first = model(x, t, ctx, cache=cache, start_frame=0)
        model(x, t, ctx, cache=cache, start_frame=3)
        cache.reset()
        assert cache.frames == 0 and cache.cross_source is None
        again = model(x, t, ctx, cache=cache, start_frame=0)
    assert_close(again, first, atol=0, rtol=0, what="after reset")


def test_cache_size_comes_from_the_config():
    model = tiny_model(dim=64, num_heads=4, num_layers=3)
    cache = KVCache.full(model.config, batch=2, tokens_per_frame=10, frames=7, dtype=torch.float16)
    assert cache.k.shape == (3, 2, 4, 70, 16)
    assert cache.nbytes == 2 * 3 * 2 * 4 * 70 * 16 * 2


def test_cached_chunks_with_gradients_enabled_equal_the_block_causal_forward():
    # training through the cache (Self-Forcing) must see the same past as inference does
    model = tiny_model(seed=4)
    x, t, ctx = _stream_inputs(model, 1, 6, 2, 2)
    full = model(x, t, ctx, chunk_frames=3)
    cache = KVCache.full(model.config, batch=1, tokens_per_frame=1, frames=6)
    outs = [model(x[:, :, s:s + 3], t[:, s:s + 3], ctx, cache=cache, start_frame=s) for s in (0, 3)]
    assert outs[1].requires_grad
    assert_rel(torch.cat(outs, dim=2), full.detach(), 1e-5, what="grad-mode cached chunks")
    outs[1].sum().backward()  # the buffer was overwritten after use: backward must not need it
    assert model.blocks[0].self_attn.k.weight.grad.abs().sum() > 0
