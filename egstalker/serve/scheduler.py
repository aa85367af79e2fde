"""Batching the frames of every live session into shared `TalkingHead.render_frames` calls.

One model serves all sessions: each scheduling round takes the renderable frames of all sessions, earliest
deadline first, up to `max_batch`, and renders them in one call. While a call runs, new frames accumulate, so
batches stay small (low latency) when few sessions are live and grow with load (throughput).

Each frame reads a window of feature rows around it. Sessions cannot share one feature array with the model's own
edge clamping, so for every frame we gather its window rows (clamped at its own session's edges) into a block of
`left + 1 + right` rows and point the model at the block's centre row.
"""

from __future__ import annotations

import collections
import math
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from egstalker.audio.base import SAMPLE_RATE
from egstalker.serve.features import SessionSpeech


@dataclass
class ServeConfig:
    """Limits and tuning of a server; saved nowhere (runtime settings), shown in /health."""

    max_sessions: int = 16
    """Live sessions at once; more are refused with a message."""
    max_batch: int = 32
    """Frames per render call, across sessions."""
    jpeg_quality: int = 80
    max_ahead_s: float = 1.0
    """How far ahead of real time a session fed faster than real time (an upload) is rendered."""
    max_buffered_s: float = 20.0
    """Un-rendered speech a session may hold; reading its socket pauses beyond this (TCP back-pressure)."""
    max_session_s: float = 3600.0
    """Longest utterance per session (an idle session's whole length, silence included)."""
    max_held_s: float = 300.0
    """Speech an idle session may hold before it plays (it keeps reading its socket, so that `interrupt` is heard
    at once); more is refused with a message."""
    idle_timeout_s: float = 60.0
    """A session that sends nothing for this long before `end` is closed (frees its slot); not an idle session,
    which lives while its client is connected."""
    send_queue_frames: int = 50
    """Rendered frames waiting to be sent per session (2 s); rendering for a session pauses when full."""
    pose: str = "loop"
    """Default pose source: 'loop' (ping-pong over training frames) or 'static'."""
    max_lag_s: float | None = 0.5
    """Overload policy: a frame that could have been rendered this long ago but was not (the device is
    saturated) is sent with its speech and no new image; the viewer keeps the previous image. Video then
    stutters, but speech, sync and latency stay intact instead of falling further behind. None: never skip."""


class PoseClock:
    """Pose indices per output frame, shared by all sessions and grown on demand (pose_schedule is a prefix)."""

    def __init__(self, head, mode: str):
        self.head, self.mode = head, mode
        self._schedule = np.asarray(head.pose_schedule(256, mode=mode))

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        need = int(frames.max()) + 1 if len(frames) else 0
        if need > len(self._schedule):
            self._schedule = np.asarray(self.head.pose_schedule(max(need, 2 * len(self._schedule)), mode=self.mode))
        return self._schedule[frames]


