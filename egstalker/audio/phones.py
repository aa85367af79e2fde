"""`mel_phones`: the `mel` spectra plus which English phone is being spoken, from pocketsphinx, no download.

A mel window describes the sound, not the mouth shape that made it; on lieu a fit from it to the mouth opening
tops out near 0.55 on held-out frames. Phone labels carry what the spectrum leaves implicit (a /b/ closes the lips,
an /aa/ opens the jaw) and are the same for every speaker. pocketsphinx (BSD licence) ships an English acoustic
model, dictionary and language model in its wheel, so this needs no weights from the user:

1. recognise the words of a stretch of speech with the language model;
2. force-align those words to the audio, down to phones (10 ms frames);
3. give each 25 fps frame the fraction of its 40 ms slot that each of the 39 phones and silence takes.

Feature per frame: [4 * 80 + 40] = the frame's four mel rows, flattened, then the 40 phone fractions. The
recogniser needs words on both sides of a phone, so a stretch is decoded with `CONTEXT_SECONDS` before and
`LOOKAHEAD_SECONDS` after it, in pieces of `PIECE_FRAMES` (bounded memory on long clips). Streamed features
therefore match whole-clip ones closely, not exactly (`exact_streaming` False), and a live server holds a frame
back by the look-ahead: this is the encoder for offline rendering and the best lip sync on English speech; `mel`
stays the one for low-latency serving and for other languages (the phones of non-English speech are guesses).
"""

from __future__ import annotations

import numpy as np

from egstalker.audio.base import SAMPLE_RATE, SAMPLES_PER_FRAME, AudioEncoder
from egstalker.audio.mel import MELS_PER_FRAME, N_MELS, MelEncoder
from egstalker.errors import EgstalkerError

PHONES = ("SIL", "AA", "AE", "AH", "AO", "AW", "AY", "B", "CH", "D", "DH", "EH", "ER", "EY", "F", "G", "HH",
          "IH", "IY", "JH", "K", "L", "M", "N", "NG", "OW", "OY", "P", "R", "S", "SH", "T", "TH", "UH", "UW", "V",
          "W", "Y", "Z", "ZH")
"""The CMU dictionary's 39 phones and silence; noise and filler labels count as silence."""
PHONE_HOP = 160  # pocketsphinx frames: 10 ms
PHONES_PER_FRAME = SAMPLES_PER_FRAME // PHONE_HOP
CONTEXT_SECONDS = 2.0
LOOKAHEAD_SECONDS = 1.0
PIECE_FRAMES = 500  # 20 s decoded at a time, plus context and look-ahead
DIGITAL_SILENCE_DBFS = -90.0
QUIET_BELOW_LOUD_DB = 60.0
"""10 ms steps under -90 dBFS, or 60 dB under the loud steps (95th percentile) of the decoded stretch, are silence
whatever the recogniser says: on digital silence it hears words. Relative, so a quiet recording keeps its phones."""


def _decoder_class():
    try:
        from pocketsphinx import Decoder
    except ImportError:
        raise EgstalkerError("the 'mel_phones' audio encoder needs pocketsphinx: pip install pocketsphinx") from None
    return Decoder


class MelPhonesEncoder(AudioEncoder):
    name = "mel_phones"
    feature_shape = (MELS_PER_FRAME * N_MELS + len(PHONES),)
    context_seconds = CONTEXT_SECONDS
    lookahead_seconds = LOOKAHEAD_SECONDS
    exact_streaming = False

    def __init__(self):
        self._mel = MelEncoder()
        self._decoder = _decoder_class()
        self._recogniser = self._decoder(samprate=SAMPLE_RATE, loglevel="FATAL")

    def describe(self) -> dict:
        return {**super().describe(), "phones": list(PHONES), "recogniser": "pocketsphinx en-us"}

    def _encode(self, wav: np.ndarray, n_frames: int) -> np.ndarray:
        mel = self._mel._encode(wav, n_frames).reshape(n_frames, MELS_PER_FRAME * N_MELS)
        return np.hstack([mel, self.phone_fractions(wav, n_frames)])

    def phone_fractions(self, wav: np.ndarray, n_frames: int) -> np.ndarray:
        """[n_frames, 40]: the share of each frame's 40 ms slot taken by each of `PHONES`."""
        out = np.zeros((n_frames, len(PHONES)), np.float32)
        context = round(CONTEXT_SECONDS * SAMPLE_RATE) // PHONE_HOP * PHONE_HOP
        lookahead = round(LOOKAHEAD_SECONDS * SAMPLE_RATE)
        for first in range(0, n_frames, PIECE_FRAMES):
            last = min(n_frames, first + PIECE_FRAMES)
            start = max(0, first * SAMPLES_PER_FRAME - context)
            end = min(len(wav), last * SAMPLES_PER_FRAME + lookahead)
            labels = self._phone_labels(wav[start:end])  # one per 10 ms from `start`
            steps = np.arange(first * PHONES_PER_FRAME, last * PHONES_PER_FRAME) - start // PHONE_HOP
            known = steps < len(labels)  # steps past the audio's end get no label
            rows = first + np.flatnonzero(known) // PHONES_PER_FRAME
            np.add.at(out, (rows, labels[steps[known]]), 1.0 / PHONES_PER_FRAME)
            if self.on_progress is not None:
                self.on_progress(last - first)
        # 10 ms steps no label covers (the clip's end, a recogniser gap) count as silence
        out[:, 0] += 1.0 - out.sum(1)
        return out

    def _phone_labels(self, wav: np.ndarray) -> np.ndarray:
        """Index into PHONES per 10 ms frame of `wav` (silence where nothing was recognised)."""
        pcm = (np.clip(wav, -1.0, 1.0) * 32767.0).astype(np.int16).tobytes()
        labels = np.zeros(len(wav) // PHONE_HOP, np.int64)
        steps = wav[:len(labels) * PHONE_HOP].reshape(len(labels), PHONE_HOP).astype(np.float64)
        level = 10.0 * np.log10(np.mean(steps ** 2, axis=1) + 1e-12)
        quiet = (level < DIGITAL_SILENCE_DBFS) | (level < np.percentile(level, 95) - QUIET_BELOW_LOUD_DB) \
            if len(level) else np.zeros(0, bool)
        if quiet.all():
            return labels
        recogniser = self._recogniser
        recogniser.start_utt()
        recogniser.process_raw(pcm, full_utt=True)
        recogniser.end_utt()
        hypothesis = recogniser.hyp()
        words = hypothesis.hypstr.strip() if hypothesis is not None else ""
        if not words:
            return labels
        # words first, then phones within them: pocketsphinx's two-pass forced alignment. A new aligner each
        # time (0.1 s, no language model): a reused one keeps state, and the same audio would align differently.
        aligner = self._decoder(samprate=SAMPLE_RATE, loglevel="FATAL", bestpath=False, lm=None)
        try:
            aligner.set_align_text(words)
            for phone_pass in (False, True):
                if phone_pass:
                    aligner.set_alignment()
                aligner.start_utt()
                aligner.process_raw(pcm, full_utt=True)
                aligner.end_utt()
            alignment = aligner.get_alignment()
        except RuntimeError:
            # the aligner found no path through the words (seen once, on a stream's piece of speech): this
            # stretch goes without phone labels rather than stopping the clip or the live session
            alignment = None
        if alignment is None:
            return labels
        index = {p: i for i, p in enumerate(PHONES)}
        for word in alignment:
            for phone in word:
                labels[phone.start:phone.start + phone.duration] = index.get(phone.name, 0)
        labels[quiet] = 0
        return labels
