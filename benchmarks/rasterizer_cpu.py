"""CPU time of the pure-PyTorch rasterizer: forward and forward+backward at 128x128 for 5k and 20k Gaussians.

Run: python benchmarks/rasterizer_cpu.py [--threads 2] > benchmarks/results/rasterizer_cpu.txt
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from rasterizer_scene import head_scene
from egstalker.render._torch_rasterizer import _footprint_pairs, project_gaussians
from egstalker.render.rasterize import rasterize


def timed(fn, repeats: int) -> list[float]:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--counts", type=int, nargs="+", default=[5000, 20000])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, threads={args.threads}, "
          f"{args.size}x{args.size}, {args.repeats} runs after one warm-up; load average {os.getloadavg()[0]:.1f}")
    for n in args.counts:
        tensors = head_scene(n, args.size)
        params = [t.clone().requires_grad_(True) for t in tensors[:5]]
        viewmats, Ks = tensors[5:]
        target = torch.rand(1, args.size, args.size, 3, generator=torch.Generator().manual_seed(1))

        def forward():
            with torch.no_grad():
                return rasterize(*params, viewmats, Ks, args.size, args.size, backend="torch")

        def forward_backward():
            out = rasterize(*params, viewmats, Ks, args.size, args.size, backend="torch", track_means2d_grad=True)
            ((out.rgb + (1 - out.alpha) - target) ** 2).mean().backward()

        with torch.no_grad():
            means2d, conics, depths, radii = project_gaussians(*tensors[:4], viewmats, Ks, args.size, args.size,
                                                               0.01, 1e4)
            pixel_ids, _, _ = _footprint_pairs(means2d, conics, tensors[3], depths, radii, args.size, args.size)
            visible = int((radii > 0).any(-1).sum())
        fwd = timed(forward, args.repeats)
        fwd_bwd = timed(forward_backward, args.repeats)
        print(f"N={n:6d} visible={visible:6d} pairs={pixel_ids.numel():8d} "
              f"mean_radius_px={radii.amax(-1)[radii.amax(-1) > 0].float().mean():.2f}  "
              f"forward median {statistics.median(fwd) * 1e3:7.1f} ms (min {min(fwd) * 1e3:7.1f})  "
              f"forward+backward median {statistics.median(fwd_bwd) * 1e3:7.1f} ms (min {min(fwd_bwd) * 1e3:7.1f})")


if __name__ == "__main__":
    main()
