"""`causvid bench live`: a live session end to end, as a user watches it. `causvid live`'s server runs
in-process on a loopback port; a client plays its websocket's frames at 16 fps from a jitter buffer, like
the page's player, until `seconds` of video have been shown, then presses Stop.

Reported: frames per second the model makes (compute only) and the real-time factor, seconds to the first
frame (in the session, and at the player from the Start request), the player's stalls (an empty buffer
after playback began) and the frames the server dropped for it, and the process's resident memory after
the first 10 s of video, at the end and at most (growth = end - start), with the load the machine ran under.
"""
from __future__ import annotations

import asyncio
import json
import os
import tempfile
import time
from collections import deque
from typing import Optional

import torch

from ..bench import _stream_components, rss_mb
from ..stream import CausalStream, StreamSettings
from ..video_io import FPS
from .hub import unpack_frame
from .server import PREFIX, LiveServer
from .session import LEAD_S

PROMPT = "a red circle moving right on a black background"
JITTER = 4  # frames the player waits for before it starts, as player.js
WARMUP_S = 10.0  # seconds of video before the memory baseline is taken
DEFAULT_WINDOW = (12, 3)  # LongLive's window and sinks, for a model that brings none


def bench_live(seconds: float = 600.0, model_path: Optional[str] = None, size: int = 64,
               lead_s: Optional[float] = LEAD_S) -> dict:
    comps, source = _stream_components(model_path)
    fields = {**comps.stream_defaults, "max_frames": None}
    if not fields.get("window_frames") and not fields.get("kv_recompute_frames"):
        fields["window_frames"], fields["sink_frames"] = DEFAULT_WINDOW
    sf = comps.vae.config.space_factor

    def make_stream(seed: int) -> CausalStream:
        return CausalStream(comps.model, StreamSettings.from_fields({**fields, "seed": seed}),
                            latent_hw=(size // sf, size // sf), vae=comps.vae, text_encoder=comps.text_encoder)

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="causvid-bench-live-") as out:
        server = LiveServer(make_stream, out, size=(size, size), lead_s=lead_s)
        result = asyncio.run(_drive(server, seconds))
    return {"bench": "live", "model": source, "size": f"{size}x{size}",
            "window_frames": fields["window_frames"], "sink_frames": fields.get("sink_frames", 0),
            "lead_s": lead_s, "threads": torch.get_num_threads(), **result,
            "load": [round(x, 2) for x in load_before] + [round(x, 2) for x in os.getloadavg()]}


async def _drive(server: LiveServer, seconds: float) -> dict:
    import aiohttp
    from aiohttp import web

    runner = web.AppRunner(server.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    base = f"http://127.0.0.1:{port}{PREFIX}"
    try:
        async with aiohttp.ClientSession() as http:
            ws = await http.ws_connect(f"{base}/ws", max_msg_size=0)
            t_start = time.perf_counter()
            r = await http.post(f"{base}/start", json={"prompt": PROMPT})
            if r.status != 200:
                raise RuntimeError(f"the live server refused to start: {await r.text()}")
            return await _play(ws, http, base, seconds, t_start)
    finally:
        await runner.cleanup()


async def _play(ws, http, base: str, seconds: float, t_start: float) -> dict:
    """Receive frames into a buffer and show one per 1/16 s tick once JITTER frames wait, like player.js."""
    import aiohttp

    queue: deque = deque()
    state = {"stats": None, "ended": None, "first_frame_page_s": None}

    async def receive() -> None:
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.BINARY:
                header, _ = unpack_frame(msg.data)
                if header["kind"] == "out":
                    if state["first_frame_page_s"] is None:
                        state["first_frame_page_s"] = time.perf_counter() - t_start
                    queue.append(header["frame"])
            elif msg.type == aiohttp.WSMsgType.TEXT:
                data = json.loads(msg.data)
                if data["type"] == "stats":
                    state["stats"] = data
                elif data["type"] == "ended":
                    state["ended"] = data
                    return

    receiver = asyncio.create_task(receive())
    target = int(seconds * FPS)
    shown = stalls = 0
    buffering = True
    rss_start = rss_max = None
    tick = time.perf_counter()
    while shown < target and state["ended"] is None:
        tick += 1 / FPS
        await asyncio.sleep(max(0.0, tick - time.perf_counter()))
        if buffering and len(queue) < JITTER:
            continue
        if not queue:
            stalls += 1
            buffering = True
            continue
        queue.popleft()
        shown += 1
        buffering = False
        if shown % FPS == 0:
            rss = rss_mb()
            rss_max = max(rss_max or 0.0, rss)
            if rss_start is None and shown >= WARMUP_S * FPS:
                rss_start = rss
    rss_end = rss_mb()
    await http.post(f"{base}/stop", json={})
    await asyncio.wait_for(receiver, timeout=120)
    stats = state["ended"]["stats"] if state["ended"] else state["stats"]
    if state["ended"] and state["ended"].get("error"):
        raise RuntimeError(f"the live session failed: {state['ended']['error']}")
    return {"seconds_shown": round(shown / FPS, 1), "frames_shown": shown, "frames_made": stats["frames"],
            "fps_made": stats["fps"], "real_time_factor": stats["real_time_factor"],
            "first_frame_s": stats["first_frame_s"],
            "first_frame_page_s": round(state["first_frame_page_s"], 3),
            "stalls": stalls, "dropped": (state["ended"] or state["stats"] or {}).get("dropped", 0),
            "rss_start_mb": None if rss_start is None else round(rss_start, 1), "rss_end_mb": round(rss_end, 1),
            "rss_max_mb": None if rss_max is None else round(rss_max, 1),
            "rss_growth_mb": None if rss_start is None else round(rss_end - rss_start, 1),
            "wall_s": round(time.perf_counter() - t_start, 1)}
