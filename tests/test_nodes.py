"""Every node function, with ComfyUI's few host modules stubbed (tests/comfy_stubs.py): state semantics,
chaining, schedules, I2V, V2V, saving, interruption."""
from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from causvid_core.checkpoints import save_dit
from causvid_core.text import WordEncoderConfig, WordTextEncoder, save_text_encoder
from causvid_core.vae import random_vae, save_vae
from comfy_stubs import Host, stubbed_pack
from conftest import ROOT, tiny_model

A = "a red circle moving right on a black background"
B = "a blue square moving up on a gray background"


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    base = tmp_path_factory.mktemp("host")
    host = Host(base / "diffusion_models", base / "output", torch.device("cpu"))
    torch.manual_seed(0)
    save_dit(tiny_model(), host.models / "tiny_student.safetensors")
    save_vae(random_vae("wan-tiny"), host.models / "vae.safetensors")
    save_text_encoder(WordTextEncoder(WordEncoderConfig(text_dim=24, text_len=8)).eval(), host.models / "text.safetensors")
    with stubbed_pack(host) as module:
        yield module, host


def _model(pack, **kw):
    m, _ = pack
    args = dict(model_name="tiny_student.safetensors", dtype="auto", frames_per_chunk=0, window_frames=0, sink_frames=0)
    args.update(kw)
    return m.NODE_CLASS_MAPPINGS["LoadCausalModel"]().load(**args)[0]


def _cond(pack, model, text=A):
    m, _ = pack
    return m.NODE_CLASS_MAPPINGS["CausalTextEncode"]().encode(model, text)[0]


def _state(pack, model, length=33, seed=0, size=32):
    m, _ = pack
    return m.NODE_CLASS_MAPPINGS["CausalKVState"]().create(model, size, size, length, seed)[0]


def _sample(pack, state, chunks, **kw):
    m, _ = pack
    return m.NODE_CLASS_MAPPINGS["StreamChunkSampler"]().sample(state, chunks, "model default", **kw)


def test_every_node_is_registered_and_well_formed(pack):
    m, _ = pack
    assert set(m.NODE_CLASS_MAPPINGS) == {"LoadCausalModel", "CausalTextEncode", "CausalKVState", "CausalImageToVideo",
                                          "PromptSchedule", "StreamChunkSampler", "VideoToVideoStream",
                                          "CausalGenerate", "CausalDecodeStream", "SaveCausalVideo", "LiveStream",
                                          "CausalModelFromComfy"}
    assert m.WEB_DIRECTORY == "./js"
    for name, cls in m.NODE_CLASS_MAPPINGS.items():
        spec = cls.INPUT_TYPES()
        assert "required" in spec and hasattr(cls, cls.FUNCTION) and cls.CATEGORY.startswith("causvid")
        assert name in m.NODE_DISPLAY_NAME_MAPPINGS and cls.DESCRIPTION
    assert "tiny_student.safetensors" in m.NODE_CLASS_MAPPINGS["LoadCausalModel"].INPUT_TYPES()["required"]["model_name"][0]


def test_load_model_brings_its_vae_and_text_encoder(pack):
    model = _model(pack, window_frames=6, sink_frames=3)
    assert model.components.vae is not None and model.components.text_encoder is not None
    assert model.settings["window_frames"] == 6 and model.settings["sink_frames"] == 3
    cond = _cond(pack, model)
    assert cond[0][0].shape == (1, 8, 24)


