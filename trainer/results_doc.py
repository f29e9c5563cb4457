"""The document `causvid-train results` writes: RESULTS.md sections as small markdown helpers over the
measurements of trainer/results.py, the "what is weak" sentences generated from those numbers, the
plots (causvid_core/evaluate_report.py) and results.json, every file written atomically."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Optional, Sequence

from causvid_core import world
from causvid_core.evaluate_detect import ATTRIBUTES
from causvid_core.evaluate_report import markdown_table, plot_accuracy, plot_drift, plot_drift_compare

from .run import atomic_write_text

REPO_DOCS = Path(__file__).resolve().parents[1] / "docs"
DEFAULT_DOC = REPO_DOCS / "RESULTS.md"
BUSY_LOAD = 0.5  # load average per core above which the timings are flagged as taken beside other work


# ---------------------------------------------------------------------------------------------
# What is weak: sentences from the numbers

def _acc(summary: dict, group: str, key: str = "all_four") -> Optional[float]:
    return summary[group]["accuracy"][key] if summary[group]["n"] else None


def _p(v: Optional[float]) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _f(v: Optional[float], digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _half_width(n: int) -> float:
    """95% interval half-width of a rate at its widest (p = 0.5): what a difference must exceed."""
    return 1.96 * math.sqrt(0.25 / n) if n else 1.0


def weak_points(res: dict) -> list[str]:
    """One sentence per target missed (res["targets"]), plus the preset and sample-size caveats."""
    out, t = [], res["targets"]
    rows, student, teacher = res["rows"], res["rows"]["student"], res["rows"]["teacher"]
    if res["preset"] == "micro" or res["quick"]:
        out.append(f"This report is from the `{res['preset']}` preset{' in --quick mode' if res['quick'] else ''}: "
                   "its models are deliberately tiny and undertrained and its counts small, so the numbers test "
                   "the pipeline, not the method.")
    s_in, s_held = _acc(student["summary"], "in_distribution"), _acc(student["summary"], "held_out")
    if s_in is not None and s_in < t['all_four']:
        out.append(f"Missed: the student's all-four accuracy in distribution is {_p(s_in)} "
                   f"(n={student['summary']['in_distribution']['n']}), below the {_p(t['all_four'])} target.")
    if s_in is not None and s_held is not None and s_in - s_held > t['held_out_gap']:
        out.append(f"Compositional generalisation is weak: on held-out colour-shape pairs the student reaches "
                   f"{_p(s_held)} all-four against {_p(s_in)} in distribution.")
    if teacher["status"] != "ok":
        out.append("The bidirectional teacher is not trained, so the student cannot be compared with it.")
    else:
        for group, name in (("in_distribution", "in distribution"), ("held_out", "on held-out pairs")):
            a, b = _acc(teacher["shared"], group), _acc(student["shared"], group)
            if a is not None and b is not None and a - b > t['teacher_gap']:
                out.append(f"Missed: the student is {100 * (a - b):.1f} points below the teacher {name} "
                           f"({_p(b)} vs {_p(a)} all-four on the same {teacher['shared'][group]['n']} prompts).")
        a = _acc(teacher["shared"], "in_distribution")
        if a is not None and a < t['all_four']:
            out.append(f"The teacher itself reaches only {_p(a)} all-four in distribution: it caps what "
                       "distillation can give the student.")
    for name, label in (("renderer", "the renderer's own clips"), ("vae", "the VAE round trip of rendered clips")):
        v = _acc(res["ceilings"][name]["summary"], "all")
        if v is not None and v < t['ceiling']:
            out.append(f"Ceiling: {label} score only {_p(v)} all-four, so no model row can do better than that.")
    missing = [r["label"] for r in rows.values() if r["status"] != "ok"]
    if missing:
        out.append(f"Not trained (rows left empty): {'; '.join(missing)}. Run `causvid-train ablation` / the pipeline.")
    few = {k: r for k, r in rows.items() if r["status"] == "ok" and r["kind"] == "student"}
    best = max(few, key=lambda k: _acc(few[k]["shared"], "in_distribution") or 0.0)
    if best != "student" and (_acc(few[best]["shared"], "in_distribution") or 0) > (
            _acc(student["shared"], "in_distribution") or 0):
        out.append(f"Unlike the paper's Table 4, the main recipe (ODE init + bidirectional DMD) is not the best "
                   f"few-step row here: {few[best]['label']} reaches "
                   f"{_p(_acc(few[best]['shared'], 'in_distribution'))} against "
                   f"{_p(_acc(student['shared'], 'in_distribution'))} in distribution.")
    out += _weak_training(res["training"], t)
    out += _weak_streams(res, t)
    n_shared = teacher["shared"]["all"]["n"] if teacher["status"] == "ok" else student["shared"]["all"]["n"]
    out.append(f"Sample size: rows are compared on {n_shared} shared prompts, where a 95% interval of a rate is up to "
               f"±{100 * _half_width(n_shared):.0f} points wide; differences smaller than that are noise. "
               f"Student-only figures use {student['summary']['all']['n']} prompts "
               f"(±{100 * _half_width(student['summary']['all']['n']):.0f} points).")
    return out


def other_work(m: dict) -> Optional[str]:
    """What else ran beside the measurement, when it was enough to slow it; None on an idle machine.

    Other processes' CPU during the run when it was measured (the run's own threads excluded);
    else (older results, other platforms) the load average at the start and end, which counts the
    run itself at the end."""
    limit = m["cores"] * BUSY_LOAD
    if m.get("other_cores") is not None:
        if m["other_cores"] > limit:
            return f"other processes kept {m['other_cores']:.1f} of {m['cores']} cores busy on average during the run"
        return None
    loads = [v for v in (m["load_start"], m.get("load_end")) if v is not None]
    if loads and max(loads) > limit:
        return f"load average up to {max(loads):.1f} on {m['cores']} cores"
    return None


def _weak_training(spent: dict, t: dict) -> list[str]:
    out, timed = [], {k: v for k, v in spent.items() if v is not None}
    total = sum(timed.values()) / 3600
    if total > t["pipeline_hours"]:
        slow = ", ".join(f"{k} {timed[k] / 60:.0f} min" for k in sorted(timed, key=timed.get, reverse=True)[:3])
        out.append(f"Missed: training the run took {total:.2f} h on this machine"
                   f"{' in its timed stages alone' if len(timed) < len(spent) else ''}, over the "
                   f"{t['pipeline_hours']} h target (longest: {slow}).")
    if len(timed) < len(spent):
        out.append(f"Training time not recorded for {', '.join(k for k in spent if k not in timed)} (unfinished, or "
                   "finished before stages timed themselves): the training-time total leaves them out.")
    return out


def _weak_streams(res: dict, t: dict) -> list[str]:
    out = []
    for label, d in res["drift"].items():
        a, b = d["first_all_four"], d["last_all_four"]
        if a is not None and b is not None and a - b > t['drift_drop']:
            out.append(f"Drift ({label}): all-four falls from {_p(a)} in the first {res['counts']['drift_edge']} "
                       f"chunks to {_p(b)} in the last of {d['chunks']}.")
    chunk_pixels = res["chunk_pixel_frames"]
    for key, s in res["switches"]["summary"].items():
        if s["kind"] != "all":
            continue
        mode = s["mode"]
        if s["switched"] is not None and s["switched"] < t['switched']:
            out.append(f"Prompt switch ({mode}): the changed attribute shows up in only {_p(s['switched'])} "
                       f"of {s['n']} switches.")
        if s["latency_frames"] is not None and s["latency_frames"] > chunk_pixels:
            out.append(f"Prompt switch ({mode}): switches that land take {s['latency_frames']:.1f} frames on "
                       f"average, more than one chunk ({chunk_pixels} frames).")
        if s["continuous"] is not None and s["continuous"] < t['continuous']:
            out.append(f"Prompt switch ({mode}): the object jumps at {_p(1 - s['continuous'])} of the "
                       f"{s['jump_measured']} switches with an object on both sides "
                       f"(mean jump {_f(s['jump_px'], 1)} px).")
    i2v = res["i2v"]
    if i2v["psnr_first"] is not None and i2v["psnr_first"] < t['i2v_psnr']:
        out.append(f"Image-to-video: the first frame is {i2v['psnr_first']:.1f} dB from the image "
                   f"(target {t['i2v_psnr']:.0f} dB); all-four {_p(i2v['all_four'])}.")
    for s in res["v2v"]["by_strength"].values():
        if s["restyled"] is not None and s["restyled"] < t['v2v_rate']:
            out.append(f"Video-to-video at strength {s['strength']}: only {_p(s['restyled'])} of clips take the new "
                       f"colour while keeping shape and motion (old colour kept in {_p(s['kept_old_colour'])}).")
    busy = other_work(res["machine"])
    if busy:
        out.append(f"Timings were taken beside other work ({busy}): every second and frame rate here "
                   "understates this machine; rerun on an idle one.")
    sp = res["speed"]
    if sp["fps"] < world.FPS:
        out.append(f"Speed: {sp['fps']:.1f} frames/s end to end is slower than the world's {world.FPS} fps "
                   f"({sp['realtime_factor']:.2f}x real time).")
    return out


# ---------------------------------------------------------------------------------------------
# The document

def md_table(head: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _groups(entries: dict[str, dict]) -> dict:
    """{label: summary} -> one aggregate()-shaped dict with a row per (label, group), for markdown_table."""
    out = {}
    for label, summary in entries.items():
        for group, name in (("in_distribution", "in-dist"), ("held_out", "held-out")):
            out[f"{label}, {name}"] = summary[group]
    return out


def section_header(res: dict, doc: Path, root: Path) -> str:
    c, m, seeds = res["counts"], res["machine"], res["seeds"]
    cmd = (f"causvid-train results --preset {res['preset']} --out {root}"
           + (f" --doc {doc}" if doc.resolve() != DEFAULT_DOC else "") + (" --quick" if res["quick"] else ""))
    return (f"# Results: Shapes World {world.WORLD_VERSION}, preset `{res['preset']}`\n\n"
            "Every number below comes from one run of the committed code and its fixed seeds; this file, "
            "`results/*.png` and `results/results.json` are written by the command, never by hand. Every model is "
            "measured with its weights rounded to float16, as `causvid-train publish` ships them.\n\n"
            f"- Regenerate: `{cmd}`\n"
            f"- Commit: `{res['commit']}`; run folder `{res['run']}`\n"
            f"- Machine: {m['cores']} CPU cores, torch {m['torch']} ({m['torch_threads']} threads), "
            f"Python {m['python']}, {m['platform']}; load average {m['load_start']} at the start, "
            f"{m.get('load_end')} at the end (this run's own threads included); other processes' CPU during "
            f"the run: {m.get('other_cores', 'not measured')} cores\n"
            f"- Date: {res['date']}; wall time of this run: {res['wall_s']:.0f} s "
            f"({', '.join(f'{k} {v:.1f} s' for k, v in res['timings'].items())})\n"
            f"- Prompts: `causvid eval`'s fixed prompts (PROMPT_SEED {seeds['prompt_seed']}; held-out pairs "
            f"{seeds['held_out_prompt_seed']}); "
            f"{c['n_in']} in-distribution + {c['n_held']} held-out per row{_teacher_prefix(c)}; clip seed = "
            "prompt index "
            f"(held-out: {seeds['held_out_seed']} + index); many-step rows start from the students' noise.\n"
            f"- Clips: {c['frames']} frames at 64x64 ({world.FPS} fps). Long streams: {c['drift_streams']} per "
            f"variant x {c['drift_chunks']} chunks (seeds {seeds['stream_seed']}+). Switches: seeds "
            f"{seeds['switch_seed']}+, i2v {seeds['i2v_seed']}+, v2v {seeds['v2v_seed']}+. Full counts and every "
            "seed: `results/results.json`.\n")


def _teacher_prefix(c: dict) -> str:
    if (c["teacher_n_in"], c["teacher_n_held"]) == (c["n_in"], c["n_held"]):
        return ""
    return f" (many-step rows: the first {c['teacher_n_in']} + {c['teacher_n_held']} of them)"


def _contrast_text(ms: dict) -> str:
    """How the many-step rows' attribute-contrastive guidance reads in prose ('' when off)."""
    if not ms.get("contrast"):
        return ""
    groups = "; ".join(" / ".join(g) for g in ms["contrast_words"])
    return (f", plus contrastive guidance {ms['contrast']} against the prompt with its rival words ({groups}), "
            "the guidance the ODE pairs and the DMD real score used")


