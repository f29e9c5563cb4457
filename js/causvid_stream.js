// causvid-stream frontend extension: makes streaming visible.
// - Every causvid node shows the chunk previews ComfyUI sends while it runs (native), and this
//   extension adds a progress caption (chunk frames so far) from the progress events.
// - SaveCausalVideo gets an inline <video> player that plays the saved MP4 as soon as it is written.
// - LiveStream gets the live player (causvid_core/live/player.js, served by the pack's routes): the stream
//   as it is made, its stats, a prompt box and Stop; window.causvidLive drives it from scripts.
// Works with the legacy frontend and the current one (comfyui-frontend-package): only app/api imports.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const EXT = "causvid.stream";
const PLAYER_HEIGHT = 256;
const LIVE_HEIGHT = 380;  // the live player: a 256 px view, its stats, the prompt row and an error line
const LIVE_BASE = `${api.api_base || ""}/causvid/live`;  // the pack's routes on ComfyUI's server

// window.causvidLive, the script API for tests and automation: the LiveStream node's player that runs (or
// ran last): frames shown so far, the prompt in effect, setPrompt(text), stop(); `players`: all of them.
const live = {
  players: new Set(),
  get active() {
    const all = [...this.players].filter((p) => p.session);
    return all.find((p) => p.running) || all[all.length - 1] || null;
  },
  get framesShown() { return this.active?.framesShown ?? 0; },
  get prompt() { return this.active?.prompt ?? null; },
  get running() { return this.active?.running ?? false; },
  setPrompt(text) { return this.active.setPrompt(text); },
  stop() { return this.active.stop(); },
};

let playerModule = null;
function livePlayer() {
  playerModule ??= import(`${LIVE_BASE}/player.js`);
  return playerModule;
}

function addLivePlayer(node) {
  const root = document.createElement("div");
  root.dataset.causvid = "live";
  const widget = node.addDOMWidget ? node.addDOMWidget("causvid_live", "live", root, { serialize: false }) : null;
  if (!widget) return;
  widget.computeSize = (width) => [width, LIVE_HEIGHT];
  widget.computedHeight = LIVE_HEIGHT;  // the legacy frontend's height for a DOM widget
  node.setSize([Math.max(node.size[0], 300), node.computeSize()[1]]);
  livePlayer().then(({ createLivePlayer }) => {
    node.causvidLive = createLivePlayer(root, { base: LIVE_BASE, node: () => String(node.id), size: 256 });
    live.players.add(node.causvidLive);
  });
}

function viewUrl(item) {
  const params = new URLSearchParams({ filename: item.filename, subfolder: item.subfolder || "", type: item.type || "output" });
  return api.apiURL(`/view?${params.toString()}&t=${Date.now()}`);
}

function ensurePlayer(node) {
  if (node.causvidPlayer) return node.causvidPlayer;
  const video = document.createElement("video");
  video.controls = true;
  video.loop = true;
  video.muted = true;
  video.autoplay = true;
  video.style.width = "100%";
  video.style.maxHeight = `${PLAYER_HEIGHT}px`;
  video.dataset.causvid = "player";
  const widget = node.addDOMWidget ? node.addDOMWidget("causvid_player", "video", video, { serialize: false })
                                   : null;
  if (!widget) {  // very old frontends: no DOM widgets; fall back to a link in the title
    node.causvidPlayer = { video, widget: null };
    return node.causvidPlayer;
  }
  widget.computeSize = (width) => [width, PLAYER_HEIGHT + 10];
  widget.computedHeight = PLAYER_HEIGHT + 10;  // the legacy frontend draws a DOM widget this high (50 px when unset)
  node.causvidPlayer = { video, widget };
  node.setSize([Math.max(node.size[0], 280), node.computeSize()[1]]);
  return node.causvidPlayer;
}

app.registerExtension({
  name: EXT,
  async setup() {
    // progress in denoising steps, as the nodes report it: show it in the node title while running
    api.addEventListener("progress", ({ detail }) => {
      const node = app.graph && app.graph.getNodeById ? app.graph.getNodeById(Number(detail.node)) : null;
      if (!node || !String(node.type || "").match(/^(StreamChunkSampler|CausalGenerate|VideoToVideoStream)$/)) return;
      node.causvidProgress = `${detail.value}/${detail.max} steps`;
      node.setDirtyCanvas(true, false);
    });
    window.__causvid = { loaded: true, version: 2 };  // lets tests see that the extension registered
    window.causvidLive = live;
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.category && String(nodeData.category).startsWith("causvid")) {
      const onDrawForeground = nodeType.prototype.onDrawForeground;
      nodeType.prototype.onDrawForeground = function (ctx) {
        onDrawForeground?.apply(this, arguments);
        if (this.causvidProgress && !this.flags?.collapsed) {
          // right-aligned in the title bar, clear of the title text (both frontends draw nothing there)
          const titleHeight = (window.LiteGraph && window.LiteGraph.NODE_TITLE_HEIGHT) || 30;
          ctx.save();
          ctx.font = "11px sans-serif";
          ctx.fillStyle = "#8cf";
          ctx.textAlign = "right";
          ctx.fillText(this.causvidProgress, this.size[0] - 8, -titleHeight / 2 + 4);
          ctx.restore();
        }
      };
    }
    if (nodeData.category && String(nodeData.category).startsWith("causvid")) {
      // warnings a node returns (prompt words the built-in text encoder drops): shown in its title bar
      const onExecutedWarn = nodeType.prototype.onExecuted;
      nodeType.prototype.onExecuted = function (message) {
        onExecutedWarn?.apply(this, arguments);
        const warnings = message && message.causvid_warnings;
        if (warnings && warnings.length) {
          this.causvidProgress = `warning: ${warnings.join("; ")}`;
          this.setDirtyCanvas?.(true, false);
        }
      };
    }
    if (nodeData.name === "LiveStream") {
      const onNodeCreated = nodeType.prototype.onNodeCreated;
      nodeType.prototype.onNodeCreated = function () {
        onNodeCreated?.apply(this, arguments);
        addLivePlayer(this);
      };
      const onRemoved = nodeType.prototype.onRemoved;
      nodeType.prototype.onRemoved = function () {
        onRemoved?.apply(this, arguments);
        this.causvidLive?.close();
        live.players.delete(this.causvidLive);
      };
      return;
    }
    if (nodeData.name !== "SaveCausalVideo") return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const items = message && message.causvid_videos;
      if (!items || !items.length) return;
      const player = ensurePlayer(this);
      player.video.src = viewUrl(items[items.length - 1]);
      player.video.play?.().catch(() => {});
      this.causvidProgress = `${items[items.length - 1].frames} frames saved`;
    };
  },
});
