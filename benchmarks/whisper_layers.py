"""Which block of Whisper base's encoder says most about the mouth? A linear fit per block, on a CPU.

For each block k of the encoder (1-6), the `whisper` encoder's features taken after block k (the packaged block
encoding: 200 ms blocks, 2.4 s windows) are windowed as the model reads them (8 rows, 3 ahead) and a ridge fit
(alpha = input dims) to the tracked mouth opening is scored cross-validated over every frame (5 contiguous folds)
and on the held-out split, beside `mel` and `mel_phones`. The default encoder uses block 3 (the middle).

    python benchmarks/whisper_layers.py /tmp/ds/lieu /tmp/ds/obama --json benchmarks/results/whisper_layers.json

With --variants, cheap variants of the block-3 features are scored instead, by the same fit and folds (the
training gap around each fold is the window's length): blocks concatenated (2+3, 3+4, 2+3+4) or averaged
(2, 3, 4), block 3 beside `mel`'s features, and block 3 in wider windows (12 rows 5 ahead, 8 rows 5 ahead).
Each block is encoded once per clip and reused.

    python benchmarks/whisper_layers.py /tmp/ds/lieu /tmp/ds/obama --variants \
        --json benchmarks/results/whisper_layer_variants.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

VARIANTS = [  # name, whisper blocks, how they are joined, with mel's features, window rows, rows ahead
    ("whisper block 3", (3,), "concat", False, 8, 3),
    ("whisper blocks 2+3", (2, 3), "concat", False, 8, 3),
    ("whisper blocks 3+4", (3, 4), "concat", False, 8, 3),
    ("whisper blocks 2+3+4", (2, 3, 4), "concat", False, 8, 3),
    ("whisper mean of blocks 2,3,4", (2, 3, 4), "mean", False, 8, 3),
    ("whisper block 3 + mel", (3,), "concat", True, 8, 3),
    ("whisper block 3, 12 rows 5 ahead", (3,), "concat", False, 12, 5),
    ("whisper block 3, 8 rows 5 ahead", (3,), "concat", False, 8, 5),
]


def score(feats, ids, y, train, y_train, val, y_val, size: int = 8, future: int = 3) -> dict:
    """cv_corr (5 contiguous folds, `size` frames of gap) and heldout_corr of the ridge fit from a frame's window
    (`size` rows, `future` ahead) of `feats` to its mouth opening."""
    from audio_mouth_ceiling import corr, fit_ridge, windows

    from egstalker.preprocess.av_sync import ridge_cv_scores

    feats = feats.reshape(len(feats), -1)
    x, xa, xb = (windows(feats, i, size, future) for i in (ids, train.audio_ids, val.audio_ids))
    return {"cv_corr": round(float(np.mean(ridge_cv_scores(x, y, 5, gap=size))), 3),
            "heldout_corr": round(corr(fit_ridge(xa, y_train, xb, alpha=float(xa.shape[1])), y_val), 3)}


def load_clip(ds: Path):
    """(wav, train, val, y_train, y_val, ids, y) of a dataset: its 16 kHz speech, both splits, their tracked mouth
    openings, and every frame's feature row and opening (train then val), as the fits read them."""
    import soundfile as sf
    from audio_mouth_ceiling import mouth_openings

    from egstalker.dataset.reader import open_dataset

    wav, rate = sf.read(str(ds / "aud.wav"), dtype="float32")
    assert rate == 16000
    train, val = open_dataset(ds, "train"), open_dataset(ds, "val")
    y_train, y_val = mouth_openings(train), mouth_openings(val)
    ids, y = np.concatenate([train.audio_ids, val.audio_ids]), np.concatenate([y_train, y_val])
    return wav, train, val, y_train, y_val, ids, y


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("datasets", nargs="+", type=Path)
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6])
    parser.add_argument("--variants", action="store_true",
                        help="score variants of block 3 (joined blocks, + mel, wider windows) instead")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from audio_mouth_ceiling import write_json

    from egstalker.audio import get_encoder
    from egstalker.audio.whisper import WhisperEncoder

    if args.variants:
        encoders = {"mel": get_encoder("mel")}
        encoders.update({f"whisper block {k}": WhisperEncoder(layer=k)
                         for k in sorted({k for v in VARIANTS for k in v[1]})})
        fit = "ridge, alpha = input dims, window and training gap as named (default 8 rows, 3 ahead)"
    else:
        encoders = {"mel": get_encoder("mel"), "mel_phones": get_encoder("mel_phones")}
        encoders.update({f"whisper block {k}": WhisperEncoder(layer=k) for k in args.layers})
        fit = "ridge, alpha = input dims, window 8 rows, 3 ahead"
    results = {"command": " ".join(sys.argv), "fit": fit, "clips": {}}
    for ds in args.datasets:
        wav, train, val, y_train, y_val, ids, y = load_clip(ds)
        rows = []
        if args.variants:
            encoded, encode_s = {}, {}
            for name, encoder in encoders.items():
                t0 = time.perf_counter()
                feats = encoder.encode(wav)
                encoded[name] = feats.reshape(len(feats), -1)
                encode_s[name] = round(time.perf_counter() - t0, 1)
                print(ds.name, name, "encoded in", encode_s[name], "s", flush=True)
            for name, blocks, join, with_mel, size, future in VARIANTS:
                t0 = time.perf_counter()
                parts = [encoded[f"whisper block {k}"] for k in blocks]
                feats = np.mean(parts, axis=0) if join == "mean" else np.concatenate(parts, axis=1)
                if with_mel:
                    feats = np.concatenate([feats, encoded["mel"]], axis=1)
                row = {"features": name, "window": size, "ahead": future, "dims": int(feats.shape[1] * size),
                       **score(feats, ids, y, train, y_train, val, y_val, size, future),
                       "fit_s": round(time.perf_counter() - t0, 1)}
                rows.append(row)
                print(ds.name, json.dumps(row), flush=True)
            results["clips"][ds.name] = {"train_frames": len(train), "val_frames": len(val), "encode_s": encode_s,
                                         "rows": rows}
            continue
        for name, encoder in encoders.items():
            t0 = time.perf_counter()
            row = {"features": name, **score(encoder.encode(wav), ids, y, train, y_train, val, y_val),
                   "encode_s": round(time.perf_counter() - t0, 1)}
            rows.append(row)
            print(ds.name, json.dumps(row), flush=True)
        results["clips"][ds.name] = {"train_frames": len(train), "val_frames": len(val), "rows": rows}
    if args.json:
        write_json(args.json, results)


if __name__ == "__main__":
    main()
