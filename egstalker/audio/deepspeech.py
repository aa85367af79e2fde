"""`deepspeech`: import DeepSpeech features [N, 16, 29] that peers' tools (AD-NeRF, ER-NeRF) wrote as
aud_ds.npy. egstalker does not compute them: it ships no DeepSpeech model."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from egstalker.audio.base import AudioEncoder, FeatureStream, as_waveform, frames_for_samples
from egstalker.errors import EgstalkerError

DEEPSPEECH_SHAPE = (16, 29)


class DeepSpeechImport(AudioEncoder):
    name = "deepspeech"
    feature_shape = DEEPSPEECH_SHAPE
    context_seconds = 0.16  # peers' windows: 16 DeepSpeech frames at 50 Hz around the video frame
    lookahead_seconds = 0.16
    exact_streaming = False

    def __init__(self, weights: str | Path | None):
        if weights is None:
            raise EgstalkerError("the 'deepspeech' encoder imports an existing aud_ds.npy [N, 16, 29]: "
                                 "pass its path with --audio-weights PATH/aud_ds.npy")
        self.path = Path(weights)
        if not self.path.is_file():
            raise EgstalkerError(f"DeepSpeech features file {self.path} does not exist; pass the aud_ds.npy "
                                 "that your DeepSpeech tool wrote")
        try:
            feats = np.load(self.path, allow_pickle=False)
        except (ValueError, OSError) as e:
            raise EgstalkerError(f"{self.path} is not a readable .npy array ({e}); pass an aud_ds.npy") from None
        if feats.ndim != 3 or tuple(feats.shape[1:]) != DEEPSPEECH_SHAPE or len(feats) == 0:
            raise EgstalkerError(f"{self.path} has shape {list(feats.shape)}, expected [N, 16, 29] "
                                 "(DeepSpeech logit windows, one per 25 fps frame)")
        if not np.isfinite(feats).all():
            raise EgstalkerError(f"{self.path} contains NaN or infinite values; recompute it")
        self.features = feats.astype(np.float32)
        self.import_note: dict = {}

    LENGTH_TOLERANCE_FRAMES = 2
    """Rows the file may have more or fewer than the clip (extractors round the ends differently)."""

    def encode(self, wav16k: np.ndarray) -> np.ndarray:
        """The imported features, cut or padded (repeating the last row) to the clip's frame count; what was
        done is kept in `import_note` (written to meta.json)."""
        n = frames_for_samples(len(as_waveform(wav16k)))
        have = len(self.features)
        if abs(have - n) > self.LENGTH_TOLERANCE_FRAMES:  # another clip's features, or another frame rate's
            raise EgstalkerError(f"{self.path} holds {have} frames of features for this clip's {n} frames at 25 fps; "
                                 "compute it from this dataset's aud.wav (16 kHz, 25 fps), not another clip's audio")
        self.import_note = {"source": str(self.path), "frames_in_file": have, "frames_used": n,
                            "padded_frames": max(0, n - have), "cut_frames": max(0, have - n)}
        if have >= n:
            return self.features[:n].copy()
        return np.concatenate([self.features, np.repeat(self.features[-1:], n - have, axis=0)])

    def encode_stream(self) -> FeatureStream:
        raise EgstalkerError("deepspeech features are imported from a file and cannot be computed from live "
                             "audio; use an encoder egstalker computes (oww, mel, wav2vec2, hubert)")

    def describe(self) -> dict:
        return {**super().describe(), "import": self.import_note}