def test_chained_samplers_equal_one_sampler_and_never_mutate_their_input(pack):
    model = _model(pack)
    cond = _cond(pack, model)
    state = _state(pack, model)
    s1, lat1, img1 = _sample(pack, state, 1, conditioning=cond)
    s2, lat2, img2 = _sample(pack, s1, 2, conditioning=cond)
    assert state.stream.frame == 0 and s1.stream.frame == 3 and s2.stream.frame == 9  # inputs untouched
    # one KV buffer for the whole chain: the last state owns it, the earlier ones rebuild if used again
    assert s2.stream.cache.store is s1.stream.cache.store is state.stream.cache.store
    assert s2.stream.owns_buffers and not s1.stream.owns_buffers and not state.stream.owns_buffers
    _, lat_all, img_all = _sample(pack, state, 3, conditioning=cond)
    assert torch.equal(torch.cat([lat1["samples"], lat2["samples"]], 2), lat_all["samples"])
    assert torch.equal(torch.cat([img1, img2], 0), img_all)
    assert img_all.shape == (33, 32, 32, 3) and 0 <= img_all.min() and img_all.max() <= 1
    _, lat_again, _ = _sample(pack, s1, 2, conditioning=cond)  # re-running a chunk reproduces it
    assert torch.equal(lat_again["samples"], lat2["samples"])
    with pytest.raises(ValueError, match="complete"):
        _sample(pack, s2, 1, conditioning=cond)


def test_progress_counts_steps_and_previews_each_chunk(pack):
    _, host = pack
    model = _model(pack)
    host.updates.clear()
    _sample(pack, _state(pack, model), 2, conditioning=_cond(pack, model))
    steps = len(model.components.stream_defaults.get("steps", [1000.0, 937.5, 833.3, 625.0]))
    counted = [u for u in host.updates if u[2] is None]
    previews = [u for u in host.updates if u[2] is not None]
    assert [u[0] for u in counted] == list(range(1, 2 * steps + 1)) and counted[-1][1] == 2 * steps
    assert len(previews) == 2 and previews[0][2][0] == "JPEG"


def test_interruption_leaves_the_state_consistent(pack):
    _, host = pack
    model = _model(pack)
    cond = _cond(pack, model)
    state = _state(pack, model)
    s1, _, _ = _sample(pack, state, 1, conditioning=cond)
    host.checks, host.interrupt_after = 0, 2
    with pytest.raises(InterruptedError):
        _sample(pack, s1, 2, conditioning=cond)
    host.interrupt_after = None
    # the interrupted fork had taken the buffers over: s1 still describes frame 3 and rebuilds them
    assert s1.stream.frame == 3 and not s1.stream.owns_buffers
    _, lat_after, _ = _sample(pack, s1, 2, conditioning=cond)
    _, lat_clean, _ = _sample(pack, _sample(pack, state, 1, conditioning=cond)[0], 2, conditioning=cond)
    assert torch.equal(lat_after["samples"], lat_clean["samples"])


def test_prompt_schedule_switches_at_the_right_chunk(pack):
    m, _ = pack
    model = _model(pack)
    sched = m.NODE_CLASS_MAPPINGS["PromptSchedule"]().build(f"0: {A}\n21: {B}", "recache", 2, model=model)[0]
    state = _state(pack, model)
    s, _, _ = _sample(pack, state, 3, prompt_schedule=sched)
    ctx_b = _cond(pack, model, B)[0][0]
    assert torch.equal(s.stream.context, ctx_b)
    s1, _, _ = _sample(pack, state, 2, prompt_schedule=sched)  # chunks 0-1 under A
    assert torch.equal(s1.stream.context, _cond(pack, model, A)[0][0])
    s2, lat2, _ = _sample(pack, s1, 1, prompt_schedule=sched)  # chunk 2 switches to B
    _, lat_all, _ = _sample(pack, state, 3, prompt_schedule=sched)
    assert torch.equal(lat2["samples"], lat_all["samples"][:, :, 6:])
    with pytest.raises(ValueError, match="CLIP"):
        m.NODE_CLASS_MAPPINGS["PromptSchedule"]().build(f"0: {A}", "cut", 2)


