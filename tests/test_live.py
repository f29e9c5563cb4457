"""The live session core: prompts steered from another thread take effect at the next chunk, the applied
schedule replays the stream frame for frame, memory stays flat (nothing accumulates), and the recording
plays at any stop."""
from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch

from causvid_core.live import LiveSession, PromptInbox, SegmentRecorder
from causvid_core.schedule import parse_schedule, snap_schedule
from causvid_core.stream import CausalStream, StreamSettings, run_schedule
from causvid_core.video_io import frames_uint8, read_video
from conftest import tiny_components

A = "a red circle moving right on a black background"
B = "a blue square moving up on a gray background"


def _stream(comps, **kw):
    fields = dict(max_frames=None, window_frames=6, sink_frames=2, seed=3)
    fields.update(kw)
    return CausalStream(comps.model, StreamSettings(**fields), latent_hw=(4, 4), vae=comps.vae,
                        text_encoder=comps.text_encoder)


@pytest.mark.parametrize("mode", ["cut", "recache", "blend"])
def test_a_prompt_sent_while_it_runs_takes_effect_at_the_next_chunk_and_the_schedule_replays(mode):
    comps = tiny_components()
    shown: list[torch.Tensor] = []
    session = None

    def sink(chunk):
        shown.append(chunk.frames)
        if chunk.index == 1:  # as a page would, while the session runs: from another thread
            t = threading.Thread(target=session.submit_prompt, args=(B,))
            t.start()
            t.join()

    session = LiveSession(_stream(comps), A, mode=mode, sinks=(sink,), max_frames=60)
    stats = session.run()
    assert stats.chunks == 6 and stats.frames == 9 + 5 * 12 and len(shown) == 6
    assert session.applied == [(0, A), (21, B)]  # after chunk 2 (frames 0-20): from frame 21
    assert stats.prompt == B and stats.first_frame_s is not None and stats.fps > 0

    events = parse_schedule(session.schedule_text())
    replay = _stream(comps)
    layout = [replay.settings.chunk_size(i) for i in range(6)]
    by_chunk, notices = snap_schedule(events, layout)
    assert not notices  # every change already sits on a chunk start
    again = [frames_uint8(c.frames) for c in run_schedule(replay, by_chunk, count=6, mode=mode)]
    for x, y in zip(shown, again):
        assert torch.equal(x, y)


def test_stop_from_another_thread_ends_after_the_chunk_in_flight_and_nothing_accumulates():
    comps = tiny_components()
    session = LiveSession(_stream(comps), A)
    kept = []

    def sink(chunk):
        kept.append(chunk.frames.shape[0])  # only the count: the session itself keeps no frames
        if chunk.index == 2:
            session.stop()

    session.sinks = (sink,)
    stats = session.run()
    assert stats.chunks == 3 and sum(kept) == stats.frames and stats.ended == "stop"
    assert not hasattr(session, "frames") and session.stopped
    with pytest.raises(ValueError, match="ended"):
        session.submit_prompt(B)


def test_bad_prompts_are_refused_with_a_reason():
    inbox = PromptInbox(max_chars=50)
    for bad, why in (("", "empty"), ("   \n ", "empty"), ("x" * 51, "at most 50"), (None, "text")):
        with pytest.raises(ValueError, match=why):
            inbox.submit(bad)
    assert inbox.submit("  a  red\ncircle ") == "a red circle" and inbox.take() == "a red circle"
    assert inbox.take() is None


def test_the_recording_plays_at_any_stop(tmp_path):
    comps = tiny_components()
    rec = SegmentRecorder(tmp_path / "live")
    session = LiveSession(_stream(comps), A, sinks=(rec,), max_frames=40)
    stats = session.run()
    assert len(rec.segments) == stats.chunks and all(read_video(p).shape[0] > 0 for p in rec.segments)
    out = rec.finalize(session.schedule_text())
    assert read_video(out).shape == (stats.frames, 32, 32, 3)
    assert (tmp_path / "live" / "stream.schedule.txt").read_text().startswith("# causvid live")
    with pytest.raises(FileExistsError, match="empty folder"):
        SegmentRecorder(tmp_path / "live")

    # a crash: two chunks written, the third in flight (its temporary file never renamed)
    crashed = SegmentRecorder(tmp_path / "crash")
    frames = np.zeros((9, 32, 32, 3), np.uint8)
    crashed(frames)
    crashed(np.zeros((12, 32, 32, 3), np.uint8))
    (tmp_path / "crash" / "seg_000002.mp4.part").write_bytes(b"half a file")
    out = SegmentRecorder.recover(tmp_path / "crash")
    assert read_video(out).shape[0] == 21


