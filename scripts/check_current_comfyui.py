"""Runs this pack in a current ComfyUI, not only in the March 2024 test host of tests/comfy_host.py: a manual
(developer) check, since CI cannot download ComfyUI.

    $CAUSVID_PY scripts/check_current_comfyui.py PATH/TO/ComfyUI [--browser] [--frontend 1.58.1]

PATH/TO/ComfyUI is a checkout (or an exported tree) of ComfyUI; it is only read. The script
- builds a venv for it (default /tmp/causvid-comfy-venv) that sees the tested environment's packages through
  a .pth file, as scripts/env.sh does, and pip-installs what ComfyUI's requirements.txt adds (its frontend
  package among them) plus `requests`, pinned to this torch, torchvision and numpy: a requirement that cannot
  install beside them is skipped and named;
- writes a base directory (--base-directory) with this checkout linked as custom_nodes/causvid-stream, the
  tiny random model of tests/comfy_host.py in models/diffusion_models and workflows/assets/ in input/;
- starts `main.py --cpu --listen 127.0.0.1 --port <free>`; checks the log (no IMPORT FAILED for the pack),
  GET /object_info (every node of NODE_CLASS_MAPPINGS, the model in the loader's list) and GET /extensions;
- runs every workflows/api/*.json through POST /prompt and GET /history with the tiny model in place of the
  built-in one, decodes each saved MP4 with PyAV and checks its frames, counts progress and preview
  messages on /ws;
- with --browser: opens the page in headless Debian chromium through Playwright (every request to another
  host is blocked), checks that the extension registered (window.__causvid) without page errors, loads every
  UI-format workflows/*.json (no missing node type; graphToPrompt gives its workflows/api twin back) and runs
  builtin_demo from the page into the extension's video player.
Prints one line per check and exits 1 if any failed. Only 127.0.0.1 is contacted (and PyPI by pip).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
import types
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from comfy_host import PACK_FOLDER, ComfyHost, free_port, server_python, write_tiny_model  # noqa: E402

BUILTIN = "built-in: Shapes World (CPU)"
MODEL_NAME = "tiny_student.safetensors"
# pixel frames each example saves (3-latent chunks: 9 frames first, 12 after; 4k+1 lengths)
EXPECTED_FRAMES = {"builtin_demo": 33, "text_to_video_stream": 33, "chunk_chain": 33, "image_to_video": 33,
                   "prompt_schedule": 81, "video_to_video": 33, "endless_stream": 9 + 19 * 12}
LIVE_SECONDS = 3.0  # seconds of video a live workflow makes here (9 + 12 * 4 = 57 frames, the chunk that passes 48)
EXPECTED_FRAMES.update(live_stream=57, live_video_to_video=57)
PINNED = ("torch", "torchvision", "numpy")  # never replaced in the ComfyUI venv


class Report:
    def __init__(self):
        self.rows: list[tuple[bool, str, str]] = []

    def check(self, ok: bool, what: str, detail: str = "") -> bool:
        self.rows.append((bool(ok), what, detail))
        print(f"{'PASS' if ok else 'FAIL'}  {what}" + (f"  ({detail})" if detail else ""), flush=True)
        return bool(ok)

    @property
    def failed(self) -> int:
        return sum(not ok for ok, _, _ in self.rows)


# ---- the ComfyUI venv ----------------------------------------------------------------------------------

def _purelib(python: str) -> str:
    return subprocess.check_output([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                   text=True).strip()


def _requirements(comfy: Path) -> list[str]:
    reqs = []
    for line in (comfy / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            reqs.append(line)
    return reqs + ["requests"]  # imported by newer ComfyUI, not listed


def _missing(python: str, reqs: list[str]) -> list[str]:
    """The requirements that python's environment lacks (absent, or another version of an == pin)."""
    code = ("import importlib.metadata as md, json, re, sys\n"
            "out = []\n"
            "for r in json.loads(sys.argv[1]):\n"
            "    name, _, pin = re.split(r'[<>~!\\[; ]', r)[0].partition('==')\n"
            "    try: v = md.version(name)\n"
            "    except md.PackageNotFoundError: v = None\n"
            "    if v is None or (pin and v != pin): out.append(r)\n"
            "print(json.dumps(out))")
    return json.loads(subprocess.check_output([python, "-c", code, json.dumps(reqs)], text=True))


