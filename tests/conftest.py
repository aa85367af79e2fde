"""Shared test helpers: real media from ../shared/data, located in one place."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def shared_media(relative: str) -> Path:
    """Path of a clip in ../shared/data; skips the test with a clear reason when the folder is absent."""
    path = SHARED_DATA / relative
    if not SHARED_DATA.is_dir():
        pytest.skip(f"test media folder {SHARED_DATA} is absent (it sits beside the checkout in this workplace)")
    if not path.exists():
        pytest.fail(f"{path} is missing from the test media folder")
    return path


def real_speech(n_samples: int):
    """The first `n_samples` of a real 16 kHz mono speech recording (float32), for the encoders' tests."""
    import soundfile

    wav, rate = soundfile.read(shared_media("audio/speech_10s_16k.wav"), dtype="float32")
    assert rate == 16000 and len(wav) >= n_samples
    return wav[:n_samples]


# Session fixtures shared by several modules are registered here, once: imported into each test module instead,
# pytest would build them once per module (the clip, its dataset and the small model three times over).
from fixtures_models import short_clip, small_dataset, small_model  # noqa: E402,F401
