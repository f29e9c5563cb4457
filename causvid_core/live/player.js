// The causvid live player: one module for `causvid live`'s page and the LiveStream node in ComfyUI (both
// servers serve it from {base}/player.js, see hub.py for the protocol).
//
// Frames arrive over a websocket as JPEG while the server makes them; they are shown at the stream's 16 fps
// from a small jitter buffer (playback starts once JITTER frames wait, and waits again if the buffer runs
// dry: a "stall"). A video-to-video stream's input frames are shown beside the output, frame for frame.
// The player also carries the prompt box, Stop, and the camera for camera streams (getUserMedia; frames go
// back over the same websocket at the stream's size).

export const FPS = 16;
export const JITTER = 4;
const CAMERA_JPEG_QUALITY = 0.85;

function el(tag, style, props = {}) {
  const e = document.createElement(tag);
  Object.assign(e.style, style);
  return Object.assign(e, props);
}

function packFrame(header, bytes) {
  const head = new TextEncoder().encode(JSON.stringify(header));
  const out = new Uint8Array(4 + head.length + bytes.byteLength);
  new DataView(out.buffer).setUint32(0, head.length);
  out.set(head, 4);
  out.set(new Uint8Array(bytes), 4 + head.length);
  return out.buffer;
}

async function unpackFrame(blob) {
  const buf = await blob.arrayBuffer();
  const n = new DataView(buf).getUint32(0);
  const header = JSON.parse(new TextDecoder().decode(new Uint8Array(buf, 4, n)));
  return [header, new Blob([new Uint8Array(buf, 4 + n)], { type: "image/jpeg" })];
}

