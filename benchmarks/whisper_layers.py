"""Which block of Whisper base's encoder says most about the mouth? A linear fit per block, on a CPU.

For each block k of the encoder (1-6), the `whisper` encoder's features taken after block k (the packaged block
encoding: 200 ms blocks, 2.4 s windows) are windowed as the model reads them (8 rows, 3 ahead) and a ridge fit
(alpha = input dims) to the tracked mouth opening is scored cross-validated over every frame (5 contiguous folds)
and on the held-out split, beside `mel` and `mel_phones`. The default encoder uses block 3 (the middle).

    python benchmarks/whisper_layers.py /tmp/ds/lieu /tmp/ds/obama --json benchmarks/results/whisper_layers.json
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("datasets", nargs="+", type=Path)
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    import soundfile as sf
    from audio_mouth_ceiling import corr, fit_ridge, mouth_openings, windows, write_json

    from egstalker.audio import get_encoder
    from egstalker.audio.whisper import WhisperEncoder
    from egstalker.dataset.reader import open_dataset
    from egstalker.preprocess.av_sync import ridge_cv_scores

    encoders = {"mel": get_encoder("mel"), "mel_phones": get_encoder("mel_phones")}
    encoders.update({f"whisper block {k}": WhisperEncoder(layer=k) for k in args.layers})
    results = {"command": " ".join(sys.argv), "fit": "ridge, alpha = input dims, window 8 rows, 3 ahead",
               "clips": {}}
    for ds in args.datasets:
        wav, rate = sf.read(str(ds / "aud.wav"), dtype="float32")
        assert rate == 16000
        train, val = open_dataset(ds, "train"), open_dataset(ds, "val")
        y_train, y_val = mouth_openings(train), mouth_openings(val)
        ids, y = np.concatenate([train.audio_ids, val.audio_ids]), np.concatenate([y_train, y_val])
        rows = []
        for name, encoder in encoders.items():
            t0 = time.perf_counter()
            feats = encoder.encode(wav)
            feats = feats.reshape(len(feats), -1)
            x, xa, xb = (windows(feats, i, 8, 3) for i in (ids, train.audio_ids, val.audio_ids))
            row = {"features": name, "cv_corr": round(float(np.mean(ridge_cv_scores(x, y, 5, gap=8))), 3),
                   "heldout_corr": round(corr(fit_ridge(xa, y_train, xb, alpha=float(xa.shape[1])), y_val), 3),
                   "encode_s": round(time.perf_counter() - t0, 1)}
            rows.append(row)
            print(ds.name, json.dumps(row), flush=True)
        results["clips"][ds.name] = {"train_frames": len(train), "val_frames": len(val), "rows": rows}
    if args.json:
        write_json(args.json, results)


if __name__ == "__main__":
    main()
