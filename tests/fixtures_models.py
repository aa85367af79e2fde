"""Shared, session-scoped fixtures: a real short clip, its preprocessed dataset and a small CPU-trained model.

conftest.py registers these fixtures for every test module (import only the helpers, never the fixtures).
They are built once per test session (pytest caches session fixtures across modules):
  - short_clip: the first 8 s of video/lieu_60s_256.mp4 (200 frames at 256 px, with its sound);
  - small_dataset: `preprocess(short_clip)` (18 held-out frames);
  - small_model: `train(small_dataset)` at 96 px, 1,500 Gaussians, SMALL_MODEL_ITERATIONS on the CPU (its quality
    is poor: it exists to test render/eval plumbing, not the model).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from conftest import shared_media

CLIP_SECONDS = 8.0
SMALL_MODEL_ITERATIONS = 10
SMALL_MODEL_RESOLUTION = 96
SMALL_MODEL_GAUSSIANS = (1200, 300)
"""Surface and volume points of the initialisation: few, so that CPU rendering of 10 s stays near a minute."""


def cut_clip(source: Path, target: Path, seconds: float) -> Path:
    """Write the first `seconds` of a video (frames at 25 fps and its audio) as an H.264/AAC mp4."""
    from egstalker.media import iter_frames, read_audio
    from egstalker.render.video import Mp4Writer

    n_frames = int(round(seconds * 25))
    audio = read_audio(source, rate=48000)[: int(seconds * 48000)]
    frames = itertools.islice(iter_frames(source), n_frames)
    first = next(frames)
    h, w = first.image.shape[:2]
    with Mp4Writer(target, w, h, 25.0, audio=audio, audio_rate=48000, crf=12) as writer:
        writer.write(first.image)
        for frame in frames:
            writer.write(frame.image)
    return target


@pytest.fixture(scope="session")
def short_clip(tmp_path_factory) -> Path:
    source = shared_media("video/lieu_60s_256.mp4")
    return cut_clip(source, tmp_path_factory.mktemp("clip") / "lieu_8s.mp4", CLIP_SECONDS)


@pytest.fixture(scope="session")
def small_dataset(short_clip, tmp_path_factory) -> Path:
    from egstalker.preprocess.pipeline import preprocess

    return preprocess(short_clip, tmp_path_factory.mktemp("dataset") / "lieu_8s", show_progress=False)


@pytest.fixture(scope="session")
def small_model(small_dataset, tmp_path_factory) -> Path:
    from egstalker.train.config import TrainConfig
    from egstalker.train.trainer import train

    config = TrainConfig()
    config.schedule.iterations = SMALL_MODEL_ITERATIONS
    config.data.resolution = SMALL_MODEL_RESOLUTION
    config.data.num_workers = 0
    config.data.batch_size = 2
    config.init.surface_points, config.init.volume_points = SMALL_MODEL_GAUSSIANS
    config.init.n_frames = 3
    config.loss.perceptual = 0.0  # the VGG term is tested in test_losses_metrics; here it only costs time
    config.schedule.eval_every = 0
    model_dir = tmp_path_factory.mktemp("model") / "lieu_8s_model"
    train(small_dataset, model_dir, config, device="cpu", show_progress=False)
    return model_dir


def write_speech(path: Path, seconds: float, rate: int = 44100, start: float = 3.0) -> Path:
    """`seconds` of real speech (from audio/speech_60s_16k.wav, from `start` s: its first 3 s are near-silent)
    re-encoded at `rate`, format by suffix (wav, flac, ogg)."""
    import soundfile

    from egstalker.media import read_audio

    speech = read_audio(shared_media("audio/speech_60s_16k.wav"), rate=rate, align_to_video=False)
    first = int(round(start * rate))
    soundfile.write(path, np.asarray(speech[first:first + int(round(seconds * rate))]), rate)
    return path
