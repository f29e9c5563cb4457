"""Live streaming in a real browser (headless Debian chromium, as tests/test_browser.py drives it):

- in a real ComfyUI (tests/comfy_host.py) with the shipped workflows/live_stream.json: frames reach the
  LiveStream node's player while the node runs and the player advances; a prompt typed in the player's box
  changes the stream at the next chunk, judged from the pixels by the Shapes World evaluator; Stop ends the
  run; the saved video holds every frame made (at least every frame shown) and its saved schedule replays to
  the same frames;
- the same through `causvid live`'s own page;
- camera video-to-video: chromium's fake camera plays a rendered Shapes World clip of a red circle, the page
  sends it to `causvid live`, and the restyled frames come back live, beside their input, in the prompt's
  colour.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import av
import numpy as np
import pytest

from causvid_core import evaluate as E
from causvid_core import world
from causvid_core.live.recorder import SegmentRecorder
from causvid_core.schedule import parse_schedule, snap_schedule
from comfy_host import HOST, ROOT, comfy_any, comfy_server, comfy_server_2024, free_port  # noqa: F401 (fixtures)
from test_browser import (CHROMIUM_ARGS, artifacts_dir, browser_page, chromium_executable,  # noqa: F401 (fixtures)
                          click_queue, foreign_requests, load_workflow, local_only, open_comfyui)

RED = "a red circle moving right on a black background"
BLUE = "a blue circle moving right on a black background"
WORKFLOW = ROOT / "workflows" / "live_stream.json"
BEFORE_SWITCH = 24  # frames the player shows before the prompt is typed
AFTER_SWITCH = 48  # frames it shows after the new prompt took effect, before Stop
WAIT_MS = 120_000  # bounds on waiting, not timed assertions
CODING_ERROR = 2.0  # mean absolute difference per frame (0-255) two MP4 codings of the same frames stay under
LIVE_VIEWPORT = {"width": 1800, "height": 1500}  # the LiveStream node (420 x 700) below the workflow's note


# ---- checks shared by both pages --------------------------------------------------------------------------

def decode(data: bytes) -> np.ndarray:
    with av.open(io.BytesIO(data)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def replay(schedule: str, frames: int, folder: Path) -> np.ndarray:
    """The built-in model's stream under a saved schedule (seed and mode from its header), recorded the way
    the live session records (a segment per chunk, joined) and decoded."""
    import torch

    from causvid_core.pipeline import load_components
    from causvid_core.stream import CausalStream, StreamSettings, run_schedule
    from causvid_core.video_io import frames_uint8

    head = schedule.splitlines()[0]
    seed = int(head.split("seed ")[1].split(",")[0])
    mode = head.split("switch mode ")[1].split(",")[0]
    comps = load_components()
    settings = StreamSettings.from_fields({**comps.stream_defaults, "seed": seed, "max_frames": None})
    stream = CausalStream(comps.model, settings, latent_hw=(8, 8), vae=comps.vae, text_encoder=comps.text_encoder)
    n_chunks = 1 + -(-(frames - 9) // 12)
    by_chunk, notices = snap_schedule(parse_schedule(schedule), [settings.chunk_size(i) for i in range(n_chunks)])
    assert not notices, notices  # every applied prompt sits on a chunk start
    rec = SegmentRecorder(folder)
    with torch.no_grad():
        for chunk in run_schedule(stream, by_chunk, count=n_chunks, mode=mode):
            rec(frames_uint8(chunk.frames))
    return decode(rec.finalize().read_bytes())


def check_recording(video: np.ndarray, schedule: str, shown: int, tmp_path: Path) -> None:
    events = parse_schedule(schedule)
    assert [e.prompt for e in events] == [RED, BLUE], schedule
    switch = events[1].frame
    assert len(video) >= shown, f"the recording has {len(video)} frames, the page showed {shown}"
    # the prompt typed in the page: the colour changes at the chunk where it was applied
    result = E.evaluate_schedule(video, [(0, RED), (switch, BLUE)], value_range="uint8")
    colours = [(s["start"], s["expected"]["colour"], s["detected"]["colour"]) for s in result["segments"]]
    assert all(exp == got for _, exp, got in colours), colours
    assert all(s["switched"] for s in result["switches"]), result["switches"]
    # the schedule saved beside the video replays it: the same frames up to the MP4 coding (x264 does not give
    # the same file twice for the same frames here, so the replay is compared frame by frame with its coding
    # error), and far from a replay without the switch
    again = replay(schedule, len(video), tmp_path / "replay")[:len(video)]
    per_frame = np.abs(again.astype(np.int16) - video.astype(np.int16)).mean(axis=(1, 2, 3))
    assert per_frame.max() < CODING_ERROR, f"the replay differs: per-frame mean error up to {per_frame.max():.2f}"
    unswitched = replay(schedule.split("\n" + str(switch) + ":")[0] + "\n", len(video), tmp_path / "control")
    control = np.abs(unswitched[switch + 12:len(video)].astype(np.int16) - video[switch + 12:].astype(np.int16))
    assert control.mean(axis=(1, 2, 3)).min() > 4 * CODING_ERROR, "the replay would match without the switch too"


def live_state(page, expr: str = "window.causvidLive") -> dict:
    return page.evaluate(f"""() => {{
        const p = {expr};
        return {{ framesShown: p.framesShown, running: p.running, prompt: p.prompt,
                  recording: (p.active || p).recording ?? null, error: (p.active || p).error ?? null,
                  stats: (p.active || p).stats ?? null, stalls: (p.active || p).stalls ?? 0 }};
    }}""")


def canvas_mean(page, which: str) -> list[float]:
    """Mean RGB of what the player's canvas shows (data-causvid=live-output / live-input)."""
    return page.evaluate("""(which) => {
        const c = document.querySelector(`canvas[data-causvid="${which}"]`);
        const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
        const m = [0, 0, 0];
        for (let i = 0; i < d.length; i += 4) { m[0] += d[i]; m[1] += d[i + 1]; m[2] += d[i + 2]; }
        return m.map((v) => v / (d.length / 4));
    }""", which)


