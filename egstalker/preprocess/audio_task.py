"""Tasks 1 (aud.wav) and 2 (aud.npy audio features)."""

from __future__ import annotations

import numpy as np

from egstalker.audio import SAMPLES_PER_FRAME, frames_for_samples, get_encoder
from egstalker.dataset.layout import DatasetLayout
from egstalker.errors import EgstalkerError
from egstalker.preprocess.tasks import Task, TaskContext


def extract_audio(ctx: TaskContext) -> None:
    """aud.wav: 16 kHz mono PCM16, sample 0 at the first video frame, exactly n_frames / 25 s long."""
    import soundfile

    from egstalker.media import NEAR_SILENT_PEAK, fit_length, read_audio

    rate = ctx.config.audio.sample_rate
    if rate != 16000:
        raise EgstalkerError(f"audio.sample_rate is {rate}; the audio encoders need 16000 Hz")
    n_frames = int(ctx.meta["n_frames"])
    wav = read_audio(ctx.video_path, rate, start=float(ctx.meta["video_start"]))
    target = n_frames * SAMPLES_PER_FRAME
    if len(wav) == 0 or float(np.max(np.abs(wav))) < NEAR_SILENT_PEAK:
        raise EgstalkerError(f"the audio track of {ctx.video_path} is silent or empty (peak below -50 dBFS); the "
                             "model is driven by speech, so give a video with the person's voice")
    ctx.meta["audio"] = {
        "sample_rate": rate,
        "samples": target,
        "source_samples": int(len(wav)),
        "padded_ms": round(max(0, target - len(wav)) / rate * 1000, 1),
        "cut_ms": round(max(0, len(wav) - target) / rate * 1000, 1),
    }
    peak = float(np.max(np.abs(wav)))
    wav = np.clip(fit_length(wav, target), -1.0, 1.0)
    ctx.meta["audio"]["peak"] = round(peak, 4)
    unrecorded = unrecorded_frames(wav)
    if unrecorded.any():
        ctx.meta["audio"]["frames_without_sound"] = int(unrecorded.sum())
        if unrecorded.mean() > 0.1 and ctx.show_progress:
            print(f"audio: the sound track covers only {100 * (1 - unrecorded.mean()):.0f} % of the video; its "
                  f"{int(unrecorded.sum())} frames without sound are left out of training", flush=True)
    soundfile.write(ctx.staging.audio_wav, wav, rate, subtype="PCM_16")


def unrecorded_frames(wav: np.ndarray) -> np.ndarray:
    """bool [n_frames]: frames of aud.wav whose whole 40 ms lies in the digital silence at its start or end, where
    the recording had no sound (task 1 pads a sound track that starts after the picture or ends before it)."""
    n = len(wav) // SAMPLES_PER_FRAME
    silent = ~np.any(wav[:n * SAMPLES_PER_FRAME].reshape(n, SAMPLES_PER_FRAME) != 0, axis=1)
    edges = np.zeros(n, bool)
    heard = np.flatnonzero(~silent)
    if len(heard) == 0:
        return ~edges
    edges[:heard[0]] = True
    edges[heard[-1] + 1:] = True
    return edges


def compute_features(ctx: TaskContext) -> None:
    """aud.npy: [n_frames, *feature_shape] float32 from the configured encoder; meta['audio_encoder']."""
    import soundfile

    wav, rate = soundfile.read(ctx.dataset.audio_wav, dtype="float32", always_2d=False)
    encoder = get_encoder(ctx.config.audio.encoder, ctx.config.audio.weights)
    feats = _encode_with_progress(encoder, wav, ctx.show_progress)
    n_frames = int(ctx.meta["n_frames"])
    if len(feats) != n_frames:  # aud.wav is n_frames * 640 samples, so this is a bug, not a user error
        raise RuntimeError(f"encoder {encoder.name} gave {len(feats)} frames for {n_frames}")
    if not np.isfinite(feats).all():
        raise EgstalkerError(f"audio encoder {encoder.name} produced NaN/inf features; try another encoder "
                             "(--audio-features mel)")
    # np.save appends .npy to names without it, so write through an open file
    with open(ctx.staging.audio_features, "wb") as f:
        np.save(f, feats)
    # the weights as asked (None: the encoder's own), so that other --audio-weights later redo this task
    ctx.meta["audio_encoder"] = {**encoder.describe(), "weights_path": ctx.config.audio.weights}


def _encode_with_progress(encoder, wav: np.ndarray, show_progress: bool) -> np.ndarray:
    """encoder.encode(wav), through the exact streaming path in 10 s pieces when possible, for a progress bar."""
    from tqdm import tqdm

    with tqdm(total=frames_for_samples(len(wav)), desc=f"2 audio features ({encoder.name})", unit="frame",
              disable=not show_progress) as bar:
        if not encoder.exact_streaming:  # whole clip; encoders working in pieces report them
            encoder.on_progress = bar.update
            try:
                feats = encoder.encode(wav)
            finally:
                encoder.on_progress = None
            bar.update(max(0, bar.total - bar.n))
            return feats
        piece = 10 * 16000
        stream = encoder.encode_stream()
        parts = []
        for start in range(0, len(wav), piece):
            parts.append(stream.push(wav[start:start + piece]))
            bar.update(len(parts[-1]))
        parts.append(stream.flush())
        bar.update(len(parts[-1]))
    return np.concatenate(parts)


def _features_done(layout: DatasetLayout, meta: dict) -> list:
    return [layout.audio_features]


AUDIO_TASK = Task(1, "audio", extract_audio, outputs=lambda layout, meta: [layout.audio_wav])
FEATURES_TASK = Task(2, "audio features", compute_features, outputs=_features_done)
