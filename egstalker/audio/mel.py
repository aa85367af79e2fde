"""`mel`: log-mel spectrogram windows, computed in numpy, no weights.

Each 25 fps frame gets the four 10 ms mel frames inside its 40 ms slot: feature [4, 80] (80 mel bands,
25 ms Hann windows, hop 10 ms, centred at 5, 15, 25, 35 ms into the slot). A model looks at a window of
neighbouring frames for more context, so no frame duplicates its neighbours' audio.
"""

from __future__ import annotations

import numpy as np

from egstalker.audio.base import SAMPLE_RATE, SAMPLES_PER_FRAME, AudioEncoder

N_MELS = 80
HOP = 160  # 10 ms
WINDOW = 400  # 25 ms
N_FFT = 512
MELS_PER_FRAME = SAMPLES_PER_FRAME // HOP
LOG_FLOOR = 1e-5
"""Power floor before the log: digital silence maps to a fixed value, independent of the clip."""


def _hz_to_mel(hz):
    return 2595.0 * np.log10(1.0 + np.asarray(hz, dtype=np.float64) / 700.0)


def _mel_to_hz(mel):
    return 700.0 * (10.0 ** (np.asarray(mel, dtype=np.float64) / 2595.0) - 1.0)


def mel_filterbank(n_mels: int = N_MELS, n_fft: int = N_FFT, rate: int = SAMPLE_RATE,
                   fmin: float = 20.0, fmax: float = 7600.0) -> np.ndarray:
    """[n_mels, n_fft // 2 + 1] triangular filters on the HTK mel scale, each normalised to unit area."""
    bins_hz = np.linspace(0, rate / 2, n_fft // 2 + 1)
    edges = _mel_to_hz(np.linspace(_hz_to_mel(fmin), _hz_to_mel(fmax), n_mels + 2))
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (bins_hz[None] - lower) / (centre - lower)
    falling = (upper - bins_hz[None]) / (upper - centre)
    filters = np.maximum(0.0, np.minimum(rising, falling))
    filters *= 2.0 / (upper - lower)  # equal area: loudness does not depend on band width
    return filters.astype(np.float32)


class MelEncoder(AudioEncoder):
    name = "mel"
    feature_shape = (MELS_PER_FRAME, N_MELS)
    context_seconds = (WINDOW - HOP) / 2 / SAMPLE_RATE  # 7.5 ms: the first window reaches before the slot
    lookahead_seconds = (WINDOW - HOP) / 2 / SAMPLE_RATE

    def __init__(self):
        self._filters = mel_filterbank()
        self._window = np.hanning(WINDOW + 1)[:WINDOW].astype(np.float32)

    def _encode(self, wav: np.ndarray, n_frames: int) -> np.ndarray:
        pad = (WINDOW - HOP) // 2
        n_mels_frames = n_frames * MELS_PER_FRAME
        # mel frame j covers wav[160 j - 120, 160 j + 280): zeros outside the clip
        needed = (n_mels_frames - 1) * HOP + WINDOW
        padded = np.zeros(max(needed, pad + len(wav)), np.float32)
        padded[pad:pad + len(wav)] = wav
        out = np.empty((n_mels_frames, N_MELS), np.float32)
        block = 4096  # mel frames per block: bounded memory on long clips
        for a in range(0, n_mels_frames, block):
            b = min(n_mels_frames, a + block)
            starts = np.arange(a, b) * HOP
            frames = padded[starts[:, None] + np.arange(WINDOW)[None]] * self._window
            power = np.abs(np.fft.rfft(frames, n=N_FFT, axis=1)) ** 2
            out[a:b] = np.log10(np.maximum(power.astype(np.float32) @ self._filters.T, LOG_FLOOR))
        return out.reshape(n_frames, MELS_PER_FRAME, N_MELS)