def steer_in_page(page, scope: str) -> int:
    """Type the new prompt in the player's box and press Send, as a user does; returns the frames shown then."""
    page.wait_for_function(f"() => window.causvidLive.framesShown >= {BEFORE_SWITCH}", timeout=WAIT_MS)
    state = live_state(page)
    assert state["running"], f"the stream stopped before it was steered: {state}"
    page.locator(f"{scope} input[type=text]").fill(BLUE)
    page.locator(f"{scope} button", has_text="Send").click()
    page.wait_for_function(f"() => window.causvidLive.prompt === {json.dumps(BLUE)}", timeout=WAIT_MS)
    at = live_state(page)["framesShown"]
    page.wait_for_function(f"() => window.causvidLive.framesShown >= {at + AFTER_SWITCH}", timeout=WAIT_MS)
    return at


@pytest.fixture
def live_page(chromium_executable):
    """A chromium page large enough for the LiveStream node, non-local requests aborted; a fake camera that
    plays `camera_file` when the test sets it before opening a page (page_for)."""
    from playwright.sync_api import sync_playwright

    report = {"blocked": [], "page_errors": []}
    route = local_only(report)

    with sync_playwright() as pw:
        browsers = []

        def page_for(camera_file: Path | None = None):
            args = list(CHROMIUM_ARGS)
            if camera_file is not None:
                args += ["--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                         f"--use-file-for-fake-video-capture={camera_file}"]
            browser = pw.chromium.launch(executable_path=chromium_executable, headless=True, args=args)
            browsers.append(browser)
            context = browser.new_context(viewport=LIVE_VIEWPORT)
            context.route("**/*", route)
            page = context.new_page()
            page.on("pageerror", lambda e: report["page_errors"].append(str(e)))
            return page

        try:
            yield page_for, report
        finally:
            for b in browsers:
                b.close()


def screenshot(page, name: str) -> None:
    try:
        page.screenshot(path=str(artifacts_dir() / f"{name}.png"))
    except Exception:  # noqa: BLE001 - the test's own outcome stands
        pass


# ---- ComfyUI (both trees) ------------------------------------------------------------------------------------------------

def test_live_stream_in_comfyui_plays_steers_stops_and_replays(comfy_any, live_page, tmp_path):
    """In ComfyUI 0.3.75's current frontend and in the 2024 legacy one."""
    comfy_server = comfy_any
    page_for, report = live_page
    page = page_for()
    try:
        open_comfyui(page, comfy_server.url)
        load_workflow(page, json.loads(WORKFLOW.read_text()))
        page.wait_for_function("() => window.causvidLive.players.size === 1", timeout=WAIT_MS)
        click_queue(page)
        # frames reach the page while the node still runs, and the player advances
        page.wait_for_function("() => window.causvidLive.framesShown >= 8", timeout=WAIT_MS)
        status = json.loads(comfy_server.request("GET", "/causvid/live/status")[1])
        running = [s for s in status["sessions"] if s["running"]]
        assert len(running) == 1 and running[0]["node"] == "3", status
        assert max(canvas_mean(page, "live-output")) > 5, "the player's canvas shows nothing"

        # another site open in the same browser can neither steer nor stop it (the 2024 ComfyUI has no origin
        # check of its own: the pack's routes check)
        for path in ("/causvid/live/prompt", "/causvid/live/stop"):
            req = urllib.request.Request(comfy_server.url + path, data=json.dumps({"text": BLUE}).encode(),
                                         method="POST", headers={"Origin": "http://evil.example",
                                                                 "Content-Type": "application/json"})
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(req, timeout=10)
            assert refused.value.code == 403
        at = steer_in_page(page, 'div[data-causvid="live"]')
        page.locator('div[data-causvid="live"] button', has_text="Stop").click()
        page.wait_for_function("() => !window.causvidLive.running && window.causvidLive.active.recording",
                               timeout=WAIT_MS)
        state = live_state(page)
        assert state["error"] is None, state
        stats = state["stats"]
        assert stats["ended"] == "stop" and stats["first_frame_s"] is not None and stats["fps"] > 0, stats

        # the run ends as a success in ComfyUI's history, with the recording as the node's output
        history = json.loads(comfy_server.request("GET", "/history")[1])
        entry = next(e for e in history.values() if "3" in e.get("outputs", {}) and
                     e["outputs"]["3"].get("causvid_live", [{}])[0].get("frames") == stats["frames"])
        assert entry["status"]["status_str"] == "success", entry["status"]
        (item,) = entry["outputs"]["3"]["causvid_videos"]
        video = decode(comfy_server.view(item["filename"], item["subfolder"]))
        assert len(video) == stats["frames"]
        schedule = (comfy_server.output_dir / item["subfolder"] / "stream.schedule.txt").read_text()
        assert parse_schedule(schedule)[1].frame <= at + 12 + 24  # within a chunk after the buffered lead
        check_recording(video, schedule, state["framesShown"], tmp_path)
        assert not report["page_errors"] and not foreign_requests(report), report
    finally:
        screenshot(page, f"live_comfyui_{comfy_server.tree}")


# ---- causvid live -------------------------------------------------------------------------------------------

class CausvidLive:
    """`causvid live` in a subprocess on a free loopback port."""

    def __init__(self, out_dir: Path, *extra: str):
        self.out_dir, self.port = out_dir, free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.log = out_dir.parent / f"causvid_live_{self.port}.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "causvid_core.cli", "live", "--port", str(self.port),
                                          "--out-dir", str(out_dir), *extra], cwd=ROOT, stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                urllib.request.urlopen(self.url + "/live/status", timeout=2).read()
                return
            except OSError:
                time.sleep(0.2)
        raise TimeoutError(self.log.read_text())

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture
def causvid_live(tmp_path):
    servers = []

    def start(*extra):
        servers.append(CausvidLive(tmp_path / f"rec{len(servers)}", *extra))
        return servers[-1]
    yield start
    for s in servers:
        s.close()


