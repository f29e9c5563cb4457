"""`causvid eval`: the renderer's own clips score about 100%; a model run writes the full report."""
from __future__ import annotations

import json

from causvid_core.eval_run import evaluate_model, eval_specs
from conftest import tiny_components


def test_ground_truth_scores_about_100_percent(tmp_path):
    r = evaluate_model(None, n_in=12, n_held=6, streams=1, stream_chunks=6, ground_truth=True, out=tmp_path)
    s = r["summary"]
    assert s["in_distribution"]["n"] == 12 and s["held_out"]["n"] == 6
    assert s["in_distribution"]["accuracy"]["all_four"] >= 0.95 and s["held_out"]["accuracy"]["all_four"] >= 0.95
    assert len(r["drift"]["curves"]["all_four"]) == 6
    doc = json.loads((tmp_path / "eval.json").read_text())
    assert doc["setup"]["ground_truth"] is True
    assert (tmp_path / "eval.md").exists() and (tmp_path / "eval_accuracy.png").exists()
    assert (tmp_path / "eval_drift.png").exists()


def test_prompts_are_fixed_and_split():
    a, b = eval_specs(5, "train"), eval_specs(5, "train")
    assert a == b
    assert all((s.colour, s.shape) in {("magenta", "triangle"), ("cyan", "square"), ("orange", "circle")}
               for s in eval_specs(6, "heldout"))


def test_a_model_run_writes_the_report_with_speed(tmp_path):
    comps = tiny_components()
    r = evaluate_model(comps, n_in=2, n_held=1, frames=9, streams=1, stream_chunks=3, window=6, sinks=3, out=tmp_path)
    s = r["summary"]
    assert s["all"]["n"] == 3 and r["speed"]["fps"] > 0 and r["speed"]["first_chunk_s"] > 0
    assert s["in_distribution"]["accuracy"]["all_four"] <= 0.5  # random weights do not draw the world
    assert json.loads((tmp_path / "eval.json").read_text())["speed"] == r["speed"]
