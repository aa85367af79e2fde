"""Peak GPU memory of training at the Gaussian cap: what a card must hold for a full run of the default config.

A full run's heaviest steps come late: the fine stage with the VGG term on, at the most Gaussians densification
reaches (`densify.max_gaussians`, 150k). A shorter run never gets there, so its peak says little about the end of a
real one. This script starts there: each case trains ITERATIONS steps of the default TrainConfig from an
initialisation of N Gaussians, with densification off, a 5 % coarse stage and the VGG term on from the first
step, at one frame size (`data.resolution`) of one packed dataset (train_quality_gpu.py pack). Each case runs in
its own process; it reports the training loop's peak torch.cuda.max_memory_allocated / max_memory_reserved and
its steps per second (indicative only: 100 steps including the first VGG16 and gsplat calls; two identical cases
in two calls measured 8.0 and 9.2).

Variants:
  default           the code as it is (the per-Gaussian network recomputed in backward in one piece, growable
                    CUDA segments)
  chunked           the network recomputed in chunks of 2^17 (frame, Gaussian) rows (`model.recompute_chunk_rows`
                    131072; the default from 2026-12-04 to 12-05: in train_memory_chunked_*.json, measured on
                    12-05, it is the case named `default`, and `whole_recompute` is today's default)
  keep_activations  model.recompute_network off
  fixed_segments    PYTORCH_CUDA_ALLOC_CONF left empty: the caching allocator's fixed segments
  before            the code before 2026-12-04: the network's activations kept, the caching allocator's fixed
                    segments, and the VGG term's prediction and target through VGG16 in one autograd pass
                    (reproduced here)

On the GPU machine (the gsplat .so and int8 VGG16 travel in CARRY, as for train_quality_gpu.py):
    python3 benchmarks/train_memory_gpu.py --carry .carry_mem --clip phone_framed \
        --cases 512:150000:chunked 512:150000:default 256:150000:default --out $OUT/train_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

VARIANTS = ("default", "chunked", "keep_activations", "fixed_segments", "before")


def joint_vgg_forward(self, pred, target):
    """PerceptualLoss.forward before 2026-12-04: one VGG16 pass over prediction and target together."""
    import torch

    from egstalker.weights.networks import imagenet_normalize

    features = self.vgg(imagenet_normalize(torch.cat([pred, target.detach()])))
    loss = pred.new_zeros(())
    for weight, f in zip(self.layer_weights, features):
        fp, ft = f.chunk(2)
        loss = loss + weight * (fp - ft).abs().mean()
    return loss


def run_case(dataset: Path, resolution: int, n_gaussians: int, variant: str, iterations: int, work: Path,
             workers: int, device: str) -> dict:
    import torch

    from egstalker.train import losses
    from egstalker.train.config import TrainConfig
    from egstalker.train.trainer import train

    if variant == "before":
        losses.PerceptualLoss.forward = joint_vgg_forward
    config = TrainConfig()
    config.data.resolution = resolution
    config.data.num_workers = workers
    config.init.surface_points = n_gaussians * 2 // 3
    config.init.volume_points = n_gaussians - config.init.surface_points
    config.model.recompute_network = variant not in ("keep_activations", "before")
    config.model.recompute_chunk_rows = 2**17 if variant == "chunked" else 0
    config.densify.start = iterations + 1  # the count stays at the initial one
    config.schedule.iterations = iterations
    config.schedule.coarse_fraction = 0.05
    config.loss.perceptual_from = 0.0
    config.schedule.eval_every = config.schedule.image_every = 0
    config.schedule.checkpoint_every = iterations
    cuda = device.startswith("cuda")  # CUDA starts in train(), after the trainer chose the allocator's settings
    model_dir = work / "runs" / f"{resolution}_{n_gaussians}_{variant}"
    shutil.rmtree(model_dir, ignore_errors=True)
    result = train(dataset, model_dir, config, device=device, show_progress=False)
    return {"resolution": resolution, "variant": variant, "n_gaussians": result.n_gaussians,
            "batch_size": config.data.batch_size, "iterations": result.steps,
            "peak_allocated_gib": round(result.peak_gpu_memory_gib, 3) if cuda else None,
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 3) if cuda else None,
            "it_s": round(result.iterations_per_second, 2), "loop_s": round(result.seconds, 1),
            "cuda_alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--carry", type=Path, required=True, help="packed dataset, gsplat .so (xz), vgg16_int8.pkl")
    ap.add_argument("--clip", required=True, help="a packed dataset under --carry")
    ap.add_argument("--cases", nargs="+", required=True, help="RESOLUTION:GAUSSIANS:VARIANT ...")
    ap.add_argument("--iterations", type=int, default=100)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--device", default="cuda", help="cpu: a smoke test of the script (no memory numbers)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/egs_memory"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a case, in its own process
    args = ap.parse_args()
    from train_quality_gpu import setup_device_weights, unpack

    setup_device_weights(args.carry)
    dataset = args.work / "datasets" / args.clip
    if args.one:
        res, n, variant = args.one.split(":")
        print(json.dumps(run_case(dataset, int(res), int(n), variant, args.iterations, args.work, args.workers,
                                  args.device)))
        return
    for case in args.cases:
        parts = case.split(":")
        if len(parts) != 3 or parts[2] not in VARIANTS:
            raise SystemExit(f"bad case {case!r}: RESOLUTION:GAUSSIANS:VARIANT, VARIANT one of {', '.join(VARIANTS)}")
    if not (dataset / "meta.json").is_file():
        unpack(args.carry / args.clip, dataset)
    import torch

    rows = []
    device_name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else args.device
    report = {"device": device_name, "torch": torch.__version__, "clip": args.clip,
              "iterations": args.iterations, "command": " ".join(sys.argv), "cases": rows}
    for case in args.cases:
        t0 = time.perf_counter()
        env = dict(os.environ)
        if case.split(":")[2] in ("fixed_segments", "before"):
            env["PYTORCH_CUDA_ALLOC_CONF"] = ""  # present, so the trainer leaves it: the allocator's defaults
        proc = subprocess.run([sys.executable, __file__, "--carry", str(args.carry), "--clip", args.clip,
                               "--cases", case, "--iterations", str(args.iterations), "--workers", str(args.workers),
                               "--device", args.device, "--work", str(args.work), "--out", str(args.out), "--one", case],
                              capture_output=True, text=True, env=env)
        if proc.returncode == 0:
            row = json.loads(proc.stdout.strip().splitlines()[-1])
        else:  # an out-of-memory error is a result too
            row = {"case": case, "error": (proc.stderr.strip().splitlines() or ["?"])[-1][:300]}
        row["wall_s"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=1))
        os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
