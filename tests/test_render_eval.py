"""`egstalker render` / `eval` / `run` on a small CPU-trained model, the mp4 writer, and bad inputs."""

from __future__ import annotations

import json
import os
import shutil

import av
import numpy as np
import pytest

from conftest import shared_media
from fixtures_models import cut_clip, write_speech
from egstalker.cli import main
from egstalker.errors import EgstalkerError
from egstalker.render.api import load_speech, n_frames_for, parse_background
from egstalker.render.video import Mp4Writer
from egstalker.train.config import preset_config


def probe_mp4(path) -> dict:
    """Streams of an mp4 by decoding it: codec names, frame count, durations, audio rate."""
    with av.open(str(path)) as c:
        video, audio = c.streams.video[0], (c.streams.audio[0] if c.streams.audio else None)
        info = {"video_codec": video.codec_context.name, "pix_fmt": video.codec_context.pix_fmt,
                "width": video.width, "height": video.height,
                "audio_codec": audio.codec_context.name if audio else None,
                "audio_rate": audio.rate if audio else None}
        info["frames"] = sum(1 for _ in c.decode(video=0))
    with av.open(str(path)) as c:
        samples = sum(f.samples for f in c.decode(audio=0)) if c.streams.audio else 0
        info["audio_seconds"] = samples / info["audio_rate"] if info["audio_rate"] else 0.0
    with open(path, "rb") as f:
        head = f.read(64)
    info["moov_first"] = head.find(b"moov") != -1  # +faststart: the index precedes the media data
    return info


# --- the writer on its own (fast)

def test_mp4_writer_streams_h264_and_aac(tmp_path):
    audio = np.sin(np.linspace(0, 2000 * np.pi, 48000 * 2)).astype(np.float32) * 0.3
    out = tmp_path / "odd.mp4"
    with Mp4Writer(out, width=101, height=67, fps=25, audio=audio, audio_rate=48000) as writer:
        for i in range(50):
            writer.write(np.full((67, 101, 3), i * 5, np.uint8))
    info = probe_mp4(out)
    assert info["video_codec"] == "h264" and info["pix_fmt"] == "yuv420p" and info["audio_codec"] == "aac"
    assert info["frames"] == 50 and (info["width"], info["height"]) == (102, 68)  # odd sizes padded to even
    assert abs(info["audio_seconds"] - 2.0) < 0.05 and info["moov_first"]
    assert [p.name for p in tmp_path.iterdir()] == ["odd.mp4"], "no temporary file may be left behind"


def test_mp4_writer_streams_audio_chunks(tmp_path):
    rng = np.random.default_rng(0)
    audio = (rng.standard_normal(16000 * 3) * 0.1).astype(np.float32)
    cuts = np.sort(rng.choice(len(audio), 40, replace=False))
    chunks = iter(np.split(audio, cuts))  # uneven chunk sizes, as a decoder yields them
    with Mp4Writer(tmp_path / "s.mp4", 64, 64, fps=25, audio=chunks, audio_rate=16000) as writer:
        for _ in range(75):
            writer.write(np.zeros((64, 64, 3), np.uint8))
    info = probe_mp4(tmp_path / "s.mp4")
    assert info["frames"] == 75 and abs(info["audio_seconds"] - 3.0) < 0.07


def test_mp4_writer_leaves_nothing_when_interrupted(tmp_path):
    out = tmp_path / "broken.mp4"
    with pytest.raises(RuntimeError):
        with Mp4Writer(out, 64, 64) as writer:
            writer.write(np.zeros((64, 64, 3), np.uint8))
            raise RuntimeError("simulated crash mid-render")
    assert list(tmp_path.iterdir()) == []


# --- speech and option checks (fast)

def test_bad_speech_gets_one_line_errors(tmp_path):
    silent = tmp_path / "silence.wav"
    import soundfile

    soundfile.write(silent, np.zeros(16000 * 3, np.float32), 16000)
    with pytest.raises(EgstalkerError, match="silent"):
        load_speech(silent)
    garbage = tmp_path / "notes.wav"
    garbage.write_text("this is not audio\n" * 100)
    with pytest.raises(EgstalkerError, match="not a readable"):
        load_speech(garbage)
    with pytest.raises(EgstalkerError, match="does not exist"):
        load_speech(tmp_path / "missing.wav")
    # speech at another rate and format decodes to 16 kHz with the right length
    speech = load_speech(write_speech(tmp_path / "s.flac", 3.0, rate=44100))
    assert abs(len(speech) - 48000) <= 2 and np.abs(speech).max() > 0.05


