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

    def sink(frames, stats):
        shown.append(frames)
        if stats.chunks == 2:  # as a page would, while the session runs: from another thread
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

    def sink(frames, stats):
        kept.append(frames.shape[0])  # only the count: the session itself keeps no frames
        if stats.chunks == 3:
            session.stop()

    session.sinks = (sink,)
    stats = session.run()
    assert stats.chunks == 3 and sum(kept) == stats.frames
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


def test_causvid_live_server_streams_steers_stops_and_records(tmp_path):
    """The `causvid live` app in-process (aiohttp's test server on 127.0.0.1): frames reach a websocket while
    the session runs, a prompt steers it, a foreign Origin is refused, Stop finalises a playable recording."""
    import asyncio

    import aiohttp
    from aiohttp.test_utils import TestServer

    from causvid_core.live.server import LiveServer

    comps = tiny_components()
    server = LiveServer(lambda seed: _stream(comps, seed=seed), tmp_path / "rec")

    async def scenario():
        async with TestServer(server.app(), host="127.0.0.1") as ts, aiohttp.ClientSession() as http:
            url = lambda p: str(ts.make_url(p))  # noqa: E731
            page = await (await http.get(url("/"))).text()
            assert "window.causvidLive" in page
            ws = await http.ws_connect(url("/ws"))
            r = await http.post(url("/api/start"), json={"prompt": A, "seed": 3})
            assert r.status == 200, await r.text()
            assert (await http.post(url("/api/start"), json={"prompt": A})).status == 409
            frames, stats = 0, None
            while frames < 30 or stats is None:  # frames arrive while the session is still running
                msg = await ws.receive(timeout=60)
                if msg.type == aiohttp.WSMsgType.BINARY:
                    assert msg.data[:2] == b"\xff\xd8"  # JPEG
                    frames += 1
                else:
                    stats = json.loads(msg.data)
            assert server.session is not None and not server.session.stopped
            evil = await http.post(url("/api/prompt"), json={"text": B}, headers={"Origin": "http://evil.example"})
            assert evil.status == 403
            assert (await http.post(url("/api/prompt"), json={"text": "  "})).status == 400
            assert (await http.post(url("/api/prompt"), data=b"not json")).status == 400
            ok = await http.post(url("/api/prompt"), json={"text": B}, headers={"Origin": str(ts.make_url("")).rstrip("/")})
            assert ok.status == 200, await ok.text()
            while server.session.stats.prompt != B:
                await asyncio.sleep(0.01)
            status = await (await http.post(url("/api/stop"))).json()
            assert not status["running"] and len(status["recordings"]) == 1
            assert (await http.post(url("/api/prompt"), json={"text": A})).status == 409
            await ws.close()
            return status

    status = asyncio.run(scenario())
    shown = server.session.stats.frames
    assert read_video(status["recordings"][0]).shape[0] == shown
    schedule = (tmp_path / "rec").glob("*/stream.schedule.txt")
    text = next(schedule).read_text()
    assert f": {B}" in text and text.startswith("# causvid live: seed 3")
