"""The `mel_phones` encoder on real speech: phone labels from pocketsphinx, what they add to lip sync, streaming,
preprocessing with it, and its missing-package error."""

from __future__ import annotations

import itertools
import json
import shutil
import sys

import numpy as np
import pytest

from conftest import real_speech, shared_media
from egstalker.audio import frames_for_samples, get_encoder
from egstalker.audio.base import window_offsets
from egstalker.audio.phones import PHONES
from egstalker.cli import main
from egstalker.errors import EgstalkerError

MEL_DIMS = 320


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    """8 s of real English speech, 16 kHz mono, not a whole number of frames."""
    return real_speech(8 * 16000 + 77)


@pytest.fixture(scope="module")
def encoder():
    return get_encoder("mel_phones")


def test_features_are_mel_and_phone_shares(speech, encoder):
    feats = encoder.encode(speech)
    n = frames_for_samples(len(speech))
    assert feats.shape == (n, MEL_DIMS + len(PHONES)) and feats.dtype == np.float32
    # the mel part is the mel encoder's, flattened
    np.testing.assert_allclose(feats[:, :MEL_DIMS], get_encoder("mel").encode(speech).reshape(n, -1), atol=1e-6)
    phones = feats[:, MEL_DIMS:]
    np.testing.assert_allclose(phones.sum(1), 1.0, atol=1e-5)  # shares of each 40 ms slot
    assert set(np.unique(phones)) <= {0.0, 0.25, 0.5, 0.75, 1.0}
    # speech is mostly phones, of many kinds: vowels, stops, fricatives
    assert phones[:, 0].mean() < 0.4
    spoken = {PHONES[k] for k in np.flatnonzero(phones.sum(0) > 0)}
    assert len(spoken) >= 20 and {"AH", "T", "S"} <= spoken
    np.testing.assert_array_equal(encoder.encode(speech), feats)  # deterministic
    assert encoder.describe()["recogniser"] == "pocketsphinx en-us"


def test_silence_is_silence_and_quiet_speech_keeps_its_phones(speech, encoder):
    phones = encoder.encode(np.zeros(3 * 16000, np.float32))[:, MEL_DIMS:]
    assert phones.shape == (75, len(PHONES)) and (phones[:, 0] == 1).all()
    assert encoder.encode(np.zeros(0, np.float32)).shape == (0, MEL_DIMS + len(PHONES))
    assert encoder.encode(np.zeros(100, np.float32)).shape == (0, MEL_DIMS + len(PHONES))
    # a recording 26 dB quieter: the silence rule is relative to the speech, so the phones stay
    loud = encoder.encode(speech)[:, MEL_DIMS:].argmax(1)
    quiet = encoder.encode(speech * 0.05)[:, MEL_DIMS:].argmax(1)
    assert (quiet == loud).mean() > 0.9


def test_streamed_features_agree_with_the_whole_clip(speech, encoder):
    whole = encoder.encode(speech)
    stream, parts = encoder.encode_stream(), []
    for start in range(0, len(speech), 24000):  # 1.5 s chunks
        parts.append(stream.push(speech[start:start + 24000]))
    parts.append(stream.flush())
    streamed = np.concatenate(parts)
    assert streamed.shape == whole.shape
    np.testing.assert_allclose(streamed[:, :MEL_DIMS], whole[:, :MEL_DIMS], atol=1e-4)
    # the recogniser sees other stretches of speech, so a few labels differ near the pieces' ends
    agree = (streamed[:, MEL_DIMS:].argmax(1) == whole[:, MEL_DIMS:].argmax(1)).mean()
    assert agree > 0.75


