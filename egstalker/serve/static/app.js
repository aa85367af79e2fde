// egstalker live page: sends speech (a file paced in real time, or the microphone) as 16 kHz int16 PCM over a
// WebSocket and plays back what the server returns. Every frame message carries the JPEG of one 40 ms frame and
// the speech samples of that slot: the samples are scheduled on the WebAudio clock at base + index * 40 ms and
// the frame is painted when its samples are heard, so audio and video stay in sync by construction. "always on"
// opens an idle session (docs/protocol.md): frames flow from the start, each file is sent at once and plays after
// the last, Interrupt drops what has not begun.
"use strict";

const RATE = 16000;
const FRAME_S = 0.04;
const CHUNK = 320;               // 20 ms of speech per message
const PLAYOUT_BUFFER_S = 0.12;   // start-up jitter buffer
const HEADER = 16;               // "EGF1", index, pcm samples, jpeg bytes (uint32 little-endian)

const $ = (id) => document.getElementById(id);
const stats = {
  state: "idle", framesReceived: 0, framesPainted: 0, lastIndex: -1, stalls: 0, error: null,
  latencyMs: null, paintedFps: 0, lookaheadMs: null, skipped: 0,
};
window.egsStats = stats;  // read by the browser test

let ws = null, playCtx = null, gain = null, base = null, queue = [], sendTimer = null;
let micCtx = null, micStream = null, sentLog = [], samplesSent = 0, latencies = [], paintTimes = [];
let tokenRequired = false, idleSession = false;

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

async function loadHealth() {
  try {
    const h = await (await fetch("/health")).json();
    tokenRequired = h.token_required;
    $("token-row").hidden = !tokenRequired;
    sizeStage(h.width, h.height);
    $("server").textContent = `${h.width}x${h.height} at ${h.fps} fps on ${h.device} - ` +
      `${h.sessions}/${h.capacity} sessions in use - look-ahead ${h.lookahead_ms} ms`;
  } catch (e) {
    $("server").textContent = "the server does not answer /health";
  }
}

function wsUrl() {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  return `${scheme}//${location.host}/ws`;
}

function sizeStage(width, height) {
  // The stage shows frames at their own aspect ratio (a portrait model is not stretched to a square): at most
  // 512 px wide and 75% of the window high. Resizing clears the canvas, so only a new size is applied.
  if (!(width > 0 && height > 0)) return;
  const canvas = $("stage");
  if (canvas.width !== width || canvas.height !== height) { canvas.width = width; canvas.height = height; }
  canvas.style.aspectRatio = `${width} / ${height}`;
  canvas.style.maxWidth = `min(512px, ${(75 * width / height).toFixed(3)}vh)`;
}

function setRunning(running) {
  $("stop").disabled = !running;
  $("mic").disabled = running;
  // an idle session takes more files, unless the microphone feeds it (a file would queue behind the voice)
  $("play").disabled = (running && (!idleSession || micStream !== null)) || !$("file").files.length;
  $("interrupt").disabled = !(running && idleSession);
  $("idle").disabled = running;
}

// ---------------------------------------------------------------- session
function closePlayback() {
  // Speech already scheduled plays until its context closes: close it on Stop and before a new session, or it
  // plays on (and under the next session); each session had left one more AudioContext open.
  for (const item of queue) item.bitmap.close();
  queue = []; base = null;
  if (playCtx) { playCtx.close().catch(() => {}); playCtx = null; gain = null; }
}

function resetStats(state) {
  base = null; queue = []; sentLog = []; samplesSent = 0; latencies = []; paintTimes = [];
  Object.assign(stats, { state, framesReceived: 0, framesPainted: 0, lastIndex: -1, stalls: 0, error: null,
                         latencyMs: null, skipped: 0 });
}

