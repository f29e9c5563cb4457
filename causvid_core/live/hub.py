"""The transport between live sessions and the pages that watch and steer them, for any aiohttp server:
`causvid live`'s own app and ComfyUI's PromptServer mount the same handlers.

Routes (under a prefix, e.g. /causvid/live):
- GET  {prefix}/ws         websocket. Server -> page: binary frames (4-byte big-endian header length, a JSON
                           header {"session", "kind": "out"|"in", "frame"}, JPEG bytes) and JSON messages
                           {"type": "session"|"stats"|"ended", "session", ...}. Page -> server: camera frames
                           in the same binary layout (header {"session"}, JPEG or PNG bytes).
- POST {prefix}/prompt     {"session"?, "text"}: the stream's prompt from its next chunk on
- POST {prefix}/stop       {"session"?}: the stream ends after the chunk in flight
- GET  {prefix}/status     every session this hub knows: running and recently ended
- GET  {prefix}/player.js  the player (player.js), one module for both pages
Without "session" the one running session is meant. Requests whose Origin is not the server's own are
refused (403), so another site open in the same browser cannot steer, stop or watch a stream.

Sessions run in worker threads; their frames cross to the event loop through call_soon_threadsafe into a
bounded queue per page (a page that falls behind loses its oldest frames, counted, instead of growing the
server's memory). A page that disconnects changes nothing for the stream or its recording.
"""
from __future__ import annotations

import asyncio
import io
import json
import struct
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .session import LiveChunk, LiveSession
from .sources import CameraSource

PLAYER = Path(__file__).with_name("player.js")
CLIENT_QUEUE_FRAMES = 96  # frames (input and output) buffered per page before the oldest are dropped
JPEG_QUALITY = 90
ENDED_KEPT = 16  # ended sessions remembered, so a late prompt gets "ended" rather than "no such stream"
MAX_PAGE_MESSAGE = 4 * 1024 * 1024  # a camera frame; aiohttp's default for a websocket message too
MAX_BODY = 64 * 1024  # a prompt is at most a few thousand characters


def pack_frame(header: dict, data: bytes) -> bytes:
    head = json.dumps(header, separators=(",", ":")).encode()
    return struct.pack(">I", len(head)) + head + data


def unpack_frame(msg: bytes) -> tuple[dict, bytes]:
    """(header, payload) of a binary message; ValueError when it is not one."""
    if len(msg) < 4:
        raise ValueError("a binary message shorter than its header length")
    (n,) = struct.unpack(">I", msg[:4])
    if n > 4096 or 4 + n > len(msg):
        raise ValueError("a binary message with a bad header length")
    try:
        header = json.loads(msg[4:4 + n])
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError("a binary message whose header is not JSON") from None
    if not isinstance(header, dict):
        raise ValueError("a binary message whose header is not a JSON object")
    return header, msg[4 + n:]


def origin_ok(request) -> bool:
    """A browser request from this server's own page (no Origin: not a browser page, e.g. curl or a test
    client, where nothing cross-site can happen): the same host name, and the same port unless one side
    leaves it implicit (a proxy in front, https on 443)."""
    from urllib.parse import urlsplit

    origin = request.headers.get("Origin")
    if origin is None:
        return True
    o, h = urlsplit(origin), urlsplit("//" + request.host)
    if not o.hostname or o.hostname.lower() != (h.hostname or "").lower():
        return False
    return o.port is None or h.port is None or o.port == h.port


def jpeg(frame, quality: int = JPEG_QUALITY) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


class _Page:
    """One connected page: its websocket and a bounded queue of messages waiting to be sent."""

    def __init__(self, ws, limit: int):
        self.ws, self.limit = ws, limit
        self.queue: deque = deque()
        self.frames = 0  # frames waiting in the queue
        self.dropped = 0
        self.wake = asyncio.Event()

    def put(self, item, is_frame: bool) -> None:
        if is_frame and self.frames >= self.limit:
            for i, (_, f) in enumerate(self.queue):
                if f:
                    del self.queue[i]
                    self.frames -= 1
                    self.dropped += 1
                    break
        self.queue.append((item, is_frame))
        self.frames += is_frame
        self.wake.set()

    def pop(self):
        item, is_frame = self.queue.popleft()
        self.frames -= is_frame
        return item, is_frame


