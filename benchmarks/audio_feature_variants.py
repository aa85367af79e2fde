"""Can other offline audio features, or more footage, lift the audio -> mouth ceiling? Ridge fits on a CPU.

`audio_mouth_ceiling.py` showed that English phone labels raise what a frame's audio window says about its mouth
on lieu (mel 0.60 -> mel_phones 0.68, cross-validated). This script tries what else can be had without weights
from the user, with the same ridge fit (window 8, 3 future rows unless stated) scored two ways: 5-fold contiguous
cross-validation over the whole clip, and the held-out last 1/11 (the benchmark's split):

- `+formants`: F1-F3 and their bandwidths and the frame energy from a 16th-order LPC per 10 ms (F1 follows
  jaw opening in phonetics);
- `+articulatory`: the phone shares mapped to six articulatory traits (jaw opening, rounding, lip closure,
  lip-teeth contact, spreading, tongue between the teeth);
- `+allphone`: a second phone track from pocketsphinx's phone-loop decoder (no words; its own language model
  of phone sequences, shipped in the wheel), beside the word-aligned one;
- windows of 4 to 16 rows with more or fewer future rows;
- a learning curve: the held-out fit from 25/50/75/100% of the training frames (contiguous stretches; below
  100%, four of them spread over the clip, averaged), to see what a longer recording would give.

    python benchmarks/audio_feature_variants.py /tmp/ds/lieu /tmp/ds/obama
        --json benchmarks/results/audio_feature_variants.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from audio_mouth_ceiling import corr, fit_ridge, mouth_openings, windows, write_json  # noqa: E402

ARTICULATORY = {  # jaw opening 0-3, rounding 0-2, lips closed, lip-teeth, spreading 0-2, tongue-teeth
    "AA": (3, 0, 0, 0, 0, 0), "AE": (3, 0, 0, 0, 1, 0), "AH": (2, 0, 0, 0, 0, 0), "AO": (3, 1, 0, 0, 0, 0),
    "AW": (3, 1, 0, 0, 0, 0), "AY": (3, 0, 0, 0, 1, 0), "EH": (2, 0, 0, 0, 1, 0), "ER": (1, 1, 0, 0, 0, 0),
    "EY": (2, 0, 0, 0, 1, 0), "IH": (1, 0, 0, 0, 1, 0), "IY": (1, 0, 0, 0, 2, 0), "OW": (2, 2, 0, 0, 0, 0),
    "OY": (2, 2, 0, 0, 0, 0), "UH": (1, 1, 0, 0, 0, 0), "UW": (1, 2, 0, 0, 0, 0), "B": (0, 0, 1, 0, 0, 0),
    "P": (0, 0, 1, 0, 0, 0), "M": (0, 0, 1, 0, 0, 0), "F": (0, 0, 0, 1, 0, 0), "V": (0, 0, 0, 1, 0, 0),
    "W": (1, 2, 0, 0, 0, 0), "SH": (1, 1, 0, 0, 0, 0), "ZH": (1, 1, 0, 0, 0, 0), "CH": (1, 1, 0, 0, 0, 0),
    "JH": (1, 1, 0, 0, 0, 0), "TH": (1, 0, 0, 0, 0, 1), "DH": (1, 0, 0, 0, 0, 1), "R": (1, 1, 0, 0, 0, 0),
}
"""Other consonants: jaw slightly open (1); silence: all zero."""


def lpc_formants(wav: np.ndarray, n_frames: int, order: int = 16, rate: int = 16000) -> np.ndarray:
    """[n_frames, 4 * 7]: per 10 ms, F1-F3 (Hz), their bandwidths (Hz) and the energy (dB), 4 steps per frame."""
    from scipy.signal import lfilter

    x = lfilter([1.0, -0.63], [1.0], wav.astype(np.float64))
    hop, size = 160, 400
    window = np.hamming(size)
    padded = np.concatenate([np.zeros(size // 2), x, np.zeros(size)])
    out = np.zeros((n_frames * 4, 7))
    for s in range(n_frames * 4):
        seg = padded[s * hop:s * hop + size] * window
        energy = float(np.sum(seg ** 2))
        if energy < 1e-8:
            out[s, 6] = -80.0
            continue
        r = np.correlate(seg, seg, "full")[size - 1:size + order]
        a, err = np.zeros(order + 1), r[0]  # Levinson-Durbin
        a[0] = 1.0
        for i in range(1, order + 1):
            k = -(r[i] + np.dot(a[1:i], r[i - 1:0:-1])) / err
            a[1:i + 1] = a[1:i + 1] + k * a[i - 1::-1][:i]
            err *= 1.0 - k * k
        roots = np.roots(a)
        roots = roots[np.imag(roots) > 0.01]
        freq = np.angle(roots) * rate / (2 * np.pi)
        bandwidth = -np.log(np.abs(roots)) * rate / np.pi
        keep = (freq > 90) & (bandwidth < 500)
        order_ = np.argsort(freq[keep])
        f, b = freq[keep][order_][:3], bandwidth[keep][order_][:3]
        out[s, :len(f)], out[s, 3:3 + len(b)] = f, b
        out[s, 6] = 10 * np.log10(energy / size + 1e-12)
    return out.reshape(n_frames, 28).astype(np.float32)


def allphone_shares(wav: np.ndarray, n_frames: int) -> np.ndarray:
    """[n_frames, 40] phone shares from pocketsphinx's phone-loop decoder, 20 s at a time."""
    import pocketsphinx
    from pocketsphinx import Decoder

    from egstalker.audio.phones import PHONES

    model = os.path.join(os.path.dirname(pocketsphinx.__file__), "model", "en-us")
    decoder = Decoder(samprate=16000, loglevel="FATAL", allphone=os.path.join(model, "en-us-phone.lm.bin"),
                      lm=None, lw=2.0, beam=1e-20, pbeam=1e-20)
    labels = np.zeros(n_frames * 4, np.int64)
    index = {p: i for i, p in enumerate(PHONES)}
    for start in range(0, len(wav), 16000 * 20):
        piece = wav[start:start + 16000 * 20]
        decoder.start_utt()
        decoder.process_raw((np.clip(piece, -1, 1) * 32767).astype(np.int16).tobytes(), full_utt=True)
        decoder.end_utt()
        for seg in decoder.seg():
            a = seg.start_frame + start // 160
            labels[a:min(seg.end_frame + 1 + start // 160, len(labels))] = index.get(seg.word, 0)
    shares = np.zeros((n_frames, len(PHONES)), np.float32)
    np.add.at(shares, (np.arange(len(labels)) // 4, labels), 0.25)
    return shares


def articulatory(shares: np.ndarray) -> np.ndarray:
    from egstalker.audio.phones import PHONES

    table = np.array([ARTICULATORY.get(p, (0,) * 6 if p == "SIL" else (1, 0, 0, 0, 0, 0)) for p in PHONES],
                     np.float32)
    return shares @ table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("datasets", nargs="+", type=Path)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    import soundfile as sf

    from egstalker.audio.mel import MelEncoder
    from egstalker.audio.phones import MelPhonesEncoder
    from egstalker.dataset.reader import open_dataset
    from egstalker.preprocess.av_sync import ridge_cv_scores

    results = {"command": " ".join(sys.argv), "fit": "ridge, alpha = input dims", "clips": {}}
    for ds in args.datasets:
        t0 = time.perf_counter()
        wav, rate = sf.read(str(ds / "aud.wav"), dtype="float32")
        assert rate == 16000
        n = len(wav) // 640
        mel = MelEncoder().encode(wav).reshape(n, -1)[:n]
        phones = MelPhonesEncoder().phone_fractions(wav, n)
        feats = {"mel": mel, "phones": phones, "formants": lpc_formants(wav, n), "allphone": allphone_shares(wav, n),
                 "articulatory": articulatory(phones)}
        print(ds.name, f"features in {time.perf_counter() - t0:.0f} s", flush=True)
        train, val = open_dataset(ds, "train"), open_dataset(ds, "val")
        y_train, y_val = mouth_openings(train), mouth_openings(val)
        ids, y = np.concatenate([train.audio_ids, val.audio_ids]), np.concatenate([y_train, y_val])
        variants = {"mel": ["mel"], "mel_phones": ["mel", "phones"], "mel_phones+formants": ["mel", "phones", "formants"],
                    "mel_phones+articulatory": ["mel", "phones", "articulatory"],
                    "mel_phones+allphone": ["mel", "phones", "allphone"], "mel+allphone": ["mel", "allphone"],
                    "formants": ["formants"]}
        shapes = [(8, 3)] + [(w, f) for w, f in ((4, 1), (4, 2), (8, 5), (12, 4), (12, 6), (16, 6), (16, 8))]
        rows = []

        def score(name, parts, window, future):
            x = np.hstack([windows(feats[p], ids, window, future) for p in parts])
            xa = np.hstack([windows(feats[p], train.audio_ids, window, future) for p in parts])
            xb = np.hstack([windows(feats[p], val.audio_ids, window, future) for p in parts])
            row = {"features": name, "window": window, "future_rows": future,
                   "cv_corr": round(float(np.mean(ridge_cv_scores(x, y, 5, gap=window))), 3),
                   "heldout_corr": round(corr(fit_ridge(xa, y_train, xb, alpha=float(xa.shape[1])), y_val), 3)}
            rows.append(row)
            print(ds.name, json.dumps(row), flush=True)

        for name, parts in variants.items():
            score(name, parts, 8, 3)
        for window, future in shapes[1:]:
            score("mel_phones", ["mel", "phones"], window, future)
        curve = []
        for name, parts in (("mel", ["mel"]), ("mel_phones", ["mel", "phones"])):
            xa = np.hstack([windows(feats[p], train.audio_ids, 8, 3) for p in parts])
            xb = np.hstack([windows(feats[p], val.audio_ids, 8, 3) for p in parts])
            for fraction in (0.25, 0.5, 0.75, 1.0):
                k = int(len(y_train) * fraction)
                starts = np.linspace(0, len(y_train) - k, 4 if fraction < 1 else 1).astype(int)
                scores = [corr(fit_ridge(xa[s:s + k], y_train[s:s + k], xb, alpha=float(xa.shape[1])), y_val)
                          for s in starts]
                point = {"features": name, "train_seconds": round(k / 25.0, 1),
                         "heldout_corr": round(float(np.mean(scores)), 3)}
                curve.append(point)
                print(ds.name, "learning curve", json.dumps(point), flush=True)
        results["clips"][ds.name] = {"train_frames": len(train), "val_frames": len(val), "rows": rows,
                                     "learning_curve": curve}
    if args.json:
        write_json(args.json, results)


if __name__ == "__main__":
    main()
