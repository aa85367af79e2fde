"""First gsplat call of a process, timed: builds gsplat's CUDA code once (or loads the prebuilt .so from
$TORCH_EXTENSIONS_DIR). On a machine without CUDA it runs the torch backend instead (a dry run).

    python benchmarks/gsplat_warmup.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from egstalker.render.rasterize import rasterize  # noqa: E402


def main() -> None:
    dev, backend = ("cuda", "gsplat") if torch.cuda.is_available() else ("cpu", "torch")
    t0 = time.perf_counter()
    n = 1000
    g = torch.Generator().manual_seed(0)
    means = torch.rand(1, n, 3, generator=g) - 0.5
    means[..., 2] += 3
    quats = torch.nn.functional.normalize(torch.randn(1, n, 4, generator=g), dim=-1)
    scales, opacities = torch.full((1, n, 3), 0.02), torch.full((1, n), 0.5)
    colors = torch.rand(1, n, 3, generator=g)
    K = torch.tensor([[[300.0, 0, 128], [0, 300.0, 128], [0, 0, 1]]])
    args = [t.to(dev) for t in (means, quats, scales, opacities, colors, torch.eye(4)[None], K)]
    out = rasterize(*args, 256, 256, backend=backend)
    if dev == "cuda":
        torch.cuda.synchronize()
    print(f"first {backend} call (build or load) {time.perf_counter() - t0:.1f} s, "
          f"alpha mean {out.alpha.mean().item():.4f}")


if __name__ == "__main__":
    main()