// Opens a session and returns its socket; onReady(socket) runs when the server has accepted it. Handlers of an
// older socket (still closing) do nothing once a newer session has started.
function openSession(onReady, idle = false) {
  stopSending();
  closePlayback();
  if (ws) { const old = ws; ws = null; old.close(); }
  idleSession = idle;
  playCtx = new AudioContext();
  playCtx.resume();
  gain = playCtx.createGain();
  gain.gain.value = $("mute").checked ? 0 : 1;
  gain.connect(playCtx.destination);
  resetStats("connecting");
  const socket = ws = new WebSocket(wsUrl());
  socket.binaryType = "arraybuffer";
  socket.onopen = () => {
    const start = idle ? { type: "start", idle: true } : { type: "start" };
    const token = $("token").value || new URLSearchParams(location.search).get("token");
    if (token) start.token = token;
    socket.send(JSON.stringify(start));
  };
  socket.onmessage = (event) => {
    if (socket !== ws) return;
    if (typeof event.data !== "string") { onFrame(event.data); return; }
    const msg = JSON.parse(event.data);
    if (msg.type === "ready") {
      sizeStage(msg.width, msg.height);
      stats.lookaheadMs = msg.lookahead_ms;
      stats.state = "streaming";
      setStatus(`streaming (session ${msg.session}, model look-ahead ${msg.lookahead_ms} ms)`);
      onReady(socket);
    } else if (msg.type === "interrupted") {
      setStatus(`interrupted: silence from frame ${msg.frame}`);
    } else if (msg.type === "done") {
      stats.state = "done";
      setStatus(`done: ${msg.frames} frames`);
    } else if (msg.type === "error") {
      stats.error = msg.message; stats.state = "error";
      setStatus(`server: ${msg.message}`, true);
    }
  };
  socket.onclose = (event) => {
    if (socket !== ws) return;
    if (stats.state === "streaming" || stats.state === "connecting") {
      stats.state = "closed";
      setStatus(`the connection closed${event.reason ? ": " + event.reason : ""}`, true);
    }
    stopSending();  // whatever ended it (done, refused, an error, the network): the microphone is released
    setRunning(false);
  };
  setRunning(true);
  return socket;
}

function sendSpeech(samples) {
  // samples: Float32Array at 16 kHz
  if (!ws || ws.readyState !== WebSocket.OPEN) return;
  const pcm = new Int16Array(samples.length);
  for (let i = 0; i < samples.length; i++) {
    const s = Math.max(-1, Math.min(1, samples[i]));
    pcm[i] = s < 0 ? s * 32768 : s * 32767;
  }
  ws.send(pcm.buffer);
  if (idleSession) return;  // frames of an idle session are not counted from the speech: no latency to track
  samplesSent += samples.length;
  sentLog.push([samplesSent, performance.now()]);
  if (sentLog.length > 2000) sentLog.splice(0, 1000);
}

function endSpeech() {
  if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify({ type: "end" }));
}

function stopSending() {
  if (sendTimer) { clearInterval(sendTimer); sendTimer = null; }
  if (micStream) { micStream.getTracks().forEach((t) => t.stop()); micStream = null; }
  if (micCtx) { micCtx.close(); micCtx = null; }
}

// Stop, or give up with an error (the status then says why, not just "stopped").
function stopAll(error = null) {
  stopSending();
  closePlayback();
  if (ws) ws.close();
  if (error) { stats.state = "error"; stats.error = error; setStatus(error, true); }
  else { stats.state = "stopped"; setStatus("stopped"); }
  setRunning(false);
}

// ---------------------------------------------------------------- receiving
function onFrame(buffer) {
  const view = new DataView(buffer);
  if (buffer.byteLength < HEADER || String.fromCharCode(...new Uint8Array(buffer, 0, 4)) !== "EGF1") return;
  const index = view.getUint32(4, true), nPcm = view.getUint32(8, true), nJpeg = view.getUint32(12, true);
  const pcm = new Int16Array(buffer, HEADER, nPcm);
  const jpeg = new Uint8Array(buffer, HEADER + 2 * nPcm, nJpeg);
  const ctx = playCtx;
  if (!ctx) return;
  stats.framesReceived++; stats.lastIndex = index;
  trackLatency(index);

  const now = ctx.currentTime;
  if (base === null) base = now + PLAYOUT_BUFFER_S - index * FRAME_S;
  let playAt = base + index * FRAME_S;
  if (playAt < now + 0.005) {  // late: shift the whole timeline (a short gap) rather than drop speech
    base += now + 0.02 - playAt; playAt = base + index * FRAME_S; stats.stalls++;
  }
  const audio = ctx.createBuffer(1, nPcm, RATE);
  const channel = audio.getChannelData(0);
  for (let i = 0; i < nPcm; i++) channel[i] = pcm[i] / 32768;
  const source = ctx.createBufferSource();
  source.buffer = audio;
  source.connect(gain);
  source.start(playAt);
  if (nJpeg === 0) { stats.skipped++; return; }  // server overloaded: keep showing the previous image
  createImageBitmap(new Blob([jpeg], { type: "image/jpeg" })).then((bitmap) => {
    if (ctx !== playCtx) { bitmap.close(); return; }  // stopped, or a new session, meanwhile
    let at = queue.length;  // decodes can finish out of order: keep the queue sorted by index
    while (at > 0 && queue[at - 1].index > index) at--;
    queue.splice(at, 0, { index, playAt, bitmap });
  });
}