def make_venv(comfy: Path, venv: Path, frontend: str | None) -> tuple[str, list[str]]:
    """The venv's python and the requirements that could not be installed."""
    base = server_python()
    py = venv / "bin" / "python"
    if not py.is_file():
        subprocess.run([base, "-m", "venv", str(venv)], check=True)
        Path(_purelib(str(py)), "_causvid_base.pth").write_text(_purelib(base) + "\n")
    reqs = _requirements(comfy)
    if frontend:
        reqs = [r for r in reqs if not r.startswith("comfyui-frontend-package")] + \
            [f"comfyui-frontend-package=={frontend}"]
    pins = subprocess.check_output([str(py), "-c", "import importlib.metadata as md, sys\n"
                                    "for n in sys.argv[1:]: print(f'{n}=={md.version(n)}')", *PINNED], text=True)
    constraints = venv / "causvid-constraints.txt"
    constraints.write_text(pins)
    skipped = []
    for req in _missing(str(py), reqs):
        print(f"[venv] pip install {req}", flush=True)
        r = subprocess.run(["nice", "-n", "19", str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                            "-c", str(constraints), req], capture_output=True, text=True)
        if r.returncode:
            skipped.append(req)
            print(f"[venv] skipped {req}: {(r.stderr.strip().splitlines() or ['?'])[-1][:200]}", flush=True)
    return str(py), skipped


# ---- the base directory and the server ------------------------------------------------------------------

def make_base(base: Path) -> None:
    link = base / "custom_nodes" / PACK_FOLDER
    if base.exists():
        if not (link.is_symlink() or (base / "comfyui.log").is_file()):
            raise SystemExit(f"{base} exists and is not a base directory this script made: choose another --base")
        if link.is_symlink():
            link.unlink()
        shutil.rmtree(base)
    (base / "custom_nodes").mkdir(parents=True)
    (base / "user").mkdir()
    os.symlink(ROOT, base / "custom_nodes" / PACK_FOLDER, target_is_directory=True)
    write_tiny_model(base / "models" / "diffusion_models", MODEL_NAME)  # with vae/text.safetensors beside it
    shutil.copytree(ROOT / "workflows" / "assets", base / "input")


def start(comfy: Path, base: Path, python: str, timeout: float = 180) -> ComfyHost:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    env.update(PYTHONUNBUFFERED="1", NO_PROXY="127.0.0.1,localhost")
    port = free_port()
    cmd = ["nice", "-n", "19", python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
           "--base-directory", str(base)]
    if "--database-url" in (comfy / "comfy" / "cli_args.py").read_text():  # its default lies in the source tree
        cmd += ["--database-url", "sqlite:///:memory:"]
    log_path = base / "comfyui.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=comfy, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True)
    host = ComfyHost(base, port, proc, log_path)
    try:
        host.wait_ready(timeout)
    except BaseException:
        host.stop()
        raise
    return host