def _steps_kind(ms: dict) -> str:
    if not ms.get("eta"):
        return "Euler steps"
    return (f"stochastic Euler steps (eta {ms['eta']}: each step's noise mixes its predicted noise and fresh noise, "
            "as in the ODE pairs)")


def section_teacher_student(res: dict) -> str:
    rows, ceil, ms = res["rows"], res["ceilings"], res["many_step"]
    entries = {"renderer (ceiling)": ceil["renderer"]["shared"], "VAE round trip (ceiling)": ceil["vae"]["shared"]}
    for key, name in (("teacher", "teacher"), ("student", "student")):
        if rows[key]["status"] == "ok":
            entries[name] = rows[key]["shared"]
    if rows["student"]["summary"]["all"]["n"] > rows["student"]["shared"]["all"]["n"]:
        entries["student, all prompts"] = rows["student"]["summary"]
    text = ("## Teacher vs student\n\n"
            f"Teacher: bidirectional, {ms['steps']} {_steps_kind(ms)}, shift {ms['shift']}, guidance {ms['guidance']}"
            f"{_contrast_text(ms)}, whole clip at once. Student: causal, {len(res['stream_defaults']['steps'])} steps per chunk of "
            f"{res['stream_defaults']['chunk_frames']} latent frames, KV cache. Rows on the shared prompts unless "
            "said otherwise. Text alignment: colour / shape / motion / background / all four; frame quality: "
            "IoU, palette and background distances; temporal quality: flicker, track smoothness, area CV, "
            "colour stability, found rate (units in causvid_core/evaluate.py).\n\n")
    text += markdown_table(_groups(entries)).replace("| group |", "| row |", 1)
    text += "\n" + md_table(["row", "steps", "model evals / clip", "first frames (s)", "frames / s", "x real time"],
                            [_speed_cells(rows[k]) for k in ("teacher", "causal-teacher", "student")
                             if rows[k]["status"] == "ok"])
    text += ("\nMany-step rows deliver all frames at once (first frames = the whole clip); the student's first "
             "frames are its first decoded chunk. Times include text encoding and VAE decoding.\n\n"
             "![accuracy](results/accuracy.png)\n")
    return text