function trackLatency(index) {
  // time since the last sample of this frame's 40 ms slot was sent (includes the model's look-ahead)
  const need = (index + 1) * 640;
  const entry = sentLog.find(([count]) => count >= need);
  if (!entry) return;
  latencies.push(performance.now() - entry[1]);
  if (latencies.length > 50) latencies.shift();
  const sorted = [...latencies].sort((a, b) => a - b);
  stats.latencyMs = Math.round(sorted[Math.floor(sorted.length / 2)]);
}

function paint() {
  requestAnimationFrame(paint);
  if (!playCtx || queue.length === 0) return;
  const heard = playCtx.currentTime - (playCtx.outputLatency || 0);
  let show = null;
  while (queue.length && queue[0].playAt <= heard) {
    if (show) show.bitmap.close();
    show = queue.shift();
  }
  if (!show) return;
  const canvas = $("stage");
  if (show.bitmap.width !== canvas.width || show.bitmap.height !== canvas.height) {
    sizeStage(show.bitmap.width, show.bitmap.height);  // the frames' own size wins
  }
  canvas.getContext("2d").drawImage(show.bitmap, 0, 0, canvas.width, canvas.height);
  show.bitmap.close();
  stats.framesPainted++;
  const t = performance.now();
  paintTimes.push(t);
  while (paintTimes.length && paintTimes[0] < t - 1000) paintTimes.shift();
  stats.paintedFps = paintTimes.length;
  $("stats").textContent =
    `frame ${show.index}   received ${stats.framesReceived}   painted ${stats.framesPainted}   ` +
    `${stats.paintedFps} fps\nlatency ${stats.latencyMs ?? "-"} ms (look-ahead ${stats.lookaheadMs} ms)   ` +
    `stalls ${stats.stalls}   frames without image ${stats.skipped}`;
}
requestAnimationFrame(paint);

// ---------------------------------------------------------------- sources
async function decodeTo16k(file) {
  const data = await file.arrayBuffer();
  const decoded = await new OfflineAudioContext(1, 1, RATE).decodeAudioData(data);
  const offline = new OfflineAudioContext(1, Math.ceil(decoded.duration * RATE), RATE);
  const source = offline.createBufferSource();
  source.buffer = decoded;
  source.connect(offline.destination);
  source.start();
  return (await offline.startRendering()).getChannelData(0);
}

function sendAll(samples) {
  // an idle session: the server gives the speech to the model at its own clock's pace, after what it holds
  for (let at = 0; at < samples.length; at += 16000) sendSpeech(samples.subarray(at, at + 16000));
}

