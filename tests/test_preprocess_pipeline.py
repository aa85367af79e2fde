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


def remux(source: Path, target: Path, seconds: float, audio: bool = True, rotation: int = 0,
          audio_from: float = 0.0) -> Path:
    """Copy the first `seconds` of a clip without re-encoding (optionally without its audio, with its sound
    starting `audio_from` seconds after the picture, or with a display rotation in degrees counter-clockwise, as
    phones store portrait video)."""
    with av.open(str(source)) as src, av.open(str(target), "w") as dst:
        streams = [src.streams.video[0]] + ([src.streams.audio[0]] if audio else [])
        out = {s.index: dst.add_stream_from_template(s) for s in streams}
        if rotation:
            out[streams[0].index].set_display_rotation(rotation)
        for packet in src.demux(*streams):
            if packet.dts is None or packet.pts is None:
                continue
            at = float(packet.pts * packet.time_base) - float(packet.stream.start_time * packet.time_base)
            if at > seconds or (packet.stream.type == "audio" and at < audio_from):
                continue
            packet.stream = out[packet.stream.index]
            dst.mux(packet)
    return target


def with_sound(source: Path, target: Path, seconds: float, sound: np.ndarray) -> Path:
    """The first `seconds` of a clip's picture (not re-encoded) with `sound` (16 kHz mono float) as its sound
    track, in Matroska with PCM audio."""
    with av.open(str(source)) as src, av.open(str(target), "w") as dst:
        video = src.streams.video[0]
        out = dst.add_stream_from_template(video)
        audio = dst.add_stream("pcm_s16le", rate=16000, layout="mono")
        for packet in src.demux(video):
            if packet.pts is None or float((packet.pts - video.start_time) * packet.time_base) > seconds:
                continue
            packet.stream = out
            dst.mux(packet)
        frame = av.AudioFrame.from_ndarray((sound * 32767).astype(np.int16)[None], format="s16", layout="mono")
        frame.rate = 16000
        for packet in [*audio.encode(frame), *audio.encode(None)]:
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
    from egstalker.preprocess.pipeline import default_output

    assert default_output(tmp_path / "hill") == tmp_path / "hill_dataset"  # not the video's own path
    from egstalker.pipeline_run import RunPaths

    assert RunPaths.defaults(tmp_path / "hill", "s.wav").dataset == tmp_path / "hill_dataset"  # run names it so too


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
    framing = json.loads(DatasetLayout(root).meta.read_text())["framing"]
    if clip.startswith("anchor"):  # an upper-body shot, its face a third of the frame: framed tighter
        x, y, side, _ = framing["crop_xywh"]
        assert 400 < side < 600 and framing["size"] == [side, side] and framing["faces_sampled"][0] >= 12
    else:  # framed as the peers frame theirs: kept whole
        assert framing["crop_xywh"] == [0, 0, *size] and framing["size"] == list(size)
    meta = check_dataset(root, *framing["size"])
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


def phone_video(source: Path, target: Path, seconds: float, canvas=(720, 1280), content: int = 720,
                top: int = 280, stored_turned: bool = False) -> Path:
    """A phone-shaped clip: the source's square frames scaled to `content` px and laid on a grey `canvas` at
    `top`, at 30 fps, H.264 + AAC, with the source's sound. `stored_turned`: as phones store portrait video, the
    pictures a quarter turn clockwise and a display rotation that turns them back."""
    from egstalker.media import iter_frames, read_audio
    from egstalker.render.video import Mp4Writer

    speech = read_audio(source, 48000)[: int(seconds * 48000)]
    width, height = canvas
    stored = target.with_name("stored_" + target.name) if stored_turned else target
    with Mp4Writer(stored, *((height, width) if stored_turned else (width, height)), fps=30, audio=speech,
                   audio_rate=48000) as writer:
        for frame in iter_frames(source, 30, n_frames=int(seconds * 30)):
            picture = np.full((height, width, 3), 128, np.uint8)
            left = (width - content) // 2
            picture[top:top + content, left:left + content] = cv2.resize(frame.image, (content, content))
            writer.write(np.ascontiguousarray(np.rot90(picture, -1)) if stored_turned else picture)
    return remux(stored, target, seconds + 1, rotation=90) if stored_turned else target


