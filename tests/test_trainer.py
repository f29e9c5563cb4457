"""The trainer: the micro pipeline end to end, resume after kill -9, two processes equal one,
gradient accumulation, the DMD gradient by hand, ablation switches, config overrides."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import numpy as np
import torch

from causvid_core.checkpoints import load_dit
from trainer.config import apply_overrides, micro, preset
from trainer.losses import contrast_prompts, dmd_generator_loss, guided_x0
from trainer.pipeline import run_pipeline, run_stage, stage_seconds
from trainer.stages.common import output

PY = sys.executable


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("micro")
    t0 = time.perf_counter()
    times = run_pipeline(micro(), root, log=lambda m: None)
    return root, times, time.perf_counter() - t0


def test_micro_pipeline_runs_every_stage_and_makes_a_video(micro_run, tmp_path):
    root, times, total = micro_run
    assert list(times) == ["vae", "vae-decoder", "text", "teacher", "teacher-refine", "causal-teacher", "ode-pairs",
                           "ode-init", "dmd", "export"]
    print(f"micro pipeline: {total:.0f} s")  # the 3-minute target is reported, not asserted (no timed tests)
    for stage in times:
        assert (root / stage / "DONE.json").exists(), stage
    spent = stage_seconds(micro(), root)  # what each stage took, for the pipeline's time budget
    assert list(spent) == list(times) and None not in spent.values(), spent  # export can take 0.0 s
    assert spent["vae"] > 0 and spent["teacher"] > 0
    assert sum(spent.values()) <= total + 1
    vae = [json.loads(l) for l in (root / "vae" / "metrics.jsonl").read_text().splitlines()]
    assert vae[-1]["psnr"] > vae[0]["psnr"] + 3, "the VAE did not learn"
    text = [json.loads(l) for l in (root / "text" / "metrics.jsonl").read_text().splitlines()]
    assert text[-1]["loss"] < text[0]["loss"]
    _assert_decoder_fine_tune_kept_the_encoder(root)
    _assert_refined_teacher_is_the_teacher(root)
    pairs = json.loads((root / "ode-pairs" / "DONE.json").read_text())
    assert pairs["timesteps"] == [1000.0, 937.5, 833.3333129882812, 625.0, 0.0]
    student = load_dit(root / "student.safetensors")
    assert student.config.dim == 32
    out = tmp_path / "v.mp4"
    r = subprocess.run([PY, "-m", "causvid_core.cli", "generate", "--model", root / "student.safetensors",
                        "--prompt", "a red circle moving right on a black background", "--out", out, "--quiet"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    from causvid_core.video_io import read_video
    assert read_video(out).shape == (33, 64, 64, 3)


def _assert_refined_teacher_is_the_teacher(root: Path) -> None:
    """teacher-refine: a superset of the teacher's clips, and weights moved from the teacher's."""
    from safetensors.torch import load_file
    cfg = micro()
    small = load_file(root / "latents.safetensors")["latents"]
    big = load_file(root / "latents-refine.safetensors")["latents"]
    assert big.shape[0] == cfg.teacher_refine.num_clips > small.shape[0] == cfg.data.num_clips
    assert torch.equal(big[:small.shape[0]], small)
    refined = load_dit(root / "teacher-refine" / "teacher.safetensors").state_dict()
    base = load_dit(output(root, "teacher")).state_dict()
    assert any(not torch.equal(refined[k], base[k]) for k in base)
    assert json.loads((root / "teacher-refine" / "DONE.json").read_text())["num_clips"] == cfg.teacher_refine.num_clips


def test_later_stages_start_from_the_refined_teacher(micro_run, tmp_path):
    root = tmp_path / "r"
    shutil.copytree(micro_run[0], root, ignore=shutil.ignore_patterns("ablation", "ode-init"))
    run_stage("ode-init", apply_overrides(micro(), ["ode_init.steps=0"]), root)  # the untrained init
    start = load_dit(root / "ode-init" / "student.safetensors").state_dict()
    refined = load_dit(root / "teacher-refine" / "teacher.safetensors").state_dict()
    assert all(torch.equal(start[k], refined[k]) for k in refined)
    shutil.rmtree(root / "teacher-refine")
    cfg = apply_overrides(micro(), [f"teacher_refine.num_clips={micro().data.num_clips}"])
    with pytest.raises(ValueError, match="must exceed data.num_clips"):
        run_stage("teacher-refine", cfg, root)


def test_stochastic_ode_pairs_are_seeded_per_pair(micro_run, tmp_path):
    """ode_pairs.eta > 0: the teacher's trajectories take stochastic steps whose fresh noise is seeded by
    pair, so the pairs do not depend on the batching; they start from the ODE pairs' noise and end elsewhere."""
    from trainer.data import load_ode_pairs
    src, pairs = micro_run[0], {}
    eta = ["ode_pairs.eta=1.0"]
    for name, sets in (("ode", []), ("eta", eta), ("eta-b2", eta + ["ode_pairs.batch=2"])):
        root = tmp_path / name
        shutil.copytree(src, root, ignore=shutil.ignore_patterns("ode-pairs", "ode-init", "dmd", "ablation", "export"))
        run_stage("ode-pairs", apply_overrides(micro(), sets), root)
        pairs[name] = load_ode_pairs(root / "ode-pairs")[0]  # [N, K + 1, C, F, h, w]
    torch.testing.assert_close(pairs["eta"], pairs["eta-b2"], atol=1e-4, rtol=1e-4)  # batched float sums only
    assert torch.equal(pairs["eta"][:, 0], pairs["ode"][:, 0])  # the same starting noise
    assert not torch.allclose(pairs["eta"][:, -1], pairs["ode"][:, -1], atol=1e-3)


def _assert_decoder_fine_tune_kept_the_encoder(root: Path) -> None:
    """vae-decoder: encoder weights (hence every latent the DiT trained on) identical, decoder changed,
    and the exported VAE is the fine-tuned one."""
    from causvid_core.vae import load_vae
    base, tuned = load_vae(root / "vae" / "vae.safetensors"), load_vae(root / "vae-decoder" / "vae.safetensors")
    exported = load_vae(root / "vae.safetensors")
    for name, p in base.state_dict().items():
        if name.startswith(("encoder.", "conv1.")):
            assert torch.equal(p, tuned.state_dict()[name]), name
    assert not torch.equal(base.decoder.head[2].weight, tuned.decoder.head[2].weight)
    assert all(torch.equal(p, exported.state_dict()[n]) for n, p in tuned.state_dict().items())
    assert base.config.latent_mean == tuned.config.latent_mean
    assert (base.config.decoder_blocks, tuned.config.decoder_blocks) == (1, 2)  # micro grows the decoder


def test_grown_decoder_starts_as_the_old_one_and_can_learn():
    """grow_decoder: the new residual blocks start as the identity, so the grown VAE decodes bit for bit
    as the old one (whole clip and chunked, the cache included); their weights then take gradients."""
    from causvid_core.vae import WanVAE, random_vae
    from causvid_core.vae_config import VAEConfig
    from causvid_core.vae_layers import ResidualBlock
    from trainer.stages.vae_decoder import _levels, grow_decoder
    old = random_vae(VAEConfig(dim=4, dim_mult=(1, 2, 2), num_res_blocks=1, attn_scales=(0.5,),
                               temperal_downsample=(True, False), latent_mean=(0.1,) * 16, latent_std=(2.0,) * 16),
                     seed=3, std=0.3)
    grown = grow_decoder(old, 3)
    assert grown.config.decoder_blocks == 3 and isinstance(grown, WanVAE)
    assert sum(p.numel() for p in grown.decoder.parameters()) > sum(p.numel() for p in old.decoder.parameters())
    z = torch.randn(1, 16, 3, 2, 2)
    with torch.no_grad():
        assert torch.equal(grown.decode(z, clamp=False), old.decode(z, clamp=False))
        assert torch.equal(grown.decode(z, clamp=False, latents_per_pass=3), old.decode(z, clamp=False, latents_per_pass=3))
        x = torch.rand(1, 3, 5, 16, 16) * 2 - 1
        assert torch.equal(grown.encode(x), old.encode(x))
    grown.decode(z, clamp=False).square().mean().backward()
    level0 = [u for u in _levels(grown.decoder.upsamples)[0] if isinstance(u[0], ResidualBlock)]
    assert len(level0) == 4  # 2 old blocks (each with its attention), then 2 new
    for unit in level0[2:]:
        assert unit[0].residual[6].weight.grad.abs().sum() > 0 and len(unit) == 2
    with pytest.raises(ValueError, match="shrink"):
        grow_decoder(grown, 1)


