"""Every generation path on a device that is not the CPU, in bfloat16, without a GPU.

"fake-cuda" runs under causvid_core.fakedevice.FakeDevice: tensors on a fake CUDA device that, like
CUDA, refuse any op mixing them with a CPU tensor and any read of a value on the host; kernels are
checked by their CUDA meta implementations. "cuda" runs the same tests for real where a GPU exists
(skipped here: no CUDA). Paths: text-to-video, each switch mode, image-to-video in both layouts,
video-to-video, extension, a rolling window with sinks past the RoPE table, the node chain fed by a
ComfyUI-style VAE object, CausalDecodeStream; and the harness failing on the sampler's old CPU timestep.
"""
from __future__ import annotations

import contextlib
import gc
import types

import pytest
import torch

import causvid_core.cache as cache_mod
from causvid_core.checkpoints import save_dit
from causvid_core.fakedevice import FakeDevice, MemoryTracker
from causvid_core.flow import FlowGrid
from causvid_core.stream import CausalStream, StreamSettings
from causvid_core.text import WordEncoderConfig, WordTextEncoder, save_text_encoder
from causvid_core.vae import StreamingEncoder, random_vae, save_vae
from comfy_stubs import Host, stubbed_pack
from conftest import tiny_components, tiny_model

A = "a red circle moving right on a black background"
B = "a blue square moving up on a gray background"
DTYPE = torch.bfloat16

DEVICES = [
    pytest.param("fake", id="fake-cuda"),
    pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="skipped: no CUDA")),
]


class Env:
    """A device to run on: fake CUDA (entered as a context) or the real one."""

    def __init__(self, kind: str):
        self.kind = kind
        self.fake = FakeDevice() if kind == "fake" else None
        self.device = self.fake.device if self.fake else torch.device("cuda")

    def module(self, m: torch.nn.Module, dtype=DTYPE) -> torch.nn.Module:
        return self.fake.module(m, dtype) if self.fake else m.to(self.device, dtype)

    def context(self):
        return self.fake if self.fake else contextlib.nullcontext()


@contextlib.contextmanager
def _stream(env: Env, **settings):
    """A tiny stream whose model, VAE and text encoder are on env's device in bf16 (built before the fake
    mode is entered: weights are made on the CPU and moved, as a loader does)."""
    comps = tiny_components()
    for m in (comps.model, comps.vae, comps.text_encoder):
        env.module(m)
    fields = dict(max_frames=9)
    fields.update(settings)
    with env.context():
        yield CausalStream(comps.model, StreamSettings(**fields), latent_hw=(8, 8), vae=comps.vae,
                           text_encoder=comps.text_encoder, device=env.device)


def _check_chunk(env: Env, chunk, frames: int) -> None:
    # latents in float32: the DiT's head returns float32 flow and x0 is kept at that precision
    assert chunk.latents.device == env.device and chunk.latents.dtype == torch.float32
    assert chunk.frames.device == env.device and chunk.frames.dtype == DTYPE
    assert chunk.frames.shape[2] == frames and chunk.frames.shape[-2:] == (64, 64)


@pytest.mark.parametrize("kind", DEVICES)
def test_text_to_video(kind):
    env = Env(kind)
    with _stream(env) as s:
        s.set_prompt(A)
        for n in (9, 12, 12):
            _check_chunk(env, s.step(), n)
        assert s.cache.k.device == env.device and s.cache.k.dtype == DTYPE


@pytest.mark.parametrize("kind", DEVICES)
@pytest.mark.parametrize("mode", ["cut", "recache", "blend"])
def test_each_switch_mode(kind, mode):
    env = Env(kind)
    with _stream(env, switch_mode=mode, blend_chunks=2) as s:
        s.set_prompt(A)
        s.step()
        s.set_prompt(B)
        for _ in range(2):
            _check_chunk(env, s.step(), 12)


