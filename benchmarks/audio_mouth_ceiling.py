"""How well can a frame's audio window predict its mouth opening? A ceiling for lip sync, in seconds on a CPU.

The renderer can only open the mouth as far as its audio input tells it to. This fits small regressors from a
frame's window of audio features to the tracked mouth opening (inner-lip gap / eye-corner distance, from the
dataset's 68 landmarks) on the training frames, and reports the Pearson correlation on the held-out frames (the
same split and quantity the mouth-corr metric scores on renders). It compares window alignments (how many
future feature rows the window reads: the serving look-ahead) and encoder look-aheads, so the model's audio
window can be chosen without a GPU run.

    python benchmarks/audio_mouth_ceiling.py /tmp/ds/lieu /tmp/ds/obama --window 12 --futures 0 3 5 7
        --lookaheads 0.2 --mel --epochs 150 --seeds 2 --json benchmarks/results/audio_mouth_ceiling.json

--pose adds the same fit from the other per-frame inputs of the model: the tracked head pose (the camera's
3x4 world-to-camera matrix, the model's pose token) and the eye blink. A pose that predicts the mouth is a leak:
on held-out frames rendered with their own tracked poses the mouth can open without any audio
(benchmarks/lipsync_control.py measures that on a trained model).

    python benchmarks/audio_mouth_ceiling.py /tmp/ds/lieu /tmp/ds/obama --lookaheads --pose --epochs 150
        --seeds 2 --json benchmarks/results/pose_mouth_leak.json

With --mel (or --phones) and oww look-aheads both given, each oww look-ahead concatenated with mel (mel_phones) is
scored too (`mel+oww@...`, `mel_phones+oww@...`). --phones adds the `mel_phones` encoder (mel + English phone
labels; its 1 s look-ahead counts in lookahead_ms), --whisper the `whisper` encoder. --folds K scores ridge fits by contiguous K-fold cross-validation over every frame of the clip
instead of the one held-out split (a 1.8 s split leaves the correlation uncertain by +-0.4):

    python benchmarks/audio_mouth_ceiling.py /tmp/ds/lieu /tmp/ds/obama --folds 5 --window 12 --futures 3 7
        --lookaheads 0.2 --mel --json benchmarks/results/audio_mouth_ceiling_cv.json
    python benchmarks/audio_mouth_ceiling.py /tmp/ds/lieu /tmp/ds/obama [--folds 5] --window 8 --futures 3
        --lookaheads --mel --phones --json benchmarks/results/audio_mouth_ceiling_{heldout,cv}_phones.json
    python benchmarks/audio_mouth_ceiling.py /tmp/ds/lieu /tmp/ds/obama [--folds 5] --window 8 --futures 3
        --lookaheads --mel --phones --whisper --seeds 2 --json benchmarks/results/audio_mouth_ceiling_{heldout,cv}_whisper.json
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


def mouth_openings(data) -> np.ndarray:
    """[frames] inner-lip gap (iBUG 62-66) over the outer eye-corner distance (36-45), per frame of a split."""
    from egstalker.train.mouth_probe import split_mouth_shapes

    return split_mouth_shapes(data)[:, 0]


def windows(features: np.ndarray, audio_ids: np.ndarray, size: int, future: int) -> np.ndarray:
    """[frames, size * feature dims]: each frame's window as the model reads it (edges clamped)."""
    from egstalker.audio.base import window_offsets

    rows = np.clip(audio_ids[:, None] + window_offsets(size, future)[None], 0, len(features) - 1)
    return features[rows].reshape(len(audio_ids), -1)


def fit_ridge(x_train, y_train, x_test, alpha: float) -> np.ndarray:
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    a, b = (x_train - mean) / std, (x_test - mean) / std
    a1 = np.hstack([a, np.ones((len(a), 1))])
    w = np.linalg.solve(a1.T @ a1 + alpha * np.eye(a1.shape[1]), a1.T @ y_train)
    return np.hstack([b, np.ones((len(b), 1))]) @ w