def test_image_to_video_starts_from_the_image(pack):
    m, _ = pack
    model = _model(pack)
    img = torch.rand(1, 32, 32, 3)
    state = m.NODE_CLASS_MAPPINGS["CausalImageToVideo"]().seed_image(_state(pack, model), img)[0]
    _, _, frames = _sample(pack, state, 3, conditioning=_cond(pack, model))
    vae = model.components.vae
    with torch.no_grad():
        x = img.permute(3, 0, 1, 2).unsqueeze(0) * 2 - 1
        recon = ((vae.decode(vae.encode(x)) + 1) / 2)[0, :, 0].permute(1, 2, 0)
    assert (frames[0] - recon).abs().max() < 0.5 / 255 + 1e-4  # IMAGE frames are 8-bit
    with pytest.raises(ValueError, match="resize"):
        m.NODE_CLASS_MAPPINGS["CausalImageToVideo"]().seed_image(_state(pack, model), torch.rand(1, 48, 32, 3))


def test_video_to_video_generate_decode_and_save(pack):
    m, host = pack
    model = _model(pack)
    cond = _cond(pack, model)
    video = torch.rand(17, 32, 48, 3)
    images, latent = m.NODE_CLASS_MAPPINGS["VideoToVideoStream"]().restyle(model, cond, 0.5, 0, "model default", images=video)
    assert images.shape == video.shape
    with pytest.raises(ValueError, match="4k\\+1"):
        m.NODE_CLASS_MAPPINGS["VideoToVideoStream"]().restyle(model, cond, 0.5, 0, "model default", images=video[:16])
    images, latent = m.NODE_CLASS_MAPPINGS["CausalGenerate"]().generate(model, cond, 32, 32, 33, 0, "causvid-3step")
    assert images.shape == (33, 32, 32, 3)
    (decoded,) = m.NODE_CLASS_MAPPINGS["CausalDecodeStream"]().decode(latent, 2, model=model)
    # LATENT round trip through raw VAE space; IMAGE frames are 8-bit, so float rounding moves a few by one step
    diff = (decoded - images).abs()
    assert diff.max() <= 1 / 255 + 1e-6 and (diff > 0).float().mean() < 0.01
    out = m.NODE_CLASS_MAPPINGS["SaveCausalVideo"]().save(images, 16, "clips/test")
    item = out["ui"]["causvid_videos"][0]
    from causvid_core.video_io import read_video
    assert read_video(host.output / "clips" / item["filename"]).shape == (33, 32, 32, 3)
    assert m.NODE_CLASS_MAPPINGS["SaveCausalVideo"]().save(images, 16, "clips/test")["ui"]["causvid_videos"][0][
        "filename"] != item["filename"]
    with pytest.raises(ValueError, match="outside"):
        m.NODE_CLASS_MAPPINGS["SaveCausalVideo"]().save(images, 16, "../escape")


def test_wrong_inputs_say_what_to_connect(pack):
    model = _model(pack)
    with pytest.raises(ValueError, match="connect CausalKVState"):
        _sample(pack, "not a state", 1)
    with pytest.raises(ValueError, match="conditioning"):
        _sample(pack, _state(pack, model), 1)
    with pytest.raises(ValueError, match="multiples of 16"):
        _state(pack, model, size=40)
    with pytest.raises(ValueError, match="window"):
        _state(pack, model, length=0)
    with pytest.raises(ValueError, match="text-encode"):
        _sample(pack, _state(pack, model), 1, conditioning="a red circle")


def test_endless_state_with_a_window(pack):
    model = _model(pack, window_frames=6, sink_frames=3)
    state = _state(pack, model, length=0)
    s, _, img = _sample(pack, state, 5, conditioning=_cond(pack, model))
    assert s.stream.frame == 15 and s.stream.cache.frames == 6 and img.shape[0] == 9 + 4 * 12


