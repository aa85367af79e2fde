"""`egstalker serve`: many real-time talking-head streams from one model on one device.

Per session (one WebSocket, see protocol.py): a receive loop takes speech chunks, an encode task turns them into
final per-frame features in a worker thread (`SessionSpeech`), and a send task writes rendered frames in order.
One render loop serves all sessions: it picks renderable frames earliest-deadline-first across sessions and
renders them in shared `TalkingHead.render_frames` calls on a single render thread (the device is used by one
call at a time); JPEG encoding runs in a thread pool while the next batch renders.

Latency of a frame = the speech after its own slot that the model must hear first (`lookahead_ms`: the feature
window's future rows + the encoder's look-ahead) + waiting for a render call + rendering + JPEG + network.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hmac
import ipaddress
import logging
import math
import os
import signal
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
from aiohttp import WSCloseCode, WSMsgType, web

from egstalker.serve import protocol
from egstalker.serve.features import SessionSpeech
from egstalker.serve.protocol import ProtocolError
from egstalker.serve.scheduler import PoseClock, ServeConfig, StreamSession, gather_batch, pick_frames

log = logging.getLogger("egstalker.serve")
STATIC_DIR = Path(__file__).parent / "static"
LOOPBACK_HOSTS = {"127.0.0.1", "::1", "localhost"}
CLOSE_TRY_AGAIN_LATER = 1013
IDLE_FEED_AHEAD_S = 0.2
"""An idle session's held speech is given to the model up to this far past what its clock needs (the look-ahead):
the margin for the feed's 20 ms ticks."""
IDLE_SILENCE_AHEAD_S = 0.1
"""Silence is given only up to this far past the look-ahead, so a new utterance starts after at most this much more
silence; while the client is streaming speech (a microphone), only what the clock needs now: a chunk up to this
late still joins the one before without a gap of silence."""
IDLE_STREAMING_S = 0.25
"""A client that sent speech this recently counts as streaming."""


def window_reach(head) -> tuple[int, int]:
    """(left, right): how many feature rows before/after a frame its audio window reads.

    The window is `audio_window` rows, `audio_future` of them after the frame; left is taken generously (any
    extra rows are never read).
    """
    return int(head.audio_window), int(head.audio_future)


def audio_encoder_of(head):
    """The model's speech encoder object (its `encode_stream`, `context_seconds`, `lookahead_seconds`)."""
    encoder = getattr(head, "encoder", None)
    if encoder is None:
        from egstalker.audio import get_encoder

        encoder = get_encoder(head.encoder_name)
    return encoder


def check_bind(host: str, token: str | None) -> None:
    """Refuse to listen beyond this machine without a token."""
    from egstalker.errors import EgstalkerError

    if host not in LOOPBACK_HOSTS and not token:
        raise EgstalkerError(f"refusing to listen on {host} without a token: anyone who can reach it could use "
                             "the model; pass --token SECRET (clients send it), or bind --host 127.0.0.1")


def check_address(host: str, port: int) -> None:
    """Raise EgstalkerError (one line) when the server could not listen on host:port: a port out of range, a host
    that does not resolve to this machine, a port in use. Checked before the model loads (seconds) by a test bind."""
    import errno
    import socket

    from egstalker.errors import EgstalkerError

    if not 0 <= port <= 65535:
        raise EgstalkerError(f"--port {port} is not a TCP port; use 1-65535 (0 picks a free one)")
    try:
        # "" means every interface, as aiohttp and asyncio read it
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise EgstalkerError(f"--host {host} does not resolve ({e.strerror}); use an address of this machine, "
                             "e.g. 127.0.0.1 or 0.0.0.0") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as aiohttp binds: TIME_WAIT is no conflict
        try:
            probe.bind(address)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise EgstalkerError(f"cannot listen on {host}:{port}: the port is in use; choose another --port or "
                                     "stop the program using it") from None
            raise EgstalkerError(f"cannot listen on {host}:{port} ({e.strerror}); use an address of this machine for "
                                 "--host and a free --port") from None


