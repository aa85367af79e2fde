"""Audio/video offset of the recording, estimated from the clip itself (no SyncNet weights needed).

A recording whose sound is shifted against its picture teaches the model the wrong alignment: the audio window
that the model reads for a frame then holds the sound of a different mouth shape. Many uploaded clips carry
such an offset (muxing, variable frame rate, 30 fps conversions). SyncNet-based tools detect it, but no
package ships SyncNet weights, so this estimates it per clip:

1. mouth opening per frame (inner-lip gap / eye-corner distance, the quantity the mouth-corr metric scores);
2. for every shift s of the audio (in video frames), ridge regression from a 5-row window of mel spectra (one
   80-band spectrum per frame: the mean of its four 10 ms frames) centred s rows after the frame to the mouth
   opening, scored by Pearson correlation over contiguous cross-validation folds
   of the training frames only (the held-out frames never decide the offset);
3. the offset is where that curve peaks (the centroid of its top, which is flat over a few frames), minus the
   natural lead: in well-synchronised speech the mouth moves slightly before the sound it makes, so even a
   perfect recording peaks `NATURAL_LEAD_FRAMES` rows after the frame. Offsets under `DEADBAND_FRAMES`,
   curves too weak to trust (`MIN_PEAK_CORR`) and clips under `MIN_OFFSET_FRAMES` (16 s of faces: shorter
   stretches place the peak only to a frame or two) are left at 0.

The transforms task then writes `aud_id = img_id + offset`, which every reader of the dataset (training,
evaluation, the peers' loaders) already follows. New speech at render time is not shifted: the offset belongs
to the recording, not to speech. benchmarks/av_offset.py measures the estimator on the shared clips.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

NATURAL_LEAD_FRAMES = 1.15
"""Rows of mel (40 ms each) after the frame where a synchronised clip's curve peaks: the mean of the peaks of the
two shared clips that play in sync, lieu (1.8) and ng (0.5; benchmarks/results/av_offset.json). The mouth
leads the sound it makes by a few tens of milliseconds."""
WINDOW_HALF = 2
"""The regression reads rows s-2..s+2 around the shift s (200 ms: one syllable)."""
MIN_PEAK_CORR = 0.3
"""Below this held-out correlation the clip's audio barely predicts its mouth (silence, music, a face that
does not speak) and the curve's peak is noise: no offset is applied."""
TOP_FRACTION = 0.9
"""The peak is the centroid of the shifts scoring at least this fraction of the best one (the curve is flat
over the few frames a syllable lasts, so its argmax alone jumps by a frame from noise)."""
DEADBAND_FRAMES = 1.5
"""Peaks within this many frames of the natural lead are left alone: the estimate's spread between clips that
play in sync is about a frame, and viewers do not notice 60 ms."""
FOLDS = 5
MIN_OFFSET_FRAMES = 400
"""Fewer frames with a face (16 s) place the peak too loosely to apply an offset: on 6-14 s windows of the shared
clips 70 of the 223 nonzero offsets found were 2 or more frames wrong, with curves as strong as the right ones (a
rule on peak correlation and fold agreement separated them only with thresholds picked on those same windows;
benchmarks/av_offset_windows.py). On 16-30 s windows and whole clips none of 57 was. The curve and its peak are
still reported, marked unreliable."""


@dataclass(frozen=True)
class AudioOffset:
    frames: int
    """Shift to apply: aud_id = img_id + frames (positive: the sound comes late in the recording)."""
    peak_frames: float
    """Where the correlation curve peaks, in rows after the frame (synchronised clips: about NATURAL_LEAD_FRAMES)."""
    peak_corr: float
    """Held-out correlation at the best shift: how well the audio predicts the mouth at all."""
    reliable: bool
    """False when peak_corr < MIN_PEAK_CORR, the clip is too short (under MIN_OFFSET_FRAMES frames with a face)
    or the peak is at the edge of the searched shifts (the offset may be larger than the search); then frames is 0."""
    shifts: list[int]
    curve: list[float]
    """Cross-validated correlation at each shift."""

    at_edge: bool = False
    """The best shift is the first or last one searched."""

    def to_json(self) -> dict:
        """For meta.json: NaN (no estimate) becomes null, which strict JSON readers accept."""
        def number(x: float, digits: int):
            return round(float(x), digits) if np.isfinite(x) else None

        return {**asdict(self), "peak_frames": number(self.peak_frames, 2), "peak_corr": number(self.peak_corr, 3),
                "curve": [number(c, 3) for c in self.curve], "ms_per_frame": 40}


def shift_audio(wav16k: np.ndarray, frames: int) -> np.ndarray:
    """The waveform with its sound `frames` video frames (40 ms each) later (positive: silence prepended) or
    earlier (negative: the start cut, silence appended); same length. For tests and benchmarks of the estimator."""
    n = int(np.clip(int(frames) * 640, -len(wav16k), len(wav16k)))
    if n >= 0:
        return np.concatenate([np.zeros(n, wav16k.dtype), wav16k[:len(wav16k) - n]])
    return np.concatenate([wav16k[-n:], np.zeros(-n, wav16k.dtype)])


