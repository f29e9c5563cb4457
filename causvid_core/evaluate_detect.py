"""Shapes World evaluator, stage 1: per-frame measurements from pixels alone (no prompt involved).

`measure(frames)` turns a clip into `FrameStats`: per frame the background colour, the object's
colour, coverage-weighted area and torus centroid, and the IoU of the object with each shape's
rendered template. Stage 2 (`evaluate.py`) reduces any frame range of these arrays against a prompt,
so a clip, each chunk of a long stream and each segment of a prompt schedule share one pass.

Units: colours and colour distances in 0..255 RGB (Euclidean); positions in pixels, x right, y down,
pixel (row j, column i) centred at (i + 0.5, j + 0.5) as in world.py; T frames, H = W = 64.
Everything is vectorised over frames with numpy and deterministic (no random draws).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import world

N = world.FRAME_SIZE  # torus period, pixels
OBJECT_RGB = np.array(list(world.COLOURS.values()), dtype=np.float32)  # [8, 3]
BACKGROUND_RGB = np.array(list(world.BACKGROUNDS.values()), dtype=np.float32)  # [4, 3]
COLOUR_NAMES = tuple(world.COLOURS)
BACKGROUND_NAMES = tuple(world.BACKGROUNDS)
SHAPE_AREA = {"circle": np.pi, "square": 4.0, "triangle": 3.0 * np.sqrt(3.0) / 4.0}  # area / r^2
WINDOW = 32  # template window, pixels: fits r <= MAX_FIT_RADIUS around a centre near pixel 32
MAX_FIT_RADIUS = 14.5  # v1 radii are <= 11; bigger blobs are fitted at this cap (and score low)
BLOCK = 128  # frames measured at once: ~60 MB of temporaries
REF_RANK = 16  # the 16th most background-distant pixel is inside any v1 object (>= 64 px area)
ATTRIBUTES = ("colour", "shape", "motion", "background")
METRICS = ("iou", "palette_dist", "bg_palette_dist", "flicker", "track_smoothness", "area_cv",
           "colour_stability", "found_rate")  # per-clip quality metrics, see evaluate.py


@dataclass(frozen=True)
class EvalConfig:
    """Thresholds of the evaluator. Defaults follow the v1 spec; see the comments for the why."""
    fg_alpha: float = 0.5  # coverage at which a pixel is foreground: the 50% line of the AA edge
    min_contrast: float = 40.0  # object-background distance below which a frame has no object;
    # the closest v1 object/background pair (green on gray) is 122 apart, mild noise ~ 20
    min_area: float = 24.0  # px; the smallest v1 object (triangle, r = 7) covers 64 px
    max_area: float = 1024.0  # px (a quarter of the frame); the largest (square, r = 11) is 484
    min_iou: float = 0.5  # a frame's object counts as found when some shape fits this well
    min_found_rate: float = 0.5  # frames with an object needed to name a colour / shape / motion
    still_speed: float = 0.5  # px/frame: v1 speeds are 0 or in [1, 2]; 0.5 splits the gap
    stable_frames: int = 4  # a switched attribute must hold this many frames to count
    max_jump: float = 4.0  # px: continuity at a switch; the fastest v1 step is 2 px
    chunk_frames: int = 12  # drift chunk: 3 latent frames x 4 (Wan VAE temporal compression)


@dataclass(frozen=True)
class FrameStats:
    """Per-frame measurements of one clip (T frames). NaN / -1 where a frame has no object."""
    bg_rgb: np.ndarray  # [T, 3] per-frame background colour (median pixel)
    bg_label: np.ndarray  # [T] int, index into world.BACKGROUNDS
    bg_palette_dist: np.ndarray  # [T] mean distance of background pixels to that palette colour
    obj_rgb: np.ndarray  # [T, 3] mean colour of the object's core (edge pixels excluded)
    colour_label: np.ndarray  # [T] int, index into world.COLOURS, -1 if not found
    palette_dist: np.ndarray  # [T] mean distance of core pixels to their nearest object colour
    area: np.ndarray  # [T] coverage-weighted foreground area, px
    centre: np.ndarray  # [T, 2] (x, y) torus centroid in [0, 64), NaN if no object
    iou: np.ndarray  # [T, 3] soft IoU with each of world.SHAPES' template, 0 if no object
    found: np.ndarray  # [T] bool: plausible object (contrast, area and shape fit)
    flicker: np.ndarray  # [T - 1] mean abs change of pixels that are background in both frames

    def __len__(self) -> int:
        return len(self.found)


def _checked(frames, value_range: str) -> tuple[np.ndarray, str]:
    """Validate the layout and resolve value_range (see as_frames) without converting."""
    if hasattr(frames, "detach"):  # torch tensor, without importing torch
        frames = frames.detach().cpu().numpy()
    x = np.asarray(frames)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[1:] != (N, N, 3):
        hint = " (channels first? use frames.permute(0, 2, 3, 1))" if x.ndim == 4 and x.shape[1] == 3 else ""
        raise ValueError(f"frames must be [T, {N}, {N}, 3] channels last, got {list(x.shape)}{hint}")
    if len(x) == 0:
        raise ValueError("no frames to evaluate (T = 0)")
    if value_range == "auto":
        if not np.issubdtype(x.dtype, np.floating):
            value_range = "uint8"
        elif x.size and float(x.max()) > 1.5:
            value_range = "uint8"
        else:
            value_range = "signed" if x.size and float(x.min()) < 0.0 else "unit"
    if value_range not in ("uint8", "unit", "signed"):
        raise ValueError(f"value_range must be auto, uint8, unit or signed, got {value_range!r}")
    return x, value_range


def _to_255(x: np.ndarray, value_range: str) -> np.ndarray:
    x = x.astype(np.float32)
    if value_range == "unit":
        x = x * np.float32(255.0)
    elif value_range == "signed":
        x = (x + np.float32(1.0)) * np.float32(127.5)
    return np.clip(x, 0.0, 255.0)


def as_frames(frames, value_range: str = "auto") -> np.ndarray:
    """Any clip -> float32 [T, 64, 64, 3] in 0..255.

    Accepts numpy arrays or torch tensors, channels last, [T, 64, 64, 3] or one frame [64, 64, 3].
    value_range: "uint8" (0..255, the default for integer dtypes), "unit" ([0, 1], ComfyUI IMAGE),
    "signed" ([-1, 1], VAE / world.to_unit_range), or "auto": integers -> uint8; floats with a
    maximum above 1.5 -> 0..255, with any value below 0 -> signed, else unit. "auto" cannot tell a
    [-1, 1] clip with no pixel darker than mid-gray (white on gray) from a [0, 1] one: pass the range
    explicitly for model outputs.
    """
    return _to_255(*_checked(frames, value_range))


def _grow(mask: np.ndarray, shrink: bool = False) -> np.ndarray:
    """3x3 dilation (or erosion) of [T, H, W] bool masks on the torus."""
    op = np.logical_and if shrink else np.logical_or
    out = op(op(mask, np.roll(mask, 1, axis=1)), np.roll(mask, -1, axis=1))
    return op(op(out, np.roll(out, 1, axis=2)), np.roll(out, -1, axis=2))


def _dist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Euclidean RGB distance over the last axis (size 3), broadcasting. Summing the three
    channels explicitly is several times faster than a reduction over a length-3 axis."""
    d = [a[..., c] - b[..., c] for c in range(3)]
    return np.sqrt(d[0] * d[0] + d[1] * d[1] + d[2] * d[2])