@pytest.mark.parametrize("kind", DEVICES)
@pytest.mark.parametrize("independent_first_frame", [True, False])
def test_image_to_video_in_both_layouts(kind, independent_first_frame):
    env = Env(kind)
    with _stream(env, independent_first_frame=independent_first_frame, max_frames=7) as s:
        s.set_prompt(A)
        image = torch.zeros(1, 3, 64, 64, dtype=DTYPE, device=env.device)
        first = s.start_from_image(image)
        assert (first is not None) == independent_first_frame
        while s.frame < 7:
            chunk = s.step()
            assert chunk.frames.device == env.device


@pytest.mark.parametrize("kind", DEVICES)
def test_video_to_video(kind):
    env = Env(kind)
    with _stream(env) as s:
        s.set_prompt(A)
        encoder = StreamingEncoder(s.vae)
        video = torch.zeros(1, 3, 33, 64, 64, dtype=DTYPE, device=env.device)
        pix = 0
        for n_pix in (9, 12, 12):
            z = encoder.encode(video[:, :, pix:pix + n_pix])
            assert z.device == env.device and z.dtype == DTYPE
            _check_chunk(env, s.step(v2v_latents=z, strength=0.6), n_pix)
            pix += n_pix


@pytest.mark.parametrize("kind", DEVICES)
def test_extension(kind):
    env = Env(kind)
    with _stream(env, max_frames=12) as s:
        s.set_prompt(A)
        clip = torch.zeros(1, 3, 21, 64, 64, dtype=DTYPE, device=env.device)
        context = s.add_context(s.vae.encode(clip))
        assert context.frames.shape[2] == 21
        _check_chunk(env, s.step(), 12)


@pytest.mark.parametrize("kind", DEVICES)
def test_rolling_window_with_sinks_past_the_rope_table(kind, monkeypatch):
    # the table is shortened so the switch to window positions comes after a few chunks: same code path
    monkeypatch.setattr(cache_mod, "ROPE_TABLE_POSITIONS", 10)
    env = Env(kind)
    with _stream(env, max_frames=None, window_frames=6, sink_frames=2) as s:
        s.set_prompt(A)
        for _ in range(6):
            s.step()
        assert s.cache.window_positions and s.frame == 18 and s.cache.frames == 6
        s.set_prompt(B, "recache")
        _check_chunk(env, s.step(), 12)


@pytest.mark.parametrize("kind", DEVICES)
@pytest.mark.parametrize("source", ["image", "video", "extend"])
def test_cli_generation_paths_bring_their_inputs_to_the_device(kind, source):
    """`causvid generate --image / --video / --extend`: uint8 frames from files, on the host, in."""
    import numpy as np

    from causvid_core.generate import GenerationRequest, generate_chunks
    from causvid_core.schedule import PromptEvent

    env = Env(kind)
    comps = tiny_components()
    for m in (comps.model, comps.vae):
        env.module(m)
    frames = {"image": None, "video": np.zeros((33, 64, 64, 3), np.uint8), "extend": np.zeros((9, 64, 64, 3), np.uint8)}
    req = GenerationRequest(prompts=[PromptEvent(0, A)], frames=33, height=64, width=64,
                            image=np.zeros((64, 64, 3), np.uint8) if source == "image" else None,
                            video=frames["video"] if source == "video" else None,
                            extend=frames["extend"] if source == "extend" else None)
    with env.context():
        chunks = list(generate_chunks(comps, req, notice=lambda m: None))
    assert sum(c.frames.shape[2] for c in chunks) == 33
    assert all(c.frames.device == env.device for c in chunks)