def test_causvid_live_page_plays_steers_stops_and_replays(live_page, causvid_live, tmp_path):
    page_for, report = live_page
    server = causvid_live()
    page = page_for()
    try:
        page.goto(server.url)
        page.wait_for_function("() => window.causvidLive && window.causvidLive.start", timeout=WAIT_MS)
        page.locator("#prompt").fill(RED)
        page.click("#start")
        page.wait_for_function("() => window.causvidLive.framesShown >= 8", timeout=WAIT_MS)
        assert live_state(page)["running"]
        steer_in_page(page, "#player")
        page.locator("#player button", has_text="Stop").click()
        page.wait_for_function("() => !window.causvidLive.running && window.causvidLive.recording", timeout=WAIT_MS)
        state = live_state(page)
        assert state["error"] is None and state["stats"]["ended"] == "stop", state
        recording = Path(state["recording"])
        assert recording.parent.parent == server.out_dir
        video = decode(recording.read_bytes())
        assert len(video) == state["stats"]["frames"]
        check_recording(video, (recording.parent / "stream.schedule.txt").read_text(), state["framesShown"], tmp_path)
        assert not report["page_errors"] and not foreign_requests(report), report
    finally:
        screenshot(page, "live_page")


def write_y4m(path: Path, frames: np.ndarray, fps: int = 16) -> None:
    """uint8 RGB frames [T, H, W, 3] -> a YUV4MPEG2 file (4:2:0, full-range BT.601), chromium's fake camera."""
    t, h, w, _ = frames.shape
    rgb = frames.astype(np.float32)
    y = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
    u = 128 + (rgb[..., 2] - y) * 0.564
    v = 128 + (rgb[..., 0] - y) * 0.713
    sub = lambda c: c.reshape(t, h // 2, 2, w // 2, 2).mean(axis=(2, 4))  # noqa: E731
    planes = [np.clip(np.rint(p), 0, 255).astype(np.uint8) for p in (y, sub(u), sub(v))]
    with open(path, "wb") as f:
        f.write(f"YUV4MPEG2 W{w} H{h} F{fps}:1 Ip A1:1 C420jpeg\n".encode())
        for i in range(t):
            f.write(b"FRAME\n")
            for p in planes:
                f.write(p[i].tobytes())


def test_camera_video_to_video_restyles_a_fake_camera_live(live_page, causvid_live, tmp_path):
    spec = world.spec_from_prompt(RED, np.random.default_rng(0))
    camera = tmp_path / "camera.y4m"
    write_y4m(camera, world.render(spec, 64))  # chromium plays it in a loop
    page_for, report = live_page
    server = causvid_live()
    page = page_for(camera)
    try:
        page.goto(server.url)
        page.wait_for_function("() => window.causvidLive && window.causvidLive.start", timeout=WAIT_MS)
        page.locator("#prompt").fill(BLUE)
        page.select_option("#source", "camera")
        page.click("#start")
        page.wait_for_function("() => window.causvidLive.framesShown >= 45", timeout=WAIT_MS)
        state = live_state(page)
        assert state["running"] and page.evaluate("() => window.causvidLive.camera"), state
        inp, out = canvas_mean(page, "live-input"), canvas_mean(page, "live-output")
        page.locator("#player button", has_text="Stop").click()
        page.wait_for_function("() => !window.causvidLive.running && window.causvidLive.recording", timeout=WAIT_MS)
        state = live_state(page)
        assert state["error"] is None and state["stats"]["source"] == "camera", state
        assert state["stats"]["input_errors"] == 0, state
        # beside each other in the page: the red input, the restyled output in the prompt's colour
        assert inp[0] > inp[2] and out[2] > out[0], (inp, out)
        video = decode(Path(state["recording"]).read_bytes())
        result = E.evaluate_clip(video, BLUE, value_range="uint8")
        assert result["detected"]["colour"] == "blue", result["detected"]
        assert not report["page_errors"] and not foreign_requests(report), report
    finally:
        screenshot(page, "live_camera")