def test_the_kv_cache_is_a_model_comfyui_loads_and_offloads(pack):
    """The KV buffers go through ComfyUI's model management: loaded with the weights, and when ComfyUI
    offloads them between two samplers (new tensors, as Module.to gives) the chain continues exactly."""
    _, host = pack
    model = _model(pack)
    cond = _cond(pack, model)
    state = _state(pack, model)
    host.loads.clear()
    s1, _, _ = _sample(pack, state, 1, conditioning=cond)
    assert host.loads[-1][0] == ["WanDiT", "WanVAE", "KVCacheBuffers"] and all(force for _, _, force in host.loads)
    store = s1.stream.cache.store
    assert store.patcher.model is store.module
    s2_ref, lat_ref, _ = _sample(pack, s1, 2, conditioning=cond)
    s1b, _, _ = _sample(pack, state, 1, conditioning=cond)  # rebuild s1's lineage state again
    mod = s1b.stream.cache.store.module
    mod.k, mod.v = mod.k.clone(), mod.v.clone()  # what an offload and reload leave: other tensors, same values
    _, lat, _ = _sample(pack, s1b, 2, conditioning=cond)
    assert torch.equal(lat["samples"], lat_ref["samples"])


def _live(pack, state, steer=None, **kw):
    """Run LiveStream on `state` while `steer(session, hub)` acts from another thread, as a page would."""
    import threading
    import time

    m, host = pack
    hub = sys.modules["server"].PromptServer.instance.causvid_live_hub
    before = set(hub.sessions)
    args = dict(prompt=A, mode="recache", seconds=0.0, source="text", strength=0.6, source_input="",
                filename_prefix="live/test", unique_id="7")
    args.update(kw)

    def page():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            new = [e for k, e in hub.sessions.items() if k not in before]
            if new and steer(new[0].session, hub):
                return
            time.sleep(0.01)

    t = threading.Thread(target=page, daemon=True) if steer else None
    if t:
        t.start()
    try:
        return m.NODE_CLASS_MAPPINGS["LiveStream"]().run(state, **args)
    finally:
        if t:
            t.join()


def test_live_stream_plays_steers_stops_and_records(pack):
    """The LiveStream node: its routes are on ComfyUI's server, a prompt sent while it runs takes effect at
    the next chunk, Stop ends it, the recording holds every frame made and its schedule replays them; the
    input state is left as it was (a later sampler continues it exactly)."""
    from causvid_core.schedule import parse_schedule
    from causvid_core.video_io import read_video

    m, host = pack
    routes = {(r.method, r.path) for r in sys.modules["server"].PromptServer.instance.routes}
    assert {("GET", "/causvid/live/ws"), ("POST", "/causvid/live/prompt"), ("POST", "/causvid/live/stop")} <= routes
    model = _model(pack, window_frames=6, sink_frames=3)
    state = _state(pack, model, length=0)

    def steer(session, hub):
        if session.stats.frames >= 9 and not session.applied[1:]:
            session.submit_prompt(B)
        if session.stats.frames >= 45:
            session.stop()
            return True
        return False

    out = _live(pack, state, steer)
    (item,) = out["ui"]["causvid_videos"]
    (stats,) = out["ui"]["causvid_live"]
    assert stats["ended"] == "stop" and stats["prompt"] == B and stats["frames"] >= 45
    video = read_video(host.output / item["subfolder"] / item["filename"])
    assert video.shape == (stats["frames"], 32, 32, 3) and item["frames"] == stats["frames"]
    events = parse_schedule((host.output / item["subfolder"] / "stream.schedule.txt").read_text())
    assert [e.prompt for e in events] == [A, B] and events[1].frame in range(9, 46, 12)
    # the input state was forked, not advanced: a sampler on it makes what it makes on a fresh state
    _, _, images = _sample(pack, state, 2, conditioning=_cond(pack, model))
    _, _, fresh = _sample(pack, _state(pack, model, length=0), 2, conditioning=_cond(pack, model))
    assert torch.equal(images, fresh)