@pytest.mark.parametrize("kind", DEVICES)
def test_a_vae_kept_on_the_cpu_decodes_there(kind):
    """ComfyUI's --cpu-vae: the DiT on the GPU, the VAE (and so the decoder cache) on the CPU."""
    env = Env(kind)
    comps = tiny_components()
    env.module(comps.model)
    # (oneDNN's CPU conv has no fake-tensor kernel: the VAE's fake CPU convs take torch's own)
    with env.context(), torch.backends.mkldnn.flags(enabled=False):
        s = CausalStream(comps.model, StreamSettings(max_frames=9, independent_first_frame=True), latent_hw=(8, 8),
                         vae=comps.vae, text_encoder=comps.text_encoder, device=env.device)
        s.set_prompt(A)
        s.start_from_image(torch.zeros(1, 3, 64, 64))
        chunk = s.step()
        assert chunk.latents.device == env.device and chunk.frames.device.type == "cpu"


def test_the_harness_fails_on_a_cpu_tensor_in_the_hot_path(monkeypatch):
    """The sampler as it was: sigma built as torch.full((B,), t) on the CPU, mixed into the device maths."""
    def old_flow_to_x0(self, flow, xt, t):
        return FlowGrid._new_flow_to_x0(self, flow, xt, torch.full((flow.shape[0],), float(t)))

    monkeypatch.setattr(FlowGrid, "_new_flow_to_x0", FlowGrid.flow_to_x0, raising=False)
    monkeypatch.setattr(FlowGrid, "flow_to_x0", old_flow_to_x0)
    env = Env("fake")
    with _stream(env) as s:
        s.set_prompt(A)
        with pytest.raises(RuntimeError, match="same device|cuda:0 and cpu"):
            s.step()


# -- the nodes, fed by a ComfyUI-style VAE object ------------------------------------------------------

@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    base = tmp_path_factory.mktemp("fake_host")
    (base / "diffusion_models").mkdir()
    (base / "output").mkdir()
    torch.manual_seed(0)
    save_dit(tiny_model(), base / "diffusion_models" / "tiny_student.safetensors")
    save_vae(random_vae("wan-tiny"), base / "diffusion_models" / "vae.safetensors")
    save_text_encoder(WordTextEncoder(WordEncoderConfig(text_dim=24, text_len=8)).eval(),
                      base / "diffusion_models" / "text.safetensors")
    return base


@contextlib.contextmanager
def _pack_on(env: Env, base, monkeypatch):
    host = Host(base / "diffusion_models", base / "output", env.device, move=lambda m: env.module(m, None))
    with stubbed_pack(host, "causvid_fake_pack") as pack:
        previews = []
        # a preview is host I/O (PIL): record the frame that reached it instead of drawing it
        monkeypatch.setattr(pack.nodes.host.Progress, "preview",
                            lambda self, frame: previews.append((frame.device, frame.dtype, tuple(frame.shape))))
        yield pack, host, previews


def _comfy_vae(env: Env):
    """What ComfyUI's VAELoader returns for wan_2.1_vae: weights left on the CPU in float32 after loading,
    a patcher that loads them to the device."""
    import comfy.model_patcher

    fsm = random_vae("wan-tiny", seed=1)
    patcher = comfy.model_patcher.ModelPatcher(fsm, load_device=env.device, offload_device=torch.device("cpu"))
    return types.SimpleNamespace(first_stage_model=fsm, patcher=patcher, device=env.device)


