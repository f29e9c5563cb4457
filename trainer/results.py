"""`causvid-train results`: regenerate docs/RESULTS.md (with docs/results/*.png and results.json)
from a finished run folder, so every number in the document comes from one run of the committed code
and its fixed seeds.

    causvid-train results --preset shapes --out runs/shapes                 # docs/RESULTS.md
    causvid-train results --preset micro --out /tmp/mt --doc /tmp/mt/RESULTS.md --quick

What it measures (models from the layout of trainer/ablation.py; every model shares RUN/vae.safetensors
and RUN/text.safetensors so rows differ only in the DiT):
- teacher (many steps, guidance) vs student (few steps, causal, cached) on the fixed prompts of
  `causvid eval` (eval_run.eval_specs), in-distribution and held-out colour-shape pairs, with the
  renderer and a VAE round trip as ceilings; latency to first frames and frames per second;
- the paper's Table 4 at this scale (rows whose model is missing read "not trained");
- long streams with a full cache, a rolling window with sinks and without: drift per chunk;
- prompt switches (cut / recache / blend) at a chunk boundary; image-to-video; video-to-video;
- end-to-end time of one clip (text encoding to decoded frames) against real time;
- "what is weak": sentences generated from the numbers against `Targets`.
Many-step rows may see a prefix of the students' prompts (`Counts.teacher_n_in/_held`, for slower
teachers); comparisons between rows always use that shared prefix. At the shapes size a teacher clip
costs ~1.2 s on one core against ~0.3 s for a student clip, so the full counts give every row every prompt."""
from __future__ import annotations

import dataclasses
import datetime
import math
import os
import platform
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from causvid_core import evaluate as E
from causvid_core import world
from causvid_core.eval_run import PROMPT_SEED, _stream_frames, eval_specs
from causvid_core.schedule import SWITCH_MODES

from .ablation import variant_root
from .config import TrainConfig
from .pipeline import restored_stages, stage_seconds
from .publish import STORED_DTYPE
from .results_doc import DEFAULT_DOC, weak_points, write_outputs
from .stages.common import contrast_negatives, output, student_steps, teacher_stage


# Seeds. In-distribution prompt i is generated with seed i, held-out prompt j with HELD_OUT_SEED + j,
# whatever the counts, so a row evaluated on a prefix of the prompts sees exactly the same clips.
HELD_OUT_SEED = 100_000
STREAM_PROMPT_SEED, STREAM_SEED = PROMPT_SEED + 2, 1000  # the long streams of `causvid eval`
SWITCH_SEED = 2000
I2V_PROMPT_SEED, I2V_SEED = PROMPT_SEED + 3, 3000
V2V_PROMPT_SEED, V2V_SEED = PROMPT_SEED + 4, 4000
SPEED_PROMPT = "a red circle moving right on a black background"

# Prompt switches: (attribute that changes, before, after). No pair uses a held-out colour-shape pair.
SWITCH_PAIRS = (
    ("colour", "a red circle moving right on a black background", "a blue circle moving right on a black background"),
    ("colour", "a green square moving down on a gray background", "a yellow square moving down on a gray background"),
    ("colour", "a white triangle moving left on a navy background",
     "a orange triangle moving left on a navy background"),
    ("colour", "a cyan circle moving up on a forest background", "a magenta circle moving up on a forest background"),
    ("shape", "a yellow circle moving right on a navy background", "a yellow square moving right on a navy background"),
    ("motion", "a blue square moving up on a black background", "a blue square moving left on a black background"),
)


@dataclass(frozen=True)
class Counts:
    """How much one report generates. FULL: docs/RESULTS.md (shapes: ~11 min estimated on 2 cores, within the
    15-minute budget); QUICK: a few clips per section, for tests.

    Few-step rows see 192 + 48 prompts: at 48 the 95% interval of a rate is +-12 points, too wide to tell
    students apart or to check the 90% target (session 11: one student scored 87.5% on the first 48 prompts,
    82.3% on 192 and 76.0% on 96 others; the built-in 77.1% on 48 and on 192)."""
    n_in: int = 192  # in-distribution prompts per few-step row
    n_held: int = 48  # held-out colour-shape prompts per few-step row
    teacher_n_in: int = 48  # many-step rows: the first of the same prompts (they cost ~40x a student clip)
    teacher_n_held: int = 24
    teacher_batch: int = 4  # many-step clips sampled together after the timed ones
    timed_clips: int = 2  # many-step clips sampled alone: their time is the row's s per clip and latency
    frames: int = world.CLIP_FRAMES  # pixel frames of every clip (33 = 9 latent frames)
    drift_streams: int = 8  # long streams per cache variant (2 until session 18: one stream moved a row by 50 points)
    drift_chunks: int = 40
    drift_edge: int = 3  # chunks averaged at each end of a stream (first vs last)
    switch_pairs_per_kind: int = 4  # SWITCH_PAIRS used per changed attribute (there are 4 / 1 / 1)
    switch_seeds: int = 3
    chunks_before: int = 2  # chunks under the first prompt; the switch is at the next chunk boundary
    chunks_after: int = 3
    i2v_clips: int = 24
    v2v_clips: int = 24  # per strength
    v2v_strengths: tuple[float, ...] = (0.7, 0.5)
    speed_repeats: int = 3  # best of this many, after one warm-up


