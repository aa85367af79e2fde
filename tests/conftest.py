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


# Session fixtures shared by several modules are registered here, once: imported into each test module instead,
# pytest would build them once per module (the clip, its dataset and the small model three times over).
from fixtures_models import short_clip, small_dataset, small_model  # noqa: E402,F401
