"""Preprocessing runner and tasks 1-3 on real clips: outputs, 25 fps resampling, resume, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
import soundfile

from egstalker.cli import main
from egstalker.dataset.layout import DATASET_FORMAT_VERSION, DatasetLayout
from egstalker.errors import EgstalkerError
from egstalker.preprocess import frames_task
from egstalker.preprocess.config import PreprocessConfig
from egstalker.preprocess.pipeline import preprocess
from tests.conftest import shared_media

FAST = PreprocessConfig()
FAST.audio.encoder = "mel"  # the encoders have their own tests; keep these runs quick
BASIC = [1, 2, 3]


def remux(source: Path, target: Path, seconds: float, audio: bool = True) -> Path:
    """Copy the first `seconds` of a clip without re-encoding (optionally without its audio)."""
    with av.open(str(source)) as src, av.open(str(target), "w") as dst:
        streams = [src.streams.video[0]] + ([src.streams.audio[0]] if audio else [])
        out = {s.index: dst.add_stream_from_template(s) for s in streams}
        for packet in src.demux(*streams):
            if packet.dts is None or packet.pts is None:
                continue
            if float(packet.pts * packet.time_base) - float(packet.stream.start_time * packet.time_base) > seconds:
                continue
            packet.stream = out[packet.stream.index]
            dst.mux(packet)
    return target


def check_dataset(root: Path, width: int, height: int) -> dict:
    """Counts and shapes of tasks 1-3 agree; returns meta.json."""
    layout = DatasetLayout(root)
    meta = json.loads(layout.meta.read_text())
    n = meta["n_frames"]
    assert meta["format_version"] == DATASET_FORMAT_VERSION and meta["fps"] == 25.0
    assert sorted(meta["tasks_complete"])[:3] == [1, 2, 3]
    wav, rate = soundfile.read(layout.audio_wav, dtype="float32")
    assert rate == 16000 and wav.ndim == 1 and len(wav) == n * 640 and np.abs(wav).max() > 0.01
    feats = np.load(layout.audio_features)
    assert feats.dtype == np.float32 and feats.shape == (n, *meta["audio_encoder"]["feature_shape"])
    assert meta["audio_encoder"]["fps"] == 25.0
    frames = sorted(layout.frames_dir.glob("*.jpg"), key=lambda p: int(p.stem))
    assert [int(p.stem) for p in frames] == list(range(n))
    for i in (0, n // 2, n - 1):
        assert cv2.imread(str(layout.frame(i))).shape == (height, width, 3)
    assert not list(root.glob(".staging-*"))
    assert json.loads(layout.preprocess_config.read_text())["audio"]["encoder"] == meta["audio_encoder"]["name"]
    return meta


def test_aoc_tasks_1_to_3(tmp_path):
    video = shared_media("video/aoc_8s_512.mp4")
    root = preprocess(video, tmp_path / "aoc", tasks=BASIC, show_progress=False)  # default encoder
    meta = check_dataset(root, 512, 512)
    assert meta["n_frames"] == 200 and meta["width"] == 512 and Path(meta["source_video"]["path"]).resolve() == video.resolve()
    assert meta["audio_encoder"] == meta["audio_encoder"] | {"name": "whisper", "feature_shape": [512]}
    assert meta["sync"]["worst_offset_ms"] == 0.0 and meta["sync"]["repeated_frames"] == 0
    # frames are the video's pictures (JPEG), not black or shifted: compare frame 100 with a direct decode
    with av.open(str(video)) as container:
        for k, frame in enumerate(container.decode(video=0)):
            if k == 100:
                direct = frame.to_ndarray(format="bgr24").astype(np.float32)
                break
    ours = cv2.imread(str(DatasetLayout(root).frame(100))).astype(np.float32)
    assert np.abs(ours - direct).mean() < 3.0


def test_default_output_next_to_video(tmp_path):
    video = remux(shared_media("video/hill_8s_512.mp4"), tmp_path / "hill.mp4", 2.5)
    assert main(["preprocess", str(video), "--task", "1", "--task", "3", "--quiet"]) == 0
    meta = json.loads((tmp_path / "hill" / "meta.json").read_text())
    assert meta["tasks_complete"] == [1, 3] and (tmp_path / "hill" / "aud.wav").exists()


@pytest.mark.parametrize("clip, seconds, source_fps", [("ng_27s_256_30fps.mp4", 4.0, 30.0),
                                                       ("anchor_6s_700_vfr.mp4", 10.0, None)])
def test_resampled_to_25fps_in_sync(tmp_path, clip, seconds, source_fps):
    video = remux(shared_media(f"video/{clip}"), tmp_path / clip, seconds)
    with av.open(str(video)) as container:
        stream = container.streams.video[0]
        times = sorted(float(p.pts * stream.time_base) for p in container.demux(stream) if p.pts is not None)
        size = (stream.width, stream.height)
    source_span = times[-1] - times[0] + float(np.median(np.diff(times)))
    root = preprocess(video, tmp_path / "ds", tasks=BASIC, config=FAST, show_progress=False)
    meta = check_dataset(root, *size)
    n = meta["n_frames"]
    assert abs(n - source_span * 25) <= 1  # 25 fps over the same duration
    if source_fps:
        assert meta["source_fps"] == pytest.approx(source_fps, abs=0.1)
        assert meta["sync"]["repeated_frames"] == 0  # 30 -> 25 fps drops frames, never repeats them
        assert meta["sync"]["source_frames_shown"] == n
    # nearest-frame resampling: never more than half a source frame (plus VFR gaps) away
    worst_gap = float(np.max(np.diff(times)))
    assert 0 < meta["sync"]["worst_offset_ms"] <= worst_gap / 2 * 1000 + 0.5
    assert meta["sync"]["worst_offset_ms"] < 40  # under one output frame


def _mtimes(paths):
    return [Path(p).stat().st_mtime_ns for p in paths]


def test_skip_when_complete_and_force(tmp_path, capsys):
    video = remux(shared_media("video/aoc_8s_512.mp4"), tmp_path / "clip.mp4", 2.5)
    root = preprocess(video, tmp_path / "ds", tasks=BASIC, config=FAST, show_progress=False)
    layout = DatasetLayout(root)
    files = [layout.audio_wav, layout.audio_features, layout.frame(0), layout.frame(40)]
    before = _mtimes(files)
    only_basic = ["--task", "1", "--task", "2", "--task", "3"]
    assert main(["preprocess", str(video), "-o", str(root), *only_basic]) == 0  # resumes with the saved encoder
    assert _mtimes(files) == before
    assert capsys.readouterr().err.count("already complete") == 3
    assert main(["preprocess", str(video), "-o", str(root), "--task", "3", "--force", "--quiet"]) == 0
    after = _mtimes(files)
    assert after[:2] == before[:2] and after[2] > before[2] and after[3] > before[3]
    # another encoder asked for: task 2 is redone even without --force, the others are kept
    assert main(["preprocess", str(video), "-o", str(root), *only_basic, "--audio-features", "oww", "--quiet"]) == 0
    assert np.load(layout.audio_features).shape[1:] == (96,)
    assert _mtimes(files)[0] == before[0] and _mtimes(files)[2] == after[2]
    assert json.loads(layout.meta.read_text())["audio_encoder"]["name"] == "oww"


def test_interrupted_task_leaves_nothing_and_resumes(tmp_path, monkeypatch):
    video = remux(shared_media("video/aoc_8s_512.mp4"), tmp_path / "clip.mp4", 2.5)
    write = frames_task._write_jpeg
    calls = []

    def write_then_interrupt(*args):
        calls.append(1)
        if len(calls) == 20:
            raise KeyboardInterrupt
        return write(*args)

    monkeypatch.setattr(frames_task, "_write_jpeg", write_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        preprocess(video, tmp_path / "ds", tasks=BASIC, config=FAST, show_progress=False)
    layout = DatasetLayout(tmp_path / "ds")
    meta = json.loads(layout.meta.read_text())
    assert meta["tasks_complete"] == [1, 2]  # completed tasks are kept
    assert not layout.frames_dir.exists() and not list(layout.root.glob(".staging-*"))
    wav_mtime = layout.audio_wav.stat().st_mtime_ns
    monkeypatch.setattr(frames_task, "_write_jpeg", write)
    preprocess(video, layout.root, tasks=BASIC, show_progress=False)  # the saved config (mel) is reused
    check_dataset(layout.root, 512, 512)
    assert layout.audio_wav.stat().st_mtime_ns == wav_mtime


def test_failed_task_on_new_folder_leaves_no_dataset(tmp_path, monkeypatch):
    video = remux(shared_media("video/aoc_8s_512.mp4"), tmp_path / "clip.mp4", 2.5)

    def no_face(*args):
        raise EgstalkerError("no face found in frames 0-61")

    monkeypatch.setattr(frames_task, "_write_jpeg", no_face)
    with pytest.raises(EgstalkerError, match="no face"):
        preprocess(video, tmp_path / "new", tasks=BASIC, config=FAST, show_progress=False)
    assert not (tmp_path / "new").exists()
    (tmp_path / "existing").mkdir()
    with pytest.raises(EgstalkerError):
        preprocess(video, tmp_path / "existing", tasks=BASIC, config=FAST, show_progress=False)
    assert json.loads((tmp_path / "existing" / "meta.json").read_text())["tasks_complete"] == [1, 2]


def _bad_input(tmp_path, capsys, args, message, dataset=None):
    assert main(["preprocess", *map(str, args), "--quiet"]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and message in err, err
    if dataset is not None:
        assert not Path(dataset).exists()


def test_bad_inputs(tmp_path, capsys):
    aoc = shared_media("video/aoc_8s_512.mp4")
    _bad_input(tmp_path, capsys, [tmp_path / "missing.mp4"], "does not exist", tmp_path / "missing")
    (tmp_path / "notes.mp4").write_text("not a video at all\n" * 100)
    _bad_input(tmp_path, capsys, [tmp_path / "notes.mp4"], "not a readable video", tmp_path / "notes")
    wav = tmp_path / "speech.wav"
    wav.write_bytes(shared_media("audio/speech_10s_16k.wav").read_bytes())
    _bad_input(tmp_path, capsys, [wav], "no video stream", tmp_path / "speech")
    silent = remux(aoc, tmp_path / "silent.mp4", 3.0, audio=False)
    _bad_input(tmp_path, capsys, [silent], "no audio stream", tmp_path / "silent")
    short = remux(aoc, tmp_path / "short.mp4", 1.5)
    _bad_input(tmp_path, capsys, [short], "at least 2 s", tmp_path / "short")
    (tmp_path / "file.txt").write_text("x")
    _bad_input(tmp_path, capsys, [aoc, "-o", tmp_path / "file.txt" / "ds"], "is a file")
    _bad_input(tmp_path, capsys, [aoc, "-o", tmp_path / "file.txt"], "is not a folder")
    _bad_input(tmp_path, capsys, [aoc, "-o", tmp_path / "d1", "--audio-features", "whisperx"],
               "unknown audio encoder", tmp_path / "d1")
    _bad_input(tmp_path, capsys, [aoc, "-o", tmp_path / "d2", "--audio-features", "deepspeech"],
               "--audio-weights", tmp_path / "d2")
    _bad_input(tmp_path, capsys, [aoc, "-o", tmp_path / "d3", "--task", "2"], "needs task(s) 1", tmp_path / "d3")
    _bad_input(tmp_path, capsys, [aoc, "-o", tmp_path / "d4", "--task", "42"], "no task 42", tmp_path / "d4")


def test_other_video_in_existing_dataset_is_refused(tmp_path, capsys):
    clip = remux(shared_media("video/aoc_8s_512.mp4"), tmp_path / "clip.mp4", 2.5)
    preprocess(clip, tmp_path / "ds", tasks=[1], config=FAST, show_progress=False)
    other = remux(shared_media("video/hill_8s_512.mp4"), tmp_path / "other.mp4", 3.0)
    _bad_input(tmp_path, capsys, [other, "-o", tmp_path / "ds"], "dataset of another video")
