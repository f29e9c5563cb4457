"""Every shipped API workflow (workflows/api/*.json), exactly as a user downloads it, run through a real
ComfyUI server with the built-in model: it must succeed, save a decodable MP4 of the expected length,
and show what its prompts ask for, judged from the pixels by the Shapes World evaluator.

Asserted: all four attributes (colour, shape, motion, background) of every workflow's prompt(s), the shape
by a clear margin over the next-best shape. The committed model gets colour, motion and background right
nearly always but draws lumpy blobs (all-four 62.5% over docs/RESULTS.md's prompts; issue 6): the shape
checks it misses are listed in KNOWN_GAPS."""
from __future__ import annotations

import io
import json
from pathlib import Path

import av
import numpy as np
import pytest

from causvid_core import evaluate as E
from causvid_core.pipeline import builtin_available
from causvid_core.schedule import parse_schedule
from comfy_host import ROOT, WsListener, comfy_server, errors_of  # noqa: F401 (fixture)

API = ROOT / "workflows" / "api"
ASSETS = ROOT / "workflows" / "assets"
NAMES = sorted(p.stem for p in API.glob("*.json"))
ASSERTED = ("colour", "shape", "motion", "background")
SHAPE_MARGIN = 0.02  # mean-IoU lead of the detected shape over the runner-up that counts as drawn
# Shapes the committed model does not draw clearly in a workflow (issue 6 is open; docs/RESULTS.md "Shapes"):
# the workflow must still run to success with the right frames, colour, motion and background; its shape
# check is expected to fail (xfail) and the test fails when it starts to pass, so this list cannot go stale.
KNOWN_GAPS: dict[str, str] = {}  # name -> why; empty since the runs/s13 model (endless_stream now draws its circle)


@pytest.fixture(scope="module")
def host(comfy_server):
    assert builtin_available(), "the built-in model (causvid_core/builtin/) is missing: the workflows need it"
    # the pack put the example inputs into ComfyUI's input/ folder itself when ComfyUI imported it
    for png in ASSETS.glob("*.png"):
        assert (comfy_server.input_dir / png.name).read_bytes() == png.read_bytes(), png.name
    return comfy_server


LIVE_SHOWN_FRAMES = 45  # a live workflow is stopped, as its user would, once this many frames reached a page


def run(host, name: str) -> tuple[dict, list[np.ndarray]]:
    api = json.loads((API / f"{name}.json").read_text())
    if any(n["class_type"] == "LiveStream" for n in api.values()):
        entry = run_live(host, api)
    else:
        status, body = host.post_prompt(api)
        assert status == 200, body
        entry = host.wait_history(body["prompt_id"], timeout=300)
    assert entry["status"]["status_str"] == "success", errors_of(entry)
    videos = []
    for node_id, out in entry["outputs"].items():
        for item in out.get("causvid_videos", []):
            with av.open(io.BytesIO(host.view(item["filename"], item["subfolder"]))) as c:
                frames = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
            assert len(frames) == item["frames"], item
            videos.append(frames)
    assert videos, f"{name}: no video saved"
    return api, videos


def run_live(host, api: dict) -> dict:
    """Queue a live workflow, watch its frames arrive on the pack's websocket while it runs, press Stop."""
    from causvid_core.live.hub import unpack_frame

    with WsListener(f"ws://127.0.0.1:{host.port}/causvid/live/ws") as ws:
        status, body = host.post_prompt(api)
        assert status == 200, body
        frames = []

        def frame(m):
            if isinstance(m, tuple):
                frames.append(unpack_frame(m[1].to_bytes(4, "big") + m[2])[0])
            return sum(h["kind"] == "out" for h in frames) >= LIVE_SHOWN_FRAMES
        ws.wait_for(frame, timeout=300)
        assert host.history(body["prompt_id"]) is None, "the live node finished before it was stopped"
        status, reply = host.request("POST", "/causvid/live/stop", {})
        assert status == 200, reply
        return host.wait_history(body["prompt_id"], timeout=120)


def nodes_of(api: dict, cls: str) -> list[dict]:
    return [n["inputs"] for n in api.values() if n["class_type"] == cls]


def shape_margin(frames: np.ndarray) -> float:
    """How much better the detected shape fits than the runner-up (mean IoU over the frames with an object)."""
    stats = E.measure(frames, "uint8")
    if not stats.found.any():
        return 0.0
    best, second = np.sort(stats.iou[stats.found].mean(axis=0))[::-1][:2]
    return float(best - second)


class ShapeNotShown(AssertionError):
    """The prompted shape is not drawn clearly; everything else the check asserts held."""