def _stopped_and_resumed(monkeypatch, stage_run, cfg, straight: Path, resumed: Path, stage: str, keys, weights):
    """Run a stage straight in one folder; in the other, stop it in-process right after its first checkpoint (as
    a kill would) and run it again to the end. Both must log the same losses (`keys`, where logged; 1e-5) and end
    with the same weights (`weights()` loads a folder's output; 1e-6). Returns the state the stopped run left
    and both runs' metric rows."""
    from trainer.run import StageRun
    stage_run(cfg, straight)
    checkpoint = StageRun.checkpoint

    def checkpoint_then_die(self, step, objects):
        checkpoint(self, step, objects)
        raise KeyboardInterrupt

    monkeypatch.setattr(StageRun, "checkpoint", checkpoint_then_die)
    with pytest.raises(KeyboardInterrupt):
        stage_run(cfg, resumed)
    monkeypatch.setattr(StageRun, "checkpoint", checkpoint)
    state = torch.load(resumed / stage / "state.pt", weights_only=True)
    stage_run(cfg, resumed)
    rows = [[json.loads(l) for l in (root / stage / "metrics.jsonl").read_text().splitlines()]
            for root in (straight, resumed)]
    for a, b in zip(*rows):
        for k in keys:
            assert (k in a) == (k in b), (a["step"], k)
            if k in a:
                assert abs(a[k] - b[k]) <= 1e-5, (a["step"], k, a[k], b[k])
    wa, wb = weights(straight).state_dict(), weights(resumed).state_dict()
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)
    return state, *rows


