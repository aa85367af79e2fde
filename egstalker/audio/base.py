"""The audio encoder contract: 16 kHz mono speech in, one feature per 25 fps video frame out.

Frame i of a clip owns the 40 ms slot of samples [640 i, 640 (i + 1)) of the 16 kHz waveform. Its feature
may use audio from `context_seconds` before the slot to `lookahead_seconds` after it; audio outside the
clip counts as silence (zeros). Because a feature depends on nothing else, a clip can be encoded whole or in
pieces (`encode_stream`) with the same result; encoders whose model sees unbounded context (transformers)
are encoded in overlapping windows everywhere, so whole and streamed results agree closely, not bit-exactly.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from egstalker.errors import EgstalkerError

SAMPLE_RATE = 16000
FEATURE_FPS = 25.0
SAMPLES_PER_FRAME = 640  # SAMPLE_RATE / FEATURE_FPS


def centred_future_rows(window: int) -> int:
    """Future rows of the centred window of earlier models (8 -> frames -4..+3): what a model.json without
    `audio_future` was trained with."""
    return int(window) - 1 - int(window) // 2


def window_offsets(window: int, future: int) -> np.ndarray:
    """Row offsets of a frame's audio window: `future` rows after the frame's own row, the rest before it.

    Example:
        >>> window_offsets(8, 1)
        array([-6, -5, -4, -3, -2, -1,  0,  1])
    """
    if not 0 <= future < window:
        raise ValueError(f"an audio window of {window} rows cannot read {future} future rows")
    return np.arange(int(window)) - (int(window) - 1 - int(future))


def frames_for_samples(n_samples: int) -> int:
    """Number of 25 fps frames for `n_samples` of 16 kHz audio: round(n_samples / 640), halves rounded up."""
    return (int(n_samples) + SAMPLES_PER_FRAME // 2) // SAMPLES_PER_FRAME


def as_waveform(wav: np.ndarray) -> np.ndarray:
    """Check a 16 kHz mono waveform (float in [-1, 1]; int16 PCM is scaled) and return it as float32 [T]."""
    if isinstance(wav, (str, os.PathLike)):
        raise EgstalkerError(f"give the speech as samples, not the file name {str(wav)!r}: load it with "
                             "egstalker.render.api.load_speech(PATH)")
    wav = np.asarray(wav)
    if wav.ndim != 1:
        raise EgstalkerError(f"audio must be mono [samples], got shape {list(wav.shape)}; mix it down first")
    if wav.dtype == np.int16:
        return wav.astype(np.float32) / 32768.0
    if not np.issubdtype(wav.dtype, np.floating):
        raise EgstalkerError(f"audio must be float or int16 samples, got {wav.dtype}")
    return wav.astype(np.float32, copy=False)


class AudioEncoder:
    """Base class of all encoders. Subclasses set the attributes and implement `_encode`.

    Attributes:
        name: registry name, recorded in the dataset's meta.json and the model folder.
        feature_shape: shape of one frame's feature, e.g. (96,) or (4, 80).
        fps: features per second (always 25, one per video frame).
        context_seconds: audio before a frame's 40 ms slot that its feature uses.
        lookahead_seconds: audio after the end of a frame's slot that its feature needs; a streaming server
            can emit frame i once it holds audio up to (i + 1) / 25 + lookahead_seconds.
        exact_streaming: whether streamed features equal whole-clip ones up to float rounding.
        block_frames: frames that are encoded together, in blocks counted from the clip's start (1: each frame
            alone). A stream emits whole blocks, once the block's first frame has its look-ahead, and hands
            `_encode_last` segments that start on a block border.
        on_progress: None, or a callable given the number of frames just finished, which encoders that work
            through a clip in pieces call after each piece (a progress bar's `update`).
    """

    name: str = ""
    feature_shape: tuple[int, ...] = ()
    fps: float = FEATURE_FPS
    context_seconds: float = 0.0
    lookahead_seconds: float = 0.0
    exact_streaming: bool = True
    block_frames: int = 1
    on_progress = None

    def encode(self, wav16k: np.ndarray) -> np.ndarray:
        """Features of a whole clip.

        Args:
            wav16k: [T] 16 kHz mono float32 samples.

        Returns:
            [n_frames, *feature_shape] float32 with n_frames = round(T / 640).

        Example:
            >>> feats = get_encoder("mel").encode(np.zeros(16000, np.float32))   # [25, 4, 80]
        """
        wav = as_waveform(wav16k)
        feats = self._encode(wav, frames_for_samples(len(wav)))
        return np.ascontiguousarray(feats, dtype=np.float32)

    def _encode(self, wav: np.ndarray, n_frames: int) -> np.ndarray:
        """[n_frames, *feature_shape]: frame i from wav[640 i - context, 640 (i + 1) + lookahead], the wave
        extended with zeros on both sides (so the result does not depend on where `wav` ends)."""
        raise NotImplementedError

    def _encode_last(self, wav: np.ndarray, n_frames: int, n_last: int) -> np.ndarray:
        """The last `n_last` rows of `_encode(wav, n_frames)` (streaming needs only these); encoders override it
        when they can skip the others."""
        return self._encode(wav, n_frames)[n_frames - n_last:]

    def encode_stream(self) -> FeatureStream:
        """A stateful encoder for audio arriving in chunks (see `FeatureStream`)."""
        return FeatureStream(self)

    def describe(self) -> dict[str, Any]:
        """What meta.json records about this encoder (later stages pick their input adapter from it)."""
        return {
            "name": self.name, "fps": self.fps, "feature_shape": list(self.feature_shape),
            "sample_rate": SAMPLE_RATE, "context_seconds": self.context_seconds,
            "lookahead_seconds": self.lookahead_seconds, "exact_streaming": self.exact_streaming,
        }


class FeatureStream:
    """Encode audio that arrives in chunks, e.g. from a microphone, emitting each frame's feature as soon as
    enough audio has arrived (the frame's slot plus the encoder's look-ahead).

    Concatenating all `push` results and the `flush` result gives `encoder.encode(whole_clip)` (exactly for
    encoders with `exact_streaming`, closely otherwise). Memory stays bounded: only the context still needed
    is kept.

    Example:
        >>> stream = get_encoder("oww").encode_stream()
        >>> feats = [stream.push(chunk) for chunk in chunks] + [stream.flush()]
        >>> np.concatenate(feats)   # [n_frames, 96]
    """

    def __init__(self, encoder: AudioEncoder):
        self.encoder = encoder
        self.block = int(encoder.block_frames)
        context = math.ceil(encoder.context_seconds * SAMPLE_RATE / SAMPLES_PER_FRAME - 1e-9)
        self.context_frames = -(-context // self.block) * self.block  # whole blocks: segments start on a border
        self.lookahead_samples = math.ceil(encoder.lookahead_seconds * SAMPLE_RATE - 1e-9)
        self.next_frame = 0
        """Index of the next frame to emit."""
        self.samples_received = 0
        self._buffer = np.zeros(0, np.float32)
        self._buffer_start = 0
        """Absolute sample index of _buffer[0]."""

    def push(self, samples: np.ndarray) -> np.ndarray:
        """Add audio; return the features [k, *feature_shape] of the frames it completes (k may be 0)."""
        samples = as_waveform(samples)
        self._buffer = np.concatenate([self._buffer, samples])
        self.samples_received += len(samples)
        ready = (self.samples_received - self.lookahead_samples) // SAMPLES_PER_FRAME
        ready = -(-ready // self.block) * self.block  # a block is final once its first frame is
        return self._emit(ready, self.samples_received)

    def flush(self) -> np.ndarray:
        """End of audio: the remaining frames, up to round(total samples / 640)."""
        return self._emit(frames_for_samples(self.samples_received), self.samples_received)

    def _emit(self, end_frame: int, end_sample: int) -> np.ndarray:
        if end_frame <= self.next_frame:
            return np.zeros((0, *self.encoder.feature_shape), np.float32)
        first = self.next_frame - self.context_frames
        start_sample = first * SAMPLES_PER_FRAME
        segment = self._buffer[max(start_sample, self._buffer_start) - self._buffer_start:
                               end_sample - self._buffer_start]
        if start_sample < self._buffer_start:  # before the clip's start: silence, as in encode()
            segment = np.concatenate([np.zeros(self._buffer_start - start_sample, np.float32), segment])
        feats = self.encoder._encode_last(segment, end_frame - first, end_frame - self.next_frame)
        self.next_frame = end_frame
        keep_from = max(0, (self.next_frame - self.context_frames) * SAMPLES_PER_FRAME)
        if keep_from > self._buffer_start:
            self._buffer = self._buffer[keep_from - self._buffer_start:]
            self._buffer_start = keep_from
        return np.ascontiguousarray(feats, dtype=np.float32)