def test_background_option():
    assert parse_background("dataset", 8, 6) is None
    assert parse_background("green", 8, 6).shape == (6, 8, 3)
    assert tuple(parse_background("#ff8000", 8, 6)[0, 0]) == (255, 128, 0)
    assert tuple(parse_background("10,20,30", 8, 6)[5, 7]) == (10, 20, 30)
    with pytest.raises(EgstalkerError, match="neither"):
        parse_background("no-such-file.png", 8, 6)


def test_a_background_image_covers_the_frame_unstretched(tmp_path):
    import cv2

    wide = np.zeros((10, 40, 3), np.uint8)  # 4:1, left half blue, right half red (BGR)
    wide[:, :20] = (255, 0, 0)
    wide[:, 20:] = (0, 0, 255)
    cv2.imwrite(str(tmp_path / "wide.png"), wide)
    square = parse_background(str(tmp_path / "wide.png"), 8, 8)
    assert square.shape == (8, 8, 3)  # the middle 10x10 of the image, scaled: half blue, half red, no squeeze
    assert tuple(square[4, 0]) == (0, 0, 255) and tuple(square[4, 7]) == (255, 0, 0)


def test_cli_bad_inputs_print_one_line(tmp_path, capsys):
    speech = write_speech(tmp_path / "speech.wav", 1.0)
    assert main(["render", str(tmp_path / "no_model"), "--audio", str(speech)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("egstalker render: error:") and "does not exist" in err and "\n" not in err
    silent = tmp_path / "silence.wav"
    import soundfile

    soundfile.write(silent, np.zeros(16000, np.float32), 16000)
    assert main(["render", str(tmp_path), "--audio", str(silent)]) == 2
    assert "silent" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "no_model"), "--json"]) == 2
    assert "does not exist" in capsys.readouterr().err
    # eval's report folder is checked before the model loads; an earlier report (written before the page was
    # marked) may be replaced, a folder of other files may not
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    assert main(["eval", str(tmp_path / "no_model"), "--report", str(tmp_path / "mine")]) == 2
    assert "holds other files, not an egstalker report" in capsys.readouterr().err
    from egstalker.evaluate.report import check_report_dir

    (tmp_path / "old_report" / "frames").mkdir(parents=True)
    (tmp_path / "old_report" / "index.html").write_text('<html lang="en"><head><meta charset="utf-8"><title>egstalker '
                                                        'eval: lieu_model (val)</title></head></html>')
    check_report_dir(tmp_path / "old_report")
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "index.html").write_text("<html><title>my page</title></html>")
    with pytest.raises(EgstalkerError, match="holds other files"):
        check_report_dir(tmp_path / "site")
    speech_ok = write_speech(tmp_path / "ok.wav", 1.0)
    frames = tmp_path / "frames"
    frames.mkdir()
    (frames / "000000.png").write_bytes(b"an earlier render")
    for argv, message in [(["--device", "mps"], "--device mps: egstalker runs on cpu or cuda (an NVIDIA GPU), not "
                                                "on mps; use --device cpu"),
                          (["--frames-dir", str(frames)], "already holds frames (000000.png ...)"),
                          (["--frames-dir", str(speech_ok)], "is a file; give a folder"),
                          (["--no-video", "--frames-dir", str(tmp_path / "f2"), "-o", str(tmp_path / "t.mp4")],
                           "--no-video writes no video, so -o has nothing to name"),
                          (["--background", "red"], "a colour (black, white, green, blue, grey, gray, #rrggbb")]:
        assert main(["render", str(tmp_path / "no_model"), "--audio", str(speech_ok), *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("egstalker render: error:") and message in err and "\n" not in err, err


def test_outputs_that_cannot_take_a_video_are_refused_before_any_work(tmp_path, capsys):
    speech = write_speech(tmp_path / "speech.wav", 1.0)
    filmed = tmp_path / "filmed.mp4"  # a video's sound can drive the head too
    shutil.copy(shared_media("video/aoc_8s_512.mp4"), filmed)
    filmed_bytes = filmed.read_bytes()
    (tmp_path / "file.txt").write_text("x")
    for audio, output, message in [(speech, tmp_path, "is a folder; give the video's file name"),
                                   (speech, tmp_path / "talk.avi", "give a name ending in .mp4"),
                                   (speech, tmp_path / "talk", "give a name ending in .mp4"),
                                   (speech, speech, "give a name ending in .mp4"),
                                   (filmed, filmed, "is also an input"),
                                   (speech, tmp_path / "file.txt" / "talk.mp4", "choose a writable output path")]:
        # the model folder does not exist: the output is checked first
        assert main(["render", str(tmp_path / "no_model"), "--audio", str(audio), "-o", str(output)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("egstalker render: error:") and message in err and "\n" not in err, err
    assert filmed.read_bytes() == filmed_bytes
    # `run` checks it before preprocessing and training: no dataset folder is made
    video = shared_media("video/aoc_8s_512.mp4")
    assert main(["run", str(video), "--audio", str(speech), "-o", str(tmp_path / "talk.avi"), "--dataset",
                 str(tmp_path / "ds"), "--model", str(tmp_path / "m"), "--quiet"]) == 2
    assert "ending in .mp4" in capsys.readouterr().err and not (tmp_path / "ds").exists()


def test_command_line_slips_are_named_by_the_subcommand(tmp_path, capsys):
    import torch

    with pytest.raises(SystemExit) as exit_:
        main(["render", "model", "--audio", "speech.wav", "--bogus"])
    assert exit_.value.code == 2 and "egstalker render: error: unrecognized arguments: --bogus" in capsys.readouterr().err
    if torch.cuda.is_available():
        return
    speech = write_speech(tmp_path / "speech.wav", 1.0)
    for argv in (["render", str(tmp_path / "m"), "--audio", str(speech), "-o", str(tmp_path / "talk.mp4")],
                 ["eval", str(tmp_path / "m")],
                 ["train", str(tmp_path / "d"), "-o", str(tmp_path / "m")]):
        assert main([*argv, "--device", "cuda"]) == 2
        err = capsys.readouterr().err.strip()
        assert f"egstalker {argv[0]}: error: --device cuda was asked for but this PyTorch sees no CUDA GPU" in err
        assert "\n" not in err


def test_sigterm_stops_a_render_like_ctrl_c_leaving_no_partial_video(tmp_path, capsys, monkeypatch):
    import os
    import signal

    from egstalker.render import cli as render_cli

    out = tmp_path / "talk.mp4"

    def render_until_terminated(args):
        with Mp4Writer(out, 64, 64) as writer:
            for i in range(100):
                writer.write(np.zeros((64, 64, 3), np.uint8))
                if i == 10:
                    os.kill(os.getpid(), signal.SIGTERM)  # as `kill` or a service manager sends it
        return 0

    monkeypatch.setattr(render_cli, "run", render_until_terminated)
    before = signal.getsignal(signal.SIGTERM)
    assert main(["render", "model", "--audio", "speech.wav"]) == 130
    assert "egstalker render: interrupted; nothing was written" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [] and signal.getsignal(signal.SIGTERM) == before


def test_run_refuses_a_model_of_another_resolution(small_model):
    from egstalker.pipeline_run import _check_model_resolution
    from fixtures_models import SMALL_MODEL_RESOLUTION

    _check_model_resolution(small_model, None)
    _check_model_resolution(small_model, SMALL_MODEL_RESOLUTION)
    with pytest.raises(EgstalkerError, match=f"trained at {SMALL_MODEL_RESOLUTION} px and --resolution asks for 64"):
        _check_model_resolution(small_model, 64)


# --- a real small model (built once per session)

def test_render_ten_seconds_gives_250_frames_with_sound(small_model, tmp_path):
    speech = write_speech(tmp_path / "speech_10s.ogg", 10.0, rate=22050)
    out = tmp_path / "talk.mp4"
    frames_dir = tmp_path / "frames"
    assert main(["render", str(small_model), "--audio", str(speech), "-o", str(out), "--device", "cpu",
                 "--frames-dir", str(frames_dir), "--background", "white"]) == 0
    info = probe_mp4(out)
    assert info["video_codec"] == "h264" and info["audio_codec"] == "aac" and info["pix_fmt"] == "yuv420p"
    assert info["frames"] == 250 == n_frames_for(160000)
    assert abs(info["audio_seconds"] - 10.0) < 0.05 and info["moov_first"]
    pngs = sorted(frames_dir.glob("*.png"))
    assert len(pngs) == 250 and pngs[0].name == "000000.png"


def test_render_of_aac_speech_is_as_long_as_the_speech(small_model, tmp_path):
    """2 s of speech in an m4a (AAC, whose encoder pads its last frame) makes 50 frames and a sound track of 2 s,
    not the 51 frames and 2.05 s the padding made."""
    from test_media_audio import encode

    m4a = encode(tmp_path / "speech.m4a", "aac", 44100, "stereo")
    out = tmp_path / "talk.mp4"
    assert main(["render", str(small_model), "--audio", str(m4a), "-o", str(out), "--device", "cpu"]) == 0
    info = probe_mp4(out)
    assert info["frames"] == 50 and abs(info["audio_seconds"] - 2.0) < 0.03


def test_render_api_streams_what_the_talking_head_renders(small_model):
    from egstalker.inference import TalkingHead
    from egstalker.render.api import render

    head = TalkingHead.from_dir(small_model)
    wav = load_speech(shared_media("audio/speech_8s_16k_stereo.wav"))[: 16000 * 2]
    frames = list(render(head, wav, pose="loop", batch_size=3))
    assert len(frames) == 50 and frames[0].shape == (head.height, head.width, 3) and frames[0].dtype == np.uint8
    # the same frames as the inference object's own call (another batch size), in the same order
    reference = list(head(wav, pose="loop", batch_size=8))
    assert len(reference) == 50
    assert max(np.abs(a.astype(int) - b).max() for a, b in zip(frames, reference)) <= 1


def test_eval_psnr_equals_independent_computation(small_model, tmp_path, capsys):
    from egstalker.evaluate.evaluate import evaluate, heldout_frames
    from egstalker.inference import TalkingHead

    head = TalkingHead.from_dir(small_model)
    result = evaluate(head, split="val", report_dir=tmp_path / "report", show_progress=False)
    held = heldout_frames(head, "val")
    assert result.n_frames == len(held.frame_ids) > 10
    # independent: render the same frames, read the filmed frames with OpenCV, PSNR with numpy
    import cv2

    renders = head.render_frames(held.features, held.audio_ids, held.pose_indices).astype(np.float64)
    psnrs = []
    for render, frame_id in zip(renders, held.frame_ids):
        bgr = cv2.imread(str(held.dataset_dir / "gt_imgs" / f"{frame_id}.jpg"))
        truth = cv2.cvtColor(cv2.resize(bgr, (head.width, head.height), interpolation=cv2.INTER_AREA),
                             cv2.COLOR_BGR2RGB).astype(np.float64)
        psnrs.append(10 * np.log10(255.0**2 / np.mean((render - truth) ** 2)))
    # eval averages in float32, this in float64: equal to 1e-4 dB (a wrong or shifted frame moves it by > 0.01)
    assert result.psnr == pytest.approx(float(np.mean(psnrs)), abs=1e-4)
    assert 0 < result.ssim <= 1 and 0 < result.lpips < 1 and result.fps > 0
    # the report exists with its plots, frames and video
    page = (tmp_path / "report" / "index.html").read_text()
    assert page.count("<svg") == 2 and "side_by_side.mp4" in page
    assert len(list((tmp_path / "report" / "frames").glob("0*.png"))) == 6 and "poster.png" in page
    assert probe_mp4(tmp_path / "report" / "side_by_side.mp4")["frames"] == min(result.n_frames, 200)
    assert "held-out frame" in page
    # the same folder again, on 5 training frames: only this report's samples, named as training frames
    evaluate(head, split="train", max_frames=5, report_dir=tmp_path / "report", show_progress=False)
    page = (tmp_path / "report" / "index.html").read_text()
    # a folder of someone's own files (render --frames-dir's numbered PNGs) is refused, not emptied
    (tmp_path / "renders" / "frames").mkdir(parents=True)
    (tmp_path / "renders" / "frames" / "000000.png").write_bytes(b"mine")
    with pytest.raises(EgstalkerError, match="holds other files, not an egstalker report"):
        evaluate(head, max_frames=2, report_dir=tmp_path / "renders", show_progress=False)
    assert (tmp_path / "renders" / "frames" / "000000.png").read_bytes() == b"mine"
    assert "held-out" not in page and "training frame" in page
    shown = sorted(p.stem for p in (tmp_path / "report" / "frames").glob("*.png"))
    assert "poster" in shown and all(name == "poster" or int(name) < 5 for name in shown), shown
    # the CLI's JSON has the agreed keys
    assert main(["eval", str(small_model), "--json", "--device", "cpu"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {"psnr", "ssim", "lpips", "lmd", "mouth_corr", "fps"} <= set(data)
    assert data["psnr"] == pytest.approx(result.psnr, abs=1e-4)
    assert data["mouth_corr_frozen_pose"] is None  # controls not asked for
    # lip-sync controls: a shift of 0 s renders the same frames, so it must reproduce mouth_corr exactly
    same = evaluate(head, split="val", max_frames=40, show_progress=False, lipsync_controls=True,
                    control_shift_seconds=0.0)
    assert same.mouth_corr_shifted_audio == pytest.approx(same.mouth_corr, abs=1e-9)
    assert -1 <= same.mouth_corr_frozen_pose <= 1 and same.mouth_corr_frozen_pose != same.mouth_corr


def test_incompatible_model_version_is_refused(small_model, tmp_path, capsys):
    old = tmp_path / "old_model"
    shutil.copytree(small_model, old, ignore=shutil.ignore_patterns("checkpoints", "logs"))
    meta = json.loads((old / "model.json").read_text())
    meta["format_version"] = 999
    (old / "model.json").write_text(json.dumps(meta))
    speech = write_speech(tmp_path / "speech.wav", 1.0)
    assert main(["render", str(old), "--audio", str(speech), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "version" in err and err.count("\n") == 1


def test_run_reuses_finished_stages(short_clip, small_dataset, small_model, tmp_path):
    from fixtures_models import SMALL_MODEL_ITERATIONS
    from egstalker.pipeline_run import run_pipeline

    speech = write_speech(tmp_path / "hello.wav", 1.0)
    out = tmp_path / "hello.mp4"
    weights_before = (small_model / "model.pt").stat().st_mtime_ns
    first = run_pipeline(short_clip, speech, out, dataset_dir=small_dataset, model_dir=small_model,
                         iterations=SMALL_MODEL_ITERATIONS, device="cpu", show_progress=False)
    assert [(s.name, s.status) for s in first.stages] == [("preprocess", "reused"), ("train", "reused"),
                                                          ("render", "done")]
    assert (small_model / "model.pt").stat().st_mtime_ns == weights_before, "a finished model is not retrained"
    assert probe_mp4(out)["frames"] == 25
    second = run_pipeline(short_clip, speech, out, dataset_dir=small_dataset, model_dir=small_model,
                          iterations=SMALL_MODEL_ITERATIONS, device="cpu", show_progress=False)
    assert [s.status for s in second.stages] == ["reused", "reused", "reused"]
    summary = second.summary()
    assert str(out) in summary and str(small_model) in summary and str(small_dataset) in summary
    # other speech, older than the video (as a user's recording is), or another pose: rendered again
    other = write_speech(tmp_path / "other.wav", 2.0, start=20.0)
    os.utime(other, (1_000_000_000, 1_000_000_000))
    third = run_pipeline(short_clip, other, out, dataset_dir=small_dataset, model_dir=small_model,
                         iterations=SMALL_MODEL_ITERATIONS, device="cpu", show_progress=False)
    assert third.stages[-1].status == "done" and probe_mp4(out)["frames"] == 50
    preview = preset_config("preview", "cpu")
    fourth = run_pipeline(short_clip, other, out, dataset_dir=small_dataset, model_dir=small_model,
                          iterations=SMALL_MODEL_ITERATIONS, device="cpu", pose="static", show_progress=False,
                          config=preview)
    assert fourth.stages[-1].status == "done"
    assert preview.schedule.iterations == 3000 and preview.schedule.time_budget_minutes == 10  # the caller's own


def test_run_trains_on_a_model_of_an_explicit_count_in_the_preview_budget(short_clip, small_model, small_dataset,
                                                                           tmp_path):
    """A model trained with an explicit --iterations is not "finished" for the preview's time budget (it was
    reused: a 10-iteration model for a 10-minute promise); a finished budgeted run is."""
    from egstalker.pipeline_run import run_pipeline

    model = shutil.copytree(small_model, tmp_path / "model")
    speech = write_speech(tmp_path / "hello.wav", 1.0)
    preview = preset_config("preview", "cpu")
    preview.schedule.time_budget_minutes, preview.schedule.budget_probe = 0.01, 2  # a few steps, then fitted
    first = run_pipeline(short_clip, speech, tmp_path / "a.mp4", dataset_dir=small_dataset, model_dir=model,
                         device="cpu", show_progress=False, config=preview)
    assert first.stages[1].status == "done"
    second = run_pipeline(short_clip, speech, tmp_path / "b.mp4", dataset_dir=small_dataset, model_dir=model,
                          device="cpu", show_progress=False, config=preview)
    assert second.stages[1].status == "reused"


def test_run_refuses_what_it_cannot_reuse_before_any_work(short_clip, small_model, small_dataset, tmp_path):
    """A model folder of another video (it rendered that person's head), of other audio features (the dataset was
    re-encoded first, breaking the command that had worked), a model inside the dataset, an output inside a
    folder of the run, an unknown pose: refused before anything is written."""
    from egstalker.pipeline_run import run_pipeline

    speech = write_speech(tmp_path / "hello.wav", 1.0)
    other_video = cut_clip(shared_media("video/hill_8s_512.mp4"), tmp_path / "hill.mp4", 2.5)
    dataset = shutil.copytree(small_dataset, tmp_path / "ds")
    meta_before = (dataset / "meta.json").read_text()
    for kwargs, message in [
            (dict(video=other_video, dataset_dir=tmp_path / "new_ds"), r"was trained on lieu_8s.mp4 \(\d+ bytes\), "
                                                                       r"not on .*hill.mp4 \(\d+ bytes\); give another --model"),
            (dict(audio_features="mel"), r"trained on 'whisper' audio features and .* holds \(or is asked for\) 'mel'"),
            (dict(model_dir=dataset / "m"), "must be a folder of its own, outside the dataset folder"),
            (dict(output=small_model / "talk.mp4"), "lies in the model folder"),
            (dict(pose="sideways"), "unknown pose mode 'sideways'"),
            (dict(config={"schedule": {}}), "config must be a TrainConfig"),
            (dict(video=tmp_path), "is a folder; give the path of a video")]:
        arguments = dict(video=short_clip, audio=speech, output=tmp_path / "talk.mp4", dataset_dir=dataset,
                         model_dir=small_model, device="cpu", show_progress=False)
        arguments.update(kwargs)
        with pytest.raises(EgstalkerError, match=message):
            run_pipeline(**arguments)
    assert (dataset / "meta.json").read_text() == meta_before and not (tmp_path / "new_ds").exists()
    # the stages' messages name their own flags; run's are --dataset and --model
    from egstalker.pipeline_run import _in_run_terms

    assert str(_in_run_terms(EgstalkerError("cannot create x; choose a writable -o MODEL_DIR"))) == \
        "cannot create x; choose a writable --model DIR"
    assert not (tmp_path / "talk.mp4").exists() and not (dataset / "m").exists()


def test_torso_backgrounds_are_the_training_composites(small_model, small_dataset):
    """The device-side torso cache composites exactly what the trainer rendered over, and stays within its bound."""
    import torch

    from egstalker.dataset.layout import DatasetLayout
    from egstalker.dataset.reader import load_background, load_torso_composite
    from egstalker.inference import TalkingHead

    head = TalkingHead.from_dir(small_model)
    head._torso_cache_frames = 3
    size = (head.width, head.height)
    layout = DatasetLayout(small_dataset)
    background = load_background(layout, size)
    poses = [0, 5, 5, 9, 2, 0]
    got = head.torso_backgrounds(poses).numpy()
    assert got.shape == (6, head.height, head.width, 3) and len(head._torso_cache) == 3
    for image, p in zip(got, poses):
        expected = load_torso_composite(layout, int(head.poses.frame_ids[p]), size, background)
        np.testing.assert_allclose(image, expected, atol=1e-6)
    black = head.torso_backgrounds([9], torch.zeros(head.height, head.width, 3)).numpy()[0]
    assert black.mean() < got[3].mean()  # transparent torso pixels now show the given background


def test_render_layers_give_the_frames_and_the_heads_coverage(small_model, small_dataset):
    import cv2

    from egstalker.dataset.layout import DatasetLayout
    from egstalker.dataset.reader import head_mask_from_parsing
    from egstalker.inference import TalkingHead

    head = TalkingHead.from_dir(small_model)
    features = np.load(DatasetLayout(small_dataset).audio_features)
    rows, poses = np.array([3, 4, 5]), np.array([0, 7, 7])
    frames, alpha = head.render_layers(features, rows, poses)
    assert alpha.shape == (3, head.height, head.width) and alpha.dtype == np.float32
    assert 0.0 <= alpha.min() and alpha.max() <= 1.0
    np.testing.assert_array_equal(frames, head.render_frames(features, rows, poses))
    # where the head covers nothing, the frame is the pose frame's torso composite
    under = (head.torso_backgrounds(poses).numpy() * 255.0 + 0.5).astype(np.uint8)
    bare = alpha < 1e-4
    assert bare.mean() > 0.2 and np.abs(frames[bare].astype(int) - under[bare]).max() <= 1
    # the coverage is the head: high inside the pose frame's parsed head, low outside it (10 iterations: not 1/0)
    frame_id = int(head.poses.frame_ids[0])
    parsing = cv2.imread(str(DatasetLayout(small_dataset).parsing(frame_id)))[..., ::-1]
    mask = cv2.resize(head_mask_from_parsing(parsing).astype(np.uint8), (head.width, head.height),
                      interpolation=cv2.INTER_NEAREST).astype(bool)
    inside, outside = alpha[0][mask].mean(), alpha[0][~mask].mean()
    assert inside > 0.5 and outside < inside / 3, (inside, outside)
    empty_frames, empty_alpha = head.render_layers(features, [], [])
    assert empty_frames.shape == (0, head.height, head.width, 3) and empty_alpha.shape == (0, head.height, head.width)


def test_a_dataset_made_before_a_preprocessing_fix_is_named(small_model, small_dataset, tmp_path):
    import warnings

    from egstalker.inference import TalkingHead

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        TalkingHead.from_dir(small_model)
    assert not [w for w in caught if "preprocessing task" in str(w.message)]
    old = tmp_path / "old_dataset"
    shutil.copytree(small_dataset, old)
    meta = json.loads((old / "meta.json").read_text())
    del meta["task_revisions"]  # as datasets were written before the torso fix
    (old / "meta.json").write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match=r"task 4 \(parsing\), 6 \(torso\), 9 \(transforms\); `egstalker "
                                         r"preprocess VIDEO -o .* redoes just that"):
        TalkingHead.from_dir(small_model, dataset_dir=old)


def test_a_dataset_of_other_footage_is_refused(small_model, small_dataset, tmp_path):
    """Another video's dataset would put this head on that video's torso and background: refused, also for a
    model written before model.json recorded its footage (by the torso images its pose frames need)."""
    from egstalker.model.folder import check_dataset_matches, dataset_source, read_model_info, read_poses

    info, poses = read_model_info(small_model), read_poses(small_model)
    assert info.dataset_source == dataset_source(small_dataset)
    assert info.dataset_source["n_frames"] > poses.frame_ids.max()
    check_dataset_matches(info, poses, small_dataset)
    other = tmp_path / "other"
    (other / "torso_imgs").mkdir(parents=True)
    meta = json.loads((small_dataset / "meta.json").read_text())
    meta["source_video"] = {"path": "/videos/someone_else.mp4", "bytes": 12345}
    (other / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(EgstalkerError, match=r"made from someone_else.mp4 .* pass the dataset it was trained on"):
        check_dataset_matches(info, poses, other)
    meta["source_video"] = json.loads((small_dataset / "meta.json").read_text())["source_video"]
    meta["width"], meta["height"] = meta["width"] // 2, meta["height"] // 2  # preprocessed again, framed otherwise
    (other / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(EgstalkerError, match=r"preprocessed again with other framing .* another --crop or --max-size"):
        check_dataset_matches(info, poses, other)
    info.dataset_source = None  # an older model: only the pose frames' torso images can tell
    with pytest.raises(EgstalkerError, match=rf"no torso image for frame {poses.frame_ids.max()}"):
        check_dataset_matches(info, poses, other)


def test_an_interrupted_command_says_what_it_left(tmp_path):
    from argparse import Namespace

    from egstalker.cli import interrupted_note

    assert interrupted_note(Namespace(command="render", frames_dir=None)) == "nothing was written"
    assert str(tmp_path) in interrupted_note(Namespace(command="render", frames_dir=str(tmp_path)))
    assert interrupted_note(Namespace(command="eval", report=str(tmp_path))) == "no report or metrics were written"
    model = tmp_path / "model"
    assert "run the same command again" in interrupted_note(Namespace(command="train", output=str(model)))
    # egstalker's own warnings print as one line; other packages' keep Python's format
    import warnings

    from egstalker.cli import _one_line_warnings
    from egstalker.errors import EgstalkerWarning

    fmt = _one_line_warnings("train", warnings.formatwarning)
    assert fmt(EgstalkerWarning("old dataset"), EgstalkerWarning, "x.py", 3) == "egstalker train: warning: old dataset\n"
    assert fmt(UserWarning("torch says"), UserWarning, "x.py", 3).startswith("x.py:3: UserWarning: torch says")
    (model / "checkpoints").mkdir(parents=True)
    (model / "checkpoints" / "step_0000000.pt").write_bytes(b"")
    assert "--resume" in interrupted_note(Namespace(command="train", output=str(model)))


def test_a_dataset_re_encoded_with_other_audio_features_is_named_by_eval_and_resume(small_model, small_dataset,
                                                                                     tmp_path):
    """The dataset's features are what eval and a resumed training read: other features are a one-line error."""
    from egstalker.evaluate.evaluate import heldout_frames
    from egstalker.inference import TalkingHead
    from egstalker.model.folder import read_model_info
    from egstalker.train.config import TrainConfig
    from egstalker.train.trainer import train

    other = shutil.copytree(small_dataset, tmp_path / "dataset")
    meta = json.loads((other / "meta.json").read_text())
    meta["audio_encoder"] = {"name": "oww", "feature_shape": [96]}  # as `--audio-features oww` leaves it
    (other / "meta.json").write_text(json.dumps(meta))
    trained_on = read_model_info(small_model).encoder_name
    message = rf"now holds 'oww' audio features and the model was trained on '{trained_on}'.*--audio-features {trained_on}"
    head = TalkingHead.from_dir(small_model, dataset_dir=other, check_encoder=False)
    with pytest.raises(EgstalkerError, match=message):
        heldout_frames(head)
    model = shutil.copytree(small_model, tmp_path / "model")
    config = TrainConfig()
    config.data.num_workers = 0
    with pytest.raises(EgstalkerError, match=message):
        train(other, model, config, resume=True, show_progress=False)
    # features cut short (a damaged file) would score every held-out frame on the last row's speech
    meta["audio_encoder"] = json.loads((small_dataset / "meta.json").read_text())["audio_encoder"]
    (other / "meta.json").write_text(json.dumps(meta))
    np.save(other / "aud.npy", np.load(other / "aud.npy")[:100])
    with pytest.raises(EgstalkerError, match=r"aud.npy has 100 rows but the val frames read rows up to \d+: it is "
                                             r"damaged or from another clip"):
        heldout_frames(TalkingHead.from_dir(small_model, dataset_dir=other, check_encoder=False))


def test_an_error_raised_while_an_interrupt_unwinds_is_reported_as_the_interrupt(capsys, monkeypatch):
    """SIGTERM to a whole process group kills the DataLoader's workers too, and torch raises a RuntimeError about
    them while the interrupt unwinds: one line and 130, not a traceback."""
    from egstalker.train import cli as train_cli

    def interrupted_training(args):
        try:
            raise KeyboardInterrupt
        finally:
            raise RuntimeError("DataLoader worker (pid 3264) is killed by signal: Terminated.")

    monkeypatch.setattr(train_cli, "run", interrupted_training)
    assert main(["train", "dataset", "-o", "model"]) == 130
    assert capsys.readouterr().err.strip() == "egstalker train: interrupted; nothing was trained yet; run the same command again"

    def failing_training(args):
        raise RuntimeError("a real bug")

    monkeypatch.setattr(train_cli, "run", failing_training)
    with pytest.raises(RuntimeError, match="a real bug"):
        main(["train", "dataset", "-o", "model"])