def mouth_openings(landmarks: np.ndarray, detected: np.ndarray) -> np.ndarray:
    """[n] mouth opening (metrics.mouth_opening) of MediaPipe landmarks [n, 478, 2+], NaN where no face was
    detected (interpolated drop-outs carry no mouth evidence)."""
    from egstalker.metrics import mouth_opening

    opening = mouth_opening(np.asarray(landmarks)[:, :, :2]).astype(np.float64)
    opening[~np.asarray(detected).astype(bool)] = np.nan
    return opening


def ridge_cv_scores(x: np.ndarray, y: np.ndarray, folds: int, gap: int) -> list[float]:
    """Pearson correlation of a ridge fit (alpha = feature count, standardised inputs) on each of `folds`
    contiguous folds; `gap` frames around each fold are left out of training so overlapping windows cannot leak
    the fold's own audio. A fold whose prediction or truth is constant scores 0."""
    n = len(y)
    scores = []
    for k in range(folds):
        lo, hi = k * n // folds, (k + 1) * n // folds
        train = np.ones(n, bool)
        train[max(0, lo - gap):min(n, hi + gap)] = False
        a, b = x[train], x[lo:hi]
        mean, std = a.mean(0), a.std(0) + 1e-6
        a1 = np.hstack([(a - mean) / std, np.ones((len(a), 1))])
        w = np.linalg.solve(a1.T @ a1 + x.shape[1] * np.eye(a1.shape[1]), a1.T @ y[train])
        pred = np.hstack([(b - mean) / std, np.ones((len(b), 1))]) @ w
        if np.std(pred) < 1e-9 or np.std(y[lo:hi]) < 1e-9:
            scores.append(0.0)
        else:
            scores.append(float(np.corrcoef(pred, y[lo:hi])[0, 1]))
    return scores


def estimate_audio_offset(wav16k: np.ndarray, mouth_opening: np.ndarray, max_shift: int = 15) -> AudioOffset:
    """The recording's audio offset in frames, from its 16 kHz sound track and the mouth opening of the frames to
    learn from ([n]: frames 0..n-1 of the clip at 25 fps, NaN where no face). See the module docstring."""
    from egstalker.audio.mel import MelEncoder

    n = len(mouth_opening)
    shifts = list(range(-max_shift, max_shift + math.ceil(NATURAL_LEAD_FRAMES) + 1))
    offsets = np.arange(-WINDOW_HALF, WINDOW_HALF + 1)
    finite = np.isfinite(mouth_opening)
    if n < FOLDS * 20 or finite.sum() < 0.8 * n:  # under 4 s of faces: too little to tell a shift from noise
        return AudioOffset(0, float("nan"), float("nan"), False, shifts, [float("nan")] * len(shifts))
    y = np.where(finite, mouth_opening, np.nanmedian(mouth_opening)).astype(np.float64)
    features = MelEncoder().encode(wav16k).mean(axis=1).astype(np.float64)  # [rows, 80]: one spectrum per frame
    curve = []
    for s in shifts:
        rows = np.clip(np.arange(n)[:, None] + s + offsets[None], 0, len(features) - 1)
        curve.append(float(np.mean(ridge_cv_scores(features[rows].reshape(n, -1), y, FOLDS, gap=2 * WINDOW_HALF + 1))))
    return decide_offset(curve, shifts, int(finite.sum()))


def top_run(scores: np.ndarray) -> tuple[int, int]:
    """First and last index of the top region (>= TOP_FRACTION of the best) that contains the argmax: a contiguous
    run, not stray noise peaks."""
    top = scores >= TOP_FRACTION * scores.max()
    lo = hi = int(scores.argmax())
    while lo > 0 and top[lo - 1]:
        lo -= 1
    while hi < len(scores) - 1 and top[hi + 1]:
        hi += 1
    return lo, hi


def decide_offset(curve: list[float], shifts: list[int], n_faces: int) -> AudioOffset:
    """The offset a cross-validated curve over `shifts` gives, for a clip of `n_faces` frames with a face: the
    centroid of its top run, less the natural lead; unreliable (0) when weak, cut off by the search or too short."""
    scores = np.array(curve)
    best = float(scores.max())
    if not np.isfinite(best) or best < MIN_PEAK_CORR / 2:
        return AudioOffset(0, float("nan"), best, False, shifts, curve)
    lo, hi = top_run(scores)
    if lo == 0 or hi == len(scores) - 1:
        # still rising where the search stops (counted from half of MIN_PEAK_CORR: a curve cut off by the search
        # is weaker than its unseen peak)
        return AudioOffset(0, float("nan"), best, False, shifts, curve, at_edge=True)
    if best < MIN_PEAK_CORR:
        return AudioOffset(0, float("nan"), best, False, shifts, curve)
    weights = scores[lo:hi + 1] - TOP_FRACTION * best + 1e-6
    peak = float(np.sum(np.array(shifts[lo:hi + 1]) * weights) / weights.sum())
    if n_faces < MIN_OFFSET_FRAMES:  # the peak of a short clip wanders by a frame or two: reported, not applied
        return AudioOffset(0, peak, best, False, shifts, curve)
    shift = peak - NATURAL_LEAD_FRAMES
    return AudioOffset(int(round(shift)) if abs(shift) >= DEADBAND_FRAMES else 0, peak, best, True, shifts, curve)
