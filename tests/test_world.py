"""Shapes World v1 renderer and sampler against /work/shared/specs/shapes-world.md."""
from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest

from causvid_core import world as W

AREA_FACTOR = {"circle": math.pi, "square": 4.0, "triangle": 3 * math.sqrt(3) / 4}  # area / r^2


def spec_at(shape="circle", x=32.5, y=32.5, r=9.0, motion="staying still", speed=1.5,
            colour="red", background="black"):
    return W.ClipSpec(colour, shape, motion, background, r, speed, x, y)


def torus_delta(d):
    return (np.asarray(d) + 32.0) % 64.0 - 32.0


def centroid_track(spec, num_frames):
    """Coverage-weighted centroid per frame, torus-unwrapped by following the previous frame: [T, 2]."""
    cov = W.coverage(spec, num_frames)  # [T, H, W]
    centres = np.arange(W.FRAME_SIZE) + 0.5
    ref = np.array([spec.x0, spec.y0])
    track = []
    for c in cov:
        mass = c.sum()
        dx = torus_delta(centres - ref[0])  # [W]
        dy = torus_delta(centres - ref[1])  # [H]
        ref = ref + np.array([(c.sum(0) * dx).sum(), (c.sum(1) * dy).sum()]) / mass
        track.append(ref)
    return np.stack(track)


# --- an independent reference: every sample point against all nine torus copies, shapes from
# --- the spec's own definitions (triangle by its three vertices)

def reference_counts(spec, frame):
    dx, dy = spec.velocity
    x, y = (spec.x0 + dx * frame) % 64, (spec.y0 + dy * frame) % 64
    r = spec.radius
    s = (np.arange(256) + 0.5) / 4
    px, py = np.meshgrid(s, s)  # [256, 256], py varies along rows
    inside = np.zeros_like(px, dtype=bool)
    h = math.sqrt(3) / 2
    for ox in (-64, 0, 64):
        for oy in (-64, 0, 64):
            cx, cy = x + ox, y + oy
            if spec.shape == "circle":
                hit = (px - cx) ** 2 + (py - cy) ** 2 <= r * r
            elif spec.shape == "square":
                hit = (np.abs(px - cx) <= r) & (np.abs(py - cy) <= r)
            else:
                verts = [(cx, cy - r), (cx - h * r, cy + 0.5 * r), (cx + h * r, cy + 0.5 * r)]
                signs = []
                for (ax, ay), (bx, by) in zip(verts, verts[1:] + verts[:1]):
                    signs.append((bx - ax) * (py - ay) - (by - ay) * (px - ax))
                hit = np.all([sg <= 0 for sg in signs], axis=0) | np.all([sg >= 0 for sg in signs], axis=0)
            inside |= hit
    return inside.reshape(64, 4, 64, 4).sum(axis=(1, 3))


@pytest.mark.parametrize("shape", W.SHAPES)
@pytest.mark.parametrize("x,y", [(20.3, 41.7), (0.6, 33.1), (62.9, 1.2), (31.0, 63.7)])
def test_matches_nine_copy_reference(shape, x, y):
    spec = spec_at(shape, x, y, r=10.3, motion="moving right", speed=1.37)
    counts = np.rint(W.coverage(spec, 3) * 16).astype(int)  # [3, H, W]
    for n in range(3):
        np.testing.assert_array_equal(counts[n], reference_counts(spec, n))


# --- palettes and pixel convention

def test_palettes_and_constants_are_the_spec():
    assert W.WORLD_VERSION == "v1" and W.FRAME_SIZE == 64 and W.FPS == 16
    assert dict(W.BACKGROUNDS) == {"black": (0, 0, 0), "gray": (128, 128, 128),
                                   "navy": (20, 30, 90), "forest": (20, 70, 30)}
    assert dict(W.COLOURS) == {"red": (220, 40, 40), "green": (40, 190, 70), "blue": (60, 100, 240),
                               "yellow": (240, 220, 50), "magenta": (220, 60, 220),
                               "cyan": (50, 210, 220), "white": (245, 245, 245),
                               "orange": (245, 140, 40)}
    assert W.SHAPES == ("circle", "square", "triangle")
    assert dict(W.MOTIONS) == {"moving left": (-1, 0), "moving right": (1, 0), "moving up": (0, -1),
                               "moving down": (0, 1), "staying still": (0, 0)}
    assert set(W.HELD_OUT_PAIRS) == {("magenta", "triangle"), ("cyan", "square"), ("orange", "circle")}
    assert W.RADIUS_RANGE == (7, 11) and W.SPEED_RANGE == (1, 2)
    with pytest.raises(TypeError):
        W.COLOURS["red"] = (0, 0, 0)  # read-only: no module state to mutate


