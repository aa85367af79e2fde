"""GPU check that the gsplat and pure-PyTorch rasterizers agree, and how fast each is.

1. Times the first gsplat call (the one-time JIT build of its CUDA code, or the load of a prebuilt .so).
2. Parity on random head scenes: images (rgb, alpha, depth) and gradients of a random-weight loss on rgb and
   alpha w.r.t. means, quats, scales, opacities and colors, gsplat (float32) vs torch (float32), and both vs the
   torch backend in float64 as a reference, so float32 noise and model differences can be told apart.
   Errors are normalised per tensor: max_rel = max|a - b| / max|b|, mean_rel = mean|a - b| / mean|b|.
3. Speed at 512x512 with 50k Gaussians: forward and forward+backward, median of CUDA-synchronised runs.

Run on a CUDA machine with gsplat==1.5.3 importable:
    TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 TORCH_EXTENSIONS_DIR=$PWD/.torch_ext python benchmarks/rasterizer_parity_gpu.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from rasterizer_scene import head_scene  # noqa: E402

from egstalker.render.rasterize import rasterize  # noqa: E402

PARAM_NAMES = ("means", "quats", "scales", "opacities", "colors")


def render_with_grads(tensors, size, backend, dtype, weights):
    """Render, backprop sum(w_rgb * rgb) + sum(w_alpha * alpha); return images and parameter gradients."""
    params = [t.to(dtype).clone().requires_grad_(True) for t in tensors[:5]]
    viewmats, Ks = (t.to(dtype) for t in tensors[5:])
    out = rasterize(*params, viewmats, Ks, size, size, backend=backend, track_means2d_grad=True)
    w_rgb, w_alpha = (w.to(dtype) for w in weights)
    ((out.rgb * w_rgb).sum() + (out.alpha * w_alpha).sum()).backward()
    images = {"rgb": out.rgb, "alpha": out.alpha, "depth": out.depth, "means2d.grad": out.means2d.grad}
    grads = {name: p.grad for name, p in zip(PARAM_NAMES, params)}
    return {k: v.detach().double() for k, v in images.items()}, {k: v.double() for k, v in grads.items()}, out


def rel_errors(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    diff = (a - b).abs()
    return (diff.max() / b.abs().max().clamp(min=1e-30)).item(), (diff.mean() / b.abs().mean().clamp(min=1e-30)).item()


def parity(n: int, size: int, batch: int, seed: int) -> None:
    tensors = head_scene(n, size, batch=batch, seed=seed, device="cuda")
    gen = torch.Generator().manual_seed(seed + 100)
    weights = (torch.randn(batch, size, size, 3, generator=gen).cuda(), torch.randn(batch, size, size, 1, generator=gen).cuda())
    ref_img, ref_grad, ref_out = render_with_grads(tensors, size, "torch", torch.float64, weights)
    g_img, g_grad, g_out = render_with_grads(tensors, size, "gsplat", torch.float32, weights)
    t_img, t_grad, t_out = render_with_grads(tensors, size, "torch", torch.float32, weights)
    same_radii = (g_out.radii == t_out.radii).float().mean().item()
    print(f"\n## scene N={n} {size}x{size} batch={batch} seed={seed}: visible gsplat={int((g_out.radii > 0).sum())} "
          f"torch={int((t_out.radii > 0).sum())}; radii equal for {same_radii * 100:.3f}% of Gaussians")
    print(f"{'quantity':<16}{'gsplat vs torch32':>30}{'gsplat vs torch64':>30}{'torch32 vs torch64':>30}")
    print(f"{'':<16}{'max_rel     mean_rel':>30}{'max_rel     mean_rel':>30}{'max_rel     mean_rel':>30}")
    covered = (ref_img["alpha"] > 0.5).expand_as(ref_img["depth"])
    rows = [(k, g_img[k], t_img[k], ref_img[k]) for k in ("rgb", "alpha")]
    rows.append(("depth(a>0.5)", g_img["depth"][covered], t_img["depth"][covered], ref_img["depth"][covered]))
    rows.append(("grad means2d", g_img["means2d.grad"], t_img["means2d.grad"], ref_img["means2d.grad"]))
    rows += [(f"grad {k}", g_grad[k], t_grad[k], ref_grad[k]) for k in PARAM_NAMES]
    for name, g, t, r in rows:
        cells = [rel_errors(g, t), rel_errors(g, r), rel_errors(t, r)]
        print(f"{name:<16}" + "".join(f"{mx:>16.2e}{mn:>12.2e}  " for mx, mn in cells))


def cuda_times(fn, repeats: int) -> list[float]:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def speed(n: int, size: int, repeats: int, backends=("gsplat", "torch")) -> None:
    tensors = head_scene(n, size, device="cuda")
    params = [t.clone().requires_grad_(True) for t in tensors[:5]]
    viewmats, Ks = tensors[5:]
    target = torch.rand(1, size, size, 3, device="cuda")
    print(f"\n## speed N={n} {size}x{size}, median of {repeats} after 3 warm-ups (ms)")
    for backend in backends:
        def forward():
            with torch.no_grad():
                rasterize(*params, viewmats, Ks, size, size, backend=backend)

        def forward_backward():
            out = rasterize(*params, viewmats, Ks, size, size, backend=backend, track_means2d_grad=True)
            ((out.rgb + (1 - out.alpha) - target) ** 2).mean().backward()

        torch.cuda.reset_peak_memory_stats()
        fwd = cuda_times(forward, repeats)
        fwd_bwd = cuda_times(forward_backward, repeats)
        peak = torch.cuda.max_memory_allocated() / 2**30
        print(f"{backend:<8} forward {statistics.median(fwd) * 1e3:9.2f}   forward+backward "
              f"{statistics.median(fwd_bwd) * 1e3:9.2f}   peak GPU memory {peak:6.2f} GiB")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--speed-only", action="store_true", help="skip the parity scenes")
    args = parser.parse_args()
    print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}; "
          f"TORCH_EXTENSIONS_DIR={os.environ.get('TORCH_EXTENSIONS_DIR')}")
    tensors = head_scene(100, 64, device="cuda")
    start = time.perf_counter()
    try:
        rasterize(*tensors, 64, 64, backend="gsplat")
    except Exception:  # still measure the torch backend, so a failed build does not waste the GPU call
        import traceback

        traceback.print_exc()
        speed(50000, 512, args.repeats, backends=("torch",))
        raise SystemExit(1)
    torch.cuda.synchronize()
    import gsplat

    print(f"gsplat {gsplat.__version__} from {Path(gsplat.__file__).parent}; first call (build or load of the "
          f"CUDA extension included): {time.perf_counter() - start:.1f} s")
    if not args.speed_only:
        parity(2000, 128, batch=2, seed=0)
        parity(20000, 256, batch=1, seed=1)
        parity(50000, 512, batch=1, seed=2)
    speed(50000, 512, args.repeats)


if __name__ == "__main__":
    main()