def assert_follows(result: dict, what: str, video: np.ndarray, shape_gaps: list[str]) -> None:
    """Colour, motion and background right (asserted at once); the shape right and by a clear margin, else a
    note in shape_gaps: the committed model draws lumpy blobs that fit a circle and a square within
    0.001-0.01 IoU, a verdict float rounding decides (one CPU's circle is another's square), so such a tie
    counts as not showing the shape."""
    wrong = {a: (result["expected"][a], result["detected"][a]) for a in ASSERTED
             if a != "shape" and not result["correct"][a]}
    assert not wrong, f"{what}: asked for {result['prompt']!r}; wrong (asked, seen): {wrong}"
    margin = shape_margin(video[result.get("start", 0):result.get("stop", len(video))])
    if not result["correct"]["shape"]:
        shape_gaps.append(f"{what}: asked for a {result['expected']['shape']}, saw a {result['detected']['shape']}")
    elif margin < SHAPE_MARGIN:
        shape_gaps.append(f"{what}: the {result['expected']['shape']} fits only {margin:.3f} IoU better than the "
                          f"next shape (a tie below {SHAPE_MARGIN})")


@pytest.mark.parametrize("name", NAMES)
def test_shipped_workflow_runs_and_shows_its_prompt(host, name):
    api, (video,) = run(host, name)
    try:
        check_content(api, name, video)
    except ShapeNotShown as exc:
        if name in KNOWN_GAPS:
            pytest.xfail(f"known gap: {KNOWN_GAPS[name]} ({exc})")
        raise
    assert name not in KNOWN_GAPS, f"{name} now shows its shapes: remove it from KNOWN_GAPS"


def check_content(api: dict, name: str, video: np.ndarray) -> None:
    """Frames, colour, motion, background (and the schedule's switches) asserted; then ShapeNotShown when a
    prompted shape is not drawn clearly."""
    gaps: list[str] = []
    _check_content(api, name, video, gaps)
    if gaps:
        raise ShapeNotShown("; ".join(gaps))


def _check_content(api: dict, name: str, video: np.ndarray, gaps: list[str]) -> None:
    assert video.shape[1:] == (64, 64, 3)
    texts = [n["text"] for n in nodes_of(api, "CausalTextEncode")]
    if name == "prompt_schedule":
        (sched,) = nodes_of(api, "PromptSchedule")
        (state,) = nodes_of(api, "CausalKVState")
        assert len(video) == state["length"]
        events = parse_schedule(sched["schedule"])
        result = E.evaluate_schedule(video, [(e.frame, e.prompt) for e in events], value_range="uint8")
        for seg in result["segments"]:
            assert_follows(seg, f"segment from frame {seg['start']}", video, gaps)
        assert all(s["switched"] for s in result["switches"]), result["switches"]
    elif name == "video_to_video":
        source, target = texts  # CausalGenerate makes the source from the first, the restyle follows the second
        assert len(video) == nodes_of(api, "CausalGenerate")[0]["length"]
        assert_follows(E.evaluate_clip(video, target, value_range="uint8"), "restyled video", video, gaps)
    elif name == "endless_stream":
        (state,) = nodes_of(api, "CausalKVState")
        (sampler,) = nodes_of(api, "StreamChunkSampler")
        assert state["length"] == 0 and len(video) == 9 + 12 * (sampler["chunks"] - 1)
        stream = E.evaluate_stream(video, texts[0], first_chunk_frames=9, value_range="uint8")
        assert_follows(stream["chunks"][-1], "last chunk of the endless stream", video, gaps)
        assert_follows(E.evaluate_clip(video, texts[0], value_range="uint8"), "whole stream", video, gaps)
    elif name.startswith("live_"):
        (node,) = nodes_of(api, "LiveStream")
        assert len(video) >= LIVE_SHOWN_FRAMES
        # the live stream shows its prompt; a restyled Shapes World clip shows the prompt's colour, not the input's
        assert_follows(E.evaluate_clip(video, node["prompt"], value_range="uint8"), name, video, gaps)
    else:
        lengths = [n["length"] for n in nodes_of(api, "CausalKVState") + nodes_of(api, "CausalGenerate")]
        assert len(video) == lengths[0]
        assert_follows(E.evaluate_clip(video, texts[0], value_range="uint8"), name, video, gaps)
        if name == "image_to_video":
            (img,) = nodes_of(api, "LoadImage")
            from PIL import Image
            start = np.asarray(Image.open(ASSETS / img["image"]).convert("RGB")).astype(np.float32)
            assert np.abs(video[0].astype(np.float32) - start).mean() < 12.0, "the video does not start from the image"
