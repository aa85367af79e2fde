"""Does augmenting the training speech help the audio path generalise to new speech? CPU, minutes.

Lieu's lip sync is bounded by what its 55 s of training speech teaches the audio adapter (docs/model.md, "Lip
sync"). Speech recognisers stretch small corpora with perturbed copies of their audio (speed 0.9x/1.1x, noise).
This encodes perturbed copies of a dataset's sound track with the dataset's own encoder, pairs each training
frame's mouth with the perturbed audio that was said at that moment (speed f: the copy's row round(row / f)),
and scores the held-out inner-lip gap two ways: a ridge fit from the model's window (8 rows, 3 ahead) and the
model's own adapter + mouth probe (`adapter_regularisation.fit`), each trained on the original rows alone and on
the original plus the copies. Held-out frames always use the original audio. An alignment check: a ridge fit from
each copy alone, its rows shifted by -2..2, peaks at 0.

    python benchmarks/audio_augmentation.py /tmp/ds/lieu_wh /tmp/ds/obama_wh --seeds 3
        --json benchmarks/results/audio_augmentation_whisper.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from adapter_regularisation import fit  # noqa: E402
from audio_mouth_ceiling import corr, fit_ridge, windows  # noqa: E402

WINDOW, FUTURE = 8, 3


def perturb(wav: np.ndarray, speed: float, snr_db: float | None, seed: int) -> np.ndarray:
    """`wav` played `speed` times as fast (pitch and formants move with it, as in Kaldi's speed perturbation),
    with white noise `snr_db` under the speech's RMS when given."""
    from fractions import Fraction

    from scipy.signal import resample_poly

    out = wav
    if speed != 1.0:
        ratio = Fraction(speed).limit_denominator(100)
        out = resample_poly(wav, ratio.denominator, ratio.numerator).astype(np.float32)
    if snr_db is not None:  # noise drawn and added in float32: the committed results were made so
        rms = float(np.sqrt(np.mean(out ** 2)))
        out = out + np.random.default_rng(seed).normal(0, rms * 10 ** (-snr_db / 20), len(out)).astype(np.float32)
    return out


def parse_copy(text: str) -> tuple[float, float | None]:
    """'speed' or 'speed:snr_db', e.g. 1.1 or 1.0:20."""
    speed, _, snr = text.partition(":")
    return float(speed), (float(snr) if snr else None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("datasets", nargs="+", type=Path)
    parser.add_argument("--sets", nargs="+", default=["0.9 1.1", "1.0:20", "0.9 1.1 1.0:20"],
                        help="each a space-separated list of copies, 'speed[:snr_db]'")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    import torch

    from egstalker.audio import get_encoder
    from egstalker.dataset.reader import open_dataset
    from egstalker.render.api import load_speech
    from egstalker.train.mouth_probe import split_mouth_shapes

    torch.set_num_threads(2)
    results = {"command": shlex.join(sys.argv), "window": WINDOW, "future_rows": FUTURE, "steps": args.steps,
               "clips": {}}
    for ds in args.datasets:
        meta = json.loads((ds / "meta.json").read_text())
        encoder = get_encoder(meta["audio_encoder"]["name"])
        wav = load_speech(ds / "aud.wav")
        features = np.load(ds / "aud.npy").astype(np.float32).reshape(-1, int(np.prod(encoder.feature_shape)))
        train, val = open_dataset(ds, "train"), open_dataset(ds, "val")
        train_y, val_y = split_mouth_shapes(train), split_mouth_shapes(val)
        dims = features.shape[1]
        val_x = windows(features, val.audio_ids, WINDOW, FUTURE)
        base_x = windows(features, train.audio_ids, WINDOW, FUTURE)
        statistics = features[np.unique(train.audio_ids)]
        copies: dict[str, np.ndarray] = {}  # copy name -> its training windows
        alignment: dict[str, dict[str, float]] = {}  # ridge from a copy alone, its rows shifted: peaks at 0
        rows = []
        names = sorted({c for s in args.sets for c in s.split()})
        for k, name in enumerate(names):
            speed, snr = parse_copy(name)
            t0 = time.perf_counter()
            # noise seed: the copy's place among all copies named (sorted), so another --sets draws other noise
            feats = encoder.encode(perturb(wav, speed, snr, seed=k)).reshape(-1, dims)
            ids = np.clip(np.round(train.audio_ids / speed).astype(int), 0, len(feats) - 1)
            copies[name] = windows(feats, ids, WINDOW, FUTURE)
            alignment[name] = {}
            for shift in (-2, -1, 0, 1, 2):
                shifted = windows(feats, np.clip(ids + shift, 0, len(feats) - 1), WINDOW, FUTURE)
                alignment[name][str(shift)] = round(corr(fit_ridge(shifted, train_y[:, 0], val_x, 1e4), val_y[:, 0]), 3)
            print(ds.name, f"copy {name}: {len(feats)} rows ({time.perf_counter() - t0:.0f} s)", flush=True)
        for set_text in ["", *args.sets]:
            chosen = set_text.split()
            x = np.concatenate([base_x, *(copies[c] for c in chosen)])
            y = np.concatenate([train_y] * (1 + len(chosen)))
            ridge = {str(alpha): round(corr(fit_ridge(x, y[:, 0], val_x, alpha), val_y[:, 0]), 3)
                     for alpha in (100.0, 1000.0, 10000.0)}
            t0 = time.perf_counter()
            held = []
            for seed in range(args.seeds):
                val_pred, _ = fit(x.reshape(len(x), WINDOW, dims), y, val_x.reshape(len(val_x), WINDOW, dims),
                                  statistics, 0.0, seed, args.steps)
                held.append(round(corr(val_pred, val_y[:, 0]), 3))
            row = {"copies": chosen, "train_rows": len(x), "ridge_heldout_by_alpha": ridge, "adapter_heldout": held,
                   "adapter_heldout_mean": round(float(np.mean(held)), 3)}
            rows.append(row)
            print(ds.name, json.dumps(row), f"({time.perf_counter() - t0:.0f} s)", flush=True)
        results["clips"][ds.name] = {"features": meta["audio_encoder"]["name"], "train_frames": len(train),
                                     "val_frames": len(val), "rows": rows,
                                     "copy_alone_heldout_ridge_by_row_shift": alignment}
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
