"""Lip sync by audio encoder: the same dataset, the same training, only the audio features differ.

For each encoder the preprocessed dataset is copied with hard links, its features (task 2) and split (task 9)
are recomputed with that encoder, a head is trained with one TrainConfig for a fixed number of iterations (no
time budget, so every encoder gets the same steps), and `egstalker eval` scores the held-out frames with their
own audio: mouth-opening correlation, mouth LMD, PSNR.

    python benchmarks/encoder_lipsync.py DATASET --encoders oww mel --quality preview --iterations 400 \
        --json benchmarks/results/encoder_lipsync_cpu.json

On a GPU use --quality full --device cuda (and more iterations). Working copies go to --work (default /tmp).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", type=Path)
    parser.add_argument("--encoders", nargs="+", default=["oww", "mel"])
    parser.add_argument("--quality", default="preview", choices=["preview", "full"])
    parser.add_argument("--iterations", type=int, default=400)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--work", type=Path, default=Path("/tmp/egs_encoder_lipsync"))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    import torch

    from egstalker.evaluate.evaluate import evaluate
    from egstalker.inference import TalkingHead
    from egstalker.preprocess.pipeline import load_or_default_config, preprocess, read_meta
    from egstalker.dataset.layout import DatasetLayout
    from egstalker.train.config import preset_config
    from egstalker.train.trainer import train

    source_video = read_meta(DatasetLayout(args.dataset))["source_video"]["path"]
    results = {"command": " ".join(["python", "benchmarks/encoder_lipsync.py"] + sys.argv[1:]),
               "device": args.device, "cpu": platform.processor() or platform.machine(),
               "torch": torch.__version__, "dataset": str(args.dataset), "encoders": {}}
    for name in args.encoders:
        data = args.work / f"dataset_{name}"
        shutil.rmtree(data, ignore_errors=True)
        data.parent.mkdir(parents=True, exist_ok=True)
        # hard links: the recomputed files are written under new names and renamed, never into the originals
        subprocess.run(["cp", "-al", str(args.dataset), str(data)], check=True)
        config = load_or_default_config(data)
        config.audio.encoder = name
        t0 = time.perf_counter()
        preprocess(source_video, data, tasks=[2, 9], force=True, config=config, show_progress=False)
        features_s = time.perf_counter() - t0
        train_config = preset_config(args.quality, args.device)
        train_config.schedule.time_budget_minutes = None
        train_config.schedule.iterations = args.iterations
        model = args.work / f"model_{name}"
        shutil.rmtree(model, ignore_errors=True)
        t0 = time.perf_counter()
        trained = train(data, model, train_config, device=args.device, show_progress=False)
        train_s = time.perf_counter() - t0
        head = TalkingHead.from_dir(model, device=args.device, check_encoder=False)
        scores = evaluate(head, "val", show_progress=False).to_json()
        record = {"feature_shape": read_meta(DatasetLayout(data))["audio_encoder"]["feature_shape"],
                  "features_seconds": round(features_s, 1), "train_seconds": round(train_s, 1),
                  "iterations": trained.steps, "gaussians": trained.n_gaussians, **scores}
        results["encoders"][name] = record
        print(name, json.dumps({k: record[k] for k in ("mouth_corr", "lmd", "psnr", "ssim", "lpips", "mouth_frames",
                                                        "n_frames", "train_seconds") if k in record}), flush=True)
        if args.json:
            args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