FULL = Counts()
QUICK = Counts(n_in=2, n_held=1, teacher_n_in=2, teacher_n_held=1, teacher_batch=2, timed_clips=1,
               drift_streams=1, drift_chunks=3, drift_edge=1, switch_pairs_per_kind=1, switch_seeds=1,
               chunks_before=1, chunks_after=2, i2v_clips=1, v2v_clips=1, v2v_strengths=(0.7,), speed_repeats=1)


@dataclass(frozen=True)
class Targets:
    """What "weak" means in the last section; each miss becomes a sentence with its numbers."""
    all_four: float = 0.90  # student all-four accuracy in distribution (the target)
    teacher_gap: float = 0.05  # student at most this far below the teacher (same prompts)
    held_out_gap: float = 0.10  # held-out pairs at most this far below in-distribution
    ceiling: float = 0.95  # renderer / VAE round trip all-four: below this they cap every row
    drift_drop: float = 0.10  # all-four of the last chunks at most this far below the first chunks
    switched: float = 0.90  # switches whose changed attribute is detected afterwards
    continuous: float = 0.90  # switches without a jump of the object
    i2v_psnr: float = 25.0  # dB, first generated frame vs the image
    v2v_rate: float = 0.50  # restyled clips: new colour, same shape and motion
    pipeline_hours: float = 2.5  # wall-clock training time of every stage of the run, on this machine


@dataclass(frozen=True)
class CacheVariant:
    label: str
    window: Optional[int]  # latent frames; None: full cache (a window holding the whole stream never evicts)
    sinks: int = 0


DRIFT_VARIANTS = (CacheVariant("full cache (no window)", None), CacheVariant("window 12 + 3 sinks", 12, 3),
                  CacheVariant("window 12, no sinks", 12, 0))


def drift_variants(defaults: dict) -> tuple[CacheVariant, ...]:
    """DRIFT_VARIANTS plus the model's own rolling window (its stream defaults) when it has another one."""
    w, k = defaults.get("window_frames"), defaults.get("sink_frames", 0)
    if not w or any(v.window == w and v.sinks == k for v in DRIFT_VARIANTS):
        return DRIFT_VARIANTS
    sinks = f"+ {k} sinks" if k else "no sinks"
    return DRIFT_VARIANTS + (CacheVariant(f"window {w}, {sinks} (the model's default)", w, k),)


@dataclass(frozen=True)
class ModelRow:
    key: str
    label: str
    path: Path
    kind: str  # "bidirectional" | "causal-teacher" (many steps, guidance) | "student" (few steps, cached)

    @property
    def many_step(self) -> bool:
        return self.kind != "student"


def model_rows(root: Path, teacher: str = "teacher") -> list[ModelRow]:
    """The rows of the paper's Table 4, in its order, and where each model lives (trainer/ablation.py);
    `teacher` is the stage of the run's final teacher (stages.common.teacher_stage)."""
    return [
        ModelRow("teacher", "bidirectional, many-step (teacher)", output(root, teacher), "bidirectional"),
        ModelRow("causal-teacher", "causal, many-step (causal teacher)", output(root, "causal-teacher"),
                 "causal-teacher"),
        ModelRow("no-ode-init", "few-step causal: no ODE init + bidirectional DMD",
                 output(variant_root(root, "no-ode-init"), "dmd"), "student"),
        ModelRow("ode-init", "few-step causal: ODE init only", output(root, "ode-init"), "student"),
        ModelRow("causal-teacher-dmd", "few-step causal: ODE init + causal-teacher DMD",
                 output(variant_root(root, "causal-teacher-dmd"), "dmd"), "student"),
        ModelRow("student", "few-step causal: ODE init + bidirectional DMD (main)", output(root, "dmd"), "student"),
    ]