@pytest.mark.parametrize("stored_turned", [False, True])
def test_phone_video_framed_around_the_speaker(tmp_path, stored_turned):
    """A portrait 720x1280 clip (stored upright, or turned with a display rotation as phones store it) is cut to
    a square around the face and scaled to 512; --crop none keeps the whole frame."""
    video = phone_video(shared_media("video/aoc_8s_512.mp4"), tmp_path / "phone.mp4", 3.0,
                        stored_turned=stored_turned)
    root = preprocess(video, tmp_path / "ds", tasks=[1, 3], config=FAST, show_progress=False)
    meta = json.loads(DatasetLayout(root).meta.read_text())
    framing = meta["framing"]
    assert (meta["width"], meta["height"]) == (512, 512) and meta["video_width"] == 720
    assert framing["faces_sampled"] == [16, 16] and framing["video_size"] == [720, 1280]
    x, y, w, h = framing["crop_xywh"]
    assert (x, w, h) == (0, 720, 720) and abs(y - 280) <= 40  # the square the picture was laid in, give or take
    assert 0.5 * 512 < framing["face_height_px"] < 0.7 * 512  # aoc's face, about 0.61 of its frame
    assert len(list(DatasetLayout(root).frames_dir.glob("*.jpg"))) == meta["n_frames"] == 75
    frame = cv2.imread(str(DatasetLayout(root).frame(40)))
    assert frame.shape == (512, 512, 3)
    grey = np.all(np.abs(frame.astype(int) - 128) < 6, axis=2)
    assert grey.mean() < 0.08  # the bars are cut off (a sliver may stay: the face sets the crop, not the bars)
    # another framing asked for: task 3 is redone without --force, and the face cache (pixel positions in the
    # old frames) is dropped
    (root / "face_landmarks.npz").write_bytes(b"stale")
    assert main(["preprocess", str(video), "-o", str(root), "--task", "1", "--task", "3", "--crop", "none",
                 "--max-size", "640", "--quiet"]) == 0
    meta = json.loads(DatasetLayout(root).meta.read_text())
    assert meta["framing"]["crop_xywh"] == [0, 0, 720, 1280] and (meta["width"], meta["height"]) == (360, 640)
    assert cv2.imread(str(DatasetLayout(root).frame(0))).shape == (640, 360, 3)
    assert not (root / "face_landmarks.npz").exists()


def test_dataset_from_before_framing_kept_unless_asked(tmp_path):
    """A dataset whose frames predate framing (whole frames, no meta "framing") is left as it is by a plain
    re-run, and re-framed when --crop/--max-size ask for something else."""
    video = phone_video(shared_media("video/aoc_8s_512.mp4"), tmp_path / "phone.mp4", 2.5)
    root = preprocess(video, tmp_path / "ds", tasks=[1, 3], config=FAST, show_progress=False)
    layout = DatasetLayout(root)
    meta = json.loads(layout.meta.read_text())  # made as the code before framing made it:
    meta = {k: v for k, v in meta.items() if k not in ("framing", "video_width", "video_height")}
    meta["width"], meta["height"] = 720, 1280
    layout.meta.write_text(json.dumps(meta))
    saved = json.loads(layout.preprocess_config.read_text())
    saved["frames"] = {k: v for k, v in saved["frames"].items() if k not in ("crop", "max_size")}
    layout.preprocess_config.write_text(json.dumps(saved))
    for i in range(meta["n_frames"]):
        cv2.imwrite(str(layout.frame(i)), np.full((1280, 720, 3), 90, np.uint8))
    before = layout.frame(0).stat().st_mtime_ns
    assert main(["preprocess", str(video), "-o", str(root), "--task", "1", "--task", "3", "--quiet"]) == 0
    assert layout.frame(0).stat().st_mtime_ns == before and "framing" not in json.loads(layout.meta.read_text())
    assert main(["preprocess", str(video), "-o", str(root), "--task", "1", "--task", "3", "--max-size", "256",
                 "--quiet"]) == 0
    meta = json.loads(layout.meta.read_text())
    assert meta["framing"]["max_size"] == 256 and (meta["width"], meta["height"]) == (256, 256)
    assert cv2.imread(str(layout.frame(0))).shape == (256, 256, 3)