def _speed_cells(row: dict) -> list:
    return [row["label"], row["steps"], row["nfe"], _f(row["first_frames_s"]), _f(row["fps"], 1),
            _f(row["fps"] / world.FPS)]


def section_speed(res: dict) -> str:
    sp = res["speed"]
    return ("## Speed: one clip end to end\n\n"
            f"`causvid generate`-equivalent ({sp['frames']} frames, 64x64, main student): text encoding to decoded "
            f"frames, best of {sp['repeats']} after a warm-up.\n\n"
            + md_table(["seconds", "first decoded chunk (s)", "frames / s", "video length (s)", "x real time"],
                       [[_f(sp["seconds"]), _f(sp["first_chunk_s"]), _f(sp["fps"], 1), _f(sp["video_seconds"]),
                         _f(sp["realtime_factor"])]])
            + f"\nReal time is the world's {world.FPS} fps: above 1x, frames come faster than they are shown.\n")


def section_training(res: dict) -> str:
    spent, restored = res["training"], res.get("training_restored", {})
    timed = [v for v in spent.values() if v is not None]
    rows = [[k + (f" (restored: the time of {restored[k]})" if restored.get(k) else
                  " (restored)" if k in restored else ""),
             "not recorded" if v is None else _f(v / 60, 1)] for k, v in spent.items()]
    rows.append(["all stages" + (" timed" if len(timed) < len(spent) else ""), _f(sum(timed) / 60, 1)])
    return ("## Training time\n\n"
            f"Wall-clock minutes each stage of the run took on this machine (its DONE.json `seconds`: every process "
            f"that ran it, counted up to its last checkpoint), against the {res['targets']['pipeline_hours']} h "
            "target for the whole pipeline."
            + (" A stage restored from published files (`causvid-train restore`) shows the time the run it was "
               "published from measured, on that run's machine, when this run's config trains it the same way."
               if restored else "") + "\n\n" + md_table(["stage", "minutes"], rows))