@pytest.mark.parametrize("background", W.BACKGROUNDS)
@pytest.mark.parametrize("colour", W.COLOURS)
def test_exact_palette_colours(colour, background):
    frame = W.render(spec_at("circle", colour=colour, background=background, r=7.0), 1)[0]
    assert frame.shape == (64, 64, 3) and frame.dtype == np.uint8
    assert tuple(frame[32, 32]) == W.COLOURS[colour]  # row, column of the centre pixel
    assert tuple(frame[0, 0]) == W.BACKGROUNDS[background]
    assert tuple(frame[63, 63]) == W.BACKGROUNDS[background]


def test_pixel_centre_convention():
    # centre (32, 32), half-side 8: the square covers exactly [24, 40) in both axes
    cov = W.coverage(spec_at("square", 32.0, 32.0, r=8.0), 1)[0]
    expected = np.zeros((64, 64), np.float32)
    expected[24:40, 24:40] = 1.0
    np.testing.assert_array_equal(cov, expected)


def test_blend_rounds_half_up():
    spec = spec_at("circle", 20.37, 40.81, r=10.4, colour="red", background="gray")
    cov = W.coverage(spec, 1)[0][..., None].astype(np.float64)  # [H, W, 1]
    bg, obj = np.array(W.BACKGROUNDS["gray"]), np.array(W.COLOURS["red"])
    expected = np.floor(bg * (1 - cov) + obj * cov + 0.5).astype(np.uint8)
    np.testing.assert_array_equal(W.render(spec, 1)[0], expected)
    assert ((cov > 0) & (cov < 1)).any()


# --- geometry

@pytest.mark.parametrize("shape", W.SHAPES)
def test_area(shape):
    rng = np.random.default_rng(0)
    sums = []
    for r in (7.0, 9.0, 11.0):
        for _ in range(8):
            spec = spec_at(shape, *rng.uniform(0, 64, 2), r=r)
            area = W.coverage(spec, 1)[0].sum()
            exact = AREA_FACTOR[shape] * r * r
            # one frame: within the supersampling quantum (a quarter pixel per edge)
            assert abs(area - exact) < 0.03 * exact, (shape, r, area, exact)
            sums.append(area / exact)
    assert abs(np.mean(sums) - 1.0) < 0.01, np.mean(sums)  # on average: ~1%


@pytest.mark.parametrize("shape", W.SHAPES)
def test_anti_aliased_edges(shape):
    spec = spec_at(shape, 30.37, 33.61, r=9.3, colour="white", background="black")
    cov = W.coverage(spec, 1)[0]
    partial = (cov > 0) & (cov < 1)
    assert partial.sum() > 10
    frame = W.render(spec, 1)[0]
    grey = frame[partial][:, 0]
    assert ((grey > 0) & (grey < 245)).mean() > 0.9  # coverage >= 1/32 rounds away from the ends
    assert set(np.unique(cov * 16)) <= set(range(17))  # coverage is a count of 16 samples


def test_triangle_points_up():
    x, y, r = 32.0, 32.5, 10.0
    cov = W.coverage(spec_at("triangle", x, y, r=r), 1)[0]
    rows = np.nonzero(cov.sum(1))[0]
    top, bottom = rows.min(), rows.max()
    assert top == math.floor(y - r) and bottom == math.floor(y + r / 2)  # apex up, base down
    widths = cov.sum(1)[top:bottom]  # rows above the base row widen downwards
    assert np.all(np.diff(widths) > 0)
    np.testing.assert_array_equal(cov, cov[:, ::-1])  # mirror-symmetric about x = 32
    rows_c = np.arange(64) + 0.5
    assert abs((cov.sum(1) * rows_c).sum() / cov.sum() - y) < 0.05  # area centroid = circumcentre


def test_torus_wrap():
    inside = spec_at("circle", 32.75, 32.25, r=9.0)
    edge = spec_at("circle", 0.75, 32.25, r=9.0)
    corner = spec_at("square", 0.75, 63.5, r=8.0)
    inside_sq = spec_at("square", 32.75, 31.5, r=8.0)
    cov_in, cov_edge = W.coverage(inside, 1)[0], W.coverage(edge, 1)[0]
    assert cov_edge[:, 0].sum() > 0 and cov_edge[:, 63].sum() > 0  # drawn on both sides
    assert cov_edge.sum() == cov_in.sum()
    np.testing.assert_array_equal(cov_edge, np.roll(cov_in, -32, axis=1))  # same shape, wrapped
    cov_corner = W.coverage(corner, 1)[0]
    for r, c in ((0, 0), (0, 63), (63, 0), (63, 63)):
        assert cov_corner[r, c] > 0
    np.testing.assert_array_equal(cov_corner, np.roll(W.coverage(inside_sq, 1)[0], (32, -32), (0, 1)))