def fit_mlp(x_train, y_train, x_test, seed: int = 0, epochs: int = 300) -> np.ndarray:
    import torch

    torch.manual_seed(seed)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    xt = torch.tensor((x_train - mean) / std, dtype=torch.float32)
    yt = torch.tensor((y_train - y_train.mean()) / y_train.std(), dtype=torch.float32)
    net = torch.nn.Sequential(torch.nn.Dropout(0.2), torch.nn.Linear(xt.shape[1], 128), torch.nn.GELU(),
                              torch.nn.Dropout(0.2), torch.nn.Linear(128, 1))
    opt = torch.optim.AdamW(net.parameters(), 1e-3, weight_decay=1e-2)
    for _ in range(epochs):
        perm = torch.randperm(len(xt))
        for k in range(0, len(xt), 64):
            idx = perm[k:k + 64]
            loss = torch.nn.functional.mse_loss(net(xt[idx])[:, 0], yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        return net(torch.tensor((x_test - mean) / std, dtype=torch.float32))[:, 0].numpy()


def write_json(path: Path, results: dict) -> None:
    """Write under a temporary name, then rename: an interrupted run leaves no half-written result."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    tmp.replace(path)


def corr(a, b) -> float:
    return float(np.corrcoef(a, b)[0, 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("datasets", nargs="+", type=Path)
    parser.add_argument("--window", type=int, default=8)
    parser.add_argument("--futures", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--lookaheads", type=float, nargs="*", default=[0.12, 0.2, 0.28])
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--seeds", type=int, default=3, help="MLP fits averaged")
    parser.add_argument("--mel", action="store_true", help="also the mel encoder")
    parser.add_argument("--phones", action="store_true", help="also mel_phones (mel + pocketsphinx phone labels)")
    parser.add_argument("--whisper", action="store_true", help="also whisper (layer 3 of Whisper base's encoder)")
    parser.add_argument("--pose", action="store_true", help="also head pose and eye blink (see above)")
    parser.add_argument("--folds", type=int, default=0, help="K-fold ridge over the whole clip (see above)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    import soundfile as sf

    from egstalker.audio.mel import MelEncoder
    from egstalker.audio.oww import OwwEncoder
    from egstalker.dataset.reader import open_dataset
    from egstalker.preprocess.av_sync import ridge_cv_scores

    results = {"command": " ".join(sys.argv), "window": args.window, "clips": {}}
    for ds in args.datasets:
        wav, rate = sf.read(str(ds / "aud.wav"), dtype="float32")
        assert rate == 16000
        train, val = open_dataset(ds, "train"), open_dataset(ds, "val")
        train_f, train_a, val_f, val_a = train.frame_ids, train.audio_ids, val.frame_ids, val.audio_ids
        y_train, y_val = mouth_openings(train), mouth_openings(val)
        encoders = {f"oww@{la:g}s": OwwEncoder(la) for la in args.lookaheads}
        if args.mel:
            encoders["mel"] = MelEncoder()
        if args.phones:
            from egstalker.audio.phones import MelPhonesEncoder

            encoders["mel_phones"] = MelPhonesEncoder()
        if args.whisper:
            from egstalker.audio.whisper import WhisperEncoder

            encoders["whisper"] = WhisperEncoder()
        rows = []
        # every encoder's features, and mel / mel_phones concatenated with each oww look-ahead (when both are asked for)
        feats = {name: ((encoder.encode(wav),), encoder.lookahead_seconds) for name, encoder in encoders.items()}
        for base in [b for b in ("mel", "mel_phones") if b in feats]:
            for name in [n for n in feats if n.startswith("oww")]:
                feats[f"{base}+{name}"] = (feats[base][0] + feats[name][0], max(feats[base][1], feats[name][1]))
        if args.folds:
            ids = np.concatenate([train_a, val_a])
            y = np.concatenate([y_train, y_val])
            for name, (parts, _) in feats.items():
                for future in args.futures:
                    x = np.hstack([windows(p, ids, args.window, future) for p in parts])
                    scores = ridge_cv_scores(x, y, args.folds, gap=args.window)
                    row = {"encoder": name, "window": args.window, "future_rows": future,
                           "ridge_cv_corr": round(float(np.mean(scores)), 3),
                           "folds": [round(c, 3) for c in scores]}
                    rows.append(row)
                    print(ds.name, json.dumps(row), flush=True)
            results["clips"][ds.name] = {"frames": int(len(y)), "folds": args.folds, "rows": rows}
            continue
        for name, (parts, lookahead_seconds) in feats.items():
            t0 = time.perf_counter()
            for future in args.futures:
                xa = np.hstack([windows(p, train_a, args.window, future) for p in parts])
                xb = np.hstack([windows(p, val_a, args.window, future) for p in parts])
                ridge = corr(fit_ridge(xa, y_train, xb, alpha=float(xa.shape[1])), y_val)
                mlp = float(np.mean([corr(fit_mlp(xa, y_train, xb, seed=s, epochs=args.epochs), y_val)
                                     for s in range(args.seeds)]))
                total_ms = 1000 * (lookahead_seconds + future / 25.0)
                row = {"encoder": name, "future_rows": future, "lookahead_ms": round(total_ms),
                       "ridge_corr": round(ridge, 3), "mlp_corr": round(mlp, 3)}
                rows.append(row)
                print(ds.name, json.dumps(row), f"({time.perf_counter() - t0:.0f} s)", flush=True)
        if args.pose:
            pose_train = train.viewmats[:, :3].reshape(len(train), -1)
            pose_val = val.viewmats[:, :3].reshape(len(val), -1)
            inputs = {"head pose (3x4)": (pose_train, pose_val),
                      "eye blink (AU45)": (train.au45[:, None], val.au45[:, None]),
                      "head pose + eye blink": (np.hstack([pose_train, train.au45[:, None]]),
                                                np.hstack([pose_val, val.au45[:, None]]))}
            for name, (xa, xb) in inputs.items():
                ridge = corr(fit_ridge(xa, y_train, xb, alpha=1.0), y_val)
                mlp = float(np.mean([corr(fit_mlp(xa, y_train, xb, seed=s, epochs=args.epochs), y_val)
                                     for s in range(args.seeds)]))
                row = {"input": name, "ridge_corr": round(ridge, 3), "mlp_corr": round(mlp, 3)}
                rows.append(row)
                print(ds.name, json.dumps(row), flush=True)
        results["clips"][ds.name] = {"train_frames": len(train_f), "val_frames": len(val_f), "rows": rows}
    if args.json:
        write_json(args.json, results)


if __name__ == "__main__":
    main()
