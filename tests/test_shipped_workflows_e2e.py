"""Every shipped API workflow (workflows/api/*.json), exactly as a user downloads it, run through a real
ComfyUI server with the built-in model: it must succeed, save a decodable MP4 of the expected length,
and show what its prompts ask for, judged from the pixels by the Shapes World evaluator.

Asserted: all four attributes (colour, shape, motion, background) of every workflow's prompt(s). The
workflows' prompts are mostly circles, the shape the committed model draws best: its all-four rate over
docs/RESULTS.md's prompts is ~46% (squares and triangles come out as rounded blobs; issue 6), so a passing
workflow here says the shipped graphs work and show their prompts, not that any prompt will."""
from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import av
import numpy as np
import pytest

from causvid_core import evaluate as E
from causvid_core.pipeline import builtin_available
from causvid_core.schedule import parse_schedule
from comfy_host import ROOT, comfy_server, errors_of  # noqa: F401 (fixture)

API = ROOT / "workflows" / "api"
ASSETS = ROOT / "workflows" / "assets"
NAMES = sorted(p.stem for p in API.glob("*.json"))
ASSERTED = ("colour", "shape", "motion", "background")
# Content failures of the committed model measured in docs/RESULTS.md (issue 6 is open): the workflow must
# still run to success with the right frames; its content check is expected to fail (xfail) and the test
# fails when it starts to pass, so this list cannot go stale.
KNOWN_GAPS = {
    "endless_stream": "long streams glitch: over ten 30-chunk streams colour, background or motion go wrong in "
                      "5% of chunks (window 9, no sinks) and the shape in 12%; here the last of 20 chunks loses "
                      "its motion and its circle",
    "prompt_schedule": "shape past the trained 9 latent frames: the first segment (45 frames, seed 0) of the red "
                       "circle comes out square enough to read as one (seeds 1-3: circle, none, circle); long "
                       "streams misread the shape in 12% of chunks",
}


@pytest.fixture(scope="module")
def host(comfy_server):
    assert builtin_available(), "the built-in model (causvid_core/builtin/) is missing: the workflows need it"
    for png in ASSETS.glob("*.png"):  # what a user puts in ComfyUI's input/ folder for LoadImage
        shutil.copy(png, comfy_server.input_dir / png.name)
    return comfy_server


def run(host, name: str) -> tuple[dict, list[np.ndarray]]:
    api = json.loads((API / f"{name}.json").read_text())
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


def nodes_of(api: dict, cls: str) -> list[dict]:
    return [n["inputs"] for n in api.values() if n["class_type"] == cls]


def assert_follows(result: dict, what: str) -> None:
    wrong = {a: (result["expected"][a], result["detected"][a]) for a in ASSERTED if not result["correct"][a]}
    assert not wrong, f"{what}: asked for {result['prompt']!r}; wrong (asked, seen): {wrong}"


@pytest.mark.parametrize("name", NAMES)
def test_shipped_workflow_runs_and_shows_its_prompt(host, name):
    api, (video,) = run(host, name)
    try:
        check_content(api, name, video)
    except AssertionError as exc:
        if name in KNOWN_GAPS:
            pytest.xfail(f"known gap: {KNOWN_GAPS[name]} ({exc})")
        raise
    assert name not in KNOWN_GAPS, f"{name} now follows its prompt: remove it from KNOWN_GAPS"


def check_content(api: dict, name: str, video: np.ndarray) -> None:
    assert video.shape[1:] == (64, 64, 3)
    texts = [n["text"] for n in nodes_of(api, "CausalTextEncode")]
    if name == "prompt_schedule":
        (sched,) = nodes_of(api, "PromptSchedule")
        (state,) = nodes_of(api, "CausalKVState")
        assert len(video) == state["length"]
        events = parse_schedule(sched["schedule"])
        result = E.evaluate_schedule(video, [(e.frame, e.prompt) for e in events], value_range="uint8")
        for seg in result["segments"]:
            assert_follows(seg, f"segment from frame {seg['start']}")
        assert all(s["switched"] for s in result["switches"]), result["switches"]
    elif name == "video_to_video":
        source, target = texts  # CausalGenerate makes the source from the first, the restyle follows the second
        assert len(video) == nodes_of(api, "CausalGenerate")[0]["length"]
        assert_follows(E.evaluate_clip(video, target, value_range="uint8"), "restyled video")
    elif name == "endless_stream":
        (state,) = nodes_of(api, "CausalKVState")
        (sampler,) = nodes_of(api, "StreamChunkSampler")
        assert state["length"] == 0 and len(video) == 9 + 12 * (sampler["chunks"] - 1)
        stream = E.evaluate_stream(video, texts[0], first_chunk_frames=9, value_range="uint8")
        assert_follows(stream["chunks"][-1], "last chunk of the endless stream")
        assert_follows(E.evaluate_clip(video, texts[0], value_range="uint8"), "whole stream")
    else:
        lengths = [n["length"] for n in nodes_of(api, "CausalKVState") + nodes_of(api, "CausalGenerate")]
        assert len(video) == lengths[0]
        assert_follows(E.evaluate_clip(video, texts[0], value_range="uint8"), name)
        if name == "image_to_video":
            (img,) = nodes_of(api, "LoadImage")
            from PIL import Image
            start = np.asarray(Image.open(ASSETS / img["image"]).convert("RGB")).astype(np.float32)
            assert np.abs(video[0].astype(np.float32) - start).mean() < 12.0, "the video does not start from the image"
