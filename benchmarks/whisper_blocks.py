"""How does the `whisper` encoder's block size and window look-ahead trade lip-sync information for latency?

The packaged encoding cuts 200 ms blocks (5 frames), each from a 2.4 s window that ends 200 ms after the block, so
a block's first frame waits 360 ms for its audio. Encoding every frame from its own window (blocks of 1) with the
same 200 ms after it would cut that to 200 ms, at five times the encoder's work. For each variant (frames per
block, seconds after the block) this scores the same ridge fit as `whisper_layers.py` (layer 3, window 8 rows,
3 ahead; also 2 and 4 ahead), cross-validated over every frame and on the held-out split, on a CPU.

    python benchmarks/whisper_blocks.py /tmp/ds/lieu_wh /tmp/ds/obama_wh --json benchmarks/results/whisper_blocks.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

VARIANTS = [(5, 0.2, 2.0), (1, 0.2, 2.0), (1, 0.28, 2.0), (1, 0.36, 2.0), (1, 0.12, 2.0)]
"""(frames per block, seconds of audio after the block, seconds before it); (5, 0.2, 2.0) is `whisper`'s
encoding."""
SHORTER = [(5, 0.2, 2.0), (1, 0.12, 2.0), (1, 0.12, 1.0), (1, 0.2, 1.0), (1, 0.12, 0.6), (1, 0.08, 2.0),
           (1, 0.04, 2.0), (1, 0.08, 1.0)]
"""`--shorter`: less look-ahead and less context (cheaper windows) for per-frame encoding."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("datasets", nargs="+", type=Path)
    parser.add_argument("--shorter", action="store_true", help="score SHORTER instead of VARIANTS")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from audio_mouth_ceiling import write_json
    from whisper_layers import load_clip, score

    from egstalker.audio import whisper

    encoder = whisper.WhisperEncoder(layer=3)
    results = {"command": " ".join(sys.argv), "fit": "ridge, alpha = input dims, window 8 rows; 3 ahead unless "
               "named", "clips": {}}
    for ds in args.datasets:
        wav, train, val, y_train, y_val, ids, y = load_clip(ds)
        n_frames = math.ceil(len(wav) / 640)
        rows = []
        for block, after, before in (SHORTER if args.shorter else VARIANTS):
            encoder.block_frames, encoder.window_after_seconds, encoder.window_before_seconds = block, after, before
            t0 = time.perf_counter()
            feats = encoder.encode_blocks(wav, 0, math.ceil(n_frames / block))[:n_frames]
            encode_s = time.perf_counter() - t0
            row = {"frames_per_block": block, "seconds_after_block": after, "seconds_before_block": before,
                   "encoder_lookahead_ms": round(1000 * encoder.lookahead_seconds),
                   "total_lookahead_ms_3_ahead": round(1000 * (encoder.lookahead_seconds + 3 * 0.04)),
                   **score(feats, ids, y, train, y_train, val, y_val),
                   "2_ahead": score(feats, ids, y, train, y_train, val, y_val, 8, 2),
                   "4_ahead": score(feats, ids, y, train, y_train, val, y_val, 8, 4),
                   "encode_s": round(encode_s, 1)}
            rows.append(row)
            print(ds.name, json.dumps(row), flush=True)
        results["clips"][ds.name] = {"train_frames": len(train), "val_frames": len(val), "rows": rows}
    if args.json:
        write_json(args.json, results)


if __name__ == "__main__":
    main()
