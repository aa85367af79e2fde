"""Peak GPU memory and speed of the model alone at 512x512, with and without the deformation network's inference
chunking (`DeformationNetwork.INFERENCE_CHUNK_ROWS`), on one model in one process.

The model is the initialised head (`iterations 0`) of a packed dataset with about as many Gaussians as a trained
one (default 64k surface + 32k volume points = 96k): the network's memory depends on the Gaussian count, not on
training. On the GPU machine (carry .whl .torch_ext .carry, see docs/gpu.md):

    python3 benchmarks/render_memory_gpu.py --carry .carry --clip lieu --json $OUT/render_memory_gpu.json
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
sys.path.insert(0, str(ROOT / "benchmarks"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--carry", type=Path, default=ROOT / ".carry")
    parser.add_argument("--clip", default="lieu")
    parser.add_argument("--points", type=int, nargs=2, default=[64000, 32000], help="surface and volume points")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--frames", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from render_speed import resized_head, time_model_only
    from train_quality_gpu import unpack

    from egstalker.inference import TalkingHead
    from egstalker.model.deformation import DeformationNetwork
    from egstalker.train.config import TrainConfig
    from egstalker.train.trainer import train

    device = torch.device(args.device)
    dataset = Path("/tmp/egs_mem_ds") / args.clip
    if not (dataset / "transforms_val.json").exists():
        unpack(args.carry / args.clip, dataset)
    config = TrainConfig()
    config.schedule.iterations = 0
    config.init.surface_points, config.init.volume_points = args.points
    model_dir = Path("/tmp/egs_mem_models") / args.clip
    train(dataset, model_dir, config, device=str(device), show_progress=False)
    head = TalkingHead.from_dir(model_dir, device=device, check_encoder=False)
    head = resized_head(head, args.size)
    features = np.load(dataset / "aud.npy")
    poses = head.pose_schedule(len(features), "loop")
    result = {"command": " ".join(["python3", "benchmarks/render_memory_gpu.py"] + sys.argv[1:]),
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "size": f"{head.width}x{head.height}",
              "gaussians": len(head.model.gaussians), "runs": {}}
    default_rows = DeformationNetwork.INFERENCE_CHUNK_ROWS
    for label, rows in (("chunked", default_rows), ("one_pass", 2**62)):
        DeformationNetwork.INFERENCE_CHUNK_ROWS = rows
        result["runs"][label] = {"chunk_rows": rows}
        for batch in args.batch_sizes:
            t0 = time.perf_counter()
            r = time_model_only(head, features, poses, batch, args.frames, device)
            result["runs"][label][str(batch)] = r
            print(f"{label:>9} batch {batch:>3}: {r['fps']:.1f} frames/s, peak {r['peak_gpu_mib']} MiB "
                  f"({time.perf_counter() - t0:.1f} s)", flush=True)
    DeformationNetwork.INFERENCE_CHUNK_ROWS = default_rows
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