def encode_ts(source: Path, target: Path) -> Path:
    """An MPEG-TS copy of a clip as a camera writes one: H.264 with one key frame per 10 s, AAC sound."""
    from fractions import Fraction

    from egstalker.media import iter_frames, read_audio

    speech = read_audio(source, 48000)
    with av.open(str(target), "w", format="mpegts") as dst:
        video = dst.add_stream("libx264", rate=25)
        video.width, video.height, video.pix_fmt = 512, 512, "yuv420p"
        video.options = {"g": "250", "keyint_min": "250", "sc_threshold": "0", "crf": "18"}
        audio = dst.add_stream("aac", rate=48000)
        audio.layout = "mono"
        for k, frame in enumerate(iter_frames(source)):
            picture = av.VideoFrame.from_ndarray(frame.image, format="rgb24")
            picture.pts = k
            dst.mux(video.encode(picture))
        dst.mux(video.encode())
        for start in range(0, len(speech), 1024):
            chunk = av.AudioFrame.from_ndarray(np.ascontiguousarray(speech[None, start:start + 1024]), format="flt",
                                               layout="mono")
            chunk.sample_rate, chunk.pts, chunk.time_base = 48000, start, Fraction(1, 48000)
            dst.mux(audio.encode(chunk))
        dst.mux(audio.encode())
    return target


def test_sample_frames_seek_or_decode(tmp_path):
    """Sampled pictures are the frames iter_frames gives at those times, whether found by seeking (mp4) or, where
    seeking misses key frames (MPEG-TS, as camera .MTS files), by one decoding pass; a TS clip is framed too."""
    from egstalker import media
    from egstalker.media import iter_frames, sample_frames

    mp4 = remux(shared_media("video/aoc_8s_512.mp4"), tmp_path / "clip.mp4", 3.0)
    ts = encode_ts(mp4, tmp_path / "clip.ts")
    times = [0.0, 1.0, 2.48]
    for video in (mp4, ts):
        frames = {f.index: f.image for f in iter_frames(video, n_frames=75)}
        for t, picture in zip(times, sample_frames(video, times)):
            assert np.array_equal(picture, frames[round(t * 25)]), (video.name, t)
    with av.open(str(ts)) as container:  # the TS clip does take the decoding pass: its seeks miss key frames
        stream = container.streams.video[0]
        assert media._seek_pictures(container, stream, [float(stream.start_time * stream.time_base) + 1.0],
                                    "rgb24") is None
    root = preprocess(ts, tmp_path / "ds", tasks=[1, 3], config=FAST, show_progress=False)
    assert json.loads(DatasetLayout(root).meta.read_text())["framing"]["faces_sampled"] == [16, 16]