def _nearest(rgb: np.ndarray, palette: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[..., 3] colours -> (index [...], distance [...]) of the nearest palette entry."""
    d = _dist(rgb[..., None, :], palette)  # [..., P]
    idx = np.argmin(d, axis=-1)
    return idx, np.take_along_axis(d, idx[..., None], axis=-1)[..., 0]


def _circular_mean(marginal: np.ndarray) -> np.ndarray:
    """[T, 64] mass per column (or row) -> [T] circular mean position in [0, 64)."""
    angle = 2.0 * np.pi * (np.arange(N) + 0.5) / N  # [64]
    a = np.arctan2(marginal @ np.sin(angle), marginal @ np.cos(angle))
    return np.mod(a * N / (2.0 * np.pi), N)


def _templates(shape: str, cx: np.ndarray, cy: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Coverage of `shape` in the window [16, 48)^2 of a frame: [T] centres/radii -> [T, 32, 32].

    Same geometry and 4x4 supersampling as world.render (world._half_width gives each sample
    row's half-width), without the torus: the caller rolls the object to the window's middle.
    Per sample row the covered samples are one run [g0, g1] of sample columns, so each pixel's
    count is an interval overlap instead of 16 point tests."""
    s = world.SUPERSAMPLE
    lo = (N - WINDOW) / 2
    rows = lo + (np.arange(WINDOW * s) + 0.5) / s  # [S] sample row centres
    half = world._half_width(shape, rows[None, :] - cy[:, None], r[:, None])  # [T, S]
    # sample column g sits at lo + (g + 0.5) / s; covered iff |that - cx| <= half
    g0 = np.ceil(s * (cx[:, None] - half - lo) - 0.5)  # [T, S] first covered sample column
    g1 = np.floor(s * (cx[:, None] + half - lo) - 0.5)  # [T, S] last
    first = s * np.arange(WINDOW)  # [32] first sample column of each pixel
    count = np.minimum(g1[..., None], first + s - 1) - np.maximum(g0[..., None], first) + 1
    count = np.clip(count, 0, s)  # [T, S, 32] covered samples per sample row and pixel
    t = len(cx)
    return count.reshape(t, WINDOW, s, WINDOW).sum(axis=2).astype(np.float32) / (s * s)


def measure(frames, value_range: str = "auto", config: EvalConfig = EvalConfig(),
            block: int = BLOCK) -> FrameStats:
    """Per-frame measurements of a clip (see FrameStats); frames as in `as_frames`.

    Long streams are measured `block` frames at a time (blocks overlap by one frame so the
    flicker between blocks is measured too): memory stays bounded, results do not depend on it."""
    x, value_range = _checked(frames, value_range)
    t = len(x)
    parts = []
    for a in range(0, t, block):
        b = min(a + block, t)
        part = _measure_block(_to_255(x[a:min(b + 1, t)], value_range), config)  # + 1 overlap frame
        keep = b - a
        parts.append({k: v[:keep] for k, v in vars(part).items()})  # flicker keeps pair (b-1, b)
    return FrameStats(**{k: np.concatenate([p[k] for p in parts]) for k in parts[0]})


def _measure_block(x: np.ndarray, config: EvalConfig) -> FrameStats:
    """measure() on float32 [T, H, W, 3] frames in 0..255."""
    t = x.shape[0]
    flat = x.reshape(t, -1, 3)  # [T, HW, 3]

    # Background: the median pixel. An object covers at most ~12% of a v1 frame.
    bg = np.median(flat, axis=1)  # [T, 3]
    dist = _dist(x, bg[:, None, None, :])  # [T, H, W]

    # Object colour from the core: pixels clearly off the background (half the distance of the
    # REF_RANK-th farthest pixel), eroded by one pixel so anti-aliased edges do not mix in.
    ref = np.partition(dist.reshape(t, -1), -REF_RANK, axis=1)[:, -REF_RANK]  # [T]
    rough = dist > np.maximum(0.5 * ref, 0.5 * config.min_contrast)[:, None, None]
    core = _grow(rough, shrink=True)
    core = np.where(core.any(axis=(1, 2))[:, None, None], core, rough)  # tiny blob: keep it whole
    n_core = core.sum(axis=(1, 2))  # [T]
    obj = np.einsum("thwc,thw->tc", x, core.astype(np.float32)) / np.maximum(n_core, 1)[:, None]
    axis_vec = obj - bg  # [T, 3]
    contrast = _dist(obj, bg)  # [T]
    valid = (n_core > 0) & (contrast >= config.min_contrast)

    # Coverage estimate: each pixel's position on the background -> object colour line.
    scale = np.where(valid, 1.0 / np.maximum(contrast, 1e-6) ** 2, 0.0)  # [T]
    alpha = np.einsum("thwc,tc->thw", x - bg[:, None, None, :], axis_vec * scale[:, None])
    alpha = np.clip(alpha, 0.0, 1.0)  # [T, H, W]
    mask = alpha >= config.fg_alpha
    support = _grow(mask)  # the mask and its anti-aliased rim; noise elsewhere does not count
    weight = alpha * support  # [T, H, W]
    area = weight.sum(axis=(1, 2))  # [T]

    # Torus centroid: circular mean for a rough centre, roll it to pixel 32, then the exact
    # linear centroid there (the circular mean is biased for asymmetric shapes like the triangle).
    mx, my = weight.sum(axis=1), weight.sum(axis=2)  # [T, W], [T, H]
    shift_x = np.floor(_circular_mean(mx)).astype(np.int64) - N // 2  # [T]
    shift_y = np.floor(_circular_mean(my)).astype(np.int64) - N // 2
    rolled_x = np.mod(np.arange(N)[None, :] - shift_x[:, None], N) + 0.5  # [T, W] coordinate after roll
    rolled_y = np.mod(np.arange(N)[None, :] - shift_y[:, None], N) + 0.5
    safe_area = np.maximum(area, 1e-6)
    cx_r = (mx * rolled_x).sum(axis=1) / safe_area  # [T] centre in rolled coordinates (~32)
    cy_r = (my * rolled_y).sum(axis=1) / safe_area
    has_mass = valid & (area > 1e-3)
    centre = np.stack([np.mod(cx_r + shift_x, N), np.mod(cy_r + shift_y, N)], axis=-1)  # [T, 2]
    centre[~has_mass] = np.nan

    # Shape fit: each shape's template at the centroid with the radius that matches the area.
    lo = (N - WINDOW) // 2
    win = np.arange(lo, lo + WINDOW)  # [32]
    iy = np.mod(win[None, :] + shift_y[:, None], N)  # [T, 32] source rows of the rolled window
    ix = np.mod(win[None, :] + shift_x[:, None], N)
    w_win = weight[np.arange(t)[:, None, None], iy[:, :, None], ix[:, None, :]]  # [T, 32, 32]
    cx_c = np.where(has_mass, cx_r, N / 2)  # keep empty frames finite
    cy_c = np.where(has_mass, cy_r, N / 2)
    ious = []
    for shape in world.SHAPES:
        r = np.clip(np.sqrt(area / SHAPE_AREA[shape]), 0.5, MAX_FIT_RADIUS)  # [T]
        tpl = _templates(shape, cx_c, cy_c, r)  # [T, 32, 32]
        inter = np.minimum(w_win, tpl).sum(axis=(1, 2))
        union = area + tpl.sum(axis=(1, 2)) - inter
        ious.append(np.where(has_mass, inter / np.maximum(union, 1e-6), 0.0))
    iou = np.stack(ious, axis=-1)  # [T, 3]
    found = has_mass & (area >= config.min_area) & (area <= config.max_area) & \
        (iou.max(axis=-1) >= config.min_iou)

    colour_idx, _ = _nearest(obj, OBJECT_RGB)  # [T]
    colour_label = np.where(found, colour_idx, -1)
    frame_of = np.nonzero(core)[0]  # [P] frame index of each core pixel
    _, core_d = _nearest(x[core], OBJECT_RGB)  # [P]
    palette_dist = np.bincount(frame_of, weights=core_d, minlength=t) / np.maximum(n_core, 1)
    palette_dist = np.where(found, palette_dist, np.nan)

    bg_label, _ = _nearest(bg, BACKGROUND_RGB)  # [T]
    background = ~support  # [T, H, W]
    bg_d = _dist(x, BACKGROUND_RGB[bg_label][:, None, None, :])  # [T, H, W]
    bg_palette_dist = (bg_d * background).sum(axis=(1, 2)) / np.maximum(background.sum(axis=(1, 2)), 1)

    both = background[1:] & background[:-1]  # [T-1, H, W]
    step = np.abs(x[1:] - x[:-1])  # [T-1, H, W, 3]
    change = (step[..., 0] + step[..., 1] + step[..., 2]) / 3.0  # [T-1, H, W]
    flicker = (change * both).sum(axis=(1, 2)) / np.maximum(both.sum(axis=(1, 2)), 1)

    return FrameStats(bg_rgb=bg, bg_label=bg_label, bg_palette_dist=bg_palette_dist,
                      obj_rgb=np.where(found[:, None], obj, np.nan), colour_label=colour_label,
                      palette_dist=palette_dist, area=np.where(found, area, np.nan),
                      centre=np.where(found[:, None], centre, np.nan),
                      iou=iou, found=found, flicker=flicker)