@pytest.mark.parametrize("kind", DEVICES)
def test_node_chain_with_a_comfyui_vae_and_streaming_decode(kind, model_files, monkeypatch):
    env = Env(kind)
    with _pack_on(env, model_files, monkeypatch) as (pack, host, previews):
        nodes = pack.NODE_CLASS_MAPPINGS
        model = nodes["LoadCausalModel"]().load("tiny_student.safetensors", "auto", 0, 0, 0)[0]
        cond = nodes["CausalTextEncode"]().encode(model, A)[0]
        vae = _comfy_vae(env)
        with env.context():
            state = nodes["CausalKVState"]().create(model, 32, 32, 33, 0, vae=vae)[0]
            s1, lat1, img1 = nodes["StreamChunkSampler"]().sample(state, 1, "model default", conditioning=cond)
            s2, lat2, img2 = nodes["StreamChunkSampler"]().sample(s1, 2, "causvid-3step", conditioning=cond)
            assert next(model.model.parameters()).device == env.device
            assert next(vae.first_stage_model.parameters()).device == env.device
            assert img1.shape == (9, 32, 32, 3) and img2.shape == (24, 32, 32, 3)
            for img, lat in ((img1, lat1), (img2, lat2)):  # outputs on ComfyUI's intermediate device
                assert img.device.type == "cpu" and img.dtype == torch.float32
                assert lat["samples"].device.type == "cpu" and lat["samples"].dtype == torch.float32
            assert previews and all(p[0].type == "cpu" and p[1] == torch.uint8 for p in previews)
            assert all(force for _, _, force in host.loads)  # full loads: plain torch layers
            i2v = nodes["CausalImageToVideo"]().seed_image(state, torch.zeros(1, 32, 32, 3))[0]
            nodes["StreamChunkSampler"]().sample(i2v, 1, "model default", conditioning=cond)
            (decoded,) = nodes["CausalDecodeStream"]().decode(lat2, 2, vae=vae)
            assert decoded.shape == (21, 32, 32, 3) and decoded.device.type == "cpu"  # a new stream: 1 + 4 + 4 ...
            images, _ = nodes["VideoToVideoStream"]().restyle(model, cond, 0.6, 0, "model default",
                                                               images=torch.zeros(17, 32, 32, 3), vae=vae)
            assert images.shape == (17, 32, 32, 3)


def test_two_chained_samplers_hold_one_kv_cache(model_files, monkeypatch):
    """Device allocations read by the tracker: a chain of samplers adds no second KV cache, while every
    state stays alive (as in ComfyUI's output cache)."""
    env = Env("fake")
    with _pack_on(env, model_files, monkeypatch) as (pack, _, _):
        nodes = pack.NODE_CLASS_MAPPINGS
        model = nodes["LoadCausalModel"]().load("tiny_student.safetensors", "auto", 0, 0, 0)[0]
        cond = nodes["CausalTextEncode"]().encode(model, A)[0]
        dev = str(env.device)
        with env.context(), MemoryTracker() as tracker:
            state = nodes["CausalKVState"]().create(model, 64, 64, 81, 0)[0]
            host_load = state.load
            host_load()
            tracker.track(model.model, model.components.vae)
            s1 = nodes["StreamChunkSampler"]().sample(state, 1, "model default", conditioning=cond)[0]
            gc.collect()
            one = tracker.current_bytes(dev)
            s2 = nodes["StreamChunkSampler"]().sample(s1, 2, "model default", conditioning=cond)[0]
            s3 = nodes["StreamChunkSampler"]().sample(s2, 1, "model default", conditioning=cond)[0]
            gc.collect()
            three = tracker.current_bytes(dev)
            kv = state.stream.cache.store.nbytes
            assert kv > 0 and s3.stream.cache.store is state.stream.cache.store
            # between nodes the decoder cache is parked on the host and the cross-attention K/V dropped
            assert all(t.device.type == "cpu" for t in s3.stream.decoder.cache.slots if t is not None)
            assert s3.stream.cache.cross_nbytes == 0
            # what may grow: the clean latents a state keeps for recaching (bounded by the cache's frames)
            grown = three - one - sum(t.nbytes for t in s3.stream.history) + sum(t.nbytes for t in s1.stream.history)
            assert grown < kv / 4, f"{grown} bytes more after two more samplers; one KV cache is {kv}"
            # a re-run of the second sampler from s1 (ComfyUI re-executing it) rebuilds s1's cache in the
            # same buffer: still one KV cache
            nodes["StreamChunkSampler"]().sample(s1, 2, "model default", conditioning=cond)
            gc.collect()
            assert tracker.current_bytes(dev) - three < kv / 4


