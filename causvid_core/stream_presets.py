"""Stream settings of the published causal Wan models, by name, and recognised from a checkpoint's file name.

A frame-wise model run in 3-frame chunks, or Krea's model run without its cache recomputation, makes the
wrong video without an error: the architecture and the weights' keys are the same for all of them, so the
settings come from the file (our safetensors carry them in metadata), from its name, or from a preset named
by the user (LoadCausalModel's `preset`, `causvid ... --stream-preset`). shared/reference/causal-wan.md and
shared/parity/README.md give each system's settings.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

from .flow import FlowGrid, step_preset

_SF_SHIFT, _SF_STEPS = step_preset("self-forcing-4step")  # 1000, 750, 500, 250 warped at shift 5
_CV_SHIFT, _CV_STEPS = step_preset("causvid-4step")

STREAM_PRESETS: dict[str, dict] = {
    "causvid": {"chunk_frames": 3, "steps": _CV_STEPS, "shift": _CV_SHIFT},
    "self-forcing": {"chunk_frames": 3, "steps": _SF_STEPS, "shift": _SF_SHIFT},
    # LongLive: Self-Forcing's sampler, a short window with sink frames, prompts switched by recaching
    "longlive": {"chunk_frames": 3, "steps": _SF_STEPS, "shift": _SF_SHIFT, "window_frames": 12, "sink_frames": 3,
                 "switch_mode": "recache"},
    # Causal Forcing: frame-wise students (1 latent frame a chunk) in 4, 2 or 1 steps, the few-step ones with
    # the 4-step list for their first chunk; a chunk-wise student like Self-Forcing's
    "causal-forcing-framewise": {"chunk_frames": 1, "steps": _SF_STEPS, "shift": _SF_SHIFT},
    "causal-forcing-framewise-2step": {"chunk_frames": 1, "steps": FlowGrid(_SF_SHIFT).warped_steps([1000, 500]),
                                       "shift": _SF_SHIFT, "first_chunk_steps": _SF_STEPS},
    "causal-forcing-framewise-1step": {"chunk_frames": 1, "steps": [1000.0], "shift": _SF_SHIFT,
                                       "first_chunk_steps": _SF_STEPS},
    "causal-forcing-chunkwise": {"chunk_frames": 3, "steps": _SF_STEPS, "shift": _SF_SHIFT},
    # Krea Realtime 14B: 4 steps and a last one at t = 0, the cache rebuilt before every chunk from the
    # first frame and the last 2 (its server's kv_cache_num_frames = 3)
    "krea-realtime": {"chunk_frames": 3, "steps": [*_SF_STEPS, 0.0], "shift": _SF_SHIFT, "kv_recompute_frames": 3},
}

# (pattern over the lower-cased file and folder name, preset); the first match wins
_NAME_RULES: tuple[tuple[str, str], ...] = (
    (r"krea", "krea-realtime"),
    (r"causal[_-]?forcing.*chunk|chunk.*causal[_-]?forcing", "causal-forcing-chunkwise"),
    (r"causal[_-]?forcing.*(1[_-]?step)", "causal-forcing-framewise-1step"),
    (r"causal[_-]?forcing.*(2[_-]?step)", "causal-forcing-framewise-2step"),
    (r"causal[_-]?forcing", "causal-forcing-framewise"),
    (r"longlive", "longlive"),
    (r"self[_-]?forcing", "self-forcing"),
    (r"causvid", "causvid"),
)


def stream_preset(name: str) -> dict:
    """The StreamSettings fields of a named preset (a copy)."""
    try:
        preset = STREAM_PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown stream preset {name!r}; choose one of {', '.join(STREAM_PRESETS)}") from None
    return {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in preset.items()}


def preset_for_file(path: str | Path) -> Optional[str]:
    """The preset a checkpoint's name points to (its file name, then its folder's), or None."""
    p = Path(path)
    for text in (p.name.lower(), p.parent.name.lower()):
        for pattern, name in _NAME_RULES:
            if re.search(pattern, text):
                return name
    return None