def test_phones_predict_the_mouth_better_than_mel(encoder):
    """Cross-validated linear fit from the model's audio window to lieu's mouth opening (20 s): the phone labels
    add what the spectrum leaves implicit, in every fold."""
    from egstalker.media import iter_frames, read_audio
    from egstalker.metrics import detect_landmarks, mouth_opening
    from egstalker.preprocess.av_sync import ridge_cv_scores

    seconds = 20
    video = shared_media("video/lieu_60s_256.mp4")
    frames = (f.image for f in itertools.islice(iter_frames(video), seconds * 25))
    opening = mouth_opening(detect_landmarks(frames)).astype(np.float64)
    wav = read_audio(video, rate=16000)[: seconds * 16000]
    rows = np.clip(np.arange(len(opening))[:, None] + window_offsets(8, 3)[None], 0, seconds * 25 - 1)
    scores = {}
    for name, enc in (("mel", get_encoder("mel")), ("mel_phones", encoder)):
        feats = enc.encode(wav).reshape(seconds * 25, -1)
        scores[name] = np.array(ridge_cv_scores(feats[rows].reshape(len(opening), -1), opening, 5, gap=8))
    assert scores["mel"].mean() > 0.5  # the fit is meaningful to begin with
    assert (scores["mel_phones"] > scores["mel"]).all()
    assert scores["mel_phones"].mean() > scores["mel"].mean() + 0.02


@pytest.fixture(scope="module")
def phones_dataset(small_dataset, short_clip, tmp_path_factory):
    """The small dataset, its features (task 2) redone with mel_phones by a plain re-run."""
    dataset = tmp_path_factory.mktemp("phones") / "ds"
    shutil.copytree(small_dataset, dataset)
    assert main(["preprocess", str(short_clip), "-o", str(dataset), "--audio-features", "mel_phones",
                 "--quiet"]) == 0
    return dataset


def test_preprocess_with_mel_phones_redoes_the_audio_split(phones_dataset):
    dataset = phones_dataset
    meta = json.loads((dataset / "meta.json").read_text())
    assert meta["audio_encoder"]["name"] == "mel_phones"
    assert meta["audio_encoder"]["feature_shape"] == [MEL_DIMS + len(PHONES)]
    feats = np.load(dataset / "aud.npy")
    assert feats.shape == (meta["n_frames"], MEL_DIMS + len(PHONES))
    # task 9's copies of the split's rows follow the new features
    train_ids = [f["aud_id"] for f in json.loads((dataset / "transforms_train.json").read_text())["frames"]]
    np.testing.assert_array_equal(np.load(dataset / "aud_train.npy"), feats[train_ids])


def test_a_mel_phones_model_renders_new_speech(phones_dataset, tmp_path):
    """The user's path: train on the mel_phones dataset, render new speech (encoded with pocketsphinx here)."""
    import av

    from fixtures_models import SMALL_MODEL_GAUSSIANS, write_speech
    from egstalker.train.config import TrainConfig
    from egstalker.train.trainer import train

    config = TrainConfig()
    config.schedule.iterations, config.schedule.eval_every = 4, 0
    config.data.resolution, config.data.num_workers, config.data.batch_size = 64, 0, 2
    config.init.surface_points, config.init.volume_points = SMALL_MODEL_GAUSSIANS
    config.init.n_frames, config.loss.perceptual = 3, 0.0
    model = tmp_path / "model"
    train(phones_dataset, model, config, device="cpu", show_progress=False)
    assert "mel_phones" in (model / "model.json").read_text()
    speech, out = write_speech(tmp_path / "speech.wav", 3.0, rate=16000), tmp_path / "talk.mp4"
    assert main(["render", str(model), "--audio", str(speech), "-o", str(out), "--device", "cpu"]) == 0
    with av.open(str(out)) as container:
        assert sum(1 for _ in container.decode(video=0)) == 75


