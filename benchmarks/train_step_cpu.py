"""Training steps per second on the CPU: the `preview` preset (128 px, 2 frames a step, no VGG term) at a fixed
Gaussian count, fine stage from the first step, no densification, evaluation or checkpoints in the loop.

The CPU preview trains as many steps as fit 10 minutes, so its quality follows this number.

Run: python benchmarks/train_step_cpu.py DATASET [--gaussians 20000] [--steps 40] [--label NAME] [--workers N]
     [--threads N]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", type=Path, help="a preprocessed dataset")
    parser.add_argument("--gaussians", type=int, default=20000, help="the preview's cap")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--label", default="")
    parser.add_argument("--workers", type=int, default=None, help="data loading workers (default: the preset's)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in the training process")
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from egstalker.train.config import preset_config
    from egstalker.train.trainer import train

    config = preset_config("preview", "cpu")
    config.schedule.time_budget_minutes = None
    config.schedule.iterations = args.steps
    config.schedule.coarse_fraction = 0.0
    config.densify.start = args.steps + 1
    config.init.surface_points = args.gaussians * 3 // 4
    config.init.volume_points = args.gaussians - config.init.surface_points
    config.schedule.eval_every = config.schedule.image_every = 0
    config.schedule.checkpoint_every = args.steps
    if args.workers is not None:
        config.data.num_workers = args.workers
    out = Path(tempfile.mkdtemp(prefix="egs_step_"))
    try:
        result = train(args.dataset, out / "model", config, device="cpu", show_progress=False)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    print(f"{args.label or 'run'}: {result.iterations_per_second:.3f} steps/s ({result.seconds:.1f} s for "
          f"{result.steps} steps, {result.n_gaussians} Gaussians, {config.data.batch_size} frames of "
          f"{config.data.resolution} px a step; {config.data.num_workers} workers, {torch.get_num_threads()} threads; "
          f"load average {os.getloadavg()[0]:.1f})", flush=True)


if __name__ == "__main__":
    main()