def section_ablation(res: dict) -> str:
    head = ["row", "all-four in-dist", "all-four held-out", *ATTRIBUTES, "IoU", "flicker", "steps (model evals)",
            "s / clip"]
    lines, ms = [], res["many_step"]
    for r in res["rows"].values():
        if r["status"] != "ok":
            lines.append([r["label"], "not trained", *["-"] * (len(head) - 2)])
            continue
        s = r["shared"]
        lines.append([r["label"], _p(_acc(s, "in_distribution")), _p(_acc(s, "held_out")),
                      *[_p(s["all"]["accuracy"][a]) for a in ATTRIBUTES], _f(s["all"]["metrics"]["iou"]),
                      _f(s["all"]["metrics"]["flicker"]), f"{r['steps']} ({r['nfe']})", _f(r["s_per_clip"])])
    return ("## Ablation (the paper's Table 4 at this scale)\n\n"
            "All rows on the same shared prompts and seeds; per-attribute accuracy over in-distribution and "
            "held-out together. Steps: per clip (bidirectional) or per chunk (causal); model evals per clip in "
            "brackets (guidance doubles them, each contrastive rival adds one, each causal chunk adds a cache "
            f"write). Many-step rows sample as the ODE pairs did{_contrast_text(ms) or ''}.\n\n" + md_table(head, lines))