def test_run_with_mel_phones_refuses_a_model_trained_on_whisper(small_dataset, small_model, short_clip, tmp_path,
                                                             capsys):
    """`egstalker run --audio-features mel_phones` will not reuse a whisper model, and says so before it
    re-features the dataset (which broke the command that had worked)."""
    from fixtures_models import write_speech

    dataset = tmp_path / "ds"
    shutil.copytree(small_dataset, dataset)
    weights = (small_model / "model.pt").stat().st_mtime_ns
    speech = write_speech(tmp_path / "speech.wav", 1.0)
    assert main(["run", str(short_clip), "--audio", str(speech), "-o", str(tmp_path / "out.mp4"), "--dataset",
                 str(dataset), "--model", str(small_model), "--audio-features", "mel_phones", "--device", "cpu",
                 "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "trained on 'whisper' audio features" in err and "'mel_phones'" in err and "\n" not in err
    assert json.loads((dataset / "meta.json").read_text())["audio_encoder"]["name"] == "whisper"
    assert (small_model / "model.pt").stat().st_mtime_ns == weights and not (tmp_path / "out.mp4").exists()


def test_a_task_whose_input_was_redone_runs_again(small_dataset, short_clip, tmp_path):
    """Task 2 alone with other features leaves task 9's split stale; the next plain run redoes task 9 (and only
    the tasks that read what changed). A dataset from before the bookkeeping is taken as current."""
    from egstalker.dataset.layout import DatasetLayout
    from egstalker.preprocess.pipeline import _inputs_redone, read_meta

    dataset = tmp_path / "ds"
    shutil.copytree(small_dataset, dataset)
    layout = DatasetLayout(dataset)
    assert not any(_inputs_redone(n, read_meta(layout)) for n in range(1, 10))
    legacy = {k: v for k, v in read_meta(layout).items() if k not in ("task_runs", "task_inputs")}
    assert not any(_inputs_redone(n, legacy) for n in range(1, 10))
    assert main(["preprocess", str(short_clip), "-o", str(dataset), "--task", "2", "--audio-features",
                 "mel_phones", "--quiet"]) == 0
    meta = read_meta(layout)
    assert [n for n in range(1, 10) if _inputs_redone(n, meta)] == [9]
    assert np.load(dataset / "aud_train.npy").shape[1:] == (512,)  # whisper's: stale until task 9 runs again
    assert main(["preprocess", str(short_clip), "-o", str(dataset), "--quiet"]) == 0
    meta = read_meta(layout)
    assert not any(_inputs_redone(n, meta) for n in range(1, 10))
    train_ids = [f["aud_id"] for f in json.loads((dataset / "transforms_train.json").read_text())["frames"]]
    np.testing.assert_array_equal(np.load(dataset / "aud_train.npy"), np.load(dataset / "aud.npy")[train_ids])


def test_missing_pocketsphinx_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "pocketsphinx", None)
    with pytest.raises(EgstalkerError, match="pip install pocketsphinx"):
        get_encoder("mel_phones")


def test_a_failed_alignment_leaves_that_stretch_without_phones(speech, monkeypatch):
    """pocketsphinx's aligner can fail to stop ("Failed to stop utterance processing"); that must not stop a clip
    or a live session: the stretch gets silence labels and its mel rows as usual."""
    encoder = get_encoder("mel_phones")

    class FailingAligner:
        def __init__(self, **kwargs):
            pass

        def set_align_text(self, words):
            pass

        def set_alignment(self):
            pass

        def start_utt(self):
            pass

        def process_raw(self, pcm, full_utt=False):
            pass

        def end_utt(self):
            raise RuntimeError("Failed to stop utterance processing")

    monkeypatch.setattr(encoder, "_decoder", FailingAligner)
    feats = encoder.encode(speech[:3 * 16000])
    assert feats.shape == (75, MEL_DIMS + len(PHONES))
    assert (feats[:, MEL_DIMS] == 1).all()  # every slot is "silence"
    np.testing.assert_allclose(feats[:, :MEL_DIMS], get_encoder("mel").encode(speech[:3 * 16000]).reshape(75, -1),
                               atol=1e-6)