# ---- the transport: `causvid live`'s app in-process (aiohttp's test server on 127.0.0.1) ------------------

def _frames_of(msgs):
    from causvid_core.live.hub import unpack_frame

    return [unpack_frame(m) for m in msgs]


async def _receive_until(ws, predicate, timeout=60):
    """Messages of one page until predicate(binary frames, json messages) holds; returns both lists."""
    import aiohttp

    from causvid_core.live.hub import unpack_frame

    frames, texts = [], []
    while not predicate(frames, texts):
        msg = await ws.receive(timeout=timeout)
        if msg.type == aiohttp.WSMsgType.BINARY:
            frames.append(unpack_frame(msg.data))
        elif msg.type == aiohttp.WSMsgType.TEXT:
            texts.append(json.loads(msg.data))
        else:
            raise AssertionError(f"the websocket closed: {msg}")
    return frames, texts


def _server(tmp_path, comps, **kw):
    from causvid_core.live.server import LiveServer

    return LiveServer(lambda seed: _stream(comps, seed=seed), tmp_path / "rec", size=(32, 32), lead_s=None, **kw)


def test_causvid_live_server_streams_steers_stops_and_records(tmp_path):
    """Frames reach two pages while the session runs, either page steers it, a page that leaves changes
    nothing, a foreign Origin is refused, bad requests get a reason, Stop finalises a playable recording."""
    import asyncio

    import aiohttp
    from aiohttp.test_utils import TestServer

    comps = tiny_components()
    server = _server(tmp_path, comps)

    async def scenario():
        async with TestServer(server.app(), host="127.0.0.1") as ts, aiohttp.ClientSession() as http:
            url = lambda p: str(ts.make_url(p))  # noqa: E731
            own = {"Origin": str(ts.make_url("")).rstrip("/")}
            page = await (await http.get(url("/"))).text()
            assert "window.causvidLive" in page
            assert "createLivePlayer" in await (await http.get(url("/live/player.js"))).text()
            assert (await http.get(url("/live/ws"), headers={"Origin": "http://evil.example"})).status == 403
            ws, ws2 = await http.ws_connect(url("/live/ws")), await http.ws_connect(url("/live/ws"))
            assert (await http.post(url("/live/prompt"), json={"text": B})).status == 409  # nothing runs yet
            r = await http.post(url("/live/start"), json={"prompt": A, "seed": 3}, headers=own)
            assert r.status == 200, await r.text()
            sid = (await r.json())["session"]
            assert (await http.post(url("/live/start"), json={"prompt": A})).status == 409
            for bad in ({"prompt": A, "seed": -1}, {"prompt": "", "seed": 1}, {"prompt": A, "source": "x"}):
                assert (await http.post(url("/live/start"), json=bad)).status in (400, 409)
            frames, texts = await _receive_until(ws, lambda f, t: len(f) >= 30 and any(m["type"] == "stats" for m in t))
            assert texts[0]["type"] == "session" and texts[0]["session"] == sid and texts[0]["source"] == "text"
            assert all(h["session"] == sid and h["kind"] == "out" and d[:2] == b"\xff\xd8" for h, d in frames)
            assert [h["frame"] for h, _ in frames] == list(range(len(frames)))  # in order, none lost
            assert not server.session.stopped  # frames arrive while the session is still running
            await ws2.close()  # a page that goes away mid-stream: the stream goes on
            evil = await http.post(url("/live/prompt"), json={"text": B}, headers={"Origin": "http://evil.example"})
            assert evil.status == 403
            for bad, code in (({"text": "  "}, 400), ({"text": "x" * 3000}, 400), ({"text": 5}, 400),
                              ({"session": "nope", "text": B}, 404), ({"session": ["x"], "text": B}, 404)):
                assert (await http.post(url("/live/prompt"), json=bad)).status == code, bad
            assert (await http.post(url("/live/prompt"), data=b"not json")).status == 400
            assert (await http.post(url("/live/prompt"), data=b"x" * 100_000)).status == 413
            ok = await http.post(url("/live/prompt"), json={"session": sid, "text": B}, headers=own)
            assert ok.status == 200, await ok.text()
            _, texts = await _receive_until(ws, lambda f, t: any(m.get("prompt") == B for m in t if m["type"] == "stats"))
            stop = await http.post(url("/live/stop"), json={"session": sid}, headers=own)
            assert stop.status == 200
            _, texts = await _receive_until(ws, lambda f, t: any(m["type"] == "ended" for m in t))
            ended = next(m for m in texts if m["type"] == "ended")
            assert ended["stats"]["ended"] == "stop" and ended["error"] is None and ended["recording"]
            late = await http.post(url("/live/prompt"), json={"session": sid, "text": A})
            assert late.status == 409 and "ended" in (await late.json())["error"]
            status = await (await http.get(url("/live/status"))).json()
            await ws.close()
            return ended, status

    ended, status = asyncio.run(scenario())
    shown = server.session.stats.frames
    assert server.session.stream is None and server.session.encode is None  # an ended session keeps its stats only
    assert read_video(ended["recording"]).shape[0] == shown  # every frame made is in the recording
    assert status["sessions"][0]["running"] is False
    text = next((tmp_path / "rec").glob("*/stream.schedule.txt")).read_text()
    assert f": {B}" in text and text.startswith("# causvid live: seed 3")


