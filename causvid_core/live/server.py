"""`causvid live`: a local page that plays a stream while it is made and steers its prompt.

One aiohttp app, bound to 127.0.0.1 unless told otherwise:
- GET  /             the player page (page.html)
- GET  /ws           websocket: binary JPEG frames as they are made, JSON stats after every chunk
- POST /api/start    {"prompt", "seed"?}: a new session (409 while one runs)
- POST /api/prompt   {"text"}: the running session's prompt from its next chunk on
- POST /api/stop     the running session ends after the chunk in flight; its recording is finalised
Requests that carry an Origin other than the page's own are refused (403), so another site open in the
same browser cannot steer or stop the stream.

The session runs in a worker thread; frames cross to the event loop through call_soon_threadsafe into a
bounded queue per page (a page that falls behind loses its oldest frames, counted, instead of growing
the server's memory). Every session is recorded in its own folder under `out_dir` (recorder.py) with
the schedule of the prompts it applied.
"""
from __future__ import annotations

import asyncio
import io
import json
import threading
import time
from collections import deque
from pathlib import Path
from typing import Callable, Optional

from ..stream import CausalStream
from .recorder import SegmentRecorder
from .session import LiveSession

PAGE = Path(__file__).with_name("page.html")
CLIENT_QUEUE_FRAMES = 64  # frames buffered per page (4 s at 16 fps) before the oldest are dropped
JPEG_QUALITY = 90


def _aiohttp():
    try:
        from aiohttp import web
    except ImportError:
        raise SystemExit("causvid live needs aiohttp: pip install 'causvid-stream[live]'") from None
    return web


class _Page:
    """One connected page: its websocket and a bounded queue of messages waiting to be sent."""

    def __init__(self, ws):
        self.ws = ws
        self.queue: deque = deque()
        self.dropped = 0
        self.wake = asyncio.Event()

    def put(self, item, is_frame: bool) -> None:
        if is_frame and sum(1 for _, f in self.queue if f) >= CLIENT_QUEUE_FRAMES:
            for i, (_, f) in enumerate(self.queue):
                if f:
                    del self.queue[i]
                    self.dropped += 1
                    break
        self.queue.append((item, is_frame))
        self.wake.set()


