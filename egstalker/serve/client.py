"""A Python client of `egstalker serve`: streams speech as a browser would and measures what comes back.

Used by `egstalker client`, the tests and the load benchmark.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from egstalker.errors import EgstalkerError
from egstalker.serve import protocol


def websocket_url(url: str) -> str:
    """'http://host:port[/]' or 'ws://host:port/ws' -> the server's WebSocket URL."""
    parts = urlsplit(url if "://" in url else f"http://{url}")
    scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(parts.scheme)
    if scheme is None or not parts.netloc:
        raise EgstalkerError(f"{url!r} is not a server address; give e.g. http://127.0.0.1:8010")
    path = parts.path.rstrip("/")
    if path.endswith(protocol.WS_PATH):  # also behind a proxy's prefix: https://host/talk/ws
        return urlunsplit((scheme, parts.netloc, path, parts.query, ""))
    if path:  # /health, a typo: not silently replaced by /ws
        raise EgstalkerError(f"{url!r} names the page {parts.path}; give the server's address alone, e.g. "
                             f"{parts.scheme}://{parts.netloc} (sessions go to {protocol.WS_PATH}), or its full "
                             f"session URL ending in {protocol.WS_PATH}")
    return urlunsplit((scheme, parts.netloc, protocol.WS_PATH, parts.query, ""))