def test_framing_plan():
    from egstalker.preprocess.framing import plan_framing

    def box(cx, cy, h):
        return [cx - 0.4 * h, cy - h / 2, cx + 0.4 * h, cy + h / 2]

    # framed as the peers frame (face half the side or more): kept whole
    assert plan_framing(np.array([box(256, 280, 300)]), 512, 512).is_identity
    assert plan_framing(np.array([box(128, 140, 150)]), 255, 255).is_identity  # odd sizes too
    # a wide shot: a square twice the face's height, its centre at 0.55 of it, scaled to 512
    f = plan_framing(np.array([box(1000, 500, 300)] * 3), 1920, 1080)
    assert (f.crop_width, f.crop_height, f.width, f.height) == (600, 600, 512, 512)
    assert (f.x, f.y) == (700, 500 - 330)
    # the head moves: the crop holds every box with room to spare
    f = plan_framing(np.array([box(700, 500, 300), box(1300, 500, 300)]), 1920, 1080)
    assert f.crop_width == 1008 and f.x <= 700 - 120 and f.x + 1008 >= 1300 + 120  # 1.2 x the boxes' 840 px
    # a head travelling further than the frame is tall: a rectangle as wide as it travels
    f = plan_framing(np.array([box(200, 360, 200), box(1100, 360, 200)]), 1280, 720)
    assert (f.x, f.y, f.crop_width, f.crop_height, f.width, f.height) == (8, 0, 1272, 720, 512, 288)
    # kept inside the frame near its edge; no face, 'none' or max_size 0: whole frame, scaled or not
    f = plan_framing(np.array([box(100, 100, 200)]), 1920, 1080)
    assert (f.x, f.y, f.crop_width) == (0, 0, 400)
    assert plan_framing(np.zeros((0, 4)), 1920, 1080) == plan_framing(np.array([box(960, 540, 300)]), 1920, 1080,
                                                                        crop="none")
    f = plan_framing(np.zeros((0, 4)), 1920, 1080)
    assert (f.crop_width, f.crop_height, f.width, f.height) == (1920, 1080, 512, 288)
    f = plan_framing(np.array([box(1000, 500, 300)]), 1920, 1080, max_size=0)
    assert (f.width, f.height) == (600, 600)
    for crop, size in (("square", 512), ("auto", 32), ("auto", -1)):
        with pytest.raises(EgstalkerError):
            plan_framing(np.zeros((0, 4)), 640, 480, crop=crop, max_size=size)


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
    # other weights of the same encoder: task 2 is redone too (they were recorded and silently not used)
    n = len(np.load(layout.audio_features))
    for name, value in (("a.npy", 0.0), ("b.npy", 1.0)):
        np.save(tmp_path / name, np.full((n, 16, 29), value, np.float32))
    for name, value in (("a.npy", 0.0), ("b.npy", 1.0)):
        assert main(["preprocess", str(video), "-o", str(root), *only_basic, "--audio-features", "deepspeech",
                     "--audio-weights", str(tmp_path / name), "--quiet"]) == 0
        assert np.all(np.load(layout.audio_features) == value)
    # settings a task refuses (features of another clip) do not become the dataset's, also after an earlier task
    # ran with them: a plain run works again
    saved = layout.preprocess_config.read_text()
    np.save(tmp_path / "other_clip.npy", np.zeros((n // 2, 16, 29), np.float32))
    assert main(["preprocess", str(video), "-o", str(root), "--task", "1", "--task", "2", "--force",
                 "--audio-features", "deepspeech", "--audio-weights", str(tmp_path / "other_clip.npy"),
                 "--quiet"]) == 2
    assert "frames of features for this clip's" in capsys.readouterr().err
    assert layout.preprocess_config.read_text() == saved
    assert main(["preprocess", str(video), "-o", str(root), *only_basic, "--quiet"]) == 0
    assert np.all(np.load(layout.audio_features) == 1.0)  # b.npy's, as the saved settings say


def test_frames_without_recorded_sound_are_left_out_of_the_split(tmp_path, capsys):
    """A sound track starting 1 s after the picture: task 1 pads it with silence, and those frames (a face
    speaking, no sound) stay out of training and evaluation."""
    video = remux(shared_media("video/aoc_8s_512.mp4"), tmp_path / "late.mp4", 3.5, audio_from=1.0)
    root = preprocess(video, tmp_path / "ds", config=FAST)
    assert "the sound track covers only 7" in capsys.readouterr().out
    layout = DatasetLayout(root)
    meta = json.loads(layout.meta.read_text())
    unheard = meta["audio"]["frames_without_sound"]
    assert 25 <= unheard <= 27 and meta["split"]["frames_without_audio"] == list(range(unheard))
    used = [f["img_id"] for split in ("train", "val")
            for f in json.loads(layout.transforms(split).read_text())["frames"]]
    assert used == list(range(unheard, meta["n_frames"]))

    # frames without a face (interpolated) stay in the split as poses, marked, and training never draws them
    from egstalker.preprocess.transforms import write_split
    from egstalker.train.config import TrainConfig
    from egstalker.train.trainer import IterationBatchSampler, Trainer

    n = meta["n_frames"]
    no_face = np.zeros(n, bool)
    no_face[40:46] = True
    staging = DatasetLayout(tmp_path / "staging")
    write_split(staging, layout, np.tile(np.eye(4), (n, 1, 1)), 500.0, 512, 512, np.zeros((n, 68, 2)), np.zeros(n),
                1 / 11, no_face=no_face)
    written = json.loads(staging.transforms("train").read_text())["frames"]
    assert [f["img_id"] for f in written if f.get("face") is False] == list(range(40, 46)) and len(written) == 80
    with pytest.raises(EgstalkerError, match="no train frame shows a face"):
        write_split(staging, layout, np.tile(np.eye(4), (n, 1, 1)), 500.0, 512, 512, np.zeros((n, 68, 2)),
                    np.zeros(n), 1 / 11, no_face=np.ones(n, bool))
    transforms = json.loads(layout.transforms("train").read_text())
    for frame in transforms["frames"]:
        if 40 <= frame["img_id"] < 46:
            frame["face"] = False
    layout.transforms("train").write_text(json.dumps(transforms))
    config = TrainConfig()
    config.data.resolution, config.data.num_workers, config.loss.perceptual = 64, 0, 0.0
    config.init.surface_points, config.init.volume_points, config.init.n_frames = 300, 100, 3
    trainer = Trainer(root, tmp_path / "model", config, show_progress=False)
    sampler = trainer._loader(0, 100).batch_sampler
    assert isinstance(sampler, IterationBatchSampler)
    faces = [int(i) for i in trainer.train_data.frame_ids[list({i for batch in sampler for i in batch})]]
    assert not set(range(40, 46)) & set(faces) and len(faces) == len(trainer.train_data) - 6


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
    """A new or empty folder is left as it was; a folder of other files is refused before anything is written;
    a dataset being resumed keeps its completed tasks."""
    video = remux(shared_media("video/aoc_8s_512.mp4"), tmp_path / "clip.mp4", 2.5)

    def no_face(*args):
        raise EgstalkerError("no face found in frames 0-61")

    monkeypatch.setattr(frames_task, "_write_jpeg", no_face)
    with pytest.raises(EgstalkerError, match="no face"):
        preprocess(video, tmp_path / "new", tasks=BASIC, config=FAST, show_progress=False)
    assert not (tmp_path / "new").exists()
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".gitkeep").write_text("")  # hidden files do not make a folder someone else's
    with pytest.raises(EgstalkerError, match="no face"):
        preprocess(video, tmp_path / "empty", tasks=BASIC, config=FAST, show_progress=False)
    assert [p.name for p in (tmp_path / "empty").iterdir()] == [".gitkeep"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("my files")
    with pytest.raises(EgstalkerError, match="holds other files and is not an egstalker dataset"):
        preprocess(video, tmp_path / "mine", tasks=BASIC, config=FAST, show_progress=False)
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]
    preprocess(video, tmp_path / "resumed", tasks=[1, 2], config=FAST, show_progress=False)
    with pytest.raises(EgstalkerError, match="no face"):
        preprocess(video, tmp_path / "resumed", tasks=BASIC, config=FAST, show_progress=False)
    assert json.loads((tmp_path / "resumed" / "meta.json").read_text())["tasks_complete"] == [1, 2]


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
    hiss = with_sound(aoc, tmp_path / "hiss.mkv", 3.0,
                      np.random.default_rng(0).uniform(-1, 1, 48000).astype(np.float32) * 10 ** (-63 / 20))
    _bad_input(tmp_path, capsys, [hiss], "silent or empty (peak below -50 dBFS)", tmp_path / "hiss")
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
    _bad_input(tmp_path, capsys, [aoc, "-o", tmp_path / "d5", "--max-size", "32"], "cannot show a mouth",
               tmp_path / "d5")


def test_a_video_cut_short_is_named(tmp_path):
    """An unfinished download plays as far as it goes: the dataset is made from what is there, with a warning."""
    whole = tmp_path / "whole.mp4"  # its index first, as web and phone videos are (faststart)
    with av.open(str(shared_media("video/aoc_8s_512.mp4"))) as src, \
            av.open(str(whole), "w", options={"movflags": "faststart"}) as dst:
        out = {s.index: dst.add_stream_from_template(s) for s in src.streams}
        for packet in src.demux():
            if packet.dts is not None:
                packet.stream = out[packet.stream.index]
                dst.mux(packet)
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(whole.read_bytes()[:int(whole.stat().st_size * 0.6)])
    with pytest.warns(UserWarning, match=r"cut.mp4 says it lasts 8\.\d s but holds frames for [2-6]\.\d s: it is "
                                         r"probably cut short"):
        preprocess(cut, tmp_path / "ds", tasks=[1], config=FAST, show_progress=False)


def test_other_video_in_existing_dataset_is_refused(tmp_path, capsys):
    clip = remux(shared_media("video/aoc_8s_512.mp4"), tmp_path / "clip.mp4", 2.5)
    preprocess(clip, tmp_path / "ds", tasks=[1], config=FAST, show_progress=False)
    other = remux(shared_media("video/hill_8s_512.mp4"), tmp_path / "other.mp4", 3.0)
    _bad_input(tmp_path, capsys, [other, "-o", tmp_path / "ds"], "dataset of another video")