def section_held_out(res: dict) -> str:
    lines = []
    for r in res["rows"].values():
        if r["status"] != "ok":
            continue
        a, b = _acc(r["shared"], "in_distribution"), _acc(r["shared"], "held_out")
        lines.append([r["label"], _p(a), _p(b), "-" if a is None or b is None else f"{100 * (b - a):+.1f}"])
    pairs = ", ".join(f"{c} {s}" for c, s in world.HELD_OUT_PAIRS)
    return ("## Held-out colour-shape pairs\n\n"
            f"Pairs never shown in training: {pairs}. All-four accuracy on the shared prompts:\n\n"
            + md_table(["row", "in-dist", "held-out", "difference (points)"], lines))


def shape_confusion(clips: Sequence[dict]) -> dict[str, dict[str, int]]:
    """Prompted shape -> {detected shape, or "none" when no object was found: clips}."""
    out = {shape: {d: 0 for d in (*world.SHAPES, "none")} for shape in world.SHAPES}
    for c in clips:
        out[world.parse_prompt(c["prompt"])["shape"]][c["detected"]["shape"] or "none"] += 1
    return out


def section_shapes(res: dict) -> str:
    sources = [("VAE round trip of the renders", res["ceilings"]["vae"].get("clips"))]
    sources += [(r["label"], r["clips"]) for key, r in res["rows"].items()
                if key in ("teacher", "student") and r["status"] == "ok"]
    lines = [[label, want, *(str(n) for n in got.values())]
             for label, clips in sources if clips for want, got in shape_confusion(clips).items()]
    return ("## Shapes: what is drawn for each prompted shape\n\n"
            "Every prompt of each row (in-distribution and held-out; the teacher on its shared prefix), "
            "counted by the shape the evaluator detects.\n\n"
            + md_table(["row", "prompted", *world.SHAPES, "no object found"], lines))


def section_drift(res: dict) -> str:
    e = res["counts"]["drift_edge"]
    lines = [[label, d["window"] or "-", d["sinks"], _p(d["first_all_four"]), _p(d["last_all_four"]),
              _f(d["first_iou"]), _f(d["last_iou"]), _f(d["first_flicker"]), _f(d["last_flicker"]),
              _f(d["first_chunk_s"]), _f(d["fps"], 1)] for label, d in res["drift"].items()]
    head = ["cache", "window", "sinks", f"all-four first {e}", f"all-four last {e}", f"IoU first {e}",
            f"IoU last {e}", f"flicker first {e}", f"flicker last {e}", "first chunk (s)", "frames / s"]
    any_d = next(iter(res["drift"].values()))
    return ("## Long streams: drift\n\n"
            f"Main student, {any_d['streams']} stream(s) x {any_d['chunks']} chunks per cache variant "
            "(window and sinks in latent frames; the full cache holds every frame). Each chunk is judged "
            "against the stream's prompt; first and last chunks averaged.\n\n" + md_table(head, lines)
            + "\n![drift](results/drift.png)\n\n![drift per metric, window + sinks](results/drift_window_sinks.png)\n")


def section_switches(res: dict) -> str:
    sw = res["switches"]
    head = ["mode", "changed", "n", "all-four before", "all-four after", "changed attr. right after", "switched",
            "latency (frames)", "jump (px)", "continuous"]
    lines = [[s["mode"], s["kind"], s["n"], _p(s["before_all_four"]), _p(s["after_all_four"]),
              _p(s["after_changed"]), _p(s["switched"]), _f(s["latency_frames"], 1), _f(s["jump_px"], 1),
              f"{_p(s['continuous'])} of {s['jump_measured']}"] for s in sw["summary"].values()]
    pairs = "\n".join(f"- {kind}: \"{a}\" -> \"{b}\"" for kind, a, b in sorted({(c["kind"], c["before"], c["after"])
                                                                              for c in sw["cases"]}))
    return ("## Prompt switches\n\n"
            f"Main student; {sw['chunks_before']} chunk(s) under the first prompt, then "
            "`CausalStream.set_prompt(new, mode)` at the chunk boundary and "
            f"{sw['chunks_after']} more chunks; judged with `evaluate_schedule` (after = the segment after the "
            "switch; latency = frames until the new value holds, over the switches that landed; jump = centroid "
            "step at the switch).\n\n"
            + md_table(head, lines) + "\nPairs:\n\n" + pairs + "\n")