@dataclass(frozen=True)
class ManyStep:
    """How the many-step rows sample: the settings of the ODE pairs the student was distilled from."""
    steps: int
    shift: float
    guidance: float
    chunk_frames: int
    contrast: float = 0.0  # attribute-contrastive guidance (ODEPairsStage.contrast) and its word groups
    contrast_words: tuple = ()
    eta: float = 0.0  # the bidirectional teacher's stochastic steps (ODEPairsStage.eta; the causal teacher's: 0)

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> "ManyStep":
        op = cfg.ode_pairs
        words = tuple(tuple(g) for g in op.contrast_words) if op.active_contrast else ()
        return cls(op.teacher_steps, student_steps(cfg)[0], op.guidance, cfg.student.chunk_frames,
                   op.active_contrast, words, op.eta)

    def negatives(self, text_encoder, prompts: list[str]) -> list[torch.Tensor]:
        return contrast_negatives(text_encoder, prompts, self.contrast, self.contrast_words)

    def nfe(self, kind: str, latent_frames: int) -> int:
        """Model evaluations per clip: a guided step costs two (plus one per contrastive rival); the
        causal teacher adds one cache write per chunk and conditioning."""
        rivals = sum(len(g) - 1 for g in self.contrast_words) if self.contrast else 0
        per_step = (2 if self.guidance != 1.0 else 1) + rivals
        if kind == "bidirectional":
            return self.steps * per_step
        return _chunks(latent_frames, self.chunk_frames) * (self.steps + 1) * per_step


