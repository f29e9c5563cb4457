"""Shapes World evaluator: judges generated video from pixels alone (docs: shapes-world.md,
"What the evaluator measures").

    result = evaluate_clip(frames, "a red circle moving right on a black background")
    result["correct"]["all_four"], result["metrics"]["iou"]

Frames: uint8 [T, 64, 64, 3], or float in [0, 1] / [-1, 1] (numpy or torch, channels last; see
evaluate_detect.as_frames). Stage 1 (`evaluate_detect.measure`) measures every frame once; this
module reduces frame ranges of those measurements against prompts: a whole clip, each chunk of a
long stream (drift), each segment of a prompt schedule (plus the switches between them), and many
clips into accuracies split by in-distribution vs held-out colour-shape pairs. Reports (markdown,
PNG plots, one folder) live in evaluate_report.py. Every result is a JSON-able dict; NaN is None.

Metrics (units: px = pixels, RGB distances on the 0..255 scale):
- colour / shape / motion / background: detected name vs the prompt's; all_four: all four right.
- iou: soft IoU of each frame's foreground with the detected shape's template (0 if no object).
- palette_dist: mean distance of core object pixels to the nearest object palette colour.
- bg_palette_dist: mean distance of background pixels to the detected palette background.
- flicker: mean abs change of pixels that are background in both of two consecutive frames.
- track_smoothness: mean |second difference| of the torus-unwrapped centroid track, px/frame^2.
- area_cv: coefficient of variation of the object area over frames.
- colour_stability: mean distance of per-frame object colours to their mean.
- found_rate: fraction of frames with a plausible object.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np

from . import world
from .evaluate_detect import (ATTRIBUTES, BACKGROUND_NAMES, BACKGROUND_RGB, COLOUR_NAMES, METRICS,
                              OBJECT_RGB, EvalConfig, FrameStats, _nearest, as_frames, measure)
from .evaluate_report import markdown_table, plot_accuracy, plot_drift, write_report

__all__ = ["EvalConfig", "FrameStats", "ATTRIBUTES", "METRICS", "GROUPS", "DEFAULT_CONFIG",
           "as_frames", "measure", "summarize", "frame_motion_labels", "chunk_bounds",
           "evaluate_clip", "evaluate_stream", "evaluate_schedule", "aggregate", "aggregate_drift",
           "markdown_table", "plot_accuracy", "plot_drift", "write_report"]

MOTION_NAMES = tuple(world.MOTIONS)
GROUPS = ("all", "in_distribution", "held_out")
DEFAULT_CONFIG = EvalConfig()


def _num(v) -> float | None:
    """JSON-safe float: NaN and inf become None."""
    v = float(v)
    return v if math.isfinite(v) else None


def _torus(d: np.ndarray) -> np.ndarray:
    """Displacement on the 64-torus into [-32, 32)."""
    return np.mod(d + world.FRAME_SIZE / 2, world.FRAME_SIZE) - world.FRAME_SIZE / 2


def _motion_name(v: np.ndarray, still: float) -> str:
    """Velocity (vx, vy) px/frame -> motion name: still below `still`, else the dominant axis."""
    vx, vy = float(v[0]), float(v[1])
    if math.hypot(vx, vy) < still:
        return "staying still"
    if abs(vx) >= abs(vy):
        return "moving right" if vx > 0 else "moving left"
    return "moving down" if vy > 0 else "moving up"


def _unwrapped_track(centre: np.ndarray) -> np.ndarray:
    """[n, 2] torus positions (consecutive detections) -> continuous track [n, 2]."""
    if len(centre) == 0:
        return centre
    steps = _torus(np.diff(centre, axis=0))  # [n-1, 2]; v1 steps are <= 2 px, far below 32
    return centre[0] + np.concatenate([np.zeros((1, 2)), np.cumsum(steps, axis=0)])


def frame_motion_labels(stats: FrameStats, config: EvalConfig = DEFAULT_CONFIG) -> np.ndarray:
    """Per-frame motion index into world.MOTIONS from the forward step centre[t+1] - centre[t]
    (the last frame repeats the previous step); -1 where the step is unknown. [T] int."""
    t = len(stats)
    labels = np.full(t, -1)
    if t < 2:
        return labels
    step = _torus(np.diff(stats.centre, axis=0))  # [T-1, 2], NaN if either frame lacks an object
    step = np.concatenate([step, step[-1:]])  # [T, 2]
    for i in np.nonzero(np.isfinite(step).all(axis=1))[0]:
        labels[i] = MOTION_NAMES.index(_motion_name(step[i], config.still_speed))
    return labels


def summarize(stats: FrameStats, prompt: str | None, start: int = 0, stop: int | None = None,
              config: EvalConfig = DEFAULT_CONFIG) -> dict:
    """Reduce frames [start, stop) of `stats` against `prompt` (any text; world.parse_prompt).

    Returns {"prompt", "start", "stop", "num_frames", "held_out", "expected", "detected",
    "correct", "metrics", "velocity"}. An attribute the prompt does not name is not scored
    (correct[attr] = None) and all_four is then None; colour, shape and motion are None when
    fewer than config.min_found_rate of the frames show an object.
    """
    stop = len(stats) if stop is None else min(stop, len(stats))
    sl = slice(start, stop)
    n = stop - start
    found = stats.found[sl]
    idx = np.nonzero(found)[0]  # frames with an object, relative to start
    named = n > 0 and len(idx) >= max(1, config.min_found_rate * n)

    detected: dict[str, str | None] = dict(colour=None, shape=None, motion=None, background=None)
    metrics: dict[str, float | None] = {}
    velocity = [None, None]
    iou = stats.iou[sl]  # [n, 3]
    if n:
        detected["background"] = BACKGROUND_NAMES[_nearest(stats.bg_rgb[sl].mean(axis=0), BACKGROUND_RGB)[0]]
    if named:
        obj = stats.obj_rgb[sl][idx]  # [k, 3]
        mean_rgb = obj.mean(axis=0)
        detected["colour"] = COLOUR_NAMES[_nearest(mean_rgb, OBJECT_RGB)[0]]
        detected["shape"] = world.SHAPES[int(np.argmax(iou[idx].mean(axis=0)))]
        metrics["colour_stability"] = _num(np.linalg.norm(obj - mean_rgb, axis=-1).mean())
        area = stats.area[sl][idx]
        metrics["area_cv"] = _num(area.std() / area.mean())
        track = _unwrapped_track(stats.centre[sl][idx])  # [k, 2]
        if len(idx) >= 2:
            tc = idx - idx.mean()
            v = (tc[:, None] * (track - track.mean(axis=0))).sum(axis=0) / (tc * tc).sum()  # LSQ slope
            velocity = [_num(v[0]), _num(v[1])]
            detected["motion"] = _motion_name(v, config.still_speed)
        if len(idx) >= 3:
            metrics["track_smoothness"] = _num(np.linalg.norm(np.diff(track, 2, axis=0), axis=-1).mean())
    shape_i = world.SHAPES.index(detected["shape"]) if detected["shape"] else None
    # IoU with the clip's shape; without one, each frame's best fit (0 where no object)
    metrics["iou"] = _num((iou[:, shape_i] if shape_i is not None else iou.max(axis=-1)).mean()) if n else None
    metrics["palette_dist"] = _num(np.nanmean(stats.palette_dist[sl][idx])) if len(idx) else None
    metrics["bg_palette_dist"] = _num(stats.bg_palette_dist[sl].mean()) if n else None
    pairs = stats.flicker[start:max(start, stop - 1)]  # frame pairs (t, t+1) inside the range
    metrics["flicker"] = _num(pairs.mean()) if len(pairs) else None
    metrics["found_rate"] = _num(found.mean()) if n else None
    metrics = {k: metrics.get(k) for k in METRICS}

    expected = world.parse_prompt(prompt or "")
    correct: dict[str, bool | None] = {
        a: None if expected[a] is None else detected[a] == expected[a] for a in ATTRIBUTES}
    scored = [correct[a] for a in ATTRIBUTES]
    correct["all_four"] = None if None in scored else all(scored)
    held_out = (expected["colour"], expected["shape"]) in world.HELD_OUT_PAIRS
    return dict(prompt=prompt, start=int(start), stop=int(stop), num_frames=int(n),
                held_out=held_out, expected=expected, detected=detected, correct=correct,
                metrics=metrics, velocity=velocity)


def evaluate_clip(frames, prompt: str, *, value_range: str = "auto", per_frame: bool = False,
                  config: EvalConfig = DEFAULT_CONFIG) -> dict:
    """One clip against one prompt: see `summarize` for the result. per_frame=True adds
    "frames": per-frame lists (found, colour, background, shape, iou with the clip's shape,
    palette_dist, area, centre) for plots and debugging."""
    stats = measure(frames, value_range, config)
    result = summarize(stats, prompt, config=config)
    if per_frame:
        shape = result["detected"]["shape"]
        iou = stats.iou[:, world.SHAPES.index(shape)] if shape else stats.iou.max(axis=-1)
        result["frames"] = dict(
            found=stats.found.tolist(),
            colour=[COLOUR_NAMES[int(i)] if i >= 0 else None for i in stats.colour_label],
            background=[BACKGROUND_NAMES[int(i)] for i in stats.bg_label],
            shape=[world.SHAPES[int(i)] if f else None for i, f in zip(stats.iou.argmax(-1), stats.found)],
            iou=[_num(v) for v in iou], palette_dist=[_num(v) for v in stats.palette_dist],
            area=[_num(v) for v in stats.area],
            centre=[[_num(x), _num(y)] for x, y in stats.centre])
    return result


def chunk_bounds(num_frames: int, chunk_frames: int = DEFAULT_CONFIG.chunk_frames,
                 first_chunk_frames: int | None = None) -> list[tuple[int, int]]:
    """[(start, stop)] of consecutive chunks covering num_frames; the last may be shorter.

    first_chunk_frames: a different first chunk, e.g. 9 for a 4k+1 clip decoded by a causal Wan
    VAE (first latent frame -> 1 pixel frame, then 4 per latent frame: 1 + 4 + 4 for 3 latents).
    """
    if chunk_frames < 1 or (first_chunk_frames is not None and first_chunk_frames < 1):
        raise ValueError(f"chunk sizes must be >= 1 frame, got {chunk_frames}, {first_chunk_frames}")
    bounds, start = [], 0
    size = first_chunk_frames or chunk_frames
    while start < num_frames:
        bounds.append((start, min(start + size, num_frames)))
        start, size = start + size, chunk_frames
    return bounds


def _curves(results: Sequence[dict]) -> dict[str, list]:
    """Per-chunk results -> {"start_frame": [...], attribute/all_four accuracy (1/0/None),
    every metric} as parallel lists."""
    curves: dict[str, list] = {"start_frame": [r["start"] for r in results]}
    for key in (*ATTRIBUTES, "all_four"):
        curves[key] = [None if r["correct"][key] is None else float(r["correct"][key]) for r in results]
    for key in METRICS:
        curves[key] = [r["metrics"][key] for r in results]
    return curves


def evaluate_stream(frames, prompt: str, *, chunk_frames: int | None = None,
                    first_chunk_frames: int | None = None, value_range: str = "auto",
                    config: EvalConfig = DEFAULT_CONFIG) -> dict:
    """Drift over a long stream: {"clip": whole-stream result, "chunks": [result per chunk],
    "curves": per-chunk lists (see _curves)}. Chunks default to config.chunk_frames (12); a
    one-frame remainder joins the chunk before it (one frame cannot show motion)."""
    stats = measure(frames, value_range, config)
    bounds = chunk_bounds(len(stats), chunk_frames or config.chunk_frames, first_chunk_frames)
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < 2:
        bounds = bounds[:-2] + [(bounds[-2][0], bounds[-1][1])]
    chunks = [summarize(stats, prompt, a, b, config) for a, b in bounds]
    return dict(clip=summarize(stats, prompt, config=config), chunks=chunks, curves=_curves(chunks))


def _first_stable(ok: np.ndarray, k: int) -> int | None:
    """First index from which `ok` holds for k consecutive frames (or to the end if shorter)."""
    k = max(1, min(k, len(ok)))
    run = np.convolve(ok.astype(np.int64), np.ones(k, dtype=np.int64), mode="valid")  # [n-k+1]
    hits = np.nonzero(run == k)[0]
    return int(hits[0]) if len(hits) else None


def evaluate_schedule(frames, schedule: Sequence[tuple[int, str]], *, value_range: str = "auto",
                      config: EvalConfig = DEFAULT_CONFIG) -> dict:
    """A clip generated under a prompt schedule [(start_frame, prompt), ...].

    Returns {"segments": [summarize() per segment, against its own prompt],
             "switches": [{"frame", "changed", "latency", "latency_frames", "switched",
                           "jump_px", "continuous"} per switch]}.
    latency[attr]: frames after the switch until the new value of a changed attribute is detected
    for config.stable_frames consecutive frames (None: never); latency_frames is their maximum.
    jump_px: centroid step (torus) from the frame before the switch to the switch frame;
    continuous: jump_px <= config.max_jump, None when no object is found on one side (unknown, not a
    jump). Frames before the first start are not scored.
    """
    plan = [(int(s), p) for s, p in schedule]
    if not plan:
        raise ValueError("schedule is empty; give at least [(0, prompt)]")
    starts = [s for s, _ in plan]
    if any(b <= a for a, b in zip(starts, starts[1:])) or starts[0] < 0:
        raise ValueError(f"schedule start frames must be >= 0 and strictly increasing, got {starts}")
    stats = measure(frames, value_range, config)
    t = len(stats)
    ends = [s for s, _ in plan[1:]] + [t]
    segments = [summarize(stats, p, s, e, config) for (s, p), e in zip(plan, ends) if s < t]
    per_frame = dict(colour=(stats.colour_label, COLOUR_NAMES),
                     shape=(np.where(stats.found, stats.iou.argmax(axis=-1), -1), world.SHAPES),
                     motion=(frame_motion_labels(stats, config), MOTION_NAMES),
                     background=(stats.bg_label, BACKGROUND_NAMES))
    switches = []
    for i in range(1, len(segments)):
        (_, old), (s, new), e = plan[i - 1], plan[i], ends[i]
        before, after = world.parse_prompt(old), world.parse_prompt(new)
        changed = [a for a in ATTRIBUTES if after[a] is not None and after[a] != before[a]]
        latency: dict[str, int | None] = {}
        for a in changed:
            labels, names = per_frame[a]
            latency[a] = _first_stable(labels[s:e] == names.index(after[a]), config.stable_frames)
        lat = list(latency.values())
        jump = _torus(stats.centre[s] - stats.centre[s - 1]) if s > 0 else np.full(2, np.nan)
        jump_px = _num(np.hypot(*jump))
        switches.append(dict(frame=s, changed=changed, latency=latency,
                             latency_frames=None if None in lat else max(lat, default=0),
                             switched=None not in lat,
                             jump_px=jump_px, continuous=None if jump_px is None else jump_px <= config.max_jump))
    return dict(segments=segments, switches=switches)


def _mean(values: Iterable) -> float | None:
    v = [float(x) for x in values if x is not None]
    return _num(np.mean(v)) if v else None


def aggregate(results: Iterable[dict]) -> dict:
    """Many clip results (evaluate_clip / segments / stream["clip"]) -> JSON-able summary:
    {group: {"n", "accuracy": {attr/all_four: rate}, "metrics": {metric: mean}}} for the groups
    "all", "in_distribution" and "held_out" (by the prompt's colour-shape pair)."""
    results = list(results)
    summary = {}
    for group in GROUPS:
        rs = [r for r in results if group == "all" or r["held_out"] == (group == "held_out")]
        summary[group] = dict(
            n=len(rs),
            accuracy={k: _mean(r["correct"][k] for r in rs) for k in (*ATTRIBUTES, "all_four")},
            metrics={k: _mean(r["metrics"][k] for r in rs) for k in METRICS})
    return summary


def aggregate_drift(streams: Iterable[dict]) -> dict:
    """Many evaluate_stream results -> {"n", "curves"}: per chunk index, the mean over streams
    (accuracies become rates). Streams of different lengths average over those that reach a chunk."""
    curves = [s["curves"] for s in streams]
    if not curves:
        return dict(n=0, curves={})
    length = max(len(c["start_frame"]) for c in curves)
    out = {}
    for key in curves[0]:
        out[key] = [_mean(c[key][i] for c in curves if i < len(c[key])) for i in range(length)]
    out["start_frame"] = [int(v) for v in out["start_frame"]]
    return dict(n=len(curves), curves=out)
