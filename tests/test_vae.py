"""The Wan2.1 VAE: key layout, parity, exact streaming, flat memory on endless streams, loading."""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from causvid_core.checkpoints import CheckpointError
from causvid_core.parity import ParityFile
from causvid_core.vae import (VAE_PRESETS, StreamingDecoder, StreamingEncoder, VAEConfig, WanVAE,
                              infer_vae_config, load_vae, random_vae, save_vae)
from causvid_core.vae_bench import bench_vae
from causvid_core.vae_parity import vae_cases
from conftest import MANIFESTS, PARITY_JSON, assert_close

TINY = VAE_PRESETS["wan-tiny"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These tensors are tiny: one thread is as fast, and does not stall when other jobs share the CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny() -> WanVAE:
    return random_vae(TINY, seed=1)


def video(T: int, H: int, W: int, seed: int = 0, B: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, 3, T, H, W, generator=g) * 2 - 1


def latent(F: int, h: int, w: int, seed: int = 0, B: int = 1) -> torch.Tensor:
    return torch.randn(B, 16, F, h, w, generator=torch.Generator().manual_seed(seed))


def split(x: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    assert sum(sizes) == x.shape[2]
    return list(torch.split(x, sizes, dim=2))


# -- layout and config -------------------------------------------------------------------------

def test_wan21_preset_matches_the_released_state_dict(shared_dir):
    manifest = json.loads(MANIFESTS.read_text())["wan2.1-vae"]
    with torch.device("meta"):
        vae = WanVAE(VAE_PRESETS["wan2.1"])
    ours = {k: list(v.shape) for k, v in vae.state_dict().items()}
    theirs = {k: list(v) for k, v in manifest["keys"].items()}
    assert sorted(set(theirs) - set(ours)) == [], "keys missing from our module"
    assert sorted(set(ours) - set(theirs)) == [], "keys Wan does not have"
    assert {k: v for k, v in ours.items() if theirs[k] != v} == {}, "shape mismatches"
    assert sum(p.numel() for p in vae.parameters()) == manifest["num_params"]
    for field, value in manifest["config"].items():
        ours_value = getattr(vae.config, field)
        assert (list(ours_value) if isinstance(value, list) else ours_value) == value, field
    sd = {k: torch.empty(v, device="meta") for k, v in manifest["keys"].items()}
    assert infer_vae_config(sd) == VAE_PRESETS["wan2.1"]


def test_config_round_trip_presets_and_validation(shared_dir):
    for name, cfg in VAE_PRESETS.items():
        assert VAEConfig.from_dict(json.loads(cfg.to_json())) == cfg, name
        assert cfg.z_dim == 16 and cfg.time_factor == 4 and cfg.space_factor == 8, name
    meta = json.loads(PARITY_JSON.read_text())
    parity_cfg = VAEConfig.from_dict({**meta["vae_config"], "latent_mean": meta["vae_latent_mean"],
                                      "latent_std": meta["vae_latent_std"], "unknown_extra": 1})
    assert parity_cfg.replace(latent_mean=None, latent_std=None) == TINY  # the file's stats are float32
    assert max(abs(a - b) for a, b in zip(parity_cfg.latent_mean + parity_cfg.latent_std,
                                          TINY.latent_mean + TINY.latent_std)) < 1e-6
    assert VAE_PRESETS["wan2.1"].latent_mean[7] == 1.5508 and VAE_PRESETS["wan2.1"].latent_std[0] == 2.8184
    with torch.device("meta"):  # the shapes preset's shapes are what config inference reads back
        sd = WanVAE(VAE_PRESETS["shapes"]).state_dict()
    inferred = infer_vae_config(sd)
    assert inferred.replace(latent_mean=None, latent_std=None) == VAE_PRESETS["shapes"].replace(
        latent_mean=None, latent_std=None)
    deeper = VAE_PRESETS["shapes"].replace(decoder_res_blocks=3)  # a decoder deeper than its encoder
    with torch.device("meta"):
        sd = WanVAE(deeper).state_dict()
    assert infer_vae_config(sd).replace(latent_mean=None, latent_std=None) == deeper.replace(
        latent_mean=None, latent_std=None)
    assert VAEConfig.from_dict(json.loads(deeper.to_json())) == deeper and deeper.decoder_blocks == 3
    assert VAE_PRESETS["wan2.1"].decoder_blocks == 2  # None: Wan's decoder mirrors its encoder
    with pytest.raises(ValueError, match="decoder_res_blocks"):
        VAEConfig(decoder_res_blocks=-1)
    with pytest.raises(ValueError, match="latent_mean"):
        VAEConfig(z_dim=16, latent_mean=(0.0,) * 4)
    with pytest.raises(ValueError, match="temperal_downsample"):
        VAEConfig(dim_mult=(1, 2, 4), temperal_downsample=(True, True, True))


# -- parity --------------------------------------------------------------------------------------

def test_parity_cases_pass_on_the_shared_file(shared_dir):
    results = list(vae_cases(ParityFile(PARITY_JSON)))
    assert [r.name for r in results] == ["vae.latent", "vae.decoded"]
    assert all(r.ok for r in results), [(r.name, r.rel_err, r.note) for r in results]


def test_parity_reads_every_size_from_the_file(tmp_path):
    """Another file with another config, clip length and frame size (written from our own VAE)."""
    cfg = VAEConfig(dim=4, dim_mult=(1, 2, 2), num_res_blocks=2, attn_scales=(0.5,),
                    temperal_downsample=(True, False), latent_mean=(0.5,) * 16, latent_std=(2.0,) * 16)
    vae = random_vae(cfg, seed=6)
    x = video(9, 24, 16, seed=13)[0]
    with torch.no_grad():
        z = vae.encode(x[None])[0]
        decoded = vae.decode(z[None], clamp=False)[0]
    tensors = {"vae." + k: v.contiguous() for k, v in vae.state_dict().items()}
    tensors.update({"vae.video": x, "vae.latent": z, "vae.decoded": decoded})
    save_file(tensors, str(tmp_path / "other.safetensors"))
    fields = {k: v for k, v in cfg.to_dict().items() if not k.startswith("latent_")}
    (tmp_path / "other.json").write_text(json.dumps({"vae_config": fields, "vae_latent_mean": cfg.latent_mean,
                                                      "vae_latent_std": cfg.latent_std}))
    results = list(vae_cases(ParityFile(tmp_path / "other.json")))
    assert [r.name for r in results] == ["vae.latent", "vae.decoded"]
    assert all(r.ok and r.rel_err < 1e-6 for r in results), [(r.name, r.rel_err, r.note) for r in results]


class _FakeParity:
    """A ParityFile without some tensors."""

    def __init__(self, pf: ParityFile, drop: str):
        self.meta, self.json_path = pf.meta, pf.json_path
        self.tensors = {k: v for k, v in pf.tensors.items() if k != drop}

    def group(self, prefix: str) -> dict:
        return {k[len(prefix) + 1:]: v for k, v in self.tensors.items() if k.startswith(prefix + ".")}


def test_parity_reports_missing_tensors(shared_dir):
    pf = ParityFile(PARITY_JSON)
    results = {r.name: r for r in vae_cases(_FakeParity(pf, "vae.decoded"))}
    assert results["vae.latent"].ok
    assert math.isnan(results["vae.decoded"].rel_err) and results["vae.decoded"].note.startswith("missing:")
    (broken,) = list(vae_cases(_FakeParity(pf, "vae.conv2.weight")))
    assert math.isnan(broken.rel_err) and "conv2.weight" in broken.note


# -- streaming == full ---------------------------------------------------------------------------

@pytest.mark.parametrize("hw", [(16, 16), (24, 40)])
@pytest.mark.parametrize("sizes", [[1] * 6, [3, 3], [1, 2, 3], [2, 4], [6], [5, 1]])
def test_streaming_decode_equals_full_decode(tiny, hw, sizes):
    z = latent(6, hw[0] // 8, hw[1] // 8, seed=sum(sizes) + hw[1])
    full = tiny.decode(z, clamp=False)
    assert full.shape == (1, 3, 21, *hw)
    dec = StreamingDecoder(tiny, clamp=False)
    outs = [dec.decode(c) for c in split(z, sizes)]
    assert [o.shape[2] for o in outs] == [4 * n - (3 if i == 0 else 0) for i, n in enumerate(sizes)]
    assert_close(torch.cat(outs, dim=2), full, atol=1e-5, rtol=0, what=f"chunks {sizes}")


@pytest.mark.parametrize("hw", [(16, 16), (32, 24)])
@pytest.mark.parametrize("sizes", [[1, 4, 4, 4], [5, 8], [1, 12], [13], [9, 4], [1, 8, 4]])
def test_streaming_encode_equals_full_encode(tiny, hw, sizes):
    x = video(13, *hw, seed=sum(sizes) + hw[0])
    full = tiny.encode(x)
    assert full.shape == (1, 16, 4, hw[0] // 8, hw[1] // 8)
    enc = StreamingEncoder(tiny)
    outs = [enc.encode(c) for c in split(x, sizes)]
    assert [o.shape[2] for o in outs] == [(n - 1) // 4 + 1 if i == 0 else n // 4 for i, n in enumerate(sizes)]
    assert_close(torch.cat(outs, dim=2), full, atol=1e-5, rtol=0, what=f"chunks {sizes}")
    assert_close(tiny.encode(x, frames_per_pass=12), full, atol=1e-5, rtol=0, what="one pass")


@torch.no_grad()
def test_encode_moments_of_a_whole_clip_match_the_chunked_encode(tiny):
    x = video(9, 16, 24, seed=14)
    mu, log_var = tiny.encode_moments(x)  # one pass, no cache: what VAE training uses
    mean = torch.tensor(TINY.latent_mean).view(1, 16, 1, 1, 1)
    std = torch.tensor(TINY.latent_std).view(1, 16, 1, 1, 1)
    assert log_var.shape == mu.shape == (1, 16, 3, 2, 3)
    assert_close((mu - mean) / std, tiny.encode(x), atol=1e-5, rtol=0, what="moments vs encode")


@torch.no_grad()
def test_batch_and_clamp():
    vae = random_vae(TINY, seed=4)
    vae.decoder.head[2].bias.copy_(torch.tensor([1.5, -1.5, 0.0]))  # push outputs past [-1, 1]
    z = latent(3, 2, 2, seed=3, B=2)
    full = vae.decode(z, clamp=False)
    assert full.abs().max() > 1, "the test needs values outside [-1, 1]"
    assert_close(vae.decode(z[1:]), full[1:].clamp(-1, 1), atol=1e-6, rtol=0, what="batch item")
    dec = StreamingDecoder(vae)  # clamps by default
    assert_close(torch.cat([dec.decode(z[:, :, :1]), dec.decode(z[:, :, 1:])], 2), full.clamp(-1, 1),
                 atol=1e-5, rtol=0, what="clamped stream")


def test_first_latent_gives_one_frame_then_four(tiny):
    dec = StreamingDecoder(tiny)
    assert [dec.decode(latent(1, 2, 2, seed=i)).shape[2] for i in range(4)] == [1, 4, 4, 4]
    enc = StreamingEncoder(tiny)
    assert [enc.encode(video(n, 16, 16, seed=n)).shape[2] for n in (1, 4, 4, 8)] == [1, 1, 1, 2]


def test_reset_restarts_the_stream(tiny):
    z = latent(4, 2, 2, seed=5)
    dec = StreamingDecoder(tiny, clamp=False)
    first = torch.cat([dec.decode(c) for c in split(z, [1, 3])], dim=2)
    dec.reset()
    assert dec.nbytes == 0 and dec.chunks == 0
    again = torch.cat([dec.decode(c) for c in split(z, [2, 2])], dim=2)
    assert_close(again, first, atol=1e-5, rtol=0, what="after reset")
    dec.reset()
    assert dec.decode(latent(1, 3, 3)).shape == (1, 3, 1, 24, 24)  # a new stream may change size
    x = video(5, 16, 16, seed=6)
    enc = StreamingEncoder(tiny)
    a = torch.cat([enc.encode(x[:, :, :1]), enc.encode(x[:, :, 1:])], 2)
    enc.reset()
    assert_close(enc.encode(x), a, atol=1e-5, rtol=0, what="encoder after reset")


def test_interleaved_streams_are_independent(tiny):
    """No hidden shared state: two streams on one VAE, alternating, each equal their full decode."""
    za, zb = latent(3, 2, 2, seed=7), latent(3, 2, 2, seed=8)
    da, db = StreamingDecoder(tiny, clamp=False), StreamingDecoder(tiny, clamp=False)
    outs_a, outs_b = [], []
    for i in range(3):
        outs_a.append(da.decode(za[:, :, i:i + 1]))
        outs_b.append(db.decode(zb[:, :, i:i + 1]))
    assert_close(torch.cat(outs_a, 2), tiny.decode(za, clamp=False), atol=1e-5, rtol=0, what="stream a")
    assert_close(torch.cat(outs_b, 2), tiny.decode(zb, clamp=False), atol=1e-5, rtol=0, what="stream b")


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def test_endless_decode_holds_flat_memory():
    """10,001 pixel frames at 64x64 (1 + 2,500 latents) through one StreamingDecoder."""
    cfg = VAEConfig(dim=2, dim_mult=(1, 2, 2, 2), num_res_blocks=0)  # the smallest sensible Wan design
    vae = random_vae(cfg, seed=0)
    dec = StreamingDecoder(vae)
    z = latent(5, 8, 8, seed=9)  # 5 latents (20 frames) a call; the content does not change the cost
    frames = dec.decode(z[:, :, :1]).shape[2]
    sizes, rss = set(), []
    for i in range(1, 501):
        frames += dec.decode(z).shape[2]
        sizes.add(dec.nbytes)
        if i in (50, 500):
            rss.append(_rss_bytes())
    assert frames == 10_001
    assert len(sizes) == 1, f"the cache changed size over the stream: {sorted(sizes)}"
    growth = rss[1] - rss[0]
    assert growth < 8e6, f"RSS grew by {growth / 1e6:.1f} MB over 9,000 frames after warm-up"


# -- bad inputs ----------------------------------------------------------------------------------

def test_bad_inputs_raise_clear_errors(tiny):
    with pytest.raises(ValueError, match=r"frame count must be 4k\+1 .*got 30"):
        tiny.encode(video(30, 16, 16))
    with pytest.raises(ValueError, match=r"\[B, 3, T, H, W\]"):
        tiny.encode(torch.zeros(1, 4, 5, 16, 16))
    with pytest.raises(ValueError, match="multiples of 8"):
        tiny.encode(video(5, 20, 16))
    with pytest.raises(ValueError, match=r"\[B, 16, F, h, w\]"):
        tiny.decode(torch.zeros(1, 8, 2, 2, 2))
    with pytest.raises(ValueError, match=r"\[B, 16, F, h, w\]"):
        StreamingDecoder(tiny).decode(torch.zeros(16, 2, 2, 2))
    enc = StreamingEncoder(tiny)
    with pytest.raises(ValueError, match=r"4k\+1"):
        enc.encode(video(4, 16, 16))
    enc.encode(video(1, 16, 16))
    with pytest.raises(ValueError, match="multiples of 4, got 3"):
        enc.encode(video(3, 16, 16))
    with pytest.raises(ValueError, match="reset"):
        enc.encode(video(4, 24, 16))
    dec = StreamingDecoder(tiny)
    dec.decode(latent(1, 2, 2))
    with pytest.raises(ValueError, match="reset"):
        dec.decode(latent(1, 2, 3))


def test_autograd_flows_through_encode_and_decode():
    """The trainer trains the built-in VAE through these same functions."""
    vae = random_vae(TINY, seed=2).train()
    x = video(5, 16, 16, seed=10)
    recon = vae.decode(vae.encode(x), clamp=False)
    (recon - x).pow(2).mean().backward()
    for name in ("encoder.conv1.weight", "decoder.head.2.weight", "decoder.upsamples.2.time_conv.weight"):
        g = dict(vae.named_parameters())[name].grad
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, name


# -- loading and saving ----------------------------------------------------------------------------

def _outputs(vae: WanVAE) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return vae.encode(video(5, 16, 16, seed=11)), vae.decode(latent(2, 2, 2, seed=12), clamp=False)


def test_load_round_trips_give_identical_outputs(tiny, tmp_path):
    expected = _outputs(tiny)
    sd = tiny.state_dict()
    save_vae(tiny, tmp_path / "ours.safetensors")
    torch.save(sd, tmp_path / "Wan2.1_VAE.pth")
    save_file({"first_stage_model." + k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "comfy.safetensors"))
    bundle = {"vae." + k: v.contiguous() for k, v in sd.items()}
    bundle["model.diffusion_model.head.head.weight"] = torch.zeros(4, 4)  # a DiT beside it: ignored
    save_file(bundle, str(tmp_path / "bundle.safetensors"))
    for name in ("ours.safetensors", "Wan2.1_VAE.pth", "comfy.safetensors", "bundle.safetensors"):
        vae = load_vae(tmp_path / name)
        assert vae.config == TINY, name  # our metadata, or inferred (z_dim 16 -> Wan's statistics)
        for got, want in zip(_outputs(vae), expected):
            assert torch.equal(got, want), name
    shapes = random_vae("shapes", seed=3)
    save_vae(shapes, tmp_path / "shapes.safetensors")
    assert load_vae(tmp_path / "shapes.safetensors").config == VAE_PRESETS["shapes"]  # stats from metadata
    assert load_vae(tmp_path / "ours.safetensors", dtype=torch.bfloat16).conv1.weight.dtype == torch.bfloat16


def test_bad_checkpoints_raise_checkpoint_error(tiny, tmp_path):
    sd = tiny.state_dict()
    save_vae(tiny, tmp_path / "ok.safetensors")
    data = (tmp_path / "ok.safetensors").read_bytes()
    (tmp_path / "short.safetensors").write_bytes(data[: len(data) // 2])
    torch.save(sd, tmp_path / "ok.pth")
    data = (tmp_path / "ok.pth").read_bytes()
    (tmp_path / "short.pth").write_bytes(data[: len(data) // 2])
    torch.save({"weights": sd, "evil": _NeedsCode()}, tmp_path / "code.pth")
    for name, why in (("short.safetensors", "truncated or corrupt"), ("short.pth", "truncated or corrupt"),
                      ("code.pth", "refused")):
        with pytest.raises(CheckpointError, match=why):
            load_vae(tmp_path / name)
    missing = {k: v for k, v in sd.items() if k != "decoder.head.2.bias"}
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match=r"missing keys: \['decoder.head.2.bias'\]"):
        load_vae(tmp_path / "missing.pth")
    torch.save({**sd, "decoder.extra.weight": torch.zeros(1)}, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match=r"unexpected keys: \['decoder.extra.weight'\]"):
        load_vae(tmp_path / "extra.pth")
    save_file({"patch_embedding.weight": torch.zeros(2)}, str(tmp_path / "dit.safetensors"))
    with pytest.raises(CheckpointError, match="not a Wan2.1 VAE"):
        load_vae(tmp_path / "dit.safetensors")


class _NeedsCode:
    """An object whose unpickling would import this module: refused by weights_only loading."""


# -- bench ---------------------------------------------------------------------------------------

def test_bench_reports_exactness_and_rates():
    r = bench_vae("wan-tiny", size=16, chunks=2, seconds=0.01, latents_per_chunk=2)
    assert r["preset"] == "wan-tiny" and r["threads"] >= 1
    assert r["stream_vs_full_max_abs"] <= 1e-5
    assert r["decode_fps_16"] > 0 and r["encode_fps_16"] > 0


# -- circular padding (a torus world) --------------------------------------------------------------

def test_circular_padding_commutes_with_whole_latent_cell_rolls(tmp_path):
    """With padding "circular" every conv wraps around, so rolling a video by whole latent cells (8 px) rolls
    its latent by as many cells, and the decode likewise, exactly: an object crossing the frame's edge is coded
    as one in the middle. Zero padding (Wan's) does not do this. The padding survives a save / load."""
    import torch.nn.functional as F
    from causvid_core.vae_layers import wrap_pad
    x = torch.randn(2, 3, 2, 6, 7)
    assert torch.equal(wrap_pad(x, (1, 2, 3, 0)), F.pad(x, (1, 2, 3, 0, 0, 0), mode="circular"))
    cfg = VAE_PRESETS["shapes"].replace(padding="circular")
    circ, zeros = random_vae(cfg, seed=3), random_vae(VAE_PRESETS["shapes"], seed=3)
    v = video(9, 32, 48, seed=4)
    rolled = torch.roll(v, (8, 24), dims=(3, 4))
    with torch.no_grad():
        z = circ.encode(v)
        assert torch.allclose(torch.roll(z, (1, 3), dims=(3, 4)), circ.encode(rolled), atol=1e-5)
        y = circ.decode(z, clamp=False)
        y_rolled = circ.decode(torch.roll(z, (1, 3), dims=(3, 4)), clamp=False)
        assert torch.allclose(torch.roll(y, (8, 24), dims=(3, 4)), y_rolled, atol=1e-5)
        z0 = zeros.encode(v)
        assert (torch.roll(z0, (1, 3), dims=(3, 4)) - zeros.encode(rolled)).abs().max() > 1e-2
    save_vae(circ, tmp_path / "c.safetensors")
    back = load_vae(tmp_path / "c.safetensors")
    assert back.config.padding == "circular"
    with torch.no_grad():
        assert torch.equal(back.encode(v), z)
    with pytest.raises(ValueError, match="padding"):
        VAEConfig(padding="reflect")


def test_bfloat16_autocast_convs_follow_the_float32_ones():
    """Under CPU autocast every conv (circular ones too) runs in bfloat16 and stays close to float32."""
    cfg = VAE_PRESETS["shapes"].replace(padding="circular")
    vae = random_vae(cfg, seed=5)
    v = video(5, 32, 32, seed=6)
    with torch.no_grad():
        ref = vae.decode(vae.encode(v), clamp=False)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = vae.decode(vae.encode(v), clamp=False)
    assert low.dtype == torch.bfloat16
    err = (low.float() - ref).abs().mean() / ref.abs().mean()
    assert 0 < err < 0.05, err


def test_a_float16_vae_on_the_cpu_computes_its_convs_in_float32(tiny):
    """float16 weights on a CPU (the built-in files are stored so): the convs run in float32 and come back
    float16, close to the float32 model; PyTorch's own float16 CPU conv was ~160x slower than float32."""
    half = random_vae(TINY, seed=1, dtype=torch.float16)
    z = latent(2, 4, 4, seed=3)
    with torch.no_grad():
        ref = tiny.decode(z, clamp=False)
        low = half.decode(z.half(), clamp=False)
    assert low.dtype == torch.float16
    assert (low.float() - ref).abs().max() < 2e-2 * ref.abs().max()
    # the conv itself: exactly the float32 conv rounded once, circular wrap included
    from causvid_core.vae_layers import conv3d
    g = torch.Generator().manual_seed(4)
    x, w, b = (torch.randn(*shape, generator=g).half() for shape in ((1, 8, 3, 6, 6), (8, 8, 3, 3, 3), (8,)))
    for circular in (False, True):
        got = conv3d(x, w, b, padding=(0, 1, 1), circular=circular)
        want = conv3d(x.float(), w.float(), b.float(), padding=(0, 1, 1), circular=circular).half()
        assert got.dtype == torch.float16 and torch.equal(got, want), circular