@pytest.mark.parametrize("shape", W.SHAPES)
@pytest.mark.parametrize("motion", W.MOTIONS)
def test_motion_advances_by_velocity(shape, motion):
    spec = spec_at(shape, 61.3, 2.9, r=8.7, motion=motion, speed=1.73)  # crosses both edges
    n = 80
    track = centroid_track(spec, n)  # [T, 2]
    expected = np.array([spec.x0, spec.y0]) + np.arange(n)[:, None] * np.array(spec.velocity)
    # per frame: a horizontal or vertical edge snaps to the 1/4-pixel sample grid, which moves
    # the centroid by at most 1/8 pixel; over the clip the errors average out
    err = np.abs(track - expected).max()
    assert err < 1 / 8 + 0.005, err
    slope = np.polyfit(np.arange(n), track, 1)[0]  # [2] pixels per frame
    np.testing.assert_allclose(slope, spec.velocity, atol=1e-3)
    if motion == "staying still":
        frames = W.render(spec, 5)
        assert all(np.array_equal(frames[0], f) for f in frames[1:])
    else:
        assert np.abs(track[-1] - track[0]).max() == pytest.approx(1.73 * (n - 1), abs=2 / 8)


def test_positions_wrap_into_the_torus():
    spec = spec_at(x=63.0, y=1.0, motion="moving right", speed=2.0)
    np.testing.assert_allclose(W.positions(spec, [0, 1, 2]), [[63, 1], [1, 1], [3, 1]])
    up = spec_at(x=5.0, y=0.5, motion="moving up", speed=1.0)
    xy = W.positions(up, np.arange(200))
    assert (xy >= 0).all() and (xy < 64).all()


# --- time

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_start_frame_continuity(seed):
    spec = W.sample_spec(np.random.default_rng(seed))
    full = W.render(spec, 45)
    for k, n in ((0, 45), (1, 20), (13, 32), (44, 1)):
        np.testing.assert_array_equal(W.render(spec, n, start_frame=k), full[k:k + n])
    chunks = list(W.iter_frames(spec, start_frame=5, chunk=7, num_frames=40))
    assert [len(c) for c in chunks] == [7] * 5 + [5]
    np.testing.assert_array_equal(np.concatenate(chunks), full[5:45])
    assert W.render(spec, 0).shape == (0, 64, 64, 3)


def test_long_stream_is_bounded_and_consistent():
    spec = spec_at("triangle", 10.1, 50.2, motion="moving down", speed=1.91)
    stream = W.iter_frames(spec, chunk=16)  # endless
    chunks = [next(stream) for _ in range(63)]  # 1008 frames, one 16-frame chunk at a time
    assert all(c.shape == (16, 64, 64, 3) for c in chunks)
    np.testing.assert_array_equal(chunks[62], W.render(spec, 16, start_frame=992))


# --- sampling

def test_make_clip_is_deterministic_by_seed():
    spec_a, frames_a = W.make_clip(123)
    spec_b, frames_b = W.make_clip(123)
    assert spec_a == spec_b
    np.testing.assert_array_equal(frames_a, frames_b)
    assert frames_a.shape == (33, 64, 64, 3) and frames_a.dtype == np.uint8
    assert len({W.make_clip(s, num_frames=1)[0] for s in range(20)}) == 20


def test_render_is_pinned():
    # A pixel change here is a new world version (v2), not a silent edit of v1.
    spec = W.ClipSpec("orange", "triangle", "moving up", "navy", 9.25, 1.5, 3.3, 60.1)
    digest = hashlib.sha256(W.render(spec, 9).tobytes()).hexdigest()
    assert digest == PINNED_RENDER_SHA256


PINNED_RENDER_SHA256 = "349a4eb2ded0183b3c44f1f2ca0d175078d744b31d0452b286bd666d6ad88a6d"


def test_sample_ranges():
    rng = np.random.default_rng(5)
    specs = [W.sample_spec(rng, "any") for _ in range(2000)]
    for spec in specs:
        assert 7 <= spec.radius <= 11 and 1 <= spec.speed <= 2
        assert 0 <= spec.x0 < 64 and 0 <= spec.y0 < 64
    for values, (lo, hi) in (([s.radius for s in specs], W.RADIUS_RANGE),
                             ([s.speed for s in specs], W.SPEED_RANGE),
                             ([s.x0 for s in specs], (0, 64)), ([s.y0 for s in specs], (0, 64))):
        counts = np.histogram(values, bins=4, range=(lo, hi))[0]  # uniform over the whole range
        assert counts.min() > 400, counts
    assert {s.motion for s in specs} == set(W.MOTIONS)
    assert {s.background for s in specs} == set(W.BACKGROUNDS)
    assert len({(s.colour, s.shape) for s in specs}) == 24


