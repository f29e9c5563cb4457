"""`causvid-train results`: one command writes RESULTS.md with every section, results.json and the plots,
from a run folder laid out like trainer/ablation.py's (tiny random models: numbers are ~0, the
structure is what is tested)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from PIL import Image

from causvid_core.checkpoints import save_dit
from causvid_core.evaluate_report import plot_drift_compare
from causvid_core.pipeline import META_STREAM
from causvid_core.text import WordEncoderConfig, WordTextEncoder, save_text_encoder
from causvid_core.vae import random_vae, save_vae
from conftest import tiny_model
from trainer.ablation import variant_root
from trainer.cli import main
from trainer.results import DRIFT_VARIANTS, CacheVariant, drift_variants, model_rows, start_noise
from trainer.config import micro
from trainer.stages.common import output, vae_stage

SECTIONS = ("# Results", "## What is weak", "## Teacher vs student", "## Speed: one clip end to end",
            "## Training time", "## Ablation (the paper's Table 4 at this scale)", "## Held-out colour-shape pairs",
            "## Shapes: what is drawn for each prompted shape", "## Long streams: drift", "## Prompt switches", "## Image-to-video", "## Video-to-video")
TIMED = {"teacher-refine": 5400.0, "dmd": 4500.0}
RESTORED = {"text": {"seconds": 600.0, "seconds_from": "runs/old at abc1234"}, "vae-decoder": {}}  # 2.92 h in all
STREAM = {"steps": [1000.0, 750.0, 500.0, 250.0], "shift": 5.0, "chunk_frames": 3}


def fake_run(root):
    """Every model of a finished run with ablation except causal-teacher-dmd (it must read "not trained")."""
    for seed, stage in enumerate(("teacher-refine", "causal-teacher", "ode-init", "dmd")):  # micro refines its teacher
        output(root, stage).parent.mkdir(parents=True, exist_ok=True)
        save_dit(tiny_model(seed=seed), output(root, stage))
    path = output(variant_root(root, "no-ode-init"), "dmd")
    path.parent.mkdir(parents=True)
    save_dit(tiny_model(seed=5), path)
    save_dit(tiny_model(seed=3), root / "student.safetensors", {META_STREAM: json.dumps(STREAM)})
    save_vae(random_vae("wan-tiny", seed=0), root / "vae.safetensors")
    torch.manual_seed(0)
    save_text_encoder(WordTextEncoder(WordEncoderConfig(text_dim=24, text_len=8)).eval(), root / "text.safetensors")
    for stage, seconds in TIMED.items():  # two stages that timed themselves; the others did not
        (root / stage / "DONE.json").write_text(json.dumps({"stage": stage, "seconds": seconds}))
    for stage, timed in RESTORED.items():  # `causvid-train restore`: with the published run's time, and without
        (root / stage).mkdir(parents=True, exist_ok=True)
        (root / stage / "DONE.json").write_text(json.dumps({"stage": stage, "restored_from": "builtin", **timed}))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    fake_run(root)
    doc = root / "docs" / "RESULTS.md"
    assert main(["results", "--preset", "micro", "--out", str(root), "--doc", str(doc), "--quick"]) == 0
    return root, doc


def test_results_md_has_every_section_and_ablation_row(report):
    root, doc = report
    text = doc.read_text()
    for heading in SECTIONS:
        assert f"\n{heading}" in "\n" + text, heading
    ablation = text.split("## Ablation")[1].split("\n## ")[0]
    for row in model_rows(root):
        assert f"| {row.label} |" in ablation, row.label
    res = json.loads((doc.parent / "results" / "results.json").read_text())
    assert res["rows"]["teacher"]["status"] == "ok"  # the refined teacher (micro has no plain teacher here)
    missing = next(line for line in ablation.splitlines() if line.startswith("| few-step causal: ODE init + causal"))
    assert "| not trained |" in missing
    assert "Regenerate: `causvid-train results --preset micro" in text and "Commit: `" in text
    assert "load average" in text  # timings beside other jobs are flagged, not passed off as the machine's
    for variant in DRIFT_VARIANTS:
        assert f"| {variant.label} |" in text
    for mode in ("cut", "recache", "blend"):
        assert f"| {mode} | colour |" in text
    weak = text.split("## What is weak")[1].split("\n## ")[0]
    assert "- Missed: the student's all-four accuracy" in weak  # random weights miss every target
    training = text.split("## Training time")[1].split("\n## ")[0]
    assert "| teacher-refine | 90.0 |" in training and "| dmd | 75.0 |" in training
    assert "| vae | not recorded |" in training and "| all stages timed | 175.0 |" in training
    assert "| text (restored: the time of runs/old at abc1234) | 10.0 |" in training
    assert "| vae-decoder (restored) | not recorded |" in training and "the run it was published from" in training
    assert "- Missed: training the run took 2.92 h on this machine in its timed stages alone" in weak
    assert "Training time not recorded for vae, vae-decoder, teacher, " in weak


def test_shape_confusion_counts_every_clip_of_the_teacher_student_and_vae(report):
    from trainer.results_doc import shape_confusion
    root, doc = report
    res = json.loads((doc.parent / "results" / "results.json").read_text())
    clips = [{"prompt": "a red square moving up on a black background", "detected": {"shape": "circle"}},
             {"prompt": "a red square staying still on a gray background", "detected": {"shape": None}},
             {"prompt": "a blue triangle moving up on a black background", "detected": {"shape": "triangle"}}]
    assert shape_confusion(clips)["square"] == {"circle": 1, "square": 0, "triangle": 0, "none": 1}
    assert sum(shape_confusion(clips)["triangle"].values()) == 1
    section = doc.read_text().split("## Shapes")[1].split("\n## ")[0]
    for label, clips in (("VAE round trip of the renders", res["ceilings"]["vae"]["clips"]),
                         (res["rows"]["student"]["label"], res["rows"]["student"]["clips"]),
                         (res["rows"]["teacher"]["label"], res["rows"]["teacher"]["clips"])):
        rows = [line for line in section.splitlines() if line.startswith(f"| {label} |")]
        assert len(rows) == 3, label  # one per prompted shape
        assert sum(int(n) for line in rows for n in line.strip("| ").split(" | ")[2:]) == len(clips), label


def test_results_json_and_plots(report):
    root, doc = report
    folder = doc.parent / "results"
    res = json.loads((folder / "results.json").read_text())
    assert res["rows"]["causal-teacher-dmd"]["status"] == "not trained"
    assert res["rows"]["student"]["summary"]["in_distribution"]["n"] == res["counts"]["n_in"]
    assert res["rows"]["teacher"]["nfe"] == 2 * res["many_step"]["steps"]  # guided: two evaluations a step
    assert res["speed"]["fps"] > 0 and res["wall_s"] > 0
    assert len(res["drift"]) == len(drift_variants(res["stream_defaults"])) and res["v2v"]["by_strength"]["0.7"]["frames_kept"] == 1.0
    for name in ("accuracy.png", "drift.png", "drift_window_sinks.png"):
        assert Image.open(folder / name).size[0] > 100, name
    assert not list(folder.glob(".*tmp*")), "a temporary file was left behind"


def test_a_run_without_its_export_is_refused(tmp_path, capsys):
    assert main(["results", "--preset", "micro", "--out", str(tmp_path), "--doc", str(tmp_path / "R.md")]) == 2
    assert "causvid-train export" in capsys.readouterr().err


def test_other_work_is_measured_without_the_runs_own_threads():
    """A run that keeps both cores busy itself is not "beside other work"; another process doing so is."""
    import time as _time

    from trainer.results import other_cores, own_cpu_s, system_cpu_s
    from trainer.results_doc import other_work

    start = (system_cpu_s(), own_cpu_s(), _time.perf_counter())
    t0 = _time.process_time()
    while _time.process_time() - t0 < 0.3:  # this process busy: not "other" work
        pass
    idle = other_cores(start)
    if idle is None:
        pytest.skip("no /proc/stat on this platform")
    start = (system_cpu_s(), own_cpu_s(), _time.perf_counter())
    burner = subprocess.Popen([sys.executable, "-c", "import time\nt=time.process_time()\n"
                               "while time.process_time()-t<0.6: pass\nprint('done', flush=True)\ntime.sleep(30)"],
                              stdout=subprocess.PIPE, text=True)
    assert burner.stdout.readline().strip() == "done"  # 0.6 s of CPU spent by a child not reaped yet: "other"
    busy = other_cores(start)
    burner.kill()
    burner.wait()
    assert busy > idle and busy > 0.2, (idle, busy)
    machine = dict(cores=2, load_start=1.9, load_end=2.0)
    assert other_work({**machine, "other_cores": 0.1}) is None  # the load average alone is the run's own threads
    assert "1.4 of 2 cores" in other_work({**machine, "other_cores": 1.4})
    assert "load average up to 2.0" in other_work(machine)  # older results without the measurement


def test_many_step_rows_start_from_the_students_noise():
    from causvid_core.stream import CausalStream, StreamSettings

    model = tiny_model()
    stream = CausalStream(model, StreamSettings(seed=7, max_frames=9), latent_hw=(8, 8))
    chunks = torch.cat([stream.initial_noise(c, 3) for c in range(3)], dim=2)
    torch.testing.assert_close(start_noise(7, 3, (model.config.out_dim, 9, 8, 8)), chunks)


def test_a_stochastic_teacher_row_draws_each_clips_noise_from_its_seed(tmp_path):
    """ManyStep.eta (the ODE pairs' stochastic steps): a clip is the same sampled alone or in a batch, and
    differs from the ODE's."""
    import dataclasses

    import numpy as np

    from causvid_core.pipeline import load_components
    from trainer.results import ManyStep, many_step_batch
    fake_run(tmp_path)
    c = load_components(output(tmp_path, "teacher-refine"), tmp_path / "vae.safetensors", tmp_path / "text.safetensors")
    ms = ManyStep(steps=6, shift=5.0, guidance=2.0, chunk_frames=3, eta=1.0)
    prompts = ["a red circle moving left on a black background", "a blue square moving up on a white background"]
    seeds = [3, 4]
    with torch.no_grad():
        both = many_step_batch(c, "bidirectional", prompts, seeds, ms, 9)
        alone = [many_step_batch(c, "bidirectional", [p], [s], ms, 9)[0] for p, s in zip(prompts, seeds)]
        ode = many_step_batch(c, "bidirectional", prompts, seeds, dataclasses.replace(ms, eta=0.0), 9)
    for a, b, o in zip(both, alone, ode):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1  # batched float sums may round a level apart
        assert np.abs(a.astype(int) - o.astype(int)).mean() > 1


@pytest.mark.parametrize("backend", ["pil", "matplotlib"])
def test_drift_compare_plot(tmp_path, backend):
    curves = {"start_frame": [0, 9, 21], "all_four": [1.0, 0.5, None], "iou": [0.9, 0.8, 0.7],
              "flicker": [None, None, None]}
    path = plot_drift_compare({"a": {"curves": curves}, "b": {"curves": curves}}, tmp_path / "d.png", backend=backend)
    assert Image.open(path).size[0] > 100


def test_drift_adds_the_models_own_window_once():
    assert drift_variants({}) == DRIFT_VARIANTS
    assert drift_variants({"window_frames": 12, "sink_frames": 3}) == DRIFT_VARIANTS
    extra = drift_variants({"window_frames": 9, "sink_frames": 0})[-1]
    assert extra == CacheVariant("window 9, no sinks (the model's default)", 9, 0)


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("diag")
    fake_run(root)
    for stage, name in ((vae_stage(micro()), "vae.safetensors"), ("text", "text.safetensors")):
        output(root, stage).parent.mkdir(parents=True, exist_ok=True)
        (root / name).rename(output(root, stage))  # diagnose reads the stages' files: no export needed
    return root


def test_diagnose_at_sigma_one_is_the_teacher_row_and_at_zero_the_round_trip(fake_root):
    """The renoise sweep's ends are two things measured elsewhere: from sigma 1 the teacher samples from the
    very noise of its RESULTS row (same prompts, seeds, guidance), from sigma 0 the clip is the VAE round trip."""
    from causvid_core.pipeline import load_components
    from causvid_core.video_io import from_uint8, to_uint8
    from causvid_core import world
    from trainer.diagnose import renoised_clips
    from trainer.results import QUICK, ManyStep, many_step_batch, prompt_sets

    cfg = micro()
    comps = load_components(output(fake_root, "teacher-refine"), output(fake_root, vae_stage(cfg)),
                            output(fake_root, "text"))
    specs = [s for split, _, s in prompt_sets(QUICK) if split == "train"]
    seeds = list(range(len(specs)))
    ms = ManyStep.from_config(cfg)
    row = many_step_batch(comps, "bidirectional", [s.prompt for s in specs], seeds, ms, cfg.data.clip_frames)
    top = renoised_clips(comps, specs, seeds, 1.0, ms, cfg.data.clip_frames)
    for a, b in zip(row, top):
        assert a.shape == b.shape and (a.astype(int) - b.astype(int)).__abs__().max() <= 1
    bottom = renoised_clips(comps, specs, seeds, 0.0, ms, cfg.data.clip_frames)
    with torch.no_grad():
        rt = [to_uint8(comps.vae.decode(comps.vae.encode(from_uint8(world.render(s, cfg.data.clip_frames)))))
              for s in specs]
    assert all((a == b).all() for a, b in zip(bottom, rt))
    mid = renoised_clips(comps, specs, seeds, 0.5, ms, cfg.data.clip_frames)
    assert any((a != b).any() for a, b in zip(mid, bottom))  # the teacher did run from 0.5


def test_diagnose_cli_prints_every_sigma_and_refuses_bad_ones(fake_root, capsys):
    assert main(["diagnose", "--preset", "micro", "--out", str(fake_root), "--quick", "--sigmas", "0,1"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert list(res["sigmas"]) == ["0", "1"] and res["prompts"] == 2
    assert res["teacher"].endswith("teacher-refine/teacher.safetensors")
    for v in res["sigmas"].values():
        assert 0.0 <= v["all_four"] <= 1.0 and sum(sum(c.values()) for c in v["shapes"].values()) == 2
    assert main(["diagnose", "--preset", "micro", "--out", str(fake_root), "--sigmas", "1.5"]) == 2
    assert "sigmas must lie in [0, 1]" in capsys.readouterr().err


def test_every_row_measures_its_weights_as_published(tmp_path):
    """as_published rounds the DiT's and the VAE's weights through float16 in place, as `publish` stores them,
    so the doc describes the model users get; the float32 run file differs from it."""
    from causvid_core.pipeline import load_components
    from trainer.results import as_published
    fake_run(tmp_path)
    files = (output(tmp_path, "dmd"), tmp_path / "vae.safetensors", tmp_path / "text.safetensors")
    run_file, shipped = load_components(*files), as_published(load_components(*files))
    for name in ("model", "vae"):
        a, b = getattr(run_file, name).state_dict(), getattr(shipped, name).state_dict()
        assert all(torch.equal(b[k], a[k].half().float()) for k in a if a[k].is_floating_point()), name
        assert any(not torch.equal(a[k], b[k]) for k in a), name