def test_live_stream_bad_input_and_cancel(pack):
    m, host = pack
    model = _model(pack, window_frames=6, sink_frames=3)
    state = _state(pack, model, length=0)
    for kw, why in (({"source": "video file"}, "needs source_input"),
                    ({"source": "video file", "source_input": "../../etc/passwd"}, "outside"),
                    ({"source": "video file", "source_input": "missing.mp4"}, "no such video"),
                    ({"filename_prefix": "../x"}, "outside the output folder"),
                    ({"source": "shapes world", "source_input": "a purple dragon"}, "template"),
                    ({"seconds": float("nan")}, "seconds")):
        with pytest.raises((ValueError, FileNotFoundError), match=why):
            _live(pack, state, **kw)
    # ComfyUI's Cancel mid-stream: the error goes up, what was shown stays recorded and plays
    host.checks, host.interrupt_after = 0, 3
    try:
        with pytest.raises(InterruptedError):
            _live(pack, state)
    finally:
        host.interrupt_after = None
    hub = sys.modules["server"].PromptServer.instance.causvid_live_hub
    last = list(hub.sessions.values())[-1]
    assert last.result["error"].startswith("InterruptedError") and last.result["recording"]
    from causvid_core.video_io import read_video
    assert read_video(last.result["recording"]).shape[0] == last.session.stats.frames > 0


def test_live_stream_restyles_a_video_file_from_the_input_folder(pack):
    from causvid_core import world
    from causvid_core.video_io import read_video, write_mp4

    m, host = pack
    host.input.mkdir(exist_ok=True)
    spec = world.spec_from_prompt(A, np.random.default_rng(0))
    write_mp4(host.input / "clip.mp4", world.render(spec, 30))
    model = _model(pack, window_frames=6, sink_frames=3)
    out = _live(pack, _state(pack, model, length=0), source="video file", source_input="clip.mp4", seconds=4.0,
                prompt=B, strength=0.5)
    (stats,) = out["ui"]["causvid_live"]
    assert stats["source"] == "file" and stats["ended"] == "limit" and stats["frames"] >= 64
    (item,) = out["ui"]["causvid_videos"]
    assert read_video(host.output / item["subfolder"] / item["filename"]).shape[0] == stats["frames"]


def test_live_stream_from_an_image_with_comfyuis_clip(pack):
    """Image-to-video live, prompts encoded by a connected CLIP (as ComfyUI's Wan umT5 would be): the first
    prompt and the one sent while it plays go through it, the DiT is loaded again after each encode (an
    encode may evict it), and the stream starts from the image as StreamChunkSampler's does."""
    from causvid_core.video_io import read_video

    m, host = pack
    model = _model(pack, window_frames=6, sink_frames=3)
    enc = model.components.text_encoder

    class Clip:  # ComfyUI's CLIP interface: tokenize, then encode_from_tokens -> [1, L, D]
        def __init__(self):
            self.texts = []

        def tokenize(self, text):
            self.texts.append(text)
            return text

        def encode_from_tokens(self, tokens):
            with torch.no_grad():
                return enc.encode([tokens]).cpu()

    clip = Clip()
    img = torch.rand(1, 32, 32, 3)
    seeded = m.NODE_CLASS_MAPPINGS["CausalImageToVideo"]().seed_image(_state(pack, model, length=0), img)[0]

    def steer(session, hub):
        if session.stats.frames >= 9 and len(session.applied) == 1:
            session.submit_prompt(B)
        if session.stats.frames >= 33:
            session.stop()
            return True
        return False

    loads = len(host.loads)
    out = _live(pack, seeded, steer, clip=clip)
    assert clip.texts == [A, B]
    assert len(host.loads) - loads >= 3  # before the run, and after each of the two encodes
    (item,) = out["ui"]["causvid_videos"]
    video = read_video(host.output / item["subfolder"] / item["filename"])
    # the first frame is the one StreamChunkSampler makes from the image (up to the MP4 coding of a noisy tiny
    # model's frame), far from the one it makes without the image
    dist = {}
    for name, st in (("image", seeded), ("text", _state(pack, model, length=0))):
        _, _, frames = _sample(pack, st, 1, conditioning=_cond(pack, model))
        dist[name] = float(np.abs(video[0].astype(np.float32) - (frames[0].numpy() * 255).round()).mean())
    assert dist["image"] < 0.5 * dist["text"], dist


