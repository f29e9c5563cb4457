"""Shapes World evaluator (causvid_core/evaluate*.py) against ground-truth renders from world.py."""
from __future__ import annotations

import dataclasses
import io
import itertools
import json

import numpy as np
import pytest
import torch
from PIL import Image

from causvid_core import evaluate as E
from causvid_core import world as W


def jpeg(frames: np.ndarray, quality: int) -> np.ndarray:
    out = []
    for frame in frames:
        buf = io.BytesIO()
        Image.fromarray(frame).save(buf, format="JPEG", quality=quality)
        out.append(np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")))
    return np.stack(out)


def noise_clip(rng: np.random.Generator, num_frames: int = W.CLIP_FRAMES) -> np.ndarray:
    return rng.integers(0, 256, (num_frames, 64, 64, 3), dtype=np.uint8)


def switched(spec: W.ClipSpec, at: int, total: int, jump=(0.0, 0.0), **changes) -> np.ndarray:
    """Render spec for frames [0, at), then spec with `changes` continuing from spec's position
    at frame `at` (plus `jump` px) for frames [at, total)."""
    x, y = W.positions(spec, np.array([at]))[0]
    after = dataclasses.replace(spec, x0=float((x + jump[0]) % 64), y0=float((y + jump[1]) % 64), **changes)
    return np.concatenate([W.render(spec, at), W.render(after, total - at)])


def failures(results, key="all_four"):
    return [(r["prompt"], r["detected"]) for r in results if not r["correct"][key]]


@pytest.fixture(scope="module")
def ground_truth():
    """(spec, result) for 150 training-split and 60 held-out clips of 33 frames."""
    out = []
    for split, n in (("train", 150), ("heldout", 60)):
        for seed in range(n):
            spec, frames = W.make_clip(seed, split=split)
            out.append((spec, E.evaluate_clip(frames, spec.prompt)))
    return out


# --- text alignment on ground truth ---------------------------------------------------------

def test_ground_truth_scores_near_perfect(ground_truth):
    summary = E.aggregate(r for _, r in ground_truth)
    assert summary["in_distribution"]["n"] == 150 and summary["held_out"]["n"] == 60
    for group in E.GROUPS:
        acc, m = summary[group]["accuracy"], summary[group]["metrics"]
        for key in (*E.ATTRIBUTES, "all_four"):
            assert acc[key] >= 0.98, (group, key, acc, failures((r for _, r in ground_truth), key)[:5])
        assert m["iou"] >= 0.97 and m["found_rate"] == 1.0, m
        assert m["palette_dist"] < 1.0 and m["bg_palette_dist"] < 0.1 and m["flicker"] < 0.1, m
        assert m["colour_stability"] < 1.0 and m["area_cv"] < 0.02 and m["track_smoothness"] < 0.1, m
    json.dumps(summary, allow_nan=False)  # JSON-able, no NaN


def test_ground_truth_velocity_and_held_out_flag(ground_truth):
    for spec, r in ground_truth:
        assert r["held_out"] == spec.held_out
        assert np.allclose(r["velocity"], spec.velocity, atol=0.05), (spec, r["velocity"])


def test_every_attribute_combination_and_torus_edges():
    """All 8 x 3 x 5 x 4 combinations, radii across [7, 11], started on or across the torus edge."""
    starts = [(0.3, 0.4), (63.6, 31.0), (31.2, 63.8), (63.9, 0.1), (32.5, 32.5), (1.0, 62.7)]
    bad = []
    combos = itertools.product(W.COLOURS, W.SHAPES, W.MOTIONS, W.BACKGROUNDS)
    for i, (colour, shape, motion, background) in enumerate(combos):
        x0, y0 = starts[i % len(starts)]
        spec = W.ClipSpec(colour, shape, motion, background, radius=7.0 + 0.4 * ((7 * i) % 11),
                          speed=1.0 + 0.25 * ((3 * i) % 5), x0=x0, y0=y0)
        r = E.evaluate_clip(W.render(spec, 9), spec.prompt)
        if not r["correct"]["all_four"] or r["metrics"]["iou"] < 0.95:
            bad.append((spec, r["detected"], r["metrics"]["iou"]))
    assert not bad, bad[:5]


def test_straddling_object_track_is_unwrapped():
    spec = W.ClipSpec("orange", "square", "moving left", "navy", 10.0, 1.5, x0=2.0, y0=63.5)
    stats = E.measure(W.render(spec, 20))
    err = (stats.centre - W.positions(spec, np.arange(20)) + 32) % 64 - 32
    assert np.abs(err).max() < 0.2, err
    r = E.summarize(stats, spec.prompt)
    assert r["detected"]["motion"] == "moving left" and abs(r["velocity"][0] + 1.5) < 0.02, r


@pytest.mark.parametrize("attribute", E.ATTRIBUTES)
def test_wrong_attribute_is_flagged_alone(attribute):
    values = dict(colour=list(W.COLOURS), shape=list(W.SHAPES), motion=list(W.MOTIONS),
                  background=list(W.BACKGROUNDS))[attribute]
    for seed in range(12):
        spec = W.sample_spec(np.random.default_rng(seed), "any")
        wrong = values[(values.index(getattr(spec, attribute)) + 1 + seed) % len(values)]
        if wrong == getattr(spec, attribute):
            wrong = values[(values.index(wrong) + 1) % len(values)]
        frames = W.render(dataclasses.replace(spec, **{attribute: wrong}), 33)
        r = E.evaluate_clip(frames, spec.prompt)
        assert r["detected"][attribute] == wrong, (spec, attribute, wrong, r["detected"])
        expect = {a: a != attribute for a in E.ATTRIBUTES} | {"all_four": False}
        assert r["correct"] == expect, (spec, attribute, wrong, r["detected"])


def test_prompt_without_some_attributes_scores_only_named_ones():
    spec, frames = W.make_clip(3)
    r = E.evaluate_clip(frames, f"A {spec.colour.upper()} thing, maybe {spec.shape}s?")
    assert r["correct"]["colour"] is True and r["correct"]["shape"] is None  # "shapes" is not a shape word
    assert r["correct"]["motion"] is None and r["correct"]["all_four"] is None
    assert E.aggregate([r])["all"]["accuracy"]["all_four"] is None


# --- failure cases and robustness -----------------------------------------------------------

def test_pure_noise_scores_near_zero():
    rng = np.random.default_rng(0)
    results = [E.evaluate_clip(noise_clip(rng), W.make_clip(seed, split="any")[0].prompt)
               for seed in range(40)]
    summary = E.aggregate(results)["all"]
    assert summary["accuracy"]["all_four"] <= 0.05, summary
    for key in ("colour", "shape", "motion"):
        assert summary["accuracy"][key] <= 0.15, summary
    m = summary["metrics"]
    assert m["iou"] < 0.3 and m["found_rate"] < 0.2 and m["flicker"] > 20 and m["bg_palette_dist"] > 20, m


def test_per_frame_lists():
    spec, frames = W.make_clip(2, num_frames=9)
    frames = frames.copy()
    frames[4] = frames[0, 0, 0]  # one frame of background only
    r = E.evaluate_clip(frames, spec.prompt, per_frame=True)
    f = r["frames"]
    assert f["found"] == [True] * 4 + [False] + [True] * 4
    assert f["colour"][4] is None and f["centre"][4] == [None, None] and f["iou"][4] == 0.0
    assert f["colour"][:4] == [spec.colour] * 4 and f["shape"][5:] == [spec.shape] * 4
    assert min(f["iou"][:4]) > 0.97 and f["background"] == [spec.background] * 9
    json.dumps(r, allow_nan=False)


def test_background_only_clip_has_no_object():
    spec = W.ClipSpec("red", "circle", "staying still", "forest", 9.0, 1.0, 10.0, 10.0)
    frames = np.broadcast_to(np.array(W.BACKGROUNDS["forest"], np.uint8), (17, 64, 64, 3))
    r = E.evaluate_clip(frames, spec.prompt)
    assert r["detected"] == dict(colour=None, shape=None, motion=None, background="forest"), r
    assert r["metrics"]["found_rate"] == 0.0 and r["metrics"]["iou"] == 0.0


@pytest.mark.parametrize("degrade", ["jpeg75", "gauss10"])
def test_mildly_degraded_renders_still_score_high(degrade):
    rng = np.random.default_rng(5)
    results = []
    for seed in range(40):
        spec, frames = W.make_clip(seed, split="any")
        if degrade == "jpeg75":
            frames = jpeg(frames, 75)
        else:
            frames = np.clip(frames + rng.normal(0.0, 10.0, frames.shape), 0, 255).astype(np.uint8)
        results.append(E.evaluate_clip(frames, spec.prompt))
    summary = E.aggregate(results)["all"]
    assert summary["accuracy"]["all_four"] >= 0.95, (summary, failures(results))
    assert summary["metrics"]["iou"] >= 0.85, summary
    # ... and the quality metrics see the degradation the clean renders do not have
    assert summary["metrics"]["palette_dist"] > 3.0, summary


def test_value_ranges_and_torch_input_agree():
    spec, frames = W.make_clip(11, split="heldout")
    base = E.evaluate_clip(frames, spec.prompt)
    unit = frames.astype(np.float32) / 255.0
    variants = {"unit": unit, "signed": W.to_unit_range(frames), "torch": torch.from_numpy(unit),
                "one range explicit": (unit, "unit")}
    for name, v in variants.items():
        arr, value_range = v if isinstance(v, tuple) else (v, "auto")
        r = E.evaluate_clip(arr, spec.prompt, value_range=value_range)
        assert r["detected"] == base["detected"], name
        for k, val in base["metrics"].items():
            assert val is None or abs(r["metrics"][k] - val) < 1e-3, (name, k, r["metrics"][k], val)
    with pytest.raises(ValueError, match="permute"):
        E.evaluate_clip(np.moveaxis(frames, -1, 1), spec.prompt)
    with pytest.raises(ValueError, match="value_range"):
        E.evaluate_clip(frames, spec.prompt, value_range="0-255")


def test_measure_in_blocks_matches_one_pass():
    spec = W.ClipSpec("blue", "triangle", "moving up", "gray", 8.0, 1.1, 40.0, 1.0)
    frames = W.render(spec, 50)
    frames = np.clip(frames + np.random.default_rng(2).normal(0, 10, frames.shape), 0, 255).astype(np.uint8)
    one, blocks = E.measure(frames), E.measure(frames, block=7)
    for key, value in vars(one).items():
        np.testing.assert_allclose(getattr(blocks, key), value, atol=1e-4, err_msg=key)
    assert one.flicker.shape == (49,)
    with pytest.raises(ValueError, match="no frames"):
        E.measure(frames[:0])


def test_deterministic():
    # (speed is not asserted here: timing targets belong in benchmarks, not in tests)
    spec, frames = W.make_clip(7)
    first = E.evaluate_clip(frames, spec.prompt)
    for _ in range(3):
        assert E.evaluate_clip(frames, spec.prompt) == first


# --- drift over long streams ----------------------------------------------------------------

def test_chunk_bounds():
    assert E.chunk_bounds(33) == [(0, 12), (12, 24), (24, 33)]
    assert E.chunk_bounds(33, 12, first_chunk_frames=9) == [(0, 9), (9, 21), (21, 33)]
    assert E.chunk_bounds(0) == []
    with pytest.raises(ValueError):
        E.chunk_bounds(10, 0)


def test_drift_flat_on_long_ground_truth_stream():
    spec = W.ClipSpec("green", "triangle", "moving down", "gray", 8.0, 1.7, 20.0, 50.0)
    out = E.evaluate_stream(W.render(spec, 240), spec.prompt)
    c = out["curves"]
    assert c["start_frame"] == list(range(0, 240, 12)) and len(out["chunks"]) == 20
    assert all(v == 1.0 for v in c["all_four"]), c["all_four"]
    assert min(c["iou"]) > 0.97 and max(c["iou"]) - min(c["iou"]) < 0.02, c["iou"]
    assert max(c["flicker"]) < 0.1 and max(c["palette_dist"]) < 1.0 and max(c["area_cv"]) < 0.02
    assert out["clip"]["correct"]["all_four"]
    tail = E.evaluate_stream(W.render(spec, 241), spec.prompt)["chunks"]  # 1-frame remainder
    assert (tail[-1]["start"], tail[-1]["stop"]) == (228, 241) and tail[-1]["correct"]["all_four"]


def test_drift_shows_degradation_in_later_chunks():
    spec = W.ClipSpec("yellow", "circle", "moving right", "navy", 9.0, 1.2, 5.0, 5.0)
    frames = W.render(spec, 240)
    frames[120:] = noise_clip(np.random.default_rng(1), 120)
    c = E.evaluate_stream(frames, spec.prompt)["curves"]
    assert c["all_four"][:10] == [1.0] * 10 and c["all_four"][10:] == [0.0] * 10, c["all_four"]
    assert min(c["iou"][:10]) > 0.97 and max(c["iou"][10:]) < 0.3, c["iou"]
    assert max(c["flicker"][:10]) < 0.1 < 20 < min(c["flicker"][10:]), c["flicker"]
    drift = E.aggregate_drift([E.evaluate_stream(frames, spec.prompt),
                               E.evaluate_stream(W.render(spec, 120), spec.prompt)])
    assert drift["n"] == 2 and len(drift["curves"]["all_four"]) == 20
    assert drift["curves"]["all_four"][:10] == [1.0] * 10 and drift["curves"]["all_four"][10] == 0.0


# --- prompt schedules -----------------------------------------------------------------------

@pytest.mark.parametrize("change", [dict(colour="blue"), dict(motion="moving up"),
                                    dict(background="forest"), dict(colour="white", motion="staying still")])
def test_schedule_switch_detected_fast_and_continuous(change):
    spec = W.ClipSpec("red", "square", "moving right", "black", 8.5, 1.6, 60.0, 3.0)  # wraps in x
    frames = switched(spec, 24, 60, **change)
    after = dataclasses.replace(spec, **change)
    out = E.evaluate_schedule(frames, [(0, spec.prompt), (24, after.prompt)])
    assert [(s["start"], s["stop"]) for s in out["segments"]] == [(0, 24), (24, 60)]
    for seg in out["segments"]:
        assert seg["correct"]["all_four"], seg
    (sw,) = out["switches"]
    assert sw["frame"] == 24 and sw["changed"] == list(change) and sw["switched"], sw
    assert sw["latency_frames"] <= 2, sw
    assert sw["continuous"] and sw["jump_px"] <= 2.0, sw
    # the same clip judged against the old prompt throughout fails the second half
    wrong = E.evaluate_schedule(frames, [(0, spec.prompt), (24, spec.prompt)])
    assert not wrong["segments"][1]["correct"]["all_four"]


def test_schedule_flags_a_jump_and_a_switch_that_never_happens():
    spec = W.ClipSpec("cyan", "circle", "moving left", "gray", 9.0, 1.3, 30.0, 30.0)
    after = dataclasses.replace(spec, colour="magenta")
    jumped = switched(spec, 12, 36, jump=(20.0, -15.0), colour="magenta")
    sw = E.evaluate_schedule(jumped, [(0, spec.prompt), (12, after.prompt)])["switches"][0]
    expected_jump = np.hypot(20.0 - 1.3, -15.0)  # the jump plus one step of the old motion
    assert not sw["continuous"] and abs(sw["jump_px"] - expected_jump) < 0.3 and sw["switched"], sw
    stuck = W.render(spec, 36)  # the prompt changes, the video does not
    out = E.evaluate_schedule(stuck, [(0, spec.prompt), (12, after.prompt)])
    sw = out["switches"][0]
    assert sw["latency"] == {"colour": None} and not sw["switched"] and sw["continuous"], sw
    assert out["segments"][1]["correct"]["colour"] is False
    vanished = np.array(stuck, copy=True)
    vanished[12] = vanished[12, 0, 0]  # no object on the switch frame: continuity unknown, not a jump
    sw = E.evaluate_schedule(vanished, [(0, spec.prompt), (12, after.prompt)])["switches"][0]
    assert sw["jump_px"] is None and sw["continuous"] is None, sw
    with pytest.raises(ValueError, match="increasing"):
        E.evaluate_schedule(stuck, [(12, spec.prompt), (0, after.prompt)])


def test_switch_latency_counts_frames_until_stable():
    """Colour changes 5 frames after the prompt switch: latency 5."""
    spec = W.ClipSpec("red", "triangle", "staying still", "black", 10.0, 1.0, 32.0, 32.0)
    frames = switched(spec, 17, 40, colour="green")
    after = dataclasses.replace(spec, colour="green")
    sw = E.evaluate_schedule(frames, [(0, spec.prompt), (12, after.prompt)])["switches"][0]
    assert sw["latency"] == {"colour": 5} and sw["latency_frames"] == 5, sw


# --- reports --------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["pil", "matplotlib"])
def test_write_report(tmp_path, backend, ground_truth):
    if backend == "matplotlib":
        pytest.importorskip("matplotlib")
    summary = E.aggregate(r for _, r in ground_truth[::10])
    spec = W.ClipSpec("white", "circle", "moving up", "navy", 9.0, 1.0, 5.0, 5.0)
    drift = E.evaluate_stream(W.render(spec, 72), spec.prompt)
    paths = E.write_report(tmp_path / "out", summary, drift, clips=[r for _, r in ground_truth[:3]],
                           backend=backend)
    assert set(paths) == {"json", "markdown", "accuracy_png", "drift_png"}
    doc = json.loads(paths["json"].read_text())
    assert doc["summary"] == summary and doc["world_version"] == W.WORLD_VERSION
    assert doc["drift"]["curves"]["start_frame"] == [0, 12, 24, 36, 48, 60] and len(doc["clips"]) == 3
    md = paths["markdown"].read_text()
    assert "| held-out | 6 |" in md and "| all four |" in md and "| 5 | 60 |" in md, md
    for key in ("accuracy_png", "drift_png"):
        with Image.open(paths[key]) as img:
            assert img.format == "PNG" and img.width >= 400 and img.height >= 250
            colours = img.convert("RGB").getcolors(maxcolors=1 << 16)
            assert colours is None or len(colours) > 3, "blank plot"  # something was drawn