@pytest.mark.parametrize("kind", DEVICES)
@pytest.mark.parametrize("source", ["text", "world"])
def test_a_live_session(kind, source):
    """causvid live / the LiveStream node: chunks leave the device as uint8 on the host, prompts switch in
    place; video-to-video input frames (host uint8) go to the device a chunk at a time."""
    from causvid_core.live import LiveSession
    from causvid_core.live.sources import WorldSource

    env = Env(kind)
    seen = []
    with _stream(env, max_frames=None, window_frames=6, sink_frames=2) as s:
        h, w = (n * s.vae.config.space_factor for n in s.latent_hw)
        src = WorldSource(A, h, w) if source == "world" else None
        session = LiveSession(s, A, mode="recache", max_frames=40, source=src, strength=0.5,
                              sinks=(lambda c: (seen.append((c.frames.device.type, c.frames.dtype)),
                                                c.index == 0 and session.submit_prompt(B)),))
        stats = session.run()
    assert stats.chunks == 4 and seen == [("cpu", torch.uint8)] * 4 and session.applied[-1] == (9, B)


@pytest.mark.parametrize("kind", DEVICES)
@pytest.mark.parametrize("generator_input", ["rollout", "data"])
def test_a_dmd_step_on_the_device(kind, generator_input):
    """The stage's own DMD step (DMDStep) on the device: its host-drawn Draws moved once per micro-batch as the
    stage moves them, the student's rollout or data-noised pass, the guided real score, the critic and both
    losses: nothing on the host is mixed in."""
    from causvid_core.flow import FlowGrid, step_preset
    from trainer.config import DMDStage
    from trainer.run import SampleDraws
    from trainer.stages.dmd import DMDStep, Draws, MicroBatch

    env = Env(kind)
    gen, critic, real = (env.module(tiny_model(seed=s), torch.float32).train() for s in (1, 2, 3))
    for m in (gen, critic):
        m.requires_grad_(True)
    real.requires_grad_(False)
    shift, steps = step_preset("self-forcing-4step")
    grid = FlowGrid(shift)
    sc = DMDStage(generator_input=generator_input)
    draws = Draws.draw(SampleDraws(0), sc, grid, steps, 3, 0, [0, 1], (16, 6, 4, 4))  # on the host
    step = DMDStep(sc, 3, steps, grid, gen, critic, real, None, None, None, torch.float32, False)
    with env.context():
        dev = env.device
        mb = MicroBatch(draws=draws.to(dev), cond=torch.randn(2, 5, 24, device=dev),
                        uncond=torch.zeros(2, 5, 24, device=dev), data=torch.randn(2, 16, 6, 4, 4, device=dev))
        loss_g, loss_c = step.generator_loss(mb), step.critic_loss(mb)
    # the backward passes are autograd's over these graphs (the fake device has no CUDA context to run them)
    assert loss_g.device == dev and loss_c.device == dev and loss_g.requires_grad and loss_c.requires_grad


@pytest.mark.parametrize("kind", DEVICES)
@pytest.mark.parametrize("chunked", [False, True])
def test_the_teacher_losses_on_the_device(kind, chunked):
    """The teacher's and the causal teacher's flow-matching loss with their batch on the device (as the stages
    now move it): bidirectional, and block-causal with per-chunk timesteps."""
    from causvid_core.flow import FlowGrid
    from trainer.losses import flow_matching_loss

    env = Env(kind)
    model = env.module(tiny_model(seed=1), torch.float32).train().requires_grad_(True)
    with env.context():
        dev = env.device
        x0, noise = torch.randn(2, 16, 6, 4, 4).to(dev), torch.randn(2, 16, 6, 4, 4).to(dev)
        t = (torch.rand(2, 6) * 1000 if chunked else torch.rand(2) * 1000).to(dev)
        loss = flow_matching_loss(model, x0, noise, t, torch.randn(2, 5, 24).to(dev), FlowGrid(5.0),
                                  **({"chunk_frames": 3} if chunked else {}))
    assert loss.device == dev and loss.requires_grad