@dataclass
class StreamSession:
    """Scheduling state of one live session (the socket side lives in server.py)."""

    id: str
    features: SessionSpeech
    right_reach: int
    """Future feature rows a frame reads (rows up to frame + right_reach must be final)."""
    pose: PoseClock
    lookahead_s: float = 0.0
    """Speech after a frame's own 40 ms that any frame may need (the server's look-ahead): every frame waits for
    it, so all frames of a stream come equally late (see renderable_limit)."""
    created: float = field(default_factory=time.monotonic)
    next_render: int = 0
    """First frame not yet handed to a render call."""
    in_flight: int = 0
    """Frames rendered or being encoded but not yet in the send queue."""
    queued: int = 0
    """Frames in the send queue."""
    sent: int = 0
    t_first_ready: float | None = None
    """When frame 0 became renderable: the session clock's origin for deadlines."""
    closed: bool = False
    error: str | None = None
    skipped: int = 0
    """Frames sent without a new image (overload)."""
    _ready_marks: collections.deque = field(default_factory=collections.deque)
    """(renderable limit, time it was first seen): when each frame became renderable."""

    def renderable_limit(self) -> int:
        """Frames [0, limit) have every feature row they read."""
        total = self.features.n_frames_total
        if total is not None and self.features.n_final >= total:
            return total
        limit = self.features.n_final - self.right_reach
        # A block encoder (whisper) finishes 5 frames at once, so some frames would be renderable 120 ms sooner
        # than others and a stream would start that much ahead of its steady latency, eating a player's buffer.
        # Holding each frame until its own speech + the look-ahead has arrived makes every frame equally late.
        heard_s = self.features.n_samples / SAMPLE_RATE
        return max(0, min(limit, math.floor((heard_s - self.lookahead_s) * 25.0 + 1e-6)))

    def deadline(self, frame: int) -> float:
        return self.t_first_ready + frame / 25.0

    def candidates(self, now: float, config: ServeConfig) -> list[int]:
        """Frames this session could render now, in order."""
        if self.closed:
            return []
        limit = self.renderable_limit()
        if limit > self.next_render and self.t_first_ready is None:
            self.t_first_ready = now
        self.note_ready(now)
        room = config.send_queue_frames - self.in_flight - self.queued
        stop = min(limit, self.next_render + max(0, room))
        if self.t_first_ready is not None:  # pace faster-than-real-time input
            stop = min(stop, int(math.floor((now - self.t_first_ready + config.max_ahead_s) * 25.0)) + 1)
        return list(range(self.next_render, max(stop, self.next_render)))

    def note_ready(self, now: float) -> None:
        """Record when frames became renderable (call after each feature update, so frames that became
        ready while a long render call ran carry their true time)."""
        limit = self.renderable_limit()
        if limit > (self._ready_marks[-1][0] if self._ready_marks else 0):
            self._ready_marks.append((limit, now))

    def eligible_since(self, frame: int, config: ServeConfig) -> float:
        """When `frame` could first have been rendered: its features were final and pacing allowed it."""
        while self._ready_marks and self._ready_marks[0][0] <= self.next_render:
            self._ready_marks.popleft()
        ready = next((t for limit, t in self._ready_marks if limit > frame), math.inf)
        return max(ready, self.deadline(frame) - config.max_ahead_s)

    def take_overdue(self, now: float, config: ServeConfig) -> list[int]:
        """Frames to send without rendering because the device fell behind (see ServeConfig.max_lag_s).

        Skips up to the first frame that is not overdue, so the session resumes rendering on time."""
        if config.max_lag_s is None or self.closed:
            return []
        frames = []
        for frame in self.candidates(now, config):
            if now - self.eligible_since(frame, config) <= config.max_lag_s:
                break
            frames.append(frame)
        if frames:
            self.next_render = frames[-1] + 1
            self.in_flight += len(frames)
            self.skipped += len(frames)
        return frames

    @property
    def done(self) -> bool:
        total = self.features.n_frames_total
        return total is not None and self.sent >= total


@dataclass
class Batch:
    sessions: list[StreamSession]
    frames: np.ndarray
    """[B] frame index within each frame's session."""
    features: np.ndarray
    """[B * (left + 1 + right), *feature_shape] gathered window rows."""
    frame_rows: np.ndarray
    """[B] row of `features` each frame is centred on."""
    pose_indices: np.ndarray
    """[B]"""
    pcm: list[np.ndarray]
    """B float32 [samples_per_frame] speech of each frame's slot."""


def pick_frames(sessions: Sequence[StreamSession], now: float, config: ServeConfig,
                max_batch: int | None = None) -> list[tuple[StreamSession, int]]:
    """Earliest-deadline-first choice of at most `max_batch` (default config.max_batch) frames over all
    sessions."""
    max_batch = max_batch or config.max_batch
    pool = []
    for session in sessions:
        for frame in session.candidates(now, config)[:max_batch]:
            pool.append((session.deadline(frame), session.id, frame, session))
    pool.sort(key=lambda item: item[:3])
    chosen = pool[:max_batch]
    # Keep each session's frames contiguous from next_render (EDF already takes them in order per session).
    return [(session, frame) for _, _, frame, session in chosen]


def gather_batch(picks: Sequence[tuple[StreamSession, int]], left_reach: int) -> Batch:
    """Build one render call's inputs and mark the picked frames as in flight."""
    span = left_reach + 1
    blocks, rows, poses, pcm, sessions, frames = [], [], [], [], [], []
    for b, (session, frame) in enumerate(picks):
        stream = session.features
        last = stream.n_final - 1
        right = session.right_reach
        window = np.clip(np.arange(frame - left_reach, frame + right + 1), 0, last)
        blocks.append(stream.rows(window))
        rows.append(b * (span + right) + left_reach)
        poses.append(session.pose(np.array([frame]))[0])
        pcm.append(stream.frame_audio(frame))
        sessions.append(session)
        frames.append(frame)
        session.next_render = frame + 1
        session.in_flight += 1
    return Batch(sessions, np.array(frames), np.concatenate(blocks), np.array(rows), np.array(poses), pcm)
