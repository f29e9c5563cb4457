"""Shapes World evaluator, reports: markdown tables, PNG plots, and one folder with everything.

Inputs are the dicts of evaluate.py: `summary` from aggregate() ({group: {"n", "accuracy",
"metrics"}}) and `drift` from evaluate_stream() or aggregate_drift() (anything with "curves").
Plots use matplotlib when it is installed (optional) and fall back to plain PIL drawing otherwise;
backend="pil" / "matplotlib" forces one.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from . import world
from .evaluate_detect import ATTRIBUTES, METRICS

ACCURACY_KEYS = (*ATTRIBUTES, "all_four")
GROUP_LABELS = {"all": "all", "in_distribution": "in-distribution", "held_out": "held-out"}
METRIC_LABELS = {"iou": "IoU", "palette_dist": "palette dist", "bg_palette_dist": "bg dist",
                 "flicker": "flicker", "track_smoothness": "smoothness", "area_cv": "area CV",
                 "colour_stability": "colour stab.", "found_rate": "found"}
# Drift figure: one panel per row entry, (title, curve keys, fixed y-range or None).
DRIFT_PANELS = (
    ("accuracy", ACCURACY_KEYS, (0.0, 1.0)),
    ("IoU / found rate", ("iou", "found_rate"), (0.0, 1.0)),
    ("colour distances (0..255)", ("palette_dist", "bg_palette_dist", "colour_stability"), None),
    ("background flicker (0..255)", ("flicker",), None),
    ("track smoothness (px/frame^2)", ("track_smoothness",), None),
    ("area CV", ("area_cv",), None),
)
LINE_COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
                (140, 86, 75))


def _fmt(v, pct: bool = False) -> str:
    if v is None:
        return "-"
    return f"{100 * v:.1f}%" if pct else f"{v:.3f}"


def markdown_table(summary: dict, drift: dict | None = None) -> str:
    """Accuracy + mean metrics per group; with drift, a second table with one row per chunk."""
    head = ["group", "n", *ACCURACY_KEYS, *(METRIC_LABELS[m] for m in METRICS)]
    lines = ["| " + " | ".join(h.replace("_", " ") for h in head) + " |",
             "|" + "---|" * len(head)]
    for group, row in summary.items():
        cells = [GROUP_LABELS.get(group, group), str(row["n"])]
        cells += [_fmt(row["accuracy"][k], pct=True) for k in ACCURACY_KEYS]
        cells += [_fmt(row["metrics"][m]) for m in METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    if drift and drift.get("curves"):
        c = drift["curves"]
        keys = [k for k in ("all_four", *METRICS) if k in c]
        lines += ["", "| chunk | start frame | " + " | ".join(METRIC_LABELS.get(k, k.replace("_", " "))
                                                              for k in keys) + " |",
                  "|" + "---|" * (len(keys) + 2)]
        for i, start in enumerate(c["start_frame"]):
            cells = [str(i), str(start)] + [_fmt(c[k][i], pct=k == "all_four") for k in keys]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _backend(backend: str) -> str:
    if backend not in ("auto", "pil", "matplotlib"):
        raise ValueError(f"backend must be auto, pil or matplotlib, got {backend!r}")
    if backend == "auto":
        try:
            import matplotlib  # noqa: F401  (optional dependency)
            return "matplotlib"
        except ImportError:
            return "pil"
    return backend


# ---------------------------------------------------------------------------------------------
# PIL fallback: plain but readable charts, no dependency beyond pillow

def _font():
    return ImageFont.load_default()


def _axes(draw: ImageDraw.ImageDraw, box, y_lo: float, y_hi: float, x_lo: float, x_hi: float,
          title: str, x_label: str | None = None):
    """Frame, title and min/mid/max tick labels of one panel; returns a data -> pixel mapper."""
    left, top, right, bottom = box
    font = _font()
    draw.text((left, top - 16), title, fill=(0, 0, 0), font=font)
    draw.rectangle(box, outline=(0, 0, 0))
    for frac in (0.0, 0.5, 1.0):
        y = bottom - frac * (bottom - top)
        draw.line([(left, y), (right, y)], fill=(225, 225, 225))
        draw.text((left - 46, y - 6), f"{y_lo + frac * (y_hi - y_lo):.3g}", fill=(0, 0, 0), font=font)
    if x_label is not None:  # numeric x axis: end ticks and a label
        for frac in (0.0, 1.0):
            x = left + frac * (right - left)
            draw.text((x - 8, bottom + 4), f"{x_lo + frac * (x_hi - x_lo):.0f}", fill=(0, 0, 0), font=font)
        draw.text(((left + right) / 2 - 40, bottom + 4), x_label, fill=(0, 0, 0), font=font)

    def to_px(xv: float, yv: float) -> tuple[float, float]:
        fx = 0.5 if x_hi == x_lo else (xv - x_lo) / (x_hi - x_lo)
        fy = 0.5 if y_hi == y_lo else (yv - y_lo) / (y_hi - y_lo)
        return left + fx * (right - left), bottom - fy * (bottom - top)
    return to_px


def _range(values: Sequence, fixed) -> tuple[float, float]:
    if fixed:
        return fixed
    vals = [v for v in values if v is not None]
    if not vals:
        return (0.0, 1.0)
    lo, hi = min(0.0, min(vals)), max(vals)
    return (lo, hi * 1.1 if hi > lo else lo + 1.0)


def _pil_drift(curves: dict, path: Path, title: str) -> None:
    cols, pw, ph = 3, 300, 190
    rows = (len(DRIFT_PANELS) + cols - 1) // cols
    img = Image.new("RGB", (cols * (pw + 70) + 20, rows * (ph + 90) + 40), "white")
    draw = ImageDraw.Draw(img)
    draw.text((20, 10), title, fill=(0, 0, 0), font=_font())
    xs = curves.get("start_frame", [])
    x_lo, x_hi = (min(xs), max(xs)) if xs else (0, 1)
    for p, (name, keys, fixed) in enumerate(DRIFT_PANELS):
        keys = [k for k in keys if k in curves]
        left = 70 + (p % cols) * (pw + 70)
        top = 60 + (p // cols) * (ph + 90)
        y_lo, y_hi = _range([v for k in keys for v in curves[k]], fixed)
        to_px = _axes(draw, (left, top, left + pw, top + ph), y_lo, y_hi, x_lo, x_hi, name,
                      "chunk start frame")
        for j, key in enumerate(keys):
            colour = LINE_COLOURS[j % len(LINE_COLOURS)]
            pts = [to_px(x, y) for x, y in zip(xs, curves[key]) if y is not None]
            if len(pts) > 1:
                draw.line(pts, fill=colour, width=2)
            for px, py in pts:
                draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=colour)
            draw.text((left + 4 + 96 * (j % 3), top + ph + 18 + 12 * (j // 3)), key,
                      fill=colour, font=_font())
    img.save(path)


def _pil_accuracy(summary: dict, path: Path, title: str) -> None:
    groups = [g for g, row in summary.items() if row["n"]]
    pw, ph, left, top = 120 * len(ACCURACY_KEYS), 260, 70, 50
    img = Image.new("RGB", (left + pw + 40, top + ph + 70), "white")
    draw = ImageDraw.Draw(img)
    draw.text((20, 10), title, fill=(0, 0, 0), font=_font())
    to_px = _axes(draw, (left, top, left + pw, top + ph), 0.0, 1.0, 0, 0, "")
    slot = pw / len(ACCURACY_KEYS)
    bar = (slot - 20) / max(1, len(groups))
    for k, key in enumerate(ACCURACY_KEYS):
        draw.text((left + k * slot + 10, top + ph + 18), key.replace("_", " "), fill=(0, 0, 0), font=_font())
        for j, g in enumerate(groups):
            v = summary[g]["accuracy"][key]
            if v is None:
                continue
            x0 = left + k * slot + 10 + j * bar
            _, y = to_px(0, v)
            draw.rectangle([x0, y, x0 + bar - 2, top + ph], fill=LINE_COLOURS[j % len(LINE_COLOURS)])
            draw.text((x0, y - 12), f"{100 * v:.0f}", fill=(0, 0, 0), font=_font())
    for j, g in enumerate(groups):
        draw.text((left + 140 * j, top + ph + 40), f"{GROUP_LABELS.get(g, g)} (n={summary[g]['n']})",
                  fill=LINE_COLOURS[j % len(LINE_COLOURS)], font=_font())
    img.save(path)


def _pil_drift_compare(drifts: dict, keys: Sequence[str], path: Path, title: str) -> None:
    pw, ph = 300, 190
    img = Image.new("RGB", (len(keys) * (pw + 70) + 20, ph + 110 + 12 * len(drifts)), "white")
    draw = ImageDraw.Draw(img)
    draw.text((20, 10), title, fill=(0, 0, 0), font=_font())
    xs_all = [x for d in drifts.values() for x in d["curves"].get("start_frame", [])]
    x_lo, x_hi = (min(xs_all), max(xs_all)) if xs_all else (0, 1)
    for p, key in enumerate(keys):
        left, top = 70 + p * (pw + 70), 50
        fixed = (0.0, 1.0) if key in ACCURACY_KEYS or key in ("iou", "found_rate") else None
        y_lo, y_hi = _range([v for d in drifts.values() for v in d["curves"].get(key, [])], fixed)
        to_px = _axes(draw, (left, top, left + pw, top + ph), y_lo, y_hi, x_lo, x_hi,
                      METRIC_LABELS.get(key, key.replace("_", " ")), "chunk start frame")
        for j, drift in enumerate(drifts.values()):
            c = drift["curves"]
            pts = [to_px(x, y) for x, y in zip(c.get("start_frame", []), c.get(key, [])) if y is not None]
            colour = LINE_COLOURS[j % len(LINE_COLOURS)]
            if len(pts) > 1:
                draw.line(pts, fill=colour, width=2)
            for px, py in pts:
                draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=colour)
    for j, label in enumerate(drifts):
        draw.text((70, 50 + ph + 40 + 12 * j), label, fill=LINE_COLOURS[j % len(LINE_COLOURS)], font=_font())
    img.save(path)


# ---------------------------------------------------------------------------------------------
# matplotlib (optional)

def _mpl_drift(curves: dict, path: Path, title: str) -> None:
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    fig = Figure(figsize=(12, 6.5))
    axes = fig.subplots(2, 3).ravel()
    xs = curves.get("start_frame", [])
    for ax, (name, keys, fixed) in zip(axes, DRIFT_PANELS):
        _mpl_drift_axis(ax, {key: (xs, curves[key]) for key in keys if key in curves}, name,
                        (fixed[0] - 0.02, fixed[1] + 0.02) if fixed else None)
    _mpl_save(fig, path, title)


def _mpl_drift_axis(ax, series: dict, name: str, ylim) -> None:
    """One drift panel: each labelled (xs, ys) curve without its None points, then the shared styling."""
    for label, (xs, ys) in series.items():
        pts = [(x, y) for x, y in zip(xs, ys) if y is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", markersize=3, label=label)
    if ylim:
        ax.set_ylim(*ylim)
    ax.set_title(name, fontsize=10)
    ax.set_xlabel("chunk start frame")
    ax.grid(alpha=0.3)
    if ax.lines:  # a metric that is None in every chunk (no object found) has nothing to label
        ax.legend(fontsize=7)


def _mpl_save(fig, path: Path, title: str) -> None:
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _mpl_accuracy(summary: dict, path: Path, title: str) -> None:
    from matplotlib.figure import Figure

    groups = [g for g, row in summary.items() if row["n"]]
    fig = Figure(figsize=(8, 4))
    ax = fig.subplots()
    width = 0.8 / max(1, len(groups))
    for j, g in enumerate(groups):
        vals = [summary[g]["accuracy"][k] for k in ACCURACY_KEYS]
        xs = [k + j * width for k, v in enumerate(vals) if v is not None]
        bars = ax.bar(xs, [v for v in vals if v is not None], width,
                      label=f"{GROUP_LABELS.get(g, g)} (n={summary[g]['n']})")
        ax.bar_label(bars, labels=[f"{100 * v:.0f}" for v in vals if v is not None], fontsize=7)
    ax.set_xticks([k + 0.4 - width / 2 for k in range(len(ACCURACY_KEYS))],
                  [k.replace("_", " ") for k in ACCURACY_KEYS])
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _mpl_drift_compare(drifts: dict, keys: Sequence[str], path: Path, title: str) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2 * len(keys), 3.8))
    axes = fig.subplots(1, len(keys), squeeze=False).ravel()
    for ax, key in zip(axes, keys):
        series = {label: (d["curves"].get("start_frame", []), d["curves"].get(key, [])) for label, d in drifts.items()}
        _mpl_drift_axis(ax, series, METRIC_LABELS.get(key, key.replace("_", " ")),
                        (-0.02, 1.02) if key in ACCURACY_KEYS or key in ("iou", "found_rate") else None)
    _mpl_save(fig, path, title)


def plot_drift(drift: dict, path, backend: str = "auto", title: str = "drift per chunk") -> Path:
    """PNG of the per-chunk curves of an evaluate_stream / aggregate_drift result."""
    path = Path(path)
    curves = drift.get("curves", drift)
    (_mpl_drift if _backend(backend) == "matplotlib" else _pil_drift)(curves, path, title)
    return path


def plot_drift_compare(drifts: dict, path, keys: Sequence[str] = ("all_four", "iou", "flicker"),
                       backend: str = "auto", title: str = "drift per chunk") -> Path:
    """PNG with one panel per curve key and one line per labelled drift result ({label: drift}),
    so variants of one model (full cache, rolling window, sinks) are read off the same axes."""
    path = Path(path)
    drifts = {label: {"curves": d.get("curves", d)} for label, d in drifts.items()}
    (_mpl_drift_compare if _backend(backend) == "matplotlib" else _pil_drift_compare)(drifts, keys, path, title)
    return path


def plot_accuracy(summary: dict, path, backend: str = "auto",
                  title: str = "Shapes World accuracy per attribute") -> Path:
    """PNG bar chart: per-attribute and all-four accuracy, one bar per group of an aggregate()."""
    path = Path(path)
    (_mpl_accuracy if _backend(backend) == "matplotlib" else _pil_accuracy)(summary, path, title)
    return path


def write_report(folder, summary: dict, drift: dict | None = None, *, clips: list | None = None,
                 backend: str = "auto", name: str = "eval", extra: dict | None = None) -> dict[str, Path]:
    """Write {name}.json (summary, drift, optional per-clip results), {name}.md, and the PNGs
    {name}_accuracy.png and, with drift, {name}_drift.png into folder. Returns the paths by kind."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"json": folder / f"{name}.json", "markdown": folder / f"{name}.md",
             "accuracy_png": folder / f"{name}_accuracy.png"}
    doc = dict(world_version=world.WORLD_VERSION, summary=summary, drift=drift, clips=clips, **(extra or {}))
    paths["json"].write_text(json.dumps(doc, indent=1, allow_nan=False))
    md = f"# Shapes World {world.WORLD_VERSION} evaluation\n\n" + markdown_table(summary, drift)
    for key, value in (extra or {}).items():  # run settings, speed, ...: one line each
        md += f"\n{key}: `{json.dumps(value)}`\n"
    paths["markdown"].write_text(md)
    plot_accuracy(summary, paths["accuracy_png"], backend)
    if drift and drift.get("curves"):
        paths["drift_png"] = plot_drift(drift, folder / f"{name}_drift.png", backend)
    return paths
