"""The audio/video offset estimator (egstalker.preprocess.av_sync) on real clips: what it finds in each
recording, and whether it recovers offsets added on purpose (the sound delayed or advanced by whole frames).

Landmarks come from the dataset's face_landmarks.npz, the sound from its aud.wav (delay: silence prepended);
only the training frames are used, as in preprocessing. Seconds on a CPU.

    python benchmarks/av_offset.py /tmp/ds/lieu /tmp/ds/obama /tmp/ds/ng /tmp/ds/aoc /tmp/ds/hill \
        --added -6 -3 3 6 --json benchmarks/results/av_offset.json
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


def training_mouth_opening(dataset: Path) -> np.ndarray:
    """[n_train] mouth opening of the dataset's training frames from its landmark cache (NaN: no face)."""
    from egstalker.preprocess.av_sync import mouth_openings
    from egstalker.preprocess.transforms import split_index

    cache = np.load(dataset / "face_landmarks.npz")
    meta = json.loads((dataset / "meta.json").read_text())
    n_train = split_index(len(cache["landmarks"]), meta.get("split", {}).get("val_fraction", 1 / 11))
    return mouth_openings(cache["landmarks"][:n_train], cache["detected"][:n_train])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("datasets", nargs="+", type=Path)
    parser.add_argument("--added", type=int, nargs="*", default=[-6, -3, 3, 6],
                        help="offsets (frames) added to each clip's sound; the estimate should move by as much")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    import soundfile as sf

    from egstalker.preprocess.av_sync import estimate_audio_offset, shift_audio

    results = {"command": " ".join(sys.argv), "clips": {}}
    for ds in args.datasets:
        wav, rate = sf.read(str(ds / "aud.wav"), dtype="float32")
        opening = training_mouth_opening(ds)
        rows = []
        for added in [0, *args.added]:
            t0 = time.perf_counter()
            estimate = estimate_audio_offset(shift_audio(wav, added), opening)
            found = estimate.to_json()
            row = {"added_frames": added, "estimated_frames": estimate.frames, "peak_frames": found["peak_frames"],
                   "peak_corr": found["peak_corr"], "reliable": estimate.reliable, "at_edge": estimate.at_edge,
                   "seconds": round(time.perf_counter() - t0, 1)}
            if added == 0:
                row["curve"] = dict(zip(estimate.shifts, found["curve"]))
            rows.append(row)
            print(ds.name, json.dumps({k: v for k, v in row.items() if k != "curve"}), flush=True)
        if not rows[0]["reliable"]:
            print(f"{ds.name}: the sound predicts the mouth too weakly (peak corr {rows[0]['peak_corr']}); no offset "
                  "is applied to such clips", flush=True)
        # Recovered: the curve's peak moved by the added offset, to half a frame (the applied offset is that
        # peak minus the natural lead, rounded, and 0 inside the dead band, so it can differ by one frame).
        own = rows[0]["peak_frames"]
        for r in rows[1:]:
            r["peak_moved_frames"] = None if None in (own, r["peak_frames"]) else round(r["peak_frames"] - own, 2)
        results["clips"][ds.name] = {
            "training_frames": int(len(opening)), "rows": rows,
            "added_offsets_recovered": sum(r["peak_moved_frames"] is not None
                                           and abs(r["peak_moved_frames"] - r["added_frames"]) <= 0.5 for r in rows[1:]),
            "added_offsets_tried": len(rows) - 1}
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
