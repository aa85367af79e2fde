"""Does Whisper's 20 ms resolution carry more about the mouth than the 40 ms frame mean the `whisper` encoder keeps?

`WhisperEncoder` gives frame i the mean of block 3's states 2i and 2i + 1 (the two inside its 40 ms slot,
`WhisperEncoder.block_states`). This keeps both instead (1,024 values a frame) and scores the held-out ridge fit
from a frame's window of features to its tracked mouth opening, as `whisper_layers.py` does, for both ways and two
windows. For the default features it
also scores the fit's predictions smoothed over 3 and 5 frames (a moving average), beside how smooth the tracked
opening itself is (lag-1 autocorrelation of the held-out truth and of the predictions).

    python benchmarks/whisper_state_pairs.py /tmp/ds/lieu /tmp/ds/obama > benchmarks/results/whisper_state_pairs.txt
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("datasets", nargs="+", type=Path)
    args = parser.parse_args()
    from audio_mouth_ceiling import corr, fit_ridge, windows
    from whisper_layers import load_clip

    from egstalker.audio.whisper import WhisperEncoder

    encoder = WhisperEncoder(layer=3)
    print("# held-out Pearson r of a ridge fit (alpha = input dims) from a frame's feature window to its mouth opening")
    print("# command: python benchmarks/" + " ".join([Path(sys.argv[0]).name] + sys.argv[1:]))
    for dataset in args.datasets:
        wav, train, val, y_train, y_val, _, _ = load_clip(dataset)
        n_frames = len(np.load(dataset / "aud.npy", mmap_mode="r"))
        for keep_pairs in (False, True):
            states = encoder.block_states(wav, 0, -(-n_frames // encoder.block_frames))[:n_frames]
            feats = states.reshape(n_frames, -1) if keep_pairs else states.mean(axis=1)
            for size, future in ((8, 3), (12, 5)):
                x_train, x_val = (windows(feats, s.audio_ids, size, future) for s in (train, val))
                r = corr(fit_ridge(x_train, y_train, x_val, alpha=float(x_train.shape[1])), y_val)
                print(f"{dataset.name:8s} {'both 20 ms states' if keep_pairs else '40 ms mean (default)':22s} "
                      f"window {size:2d} rows, {future} ahead: r = {r:.3f}", flush=True)
                if not keep_pairs and (size, future) == (8, 3):
                    p = fit_ridge(x_train, y_train, x_val, alpha=float(x_train.shape[1]))
                    for taps in (3, 5):
                        smooth = np.convolve(np.pad(p, taps // 2, mode="edge"), np.ones(taps) / taps, mode="valid")
                        print(f"{dataset.name:8s}   its predictions averaged over {taps} frames: r = "
                              f"{corr(smooth, y_val):.3f}")
                    print(f"{dataset.name:8s}   lag-1 autocorrelation: tracked opening {corr(y_val[1:], y_val[:-1]):.3f},"
                          f" predictions {corr(p[1:], p[:-1]):.3f}")


if __name__ == "__main__":
    main()
