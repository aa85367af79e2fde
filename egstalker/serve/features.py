"""Speech and per-frame features of one live session, computed as the speech arrives.

The encoding itself is the audio package's `FeatureStream` (`encoder.encode_stream()`): it re-encodes each new
piece with the encoder's left context and holds back the encoder's look-ahead, so streamed rows equal whole-clip
rows at chunk borders too. This class adds what a server needs around it: the speech chunks arrive on the event
loop while encoding runs in a worker thread; final rows and the speech of not-yet-sent frames are kept (each frame
is sent with its own 40 ms of speech) and released once no frame needs them, so memory stays bounded.
"""

from __future__ import annotations

import threading

import numpy as np

from egstalker.audio.base import SAMPLES_PER_FRAME, frames_for_samples


class SessionSpeech:
    """Thread-safe: `push`/`finish`/`rows`/`frame_audio`/`release` on the event loop, `update` in one worker.

    Args:
        stream: an `egstalker.audio.base.FeatureStream` (from `encoder.encode_stream()`), used only by `update`.
    """

    def __init__(self, stream):
        self._stream = stream
        self._lock = threading.Lock()
        self._audio = np.zeros(0, np.float32)
        self.first_kept_sample = 0
        """Absolute sample index of `_audio[0]` (a multiple of 640)."""
        self._pending: list[np.ndarray] = []
        """Speech received but not yet given to the encoder."""
        self._rows: np.ndarray | None = None
        self.first_kept_frame = 0
        """Absolute frame index of `_rows[0]`."""
        self.n_final = 0
        """Frames [0, n_final) have final features."""
        self.finished = False
        self._flushed = False

    @property
    def n_samples(self) -> int:
        """Speech samples received so far."""
        return self.first_kept_sample + len(self._audio)

    @property
    def n_frames_total(self) -> int | None:
        """Frames of the whole utterance, round(samples / 640), once it has ended; else None."""
        return frames_for_samples(self.n_samples) if self.finished else None

    def push(self, audio: np.ndarray) -> None:
        """Add speech: float32 [n] at 16 kHz."""
        audio = np.asarray(audio, np.float32).reshape(-1)
        with self._lock:
            if self.finished:
                raise ValueError("speech pushed after the end of the utterance")
            self._audio = np.concatenate([self._audio, audio])
            self._pending.append(audio)

    def finish(self) -> None:
        with self._lock:
            self.finished = True

    def needs_update(self) -> bool:
        with self._lock:
            return bool(self._pending) or (self.finished and not self._flushed)

    def update(self) -> int:
        """Encode the pending speech (CPU/GPU work: call it off the event loop); returns `n_final`."""
        with self._lock:
            pending, self._pending = self._pending, []
            flush = self.finished and not self._flushed
        rows = []
        if pending:
            rows.append(self._stream.push(np.concatenate(pending)))
        if flush:
            rows.append(self._stream.flush())
        rows = [r for r in rows if len(r)]
        with self._lock:
            if rows:
                new = np.concatenate(rows)
                self._rows = new if self._rows is None else np.concatenate([self._rows, new])
                self.n_final += len(new)
            self._flushed = self._flushed or flush
            return self.n_final

    def rows(self, frames: np.ndarray) -> np.ndarray:
        """Final feature rows of absolute frame indices `frames` -> [len(frames), *feature_shape]."""
        frames = np.asarray(frames)
        with self._lock:
            if len(frames) and (frames.min() < self.first_kept_frame or frames.max() >= self.n_final):
                raise IndexError(f"feature rows {frames.min()}..{frames.max()} are outside the kept final rows "
                                 f"{self.first_kept_frame}..{self.n_final - 1}")
            return self._rows[frames - self.first_kept_frame]

    def frame_audio(self, frame: int) -> np.ndarray:
        """The speech of frame `frame`'s 40 ms slot, [640] float32 (zero-padded past the end)."""
        with self._lock:
            start = frame * SAMPLES_PER_FRAME - self.first_kept_sample
            if start < 0:
                raise IndexError(f"speech of frame {frame} was already released")
            piece = self._audio[start:start + SAMPLES_PER_FRAME]
        if len(piece) < SAMPLES_PER_FRAME:
            piece = np.concatenate([piece, np.zeros(SAMPLES_PER_FRAME - len(piece), np.float32)])
        return piece

    def release(self, first_needed_frame: int) -> None:
        """Drop speech and rows that no frame >= `first_needed_frame` needs (in ~8 s steps, so copies are rare)."""
        step = 200
        with self._lock:
            drop_frames = first_needed_frame - self.first_kept_sample // SAMPLES_PER_FRAME
            if drop_frames >= step:
                self._audio = self._audio[drop_frames * SAMPLES_PER_FRAME:].copy()
                self.first_kept_sample += drop_frames * SAMPLES_PER_FRAME
            drop_rows = min(first_needed_frame, self.n_final) - self.first_kept_frame
            if self._rows is not None and drop_rows >= step:
                self._rows = self._rows[drop_rows:].copy()
                self.first_kept_frame += drop_rows

    def unsent_seconds(self, next_frame: int) -> float:
        """Speech received for frames at or after `next_frame` (for back-pressure)."""
        return max(0, self.n_samples - next_frame * SAMPLES_PER_FRAME) / 16000.0