class LiveServer:
    """make_stream(seed) -> a fresh CausalStream (a rolling window, usually endless)."""

    def __init__(self, make_stream: Callable[[int], CausalStream], out_dir: str | Path, *, mode: str = "recache",
                 max_seconds: Optional[float] = None):
        self.make_stream, self.out_dir, self.mode, self.max_seconds = make_stream, Path(out_dir), mode, max_seconds
        self.session: Optional[LiveSession] = None
        self.recorder: Optional[SegmentRecorder] = None
        self.recordings: list[Path] = []
        self.pages: set[_Page] = set()
        self._thread: Optional[threading.Thread] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self.error: Optional[str] = None

    # -- the app ------------------------------------------------------------------------------------------
    def app(self):
        web = _aiohttp()
        @web.middleware
        async def same_origin(request, handler):
            return await self._same_origin(request, handler)

        app = web.Application(middlewares=[same_origin], client_max_size=64 * 1024)
        app.router.add_get("/", self._page)
        app.router.add_get("/ws", self._websocket)
        app.router.add_post("/api/start", self._start)
        app.router.add_post("/api/prompt", self._prompt)
        app.router.add_post("/api/stop", self._stop)
        app.router.add_get("/api/status", self._status)
        app.on_startup.append(self._remember_loop)
        app.on_shutdown.append(self._shutdown)
        return app

    async def _remember_loop(self, app) -> None:
        self._loop = asyncio.get_running_loop()

    async def _shutdown(self, app) -> None:
        if self.session is not None:
            self.session.stop()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join)
        for page in list(self.pages):
            await page.ws.close()

    @staticmethod
    def _origin_ok(request) -> bool:
        origin = request.headers.get("Origin")
        if origin is None:  # not a browser page (curl, tests): nothing cross-site to guard against
            return True
        from urllib.parse import urlsplit

        return urlsplit(origin).netloc == request.host

    async def _same_origin(self, request, handler):
        web = _aiohttp()
        if request.method != "GET" or request.path == "/ws":
            if not self._origin_ok(request):
                return web.json_response({"error": "requests are accepted only from this server's own page"},
                                         status=403)
        return await handler(request)

    # -- routes -------------------------------------------------------------------------------------------
    async def _page(self, request):
        web = _aiohttp()
        return web.Response(text=PAGE.read_text(), content_type="text/html")

    async def _status(self, request):
        web = _aiohttp()
        return web.json_response(self._status_dict())

    def _status_dict(self) -> dict:
        s = self.session
        return {"running": bool(s and not s.stopped), "stats": s.stats.to_dict() if s else None,
                "recordings": [str(p) for p in self.recordings], "error": self.error}

    async def _json(self, request) -> dict:
        web = _aiohttp()
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise web.HTTPBadRequest(text=json.dumps({"error": "the body must be JSON"}),
                                     content_type="application/json") from None
        if not isinstance(body, dict):
            raise web.HTTPBadRequest(text=json.dumps({"error": "the body must be a JSON object"}),
                                     content_type="application/json")
        return body

    async def _start(self, request):
        web = _aiohttp()
        body = await self._json(request)
        if self.session is not None and not self.session.stopped:
            return web.json_response({"error": "a stream is running: stop it first"}, status=409)
        seed = body.get("seed", 0)
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2 ** 63:
            return web.json_response({"error": "seed must be a whole number >= 0"}, status=400)
        folder = self.out_dir / time.strftime("%Y%m%d-%H%M%S")
        n = 1
        while folder.exists():
            folder, n = self.out_dir / f"{time.strftime('%Y%m%d-%H%M%S')}-{n}", n + 1
        try:
            stream = self.make_stream(seed)
            self.recorder = SegmentRecorder(folder)
            self.session = LiveSession(stream, body.get("prompt", ""), mode=self.mode,
                                       sinks=(self.recorder, self._broadcast), max_seconds=self.max_seconds)
        except ValueError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        self.error = None
        self._thread = threading.Thread(target=self._run, args=(self.session, self.recorder), daemon=True)
        self._thread.start()
        return web.json_response({"started": True, "folder": str(folder)})

    async def _prompt(self, request):
        web = _aiohttp()
        body = await self._json(request)
        if self.session is None or self.session.stopped:
            return web.json_response({"error": "no stream is running: start one first"}, status=409)
        try:
            text = self.session.submit_prompt(body.get("text", ""))
        except ValueError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response({"prompt": text})

    async def _stop(self, request):
        web = _aiohttp()
        if self.session is None:
            return web.json_response({"error": "no stream is running"}, status=409)
        self.session.stop()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join)
        return web.json_response(self._status_dict())

    async def _websocket(self, request):
        web = _aiohttp()
        ws = web.WebSocketResponse(max_msg_size=64 * 1024)  # pages send nothing large
        await ws.prepare(request)
        page = _Page(ws)
        self.pages.add(page)
        sender = asyncio.create_task(self._send_loop(page))
        try:
            async for _ in ws:  # the page sends nothing we act on; reading notices the close
                pass
        finally:
            self.pages.discard(page)
            sender.cancel()
        return ws

    async def _send_loop(self, page: _Page) -> None:
        while not page.ws.closed:
            await page.wake.wait()
            page.wake.clear()
            while page.queue:
                item, is_frame = page.queue.popleft()
                try:
                    if is_frame:
                        await page.ws.send_bytes(item)
                    else:
                        await page.ws.send_str(json.dumps({**item, "dropped": page.dropped}))
                except (ConnectionError, RuntimeError):  # the page went away mid-send
                    return

    # -- the worker ---------------------------------------------------------------------------------------
    def _run(self, session: LiveSession, recorder: SegmentRecorder) -> None:
        try:
            session.run()
        except Exception as exc:  # shown on the page; the recording so far is kept
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            try:
                if recorder.segments:
                    self.recordings.append(recorder.finalize(session.schedule_text()))
            finally:
                self._post({"type": "ended", **self._status_dict()}, False)

    def _broadcast(self, frames, stats) -> None:
        """Session sink (worker thread): JPEG every frame, queue them for every page, then the stats."""
        from PIL import Image

        for f in frames.numpy():
            buf = io.BytesIO()
            Image.fromarray(f).save(buf, format="JPEG", quality=JPEG_QUALITY)
            self._post(buf.getvalue(), True)
        self._post({"type": "stats", **stats.to_dict()}, False)

    def _post(self, item, is_frame: bool) -> None:
        if self._loop is None:
            return
        for page in list(self.pages):
            self._loop.call_soon_threadsafe(page.put, item, is_frame)


def serve(server: LiveServer, host: str = "127.0.0.1", port: int = 8765) -> None:
    web = _aiohttp()
    print(f"causvid live: open http://{host}:{port}/ (Ctrl-C to quit)", flush=True)
    web.run_app(server.app(), host=host, port=port, print=None)