class _Connection:
    """The socket side of one session."""

    def __init__(self, ws: web.WebSocketResponse, state: StreamSession):
        self.ws = ws
        self.state = state
        self.outbox: asyncio.Queue = asyncio.Queue()
        self.audio_arrived = asyncio.Event()
        self.room = asyncio.Event()
        self.sendable = asyncio.Event()
        """Set when a frame was queued or the utterance may be complete."""
        self.tasks: list[asyncio.Task] = []
        self.heard = time.monotonic()
        """When the client last sent a message of its own (speech or control; pings and pongs do not count), or
        when the server last stopped reading it (back-pressure): the idle timeout counts from here."""
        self.idle = False
        """Started with `"idle": true`: frames flow from the start, silence between utterances (`_feed_loop`)."""
        self.opened = time.monotonic()
        self.held: collections.deque = collections.deque()
        """Idle sessions: the client's speech not yet given to the model (what `interrupt` drops)."""
        self.held_samples = 0
        self.ending = False
        """Idle sessions: `end` received; the session finishes once the held speech is given."""
        self.last_speech = -math.inf
        """Idle sessions: when speech last arrived."""


class TalkingHeadServer:
    """Sessions, the shared render loop and the HTTP routes, around one loaded `TalkingHead`."""

    def __init__(self, head, config: ServeConfig | None = None, token: str | None = None, device: str = "cpu"):
        self.head = head
        self.config = config or ServeConfig()
        self.token = token or None
        self.device = str(device)
        self.encoder = audio_encoder_of(head)
        # Sessions encode in worker threads; a speech model's calls from several of them at once run as one call
        # (fewer launches under the GIL, fewer slices of device time taken from rendering). The switch is for
        # measuring it (docs/gpu.md).
        self._encoder_batcher = None
        if hasattr(self.encoder, "merge_concurrent_calls") and os.environ.get("EGSTALKER_MERGE_ENCODER", "1") != "0":
            self._encoder_batcher = self.encoder.merge_concurrent_calls()
        self.left_reach, self.right_reach = window_reach(head)
        self.lookahead_ms = 1000.0 * (self.right_reach / head.fps + self.encoder.lookahead_seconds)
        self.pose = PoseClock(head, self.config.pose)
        self.connections: dict[str, _Connection] = {}
        self.reserved = 0
        """Sockets accepted but not yet started (they count against max_sessions)."""
        self._wake = asyncio.Event()
        self._deliveries: asyncio.Queue | None = None
        # A ProcessHead takes `queue_depth` calls at once (they queue at its render process: the device never
        # waits for this process between batches); an in-process head renders one call at a time.
        self.render_queue = int(getattr(head, "queue_depth", 1))
        self._render_pool = ThreadPoolExecutor(self.render_queue, thread_name_prefix="egs-render")
        self._render_tasks: set[asyncio.Task] = set()
        workers = max(2, min(8, (os.cpu_count() or 2) // 2))  # speech encoding and JPEG run on the CPU
        self._encode_pool = ThreadPoolExecutor(workers, thread_name_prefix="egs-audio")
        self._jpeg_pool = ThreadPoolExecutor(workers, thread_name_prefix="egs-jpeg")
        self._render_log: collections.deque = collections.deque(maxlen=2000)
        """(finish time, batch size, render seconds) of recent render calls."""
        self._last_render_end = 0.0
        self.frames_rendered = 0
        self.shared_batches = 0
        self.frames_skipped = 0
        """Frames sent without a new image because the device fell behind (overload)."""
        """Render calls that carried frames of more than one session."""
        self.sessions_served = 0
        self.failure: str | None = None
        """Why the server cannot render any more (its render process stopped); it then stops (`on_failure`)."""
        self.on_failure = None
        """Called once when `failure` is set: serve_forever stops the server, which exits with that message."""

    # ---------------------------------------------------------------- app
    def app(self) -> web.Application:
        app = web.Application(client_max_size=protocol.MAX_AUDIO_BYTES, middlewares=[self._check_host])
        app.router.add_get("/", self._index)
        app.router.add_get("/health", self._health)
        app.router.add_get("/favicon.ico", self._no_content)
        app.router.add_get(protocol.WS_PATH, self._websocket)
        app.router.add_static("/static", STATIC_DIR)
        app.on_startup.append(self._start)
        app.on_shutdown.append(self._shutdown)
        app.on_cleanup.append(self._cleanup)
        return app

    async def _start(self, app) -> None:
        self._deliveries = asyncio.Queue()  # bounded by each session's send_queue_frames
        self._tasks = [asyncio.create_task(self._render_loop()), asyncio.create_task(self._deliver_loop())]
        if self.config.max_lag_s is not None:
            self._tasks.append(asyncio.create_task(self._overdue_loop()))

    async def _shutdown(self, app) -> None:
        for conn in list(self.connections.values()):
            with contextlib.suppress(Exception):
                await conn.ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutting down")

    async def _cleanup(self, app) -> None:
        for task in [*self._tasks, *self._render_tasks]:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        # Wait for the calls already running in the pools' threads (a render call takes at most a few seconds):
        # left running, they are joined at interpreter exit, where a second Ctrl-C aborts the process mid-call.
        loop = asyncio.get_running_loop()
        for pool in (self._render_pool, self._encode_pool, self._jpeg_pool):
            await loop.run_in_executor(None, lambda pool=pool: pool.shutdown(wait=True, cancel_futures=True))

    async def _no_content(self, request: web.Request) -> web.Response:
        return web.Response(status=204)

    async def _index(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    def health(self) -> dict:
        now = time.monotonic()
        recent = [(t, n, s) for t, n, s in self._render_log if now - t <= 5.0]
        frames = sum(n for _, n, _ in recent)
        span = min(5.0, now - recent[0][0] + recent[0][2]) if recent else 0.0
        info = {
            "status": "ok" if getattr(self.head, "healthy", True) else "render process stopped",
            "sessions": len(self.connections),
            "capacity": self.config.max_sessions,
            "fps": float(self.head.fps),
            "device": self.device,
            "encoder_device": str(getattr(self.encoder, "device", "cpu")),
            "precision": str(getattr(self.head, "precision", "fp32")),
            "warm_up_s": round(float(getattr(self.head, "warm_up_seconds", 0.0)), 2),
            "width": int(self.head.width),
            "height": int(self.head.height),
            "lookahead_ms": round(self.lookahead_ms, 1),
            "render_fps": round(frames / span, 1) if span > 0 else 0.0,
            "mean_batch": round(frames / len(recent), 2) if recent else 0.0,
            "mean_render_ms_per_call": round(1000 * sum(s for *_, s in recent) / len(recent), 2) if recent else 0.0,
            "render_queue": self.render_queue,
            "encoder_calls_merged": (round(self._encoder_batcher.inputs / self._encoder_batcher.calls, 2)
                                     if self._encoder_batcher is not None and self._encoder_batcher.calls else None),
            "render_busy": self._render_busy(now),
            "frames_rendered": self.frames_rendered,
            "shared_batches": self.shared_batches,
            "frames_skipped": self.frames_skipped,
            "sessions_served": self.sessions_served,
            "token_required": self.token is not None,
            "config": asdict(self.config),
        }
        # a ProcessHead renders in a child process and reports that process's device memory
        info.update(getattr(self.head, "device_memory", None) or _device_memory(self.device))
        return info

    def _render_busy(self, now: float) -> float:
        """Share of the last 5 s the device spent rendering (a render process's own timing; in-process calls
        run one at a time, so their durations are the device's busy time)."""
        log = getattr(self.head, "render_log", None)
        busy = ([s for t, s in log if now - t <= 5.0] if log is not None
                else [s for t, _, s in self._render_log if now - t <= 5.0])
        return round(min(1.0, sum(busy) / 5.0), 3)

    async def _health(self, request: web.Request) -> web.Response:
        info = self.health()
        # a supervisor's health check reads the status code: 503 once the server cannot render
        return web.json_response(info, status=200 if info["status"] == "ok" else 503)

    @web.middleware
    async def _check_host(self, request: web.Request, handler):
        """Without a token the server listens on this machine only, so a request must name it (localhost or a
        loopback address) in its Host header. Another name means DNS rebinding: a web page whose own name was
        pointed at 127.0.0.1, which would pass the Origin check of `_origin_allowed`."""
        if self.token is None and not _names_loopback(request.host):
            log.info("refused a request for host %r (no token: only localhost names are served)", request.host)
            raise web.HTTPForbidden(text="this server answers only requests for localhost or 127.0.0.1; start it "
                                         "with --token to serve other names\n")
        return await handler(request)

    # ---------------------------------------------------------------- sessions
    def _origin_allowed(self, request: web.Request) -> bool:
        """Without a token, only pages served by this server may open sessions (a random web page cannot drive
        a model listening on localhost from the user's browser)."""
        origin = request.headers.get("Origin")
        if self.token is not None or origin is None:
            return True
        return urlsplit(origin).netloc == request.host

    async def _websocket(self, request: web.Request) -> web.StreamResponse:
        if not self._origin_allowed(request):
            log.info("refused a session from the page of another origin, %r", request.headers.get("Origin"))
            raise web.HTTPForbidden(text="cross-origin session refused; open the page served by this server, "
                                         "or start the server with --token\n")
        # Messages up to 4x the limit are read and refused with a message; beyond that aiohttp drops the
        # connection (close code 1009) without buffering them.
        ws = web.WebSocketResponse(max_msg_size=4 * protocol.MAX_AUDIO_BYTES, heartbeat=20.0, timeout=3.0)
        await ws.prepare(request)
        if self.failure is None and not getattr(self.head, "healthy", True):  # it died between sessions
            self._fail("the render process has stopped; restart the server")
        if self.failure is not None:
            await _refuse(ws, f"{self.failure}; the server is stopping", WSCloseCode.INTERNAL_ERROR)
            return ws
        if len(self.connections) + self.reserved >= self.config.max_sessions:
            log.info("refused a session: all %d sessions are in use", self.config.max_sessions)
            await _refuse(ws, f"server full: all {self.config.max_sessions} sessions are in use; try again later",
                          CLOSE_TRY_AGAIN_LATER)
            return ws
        self.reserved += 1
        conn = None
        try:
            try:
                start = await self._receive_start(ws)
            finally:
                self.reserved -= 1
            conn = self._open_session(ws, start)
            await ws.send_str(protocol.ReadyMessage(
                session=conn.state.id, fps=float(self.head.fps), sample_rate=int(self.head.sample_rate),
                width=int(self.head.width), height=int(self.head.height), samples_per_frame=640,
                lookahead_ms=round(self.lookahead_ms, 1), device=self.device).to_json())
            await self._receive_loop(conn)
        except ProtocolError as e:
            # the operator's view of why a session ended: a wrong token, an idle client, a broken client
            log.info("session %s: %s", conn.state.id if conn is not None else "(not started)", e)
            await _refuse(ws, str(e), WSCloseCode.POLICY_VIOLATION)
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            if conn is not None:
                self._close_session(conn)
        return ws

    async def _receive_start(self, ws: web.WebSocketResponse) -> dict:
        try:
            msg = await asyncio.wait_for(ws.receive(), protocol.START_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise ProtocolError(f"no start message within {protocol.START_TIMEOUT_S:.0f} s") from None
        if msg.type != WSMsgType.TEXT:
            raise ProtocolError("the first message must be {\"type\": \"start\", \"token\": ...}")
        start = protocol.parse_control(msg.data)
        if start["type"] != "start":
            raise ProtocolError("the first message must be {\"type\": \"start\"}")
        unknown = sorted(set(start) - protocol.START_KEYS)
        if unknown:  # e.g. a sample_rate: speech is always 16 kHz here, and ignoring it would slow the speech
            raise ProtocolError(f"unknown key(s) {', '.join(unknown)} in start; it takes only "
                                f"{', '.join(sorted(protocol.START_KEYS))} (speech is always 16 kHz mono int16 PCM)")
        if self.token is not None:
            given = start.get("token")
            if not isinstance(given, str) or not hmac.compare_digest(given.encode(), self.token.encode()):
                raise ProtocolError("missing or wrong token: this server needs the token it was started with")
        pose = start.get("pose", self.config.pose)
        if pose not in ("loop", "static"):
            raise ProtocolError("pose must be 'loop' or 'static'")
        if not isinstance(start.get("idle", False), bool):
            raise ProtocolError("idle must be true or false")
        return start

    def _open_session(self, ws, start: dict) -> _Connection:
        pose = self.pose if start.get("pose", self.config.pose) == self.config.pose else PoseClock(
            self.head, start["pose"])
        state = StreamSession(id=uuid.uuid4().hex[:12], features=SessionSpeech(self.encoder.encode_stream()),
                              right_reach=self.right_reach, pose=pose, lookahead_s=self.lookahead_ms / 1000.0)
        conn = _Connection(ws, state)
        conn.idle = start.get("idle", False)
        self.connections[state.id] = conn
        self.sessions_served += 1
        conn.tasks = [asyncio.create_task(self._encode_loop(conn)), asyncio.create_task(self._send_loop(conn))]
        if conn.idle:
            conn.tasks.append(asyncio.create_task(self._feed_loop(conn)))
        log.info("session %s opened%s (%d live)", state.id, " idle" if conn.idle else "", len(self.connections))
        return conn

    def _close_session(self, conn: _Connection) -> None:
        conn.state.closed = True
        for task in conn.tasks:
            task.cancel()
        if self.connections.pop(conn.state.id, None) is not None:
            log.info("session %s closed after %d frames (%d live)", conn.state.id, conn.state.sent,
                     len(self.connections))
        self._wake.set()

    async def _receive_loop(self, conn: _Connection) -> None:
        state, ws = conn.state, conn.ws
        while True:
            # Back-pressure: stop reading while this session holds too much un-rendered speech. Not for an idle
            # session: it must read an `interrupt` at once, and refuses speech beyond `max_held_s` instead.
            while (not conn.idle and state.features.unsent_seconds(state.next_render) > self.config.max_buffered_s
                   and not ws.closed and not conn.tasks[1].done()):
                conn.room.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(conn.room.wait(), 1.0)
                conn.heard = time.monotonic()  # the client was not being read: that time is not its silence
            if ws.closed or conn.tasks[1].done():  # the sender ended: `done` was sent or the client vanished
                return
            msg = await self._receive_from_client(conn)
            if msg.type == WSMsgType.BINARY:
                if conn.idle and state.features.finished and not conn.ending:
                    raise ProtocolError(f"the session reached the server's {self.config.max_session_s:.0f} s limit; "
                                        "start a new session")
                if state.features.finished or conn.ending:
                    raise ProtocolError("speech sent after {\"type\": \"end\"}")
                audio = protocol.decode_pcm(msg.data)
                if conn.idle and (conn.held_samples + len(audio)) / 16000 > self.config.max_held_s:
                    raise ProtocolError(f"more than {self.config.max_held_s:.0f} s of speech waiting to play; send "
                                        "the next utterance when the last has begun")
                if state.features.n_samples + conn.held_samples + len(audio) > self.config.max_session_s * 16000:
                    raise ProtocolError(f"utterance longer than the server's {self.config.max_session_s:.0f} s "
                                        "limit; start a new session")
                if conn.idle:  # given to the model at the session clock's pace (_feed_loop)
                    conn.held.append(audio)
                    conn.held_samples += len(audio)
                    conn.last_speech = time.monotonic()
                else:
                    state.features.push(audio)
                    conn.audio_arrived.set()
            elif msg.type == WSMsgType.TEXT:
                control = protocol.parse_control(msg.data)
                if control["type"] == "start":
                    raise ProtocolError("session already started")
                if state.features.finished or conn.ending:
                    raise ProtocolError("{\"type\": \"end\"} sent twice" if control["type"] == "end"
                                        else "interrupt sent after {\"type\": \"end\"}")
                if control["type"] == "interrupt":
                    if not conn.idle:
                        raise ProtocolError("interrupt needs a session started with \"idle\": true; to stop an "
                                            "utterance of this one, close the socket")
                    conn.held.clear()
                    conn.held_samples = 0
                    first_clear = -(-state.features.n_samples // 640)  # frames from here on hold no dropped speech
                    await ws.send_str(f'{{"type": "interrupted", "frame": {first_clear}}}')
                elif conn.idle:
                    conn.ending = True  # the feed finishes the utterance once the held speech is given
                else:
                    state.features.finish()  # keep reading: the socket closes after `done`, or the client leaves
                    conn.audio_arrived.set()
                    self._wake.set()
            elif msg.type == WSMsgType.ERROR:
                exc = ws.exception()
                raise ProtocolError(f"bad WebSocket message: {exc}")
            else:  # CLOSE, CLOSING, CLOSED: the client went away
                return

    async def _receive_from_client(self, conn: _Connection):
        """The client's next message, or ProtocolError once it has sent nothing for `idle_timeout_s`.

        The idle time is kept here, not by `ws.receive(timeout=...)`: aiohttp answers pings and takes pongs inside
        `receive` and restarts that timer on each, so a client that only keeps the connection alive (its own
        heartbeat, or answering the server's) would hold its session forever. After `end` there is no limit: the
        socket closes once `done` is sent.
        """
        state, ws = conn.state, conn.ws
        if state.features.finished or conn.idle:  # an idle session lives while its client is connected
            return await ws.receive()
        limit = self.config.idle_timeout_s
        left = conn.heard + limit - time.monotonic()
        try:
            if left <= 0:
                raise asyncio.TimeoutError
            msg = await asyncio.wait_for(ws.receive(), left)
        except asyncio.TimeoutError:
            raise ProtocolError(f"no message for {limit:g} s; send speech, or "
                                "{\"type\": \"end\"} when done") from None
        conn.heard = time.monotonic()
        return msg

    async def _encode_loop(self, conn: _Connection) -> None:
        loop = asyncio.get_running_loop()
        speech = conn.state.features
        while True:
            await conn.audio_arrived.wait()
            conn.audio_arrived.clear()
            while speech.needs_update():
                try:
                    await loop.run_in_executor(self._encode_pool, speech.update)
                except Exception as e:  # noqa: BLE001 - the encoder failing on this session's audio
                    log.exception("session %s: audio encoding failed", conn.state.id)
                    await _refuse(conn.ws, f"audio encoding failed: {e}", WSCloseCode.INTERNAL_ERROR)
                    return
                conn.state.note_ready(time.monotonic())
                self._wake.set()
                conn.sendable.set()

    async def _feed_loop(self, conn: _Connection) -> None:
        """Idle sessions: give the model speech at the pace of the session's clock, the client's held speech first
        and silence when there is none, so frames keep coming between utterances; after `end`, finish once the held
        speech is given. The session ends at `max_session_s`, as an utterance would."""
        speech = conn.state.features
        limit = int(self.config.max_session_s * 16000)
        while True:
            now = time.monotonic()
            clock = now - conn.opened + conn.state.lookahead_s
            need = min(int((clock + IDLE_FEED_AHEAD_S) * 16000), limit) - speech.n_samples
            pieces = []
            while need > 0 and conn.held:
                piece = conn.held.popleft()
                if len(piece) > need:
                    conn.held.appendleft(piece[need:])
                    piece = piece[:need]
                pieces.append(piece)
                conn.held_samples -= len(piece)
                need -= len(piece)
            # silence only for what is due soon: speech arriving a little late then joins without a gap
            ahead = 0.0 if now - conn.last_speech < IDLE_STREAMING_S else IDLE_SILENCE_AHEAD_S
            silence = min(int((clock + ahead) * 16000), limit) - speech.n_samples - sum(map(len, pieces))
            if silence > 0 and not conn.ending:
                pieces.append(np.zeros(silence, np.float32))
            if pieces:
                speech.push(np.concatenate(pieces))
                conn.audio_arrived.set()
                conn.room.set()
            if (conn.ending and not conn.held) or speech.n_samples >= limit:
                speech.finish()
                conn.audio_arrived.set()
                self._wake.set()
                return
            await asyncio.sleep(0.02)

    async def _send_loop(self, conn: _Connection) -> None:
        try:
            await self._send_frames(conn)
        finally:
            conn.room.set()  # wake a receive loop waiting for room, so it sees the sender has ended

    async def _send_frames(self, conn: _Connection) -> None:
        state, ws = conn.state, conn.ws
        while True:
            if state.done:
                await ws.send_str(f'{{"type": "done", "frames": {state.sent}}}')
                await ws.close()
                return
            if conn.outbox.empty():
                conn.sendable.clear()
                await conn.sendable.wait()
                continue
            await ws.send_bytes(conn.outbox.get_nowait())
            state.queued -= 1
            state.sent += 1
            conn.room.set()
            self._wake.set()

    # ---------------------------------------------------------------- rendering
    def _fail(self, reason: str) -> None:
        """Nothing can render any more: stop the server, so the user (or a supervisor) restarts it."""
        self.failure = reason
        log.error("stopping: %s", reason)
        if self.on_failure is not None:
            self.on_failure()

    def _live_sessions(self) -> list[StreamSession]:
        return [conn.state for conn in self.connections.values()]

    async def _render_loop(self) -> None:
        loop = asyncio.get_running_loop()
        room = asyncio.Semaphore(self.render_queue)
        while True:
            await room.acquire()
            while True:
                self._wake.clear()
                picks = pick_frames(self._live_sessions(), time.monotonic(), self.config, self._batch_cap())
                if picks:
                    break
                with contextlib.suppress(asyncio.TimeoutError):
                    # the timeout releases paced (faster than real time) sessions as their clock advances
                    await asyncio.wait_for(self._wake.wait(), timeout=0.01)
            batch = gather_batch(picks, self.left_reach)
            rendered = loop.run_in_executor(self._render_pool, self.head.render_frames, batch.features,
                                            batch.frame_rows, batch.pose_indices)
            # Queued for delivery before it renders: frames skipped meanwhile (overload) stay behind it.
            self._deliveries.put_nowait((batch, asyncio.ensure_future(self._encode_frames(batch, rendered))))
            task = asyncio.ensure_future(self._finish_render(batch, rendered, time.monotonic(), room))
            self._render_tasks.add(task)
            task.add_done_callback(self._render_tasks.discard)

    async def _finish_render(self, batch, rendered: asyncio.Future, submitted: float, room: asyncio.Semaphore) -> None:
        """Book a render call once it is done (and fail its sessions if it failed), then let the next one go."""
        try:
            await rendered
        except Exception as e:  # noqa: BLE001 - fail the sessions of this batch, keep serving the rest
            room.release()
            from egstalker.errors import EgstalkerError

            if isinstance(e, EgstalkerError):  # said in one line (a stopped or hung render process)
                log.error("render call failed: %s", e)
            else:
                log.exception("render call failed")
            if not getattr(self.head, "healthy", True) and self.failure is None:
                self._fail(str(e))
            sessions = list({s.id: s for s in batch.sessions}.values())
            for session in sessions:
                session.closed = True  # frames of a call still in flight must not follow the error
            for session in sessions:
                conn = self.connections.get(session.id)
                if conn is not None:
                    await _refuse(conn.ws, f"rendering failed: {e}", WSCloseCode.INTERNAL_ERROR)
            return
        room.release()
        finished = time.monotonic()
        # Calls are served one after another, so this one's device time began when it was sent or when the one
        # before it ended, whichever came later (with a queue, sending is not starting).
        self._render_log.append((finished, len(batch.frames), finished - max(submitted, self._last_render_end)))
        self._last_render_end = finished
        self.frames_rendered += len(batch.frames)
        self.shared_batches += len({s.id for s in batch.sessions}) > 1
        for session in {s.id: s for s in batch.sessions}.values():
            session.features.release(max(0, session.next_render - self.left_reach))

    def _batch_cap(self) -> int:
        """Frames per render call: max_batch, or fewer when the overload policy is on and a call that size
        would take longer than max_lag_s (from recent calls' cost per frame), so the lag stays bounded."""
        if self.config.max_lag_s is None or not self._render_log:
            return self.config.max_batch
        recent = list(self._render_log)[-8:]
        per_frame = sum(s for *_, s in recent) / sum(n for _, n, _ in recent)
        return max(1, min(self.config.max_batch, int(self.config.max_lag_s / max(per_frame, 1e-6))))

    async def _encode_frames(self, batch, rendered: asyncio.Future) -> list[bytes]:
        loop = asyncio.get_running_loop()
        images = await rendered
        return await asyncio.gather(*(
            loop.run_in_executor(self._jpeg_pool, _frame_message, int(frame), pcm, image, self.config.jpeg_quality)
            for frame, pcm, image in zip(batch.frames, batch.pcm, images)))

    async def _overdue_loop(self) -> None:
        """Overload: frames the device could not render in time go out with their speech and no new image
        (checked every 20 ms, also while a long render call runs)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(0.02)
            now = time.monotonic()
            sessions, messages = [], []
            for session in self._live_sessions():
                for frame in session.take_overdue(now, self.config):
                    pcm = protocol.encode_pcm(session.features.frame_audio(frame))
                    sessions.append(session)
                    messages.append(protocol.pack_frame(frame, pcm, b""))
            if messages:
                self.frames_skipped += len(messages)
                done = loop.create_future()
                done.set_result(messages)
                self._deliveries.put_nowait((_Skipped(sessions), done))

    async def _deliver_loop(self) -> None:
        """Hand encoded frames to their sessions' send queues, batch by batch (so each session stays in order)."""
        while True:
            batch, pending = await self._deliveries.get()
            try:
                messages = await pending
            except Exception:  # noqa: BLE001 - a failed render; its sessions were told and closed
                messages = [None] * len(batch.sessions)
            for session, message in zip(batch.sessions, messages):
                session.in_flight -= 1
                conn = self.connections.get(session.id)
                if conn is None or session.closed or message is None:
                    continue
                session.queued += 1
                conn.outbox.put_nowait(message)
                conn.sendable.set()


class _Skipped:
    """A delivery of frames sent without rendering (only `sessions` is read)."""

    def __init__(self, sessions: list[StreamSession]):
        self.sessions = sessions


def _names_loopback(host: str) -> bool:
    """Whether a Host header ('localhost:8010', '127.0.0.1', '[::1]:8010', '[::ffff:127.0.0.1]') names this
    machine's loopback; a malformed one does not."""
    try:
        name = urlsplit(f"//{host}").hostname or ""
        if name == "localhost":
            return True
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1, as dual-stack sockets show IPv4
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


def _frame_message(frame: int, pcm: np.ndarray, image: np.ndarray, quality: int) -> bytes:
    import cv2

    ok, jpeg = cv2.imencode(".jpg", np.ascontiguousarray(image[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return protocol.pack_frame(frame, protocol.encode_pcm(pcm), jpeg.tobytes())


async def _refuse(ws: web.WebSocketResponse, message: str, code: int) -> None:
    """Tell this client what is wrong in one line, then close its socket."""
    if ws.closed:
        return
    with contextlib.suppress(Exception):
        await ws.send_str(protocol.error_json(message))
        await ws.close(code=code, message=message[:120].encode())


def _device_memory(device: str) -> dict:
    """Accelerator memory in MiB (for the load benchmark), when the model runs on one."""
    try:
        import torch
    except ImportError:
        return {}
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        return {}
    return {"gpu_memory_mb": round(torch.cuda.memory_allocated(dev) / 2**20, 1),
            "gpu_peak_memory_mb": round(torch.cuda.max_memory_allocated(dev) / 2**20, 1),
            "gpu_name": torch.cuda.get_device_name(dev)}


async def serve_forever(head, host: str, port: int, config: ServeConfig, token: str | None, device: str,
                        ready: asyncio.Event | None = None) -> None:
    """Serve until Ctrl-C or SIGTERM (then return), or until rendering fails for good (then raise
    EgstalkerError saying why, once the sessions are closed)."""
    from egstalker.errors import EgstalkerError

    check_bind(host, token)
    server = TalkingHeadServer(head, config, token=token, device=device)
    runner = web.AppRunner(server.app(), access_log=None, shutdown_timeout=5.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    port = runner.addresses[0][1] if runner.addresses else port  # --port 0: the free port the system picked
    print(f"egstalker serve: {_page_address(host, port)}  (device {device}, {head.width}x{head.height} at "
          f"{head.fps:g} fps, up to {config.max_sessions} sessions, look-ahead {server.lookahead_ms:.0f} ms"
          f"{', token required' if token else ''})", flush=True)
    if ready is not None:
        ready.set()
    # Ctrl-C and SIGTERM (service managers) end the wait below rather than raise KeyboardInterrupt inside whichever
    # task runs at that moment (that task would then die mid-step and be reported at exit)
    stop = asyncio.Event()
    server.on_failure = stop.set

    def on_signal() -> None:
        if stop.is_set():  # a second Ctrl-C while the sessions close and the last render call ends (seconds)
            print("egstalker serve: stopping (closing sessions, ending the render call under way)",
                  file=sys.stderr, flush=True)
        stop.set()

    loop = asyncio.get_running_loop()
    handled = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            previous = signal.getsignal(signum)
            loop.add_signal_handler(signum, on_signal)
            handled[signum] = previous
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or not on this platform
            pass
    try:
        await stop.wait()
    finally:
        try:
            await runner.cleanup()  # signals still go to on_signal: the clean-up is not cut short
        finally:
            for signum, previous in handled.items():
                loop.remove_signal_handler(signum)  # which leaves the default disposition: put the caller's back
                signal.signal(signum, previous)
    if server.failure is not None:
        raise EgstalkerError(f"{server.failure}; the server stopped")


def _page_address(host: str, port: int) -> str:
    """The page's URL as printed at start-up; for every interface, this machine's name."""
    if host in ("", "0.0.0.0", "::"):
        import socket

        return f"http://{socket.gethostname()}:{port}/ (every interface)"
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/"