async function playFile() {
  const file = $("file").files[0];
  if (!file) return;
  const live = idleSession && ws && ws.readyState === WebSocket.OPEN;
  $("play").disabled = true;
  if (!live) {
    closePlayback();  // the last stream stops when Play is pressed, not when the new file is decoded
    resetStats("decoding");
  }
  setStatus(`decoding ${file.name} ...`);
  let samples;
  try {  // before a session is opened: a file that is not audio takes no slot on the server
    samples = await decodeTo16k(file);
  } catch (e) {
    if (live) {
      setStatus(`cannot decode ${file.name}: ${e.message || e}`, true);
      setRunning(ws !== null && ws.readyState === WebSocket.OPEN);
      return;
    }
    stopAll(`cannot decode ${file.name}: ${e.message || e}; choose an audio file (wav, mp3, ogg, m4a)`);
    return;
  }
  if (live) {
    if (!ws || ws.readyState !== WebSocket.OPEN) return;  // the session ended while decoding: its status stays
    sendAll(samples); setStatus(`sent ${file.name}`); setRunning(true);
    return;
  }
  if ($("idle").checked) {
    openSession((socket) => { if (socket === ws) { sendAll(samples); setStatus(`always on: sent ${file.name}`); } },
                true);
    return;
  }
  openSession(async (socket) => {
    if (socket !== ws || socket.readyState !== WebSocket.OPEN) return;  // stopped meanwhile
    const t0 = performance.now();
    let sent = 0;
    sendTimer = setInterval(() => {  // real-time pacing from a wall clock (timers drift; this does not)
      const due = Math.min(samples.length, Math.floor((performance.now() - t0) / 1000 * RATE));
      while (sent + CHUNK <= due || (sent < due && due === samples.length)) {
        const end = Math.min(sent + CHUNK, samples.length);
        sendSpeech(samples.subarray(sent, end));
        sent = end;
      }
      if (sent >= samples.length) { clearInterval(sendTimer); sendTimer = null; endSpeech(); }
    }, 10);
  });
}

async function useMicrophone() {
  if (!navigator.mediaDevices) {  // browsers give the microphone only to https pages and localhost
    stopAll(`the microphone needs a secure page: open this one as http://localhost:${location.port || 80}/ ` +
            "(from another machine through an SSH tunnel: ssh -L PORT:localhost:PORT SERVER) or over https");
    return;
  }
  $("mic").disabled = true;  // one request at a time
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true },
    });
  } catch (e) {
    setStatus(`no microphone: ${e.message || e}`, true);
    setRunning(false);
    return;
  }
  const socket = openSession(async () => {
    const ctx = micCtx = new AudioContext({ sampleRate: RATE });  // the browser resamples the microphone to 16 kHz
    try {
      await ctx.audioWorklet.addModule("/static/mic-worklet.js");
    } catch (e) {
      if (micCtx !== ctx) return;  // stopped meanwhile
      stopAll(`cannot capture the microphone: ${e.message || e}`);
      return;
    }
    if (socket !== ws || micCtx !== ctx || micStream !== stream) return;  // stopped meanwhile: already released
    const node = new AudioWorkletNode(ctx, "pcm-capture");
    const ratio = ctx.sampleRate / RATE;  // 1 where the browser honours the rate; else resample here
    let pending = new Float32Array(0), phase = 0;
    node.port.onmessage = (event) => {
      let block = event.data;
      if (ratio !== 1) {
        const out = [];
        for (; phase < block.length - 1; phase += ratio) {
          const i = Math.floor(phase), f = phase - i;
          out.push(block[i] * (1 - f) + block[i + 1] * f);
        }
        phase -= block.length;
        block = Float32Array.from(out);
      }
      const joined = new Float32Array(pending.length + block.length);
      joined.set(pending); joined.set(block, pending.length);
      let at = 0;
      for (; at + CHUNK <= joined.length; at += CHUNK) sendSpeech(joined.subarray(at, at + CHUNK));
      pending = joined.slice(at);
    };
    ctx.createMediaStreamSource(stream).connect(node);
    const sink = ctx.createGain();  // keeps the worklet pulled by the graph, silently
    sink.gain.value = 0;
    node.connect(sink).connect(ctx.destination);
    setStatus("listening: speak, and the head speaks with you");
  }, $("idle").checked);
  // The session owns the microphone from now on, before the server answers: every way it ends (refused: a wrong
  // token or a full server; the connection failing; Stop) stops the tracks (stopSending).
  micStream = stream;
  if (socket === ws && socket.readyState !== WebSocket.CLOSED) setRunning(true);  // Play now off: the mic feeds it
}

$("file").addEventListener("change", () => setRunning(ws !== null && ws.readyState === WebSocket.OPEN));
$("play").addEventListener("click", playFile);
$("mic").addEventListener("click", useMicrophone);
$("stop").addEventListener("click", () => stopAll());
$("interrupt").addEventListener("click", () => {
  if (ws && ws.readyState === WebSocket.OPEN && idleSession) ws.send(JSON.stringify({ type: "interrupt" }));
});
$("mute").addEventListener("change", () => { if (gain) gain.gain.value = $("mute").checked ? 0 : 1; });
loadHealth();
setInterval(loadHealth, 5000);
