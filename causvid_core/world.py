"""Shapes World v1: renderer and clip sampler (docs: /work/shared/specs/shapes-world.md).

One coloured shape moves at constant velocity over a solid background on a 64x64 torus. Every clip
is a pure function of a `ClipSpec`, and every random choice comes from a caller's numpy Generator,
so a seed fixes a clip bit for bit. Changing anything here that changes pixels or the order of
random draws is a new world version (v2), never a silent edit.

Coordinates: continuous pixel units, x to the right and y down; pixel (row j, column i) covers
[i, i+1) x [j, j+1), so its centre is (i + 0.5, j + 0.5). Frames are uint8 [T, H, W, 3] (RGB,
channels last). numpy only: the trainer and the nodes convert to torch themselves.
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np

WORLD_VERSION = "v1"
FRAME_SIZE = 64  # H = W = torus period, pixels
FPS = 16
CLIP_FRAMES = 33  # 4k+1: 9 latent frames for a Wan-style VAE with 4x temporal compression
LONG_CLIP_FRAMES = 81
SUPERSAMPLE = 4  # samples per pixel per axis: 4x4 = 16 per pixel
RENDER_CHUNK = 32  # frames rendered per vectorised step: bounds memory to ~20 MB per step

# The order of these tables is part of v1: sampling draws indices into them.
BACKGROUNDS = MappingProxyType({
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
    "navy": (20, 30, 90),
    "forest": (20, 70, 30),
})
COLOURS = MappingProxyType({
    "red": (220, 40, 40),
    "green": (40, 190, 70),
    "blue": (60, 100, 240),
    "yellow": (240, 220, 50),
    "magenta": (220, 60, 220),
    "cyan": (50, 210, 220),
    "white": (245, 245, 245),
    "orange": (245, 140, 40),
})
SHAPES = ("circle", "square", "triangle")
MOTIONS = MappingProxyType({  # name -> unit direction (ux, uy), image y down
    "moving left": (-1, 0),
    "moving right": (1, 0),
    "moving up": (0, -1),
    "moving down": (0, 1),
    "staying still": (0, 0),
})
# Colour-shape pairs the training split never shows (compositional generalisation).
HELD_OUT_PAIRS = (("magenta", "triangle"), ("cyan", "square"), ("orange", "circle"))
RADIUS_RANGE = (7.0, 11.0)  # pixels, uniform
SPEED_RANGE = (1.0, 2.0)  # pixels per frame, uniform
SPLITS = ("train", "heldout", "any")
PROMPT_TEMPLATE = "a {colour} {shape} {motion} on a {background} background"

_SQRT3 = math.sqrt(3.0)
_MAX_RADIUS = FRAME_SIZE / 2  # below this no two torus copies can touch (see _torus_delta)


@dataclass(frozen=True)
class ClipSpec:
    """Everything that determines a clip. Position at frame n: (x0, y0) + velocity * n, mod 64."""
    colour: str
    shape: str
    motion: str
    background: str
    radius: float  # circle radius / square half-side / triangle circumradius, pixels
    speed: float  # pixels per frame (ignored by "staying still")
    x0: float  # centre at frame 0, pixels
    y0: float

    def __post_init__(self) -> None:
        for field_name, table in (("colour", COLOURS), ("shape", SHAPES), ("motion", MOTIONS),
                                  ("background", BACKGROUNDS)):
            value = getattr(self, field_name)
            if value not in table:
                raise ValueError(f"unknown {field_name} {value!r}; expected one of {', '.join(table)}")
        if not 0.0 < self.radius < _MAX_RADIUS:
            raise ValueError(f"radius must be in (0, {_MAX_RADIUS}) pixels, got {self.radius}")
        if self.speed < 0.0:
            raise ValueError(f"speed must be >= 0 pixels per frame, got {self.speed}")

    @property
    def prompt(self) -> str:
        return PROMPT_TEMPLATE.format(colour=self.colour, shape=self.shape, motion=self.motion,
                                      background=self.background)

    @property
    def velocity(self) -> tuple[float, float]:
        """(dx, dy) in pixels per frame."""
        ux, uy = MOTIONS[self.motion]
        return (ux * self.speed, uy * self.speed)

    @property
    def held_out(self) -> bool:
        return (self.colour, self.shape) in HELD_OUT_PAIRS


# ---------------------------------------------------------------------------------------------
# Sampling

def _pairs(split: str) -> list[tuple[str, str]]:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if split == "heldout":
        return list(HELD_OUT_PAIRS)
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    return pairs if split == "any" else [p for p in pairs if p not in HELD_OUT_PAIRS]


def _sample_geometry(rng: np.random.Generator) -> dict[str, float]:
    """The non-text attributes, drawn in this order: radius, speed, x0, y0."""
    radius = float(rng.uniform(*RADIUS_RANGE))
    speed = float(rng.uniform(*SPEED_RANGE))
    x0 = float(rng.uniform(0.0, FRAME_SIZE))
    y0 = float(rng.uniform(0.0, FRAME_SIZE))
    return dict(radius=radius, speed=speed, x0=x0, y0=y0)


def sample_spec(rng: np.random.Generator, split: str = "train") -> ClipSpec:
    """A random clip. Draw order: (colour, shape) pair uniform over the split's allowed pairs,
    motion, background, then radius, speed, x0, y0 (`_sample_geometry`).

    split: "train" = all pairs but HELD_OUT_PAIRS, "heldout" = only HELD_OUT_PAIRS, "any" = all.
    """
    pairs = _pairs(split)
    colour, shape = pairs[int(rng.integers(len(pairs)))]
    motion = tuple(MOTIONS)[int(rng.integers(len(MOTIONS)))]
    background = tuple(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    return ClipSpec(colour, shape, motion, background, **_sample_geometry(rng))


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def parse_prompt(text: str) -> dict[str, str | None]:
    """Attributes named in any text: {"colour", "shape", "motion", "background"} -> name or None.

    Tolerant by design (tokenizer and evaluator use it): case and punctuation are ignored, words
    outside the vocabulary are skipped, the first match of each attribute wins. Motions match only
    as their two-word phrases ("moving left", "staying still"), because a lone "right" or "still"
    is too often not a motion.
    """
    words = _words(text)
    found: dict[str, str | None] = dict(colour=None, shape=None, motion=None, background=None)

    def first(key: str, value: str) -> None:
        if found[key] is None:
            found[key] = value

    for i, word in enumerate(words):
        if word in COLOURS:
            first("colour", word)
        elif word in SHAPES:
            first("shape", word)
        elif word in BACKGROUNDS:
            first("background", word)
        if i + 1 < len(words) and f"{word} {words[i + 1]}" in MOTIONS:
            first("motion", f"{word} {words[i + 1]}")
    return found


def spec_from_prompt(prompt: str, rng: np.random.Generator) -> ClipSpec:
    """Strictly parse a template prompt (any case, any whitespace, an optional final '.') and draw
    radius, speed and start position from rng. Held-out pairs are accepted: this is how they are
    evaluated. Raises ValueError naming the offending word."""
    words = prompt.strip().rstrip(".").lower().split()
    template = PROMPT_TEMPLATE.split()  # a {colour} {shape} {motion} on a {background} background
    if len(words) != len(template) + 1:  # +1: the motion is two words
        raise ValueError(f"prompt {prompt!r} does not follow the template '{PROMPT_TEMPLATE}'")
    colour, shape, motion, background = words[1], words[2], f"{words[3]} {words[4]}", words[7]
    for index, expected in ((0, "a"), (5, "on"), (6, "a"), (8, "background")):
        if words[index] != expected:
            raise ValueError(f"expected {expected!r} as word {index + 1} of prompt {prompt!r}, "
                             f"got {words[index]!r} (template: '{PROMPT_TEMPLATE}')")
    for name, value, table in (("colour", colour, COLOURS), ("shape", shape, SHAPES),
                               ("motion", motion, MOTIONS), ("background", background, BACKGROUNDS)):
        if value in table:
            continue
        if name == "motion":  # name the word that breaks the two-word phrase
            value = words[3] if words[3] not in {m.split()[0] for m in MOTIONS} else words[4]
        raise ValueError(f"unknown {name} word {value!r} in prompt {prompt!r}; "
                         f"expected one of {', '.join(table)}")
    return ClipSpec(colour, shape, motion, background, **_sample_geometry(rng))


# ---------------------------------------------------------------------------------------------
# Rendering

def positions(spec: ClipSpec, frames: np.ndarray) -> np.ndarray:
    """Object centres at integer frame indices: [T] -> [T, 2] float64 (x, y), wrapped into [0, 64).

    Computed from the absolute frame index (never accumulated), so any start frame gives the same
    value for the same frame."""
    frames = np.asarray(frames, dtype=np.float64)  # [T]
    dx, dy = spec.velocity
    xy = np.stack([spec.x0 + dx * frames, spec.y0 + dy * frames], axis=-1)  # [T, 2]
    xy = np.mod(xy, FRAME_SIZE)
    return np.where(xy >= FRAME_SIZE, xy - FRAME_SIZE, xy)  # mod of a tiny negative can give 64.0


def _torus_delta(d: np.ndarray) -> np.ndarray:
    """Displacement d in (-64, 64) to the nearest torus copy, in [-32, 32].

    Equivalent to drawing the object at every offset in {-64, 0, 64}^2: along each axis only the
    nearest copy can reach within radius < 32 of a sample point. The +-64 is exact in floating
    point (Sterbenz), so the result is bit-identical to the explicit offset."""
    return np.where(d > FRAME_SIZE / 2, d - FRAME_SIZE, np.where(d < -FRAME_SIZE / 2, d + FRAME_SIZE, d))


def _half_width(shape: str, v: np.ndarray, r: float) -> np.ndarray:
    """Half-width in x of the shape on the sample row at vertical offset v from the centre; rows
    outside the shape get -1 so no |u| fits. Every v1 shape is convex, so each row is one interval."""
    empty = -1.0
    if shape == "circle":  # u^2 + v^2 <= r^2
        return np.where(np.abs(v) <= r, np.sqrt(np.maximum(r * r - v * v, 0.0)), empty)
    if shape == "square":  # |u| <= r, |v| <= r
        return np.where(np.abs(v) <= r, r, empty)
    if shape == "triangle":
        # vertices (0, -r), (-sqrt(3)/2 r, r/2), (+sqrt(3)/2 r, r/2): base v <= r/2, and the two
        # sides sqrt(3)/2 |u| - v/2 <= r/2 (inradius r/2), i.e. |u| <= (r + v) / sqrt(3)
        return np.where(v <= r / 2, (r + v) / _SQRT3, empty)  # v < -r gives a negative width
    raise ValueError(f"unknown shape {shape!r}")


def _coverage_counts(spec: ClipSpec, frames: np.ndarray) -> np.ndarray:
    """Covered supersamples per pixel: frames [T] -> uint8 [T, 64, 64] in 0..SUPERSAMPLE^2."""
    t, s, n = len(frames), SUPERSAMPLE, FRAME_SIZE
    samples = (np.arange(n * s) + 0.5) / s  # [S] sample centres of the 256-grid, in pixels
    xy = positions(spec, frames)  # [T, 2]
    u = np.abs(_torus_delta(samples[None, :] - xy[:, 0:1]))  # [T, S] |x offset| per sample column
    v = _torus_delta(samples[None, :] - xy[:, 1:2])  # [T, S] y offset per sample row
    w = _half_width(spec.shape, v, float(spec.radius))  # [T, S]
    inside = u[:, None, :] <= w[:, :, None]  # [T, S(y), S(x)]
    inside = inside.reshape(t, n, s, n, s).view(np.uint8)  # [T, H, s, W, s]
    return inside.sum(axis=(2, 4), dtype=np.uint8)  # [T, H, W]


def _composite(spec: ClipSpec, counts: np.ndarray) -> np.ndarray:
    """uint8 counts [T, H, W] -> uint8 RGB [T, H, W, 3].

    colour = background * (1 - c) + object * c with c = count / 16, rounded half up. Done in exact
    integer arithmetic, (bg * (16 - k) + obj * k + 8) // 16, so no platform rounding can differ."""
    total = SUPERSAMPLE * SUPERSAMPLE
    k = counts.astype(np.int32)[..., None]  # [T, H, W, 1]
    bg = np.asarray(BACKGROUNDS[spec.background], dtype=np.int32)  # [3]
    obj = np.asarray(COLOURS[spec.colour], dtype=np.int32)  # [3]
    return ((bg * (total - k) + obj * k + total // 2) // total).astype(np.uint8)


def iter_coverage(spec: ClipSpec, start_frame: int = 0, chunk: int = RENDER_CHUNK,
                  num_frames: int | None = None) -> Iterator[np.ndarray]:
    """Object coverage in [0, 1], float32 [c, 64, 64] per chunk; endless if num_frames is None."""
    for frames in _frame_chunks(start_frame, chunk, num_frames):
        yield _coverage_counts(spec, frames).astype(np.float32) / (SUPERSAMPLE * SUPERSAMPLE)


def coverage(spec: ClipSpec, num_frames: int, start_frame: int = 0) -> np.ndarray:
    """Object coverage in [0, 1] (exact multiples of 1/16): float32 [T, 64, 64]."""
    return _concat(iter_coverage(spec, start_frame, num_frames=num_frames), (FRAME_SIZE, FRAME_SIZE),
                   np.float32)


def iter_frames(spec: ClipSpec, start_frame: int = 0, chunk: int = RENDER_CHUNK,
                num_frames: int | None = None) -> Iterator[np.ndarray]:
    """Stream a clip as uint8 [c, 64, 64, 3] chunks of `chunk` frames (the last may be shorter).
    Endless if num_frames is None; memory stays bounded by one chunk."""
    for frames in _frame_chunks(start_frame, chunk, num_frames):
        yield _composite(spec, _coverage_counts(spec, frames))


def render(spec: ClipSpec, num_frames: int, start_frame: int = 0) -> np.ndarray:
    """Frames start_frame .. start_frame + num_frames - 1: uint8 [T, 64, 64, 3].

    Each frame depends only on its absolute index, so
    render(spec, n, start_frame=k) == render(spec, n + k)[k:] exactly."""
    return _concat(iter_frames(spec, start_frame, num_frames=num_frames),
                   (FRAME_SIZE, FRAME_SIZE, 3), np.uint8)


def _frame_chunks(start_frame: int, chunk: int, num_frames: int | None) -> Iterator[np.ndarray]:
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1 frame, got {chunk}")
    if num_frames is not None and num_frames < 0:
        raise ValueError(f"num_frames must be >= 0, got {num_frames}")
    begin, end = int(start_frame), None if num_frames is None else int(start_frame) + int(num_frames)
    while end is None or begin < end:
        stop = begin + chunk if end is None else min(begin + chunk, end)
        yield np.arange(begin, stop)
        begin = stop


def _concat(chunks: Iterator[np.ndarray], frame_shape: tuple[int, ...], dtype: type) -> np.ndarray:
    parts = list(chunks)
    return np.concatenate(parts) if parts else np.zeros((0, *frame_shape), dtype=dtype)


# ---------------------------------------------------------------------------------------------
# Convenience

def to_unit_range(frames: np.ndarray) -> np.ndarray:
    """uint8 [..., H, W, 3] -> float32 in [-1, 1], same layout (channels last): x / 127.5 - 1."""
    return frames.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def from_unit_range(frames: np.ndarray) -> np.ndarray:
    """Inverse of to_unit_range: float in [-1, 1] (clipped) -> uint8, rounded to nearest."""
    x = (np.clip(np.asarray(frames, dtype=np.float32), -1.0, 1.0) + 1.0) * 127.5
    return np.rint(x).astype(np.uint8)


def make_clip(seed: int, num_frames: int = CLIP_FRAMES,
              split: str = "train") -> tuple[ClipSpec, np.ndarray]:
    """(spec, uint8 frames [T, 64, 64, 3]) fixed by the seed: default_rng(seed) -> sample_spec."""
    spec = sample_spec(np.random.default_rng(seed), split)
    return spec, render(spec, num_frames)
