"""Streaming generation: determinism, prompt switches, image-to-video, video-to-video, endless streams,
and the errors users get for bad input."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from causvid_core.cache import KVCache
from causvid_core.flow import FlowGrid
from causvid_core.generate import GenerationRequest, generate_chunks, generate_video
from causvid_core.sampler import causal_rollout, seeded_noise
from causvid_core.schedule import PromptEvent, ScheduleError, parse_schedule, snap_schedule
from causvid_core.stream import INIT_NOISE_STEP, CausalStream, StreamSettings, restyle_steps, run_schedule
from causvid_core.video_io import to_uint8
from conftest import assert_close, tiny_components

A = "a red circle moving right on a black background"
B = "a blue square moving up on a gray background"


def _stream(comps, journal=False, **kw):
    kw.setdefault("max_frames", 9)
    return CausalStream(comps.model, StreamSettings(**kw), latent_hw=(4, 4), vae=comps.vae,
                        text_encoder=comps.text_encoder, journal=journal)


def test_one_call_equals_chunk_at_a_time_equals_the_rollout():
    comps = tiny_components()
    req = GenerationRequest(prompts=[PromptEvent(0, A)], frames=33, height=32, width=32, seed=5)
    whole = np.concatenate([to_uint8(c.frames) for c in generate_chunks(comps, req)])
    assert whole.shape == (33, 32, 32, 3)
    s = _stream(comps, seed=5)
    s.set_prompt(A)
    pieces = [s.step() for _ in range(3)]
    assert_close(torch.cat([p.latents for p in pieces], 2),
                 torch.cat([c.latents for c in generate_chunks(comps, req)], 2), atol=0, rtol=0, what="latents")
    # the same numbers from the plain Algorithm-2 rollout with the stream's noise
    nf = seeded_noise(5)
    noise = torch.cat([nf(c, INIT_NOISE_STEP, (1, 16, 3, 4, 4)) for c in range(3)], dim=2)
    with torch.no_grad():  # as the stream does (the encoder's fused inference path)
        ctx = comps.text_encoder.encode([A])
    cache = KVCache.full(comps.model.config, batch=1, tokens_per_frame=4, frames=9)
    st = StreamSettings(max_frames=9)
    ref = causal_rollout(comps.model, noise, ctx, st.steps, FlowGrid(st.shift), cache=cache, noise_fn=nf)
    assert_close(torch.cat([p.latents for p in pieces], 2), ref, atol=1e-6, what="stream vs rollout")
    other = _stream(comps, seed=6)
    other.set_prompt(A)
    assert (other.step().latents - pieces[0].latents).abs().max() > 0.1


def _spy_contexts(model):
    seen = []
    orig = model.forward

    def forward(x, t, context, **kw):
        seen.append((kw.get("start_frame"), float(t.max()), context))
        return orig(x, t, context, **kw)

    model.forward = forward
    return seen


def test_schedule_switches_at_the_right_chunk_cut():
    comps = tiny_components()
    s = _stream(comps, max_frames=12)
    seen = _spy_contexts(comps.model)
    chunks = list(run_schedule(s, {0: A, 2: B}))
    assert [c.prompt for c in chunks] == [A, A, B, B]
    with torch.no_grad():
        ctx_a, ctx_b = comps.text_encoder.encode([A]), comps.text_encoder.encode([B])
    for start, _, ctx in seen:
        want = ctx_a if start < 6 else ctx_b
        assert torch.equal(ctx, want), start
    assert s.cache.frames == 12 and s.cache.cross_source[0] is s.context


def test_cut_keeps_the_self_attention_cache_and_drops_the_cross_cache():
    comps = tiny_components()
    s = _stream(comps)
    s.set_prompt(A)
    s.step()
    k_before = s.cache.k.clone()
    old_source = s.cache.cross_source
    s.set_prompt(B, mode="cut")
    assert torch.equal(s.cache.k, k_before) and s.cache.frames == 3
    s.step()
    assert s.cache.cross_source is not old_source and s.cache.cross_source[0] is s.context


def test_recache_rebuilds_the_window_under_the_new_prompt():
    comps = tiny_components()
    s = _stream(comps, window_frames=6, sink_frames=3, max_frames=None)
    s.set_prompt(A)
    chunks = [s.step() for _ in range(3)]  # frames 0..8; the window holds 0..2 (sinks) and 6..8
    s.set_prompt(B, mode="recache")
    # documented state: the last frames the cache could hold (6 = its capacity), re-encoded at t = 0
    assert s.cache.frames == 6 and s.cache.global_end == 9
    ref = KVCache.window(comps.model.config, batch=1, tokens_per_frame=4, window_frames=6, sink_frames=3)
    ref.reset(start_frame=3)
    with torch.no_grad():
        ctx_b = comps.text_encoder.encode([B])
        for c in chunks[1:]:
            comps.model(c.latents, torch.zeros(1, 3), ctx_b, cache=ref, start_frame=c.start_frame)
    assert_close(s.cache.k[:, :, :, :24], ref.k[:, :, :, :24], atol=1e-6, what="recached K")
    assert_close(s.cache.v[:, :, :, :24], ref.v[:, :, :, :24], atol=1e-6, what="recached V")
    nxt = s.step()
    assert nxt.prompt == B and nxt.start_frame == 9


def test_recache_frames_limits_what_is_reencoded():
    comps = tiny_components()
    s = _stream(comps, max_frames=12, recache_frames=3)
    s.set_prompt(A)
    s.step(), s.step()
    s.set_prompt(B, mode="recache")
    assert s.cache.frames == 3 and s.cache.global_end == 6


def test_blend_moves_the_conditioning_over_n_chunks():
    comps = tiny_components()
    s = _stream(comps, max_frames=15, blend_chunks=3)
    seen = _spy_contexts(comps.model)
    list(run_schedule(s, {0: A, 1: B}, mode="blend"))
    with torch.no_grad():
        a, b = comps.text_encoder.encode([A]), comps.text_encoder.encode([B])
    by_chunk = {}
    for start, _, ctx in seen:
        by_chunk.setdefault(start, ctx)
    for start, w in ((0, 0.0), (3, 1 / 3), (6, 2 / 3), (9, 1.0), (12, 1.0)):
        assert_close(by_chunk[start], torch.lerp(a, b, w), atol=1e-6, what=f"chunk at {start}")


def test_schedule_parsing_snapping_and_errors():
    ev = parse_schedule("# comment\n0: a red circle\n\n20: a blue square\n")
    assert ev == [PromptEvent(0, "a red circle"), PromptEvent(20, "a blue square")]
    by_chunk, notices = snap_schedule(ev, [3, 3, 3])  # chunk starts at pixel frames 0, 9, 21
    assert by_chunk == {0: "a red circle", 2: "a blue square"}
    assert notices == ["schedule: frame 20 snapped to frame 21, the nearest chunk start"]
    by_chunk, _ = snap_schedule([PromptEvent(0, "x"), PromptEvent(9, "y")], [1, 3, 3])  # starts 0, 1, 13
    assert by_chunk == {0: "x", 2: "y"}
    for bad, where in (("5: late start", "line 1"), ("0: a\nten: b", "line 2"), ("0: a\n0: b", "line 2"),
                       ("0:", "line 1"), ("", "empty"), ("0: a\n4: b\n2: c", "line 3")):
        with pytest.raises(ScheduleError, match=where):
            parse_schedule(bad)


@pytest.mark.parametrize("independent_first_frame", [False, True])
def test_image_to_video_starts_from_the_image(independent_first_frame):
    comps = tiny_components()
    g = torch.Generator().manual_seed(0)
    image = (torch.rand(1, 3, 32, 32, generator=g) * 2 - 1)
    image_u8 = to_uint8(image.unsqueeze(2))[0]
    req = GenerationRequest(prompts=[PromptEvent(0, A)], frames=33, height=32, width=32, image=image_u8,
                            settings={"independent_first_frame": independent_first_frame})
    video = generate_video(comps, req)
    assert video.shape == (33, 32, 32, 3)
    # the first frame is the image through the VAE round trip
    from causvid_core.video_io import from_uint8
    x = from_uint8(image_u8[None])
    with torch.no_grad():
        roundtrip = to_uint8(comps.vae.decode(comps.vae.encode(x)))[0]
    assert np.abs(video[0].astype(int) - roundtrip.astype(int)).max() <= 1
    # and the rest is generated, not the image repeated
    assert np.abs(video[8].astype(int) - video[0].astype(int)).mean() > 5


def test_video_to_video_keeps_sizes_and_follows_the_input():
    comps = tiny_components()
    g = np.random.default_rng(0)
    video = g.integers(0, 255, (17, 32, 48, 3), dtype=np.uint8)
    req = GenerationRequest(prompts=[PromptEvent(0, A)], frames=17, height=32, width=48, video=video, strength=0.3)
    out = generate_video(comps, req)
    assert out.shape == video.shape
    # in latent space, a low strength stays nearer the input's latents than ignoring the input does
    from causvid_core.video_io import from_uint8
    with torch.no_grad():
        z = comps.vae.encode(from_uint8(video))
    def latents(strength):
        r = GenerationRequest(prompts=[PromptEvent(0, A)], frames=17, height=32, width=48, video=video,
                              strength=strength)
        return torch.cat([c.latents for c in generate_chunks(comps, r)], dim=2)
    near, far = (latents(0.3) - z).abs().mean(), (latents(1.0) - z).abs().mean()
    assert near < 0.5 * far, (near, far)
    assert restyle_steps([1000, 937.5, 833.3, 625], 0.7) == [700.0, 625]


def test_bad_sizes_and_frame_counts():
    comps = tiny_components()
    with pytest.raises(ValueError, match="4k\\+1"):
        list(generate_chunks(comps, GenerationRequest(prompts=[PromptEvent(0, A)], frames=30, height=32, width=32)))
    with pytest.raises(ValueError, match="multiples of 16"):
        list(generate_chunks(comps, GenerationRequest(prompts=[PromptEvent(0, A)], frames=9, height=40, width=32)))
    video = np.zeros((9, 32, 32, 3), np.uint8)
    with pytest.raises(ValueError, match="32x32, the video is 48x32"):
        list(generate_chunks(comps, GenerationRequest(prompts=[PromptEvent(0, A)], frames=9, height=32, width=48,
                                                      video=video)))
    with pytest.raises(ValueError, match="strength"):
        restyle_steps([1000.0], 1.5)
    with pytest.raises(ValueError, match="max_frames"):
        StreamSettings()
    s = _stream(comps, max_frames=3)
    with pytest.raises(ValueError, match="set a prompt"):
        s.step()
    s.set_prompt(A)
    s.step()
    with pytest.raises(ValueError, match="complete"):
        s.step()


def test_an_endless_stream_holds_constant_memory():
    comps = tiny_components()
    s = _stream(comps, window_frames=6, sink_frames=3, max_frames=None)
    s.set_prompt(A)
    sizes = set()
    for i, chunk in enumerate(s.chunks(60)):
        if i >= 2:
            sizes.add((s.cache.nbytes, sum(c.numel() for c in s.history), s.decoder.nbytes))
        assert chunk.frames.shape[2] == (9 if i == 0 else 12)
    assert len(sizes) == 1, sizes
    assert s.frame == 180 and s.cache.frames == 6


def test_video_extension_continues_the_clip():
    comps = tiny_components()
    g = np.random.default_rng(1)
    clip = g.integers(0, 255, (9, 32, 32, 3), dtype=np.uint8)
    req = GenerationRequest(prompts=[PromptEvent(0, A), PromptEvent(21, B)], frames=33, height=32, width=32,
                            extend=clip)
    chunks = list(generate_chunks(comps, req, notice=lambda m: None))
    assert chunks[0].is_context and chunks[0].latents.shape[2] == 3
    assert [c.start_frame for c in chunks] == [0, 3, 6] and [c.prompt for c in chunks] == [A, A, B]
    video = np.concatenate([to_uint8(c.frames) for c in chunks])
    assert video.shape == (33, 32, 32, 3)
    from causvid_core.video_io import from_uint8
    with torch.no_grad():
        recon = to_uint8(comps.vae.decode(comps.vae.encode(from_uint8(clip))))
    assert np.abs(video[:9].astype(int) - recon.astype(int)).max() <= 1  # the clip, through the VAE
    with pytest.raises(ValueError, match="ask for more"):
        list(generate_chunks(comps, GenerationRequest(prompts=[PromptEvent(0, A)], frames=9, height=32, width=32,
                                                      extend=clip)))


def test_a_clone_is_independent_and_continues_identically():
    comps = tiny_components()
    s = _stream(comps, max_frames=12)
    s.set_prompt(A)
    s.step()
    snapshot = s.clone()
    k0, frame0 = s.cache.k.clone(), s.frame
    a = [s.step() for _ in range(2)]
    assert torch.equal(snapshot.cache.k, k0) and snapshot.frame == frame0  # untouched by s advancing
    b = [snapshot.step() for _ in range(2)]
    for x, y in zip(a, b):
        assert torch.equal(x.latents, y.latents) and torch.equal(x.frames, y.frames)


def test_a_generation_with_a_rolling_window_stops_at_its_length():
    """`causvid generate --frames 121 --window 12` once never ended: the window dropped the frame budget."""
    from causvid_core.generate import GenerationRequest, generate_video
    from causvid_core.schedule import PromptEvent
    from conftest import tiny_components
    comps = tiny_components()
    req = GenerationRequest(prompts=[PromptEvent(0, "a red circle"), PromptEvent(41, "a blue circle")], frames=121,
                            settings={"window_frames": 6, "sink_frames": 3})
    assert len(generate_video(comps, req, notice=lambda m: None)) == 121


@pytest.mark.parametrize("mode", ["cut", "recache", "blend"])
def test_a_fork_shares_the_buffers_and_an_earlier_stream_rebuilds_them_exactly(mode):
    """What a chain of nodes does: each node forks its input (no copy of the KV or decoder cache); a
    re-run from an earlier state replays that state's journal (evictions, recaches and decodes included)
    and then continues exactly as an independent copy would."""
    comps = tiny_components()
    s = _stream(comps, max_frames=None, window_frames=6, sink_frames=2, switch_mode=mode, journal=True)
    s.set_prompt(A)
    s.step()
    s.set_prompt(B)
    s.step()
    truth = s.clone()  # an independent copy: continuing it is what s must give
    f = s.fork()
    assert f.cache.store is s.cache.store and f.decoder.cache is s.decoder.cache
    for _ in range(3):  # the window fills and evicts; the fork owns the buffers now
        f.step()
    assert f.owns_buffers and not s.owns_buffers
    again = s.fork()  # s rebuilds from its journal first, in the same buffers
    assert again.cache.store is f.cache.store and not f.owns_buffers
    again.set_prompt(A)
    truth.set_prompt(A)
    for _ in range(3):
        x, y = again.step(), truth.step()
        assert torch.equal(x.latents, y.latents) and torch.equal(x.frames, y.frames)
    with pytest.raises(ValueError, match="journal"):
        _stream(comps).fork()


def test_a_rebuild_that_fails_leaves_the_buffers_to_be_rebuilt_again(monkeypatch):
    """An out-of-memory error or an interruption in the middle of a replay must not leave the stream
    marking half-rebuilt buffers as its own."""
    comps = tiny_components()
    s = _stream(comps, max_frames=12, journal=True)
    s.set_prompt(A)
    s.step()
    s.step()
    truth = s.clone()
    f = s.fork()
    f.step()
    calls = {"n": 0}
    run_clean = CausalStream._run_clean

    def failing(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("CUDA out of memory (simulated)")
        return run_clean(self, *a, **kw)

    monkeypatch.setattr(CausalStream, "_run_clean", failing)
    with pytest.raises(RuntimeError, match="out of memory"):
        s.fork()
    assert not s.owns_buffers and not f.owns_buffers
    monkeypatch.setattr(CausalStream, "_run_clean", run_clean)
    x, y = s.fork().step(), truth.step()
    assert torch.equal(x.latents, y.latents) and torch.equal(x.frames, y.frames)


def test_krea_recompute_mode_runs_endless_in_a_fixed_cache_and_steers():
    """kv_recompute_frames (Krea Realtime): no window, no length, a cache of K + chunk frames that never grows;
    a fork continues it exactly; a prompt change takes effect (the cache is rebuilt under it every chunk)."""
    comps = tiny_components()
    settings = StreamSettings(max_frames=None, kv_recompute_frames=4, chunk_frames=2, seed=5)
    s = CausalStream(comps.model, settings, latent_hw=(4, 4), vae=comps.vae, text_encoder=comps.text_encoder,
                     journal=True)
    s.set_prompt(A)
    cap = s.cache.capacity_frames
    first = [s.step() for _ in range(3)]
    fork = s.fork()
    a = [fork.step().latents for _ in range(3)]
    again = s.fork()  # s rebuilds its cache from the journal, then continues the same way
    b = [again.step().latents for _ in range(3)]
    assert cap == 6 and s.cache.capacity_frames == cap and all(torch.equal(x, y) for x, y in zip(a, b))
    fork.set_prompt(B)
    assert not torch.equal(fork.step().latents, s.fork().step().latents)
    with pytest.raises(ValueError, match="no window_frames"):
        StreamSettings(max_frames=None, kv_recompute_frames=4, window_frames=6)
    assert first[0].latents.shape[2] == 2


def test_stream_presets_are_recognised_from_the_file_name(tmp_path):
    """A frame-wise Causal Forcing file runs in 1-frame chunks, Krea's with its recomputation, ours from its
    metadata; a name that says nothing gives the defaults; every preset makes valid settings."""
    from causvid_core.pipeline import stream_defaults_of
    from causvid_core.stream_presets import STREAM_PRESETS, preset_for_file, stream_preset

    cases = {"causal_forcing_framewise.pt": "causal-forcing-framewise",
             "causal_forcing_chunkwise.pt": "causal-forcing-chunkwise",
             "CausalForcing_2step.pt": "causal-forcing-framewise-2step",
             "krea-realtime-video-14b.safetensors": "krea-realtime", "longlive_base.pt": "longlive",
             "self_forcing_dmd.pt": "self-forcing", "autoregressive_checkpoint/model.pt": None,
             "wan2.1_t2v_1.3B_fp16.safetensors": None}
    for name, want in cases.items():
        assert preset_for_file(tmp_path / name) == want, name
    assert preset_for_file(tmp_path / "causvid" / "model.pt") == "causvid"  # the folder's name counts too
    assert stream_defaults_of(tmp_path / "causal_forcing_framewise.pt")["chunk_frames"] == 1
    for name in STREAM_PRESETS:
        fields = stream_preset(name)
        s = StreamSettings.from_fields({**fields, "max_frames": 21})
        assert s.chunk_frames == fields["chunk_frames"]
    assert StreamSettings.from_fields({**stream_preset("krea-realtime"), "max_frames": None}).steps[-1] == 0.0
    with pytest.raises(ValueError, match="unknown stream preset"):
        stream_preset("nope")