def _jpeg(rgb):
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((48, 40, 3), rgb, np.uint8)).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def test_camera_frames_from_a_page_are_restyled_and_bad_ones_do_not_break_the_stream(tmp_path):
    """A camera stream: a page sends frames (any size, scaled and cropped to the stream), the server sends
    back each output frame with the input it restyles; malformed frames are counted and answered with a
    reason, never raised; frames for a stream that takes no camera are refused."""
    import asyncio

    import aiohttp
    from aiohttp.test_utils import TestServer

    from causvid_core.live.hub import pack_frame

    comps = tiny_components()
    server = _server(tmp_path, comps, strength=0.5)

    async def scenario():
        async with TestServer(server.app(), host="127.0.0.1") as ts, aiohttp.ClientSession() as http:
            url = lambda p: str(ts.make_url(p))  # noqa: E731
            ws = await http.ws_connect(url("/live/ws"))
            r = await http.post(url("/live/start"), json={"prompt": A, "source": "camera"})
            assert r.status == 200, await r.text()
            sid = (await r.json())["session"]
            for bad in (b"", b"abc", pack_frame({"session": sid}, b"not an image"), pack_frame({"session": "x"}, b"1"),
                        b"\x00\x00\xff\xff{}"):
                await ws.send_bytes(bad)
            for i in range(40):  # a camera at its own pace
                await ws.send_bytes(pack_frame({"session": sid}, _jpeg((200, 30, 30) if i % 2 else (30, 30, 200))))
                await asyncio.sleep(0.005)
            frames, texts = await _receive_until(
                ws, lambda f, t: sum(h["kind"] == "out" for h, _ in f) >= 21 and sum(m["type"] == "error" for m in t) >= 4)
            await http.post(url("/live/stop"), json={"session": sid})
            _, ended = await _receive_until(ws, lambda f, t: any(m["type"] == "ended" for m in t))
            # the page's camera runs on a moment after the end: its frames are dropped, not called an error
            await ws.send_bytes(pack_frame({"session": sid}, _jpeg((200, 30, 30))))
            await ws.send_bytes(b"abc")  # a marker: the answer to this frame comes after the one above
            _, late = await _receive_until(ws, lambda f, t: any(m["type"] == "error" for m in t))
            await ws.close()
            late_errors = [m["error"] for m in late if m["type"] == "error"]
            assert len(late_errors) == 1 and "does not take a camera" not in late_errors[0], late_errors
            return frames, texts + ended

    frames, texts = asyncio.run(scenario())
    outs = [h["frame"] for h, _ in frames if h["kind"] == "out"]
    ins = [h["frame"] for h, _ in frames if h["kind"] == "in"]
    assert outs[:21] == list(range(21)) and ins[:21] == list(range(21))  # each output beside its input
    errors = [m["error"] for m in texts if m["type"] == "error"]
    assert any("not an image" in e or "header" in e for e in errors) and any("does not take a camera" in e for e in errors)
    ended = next(m for m in texts if m["type"] == "ended")
    assert ended["error"] is None and ended["stats"]["source"] == "camera" and ended["stats"]["input_errors"] >= 1


