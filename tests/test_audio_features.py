"""Audio encoders on real speech: shapes, determinism, streaming == whole clip, local weights, errors."""

from __future__ import annotations

import numpy as np
import pytest

from egstalker.audio import SAMPLES_PER_FRAME, frames_for_samples, get_encoder
from egstalker.errors import EgstalkerError
from tests.conftest import real_speech


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    """6 s of real 16 kHz mono speech, not a whole number of frames on purpose."""
    return real_speech(6 * 16000 + 123)


def _stream(encoder, wav: np.ndarray, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    stream, parts, i = encoder.encode_stream(), [], 0
    while i < len(wav):
        k = int(rng.integers(50, 9000))
        parts.append(stream.push(wav[i:i + k]))
        i += k
    parts.append(stream.flush())
    return np.concatenate(parts)


def test_frame_count_rounds_to_nearest():
    assert frames_for_samples(16000) == 25
    assert frames_for_samples(16000 + 319) == 25
    assert frames_for_samples(16000 + 320) == 26
    assert get_encoder("mel").encode(np.zeros(16000 + 320, np.float32)).shape == (26, 4, 80)


@pytest.mark.parametrize("name, shape", [("oww", (96,)), ("mel", (4, 80))])
def test_exact_encoders(speech, name, shape):
    encoder = get_encoder(name)
    feats = encoder.encode(speech)
    n = frames_for_samples(len(speech))
    assert feats.shape == (n, *shape) and feats.dtype == np.float32 and np.isfinite(feats).all()
    assert encoder.fps == 25 and encoder.lookahead_seconds >= 0 and encoder.describe()["name"] == name
    np.testing.assert_array_equal(feats, encoder.encode(speech))  # deterministic
    # features follow the audio: speech frames vary over time and differ from silence
    assert feats.reshape(n, -1).std(axis=0).mean() > 0.05
    silent = encoder.encode(np.zeros_like(speech))
    assert np.abs(silent - feats).mean() > 0.1
    # streamed in random chunks == whole clip
    np.testing.assert_allclose(_stream(encoder, speech), feats, atol=1e-4)
    # a frame depends only on its window: the prefix of a clip gives the same early frames
    lookahead_frames = int(np.ceil(encoder.lookahead_seconds * 25)) + 1
    prefix = encoder.encode(speech[: 50 * SAMPLES_PER_FRAME])
    np.testing.assert_allclose(prefix[: 50 - lookahead_frames], feats[: 50 - lookahead_frames], atol=1e-4)


def test_oww_ignores_loudness_elsewhere(speech):
    """The shipped mel model clamps at (input max - 80 dB); we removed that, so a loud burst 3 s later does
    not change a quiet frame's feature."""
    encoder = get_encoder("oww")
    quiet = speech[:4 * 16000] * 0.001
    loud = quiet.copy()
    loud[3 * 16000:] = np.sign(speech[3 * 16000:4 * 16000])  # full-scale square-ish noise
    a, b = encoder.encode(quiet), encoder.encode(loud)
    np.testing.assert_allclose(a[:40], b[:40], atol=1e-4)
    assert np.abs(a[-10:] - b[-10:]).max() > 1.0


def _tiny_model(kind: str, folder):
    import torch
    import transformers

    torch.manual_seed(0)
    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                  conv_dim=(16,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2)
    if kind == "wav2vec2":
        transformers.Wav2Vec2Model(transformers.Wav2Vec2Config(**common)).save_pretrained(folder)
    else:
        transformers.HubertModel(transformers.HubertConfig(**common)).save_pretrained(folder)


@pytest.mark.parametrize("kind", ["wav2vec2", "hubert"])
def test_transformer_encoder_from_local_folder(speech, tmp_path, kind):
    _tiny_model(kind, tmp_path / kind)
    encoder = get_encoder(kind, tmp_path / kind)
    feats = encoder.encode(speech)
    assert feats.shape == (frames_for_samples(len(speech)), 32) and np.isfinite(feats).all()
    np.testing.assert_array_equal(feats, get_encoder(kind, tmp_path / kind).encode(speech))
    assert encoder.describe()["feature_shape"] == [32] and not encoder.exact_streaming
    # streaming is approximate (attention and GroupNorm see the window), but close
    streamed = _stream(encoder, speech)
    relative = np.linalg.norm(streamed - feats) / np.linalg.norm(feats)
    assert streamed.shape == feats.shape and relative < 0.3, relative


def test_transformer_encoder_missing_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_cache" / "hub"))
    with pytest.raises(EgstalkerError, match="huggingface-cli download facebook/wav2vec2-base"):
        get_encoder("wav2vec2", tmp_path / "no_such_folder")
    with pytest.raises(EgstalkerError, match=r"hubert weights .*not found.*--audio-weights"):
        get_encoder("hubert")
    (tmp_path / "not_a_model").mkdir()
    with pytest.raises(EgstalkerError, match="not found in folder"):
        get_encoder("wav2vec2", tmp_path / "not_a_model")


def test_deepspeech_import(tmp_path, speech):
    n = frames_for_samples(len(speech))
    logits = np.random.default_rng(0).standard_normal((n - 2, 16, 29)).astype(np.float64)
    np.save(tmp_path / "aud_ds.npy", logits)
    encoder = get_encoder("deepspeech", tmp_path / "aud_ds.npy")
    feats = encoder.encode(speech)
    assert feats.shape == (n, 16, 29) and feats.dtype == np.float32
    np.testing.assert_allclose(feats[: n - 2], logits, rtol=1e-6)
    np.testing.assert_array_equal(feats[-1], feats[n - 3])  # padded by repeating the last row
    assert encoder.describe()["import"]["padded_frames"] == 2
    assert encoder.encode(speech[: (n - 4) * 640]).shape == (n - 4, 16, 29)  # cut
    # another clip's features (or another frame rate's) are refused, not cut or padded to fit
    with pytest.raises(EgstalkerError, match=rf"holds {n - 2} frames of features for this clip's 10 frames"):
        encoder.encode(speech[: 10 * 640])
    np.save(tmp_path / "bad.npy", np.zeros((n, 768), np.float32))
    with pytest.raises(EgstalkerError, match=r"expected \[N, 16, 29\]"):
        get_encoder("deepspeech", tmp_path / "bad.npy")
    with pytest.raises(EgstalkerError, match="--audio-weights"):
        get_encoder("deepspeech")
    with pytest.raises(EgstalkerError, match="cannot be computed from live audio"):
        encoder.encode_stream()


def test_unknown_encoder():
    with pytest.raises(EgstalkerError, match="unknown audio encoder 'whisperx'"):
        get_encoder("whisperx")
