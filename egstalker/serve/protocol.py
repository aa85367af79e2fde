"""The wire protocol of `egstalker serve`: one WebSocket per session, at `/ws`.

Why WebSocket (not WebRTC): every frame travels with the exact audio samples it belongs to, so the receiver plays
them in sync by construction (A/V offset 0), and TCP's ordering and flow control give us lossless frames and
natural back-pressure. It needs no ICE/STUN/TURN, no codec negotiation and no extra native dependency (aiohttp is
already a dependency), it is scriptable from Python and any browser, and it is easy to test. What we give up is
WebRTC's congestion-adaptive bit rate over lossy long-distance links; on a LAN or a decent connection, 25 JPEGs a
second (~0.5-1.5 MB/s at 256-512 px) are fine.

Client -> server
- text  `{"type": "start", "token": "...", "pose": "loop", "idle": false}`: first message, within
  `START_TIMEOUT_S`; token, pose and idle are optional, other keys are refused. `"idle": true` opens a session
  that lives until `end`, until the client leaves or for `max_session_s`: frames come at 25 fps from the start, with silence (a
  closed mouth, the pose moving on) whenever the client has no speech to play, and each utterance sent plays
  from the next frame the server has not yet given speech to (the client's messages then need no pacing).
- binary: speech, 16 kHz mono signed 16-bit little-endian PCM, any length from 2 bytes to `MAX_AUDIO_BYTES`,
  sent as it is spoken (a browser microphone, or a file paced in real time). Faster than real time is allowed:
  the server then renders at most `max_ahead_s` ahead of real time and reads more only as it catches up.
- text  `{"type": "end"}`: no more speech; the server renders the last frames (edge-padded) and answers `done`.
- text  `{"type": "interrupt"}` (idle sessions only): drop the speech the server holds but has not started to
  play (barge-in); it answers `interrupted` and goes on with silence.

Server -> client
- text  `{"type": "ready", ...}`: session accepted; geometry, frame rate and the look-ahead (see `ReadyMessage`).
- binary frame: `FRAME_HEADER` (magic, frame index, number of PCM samples, JPEG byte count) + PCM int16 (the speech
  samples of this frame's 40 ms slot, i.e. samples [index*640, (index+1)*640)) + JPEG. Frame k is shown while its
  samples play, at time k/fps on the session clock. A JPEG of 0 bytes means "no new image, keep showing the
  previous one": the server sends those when its device cannot keep up (overload), so the speech never stops.
- text  `{"type": "done", "frames": N}` after `end`, once every frame has been sent.
- text  `{"type": "interrupted", "frame": K}` after `interrupt`: frames from K on carry none of the dropped speech
  (frames before K may still carry its first fraction of a second, which the server had already given the model).
- text  `{"type": "error", "message": "..."}`: one line saying what is wrong; the server then closes the socket.
"""

from __future__ import annotations

import json
import struct
from dataclasses import asdict, dataclass

import numpy as np

SAMPLE_RATE = 16000
FPS = 25.0
FRAME_MAGIC = b"EGF1"
FRAME_HEADER = struct.Struct("<4sIII")
"""magic, frame index, PCM sample count, JPEG byte count (little-endian)."""
MAX_AUDIO_BYTES = 64 * 1024
"""Largest speech message (about 2 s of audio); larger ones are refused."""
MAX_TEXT_BYTES = 4096
START_KEYS = frozenset({"type", "token", "pose", "idle"})
"""What a `start` message may hold; anything else is refused (not ignored)."""
START_TIMEOUT_S = 10.0
"""A connection that sends no `start` in this time is closed."""
WS_PATH = "/ws"


class ProtocolError(Exception):
    """A message this session's client got wrong; its text is sent to that client only."""


@dataclass(frozen=True)
class ReadyMessage:
    session: str
    fps: float
    sample_rate: int
    width: int
    height: int
    samples_per_frame: int
    lookahead_ms: float
    """Minimum speech after a frame's own 40 ms slot the server must hold before it can render that frame."""
    device: str

    def to_json(self) -> str:
        return json.dumps({"type": "ready", **asdict(self)})


def error_json(message: str) -> str:
    return json.dumps({"type": "error", "message": message})


def parse_control(text: str) -> dict:
    """Parse a client text message; raises ProtocolError for anything that is not a known JSON control."""
    if len(text) > MAX_TEXT_BYTES:
        raise ProtocolError(f"text message of {len(text)} characters is over the {MAX_TEXT_BYTES} limit")
    try:
        message = json.loads(text)
    except json.JSONDecodeError:
        raise ProtocolError("text messages must be JSON such as {\"type\": \"start\"}; "
                            "send speech as binary 16 kHz int16 PCM") from None
    if not isinstance(message, dict) or message.get("type") not in ("start", "end", "interrupt"):
        raise ProtocolError("unknown control message; expected {\"type\": \"start\"}, {\"type\": \"end\"} or "
                            "{\"type\": \"interrupt\"}")
    return message


def decode_pcm(data: bytes) -> np.ndarray:
    """Binary speech message -> float32 [n] in [-1, 1]; raises ProtocolError when it is not int16 PCM."""
    if len(data) == 0:
        raise ProtocolError("empty audio message; send 16 kHz mono int16 PCM")
    if len(data) > MAX_AUDIO_BYTES:
        raise ProtocolError(f"audio message of {len(data)} bytes is over the {MAX_AUDIO_BYTES} byte limit; "
                            "send smaller chunks (e.g. 20-100 ms)")
    if len(data) % 2:
        raise ProtocolError(f"audio message of {len(data)} bytes is not whole int16 samples; "
                            "send 16 kHz mono signed 16-bit little-endian PCM")
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0


def encode_pcm(audio: np.ndarray) -> bytes:
    """float32 [n] in [-1, 1] -> int16 little-endian bytes (clipped); the inverse of `decode_pcm` (the same 32768
    scale), so the speech a frame carries back is the client's own samples, bit for bit."""
    return np.clip(np.round(np.asarray(audio, np.float32) * 32768.0), -32768, 32767).astype("<i2").tobytes()


def pack_frame(index: int, pcm: bytes, jpeg: bytes) -> bytes:
    return FRAME_HEADER.pack(FRAME_MAGIC, index, len(pcm) // 2, len(jpeg)) + pcm + jpeg


@dataclass(frozen=True)
class Frame:
    index: int
    pcm: bytes
    """int16 little-endian speech samples of this frame's slot."""
    jpeg: bytes


def unpack_frame(data: bytes) -> Frame:
    if len(data) < FRAME_HEADER.size:
        raise ProtocolError(f"frame message of {len(data)} bytes is shorter than its header")
    magic, index, n_samples, n_jpeg = FRAME_HEADER.unpack_from(data)
    if magic != FRAME_MAGIC or len(data) != FRAME_HEADER.size + 2 * n_samples + n_jpeg:
        raise ProtocolError("not an egstalker frame message (bad magic or length)")
    pcm_end = FRAME_HEADER.size + 2 * n_samples
    return Frame(index, data[FRAME_HEADER.size:pcm_end], data[pcm_end:])