def test_sources_stream_a_file_and_the_world_at_the_stream_size(tmp_path):
    from causvid_core import world
    from causvid_core.live.sources import VideoFileSource, WorldSource
    from causvid_core.video_io import write_mp4

    spec = world.spec_from_prompt(A, np.random.default_rng(0))
    write_mp4(tmp_path / "in.mp4", world.render(spec, 20))
    src = VideoFileSource(tmp_path / "in.mp4", 32, 48)
    first, second = src.take(9), src.take(9)
    assert first.shape == (9, 32, 48, 3) and second.shape == (9, 32, 48, 3) and src.take(9) is None
    looped = VideoFileSource(tmp_path / "in.mp4", 32, 32, loop=True)
    assert all(looped.take(12) is not None for _ in range(4))  # 48 frames from a 20-frame file
    assert WorldSource(A, 64, 64).take(12).shape == (12, 64, 64, 3)
    (tmp_path / "bad.mp4").write_bytes(b"not a video")
    with pytest.raises(ValueError, match="not a video"):
        VideoFileSource(tmp_path / "bad.mp4", 32, 32)
    with pytest.raises(FileNotFoundError):
        VideoFileSource(tmp_path / "missing.mp4", 32, 32)


def test_a_paced_session_keeps_to_real_time_and_a_world_source_is_restyled():
    """lead_s: the session runs at most that far ahead of the wall clock (the player never gets more than
    it can show); video-to-video from a Shapes World clip makes frame-aligned chunks."""
    import time

    from causvid_core.live.sources import WorldSource

    comps = tiny_components()
    seen = []
    session = LiveSession(_stream(comps), A, sinks=(lambda c: seen.append((time.perf_counter(), c)),), max_frames=9 + 12 * 3,
                          lead_s=0.5, source=WorldSource(B, 32, 32), strength=0.5)
    stats = session.run()
    assert stats.frames == 45 and stats.ended == "limit" and stats.source == "world"
    t0 = seen[0][0]
    for t, c in seen[1:]:  # chunk c starts once the video before it is at most 0.5 s ahead
        assert t - t0 >= c.first_frame / 16 - 0.5 - 1e-3
    assert all(c.inputs is not None and c.inputs.shape[0] == c.frames.shape[0] for _, c in seen)


def test_bench_live_plays_a_session_end_to_end():
    """`causvid bench live` (short here): the in-process server, a player at 16 fps, every number reported."""
    from causvid_core.live.bench import bench_live

    r = bench_live(seconds=2.0)
    assert r["bench"] == "live" and r["frames_shown"] == 32 and r["frames_made"] >= 32
    assert r["fps_made"] > 0 and r["first_frame_s"] > 0 and r["first_frame_page_s"] >= r["first_frame_s"]
    assert r["dropped"] == 0 and r["stalls"] >= 0 and r["rss_end_mb"] > 0 and len(r["load"]) == 6
    assert r["rss_growth_mb"] is None  # under the 10 s warm-up: no baseline, no growth claimed


def test_origin_check_same_host_and_port_unless_one_is_implicit():
    from types import SimpleNamespace

    from causvid_core.live.hub import origin_ok

    def req(host, origin):
        return SimpleNamespace(host=host, headers={} if origin is None else {"Origin": origin})

    assert origin_ok(req("127.0.0.1:8188", None))  # not a browser page
    assert origin_ok(req("127.0.0.1:8188", "http://127.0.0.1:8188"))
    assert origin_ok(req("example.com", "https://example.com:443"))  # a proxy in front: the port implicit
    assert not origin_ok(req("127.0.0.1:8188", "http://127.0.0.1:9999"))  # another local app
    assert not origin_ok(req("127.0.0.1:8188", "http://evil.example:8188"))
    assert not origin_ok(req("127.0.0.1:8188", "null"))


def test_a_camera_chunk_longer_than_the_queue_and_cancel_while_waiting():
    import threading

    from causvid_core.live.sources import CameraSource

    cam = CameraSource(32, 32)
    frame, done = _jpeg((200, 0, 0)), threading.Event()

    def feed():  # a camera: a frame every few milliseconds until the chunk is taken
        while not done.is_set():
            cam.put(frame)
            done.wait(0.002)
    threading.Thread(target=feed, daemon=True).start()
    try:
        assert cam.take(100).shape == (100, 32, 32, 3)  # a chunk of 100 frames, more than the default 48 queued
    finally:
        done.set()
    calls = []

    def cancel():
        calls.append(1)
        raise InterruptedError("Processing interrupted")
    slow = CameraSource(32, 32, check=cancel)
    with pytest.raises(InterruptedError):
        slow.take(9)
    assert calls


def test_fp8_tensors_are_checked_for_non_finite_values():
    from causvid_core.validate import all_finite

    ok = torch.randn(8).to(torch.float8_e4m3fn)
    bad = torch.tensor([1.0, float("nan")]).to(torch.float8_e4m3fn)
    assert all_finite(ok) and not all_finite(bad)