def test_causal_model_from_comfy_refuses_what_is_not_a_wan_t2v_model(pack):
    """CausalModelFromComfy: a literal, another architecture or a Wan i2v MODEL get a reason and what to connect
    (its numbers are checked in a real ComfyUI: tests/test_comfy_model_e2e.py)."""
    m, _ = pack
    node = m.NODE_CLASS_MAPPINGS["CausalModelFromComfy"]()
    Fake = type("Fake", (), {})

    def model_of(inner):
        patcher, base = Fake(), Fake()
        base.diffusion_model, patcher.model = inner, base
        return patcher

    wan = type("WanModel", (torch.nn.Module,), {})()
    wan.model_type = "i2v"
    for bad, why in (("not a model", "not a ComfyUI MODEL"), (model_of(torch.nn.Linear(2, 2)), "not Wan 2.1"),
                     (model_of(wan), "i2v model")):
        with pytest.raises(ValueError, match=why):
            node.convert(bad, "self-forcing", 0, 0, 0)


def test_denoising_steps_show_comfyuis_latent_previews_for_wan_latents(pack, monkeypatch):
    """With ComfyUI's Wan VAE (so the stream's latents are Wan's), each denoising step sends a preview made
    by ComfyUI's previewer (--preview-method: latent2rgb or TAEHV) from that step's x0; the built-in model's
    own latents get none (the factors are Wan's), only the decoded chunks'."""
    import types as _types

    import comfy.model_patcher

    m, host = pack
    seen = []

    class Previewer:
        def decode_latent_to_preview_image(self, fmt, x0):
            seen.append(tuple(x0.shape))
            return ("JPEG", "image", 512)

    monkeypatch.setitem(sys.modules, "latent_preview",
                        _types.SimpleNamespace(get_previewer=lambda device, fmt: Previewer()))
    monkeypatch.setitem(sys.modules, "comfy.latent_formats", _types.SimpleNamespace(Wan21=lambda: "wan21"))
    model = _model(pack)
    fsm = random_vae("wan-tiny", seed=1)
    vae = _types.SimpleNamespace(first_stage_model=fsm, device=torch.device("cpu"),
                                 patcher=comfy.model_patcher.ModelPatcher(fsm, torch.device("cpu"), torch.device("cpu")))
    state = m.NODE_CLASS_MAPPINGS["CausalKVState"]().create(model, 32, 32, 33, 0, vae)[0]
    before = len(host.updates)
    _sample(pack, state, 2, conditioning=_cond(pack, model))
    steps = len(model.settings["steps"]) if "steps" in model.settings else 4
    assert seen == [(1, 16, 3, 4, 4)] * (2 * steps)
    assert sum(1 for u in host.updates[before:] if u[2] == ("JPEG", "image", 512)) == 2 * steps
    seen.clear()
    _sample(pack, _state(pack, model), 1, conditioning=_cond(pack, model))  # the model's own VAE: no latent previews
    assert seen == []


def test_comfyuis_own_model_is_loaded_as_comfyui_decides_and_ours_fully_after_it(pack):
    """A ComfyUI MODEL (comfy.* module) may be loaded partly (its layers cast per call); the pack's own modules
    are loaded fully, after it, so loading them can only offload more of ComfyUI's model."""
    import types as _types

    m, host = pack
    comfy_cls = type("WAN21", (torch.nn.Module,), {"__module__": "comfy.model_base"})
    comfy_patcher = _types.SimpleNamespace(model=comfy_cls(), load_device=torch.device("cpu"))
    ours = _types.SimpleNamespace(model=torch.nn.Linear(2, 2), load_device=torch.device("cpu"))
    before = len(host.loads)
    m.nodes.host.load([ours, comfy_patcher], 123)
    assert host.loads[before:] == [(["WAN21"], 123, False), (["Linear"], 123, True)]
