"""`causvid live`: a local page that plays a stream while it is made, steers its prompt and restyles a camera.

One aiohttp app, bound to 127.0.0.1 unless told otherwise:
- GET  /                the page (page.html, with the player of player.js)
- POST /live/start      {"prompt", "seed"?, "source"?, "strength"?, "source_prompt"?}: a new session (409
                        while one runs). source: "text" (default), "camera" (the page's camera), "world"
                        (a Shapes World clip of source_prompt), "file" (the --video file given at start-up)
- /live/ws, /live/prompt, /live/stop, /live/status, /live/player.js: the hub's routes (hub.py)
Every session is recorded in its own folder under `out_dir` (recorder.py) with the schedule of the prompts
it applied; a session that fails keeps what it recorded.
"""
from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Callable, Optional

from ..stream import CausalStream
from .hub import MAX_BODY, LiveHub, origin_ok
from .recorder import SegmentRecorder
from .session import LEAD_S, LiveSession
from .sources import CameraSource, FrameSource, VideoFileSource, WorldSource

PAGE = Path(__file__).with_name("page.html")
PREFIX = "/live"
SOURCES = ("text", "camera", "world", "file")
DEFAULT_SOURCE_PROMPT = "a red circle moving right on a black background"


def _aiohttp():
    try:
        from aiohttp import web
    except ImportError:
        raise SystemExit("causvid live needs aiohttp: pip install 'causvid-stream[live]'") from None
    return web


class LiveServer:
    """make_stream(seed) -> a fresh CausalStream (a rolling window, usually endless). `size` (height, width)
    in pixels is the stream's, for the inputs of video-to-video."""

    def __init__(self, make_stream: Callable[[int], CausalStream], out_dir: str | Path, *, size: tuple[int, int],
                 mode: str = "recache", max_seconds: Optional[float] = None, lead_s: Optional[float] = LEAD_S,
                 video: Optional[str | Path] = None, strength: float = 0.6):
        self.make_stream, self.out_dir, self.size, self.mode = make_stream, Path(out_dir), size, mode
        self.max_seconds, self.lead_s, self.video, self.strength = max_seconds, lead_s, video, strength
        self.hub = LiveHub()
        self.sid: Optional[str] = None
        self.recordings: list[Path] = []
        self._thread: Optional[threading.Thread] = None

    @property
    def session(self) -> Optional[LiveSession]:
        return self.hub.sessions[self.sid].session if self.sid in self.hub.sessions else None

    def app(self):
        web = _aiohttp()
        app = web.Application(client_max_size=MAX_BODY)
        app.router.add_get("/", self._page)
        app.router.add_post(f"{PREFIX}/start", self._start)
        for method, path, handler in self.hub.routes(PREFIX):
            app.router.add_route(method, path, handler)
        app.on_startup.append(self._remember_loop)
        app.on_shutdown.append(self._shutdown)
        return app

    async def _remember_loop(self, app) -> None:
        self.hub.loop = asyncio.get_running_loop()

    async def _shutdown(self, app) -> None:
        await self.hub.close()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join)

    async def _page(self, request):
        web = _aiohttp()
        return web.Response(text=PAGE.read_text(), content_type="text/html")

    def _source(self, body: dict, session_stopped: Callable[[], bool]) -> Optional[FrameSource]:
        kind = body.get("source", "text")
        if kind not in SOURCES:
            raise ValueError(f"source must be one of {', '.join(SOURCES)}, got {kind!r}")
        h, w = self.size
        if kind == "camera":
            return CameraSource(h, w, stopped=session_stopped)
        if kind == "world":
            return WorldSource(body.get("source_prompt") or DEFAULT_SOURCE_PROMPT, h, w, seed=body.get("seed", 0))
        if kind == "file":
            if self.video is None:
                raise ValueError("no video file was given: start `causvid live --video FILE`")
            return VideoFileSource(self.video, h, w, loop=True)
        return None

    async def _start(self, request):
        web = _aiohttp()
        if not origin_ok(request):
            return self.hub._error(403, "requests are accepted only from this server's own page")
        body = await self.hub._body(request)
        if (self.session is not None and not self.session.stopped) or (self._thread and self._thread.is_alive()):
            return self.hub._error(409, "a stream is running (or finishing its last chunk): stop it first")
        seed = body.get("seed", 0)
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2 ** 63:
            return self.hub._error(400, "seed must be a whole number >= 0")
        strength = body.get("strength", self.strength)
        if not isinstance(strength, (int, float)) or isinstance(strength, bool) or not 0 < strength <= 1:
            return self.hub._error(400, "strength must be a number in (0, 1]")
        folder = self.out_dir / time.strftime("%Y%m%d-%H%M%S")
        n = 1
        while folder.exists():
            folder, n = self.out_dir / f"{time.strftime('%Y%m%d-%H%M%S')}-{n}", n + 1
        holder: list[LiveSession] = []
        try:
            source = self._source(body, lambda: bool(holder) and holder[0].stopped)
            stream = self.make_stream(seed)
            recorder = SegmentRecorder(folder)
            camera = source if isinstance(source, CameraSource) else None
            session = LiveSession(stream, body.get("prompt", ""), mode=self.mode, max_seconds=self.max_seconds,
                                  source=source, strength=float(strength), lead_s=None if camera else self.lead_s)
        except (ValueError, FileNotFoundError) as exc:
            return self.hub._error(400, str(exc))
        holder.append(session)
        h, w = self.size
        self.sid = self.hub.add(session, camera=camera, source="text" if source is None else source.kind,
                                width=w, height=h, folder=str(folder))
        session.sinks = (recorder, self.hub.sink(self.sid))
        self._thread = threading.Thread(target=self._run, args=(self.sid, session, recorder), daemon=True)
        self._thread.start()
        return web.json_response({"session": self.sid, "folder": str(folder)})

    def _run(self, sid: str, session: LiveSession, recorder: SegmentRecorder) -> None:
        error = recording = None
        try:
            session.run()
        except Exception as exc:  # shown on the page; the recording so far is kept
            error = f"{type(exc).__name__}: {exc}"
        finally:
            try:
                if recorder.segments:
                    path = recorder.finalize(session.schedule_text())
                    self.recordings.append(path)
                    recording = str(path)
            finally:
                self.hub.finish(sid, recording, error)


def serve(server: LiveServer, host: str = "127.0.0.1", port: int = 8765) -> None:
    web = _aiohttp()
    print(f"causvid live: open http://{host}:{port}/ (Ctrl-C to quit)", flush=True)
    web.run_app(server.app(), host=host, port=port, print=None)
