"""`causvid parity`: the shared reference vectors pass; the runner reads every size from the file,
fails on a wrong number, and fails on a missing case."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from causvid_core.cache import KVCache
from causvid_core.flow import FlowGrid
from causvid_core.parity import run_parity
from causvid_core.sampler import causal_rollout
from conftest import PARITY_JSON, tiny_model

SUMMARY = re.compile(r"^parity: (\d+) cases, max rel err ([0-9.e+-]+|inf)$")


def _run_cli(*args):
    return subprocess.run([sys.executable, "-m", "causvid_core.cli", "parity", *map(str, args)],
                          capture_output=True, text=True, timeout=600)


def test_shared_dit_vectors_pass(shared_dir):
    lines = []
    assert run_parity(PARITY_JSON, only="dit", out=lines.append), "\n".join(lines)
    m = SUMMARY.match(lines[-1])
    assert m and int(m.group(1)) == 6 and float(m.group(2)) < 1e-5, lines


def _write_file(tmp_path, seed=4):
    """A parity-format file with sizes unlike the shared one. Its outputs come from this project
    (the shared file is the numerical proof); this checks the runner reads everything from the file."""
    model = tiny_model(seed=seed, dim=64, num_heads=4, num_layers=3, text_len=11, text_dim=20)
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    F, H, W = 8, 6, 4
    T = (H // 2) * (W // 2)
    ctx = torch.randn(7, cfg.text_dim, generator=g)
    x = torch.randn(16, F, H, W, generator=g)
    tensors = {f"dit.{k}": v for k, v in model.state_dict().items()}
    tensors.update({"context": ctx, "bidir.x": x})
    with torch.no_grad():
        for i, tv in enumerate((999.0, 480.5, 3.0)):
            tensors[f"bidir.t{i}"] = torch.tensor([tv])
            tensors[f"bidir.out{i}"] = model(x[None], torch.tensor([tv]), ctx[None])[0]
        tensors["causal.t"] = torch.rand(F, generator=g) * 1000
        tensors["causal.out"] = model(x[None], tensors["causal.t"][None], ctx[None], chunk_frames=2)[0]
        meta = {"seed": seed, "dit_config": {**cfg.to_dict(), "patch_size": list(cfg.patch_size)},
                "latent": {"frames": F, "height": H, "width": W, "tokens_per_frame": T},
                "ar_causvid": {"steps": [1000, 800, 400, 100], "shift": 6.0, "frames_per_block": 2},
                "ar_rolling": {"steps": [1000.0, 900.0, 500.0], "shift": 3.0, "frames_per_block": 2,
                               "frames": 10, "local_attn_frames": 6, "sink_frames": 2}}
        for name, frames, cache in (
            ("ar_causvid", F, KVCache.full(cfg, batch=1, tokens_per_frame=T, frames=F)),
            ("ar_rolling", 10, KVCache.window(cfg, batch=1, tokens_per_frame=T, window_frames=6, sink_frames=2)),
        ):
            spec = meta[name]
            noise = torch.randn(frames, 16, H, W, generator=g)
            renoise = torch.randn(frames // 2, len(spec["steps"]) - 1, 2, 16, H, W, generator=g)
            out = causal_rollout(model, noise.permute(1, 0, 2, 3)[None], ctx[None], spec["steps"],
                                 FlowGrid(spec["shift"]), cache=cache, chunk_frames=2,
                                 noise_fn=lambda c, s, shape: renoise[c, s].permute(1, 0, 2, 3)[None])
            tensors.update({f"{name}.noise": noise, f"{name}.renoise": renoise,
                            f"{name}.out": out[0].permute(1, 0, 2, 3).contiguous()})
    path = tmp_path / "other.json"
    path.write_text(json.dumps(meta))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path.with_suffix(".safetensors")))
    return path


def test_runner_reads_every_size_from_the_file(tmp_path):
    path = _write_file(tmp_path)
    r = _run_cli(path, "--only", "dit")
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.strip().splitlines()
    assert SUMMARY.match(lines[-1]) and lines[-1].startswith("parity: 6 cases"), lines
    for case in ("bidir.out0", "bidir.out2", "causal.out", "ar_causvid.out", "ar_rolling.out"):
        assert any(line.startswith(case) and line.endswith("ok") for line in lines), (case, lines)


def test_a_wrong_number_fails(tmp_path):
    path = _write_file(tmp_path)
    st = path.with_suffix(".safetensors")
    t = load_file(str(st))
    t["ar_rolling.out"] = t["ar_rolling.out"] * (1 + 1e-3)  # 1e-3 relative: 10x the tolerance
    save_file(t, str(st))
    r = _run_cli(path, "--only", "dit")
    assert r.returncode == 1
    assert re.search(r"^ar_rolling.out .* FAIL", r.stdout, re.M), r.stdout


def test_a_missing_case_fails(tmp_path):
    path = _write_file(tmp_path)
    st = path.with_suffix(".safetensors")
    t = load_file(str(st))
    del t["ar_causvid.out"]
    save_file(t, str(st))
    r = _run_cli(path, "--only", "dit")
    assert r.returncode == 1 and "missing" in r.stdout, r.stdout


def test_an_unreadable_file_is_a_clear_error(tmp_path):
    r = _run_cli(tmp_path / "nope.json")
    assert r.returncode == 2 and "cannot read" in r.stderr


NEWER = {"causal-forcing-tiny-seed0": ("ar_causvid.out", "ar_first_chunk.out", "ar_first_chunk_1step.out",
                                       "ar_i2v.out"),
         "krea-tiny-seed0": ("ar_recompute.out",)}


@pytest.mark.parametrize("name", sorted(NEWER))
def test_newer_causal_systems_vectors_pass_through_the_stream(shared_dir, name):
    """Causal Forcing (frame-wise chunks, the first chunk's own steps, an image prefix) and Krea Realtime (the
    cache recomputed before every chunk) as CausalStream runs them, against their reference loops."""
    lines = []
    assert run_parity(PARITY_JSON.with_name(f"{name}.json"), only="dit", out=lines.append), "\n".join(lines)
    for case in NEWER[name]:
        assert any(line.startswith(case + " ") and line.endswith("ok") for line in lines), (case, lines)


def test_the_stream_modes_matter_for_those_vectors(shared_dir):
    """The settings the newer loops need are what makes them pass: without the first chunk's own steps, or
    with Self-Forcing's loop instead of the recomputation, the same files fail by far more than the tolerance."""
    from causvid_core import parity as P
    from causvid_core.stream import StreamSettings

    def worst(name, **override):
        pf = P.ParityFile(PARITY_JSON.with_name(f"{name}.json"))
        orig = StreamSettings.__init__

        def patched(self, *a, **kw):
            orig(self, *a, **{**kw, **override})
        StreamSettings.__init__ = patched
        try:
            return max(r.rel_err for r in P.dit_cases(pf) if r.name.startswith("ar_") and r.name != "ar_causvid.out")
        finally:
            StreamSettings.__init__ = orig

    assert worst("causal-forcing-tiny-seed0", first_chunk_steps=None) > 100 * P.TOLERANCE
    assert worst("krea-tiny-seed0", kv_recompute_frames=None) > 10 * P.TOLERANCE


def test_an_unknown_case_kind_fails(tmp_path):
    """A case this version cannot run (a newer loop) is a failure with a reason, never a silent skip."""
    path = _write_file(tmp_path)
    meta = json.loads(path.read_text())
    meta["ar_future"] = {"steps": [1000], "shift": 5.0, "frames_per_block": 1, "frames": 2}
    path.write_text(json.dumps(meta))
    st = path.with_suffix(".safetensors")
    t = load_file(str(st))
    t["mystery.out"] = torch.zeros(2)
    save_file(t, str(st))
    r = _run_cli(path, "--only", "dit")
    assert r.returncode == 1, r.stdout
    for case in ("ar_future.out", "mystery.*"):
        assert re.search(rf"^{re.escape(case)} .* FAIL unknown case kind", r.stdout, re.M), r.stdout