def test_adversarial_decoder_fine_tune_resumes_with_its_discriminator(micro_run, tmp_path, monkeypatch):
    """vae-decoder with the adversarial term: the discriminator trains from step 0, the decoder feels it from
    adv_start; a run stopped after a checkpoint and resumed ends with the losses and weights of a straight run,
    so the discriminator and its optimiser state are saved and restored with the decoder."""
    from causvid_core.vae import load_vae
    from trainer.stages import vae_decoder
    src = micro_run[0]
    sets = ["vae_decoder.steps=6", "vae_decoder.adv_start=3", "vae_decoder.log_every=1", "vae_decoder.ckpt_every=3"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    for root in (straight, resumed):
        _copy_prereqs(src, root)
    state, rows, resumed_rows = _stopped_and_resumed(
        monkeypatch, vae_decoder.run, apply_overrides(micro(), sets), straight, resumed, "vae-decoder",
        ("loss", "d_loss", "g_loss"), lambda root: load_vae(root / "vae-decoder" / "vae.safetensors"))
    assert state["step"] == 3 and {"disc", "disc_optimizer"} <= set(state)
    assert [r["step"] for r in resumed_rows] == list(range(6))
    assert all("d_loss" in r for r in rows)
    assert [("g_loss" in r) for r in rows] == [False] * 3 + [True] * 3
    assert all(r["adv_weight"] > 0 for r in rows[3:])


def test_adversarial_ode_init_trains_its_discriminator_and_resumes(micro_run, tmp_path, monkeypatch):
    """ode-init with the matching-aware latent discriminator: it learns to tell real clips of their prompt from
    the student's and from real clips under a swapped shape word (from the first steps, the student's loss adds
    its generator term from adv_start), and a stopped run resumes to the straight run's losses and weights."""
    from trainer.stages import ode_init
    from trainer.config import SHAPE_WORDS
    src = micro_run[0]
    sets = ["ode_init.steps=8", "ode_init.adv_weight=0.1", "ode_init.adv_start=4", "ode_init.log_every=1",
            "ode_init.ckpt_every=4", f"ode_init.mismatch_words={json.dumps([list(SHAPE_WORDS)])}"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    for root in (straight, resumed):
        _copy_prereqs(src, root)
        for stage in ("teacher", "teacher-refine", "ode-pairs"):
            shutil.copytree(src / stage, root / stage)
    state, rows, resumed_rows = _stopped_and_resumed(
        monkeypatch, ode_init.run, apply_overrides(micro(), sets), straight, resumed, "ode-init",
        ("loss", "d_loss", "regression"), lambda root: load_dit(root / "ode-init" / "student.safetensors"))
    assert state["step"] == 4 and {"disc", "disc_optimizer"} <= set(state)
    assert [r["step"] for r in resumed_rows] == list(range(8))
    assert [("g_loss" in r) for r in rows] == [False] * 4 + [True] * 4
    assert all({"d_real", "d_fake", "d_mismatch", "regression", "d_loss"} <= set(r) for r in rows)


def test_matching_discriminator_learns_the_prompt_not_only_realism():
    """matching_d_loss: trained on 'real' latents whose class is in the prompt, the latent discriminator
    ends up scoring a real clip under its own prompt above the same clip under a swapped prompt."""
    from trainer.adversarial import LatentDiscriminator, matching_d_loss
    torch.manual_seed(0)
    disc = LatentDiscriminator(4, 8, width=16, depth=2)
    opt = torch.optim.Adam(disc.parameters(), lr=3e-3, betas=(0.5, 0.9))
    words = torch.randn(2, 1, 8)  # two one-token "prompts"

    def batch(n=16):
        label = torch.randint(0, 2, (n,))
        z = torch.randn(n, 4, 3, 6, 6) * 0.1
        z[:, 0] += torch.where(label == 1, 1.0, -1.0)[:, None, None, None]  # the class is in channel 0
        return z, words[label], words[1 - label]

    for _ in range(200):
        z, text, swapped = batch()
        loss, _ = matching_d_loss(disc, z, text, torch.randn_like(z), text, swapped)
        opt.zero_grad()
        loss.backward()
        opt.step()
    z, text, swapped = batch(64)
    with torch.no_grad():
        right, wrong = disc(z, text), disc(z, swapped)
    assert (right > wrong).float().mean() > 0.9


def test_decoder_lr_warms_up_then_decays_to_zero():
    from trainer.schedules import lr_at
    lrs = [lr_at(s, 100, 1e-3, 10) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and lrs[-1] < 1e-6


def test_ablation_variants_share_the_main_run_and_publish_writes_a_small_float16_builtin(micro_run, tmp_path):
    from causvid_core.pipeline import load_components
    from trainer.ablation import VARIANTS, run_ablation
    from trainer.config import apply_overrides
    from trainer.publish import publish
    src = micro_run[0]
    root = tmp_path / "r"
    shutil.copytree(src, root, ignore=shutil.ignore_patterns("ablation"))
    cfg = apply_overrides(micro(), ["dmd.steps=2", "dmd.gen_every=1"])
    out = run_ablation(cfg, root, log=lambda m: None)
    assert set(out) == set(VARIANTS)
    for name, path in out.items():
        done = json.loads((path.parent / "DONE.json").read_text())
        assert {k: done[k] for k in VARIANTS[name]} == VARIANTS[name]
        assert (path.parent.parent / "teacher").is_symlink()  # shared, not retrained
        assert not torch.equal(load_dit(path).blocks[0].ffn[0].weight, load_dit(root / "dmd" / "student.safetensors").blocks[0].ffn[0].weight)
    sizes = publish(root, tmp_path / "builtin", note="teacher resumed with an EMA")
    assert set(sizes) == {"student.safetensors", "vae.safetensors", "text.safetensors", "teacher.safetensors"}
    assert next(load_dit(tmp_path / "builtin" / "student.safetensors").parameters()).dtype == torch.float16
    comps = load_components(tmp_path / "builtin" / "student.safetensors")
    assert next(comps.model.parameters()).dtype == torch.float32  # upcast on CPU
    assert next(comps.vae.parameters()).dtype == torch.float32
    assert comps.stream_defaults == load_components(root / "student.safetensors").stream_defaults
    ref = load_dit(root / "student.safetensors")
    for n, p in ref.state_dict().items():
        assert torch.allclose(p, comps.model.state_dict()[n], rtol=1e-3, atol=1e-4), n
    prov = json.loads((tmp_path / "builtin" / "PROVENANCE.json").read_text())
    assert set(prov["files"]) == set(sizes) and "dmd" in prov["stages"]
    assert prov["note"] == "teacher resumed with an EMA"
    from trainer.publish import restore
    again = tmp_path / "again"
    assert restore(again, tmp_path / "builtin") == ["vae", "vae-decoder", "text", "teacher", "teacher-refine"]
    assert all((again / s / "DONE.json").exists() for s in ("vae", "vae-decoder", "text", "teacher"))
    t0, t1 = load_dit(root / "teacher" / "teacher.safetensors"), load_dit(again / "teacher" / "teacher.safetensors")
    assert next(t1.parameters()).dtype == torch.float32
    assert all(torch.allclose(p, t1.state_dict()[n], rtol=1e-3, atol=1e-4) for n, p in t0.state_dict().items())
    from trainer.pipeline import run_stage
    run_stage("ode-pairs", cfg, again)  # the restored run goes on; nothing encoded its data set yet
    assert (again / "ode-pairs" / "DONE.json").exists() and (again / "latents.safetensors").exists()
    # restored without a config: no time claimed; with the published run's config, each stage keeps the time
    # that run measured, unless the config trains it differently (then the run's total must not count it)
    from trainer.pipeline import restored_stages
    assert "seconds" not in json.loads((again / "vae" / "DONE.json").read_text())
    assert restored_stages(micro(), again)["vae"] is None
    part = tmp_path / "part"
    changed = apply_overrides(micro(), ["text.steps=7"])
    assert restore(part, tmp_path / "builtin", changed, stages=["vae", "text"]) == ["vae", "text"]
    assert sorted(p.name for p in part.iterdir()) == ["text", "vae"]  # the teacher is left to train anew
    vae_done = json.loads((part / "vae" / "DONE.json").read_text())
    assert vae_done["seconds"] == prov["stages"]["vae"]["seconds"] and vae_done["seconds"] > 0
    assert "seconds" not in json.loads((part / "text" / "DONE.json").read_text())  # text.steps differs
    assert restored_stages(changed, part) == {"vae": vae_done["seconds_from"], "text": None}
    assert stage_seconds(changed, part)["vae"] == vae_done["seconds"]
    with pytest.raises(ValueError, match="cannot restore"):
        restore(part, tmp_path / "builtin", changed, stages=["dmd"])


def _copy_prereqs(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("vae", "text"):
        shutil.copytree(src / name, dst / name)
    shutil.copy(src / "latents.safetensors", dst / "latents.safetensors")


def _teacher_cmd(root: Path, *sets: str, stage: str = "teacher") -> list:
    cmd = [PY, "-m", "trainer.cli", stage, "--preset", "micro", "--out", str(root)]
    for s in sets:
        cmd += ["--set", s]
    return cmd


def _process_tree(pid: int) -> list[int]:
    """pid and its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def _launch_two(root: Path, sets, port: int, stage: str = "teacher") -> list:
    """A micro stage in two gloo processes (accelerate launch with the shipped one-machine config)."""
    config = Path(__file__).resolve().parent.parent / "configs" / "accelerate" / "one_node.yaml"
    return [PY, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes", "2",
            "--main_process_port", str(port), *_teacher_cmd(root, *sets, stage=stage)[1:]]


def _two_processes(root: Path, sets, port: int, stage: str = "teacher") -> subprocess.CompletedProcess:
    return subprocess.run(_launch_two(root, sets, port, stage), capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def _losses(root: Path, stage: str = "teacher", key: str = "loss") -> list[tuple[int, float]]:
    rows = [json.loads(l) for l in (root / stage / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r[key]) for r in rows if key in r]


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                    reason="torch.compile's CPU backend needs a C++ compiler")
def test_compiled_stages_train_and_sample_as_eager_ones(micro_run, tmp_path):
    """teacher.compile / ode_pairs.compile: the same losses, weights and pairs as eager, to float32 rounding."""
    from safetensors.torch import load_file
    src = micro_run[0]
    from torch._dynamo.utils import counters
    sets = ["teacher.steps=4", "teacher.log_every=1", "teacher_refine.steps=0", "ode_pairs.num_pairs=4"]
    out, compiled = {}, {}
    for flag in ("false", "true"):
        counters.clear()
        root = tmp_path / flag
        _copy_prereqs(src, root)
        cfg = apply_overrides(micro(), sets + [f"teacher.compile={flag}", f"ode_pairs.compile={flag}"])
        run_stage("teacher", cfg, root)
        run_stage("ode-pairs", cfg, root)
        out[flag] = (_losses(root), load_dit(output(root, "teacher")).state_dict(),
                     load_file(sorted((root / "ode-pairs").glob("shard_*.safetensors"))[0]))
        compiled[flag] = counters["frames"]["ok"]  # frames dynamo compiled: none when the flag is ignored
    assert compiled["false"] == 0 < compiled["true"], compiled
    (eager_losses, eager_w, eager_pairs), (comp_losses, comp_w, comp_pairs) = out["false"], out["true"]
    assert [s for s, _ in comp_losses] == [s for s, _ in eager_losses] == [0, 1, 2, 3]
    assert all(abs(a - b) <= 1e-4 * abs(a) for (_, a), (_, b) in zip(eager_losses, comp_losses))
    assert eager_w.keys() == comp_w.keys()
    assert all(torch.allclose(eager_w[k], comp_w[k], atol=1e-5) for k in eager_w)
    assert all(torch.allclose(eager_pairs[k].float(), comp_pairs[k].float(), atol=1e-3) for k in eager_pairs)
    with pytest.raises(ValueError, match="vae.compile"):  # the VAE's loss calls encode / decode, not forward
        run_stage("vae", apply_overrides(micro(), ["vae.compile=true"]), tmp_path / "vae")


def test_kill_and_resume_reproduces_the_uninterrupted_losses(micro_run, tmp_path):
    src = micro_run[0]
    sets = ("teacher.steps=150", "teacher.log_every=1", "teacher.ckpt_every=10")
    a, b = tmp_path / "a", tmp_path / "b"
    _copy_prereqs(src, a)
    _copy_prereqs(src, b)
    subprocess.run(_teacher_cmd(a, *sets), check=True, capture_output=True, timeout=600)
    proc = subprocess.Popen(_teacher_cmd(b, *sets), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = b / "teacher" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline:  # kill mid-run, after a checkpoint and a few more logged steps
        if (b / "teacher" / "state.pt").exists() and metrics.exists() and len(metrics.read_text().splitlines()) >= 45:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    logged = len(metrics.read_text().splitlines())
    assert 0 < logged < 150, f"the kill did not land mid-run ({logged} steps logged)"
    state = torch.load(b / "teacher" / "state.pt", weights_only=True)
    assert 0 < state["step"] < 150
    before = json.loads((b / "teacher" / "seconds.json").read_text())["seconds"]
    subprocess.run(_teacher_cmd(b, *sets), check=True, capture_output=True, timeout=600)
    # time spent counts across the kill: the resumed process adds to it, and the metrics' clock goes on
    assert json.loads((b / "teacher" / "DONE.json").read_text())["seconds"] > before > 0
    clock = [json.loads(l)["time"] for l in metrics.read_text().splitlines()]
    assert clock == sorted(clock), "the metrics' time went back at the resume"
    la, lb = _losses(a), _losses(b)
    assert [s for s, _ in lb] == list(range(150))
    assert [s for s, _ in la] == [s for s, _ in lb]
    worst = max(abs(x - y) for (_, x), (_, y) in zip(la, lb))
    assert worst <= 1e-6, f"resumed losses differ by {worst}"
    wa, wb = load_dit(a / "teacher" / "teacher.safetensors"), load_dit(b / "teacher" / "teacher.safetensors")
    for (k, x), (_, y) in zip(wa.state_dict().items(), wb.state_dict().items()):
        assert torch.allclose(x, y, atol=1e-6), k


def test_teacher_saves_its_ema_and_an_older_state_starts_the_ema_from_the_resumed_weights(micro_run, tmp_path):
    """The saved teacher is the EMA, not the raw weights; a state.pt written before the EMA existed (the
    built-in teacher was resumed that way at step 7800) resumes with the EMA copied from its weights."""
    from trainer.stages import teacher as teacher_stage
    src = micro_run[0]
    fresh, old = tmp_path / "fresh", tmp_path / "old"
    for root in (fresh, old):
        _copy_prereqs(src, root)
    cfg = apply_overrides(micro(), ["teacher.steps=6", "teacher.ema=0.5", "teacher.ckpt_every=100"])
    teacher_stage.run(cfg, fresh)
    state = torch.load(fresh / "teacher" / "state.pt", weights_only=True)
    saved = load_dit(fresh / "teacher" / "teacher.safetensors").state_dict()
    assert all(torch.equal(saved[k], v) for k, v in state["ema"].items())
    assert not all(torch.equal(saved[k], v) for k, v in state["model"].items()), "saved the raw weights"

    teacher_stage.run(apply_overrides(micro(), ["teacher.steps=5", "teacher.ema=0", "teacher.ckpt_every=100"]), old)
    (old / "teacher" / "DONE.json").unlink()
    assert "ema" not in torch.load(old / "teacher" / "state.pt", weights_only=True)
    teacher_stage.run(cfg, old)  # one more step, now with an EMA: it starts as that step's weights
    state = torch.load(old / "teacher" / "state.pt", weights_only=True)
    assert state["step"] == 6
    assert all(torch.equal(state["ema"][k], v) for k, v in state["model"].items())


def test_teacher_lr_is_constant_until_decay_from_then_cosine_to_zero():
    from trainer.schedules import lr_at
    lrs = [lr_at(s, 100, 1e-3, decay_from=60) for s in range(100)]
    assert lrs[:61] == [1e-3] * 61 and lrs[61] < 1e-3 and lrs[-1] < 1e-5
    assert lrs[80] == pytest.approx(0.5e-3, rel=0.1)


def test_two_processes_end_with_the_weights_of_one(micro_run, tmp_path):
    """Two gloo processes (accelerate launch) at the same global batch equal one process, within 1e-5."""
    src = micro_run[0]
    sets = ("teacher.steps=6", "teacher.batch=8", "teacher.ckpt_every=100")
    one, two, accum = tmp_path / "one", tmp_path / "two", tmp_path / "accum"
    for d in (one, two, accum):
        _copy_prereqs(src, d)
    subprocess.run(_teacher_cmd(one, *sets), check=True, capture_output=True, timeout=600)
    subprocess.run(_teacher_cmd(accum, *sets, "teacher.grad_accum=2"), check=True, capture_output=True, timeout=600)
    r = _two_processes(two, sets, port=29533)
    assert r.returncode == 0, r.stderr[-3000:]
    w = {name: load_dit(d / "teacher" / "teacher.safetensors").state_dict() for name, d in
         (("one", one), ("two", two), ("accum", accum))}
    for other in ("two", "accum"):
        worst = max((w["one"][k] - w[other][k]).abs().max().item() for k in w["one"])
        assert worst <= 1e-5, f"{other}: max weight difference {worst}"
    start = load_dit(one / "teacher" / "teacher.safetensors")  # and training did move the weights
    from trainer.stages.common import new_dit
    init = new_dit(micro())
    assert max((start.state_dict()[k] - v).abs().max().item() for k, v in init.state_dict().items()) > 1e-3


FSDP_STAGES = {  # case: (its output, the stages its folder must not hold, settings, the two processes' own)
    "teacher": ("teacher/teacher.safetensors", ("teacher",), ("teacher.steps=6", "teacher.ckpt_every=3"), ()),
    "ode-init": ("ode-init/student.safetensors", ("ode-init", "dmd"), ("ode_init.ckpt_every=3",), ()),
    "dmd": ("dmd/student.safetensors", ("dmd",), ("dmd.ckpt_every=3",), ()),
    # the rollout generator, gradients accumulated over two micro-batches in each of the two processes
    "dmd-rollout": ("dmd/student.safetensors", ("dmd",), ("dmd.ckpt_every=3", "dmd.generator_input=rollout"),
                    ("dmd.grad_accum=2",)),
}


@pytest.mark.parametrize("case", sorted(FSDP_STAGES))
def test_fsdp_two_processes_end_with_the_weights_of_one(micro_run, tmp_path, case):
    """parallel.strategy=fsdp: two gloo processes, each holding half of every DiT's weights, gradients and
    optimizer state (checkpointed and saved whole), at the same global batch equal one process within 1e-5,
    and log the same losses: teacher (with its sharded EMA), ODE init, and DMD (critic, real score and EMA
    sharded too; data-noised and self-rollout generator input, the latter with accumulated gradients)."""
    src = micro_run[0]
    stage = case.split("-rollout")[0]
    out, drop, extra, two_only = FSDP_STAGES[case]
    one, two = tmp_path / "one", tmp_path / "two"
    for d in (one, two):
        shutil.copytree(src, d, ignore=shutil.ignore_patterns(*drop, "export"))
    sets = (*extra, f"{stage.replace('-', '_')}.log_every=1")
    subprocess.run(_teacher_cmd(one, *sets, stage=stage), check=True, capture_output=True, timeout=600)
    r = _two_processes(two, (*sets, *two_only, "parallel.strategy=fsdp"), port=29560 + sorted(FSDP_STAGES).index(case),
                       stage=stage)
    assert r.returncode == 0, r.stderr[-3000:]
    done = json.loads((two / stage / "DONE.json").read_text())
    assert done["processes"] == 2 and done["sharded"], done  # it did run sharded
    a, b = load_dit(one / out).state_dict(), load_dit(two / out).state_dict()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-5, f"{case}: max weight difference {worst}"
    key = "loss_critic" if stage == "dmd" else "loss"
    la, lb = _losses(one, stage, key), _losses(two, stage, key)
    assert len(la) == len(lb) > 2 and max(abs(x - y) for (_, x), (_, y) in zip(la, lb)) <= 1e-6


def test_dmd_gradient_matches_the_hand_computed_value():
    x_gen = torch.tensor([[1.0, 2.0]], requires_grad=True)
    x_real = torch.tensor([[0.0, 0.0]])
    x_fake = torch.tensor([[0.5, 1.0]])
    loss = dmd_generator_loss(x_gen, x_real, x_fake)
    loss.backward()
    # norm = mean|x_gen - x_real| = 1.5; grad = (x_fake - x_real) / 1.5 = [1/3, 2/3]
    # loss = 0.5 * mean(grad^2) = 5/36; d loss / d x_gen = grad / numel = [1/6, 1/3]
    assert abs(loss.item() - 5 / 36) < 1e-12
    assert torch.allclose(x_gen.grad, torch.tensor([[1 / 6, 1 / 3]]), atol=1e-7)
    # a step against the gradient moves x_gen along (x_real - x_fake): from the fake score toward the real
    step = -0.1 * x_gen.grad
    assert torch.dot(step.flatten(), (x_real - x_fake).flatten()) > 0


@pytest.mark.parametrize("changes", [
    ["dmd.generator_input=rollout"],
    ["dmd.real_score=causal-teacher", "dmd.init=teacher"],
])
def test_dmd_variants_train(micro_run, tmp_path, changes):
    src = micro_run[0]
    root = tmp_path / "r"
    _copy_prereqs(src, root)
    for name in ("teacher", "teacher-refine", "causal-teacher", "ode-pairs", "ode-init"):
        shutil.copytree(src / name, root / name)
    cfg = apply_overrides(micro(), ["dmd.steps=4", "dmd.gen_every=2"] + changes)
    run_stage("dmd", cfg, root)
    rows = [json.loads(l) for l in (root / "dmd" / "metrics.jsonl").read_text().splitlines()]
    assert any("loss_dmd" in r and r["gen_grad_norm"] > 0 for r in rows)
    done = json.loads((root / "dmd" / "DONE.json").read_text())
    assert all(done[k.split("=")[0].split(".")[1]] == k.split("=")[1] for k in changes)


def test_contrast_prompts_swap_one_word_for_each_rival():
    groups = [["circle", "square", "triangle"]]
    neg = contrast_prompts(["a red square moving up on a black background", ""], groups)
    assert neg == [["a red triangle moving up on a black background", ""],
                   ["a red circle moving up on a black background", ""]]


def test_contrastive_guidance_adds_the_gap_to_the_mean_rival():
    from causvid_core.flow import FlowGrid

    def model(x_t, t, ctx, chunk_frames=None):  # a flow that depends on the context only
        return ctx.sum(dim=(1, 2)).view(-1, 1, 1, 1, 1).expand_as(x_t)

    grid, x_t, t = FlowGrid(5.0), torch.zeros(1, 1, 1, 1, 1), torch.tensor([500.0])
    ctx = {name: torch.full((1, 1, 1), v) for name, v in (("c", 1.0), ("u", 0.0), ("a", 3.0), ("b", 5.0))}
    sigma = float(grid.sigma(t))
    x0 = {k: -sigma * float(v.sum()) for k, v in ctx.items()}  # x0 = x_t - sigma * flow
    got = guided_x0(model, x_t, t, ctx["c"], ctx["u"], 2.0, grid, negatives=[ctx["a"], ctx["b"]], contrast=0.5)
    want = x0["c"] + 2.0 * (x0["c"] - x0["u"]) + 0.5 * (x0["c"] - (x0["a"] + x0["b"]) / 2)
    assert abs(got.item() - want) < 1e-6
    plain = guided_x0(model, x_t, t, ctx["c"], ctx["u"], 2.0, grid)
    assert abs(plain.item() - (x0["c"] + 2.0 * (x0["c"] - x0["u"]))) < 1e-6


def test_dmd_with_contrastive_real_score_trains(micro_run, tmp_path):
    src = micro_run[0]
    root = tmp_path / "r"
    _copy_prereqs(src, root)
    for name in ("teacher", "teacher-refine", "ode-pairs", "ode-init"):
        shutil.copytree(src / name, root / name)
    cfg = apply_overrides(micro(), ["dmd.steps=2", "dmd.gen_every=1", "dmd.contrast=3.0",
                                    'dmd.contrast_words=[["circle","square","triangle"]]'])
    run_stage("dmd", cfg, root)
    rows = [json.loads(l) for l in (root / "dmd" / "metrics.jsonl").read_text().splitlines()]
    assert any("loss_dmd" in r and r["gen_grad_norm"] > 0 for r in rows)
    assert json.loads((root / "dmd" / "DONE.json").read_text())["contrast"] == 3.0


def test_self_rollout_backpropagates_through_the_exit_step_only():
    from causvid_core.flow import FlowGrid
    from trainer.stages.dmd import self_rollout
    from conftest import tiny_model
    gen = tiny_model()
    gen.train()
    noise = torch.randn(1, 16, 6, 2, 2)
    cond = torch.randn(1, 4, gen.config.text_dim)
    out = self_rollout(gen, noise, cond, [1000.0, 750.0, 500.0], FlowGrid(5.0), 3, [2, 0],
                       lambda c, i, shape: torch.zeros(shape), torch.float32)
    assert out.requires_grad
    out[:, :, 3:].sum().backward()  # the second chunk: one (exit) step, attending to the first as cached past
    assert gen.blocks[0].self_attn.q.weight.grad.abs().sum() > 0


def test_checkpointed_self_rollout_has_the_gradients_of_the_plain_one():
    """Activation checkpointing through the KV cache: each chunk's blocks are recomputed in the backward pass,
    writing and reading the cache where their chunk did (the refreshed past, the chunk's own slots), so the
    gradients equal those of the rollout that kept every activation."""
    from causvid_core.flow import FlowGrid
    from trainer.stages.dmd import self_rollout
    from conftest import tiny_model
    noise = torch.randn(1, 16, 9, 2, 2)
    cond = torch.randn(1, 4, tiny_model().config.text_dim)
    renoise = {(c, i): torch.randn(1, 16, 3, 2, 2) for c in range(3) for i in range(3)}
    for exits in ([2, 0, 1], [0, 1, 2]):  # the first chunk's exit with gradient first, or after no-grad steps
        grads = []
        for checkpointing in (False, True):
            gen = tiny_model(seed=3)
            gen.train()
            gen.gradient_checkpointing = checkpointing
            out = self_rollout(gen, noise, cond, [1000.0, 750.0, 500.0], FlowGrid(5.0), 3, exits,
                               lambda c, i, shape: renoise[c, i], torch.float32)
            (out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum().backward()
            grads.append({n: p.grad.clone() for n, p in gen.named_parameters() if p.grad is not None})
        assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
        assert "blocks.0.cross_attn.k.weight" in grads[0] and "text_embedding.0.weight" in grads[0]
        worst = max((grads[0][n] - grads[1][n]).abs().max().item() for n in grads[0])
        assert worst <= 1e-5 * max(g.abs().max().item() for g in grads[0].values()), (exits, worst)


def test_presets_and_overrides():
    assert preset("wan-1.3b").dit.preset == "wan2.1-t2v-1.3b"
    cfg = apply_overrides(micro(), ["dmd.steps=7", "dit.overrides.dim=48", "dmd.generator_input=rollout"])
    assert cfg.dmd.steps == 7 and cfg.dit.overrides["dim"] == 48 and cfg.dmd.generator_input == "rollout"
    for bad in ("dmd.nope=1", "nope.steps=1", "dmd.steps"):
        with pytest.raises(ValueError):
            apply_overrides(micro(), [bad])
    with pytest.raises(ValueError, match="unknown training preset"):
        preset("huge")


def test_vae_burn_in_reconstructs_the_same_frames_as_the_whole_clip():
    """Training after a no-gradient history computes exactly the whole clip's later frames."""
    from causvid_core.vae import random_vae
    from trainer.stages.vae import reconstruct
    vae = random_vae("wan-tiny", seed=1)
    x = torch.rand(1, 3, 13, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        whole, _, _ = reconstruct(vae, x)
    tail, mu, _ = reconstruct(vae, x, history=4)
    assert tail.shape[2] == 8 and mu.shape[2] == 2 and tail.requires_grad
    assert (tail.detach() - whole[:, :, 5:]).abs().max() < 1e-5


def test_crop_batch_centres_the_object_of_a_rolled_clip():
    """The window holds the object's centre (at the asked frame) at its middle plus the jitter, and a rolled
    clip is the render of the same clip started elsewhere on the torus."""
    import numpy as np

    from causvid_core import world
    from trainer.data import clip, crop_batch
    frames, size, centre = 9, 32, 4
    jitter = torch.tensor([[0.0, 0.0], [5.0, -3.0], [-6.0, 6.0]])
    x = crop_batch(11, [0, 1, 2], frames, size, centre, jitter)
    assert x.shape == (3, 3, frames, size, size) and x.min() >= -1 and x.max() <= 1
    for b, i in enumerate([0, 1, 2]):
        spec, video = clip(11, i, frames)
        frame = x[b, :, centre]  # [3, size, size]
        bg = frame.flatten(1).median(dim=1).values[:, None, None]
        fg = ((frame - bg).abs().amax(0) > 0.05).float()
        ys, xs = torch.nonzero(fg, as_tuple=True)
        cx, cy = xs.float().mean().item(), ys.float().mean().item()  # pixel centres: size / 2 - 0.5 is the middle
        # (an equilateral triangle's centroid is its circumcentre: every shape's centroid is its centre)
        assert abs(cx - (size / 2 - 0.5 + jitter[b, 0].item())) < 1.0
        assert abs(cy - (size / 2 - 0.5 + jitter[b, 1].item())) < 1.0
        x0, y0 = world.positions(spec, np.array([centre]))[0]
        sx, sy = round(32 - x0 + jitter[b, 0].item()), round(32 - y0 + jitter[b, 1].item())
        moved = world.render(world.ClipSpec(spec.colour, spec.shape, spec.motion, spec.background, spec.radius,
                                            spec.speed, (spec.x0 + sx) % 64, (spec.y0 + sy) % 64), frames)
        assert np.abs(np.roll(video, (sy, sx), axis=(1, 2)).astype(int) - moved.astype(int)).max() <= 1
    with pytest.raises(ValueError, match="multiple of 8"):
        crop_batch(11, [0], frames, 20, centre, jitter[:1])


def test_vae_stage_trains_on_object_crops(tmp_path):
    """crop > 0: the stage trains on windows (with burn-in) and the VAE still encodes whole frames."""
    from causvid_core.vae import load_vae
    cfg = apply_overrides(micro(), ["vae.crop=16", "vae.steps=6", "vae.ckpt_every=3"])
    run_stage("vae", cfg, tmp_path)
    metrics = [json.loads(line) for line in (tmp_path / "vae" / "metrics.jsonl").read_text().splitlines()]
    assert metrics and all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics)
    vae = load_vae(output(tmp_path, "vae"))
    with torch.no_grad():
        z = vae.encode(torch.zeros(1, 3, 5, 32, 32))
    assert z.shape[-2:] == (4, 4)


def test_resuming_a_run_with_other_settings_says_which(tmp_path):
    from trainer.pipeline import record_config
    logs: list[str] = []
    record_config(micro(), tmp_path, logs.append)
    record_config(micro(), tmp_path, logs.append)
    assert logs == []  # same settings: nothing to say
    record_config(apply_overrides(micro(), ["vae.crop=16", "dmd.steps=7"]), tmp_path, logs.append)
    assert len(logs) == 1 and "2 changed" in logs[0]
    assert "vae.crop: 0 -> 16" in logs[0] and f"dmd.steps: {micro().dmd.steps} -> 7" in logs[0]
    assert json.loads((tmp_path / "config.json").read_text())["vae"]["crop"] == 16


def test_inflated_vae_starts_as_an_autoencoder_of_each_frame():
    """init_weights(inflate=True): every latent frame of a still clip is the first-frame (image) latent, and every
    decoded frame the image decode, so the video phase starts from what the image phase trained."""
    from causvid_core.vae import WanVAE, vae_preset
    from trainer.stages.vae import init_weights
    torch.manual_seed(0)
    vae = WanVAE(vae_preset("wan-tiny").replace(padding="circular"))
    init_weights(vae, inflate=True)
    frame = torch.rand(1, 3, 1, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    still = frame.expand(-1, -1, 9, -1, -1).contiguous()
    with torch.no_grad():
        z, z_image = vae.encode_moments(still)[0], vae.encode_moments(frame)[0]
        assert z.shape[2] == 3 and torch.allclose(z, z_image.expand_as(z), atol=1e-6)
        y, y_image = vae.decoder(vae.conv2(z)), vae.decoder(vae.conv2(z_image))
        assert torch.allclose(y, y_image.expand_as(y), atol=1e-6)
    init_weights(vae)  # without inflation the past taps are live
    with torch.no_grad():
        z = vae.encode_moments(still)[0]
    assert (z - z[:, :, :1]).abs().max() > 1e-3


def test_torus_roll_of_latents_is_the_latent_of_the_rolled_clip(tmp_path):
    """data.roll: with a circular VAE, rolling a clip's latent by whole cells equals encoding the clip moved by 8x
    those pixels on the torus, i.e. another clip of the world; a zero-padded VAE is refused."""
    from causvid_core import world
    from causvid_core.vae import random_vae, vae_preset
    from trainer.data import clip_batch, torus_roll
    from trainer.stages.teacher import check_roll
    vae = random_vae(vae_preset("wan-tiny").replace(padding="circular"), seed=2)
    x, _ = clip_batch(3, [0, 1], 9)
    u = torch.tensor([[0.3, 0.9], [0.0, 0.5]])  # 8x8 latents: rolls (2, 7) and (0, 4) cells
    with torch.no_grad():
        z = vae.encode(x)
        moved = torch.stack([torch.roll(x[0], (16, 56), (-2, -1)), torch.roll(x[1], (0, 32), (-2, -1))])
        assert torch.allclose(torus_roll(z, u), vae.encode(moved), atol=1e-5)
    assert world.FRAME_SIZE == x.shape[-1]
    cfg = apply_overrides(micro(), ["data.roll=true"])
    from causvid_core.vae import save_vae
    root = tmp_path
    (root / "vae").mkdir()
    save_vae(random_vae("wan-tiny"), output(root, "vae"))
    with pytest.raises(ValueError, match="circular"):
        check_roll(cfg, root)
    check_roll(apply_overrides(micro(), ["data.roll=false"]), root)


def test_vae_image_phase_then_video_resumes_across_the_switch(tmp_path, monkeypatch):
    """image_steps: single frames first (image_batch_factor per index), then clips; the optimizer's moments are
    reset where the video phase starts. A run stopped at a checkpoint inside the video phase and resumed logs the
    straight run's losses and ends with its weights."""
    from causvid_core.vae import load_vae
    from trainer.stages import vae as vae_stage
    sets = ["vae.steps=8", "vae.image_steps=4", "vae.ckpt_every=6", "vae.log_every=1", "vae.crop=16",
            "vae.image_crop=16", "vae.stats_clips=4"]
    cfg = apply_overrides(micro(), sets)
    seen = []
    reconstruct = vae_stage.reconstruct
    monkeypatch.setattr(vae_stage, "reconstruct",
                        lambda m, x, *a, **k: (seen.append(tuple(x.shape)), reconstruct(m, x, *a, **k))[1])
    state, rows, _ = _stopped_and_resumed(monkeypatch, vae_stage.run, cfg, tmp_path / "a", tmp_path / "b", "vae",
                                          ("loss",), lambda root: load_vae(output(root, "vae")))
    assert state["step"] == 6
    assert seen[:4] == [(cfg.vae.batch * 4, 3, 1, 16, 16)] * 4  # the image phase
    assert all(s[2] > 1 for s in seen[4:8])  # then clips
    assert [r["step"] for r in rows] == list(range(8))


def test_autocast_runs_the_loss_in_bfloat16_and_keeps_float32_weights(micro_run, tmp_path):
    """LoopConfig.autocast: the teacher's loss runs under bfloat16 autocast; it trains (finite, falling losses
    close to the float32 run's first ones) and the saved weights stay float32."""
    src = micro_run[0]
    runs = {}
    for flag in (False, True):
        root = tmp_path / str(flag)
        _copy_prereqs(src, root)
        run_stage("teacher", apply_overrides(micro(), [f"teacher.autocast={str(flag).lower()}",
                                                       "teacher.log_every=1"]), root)
        runs[flag] = [json.loads(l)["loss"] for l in (root / "teacher" / "metrics.jsonl").read_text().splitlines()]
        assert load_dit(output(root, "teacher")).patch_embedding.weight.dtype == torch.float32
    low, ref = runs[True], runs[False]
    assert all(torch.isfinite(torch.tensor(low))) and low != ref
    assert abs(low[0] - ref[0]) < 0.05 * ref[0]
    assert sum(low[-5:]) < sum(low[:5])


def test_a_stages_attention_kernel_runs_its_dits_and_trains_as_the_default(micro_run, tmp_path, monkeypatch):
    """<stage>.attention: the teacher, causal-teacher, ODE-init and DMD stages run every DiT they train or query
    with that kernel (here "math"), and the teacher's losses and weights match the default kernel's (float32)."""
    from causvid_core import attention as attn
    src = micro_run[0]
    calls = {"math": 0}

    def counted(q, k, v):
        calls["math"] += 1
        return attn.math_attention(q, k, v)

    monkeypatch.setitem(attn.ATTENTION_BACKENDS, "math", counted)
    base = ["teacher.steps=4", "teacher.log_every=1", "teacher_refine.steps=0", "causal_teacher.steps=2",
            "ode_init.steps=2", "dmd.steps=2"]
    runs = {}
    for kernel in ("sdpa", "math"):
        root = tmp_path / kernel
        _copy_prereqs(src, root)
        shutil.copytree(src / "ode-pairs", root / "ode-pairs")
        cfg = apply_overrides(micro(), base + [f"{s}.attention={kernel}" for s in
                                               ("teacher", "causal_teacher", "ode_init", "dmd")])
        seen = {}
        for stage in ("teacher", "causal-teacher", "ode-init", "dmd"):
            before = calls["math"]
            run_stage(stage, cfg, root)
            seen[stage] = calls["math"] - before
        runs[kernel] = (_losses(root), load_dit(output(root, "teacher")).state_dict())
        if kernel == "sdpa":
            assert set(seen.values()) == {0}, seen
        else:
            assert all(n > 0 for n in seen.values()), seen
    (ref_losses, ref_w), (losses, w) = runs["sdpa"], runs["math"]
    assert [s for s, _ in losses] == [0, 1, 2, 3]
    assert all(abs(a - b) <= 1e-4 * abs(a) for (_, a), (_, b) in zip(ref_losses, losses))
    assert all(torch.allclose(ref_w[k], w[k], atol=1e-5) for k in ref_w)
    with pytest.raises(ValueError, match="unknown attention backend 'flash'"):
        _copy_prereqs(src, tmp_path / "bad")
        run_stage("teacher", apply_overrides(micro(), ["teacher.attention=flash"]), tmp_path / "bad")


def test_optional_stages_with_no_steps_are_left_out_of_the_run():
    """vae-decoder, teacher-refine and causal-teacher at steps 0 are off: the pipeline skips them and the
    training-time table does not list them as 'not recorded'."""
    from trainer.pipeline import active_stages
    off = apply_overrides(micro(), ["vae_decoder.steps=0", "teacher_refine.steps=0", "causal_teacher.steps=0"])
    assert active_stages(off) == ["vae", "text", "teacher", "ode-pairs", "ode-init", "dmd", "export"]
    assert {"vae-decoder", "teacher-refine", "causal-teacher"} <= set(active_stages(micro()))


def test_a_lora_of_student_minus_teacher_reconstructs_within_its_printed_error(tmp_path, capsys):
    """`causvid-train lora`: a truncated-SVD LoRA in ComfyUI's layout; the teacher with it (as any loader applies
    it) is as far from the student as the reported error says, modulations (no LoRA in ComfyUI) included."""
    from causvid_core.checkpoints import load_dit, save_dit
    from conftest import tiny_model
    from trainer.cli import main

    teacher = tiny_model(seed=1)
    student = tiny_model(seed=1)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in student.named_parameters():
            if p.dim() == 2:  # a rank-2 change of every linear layer, plus a little full-rank noise
                a, b = torch.randn(p.shape[0], 2, generator=g), torch.randn(2, p.shape[1], generator=g)
                p.add_(0.05 * a @ b + 0.001 * torch.randn(p.shape, generator=g))
            elif name.endswith("modulation"):
                p.add_(0.01 * torch.randn(p.shape, generator=g))
    save_dit(teacher, tmp_path / "teacher.safetensors")
    save_dit(student, tmp_path / "student.safetensors")
    assert main(["lora", "--out", str(tmp_path), "--teacher", str(tmp_path / "teacher.safetensors"),
                 "--student", str(tmp_path / "student.safetensors"), "--rank", "2"]) == 0
    out = capsys.readouterr()
    report = json.loads(out.out.strip().splitlines()[-1])
    assert "reconstruction error" in out.err and report["layers"] > 0
    merged = load_dit(tmp_path / "teacher.safetensors", lora=report["lora"]).state_dict()
    t, s = teacher.state_dict(), student.state_dict()
    diff = sum(float((s[k] - t[k]).pow(2).sum()) for k in s) ** 0.5
    resid = sum(float((s[k] - merged[k]).pow(2).sum()) for k in s) ** 0.5
    assert abs(resid / diff - report["rel_error"]) < 5e-3, (resid / diff, report)  # fp16 storage of the LoRA
    assert report["rel_error"] < 0.2 and report["left_out"] > 0  # rank 2 catches the rank-2 change; modulations not


def _wan_layout_inputs(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A tiny teacher as a Wan2.1 folder, a Wan VAE .pth and a transformers umT5 folder with its tokenizer (as
    Wan2.1 repos ship google/umt5-xxl): the files a user of the wan presets holds, in their real layouts."""
    from causvid_core.vae import random_vae
    from conftest import tiny_model
    from safetensors.torch import save_file

    from test_umt5 import hf_umt5, train_tokenizer_json

    teacher = tiny_model(seed=4, text_dim=32)  # the tiny umT5's width
    folder = tmp_path / "Wan2.1-T2V-tiny"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in teacher.state_dict().items()},
              str(folder / "diffusion_pytorch_model.safetensors"))
    c = teacher.config
    (folder / "config.json").write_text(json.dumps({
        "model_type": "t2v", "dim": c.dim, "ffn_dim": c.ffn_dim, "num_heads": c.num_heads, "num_layers": c.num_layers,
        "text_len": c.text_len, "in_dim": 16, "out_dim": 16, "freq_dim": c.freq_dim, "eps": 1e-6}))
    torch.save(random_vae("wan-tiny", seed=2).state_dict(), tmp_path / "Wan2.1_VAE.pth")
    umt5 = tmp_path / "umt5"
    hf_umt5(seed=6).save_pretrained(umt5)
    train_tokenizer_json(umt5)
    return folder, tmp_path / "Wan2.1_VAE.pth", umt5


def test_distilling_your_own_teacher_from_a_prompt_file(tmp_path, capsys):
    """`causvid-train pipeline --preset wan-tiny --teacher --vae --text-encoder --prompts`: a Wan2.1 folder as the
    teacher, a Wan VAE .pth, umT5 with its tokenizer and a prompt file with an unreadable row; text embeddings computed once,
    then ODE pairs, ODE init, DMD (rollout) and export; `causvid generate` makes a video from the student and from
    the teacher with the student's LoRA."""
    from causvid_core.cli import main as causvid
    from trainer.cli import main as causvid_train

    folder, vae_pth, umt5 = _wan_layout_inputs(tmp_path)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a red circle moving right on a black background"}\n'
                       '{"prompt": "a blue square moving up on a gray background"}\n'
                       '{"oops": 1}\n'
                       '{"caption": "a green triangle moving left on a navy background"}\n')
    run_dir = tmp_path / "run"
    args = ["pipeline", "--preset", "wan-tiny", "--teacher", folder, "--vae", vae_pth,
            "--text-encoder", umt5, "--prompts", prompts, "--out", run_dir, "--set", "student.export_dtype=bfloat16"]
    assert causvid_train(list(map(str, args))) == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    assert "prompts.jsonl line 3" in err  # the unreadable row is reported
    done = json.loads((run_dir / "text-embeds" / "DONE.json").read_text())
    assert done["prompts"] == 3 and done["unreadable"] == 1
    for stage in ("ode-pairs", "ode-init", "dmd", "export"):
        assert (run_dir / stage / "DONE.json").exists(), stage
    assert not (run_dir / "teacher").exists() and not (run_dir / "vae").exists()  # the user's own are used
    from safetensors import safe_open
    with safe_open(str(run_dir / "student.safetensors"), "pt") as f:  # as ComfyUI's Wan repacks: bf16, Wan keys
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"} and "blocks.0.self_attn.q.weight" in f.keys()

    gen = ["generate", "--vae", vae_pth, "--text-encoder", umt5,
           "--prompt", "a red circle moving right on a black background", "--width", "32", "--height", "32",
           "--frames", "9", "--quiet"]
    assert causvid(list(map(str, [*gen, "--model", run_dir / "student.safetensors", "--out", tmp_path / "s.mp4"]))) == 0
    assert causvid_train(["lora", "--out", str(run_dir), "--teacher", str(folder), "--rank", "4"]) == 0
    lora = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["lora"]
    assert causvid(list(map(str, [*gen, "--model", folder, "--lora", lora, "--out", tmp_path / "l.mp4"]))) == 0
    assert (tmp_path / "s.mp4").stat().st_size > 0 and (tmp_path / "l.mp4").stat().st_size > 0



def test_a_video_set_feeds_dmd_and_unreadable_clips_are_counted(tmp_path, capsys):
    """--videos: a folder of clips with caption sidecars, one unreadable and one without a caption; the usable ones
    are encoded once with the user's VAE. The user's teacher is fine-tuned on them (teacher.steps), a causal
    teacher trained from it (the ablation's real score), and DMD trains on them noised to the student's steps
    (CausVid), all from the fine-tuned teacher."""
    from causvid_core import world
    from causvid_core.cli import main as causvid
    from causvid_core.video_io import write_mp4
    from trainer.cli import main as causvid_train

    folder, vae_pth, umt5 = _wan_layout_inputs(tmp_path)
    teacher = load_dit(folder)
    videos = tmp_path / "videos"
    videos.mkdir()
    for i, prompt in enumerate(["a red circle moving right on a black background",
                                "a blue square moving up on a gray background",
                                "a green triangle moving left on a navy background"]):
        spec = world.spec_from_prompt(prompt, np.random.default_rng(i))
        write_mp4(videos / f"clip{i}.mp4", world.render(spec, 12))
        (videos / f"clip{i}.txt").write_text(prompt)
    (videos / "broken.mp4").write_bytes(b"not a video")
    (videos / "broken.txt").write_text("a red circle moving right on a black background")
    write_mp4(videos / "nocaption.mp4", np.zeros((9, 64, 64, 3), np.uint8))
    (tmp_path / "prompts.txt").write_text("a yellow circle moving down on a black background\n")
    run_dir = tmp_path / "run"
    args = ["pipeline", "--preset", "wan-tiny", "--teacher", folder, "--vae", vae_pth, "--text-encoder", umt5,
            "--prompts", tmp_path / "prompts.txt", "--videos", videos, "--set", "dmd.generator_input=data", "--out", run_dir,
            "--set", "ode_init.checkpointing=true", "--set", "dmd.checkpointing=true",  # activation checkpointing
            "--set", "teacher.steps=3", "--set", "causal_teacher.steps=2", "--set", "dmd.real_score=causal-teacher"]
    without_videos = [a for a in args if a not in ("--videos", videos)]
    assert causvid_train(list(map(str, without_videos))) == 2  # fine-tuning needs the clips
    assert "pass --videos" in capsys.readouterr().err and not run_dir.exists()
    assert causvid_train(list(map(str, args))) == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    done = json.loads((run_dir / "video-latents" / "DONE.json").read_text())
    assert done["clips"] == 3 and done["unreadable"] == 2, done
    assert "broken.mp4" in err and "nocaption.mp4" in err
    dmd_done = json.loads((run_dir / "dmd" / "DONE.json").read_text())
    assert dmd_done["generator_input"] == "data" and dmd_done["real_score"] == "causal-teacher"
    assert (run_dir / "student.safetensors").exists()
    tuned = load_dit(run_dir / "teacher" / "teacher.safetensors").state_dict()
    assert len([json.loads(l) for l in (run_dir / "teacher" / "metrics.jsonl").read_text().splitlines()]) >= 2
    assert max((tuned[k] - v).abs().max().item() for k, v in teacher.state_dict().items()) > 0  # it trained
    assert (run_dir / "causal-teacher" / "causal_teacher.safetensors").exists()
    from trainer.stages.common import teacher_path
    run_cfg = apply_overrides(preset("wan-tiny"), ["teacher.steps=3"])
    run_cfg.inputs.teacher = str(folder)
    assert teacher_path(run_cfg, run_dir) == run_dir / "teacher" / "teacher.safetensors"  # what later stages load
    out = tmp_path / "v.mp4"
    assert causvid(list(map(str, ["generate", "--model", run_dir / "student.safetensors", "--vae", vae_pth,
                                  "--text-encoder", umt5, "--prompt", "a red circle moving right on a black background",
                                  "--width", "32", "--height", "32", "--frames", "9", "--quiet", "--out", out]))) == 0
    assert out.stat().st_size > 0


@pytest.mark.parametrize("strategy,first,then", [("ddp", 1, 2), ("fsdp", 1, 2), ("fsdp", 2, 1)])
def test_killed_run_resumes_with_another_number_of_processes(micro_run, tmp_path, strategy, first, then):
    """kill -9 of a teacher run after a checkpoint, resumed by another number of gloo processes at the same
    global batch (sharded by FSDP, or DDP copies): it continues the uninterrupted one-process run's loss curve
    (within 1e-6) and ends with its weights (within the 1e-5 of two processes)."""
    src = micro_run[0]
    sets = ("teacher.steps=24", "teacher.batch=8", "teacher.ckpt_every=4", "teacher.log_every=1",
            f"parallel.strategy={strategy}")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    for d in (straight, resumed):
        _copy_prereqs(src, d)
    port = 29534 + 2 * first + (strategy == "fsdp") * 10
    subprocess.run(_teacher_cmd(straight, *sets), check=True, capture_output=True, timeout=600)
    cmd = _teacher_cmd(resumed, *sets) if first == 1 else _launch_two(resumed, sets, port)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not (resumed / "teacher" / "state.pt").exists():
        time.sleep(0.01)
    for pid in _process_tree(proc.pid):  # the launcher and its workers (each in a session of its own)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()
    assert (resumed / "teacher" / "state.pt").exists() and not (resumed / "teacher" / "DONE.json").exists(), \
        "the run was not killed mid-way"
    step = torch.load(resumed / "teacher" / "state.pt", weights_only=True)["step"]
    assert 0 < step < 24
    if then == 2:
        r = _two_processes(resumed, sets, port=port + 1)
        assert r.returncode == 0, r.stderr[-3000:]
    else:
        subprocess.run(_teacher_cmd(resumed, *sets), check=True, capture_output=True, timeout=600)
    la, lb = _losses(straight), _losses(resumed)
    assert [s for s, _ in la] == [s for s, _ in lb] == list(range(24))
    assert max(abs(x - y) for (_, x), (_, y) in zip(la, lb)) <= 1e-6
    a = load_dit(straight / "teacher" / "teacher.safetensors").state_dict()
    b = load_dit(resumed / "teacher" / "teacher.safetensors").state_dict()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-5, f"max weight difference {worst} after resuming at step {step} with {then} processes"
