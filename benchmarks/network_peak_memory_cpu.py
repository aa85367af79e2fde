"""Peak memory of the per-Gaussian deformation network's forward and backward pass, measured on the CPU.

What a training step's network needs at its peak, for B frames x N Gaussians, three ways:
  kept        activations kept for the backward pass (`recompute_in_backward` off: the CPU preview)
  whole       recomputed in the backward pass in one piece (the default: `model.recompute_chunk_rows` 0)
  chunked     recomputed in chunks of 2^17 rows (`model.recompute_chunk_rows` 131072; the default from
              2026-12-04 to 12-05, until the GPU measured its cost in speed)

Each case runs in its own process: one warm-up step (gradients allocated), then the peak resident memory is
reset (/proc/self/clear_refs) and one more forward + backward is measured as the rise of the peak over the
resident memory before it. Tensors this large are mmapped by glibc and given back when freed, so the rise is what
was alive at once. On CUDA the same tensors set the step's peak (benchmarks/train_memory_gpu.py measures that).

Run: python benchmarks/network_peak_memory_cpu.py [--gaussians 150000] [--frames 4]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CASES = ("kept", "whole", "chunked")
CHUNK_ROWS = 2**17


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure(case: str, gaussians: int, frames: int) -> dict:
    import torch

    from egstalker.model.deformation import DeformationNetwork
    from egstalker.model.hexplane import TriPlaneField

    torch.manual_seed(0)
    net = DeformationNetwork(TriPlaneField(torch.zeros(3), torch.ones(3), 32, (64, 128)), (512,), 8).train()
    net.recompute_in_backward = case != "kept"
    net.recompute_chunk_rows = CHUNK_ROWS if case == "chunked" else None
    means = torch.rand(gaussians, 3) - 0.5
    audio, au45 = torch.randn(frames, 8, 512), torch.rand(frames)
    viewmats = torch.eye(4).expand(frames, 4, 4).clone()

    def step() -> None:
        offsets = net(net.spatial_cache(means), net.tokens(audio, au45, viewmats))
        loss = sum(getattr(offsets, name).square().mean() for name in ("means", "scales", "quats", "opacities",
                                                                       "colors"))
        loss.backward()

    step()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size
    before = _status_kib("VmRSS")
    start = time.perf_counter()
    step()
    seconds = time.perf_counter() - start
    return {"case": case, "gaussians": gaussians, "frames": frames, "rows": gaussians * frames,
            "chunk_rows": {"kept": None, "whole": gaussians * frames, "chunked": CHUNK_ROWS}[case],
            "peak_rise_gib": round((_status_kib("VmHWM") - before) / 2**20, 3), "step_s": round(seconds, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gaussians", type=int, default=150000)
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)  # one case, in a child process
    args = parser.parse_args()
    if args.case:
        print(json.dumps(measure(args.case, args.gaussians, args.frames)))
        return
    for case in CASES:
        out = subprocess.run([sys.executable, __file__, "--case", case, "--gaussians", str(args.gaussians),
                              "--frames", str(args.frames)], check=True, capture_output=True, text=True).stdout
        result = json.loads(out.strip().splitlines()[-1])
        print(f"{case:8s} {result['frames']} frames x {result['gaussians']} Gaussians, chunk rows "
              f"{result['chunk_rows']}: peak rise {result['peak_rise_gib']:.2f} GiB, step {result['step_s']:.1f} s")


if __name__ == "__main__":
    main()