@dataclass
class ReceivedStream:
    """What one session sent back, with client-side clocks (time.monotonic)."""

    sent_audio: np.ndarray
    """[T] float32 speech that was streamed."""
    chunk_samples: int
    started: float = 0.0
    """When the first speech chunk was sent."""
    chunk_sent: list[float] = field(default_factory=list)
    """Send time of each speech chunk."""
    ready: dict | None = None
    frames: list[protocol.Frame] = field(default_factory=list)
    received: list[float] = field(default_factory=list)
    """Arrival time of each frame."""
    done_frames: int | None = None
    error: str | None = None
    """Why the stream ended without `done`: the server's error message, how the connection closed, a time-out."""
    server_error: str | None = None
    """The error message the server sent, when it sent one (then also `error`)."""

    @property
    def complete(self) -> bool:
        """The server said `done` after every frame the speech makes, and nothing went wrong."""
        return (self.error is None and self.done_frames is not None
                and len(self.frames) == self.done_frames == self.expected_frames)

    @property
    def expected_frames(self) -> int:
        return (len(self.sent_audio) + 320) // 640

    def slot_complete_time(self, frame: int) -> float:
        """When the last speech sample of `frame`'s 40 ms slot was sent (clamped to the last chunk)."""
        last_sample = min((frame + 1) * 640, len(self.sent_audio)) - 1
        chunk = min(max(0, last_sample) // self.chunk_samples, len(self.chunk_sent) - 1)
        return self.chunk_sent[chunk]

    def timing(self, playout_buffer_s: float = 0.1) -> dict:
        """Latency and frame-timing statistics (milliseconds).

        latency of frame k: its arrival - when the last sample of its own 40 ms slot was sent; it includes the
        look-ahead the model needs (`ready.lookahead_ms`). A frame is late when it arrives after its playout
        time, first arrival + `playout_buffer_s` + k / 25 (a player with that start-up buffer would stall).
        """
        n = len(self.frames)
        out: dict = {"frames": n, "expected_frames": self.expected_frames, "error": self.error}
        if n == 0:
            return out
        recv = np.array(self.received)
        latency = np.array([recv[i] - self.slot_complete_time(f.index) for i, f in enumerate(self.frames)]) * 1000
        intervals = np.diff(recv) * 1000 if n > 1 else np.zeros(1)
        playout = recv[0] + playout_buffer_s + np.arange(n) / protocol.FPS
        # Only frames whose speech was streamed in real time can keep pace (the tail is rendered after `end`).
        out.update({
            "first_frame_latency_ms": round(float(latency[0]), 1),
            "first_frame_after_start_ms": round(1000 * (recv[0] - self.started), 1),
            "latency_ms": _percentiles(latency),
            "frame_interval_ms": _percentiles(intervals),
            "max_gap_ms": round(float(intervals.max()), 1),
            "received_fps": round((n - 1) / (recv[-1] - recv[0]), 2) if n > 1 and recv[-1] > recv[0] else None,
            "late_frames": int((recv > playout + 1e-3).sum()),
            "playout_buffer_ms": playout_buffer_s * 1000,
            "in_order": all(f.index == i for i, f in enumerate(self.frames)),
            "skipped_frames": sum(1 for f in self.frames if not f.jpeg),
            "av_offset_ms": self.av_offset_ms(),
        })
        if self.ready:
            out["lookahead_ms"] = self.ready.get("lookahead_ms")
        return out

    def returned_audio(self) -> np.ndarray:
        pcm = b"".join(f.pcm for f in self.frames)
        return np.frombuffer(pcm, "<i2").astype(np.float32) / 32768.0

    def av_offset_ms(self, max_lag: int = 1600) -> float | None:
        """Offset (ms) between the speech each frame carries and the speech sent for that frame's slot: the
        lag that best aligns them (0 when every frame carries exactly its own 40 ms)."""
        back = self.returned_audio()
        sent = self.sent_audio[:len(back)]
        if len(sent) < 2 * max_lag or float(np.abs(sent).max()) == 0.0:
            return None
        core = back[max_lag:len(sent) - max_lag]
        scores = [float(np.dot(core, sent[max_lag + lag:len(sent) - max_lag + lag])) for lag in
                  range(-max_lag, max_lag + 1, 8)]
        coarse = int(np.argmax(scores)) * 8 - max_lag
        fine = range(max(-max_lag, coarse - 8), min(max_lag, coarse + 8) + 1)
        best = max(fine, key=lambda lag: float(np.dot(core, sent[max_lag + lag:len(sent) - max_lag + lag])))
        return round(1000.0 * best / protocol.SAMPLE_RATE, 2)


def _ended_early(msg, close_code: int | None) -> str:
    """How a connection that closed before `done` ended, in words (close code and reason, or the error)."""
    import aiohttp

    if msg.type == aiohttp.WSMsgType.ERROR:
        return f"the connection failed: {msg.data or 'unknown error'}"
    code = msg.data if msg.type == aiohttp.WSMsgType.CLOSE else close_code
    reason = msg.extra if msg.type == aiohttp.WSMsgType.CLOSE and msg.extra else ""
    if code is None or code == 1006:  # no close frame: the server process or the network went away
        return "the connection to the server was lost (no close message)"
    return f"the server closed the connection (code {code}{': ' + reason if reason else ''})"


def _percentiles(values: np.ndarray) -> dict:
    return {"p50": round(float(np.percentile(values, 50)), 1), "p95": round(float(np.percentile(values, 95)), 1),
            "p99": round(float(np.percentile(values, 99)), 1), "max": round(float(values.max()), 1)}


async def stream_speech(url: str, audio: np.ndarray, *, token: str | None = None, realtime: bool = True,
                        chunk_ms: float = 20.0, pose: str | None = None, session=None,
                        timeout_s: float | None = None) -> ReceivedStream:
    """Stream 16 kHz mono float32 `audio` to a server in `chunk_ms` chunks (paced in real time unless
    `realtime=False`), collect every frame until `done`, an error or the socket closes.

    Args:
        session: an aiohttp.ClientSession to reuse (many concurrent streams); one is made when None.
        timeout_s: give up after this long (default: the audio's duration + 30 s).
    """
    import aiohttp

    audio = np.asarray(audio, np.float32).reshape(-1)
    chunk = max(2, int(round(chunk_ms * protocol.SAMPLE_RATE / 1000)))
    result = ReceivedStream(sent_audio=audio, chunk_samples=chunk)
    timeout_s = timeout_s if timeout_s is not None else len(audio) / protocol.SAMPLE_RATE + 30.0
    own_session = session is None
    session = session or aiohttp.ClientSession()
    try:
        async with session.ws_connect(websocket_url(url), max_msg_size=16 * 2**20, heartbeat=20.0) as ws:
            start = {"type": "start"}
            if token:
                start["token"] = token
            if pose:
                start["pose"] = pose
            await ws.send_str(json.dumps(start))

            async def send() -> None:
                result.started = t0 = time.monotonic()
                for i, a in enumerate(range(0, len(audio), chunk)):
                    if realtime:
                        delay = t0 + a / protocol.SAMPLE_RATE - time.monotonic()
                        if delay > 0:
                            await asyncio.sleep(delay)
                    await ws.send_bytes(protocol.encode_pcm(audio[a:a + chunk]))
                    result.chunk_sent.append(time.monotonic())
                if realtime:  # the end of the last chunk is spoken later than its start
                    await asyncio.sleep(max(0.0, t0 + len(audio) / protocol.SAMPLE_RATE - time.monotonic()))
                await ws.send_str('{"type": "end"}')

            async def receive() -> None:
                while True:
                    msg = await ws.receive()
                    if msg.type == aiohttp.WSMsgType.BINARY:
                        result.received.append(time.monotonic())
                        result.frames.append(protocol.unpack_frame(msg.data))
                    elif msg.type == aiohttp.WSMsgType.TEXT:
                        data = json.loads(msg.data)
                        if data.get("type") == "ready":
                            result.ready = data
                        elif data.get("type") == "done":
                            result.done_frames = int(data["frames"])
                            return
                        elif data.get("type") == "error":
                            result.error = result.server_error = str(data.get("message"))
                            return
                    else:  # closed before `done`: say how
                        result.error = _ended_early(msg, ws.close_code)
                        return

            sender = asyncio.create_task(send())
            try:
                await asyncio.wait_for(receive(), timeout_s)
            except asyncio.TimeoutError:
                result.error = result.error or f"timed out after {timeout_s:.0f} s"
            finally:
                sender.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await sender
    except aiohttp.WSServerHandshakeError as e:
        result.error = f"server refused the connection: HTTP {e.status} {e.message}"
    except aiohttp.ClientConnectorError as e:  # nothing listening, a name that does not resolve
        errno = getattr(e.os_error, "errno", None)
        reason = (os.strerror(errno) if errno and errno > 0 else (e.os_error.strerror or str(e.os_error))) or str(e)
        result.error = f"cannot connect to {e.host}:{e.port} ({reason}); is `egstalker serve` running there?"
    except aiohttp.ClientConnectionError as e:
        result.error = result.error or f"connection failed: {e}"
    finally:
        if own_session:
            await session.close()
    return result


def load_speech(path: str | Path) -> np.ndarray:
    """Any audio/video file -> 16 kHz mono float32."""
    from egstalker.media import read_audio

    return read_audio(path, rate=protocol.SAMPLE_RATE, align_to_video=False)


def save_received(stream: ReceivedStream, path: str | Path) -> None:
    """Write the received frames and the speech they carry as an H.264 + AAC mp4 (through a temp name)."""
    import cv2

    if not stream.frames:
        raise EgstalkerError("no frames were received, so there is nothing to save")
    from egstalker.render.video import Mp4Writer

    height, width = stream.ready["height"], stream.ready["width"]
    with Mp4Writer(path, width=width, height=height, fps=protocol.FPS, audio=stream.returned_audio(),
                   audio_rate=protocol.SAMPLE_RATE) as writer:
        image = np.zeros((height, width, 3), np.uint8)
        for frame in stream.frames:
            if frame.jpeg:  # an empty JPEG (server overload) repeats the previous image
                image = np.ascontiguousarray(cv2.imdecode(np.frombuffer(frame.jpeg, np.uint8), cv2.IMREAD_COLOR)[..., ::-1])
            writer.write(image)