def test_held_out_split():
    rng = np.random.default_rng(11)
    train = [W.sample_spec(rng) for _ in range(3000)]
    assert not any((s.colour, s.shape) in W.HELD_OUT_PAIRS for s in train)
    assert not any(s.held_out for s in train)
    assert len({(s.colour, s.shape) for s in train}) == 21
    held = [W.sample_spec(rng, "heldout") for _ in range(300)]
    assert {(s.colour, s.shape) for s in held} == set(W.HELD_OUT_PAIRS)
    assert all(s.held_out for s in held)
    with pytest.raises(ValueError, match="split"):
        W.sample_spec(rng, "test")


# --- prompts

@pytest.mark.parametrize("prompt,attrs", [
    ("a red circle moving right on a black background", ("red", "circle", "moving right", "black")),
    ("a cyan square staying still on a navy background", ("cyan", "square", "staying still", "navy")),
])
def test_spec_examples(prompt, attrs):
    parsed = W.parse_prompt(prompt)
    assert (parsed["colour"], parsed["shape"], parsed["motion"], parsed["background"]) == attrs
    spec = W.spec_from_prompt(prompt, np.random.default_rng(0))
    assert (spec.colour, spec.shape, spec.motion, spec.background) == attrs
    assert spec.prompt == prompt
    assert W.spec_from_prompt("  " + prompt.upper().replace(" ", "   ") + ". ",
                              np.random.default_rng(0)) == spec  # case, whitespace, final dot


def test_prompt_format_round_trip():
    rng = np.random.default_rng(3)
    for _ in range(50):
        spec = W.sample_spec(rng, "any")
        assert spec.prompt == (f"a {spec.colour} {spec.shape} {spec.motion} "
                               f"on a {spec.background} background")
        assert W.parse_prompt(spec.prompt) == dict(colour=spec.colour, shape=spec.shape,
                                                   motion=spec.motion, background=spec.background)
        again = W.spec_from_prompt(spec.prompt, rng)
        assert again.prompt == spec.prompt and 7 <= again.radius <= 11


def test_parse_prompt_is_tolerant():
    assert W.parse_prompt("A shiny RED, fluffy circle -- Moving   Left!! on a lovely gray background") == \
        dict(colour="red", shape="circle", motion="moving left", background="gray")
    assert W.parse_prompt("a purple hexagon dancing on the moon") == \
        dict(colour=None, shape=None, motion=None, background=None)
    assert W.parse_prompt("") == dict(colour=None, shape=None, motion=None, background=None)
    assert W.parse_prompt("turn right: a blue thing") == \
        dict(colour="blue", shape=None, motion=None, background=None)  # lone "right" is no motion
    assert W.parse_prompt("a forest")["background"] == "forest"
    assert W.parse_prompt("a red circle moving up, then a blue square moving down") == \
        dict(colour="red", shape="circle", motion="moving up", background=None)  # first match wins


@pytest.mark.parametrize("prompt,bad", [
    ("a purple circle moving right on a black background", "purple"),
    ("a red hexagon moving right on a black background", "hexagon"),
    ("a red circle moving sideways on a black background", "sideways"),
    ("a red circle moving right on a pink background", "pink"),
    ("a red circle moving right in a black background", "in"),
    ("the red circle moving right on a black background", "the"),
    ("a red circle moving right on a black backdrop", "backdrop"),
])
def test_spec_from_prompt_names_the_bad_word(prompt, bad):
    with pytest.raises(ValueError, match=f"'{bad}"):
        W.spec_from_prompt(prompt, np.random.default_rng(0))


def test_spec_from_prompt_rejects_other_templates():
    with pytest.raises(ValueError, match="template"):
        W.spec_from_prompt("a red circle", np.random.default_rng(0))


def test_clip_spec_validates():
    with pytest.raises(ValueError, match="purple"):
        W.ClipSpec("purple", "circle", "moving up", "black", 8, 1, 0, 0)
    with pytest.raises(ValueError, match="radius"):
        W.ClipSpec("red", "circle", "moving up", "black", 40, 1, 0, 0)
    assert spec_at(motion="moving up", speed=1.5).velocity == (0, -1.5)
    assert spec_at(motion="moving left", speed=1.25).velocity == (-1.25, 0)


# --- value range

def test_unit_range():
    frames = W.make_clip(4, num_frames=5)[1]
    x = W.to_unit_range(frames)
    assert x.dtype == np.float32 and x.shape == frames.shape
    assert x.min() >= -1 and x.max() <= 1
    assert W.to_unit_range(np.array([0, 255], np.uint8)).tolist() == [-1.0, 1.0]
    np.testing.assert_array_equal(W.from_unit_range(x), frames)