def section_i2v(res: dict) -> str:
    i = res["i2v"]
    return ("## Image-to-video\n\n"
            f"First frame rendered by `world.render` for a spec, generated with the spec's prompt "
            f"({i['n']} clip(s), main student).\n\n"
            + md_table(["all-four", "PSNR frame 0 vs image (dB)", "mean abs diff frame 0 (0..255)",
                        f"PSNR first {i['first_chunk_frames']} frames vs the rendered clip (dB)", "frame count kept"],
                       [[_p(i["all_four"]), _f(i["psnr_first"], 1), _f(i["mad_first"], 1),
                         _f(i["psnr_first_chunk"], 1), _p(i["frames_kept"])]]))


def section_v2v(res: dict) -> str:
    lines = [[s["strength"], s["n"], _p(s["restyled"]), _p(s["colour_new"]), _p(s["shape_kept"]),
              _p(s["motion_kept"]), _p(s["kept_old_colour"]), _p(s["frames_kept"])]
             for s in res["v2v"]["by_strength"].values()]
    return ("## Video-to-video\n\n"
            "A rendered clip restyled by a prompt that changes only its colour (main student). Restyled = "
            "detected colour is the new one while shape and motion match the source.\n\n"
            + md_table(["strength", "n", "restyled", "new colour", "shape kept", "motion kept", "old colour kept",
                        "frame count kept"], lines))


def section_weak(res: dict) -> str:
    lines = res["weak"] or ["No target of this report was missed."]
    t = res["targets"]
    return ("## What is weak\n\n"
            f"Generated from the numbers against these targets: student all-four >= {_p(t['all_four'])} in "
            f"distribution and at most {100 * t['teacher_gap']:.0f} points below the teacher; held-out at most "
            f"{100 * t['held_out_gap']:.0f} points below in-distribution; drift at most {100 * t['drift_drop']:.0f} "
            f"points; switches landing >= {_p(t['switched'])} and continuous >= {_p(t['continuous'])}; i2v first "
            f"frame >= {t['i2v_psnr']:.0f} dB; v2v restyled >= {_p(t['v2v_rate'])}; faster than real time; the "
            f"pipeline trained in at most {t['pipeline_hours']} h.\n\n"
            + "\n".join(f"- {s}" for s in lines) + "\n")


def render_markdown(res: dict, doc: Path, root: Path) -> str:
    parts = [section_header(res, doc, root), section_weak(res), section_teacher_student(res), section_speed(res),
             section_training(res), section_ablation(res), section_held_out(res), section_shapes(res),
             section_drift(res), section_switches(res), section_i2v(res), section_v2v(res)]
    return "\n".join(parts)


def _atomic_png(plot, path: Path, *args, **kw) -> None:
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")  # keeps the suffix: the format comes from it
    plot(*args, tmp, **kw)
    os.replace(tmp, path)


def _sinks_variant(res: dict) -> str:
    """The drift variant drawn metric by metric: the rolling window with sinks (the streaming default)."""
    return next((label for label, d in res["drift"].items() if d["window"] and d["sinks"]), next(iter(res["drift"])))


def write_outputs(res: dict, doc: Path, root: Path) -> None:
    """doc, and beside it results/accuracy.png, drift.png, drift_window_sinks.png and results.json."""
    folder = doc.parent / "results"
    folder.mkdir(parents=True, exist_ok=True)
    rows = res["rows"]
    acc = {"VAE round trip": res["ceilings"]["vae"]["shared"]}  # the renderer is ~100% by construction
    acc.update({k: rows[k]["shared"] for k in ("teacher", "student") if rows[k]["status"] == "ok"})
    _atomic_png(plot_accuracy, folder / "accuracy.png", _groups(acc),
                title="all-four and per-attribute accuracy (shared prompts)")
    drifts = {label: d["drift"] for label, d in res["drift"].items()}
    _atomic_png(plot_drift_compare, folder / "drift.png", drifts, title="main student: drift per chunk by cache")
    label = _sinks_variant(res)
    _atomic_png(plot_drift, folder / "drift_window_sinks.png", res["drift"][label]["drift"],
                title=f"main student, {label}")
    atomic_write_text(folder / "results.json", json.dumps(res, indent=1, allow_nan=False))
    atomic_write_text(doc, render_markdown(res, doc, root))