// root: the element to build the player in. opts.base: the hub's route prefix ("/live", "/causvid/live").
// opts.node: follow only sessions of this ComfyUI node (its id, or a function giving it: a node gets its id
// only once it is in a graph; null: any session). opts.controls: show prompt/Stop.
export function createLivePlayer(root, { base, node = null, controls = true, size = 320 } = {}) {
  const box = el("div", { display: "flex", flexDirection: "column", gap: "6px", font: "12px system-ui, sans-serif",
                          color: "#ddd" });
  const views = el("div", { display: "flex", gap: "6px" });
  const canvasStyle = { background: "#000", imageRendering: "pixelated", width: `${size}px`, height: `${size}px`,
                        maxWidth: "100%", objectFit: "contain" };
  const input = el("canvas", { ...canvasStyle, display: "none" }, { width: 64, height: 64, title: "input" });
  const output = el("canvas", canvasStyle, { width: 64, height: 64, title: "output" });
  input.dataset.causvid = "live-input";
  output.dataset.causvid = "live-output";
  views.append(input, output);
  const stats = el("div", { fontFamily: "ui-monospace, monospace", color: "#9c9", minHeight: "1.2em" },
                   { textContent: "waiting for a stream" });
  const error = el("div", { color: "#e77", minHeight: "1.2em" });
  const row = el("div", { display: "flex", gap: "6px" });
  const promptBox = el("input", { flex: "1", padding: "4px", background: "#222", color: "#eee", border: "1px solid #444" },
                       { type: "text", placeholder: "a new prompt, sent at the next chunk" });
  const send = el("button", {}, { textContent: "Send", disabled: true });
  const stopButton = el("button", {}, { textContent: "Stop", disabled: true });
  row.append(promptBox, send, stopButton);
  box.append(views, stats);
  if (controls) box.append(row);
  box.append(error);
  root.append(box);
  const octx = output.getContext("2d"), ictx = input.getContext("2d");

  const queue = [];  // output frames in order: {frame, bitmap|null}
  const inputs = new Map();  // frame -> bitmap of the input shown beside it
  let ws = null, closed = false, camera = null, timer = null;

  const p = {
    session: null, node, running: false, source: null, prompt: null, stats: null, error: null, recording: null,
    framesReceived: 0, framesShown: 0, framesDropped: 0, stalls: 0, buffering: true, camera: false,
    element: box,
    async setPrompt(text) {
      const data = await post("/prompt", { session: p.session, text });
      p.requested = data.prompt;
      return data;
    },
    async stop() { return post("/stop", { session: p.session }); },
    close() { closed = true; clearInterval(timer); stopCamera(); ws?.close(); },
  };

  async function post(path, body) {
    const r = await fetch(`${base}${path}`, { method: "POST", headers: { "Content-Type": "application/json" },
                                               body: JSON.stringify(body) });
    let data;
    try { data = await r.json(); } catch { data = { error: `${r.status} ${r.statusText}` }; }
    error.textContent = r.ok ? "" : data.error;
    if (!r.ok) throw new Error(data.error);
    return data;
  }

  function follow(msg) {
    p.session = msg.session; p.running = true; p.source = msg.source; p.prompt = msg.prompt;
    p.framesReceived = p.framesShown = p.framesDropped = p.stalls = 0; p.buffering = true;
    p.error = null; p.recording = null; error.textContent = "";
    queue.length = 0; inputs.clear();
    input.style.display = msg.source && msg.source !== "text" ? "" : "none";
    if (msg.width && msg.height) {
      for (const c of [input, output]) { c.width = msg.width; c.height = msg.height; }
    }
    send.disabled = stopButton.disabled = false;
    if (msg.source === "camera") startCamera(msg.width, msg.height);
  }

  function onFrame(header, blob) {
    if (header.session !== p.session) return;
    const item = { frame: header.frame, bitmap: null };
    createImageBitmap(blob).then((b) => { item.bitmap = b; });
    if (header.kind === "in") { inputs.set(header.frame, item); return; }
    p.framesReceived++;
    queue.push(item);
  }

  function onMessage(msg) {
    if (msg.type === "session") {
      const mine = typeof node === "function" ? node() : node;
      if (mine === null || String(msg.node) === String(mine)) follow(msg);
      return;
    }
    if (msg.session !== p.session) {
      if (msg.type === "error") { p.error = msg.error; error.textContent = msg.error; }
      return;
    }
    if (msg.type === "stats") {
      p.stats = msg; p.prompt = msg.prompt; p.framesDropped = msg.dropped;
    } else if (msg.type === "ended") {
      p.running = false; p.stats = msg.stats; p.error = msg.error || null; p.recording = msg.recording || null;
      error.textContent = msg.error || "";
      send.disabled = stopButton.disabled = true;
      stopCamera();
    }
    showStats();
  }

  function showStats() {
    const s = p.stats;
    if (!s) return;
    const head = p.running ? "live" : `ended (${s.ended || "stopped"})`;
    stats.textContent = `${head} | chunk ${s.chunks} | ${s.frames} frames | ${Number(s.fps).toFixed(1)} fps made ` +
      `(${Number(s.real_time_factor).toFixed(2)}x real time) | first frame ${s.first_frame_s}s | ` +
      `shown ${p.framesShown} | dropped ${p.framesDropped} | stalls ${p.stalls}` +
      (s.input_errors ? ` | bad input frames ${s.input_errors}` : "");
  }

  function connect() {
    if (closed) return;
    const url = new URL(`${base}/ws`, location.href);
    url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
    ws = new WebSocket(url);
    ws.binaryType = "blob";
    let order = Promise.resolve();  // messages are handled in the order they came, frames unpack async
    ws.onmessage = (ev) => {
      order = order.then(async () => {
        if (typeof ev.data !== "string") onFrame(...await unpackFrame(ev.data));
        else onMessage(JSON.parse(ev.data));
      }).catch((e) => { p.error = `a bad message from the server: ${e.message}`; });
    };
    ws.onclose = () => { if (!closed) setTimeout(connect, 1000); };
  }

  timer = setInterval(() => {  // the player: one frame per tick once the jitter buffer has filled
    if (p.buffering && queue.length < JITTER && p.running) return;
    const item = queue[0];
    if (!item) {
      if (!p.buffering && p.running) p.stalls++;
      p.buffering = true;
      return;
    }
    if (!item.bitmap) return;  // still decoding: wait a tick
    queue.shift();
    p.buffering = false;
    octx.drawImage(item.bitmap, 0, 0, output.width, output.height);
    const inp = inputs.get(item.frame);
    if (inp?.bitmap) ictx.drawImage(inp.bitmap, 0, 0, input.width, input.height);
    for (const f of inputs.keys()) if (f <= item.frame) inputs.delete(f);  // also inputs of dropped outputs
    p.framesShown++;
    if (p.framesShown % FPS === 0) showStats();
  }, 1000 / FPS);

  async function startCamera(width, height) {
    stopCamera();
    try {
      const session = p.session;
      const media = await navigator.mediaDevices.getUserMedia({ video: { width, height }, audio: false });
      if (closed || p.session !== session || !p.running) {  // the stream ended while permission was asked
        media.getTracks().forEach((t) => t.stop());
        return;
      }
      const video = el("video", {}, { muted: true, playsInline: true, srcObject: media });
      await video.play();
      const grab = el("canvas", {}, { width, height });
      const g = grab.getContext("2d");
      camera = { media, timer: setInterval(() => {
        if (!ws || ws.readyState !== WebSocket.OPEN || p.session !== session || !p.running) return;
        g.drawImage(video, 0, 0, width, height);
        grab.toBlob(async (blob) => {
          if (blob && ws.readyState === WebSocket.OPEN) ws.send(packFrame({ session }, await blob.arrayBuffer()));
        }, "image/jpeg", CAMERA_JPEG_QUALITY);
      }, 1000 / FPS) };
      p.camera = true;
    } catch (e) {
      p.error = `the camera could not be opened: ${e.message}`;
      error.textContent = p.error;
    }
  }

  function stopCamera() {
    if (!camera) return;
    clearInterval(camera.timer);
    camera.media.getTracks().forEach((t) => t.stop());
    camera = null;
    p.camera = false;
  }

  send.onclick = () => p.setPrompt(promptBox.value).catch(() => {});
  promptBox.onkeydown = (e) => { if (e.key === "Enter") send.onclick(); };
  stopButton.onclick = () => p.stop().catch(() => {});
  connect();
  return p;
}