@dataclass
class _Entry:
    session: LiveSession
    info: dict  # shown to pages: node, source, width, height, folder
    camera: Optional[CameraSource] = None
    result: dict = field(default_factory=dict)  # once ended: recording, error


class LiveHub:
    """Sessions are added from worker threads and read on the event loop: every walk over them takes a
    snapshot (list() of a dict runs without releasing the GIL)."""

    def __init__(self, queue_frames: int = CLIENT_QUEUE_FRAMES, jpeg_quality: int = JPEG_QUALITY):
        self.queue_frames, self.jpeg_quality = queue_frames, jpeg_quality
        self.sessions: "OrderedDict[str, _Entry]" = OrderedDict()
        self.pages: set[_Page] = set()
        self.loop: Optional[asyncio.AbstractEventLoop] = None

    # -- sessions (called from worker threads) ----------------------------------------------------------
    def add(self, session: LiveSession, camera: Optional[CameraSource] = None, **info: Any) -> str:
        """Register a session before it runs; returns its id. `info` goes to the pages (node, width, ...)."""
        sid = uuid.uuid4().hex[:12]
        self.sessions[sid] = _Entry(session, {k: v for k, v in info.items()}, camera)
        ended = [k for k, e in list(self.sessions.items()) if e.session.stopped]
        for k in ended[:-ENDED_KEPT]:
            del self.sessions[k]
        self._post({"type": "session", "session": sid, "prompt": session.first_prompt, **self._public(sid)}, False)
        return sid

    def sink(self, sid: str):
        """A LiveSession sink that sends each chunk's frames (and inputs) to every page, then the stats."""
        def send(chunk: LiveChunk) -> None:
            if not self.pages:  # nobody watching: nothing to encode
                return
            if chunk.inputs is not None:
                for i, f in enumerate(chunk.inputs[-len(chunk.frames):]):
                    self._post(pack_frame({"session": sid, "kind": "in", "frame": chunk.first_frame + i},
                                          jpeg(f, self.jpeg_quality)), True)
            for i, f in enumerate(chunk.frames.numpy()):
                self._post(pack_frame({"session": sid, "kind": "out", "frame": chunk.first_frame + i},
                                      jpeg(f, self.jpeg_quality)), True)
            self._post({"type": "stats", "session": sid, **chunk.stats.to_dict()}, False)
        return send

    def finish(self, sid: str, recording: Optional[str] = None, error: Optional[str] = None) -> None:
        entry = self.sessions.get(sid)
        if entry is None:
            return
        entry.result = {"recording": recording, "error": error}
        entry.camera = None
        if entry.session.stopped:
            entry.session.release()  # the KV cache and the models go with the stream; the stats stay
        self._post({"type": "ended", "session": sid, **self._status(sid)}, False)

    def _public(self, sid: str) -> dict:
        return {k: v for k, v in self.sessions[sid].info.items() if k != "folder"}

    def _status(self, sid: str) -> dict:
        e = self.sessions[sid]
        return {"session": sid, "running": not e.session.stopped, **self._public(sid),
                "stats": e.session.stats.to_dict(), **e.result}

    def _post(self, item, is_frame: bool) -> None:
        if self.loop is None or self.loop.is_closed():
            return
        for page in list(self.pages):
            self.loop.call_soon_threadsafe(page.put, item, is_frame)

    # -- routes (on the event loop) ---------------------------------------------------------------------
    def routes(self, prefix: str) -> list[tuple[str, str, Any]]:
        return [("GET", f"{prefix}/ws", self.websocket), ("POST", f"{prefix}/prompt", self.prompt),
                ("POST", f"{prefix}/stop", self.stop), ("GET", f"{prefix}/status", self.status),
                ("GET", f"{prefix}/player.js", self.player)]

    @staticmethod
    def _error(status: int, message: str):
        from aiohttp import web

        return web.json_response({"error": message}, status=status)

    async def _body(self, request) -> dict:
        from aiohttp import web

        if request.content_length is not None and request.content_length > MAX_BODY:
            raise web.HTTPRequestEntityTooLarge(max_size=MAX_BODY, actual_size=request.content_length)
        try:
            body = json.loads(await request.content.read(MAX_BODY + 1) or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError):
            body = None
        if not isinstance(body, dict):
            raise web.HTTPBadRequest(text=json.dumps({"error": "the body must be a JSON object"}),
                                     content_type="application/json")
        return body

    def _find(self, body: dict) -> tuple[Optional[str], Optional[Any]]:
        """(session id, None) or (None, an error response)."""
        sid = body.get("session")
        if sid is None:
            running = [k for k, e in list(self.sessions.items()) if not e.session.stopped]
            if len(running) != 1:
                return None, self._error(409, "no stream is running: start one first" if not running else
                                         "several streams are running: say which (session)")
            return running[0], None
        if not isinstance(sid, str) or sid not in self.sessions:
            return None, self._error(404, f"no stream {sid!r}: it never existed or ended long ago")
        return sid, None

    async def prompt(self, request):
        from aiohttp import web

        if not origin_ok(request):
            return self._error(403, "requests are accepted only from this server's own page")
        body = await self._body(request)
        sid, err = self._find(body)
        if err is not None:
            return err
        entry = self.sessions[sid]
        if entry.session.stopped:
            return self._error(409, "this stream has ended: start a new one")
        try:
            text = entry.session.submit_prompt(body.get("text", ""))
        except ValueError as exc:
            return self._error(400, str(exc))
        return web.json_response({"session": sid, "prompt": text})

    async def stop(self, request):
        from aiohttp import web

        if not origin_ok(request):
            return self._error(403, "requests are accepted only from this server's own page")
        sid, err = self._find(await self._body(request))
        if err is not None:
            return err
        self.sessions[sid].session.stop()
        return web.json_response({"session": sid, "stopping": True})

    async def status(self, request):
        from aiohttp import web

        if not origin_ok(request):
            return self._error(403, "requests are accepted only from this server's own page")
        return web.json_response({"sessions": [self._status(k) for k in list(self.sessions)]})

    async def player(self, request):
        from aiohttp import web

        return web.Response(text=PLAYER.read_text(), content_type="application/javascript")

    async def websocket(self, request):
        from aiohttp import WSMsgType, web

        if not origin_ok(request):
            return self._error(403, "requests are accepted only from this server's own page")
        self.loop = asyncio.get_running_loop()
        ws = web.WebSocketResponse(max_msg_size=MAX_PAGE_MESSAGE)
        await ws.prepare(request)
        page = _Page(ws, self.queue_frames)
        self.pages.add(page)
        for sid, e in list(self.sessions.items()):  # a page that joins late learns what runs
            if not e.session.stopped:
                page.put({"type": "session", "session": sid, "prompt": e.session.stats.prompt or e.session.first_prompt,
                          **self._public(sid)}, False)
        sender = asyncio.create_task(self._send_loop(page))
        try:
            async for msg in ws:
                if msg.type == WSMsgType.BINARY:
                    why = self._camera_frame(msg.data)
                    if why is not None:
                        page.put({"type": "error", "error": why}, False)
        finally:
            self.pages.discard(page)
            sender.cancel()
        return ws

    def _camera_frame(self, data: bytes) -> Optional[str]:
        try:
            header, payload = unpack_frame(data)
        except ValueError as exc:
            return str(exc)
        entry = self.sessions.get(header.get("session")) if isinstance(header.get("session"), str) else None
        if entry is not None and entry.session.stopped:
            return None  # frames still in flight when the stream ended (finish() has let go of its camera)
        if entry is None or entry.camera is None:
            return "a camera frame for a stream that does not take a camera"
        return entry.camera.put(payload)

    async def _send_loop(self, page: _Page) -> None:
        while not page.ws.closed:
            await page.wake.wait()
            page.wake.clear()
            while page.queue:
                item, is_frame = page.pop()
                try:
                    if is_frame:
                        await page.ws.send_bytes(item)
                    else:
                        await page.ws.send_str(json.dumps({**item, "dropped": page.dropped}))
                except (ConnectionError, RuntimeError):  # the page went away mid-send
                    return

    async def close(self) -> None:
        for entry in list(self.sessions.values()):
            entry.session.stop()
        for page in list(self.pages):
            await page.ws.close()
