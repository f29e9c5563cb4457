"""`causvid eval`: generate Shapes World clips with a model and judge them from pixels.

Prompts come from the world's sampler with fixed seeds, split into in-distribution and held-out
colour-shape pairs; each clip's seed is its index. Long streams (a rolling window with sinks) give
the drift curve. `ground_truth=True` scores the renderer's own clips instead, the evaluator's
sanity check (about 100%)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from . import evaluate as E
from . import world

PROMPT_SEED = 20261122  # fixed: every evaluation of every model sees the same prompts


def eval_specs(n: int, split: str, seed: int = PROMPT_SEED) -> list[world.ClipSpec]:
    return [world.sample_spec(np.random.default_rng([seed, i]), split) for i in range(n)]


def _clip_frames(components, spec: world.ClipSpec, frames: int, seed: int, ground_truth: bool) -> np.ndarray:
    if ground_truth:
        return world.render(spec, frames)
    from .generate import GenerationRequest, generate_video
    from .schedule import PromptEvent
    req = GenerationRequest(prompts=[PromptEvent(0, spec.prompt)], frames=frames, seed=seed)
    return generate_video(components, req, notice=lambda m: None)


def _stream_frames(components, spec: world.ClipSpec, chunks: int, seed: int, ground_truth: bool,
                   window: int, sinks: int) -> tuple[np.ndarray, dict]:
    if ground_truth:
        return world.render(spec, 9 + 12 * (chunks - 1)), {}
    from .generate import latent_size
    from .stream import CausalStream, StreamSettings
    from .video_io import to_uint8
    fields = {**components.stream_defaults, "window_frames": window, "sink_frames": sinks, "seed": seed}
    fields.pop("max_frames", None)
    stream = CausalStream(components.model, StreamSettings.from_fields(fields),
                          latent_hw=latent_size(components, 64, 64), vae=components.vae,
                          text_encoder=components.text_encoder)
    t0 = time.perf_counter()
    stream.set_prompt(spec.prompt)
    out, first = [], None
    for chunk in stream.chunks(chunks):
        out.append(to_uint8(chunk.frames))
        first = first or time.perf_counter() - t0
    wall = time.perf_counter() - t0
    video = np.concatenate(out)
    return video, {"first_chunk_s": round(first, 3), "fps": round(len(video) / wall, 1)}


def evaluate_model(components=None, *, n_in: int = 24, n_held: int = 12, frames: int = 33,
                   streams: int = 2, stream_chunks: int = 40, window: int = 12, sinks: int = 3,
                   ground_truth: bool = False, out: Optional[str | Path] = None,
                   progress: Callable[[str], None] = lambda m: None) -> dict:
    """Clips for n_in in-distribution and n_held held-out prompts, and `streams` long streams."""
    from tqdm import tqdm

    specs = eval_specs(n_in, "train") + eval_specs(n_held, "heldout", PROMPT_SEED + 1)
    results = []
    for i, spec in enumerate(tqdm(specs, desc="clips", disable=None)):
        results.append(E.evaluate_clip(_clip_frames(components, spec, frames, i, ground_truth), spec.prompt,
                                       value_range="uint8"))
    summary = E.aggregate(results)
    drift_runs, speed = [], []
    for j, spec in enumerate(eval_specs(streams, "train", PROMPT_SEED + 2)):
        video, timing = _stream_frames(components, spec, stream_chunks, 1000 + j, ground_truth, window, sinks)
        drift_runs.append(E.evaluate_stream(video, spec.prompt, first_chunk_frames=9, value_range="uint8"))
        if timing:
            speed.append(timing)
    drift = E.aggregate_drift(drift_runs) if drift_runs else None
    extra = {"speed": {k: round(float(np.mean([s[k] for s in speed])), 3) for k in speed[0]} if speed else None,
             "setup": dict(n_in=n_in, n_held=n_held, frames=frames, streams=streams, stream_chunks=stream_chunks,
                           window=window, sinks=sinks, ground_truth=ground_truth, prompt_seed=PROMPT_SEED)}
    if out is not None:
        E.write_report(out, summary, drift, clips=results, extra=extra)
    return {"summary": summary, "drift": drift, "clips": results, **extra}