def pack_mappings() -> dict:
    """NODE_CLASS_MAPPINGS of this checkout, imported here with a stub folder_paths."""
    import importlib.util

    sys.modules.setdefault("folder_paths", types.SimpleNamespace(get_filename_list=lambda f: [],
                                                                 get_full_path=lambda f, n: None))
    spec = importlib.util.spec_from_file_location("causvid_pack_check", ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.NODE_CLASS_MAPPINGS


# ---- checks --------------------------------------------------------------------------------------------

def check_loading(host: ComfyHost, rep: Report) -> None:
    log = host.log()
    pack_lines = [ln for ln in log.splitlines() if ln.rstrip().endswith(f"custom_nodes/{PACK_FOLDER}")]
    rep.check(pack_lines and "IMPORT FAILED" not in pack_lines[0], "the pack imports",
              pack_lines[0].strip() if pack_lines else "no import line in the log")
    others = sorted(set(re.findall(r"IMPORT FAILED[^\n]*", log)) - {"IMPORT FAILED"})
    if others:
        print(f"      (ComfyUI's own import failures, not this pack's: {', '.join(others)})")
    info = host.object_info()
    mappings = pack_mappings()
    missing = [n for n in mappings if n not in info]
    rep.check(not missing, f"GET /object_info lists the {len(mappings)} nodes",
              f"missing: {missing}" if missing else "")
    differ = [n for n, cls in mappings.items() if n in info and any(
        set(info[n]["input"].get(sec, {})) != set(cls.INPUT_TYPES().get(sec, {})) for sec in ("required", "optional"))
        or n in info and info[n]["output"] != list(cls.RETURN_TYPES)]
    rep.check(not differ, "their inputs and outputs are as declared", f"differ: {differ}" if differ else "")
    models = info.get("LoadCausalModel", {}).get("input", {}).get("required", {}).get("model_name", [[]])[0]
    rep.check(MODEL_NAME in models, "models/diffusion_models is in the model list", str(models))
    ext = host.get_json("/extensions")
    js = [f"/extensions/{PACK_FOLDER}/{p.name}" for p in sorted((ROOT / "js").glob("*.js"))]
    rep.check(all(u in ext for u in js), "GET /extensions serves js/", ", ".join(js))


def check_workflow(host: ComfyHost, path: Path, rep: Report) -> None:
    import io

    import av

    api = json.loads(path.read_text())
    for node in api.values():
        if node["inputs"].get("model_name") == BUILTIN:
            node["inputs"]["model_name"] = MODEL_NAME  # the built-in model is not committed yet
        if node["class_type"] == "LiveStream":
            node["inputs"]["seconds"] = LIVE_SECONDS  # a live stream runs until Stop: here, until this length
    client = uuid.uuid4().hex
    t0 = time.monotonic()
    detail, ok = "", False
    try:
        with host.listen(client) as ws:
            entry = host.wait_history(host.queue(api, client), timeout=900)
            time.sleep(0.3)  # the last messages
            msgs = list(ws.messages)
        seconds = time.monotonic() - t0
        status = entry.get("status", {})
        if status.get("status_str") != "success":
            errors = [m for m in status.get("messages", []) if m[0] == "execution_error"]
            detail = f"{status.get('status_str')}: " + "; ".join(
                f"{e[1].get('node_type')}: {e[1].get('exception_message', '').strip()[:300]}" for e in errors)
        else:
            items = [i for out in entry["outputs"].values() for i in out.get("causvid_videos", [])]
            shapes = []
            for item in items:
                data = host.view(item["filename"], item["subfolder"])
                with av.open(io.BytesIO(data)) as c:
                    frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
                shapes.append((len(frames), *frames[0].shape[:2]) if frames else (0,))
                if len(frames) != item["frames"]:
                    detail = f"{item['filename']}: {len(frames)} frames decoded, {item['frames']} reported"
            want = EXPECTED_FRAMES.get(path.stem)
            size = next(((n["inputs"]["height"], n["inputs"]["width"]) for n in api.values()
                         if "width" in n["inputs"] and "height" in n["inputs"]), None)
            progress = sum(1 for m in msgs if isinstance(m, dict) and m.get("type") == "progress")
            previews = sum(1 for m in msgs if isinstance(m, tuple) and m[0] == "binary")
            if not items:
                detail = "no video saved"
            elif detail:
                pass
            elif want is not None and shapes[0][0] != want:
                detail = f"{shapes[0][0]} frames, expected {want}"
            elif size is not None and tuple(shapes[0][1:]) != size:
                detail = f"frames of {shapes[0][1]}x{shapes[0][2]}, expected {size[0]}x{size[1]} (H x W)"
            elif not progress or not previews:
                detail = f"{progress} progress and {previews} preview messages on /ws: expected some of each"
            else:
                ok = True
                detail = f"{seconds:.1f} s, MP4 {' '.join('x'.join(map(str, s)) for s in shapes)} (frames x H x W), " \
                         f"{progress} progress and {previews} preview messages on /ws"
    except Exception as exc:  # a dead server, a refused graph, a time-out: this workflow fails, the rest run
        detail = f"{type(exc).__name__}: {str(exc)[:600]}"
    rep.check(ok, f"workflow {path.name}", detail)


LOAD_JS = """async (wf) => {
  const want = wf.nodes.map((n) => n.type).sort().join();
  let types = "";
  for (let i = 0; i < 3 && types !== want; i++) {  // a late start-up graph of the frontend can replace the first load
    await window.app.loadGraphData(structuredClone(wf));
    for (let t = 0; t < 20 && types !== want; t++) {
      await new Promise((r) => setTimeout(r, 250));
      types = window.app.graph._nodes.map((n) => n.type).sort().join();
    }
  }
  const nodes = window.app.graph._nodes;
  const unknown = nodes.filter((n) => !window.LiteGraph.registered_node_types[n.type]).map((n) => n.type);
  const dialogs = Array.from(document.querySelectorAll(".p-dialog, .comfy-modal"))
    .filter((d) => d.offsetParent !== null && /missing/i.test(d.innerText)).map((d) => d.innerText.slice(0, 200));
  const prompt = (await window.app.graphToPrompt()).output;
  return {types: nodes.length, unknown, dialogs, prompt};
}"""

RUN_JS = """async ([wf, model]) => {
  await window.app.loadGraphData(structuredClone(wf));
  for (const n of window.app.graph._nodes) for (const w of n.widgets || []) {
    if (w.name === "model_name") w.value = model;
    if (w.name === "seed") w.value = Math.floor(Math.random() * 1e9);  // not a cached result
  }
  await window.app.queuePrompt(0, 1);
  const save = window.app.graph._nodes.find((n) => n.type === "SaveCausalVideo");
  const sampler = window.app.graph._nodes.find((n) => /^(CausalGenerate|StreamChunkSampler)$/.test(n.type));
  for (let i = 0; i < 1200 && !(save.causvidPlayer && save.causvidPlayer.video.src); i++)
    await new Promise((r) => setTimeout(r, 100));
  const video = save.causvidPlayer && save.causvidPlayer.video;
  if (video) await new Promise((r) => {
    if (video.readyState >= 2) r();
    video.onloadeddata = r; video.onerror = r; setTimeout(r, 10000);
  });
  return {src: video ? video.src : null, ready: video ? video.readyState : 0, duration: video ? video.duration : 0,
          inPage: !!document.querySelector("video[data-causvid=player]"), caption: save.causvidProgress || null,
          samplerCaption: sampler ? sampler.causvidProgress || null : null};
}"""


def _strip(prompt: dict) -> dict:
    """graphToPrompt's output without what frontends add: titles (_meta), LoadImage's upload widget."""
    out = {}
    for k, v in prompt.items():
        inputs = {n: x for n, x in v["inputs"].items() if not (v["class_type"] == "LoadImage" and n == "upload")}
        out[k] = {"class_type": v["class_type"], "inputs": inputs}
    return out


def check_browser(host: ComfyHost, rep: Report, chromium: str) -> None:
    """The page in headless chromium: the extension registers, the UI workflows load (no missing node, and they
    give the API workflows back), and one runs from the page into the extension's video player."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        rep.check(False, "browser check", "playwright is not importable (pip install playwright; chromium from apt)")
        return
    local = re.compile(r"^(https?://127\.0\.0\.1[:/]|data:|blob:)")
    errors, blocked = [], []

    def route(r):
        if local.match(r.request.url):
            return r.continue_()
        blocked.append(r.request.url)
        return r.abort()

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.route("**/*", route)
            page.on("pageerror", lambda e: errors.append(e.stack or str(e)))
            page.on("console", lambda m: m.type == "error" and errors.append(m.text))
            page.goto(host.url + "/", wait_until="load", timeout=120_000)
            page.wait_for_function("() => window.app && window.app.graph && window.__causvid", timeout=120_000)
            page.wait_for_timeout(3000)  # the frontend's own start-up (settings, its default graph)
            version = page.evaluate("() => window.__COMFYUI_FRONTEND_VERSION__ || 'legacy'")
            rep.check(True, f"frontend {version}: the js extension registers", json.dumps(page.evaluate(
                "() => window.__causvid")))
            for path in sorted((ROOT / "workflows").glob("*.json")):
                r = page.evaluate(LOAD_JS, json.loads(path.read_text()))
                api = json.loads((ROOT / "workflows" / "api" / path.name).read_text())
                same = _strip(r["prompt"]) == api
                rep.check(not r["unknown"] and not r["dialogs"] and same, f"UI workflow {path.name} loads",
                          f"{r['types']} nodes" + (f", unknown {r['unknown']}" if r["unknown"] else "")
                          + (f", dialog {r['dialogs'][0]!r}" if r["dialogs"] else "")
                          + ("" if same else ", its prompt differs from workflows/api/" + path.name))
            t0 = time.monotonic()
            r = page.evaluate(RUN_JS, [json.loads((ROOT / "workflows" / "builtin_demo.json").read_text()), MODEL_NAME])
            rep.check(r["src"] and r["ready"] >= 2 and r["inPage"] and r["caption"], "builtin_demo runs from the page "
                      "into the extension's player", f"{time.monotonic() - t0:.1f} s, {json.dumps(r)}")
        finally:
            browser.close()
    ours = [e for e in errors if "causvid" in e.lower()]
    rep.check(not ours, "no page error from the extension", "; ".join(e[:300] for e in ours[:3]))
    others = sorted(set(e.splitlines()[0][:160] for e in errors) - set(ours))
    if others:
        print(f"      (other page errors, not from this pack: {others[:6]})")
    if blocked:
        print(f"      (blocked requests to other hosts: {sorted(set(blocked))[:4]})")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("comfyui", type=Path, help="a ComfyUI checkout (main.py, requirements.txt)")
    ap.add_argument("--venv", type=Path, default=Path("/tmp/causvid-comfy-venv"))
    ap.add_argument("--base", type=Path, default=Path("/tmp/causvid-comfy-base"),
                    help="ComfyUI's --base-directory (rewritten)")
    ap.add_argument("--frontend", help="a comfyui-frontend-package version instead of the one ComfyUI pins")
    ap.add_argument("--browser", action="store_true", help="also check js/ in headless chromium (Playwright)")
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    ap.add_argument("--only", nargs="*", help="workflow names (without .json) to run; default all")
    args = ap.parse_args(argv)
    comfy = args.comfyui.resolve()
    if not (comfy / "main.py").is_file():
        ap.error(f"{comfy} has no main.py")
    rep = Report()
    version = re.search(r'"([^"]+)"', (comfy / "comfyui_version.py").read_text()) \
        if (comfy / "comfyui_version.py").is_file() else None
    print(f"ComfyUI {version.group(1) if version else '(version unknown)'} at {comfy}", flush=True)
    python, skipped = make_venv(comfy, args.venv.resolve(), args.frontend)
    if skipped:
        print(f"      (not installed: {', '.join(skipped)})")
    make_base(args.base.resolve())
    host = start(comfy, args.base.resolve(), python)
    try:
        print(f"server on {host.url}, log {host.log_path}", flush=True)
        check_loading(host, rep)
        for path in sorted((ROOT / "workflows" / "api").glob("*.json")):
            if not args.only or path.stem in args.only:
                check_workflow(host, path, rep)
        if args.browser:
            check_browser(host, rep, args.chromium)
    finally:
        host.stop()
    print(f"{len(rep.rows) - rep.failed} passed, {rep.failed} failed")
    return 1 if rep.failed else 0


if __name__ == "__main__":
    sys.exit(main())
