"""fp16 vs fp32 deformation network at inference: speed of `render_frames` and how far the images move.

    python benchmarks/half_precision_gpu.py MODEL_DIR --dataset DATASET_DIR --json OUT.json

Renders the held-out frames (their own audio features and poses) with precision="fp32" and "fp16" and reports
PSNR of fp16 against fp32 and of both against the ground truth, then frames/s of `render_frames` at a few batch
sizes for each (median of 5 timed passes after a warm-up).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 16, 32])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    import cv2

    from egstalker import metrics
    from egstalker.inference import TalkingHead

    features = np.load(Path(args.dataset) / "aud.npy")
    result = {"command": " ".join(sys.argv), "device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    renders = {}
    for precision in ("fp32", "fp16"):
        head = TalkingHead.from_dir(args.model_dir, device=args.device, dataset_dir=args.dataset,
                                    check_encoder=False, precision=precision)
        poses = head.poses
        positions = np.arange(poses.n_train, len(poses.frame_ids))
        out = [head.render_frames(features, poses.audio_ids[p], p) for p in np.array_split(positions, 8)]
        renders[precision] = np.concatenate(out)
        speed = {}
        for b in args.batch_sizes:
            rows = np.arange(b) % len(features)
            pose_rows = np.arange(b) % poses.n_train
            head.render_frames(features, rows, pose_rows)
            times = []
            for _ in range(5):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for k in range(max(1, 64 // b)):
                    head.render_frames(features, (rows + k * b) % len(features), (pose_rows + k * b) % poses.n_train)
                torch.cuda.synchronize()
                times.append((time.perf_counter() - t0) / (max(1, 64 // b) * b))
            speed[b] = round(1.0 / float(np.median(times)), 1)
        result[precision] = {"render_frames_fps": speed, "gaussians": len(head.model.gaussians)}
        gt = Path(args.dataset) / "gt_imgs"
        has_gt = gt.is_dir() and any(gt.iterdir())  # a pack for serving alone has no ground truth
        if precision == "fp32" and has_gt:
            truths = np.stack([cv2.resize(cv2.cvtColor(cv2.imread(str(gt / f"{i}.jpg")), cv2.COLOR_BGR2RGB),
                                          (head.width, head.height), interpolation=cv2.INTER_AREA)
                               for i in poses.frame_ids[positions]])
        if has_gt:
            result[precision]["psnr_vs_gt"] = float(np.mean(metrics.psnr(renders[precision], truths)))
        print(precision, json.dumps(result[precision]), flush=True)
        del head
        torch.cuda.empty_cache()
    diff = np.abs(renders["fp16"].astype(np.int16) - renders["fp32"].astype(np.int16))
    result["fp16_vs_fp32"] = {"psnr": float(np.mean(metrics.psnr(renders["fp16"], renders["fp32"]))),
                              "max_abs_diff_8bit": int(diff.max()), "mean_abs_diff_8bit": float(diff.mean()),
                              "frames": int(len(diff))}
    print("fp16 vs fp32", json.dumps(result["fp16_vs_fp32"]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