def _chunks(latent_frames: int, chunk_frames: int) -> int:
    return -(-latent_frames // chunk_frames)


def student_nfe(defaults: dict, latent_frames: int) -> int:
    """Few-step rows: each chunk costs its steps plus the t = 0 pass that writes the cache."""
    return _chunks(latent_frames, defaults["chunk_frames"]) * (len(defaults["steps"]) + 1)


# ---------------------------------------------------------------------------------------------
# Generation

def clip_seed(split: str, index: int) -> int:
    return index if split == "train" else HELD_OUT_SEED + index


WHOLE_CLIP = -1  # the "chunk" of seeded_noise that draws a many-step row's stochastic steps (chunks are >= 0)


def start_noise(seed: int, chunk_frames: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The starting noise of a few-step clip with this seed (each chunk's stream.initial_noise, in
    order), so many-step rows start from exactly the noise the students start from. shape [C, F, h, w]."""
    from causvid_core.model import chunk_sizes
    from causvid_core.sampler import seeded_noise
    from causvid_core.stream import INIT_NOISE_STEP

    noise = seeded_noise(seed)
    C, F, h, w = shape
    return torch.cat([noise(c, INIT_NOISE_STEP, (1, C, n, h, w))
                      for c, n in enumerate(chunk_sizes(F, chunk_frames))], dim=2)  # [1, C, F, h, w]


@torch.no_grad()
def many_step_batch(components, kind: str, prompts: list[str], seeds: list[int], ms: ManyStep,
                    frames: int, start: Optional[torch.Tensor] = None, start_sigma: float = 1.0) -> list[np.ndarray]:
    """Many-step clips for prompts (one batch): text encoding, guided sampling, VAE decode. start [B, C, F, h, w]:
    clean latents noised to start_sigma with the seeds' noise, sampled from there (bidirectional only)."""
    from causvid_core.generate import latent_frames, latent_size
    from causvid_core.sampler import sample_bidirectional, sample_causal_teacher, seeded_noise
    from causvid_core.video_io import to_uint8

    model, text = components.model, components.text_encoder
    shape = (model.config.out_dim, latent_frames(frames, components.vae.config.time_factor),
             *latent_size(components, world.FRAME_SIZE, world.FRAME_SIZE))
    noise = torch.cat([start_noise(s, ms.chunk_frames, shape) for s in seeds])  # [B, C, F, h, w]
    cond, uncond = text.encode(prompts), text.encode([""] * len(prompts))
    rivals = dict(negatives=ms.negatives(text, prompts), contrast=ms.contrast)
    if start is not None:
        if kind != "bidirectional":
            raise ValueError("a start from noised clips is for the bidirectional teacher only")
        noise = ((1 - start_sigma) * start.double() + start_sigma * noise.double()).to(noise.dtype)
    if kind == "bidirectional":
        step_noise = None
        if ms.eta:  # each clip's fresh noise of step i from its seed alone, so batching changes nothing
            per_clip = [seeded_noise(s) for s in seeds]
            step_noise = lambda i: torch.cat([n(WHOLE_CLIP, i, (1, *shape)) for n in per_clip])  # noqa: E731
        x0, _ = sample_bidirectional(model, noise, cond, uncond, steps=ms.steps, shift=ms.shift,
                                     guidance=ms.guidance, start_sigma=start_sigma, eta=ms.eta,
                                     step_noise=step_noise, **rivals)
    else:
        x0 = sample_causal_teacher(model, noise, cond, uncond, chunk_frames=ms.chunk_frames, steps=ms.steps,
                                   shift=ms.shift, guidance=ms.guidance, **rivals)
    video = components.vae.decode(x0.float())  # [B, 3, T, H, W]
    return [to_uint8(v) for v in video]


def many_step_clips(components, kind: str, prompts: list[str], seeds: list[int], ms: ManyStep, counts: Counts,
                    desc: str) -> tuple[list[np.ndarray], list[float]]:
    """The first `timed_clips` alone (their wall time is the row's latency), the rest in batches."""
    from tqdm import tqdm

    videos, seconds = [], []
    bar = tqdm(total=len(prompts), desc=desc, disable=None)
    i = 0
    while i < len(prompts):
        n = 1 if i < counts.timed_clips else counts.teacher_batch
        t0 = time.perf_counter()
        videos += many_step_batch(components, kind, prompts[i:i + n], seeds[i:i + n], ms, counts.frames)
        if n == 1:
            seconds.append(time.perf_counter() - t0)
        bar.update(len(prompts[i:i + n]))
        i += n
    bar.close()
    return videos, seconds


def warm_up(components, kind: str, ms: ManyStep, frames: int) -> None:
    """One cheap untimed generation per model, so first-call costs (allocations, lazy imports) stay out
    of the row's times: a one-step sample for many-step rows, a whole clip for students."""
    if kind == "student":
        student_clip(components, SPEED_PROMPT, 0, frames)
    else:
        many_step_batch(components, kind, [SPEED_PROMPT], [0], dataclasses.replace(ms, steps=1), frames)


def student_clip(components, prompt: str, seed: int, frames: int, **request) -> tuple[np.ndarray, float, float]:
    """One few-step clip as `causvid generate` makes it (text encoding to decoded frames), with its
    wall time and the time to its first decoded chunk. request: image= / video= / strength=."""
    from causvid_core.generate import GenerationRequest, generate_chunks
    from causvid_core.schedule import PromptEvent
    from causvid_core.video_io import to_uint8

    req = GenerationRequest(prompts=[PromptEvent(0, prompt)], frames=frames, seed=seed, **request)
    t0 = time.perf_counter()
    out, first = [], None
    for chunk in generate_chunks(components, req, notice=lambda m: None):
        out.append(to_uint8(chunk.frames))
        first = first if first is not None else time.perf_counter() - t0
    return np.concatenate(out), time.perf_counter() - t0, first


# ---------------------------------------------------------------------------------------------
# Measurements

def _compact(result: dict, **extra) -> dict:
    """An evaluate_clip result without the parts the report never reads (keeps results.json small)."""
    keep = ("prompt", "held_out", "detected", "correct", "metrics")
    return {**{k: result[k] for k in keep}, **extra}


def prompt_sets(counts: Counts) -> list[tuple[str, int, world.ClipSpec]]:
    """(split, index, spec) for every prompt a few-step row sees: in-distribution, then held-out."""
    return ([("train", i, s) for i, s in enumerate(eval_specs(counts.n_in, "train"))]
            + [("heldout", j, s) for j, s in enumerate(eval_specs(counts.n_held, "heldout", PROMPT_SEED + 1))])


def shared(split: str, index: int, counts: Counts) -> bool:
    """Whether every row sees this prompt (the many-step rows' prefix of each split)."""
    return index < (counts.teacher_n_in if split == "train" else counts.teacher_n_held)


def shared_prefix(clips: list[dict], counts: Counts) -> list[dict]:
    return [c for c in clips if shared(c["split"], c["index"], counts)]


def evaluate_row(row: ModelRow, components, ms: ManyStep, counts: Counts, defaults: dict) -> dict:
    """Generate and judge one model's clips; many-step rows on the shared prefix only."""
    from tqdm import tqdm

    from causvid_core.generate import latent_frames

    prompts = [p for p in prompt_sets(counts) if not row.many_step or shared(p[0], p[1], counts)]
    seeds = [clip_seed(split, i) for split, i, _ in prompts]
    F = latent_frames(counts.frames, components.vae.config.time_factor)
    warm_up(components, row.kind, ms, counts.frames)
    if row.many_step:
        videos, timed = many_step_clips(components, row.kind, [s.prompt for _, _, s in prompts], seeds, ms,
                                        counts, row.key)
        first = timed  # all frames arrive together
        steps, nfe = ms.steps, ms.nfe(row.kind, F)
    else:
        videos, timed, first = [], [], []
        for (_, _, spec), seed in zip(tqdm(prompts, desc=row.key, disable=None), seeds):
            video, wall, first_s = student_clip(components, spec.prompt, seed, counts.frames)
            videos.append(video)
            timed.append(wall)
            first.append(first_s)
        steps, nfe = len(defaults["steps"]), student_nfe(defaults, F)
    clips = [_compact(E.evaluate_clip(v, spec.prompt, value_range="uint8"), split=split, index=i, seed=seed)
             for v, (split, i, spec), seed in zip(videos, prompts, seeds)]
    return dict(status="ok", label=row.label, kind=row.kind, path=str(row.path), steps=steps, nfe=nfe,
                clips=clips, summary=E.aggregate(clips), shared=E.aggregate(shared_prefix(clips, counts)),
                s_per_clip=float(np.mean(timed)), first_frames_s=float(min(first)),
                fps=counts.frames / float(min(timed)))


@torch.no_grad()
def evaluate_ceilings(components, counts: Counts) -> dict:
    """The renderer's own clips (the evaluator's ceiling) and their VAE round trip (the ceiling any
    model decoded by this VAE can reach), on the students' prompts."""
    from causvid_core.video_io import from_uint8, to_uint8

    gt, vae = [], []
    for split, i, spec in prompt_sets(counts):
        clip = world.render(spec, counts.frames)
        rt = to_uint8(components.vae.decode(components.vae.encode(from_uint8(clip))))
        gt.append(_compact(E.evaluate_clip(clip, spec.prompt, value_range="uint8"), split=split, index=i))
        vae.append(_compact(E.evaluate_clip(rt, spec.prompt, value_range="uint8"), split=split, index=i))
    return {"renderer": dict(summary=E.aggregate(gt), shared=E.aggregate(shared_prefix(gt, counts))),
            "vae": dict(summary=E.aggregate(vae), shared=E.aggregate(shared_prefix(vae, counts)), clips=vae)}


def _edge_mean(values: Sequence, count: int, last: bool) -> Optional[float]:
    part = [v for v in (values[-count:] if last else values[:count]) if v is not None]
    return float(np.mean(part)) if part else None


def run_drift(components, counts: Counts) -> dict:
    """Long streams per cache variant (the streams of `causvid eval`, eval_run._stream_frames)."""
    from tqdm import tqdm

    from causvid_core.schedule import latent_to_pixel

    cf = components.stream_defaults["chunk_frames"]
    specs = eval_specs(counts.drift_streams, "train", STREAM_PROMPT_SEED)
    out = {}
    for v in tqdm(drift_variants(components.stream_defaults), desc="drift", disable=None):
        window = v.window or counts.drift_chunks * cf  # never evicts: exactly a full cache
        runs, speed = [], []
        for j, spec in enumerate(specs):
            video, timing = _stream_frames(components, spec, counts.drift_chunks, STREAM_SEED + j, False,
                                           window, v.sinks)
            runs.append(E.evaluate_stream(video, spec.prompt, first_chunk_frames=latent_to_pixel(cf),
                                          value_range="uint8"))
            speed.append(timing)
        drift = E.aggregate_drift(runs)
        c = drift["curves"]
        edges = {f"{side}_{k}": _edge_mean(c[k], counts.drift_edge, side == "last")
                 for side in ("first", "last") for k in ("all_four", "iou", "flicker")}
        out[v.label] = dict(window=v.window, sinks=v.sinks, streams=len(runs), chunks=counts.drift_chunks,
                            drift=drift, **edges,
                            first_chunk_s=float(np.mean([s["first_chunk_s"] for s in speed])),
                            fps=float(np.mean([s["fps"] for s in speed])))
    return out


def switch_pairs(counts: Counts) -> list[tuple[str, str, str]]:
    chosen, per_kind = [], {}
    for kind, a, b in SWITCH_PAIRS:
        per_kind[kind] = per_kind.get(kind, 0) + 1
        if per_kind[kind] <= counts.switch_pairs_per_kind:
            chosen.append((kind, a, b))
    return chosen


def switch_clip(components, a: str, b: str, mode: str, seed: int, counts: Counts) -> dict:
    """A stream under prompt a, switched to b with CausalStream.set_prompt(b, mode) at a chunk boundary."""
    from causvid_core.generate import GenerationRequest, make_stream
    from causvid_core.schedule import PromptEvent
    from causvid_core.stream import run_schedule
    from causvid_core.video_io import to_uint8

    cf = components.stream_defaults["chunk_frames"]
    total = counts.chunks_before + counts.chunks_after
    frames = 1 + components.vae.config.time_factor * (total * cf - 1)
    stream = make_stream(components, GenerationRequest(prompts=[PromptEvent(0, a)], frames=frames, seed=seed))
    chunks = list(run_schedule(stream, {0: a, counts.chunks_before: b}, count=total, mode=mode))
    video = np.concatenate([to_uint8(c.frames) for c in chunks])
    switch = chunks[counts.chunks_before].first_pixel_frame
    return E.evaluate_schedule(video, [(0, a), (switch, b)], value_range="uint8")


def run_switches(components, counts: Counts) -> dict:
    """Every pair x seed x mode; summarised per mode and changed attribute."""
    from tqdm import tqdm

    jobs = [(kind, a, b, mode, s) for kind, a, b in switch_pairs(counts) for s in range(counts.switch_seeds)
            for mode in SWITCH_MODES]
    cases = []
    for kind, a, b, mode, s in tqdm(jobs, desc="switches", disable=None):
        r = switch_clip(components, a, b, mode, SWITCH_SEED + s, counts)
        before, after, sw = r["segments"][0], r["segments"][1], r["switches"][0]
        cases.append(dict(kind=kind, mode=mode, before=a, after=b, seed=SWITCH_SEED + s, switch_frame=sw["frame"],
                          before_all_four=before["correct"]["all_four"], after_all_four=after["correct"]["all_four"],
                          after_changed=after["correct"][kind], switched=sw["switched"],
                          latency_frames=sw["latency_frames"], jump_px=sw["jump_px"],
                          continuous=sw["continuous"]))
    summary = {}
    for mode in SWITCH_MODES:
        for kind in dict.fromkeys(c["kind"] for c in cases):
            sel = [c for c in cases if c["mode"] == mode and c["kind"] == kind]
            summary[f"{mode}/{kind}"] = _switch_summary(sel, mode, kind)
        summary[f"{mode}/all"] = _switch_summary([c for c in cases if c["mode"] == mode], mode, "all")
    return dict(cases=cases, summary=summary, chunks_before=counts.chunks_before, chunks_after=counts.chunks_after)


def _rate(values) -> Optional[float]:
    v = [float(x) for x in values if x is not None]
    return float(np.mean(v)) if v else None


def _switch_summary(cases: list[dict], mode: str, kind: str) -> dict:
    return dict(mode=mode, kind=kind, n=len(cases),
                before_all_four=_rate(c["before_all_four"] for c in cases),
                after_all_four=_rate(c["after_all_four"] for c in cases),
                after_changed=_rate(c["after_changed"] for c in cases),
                switched=_rate(c["switched"] for c in cases),
                latency_frames=_rate(c["latency_frames"] for c in cases),
                jump_px=_rate(c["jump_px"] for c in cases),
                jump_measured=sum(c["jump_px"] is not None for c in cases),
                continuous=_rate(c["continuous"] for c in cases))


def psnr(a: np.ndarray, b: np.ndarray) -> Optional[float]:
    """dB between uint8 images/clips; None when identical."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return None if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def run_i2v(components, counts: Counts) -> dict:
    """Image-to-video from the first rendered frame of a spec, with the spec's prompt."""
    from tqdm import tqdm

    from causvid_core.schedule import latent_to_pixel

    first_chunk = latent_to_pixel(components.stream_defaults["chunk_frames"])
    cases = []
    for i, spec in enumerate(tqdm(eval_specs(counts.i2v_clips, "train", I2V_PROMPT_SEED), desc="i2v", disable=None)):
        gt = world.render(spec, counts.frames)
        video, wall, _ = student_clip(components, spec.prompt, I2V_SEED + i, counts.frames, image=gt[0])
        r = E.evaluate_clip(video, spec.prompt, value_range="uint8")
        cases.append(_compact(r, seed=I2V_SEED + i, frames=len(video), psnr_first=psnr(video[0], gt[0]),
                              mad_first=float(np.abs(video[0].astype(float) - gt[0]).mean()),
                              psnr_first_chunk=psnr(video[:first_chunk], gt[:first_chunk]), seconds=wall))
    return dict(cases=cases, n=len(cases), all_four=_rate(c["correct"]["all_four"] for c in cases),
                psnr_first=_rate(c["psnr_first"] for c in cases), mad_first=_rate(c["mad_first"] for c in cases),
                psnr_first_chunk=_rate(c["psnr_first_chunk"] for c in cases), first_chunk_frames=first_chunk,
                frames_kept=_rate(c["frames"] == counts.frames for c in cases))


def new_colour(spec: world.ClipSpec, index: int) -> str:
    """A different colour for the restyle that never makes a held-out pair (deterministic by index)."""
    options = [c for c in world.COLOURS if c != spec.colour and (c, spec.shape) not in world.HELD_OUT_PAIRS]
    return options[index % len(options)]


def run_v2v(components, counts: Counts) -> dict:
    """Video-to-video: a rendered clip restyled by a prompt that changes only the colour."""
    from tqdm import tqdm

    specs = eval_specs(counts.v2v_clips, "train", V2V_PROMPT_SEED)
    jobs = [(i, spec, s) for s in counts.v2v_strengths for i, spec in enumerate(specs)]
    cases = []
    for i, spec, strength in tqdm(jobs, desc="v2v", disable=None):
        src = world.render(spec, counts.frames)
        target = dataclasses.replace(spec, colour=new_colour(spec, i))
        video, wall, _ = student_clip(components, target.prompt, V2V_SEED + i, counts.frames, video=src,
                                      strength=strength)
        r = E.evaluate_clip(video, target.prompt, value_range="uint8")
        ok = r["correct"]
        cases.append(_compact(r, strength=strength, seed=V2V_SEED + i, source_colour=spec.colour,
                              frames=len(video), seconds=wall,
                              restyled=bool(ok["colour"] and ok["shape"] and ok["motion"]),
                              kept_old_colour=r["detected"]["colour"] == spec.colour))
    by_strength = {}
    for s in counts.v2v_strengths:
        sel = [c for c in cases if c["strength"] == s]
        by_strength[str(s)] = dict(
            strength=s, n=len(sel), restyled=_rate(c["restyled"] for c in sel),
            colour_new=_rate(c["correct"]["colour"] for c in sel),
            shape_kept=_rate(c["correct"]["shape"] for c in sel),
            motion_kept=_rate(c["correct"]["motion"] for c in sel),
            kept_old_colour=_rate(c["kept_old_colour"] for c in sel),
            frames_kept=_rate(c["frames"] == counts.frames for c in sel))
    return dict(cases=cases, by_strength=by_strength)


@torch.no_grad()
def as_published(components):
    """Round the DiT's and the VAE's weights through the built-in files' dtype (publish.STORED_DTYPE), in place:
    every row measures its model as `causvid-train publish` would ship it, not the run's float32 file."""
    for module in (components.model, components.vae):
        for t in module.state_dict().values():
            if t.is_floating_point():
                t.copy_(t.to(STORED_DTYPE).to(t.dtype))
    return components


def measure_speed(components, counts: Counts) -> dict:
    """`causvid generate` of one clip end to end, best of `speed_repeats` after a warm-up."""
    student_clip(components, SPEED_PROMPT, 0, counts.frames)  # warm-up: allocator, first-call paths
    runs = [student_clip(components, SPEED_PROMPT, 0, counts.frames)[1:] for _ in range(counts.speed_repeats)]
    wall, first = min(runs)
    fps = counts.frames / wall
    return dict(frames=counts.frames, seconds=wall, first_chunk_s=first, fps=fps, world_fps=world.FPS,
                video_seconds=counts.frames / world.FPS, realtime_factor=fps / world.FPS,
                repeats=counts.speed_repeats, all_runs=[list(r) for r in runs])


# ---------------------------------------------------------------------------------------------
# The run

def main_files(root: Path, cfg: TrainConfig) -> tuple[Path, Path, dict]:
    """RUN/vae.safetensors, RUN/text.safetensors and the students' stream settings (RUN/student.safetensors
    metadata; the config's when the export is missing)."""
    from causvid_core.pipeline import stream_defaults_of

    from .stages.export import stream_settings

    vae, text = root / "vae.safetensors", root / "text.safetensors"
    for p in (vae, text):
        if not p.exists():
            raise FileNotFoundError(f"{p} is missing: run `causvid-train export --out {root}` (or the pipeline) first")
    if not output(root, "dmd").exists():
        raise FileNotFoundError(f"{output(root, 'dmd')} is missing: the main student is needed; "
                                f"run `causvid-train pipeline --out {root}` first")
    student = root / "student.safetensors"
    defaults = stream_defaults_of(student) if student.exists() else {}
    return vae, text, defaults or stream_settings(cfg)


def machine() -> dict:
    return dict(cores=os.cpu_count(), torch=torch.__version__, torch_threads=torch.get_num_threads(),
                python=platform.python_version(), platform=platform.platform(), load_start=load_average())


def system_cpu_s() -> Optional[float]:
    """CPU seconds every process on the machine has used since boot (Linux /proc/stat), None elsewhere."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    busy = sum(fields[:8]) - fields[3] - (fields[4] if len(fields) > 4 else 0)  # all but idle and iowait
    return busy / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    """CPU seconds this process (and its children) used."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def other_cores(start: tuple[Optional[float], float, float]) -> Optional[float]:
    """Cores other processes kept busy on average since `start` = (system_cpu_s(), own_cpu_s(), perf_counter()):
    the run's own threads excluded, unlike the load average (which a 2-thread run on 2 cores pushes to 2)."""
    system, own, t0 = start
    now = system_cpu_s()
    if system is None or now is None:
        return None
    wall = max(time.perf_counter() - t0, 1e-9)
    return round(max(0.0, (now - system) - (own_cpu_s() - own)) / wall, 2)


def load_average() -> Optional[float]:
    """1-minute load average: times taken beside other jobs (training) understate this machine."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:  # not available on this platform
        return None


def git_commit() -> str:
    """Short HEAD, marked when causvid_core/ or trainer/ differ from it (the numbers are then not of HEAD)."""
    repo = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "causvid_core", "trainer"], cwd=repo).returncode
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return head + (" (with uncommitted changes to causvid_core/ or trainer/)" if dirty else "")


def run_results(cfg: TrainConfig, root: str | Path, doc: str | Path | None = None, quick: bool = False,
                log: Callable[[str], None] = print) -> dict:
    """Measure everything, then write doc, doc's results/*.png and results/results.json (atomically)."""
    from causvid_core.pipeline import load_components

    t_start = time.perf_counter()
    cpu_start = (system_cpu_s(), own_cpu_s(), t_start)
    root = Path(root)
    doc = Path(doc) if doc else DEFAULT_DOC
    counts = QUICK if quick else FULL
    vae, text, defaults = main_files(root, cfg)
    ms = ManyStep.from_config(cfg)
    res = dict(preset=cfg.name, run=str(root), quick=quick, counts=dataclasses.asdict(counts),
               targets=dataclasses.asdict(Targets()), many_step=dataclasses.asdict(ms), stream_defaults=defaults,
               seeds=dict(prompt_seed=PROMPT_SEED, held_out_prompt_seed=PROMPT_SEED + 1,
                          held_out_seed=HELD_OUT_SEED,  # clip seeds: in-dist prompt i -> i, held-out j -> this + j
                          stream_prompt_seed=STREAM_PROMPT_SEED, stream_seed=STREAM_SEED, switch_seed=SWITCH_SEED,
                          i2v_prompt_seed=I2V_PROMPT_SEED, i2v_seed=I2V_SEED, v2v_prompt_seed=V2V_PROMPT_SEED,
                          v2v_seed=V2V_SEED),
               commit=git_commit(), machine=machine(),
               date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), timings={})

    def timed(name: str, fn, *args):
        t0 = time.perf_counter()
        log(f"[results] {name} ...")
        out = fn(*args)
        res["timings"][name] = round(time.perf_counter() - t0, 1)
        log(f"[results] {name}: {res['timings'][name]:.1f} s")
        return out

    rows = {}
    main = None
    for row in model_rows(root, teacher_stage(cfg)):
        if not row.path.exists():
            rows[row.key] = dict(status="not trained", label=row.label, kind=row.kind, path=str(row.path))
            continue
        components = as_published(load_components(row.path, vae, text))
        components.stream_defaults = dict(defaults)  # ablation files may lack them: all students alike
        rows[row.key] = timed(row.key, evaluate_row, row, components, ms, counts, defaults)
        if row.key == "student":
            main = components
    res["rows"] = rows
    res["training"] = stage_seconds(cfg, root)
    res["training_restored"] = restored_stages(cfg, root)
    res["ceilings"] = timed("ceilings", evaluate_ceilings, main, counts)
    res["speed"] = timed("speed", measure_speed, main, counts)
    res["drift"] = timed("drift", run_drift, main, counts)
    res["switches"] = timed("switches", run_switches, main, counts)
    res["i2v"] = timed("i2v", run_i2v, main, counts)
    res["v2v"] = timed("v2v", run_v2v, main, counts)
    res["wall_s"] = round(time.perf_counter() - t_start, 1)
    res["machine"]["load_end"] = load_average()
    res["machine"]["other_cores"] = other_cores(cpu_start)
    res["chunk_pixel_frames"] = main.vae.config.time_factor * defaults["chunk_frames"]
    res["weak"] = weak_points(res)
    write_outputs(res, doc, root)
    log(f"[results] wrote {doc} and {doc.parent / 'results'} in {res['wall_s']:.0f} s")
    return res


