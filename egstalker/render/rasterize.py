"""One rasterizer boundary for 3D Gaussian splatting, with two backends.

- ``gsplat``: nerfstudio's CUDA kernels (optional dependency ``gsplat==1.5.3``; compiled on first use, see
  docs/gpu.md), imported lazily so ``import egstalker`` works without CUDA.
- ``torch``: a differentiable pure-PyTorch twin (egstalker.render._torch_rasterizer) for CPU training at small
  resolution, tests and machines without CUDA.

Both implement the same image model (gsplat 1.5.3's "classic" mode): EWA projection with the Jacobian of the
pinhole projection, a 0.3 px low-pass added to the 2D covariance, per-pixel alpha
``min(0.999, opacity * exp(-0.5 d^T S^-1 d))`` evaluated at pixel centres (+0.5), contributions with
alpha < 1/255 skipped, front-to-back compositing sorted by camera depth, and a per-pixel stop before the
transmittance would fall to 1e-4 or below.

Example:
    >>> out = rasterize(means, quats, scales, opacities, colors, viewmats, Ks, 128, 128, backend="torch")
    >>> image = out.rgb + (1 - out.alpha) * background      # [B, H, W, 3]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import Tensor

Backend = Literal["auto", "gsplat", "torch"]

# The model's constants, shared by both backends (gsplat 1.5.3 hard-codes the same values in its kernels).
LOW_PASS_PX2 = 0.3
"""Added to the diagonal of every projected 2D covariance (pixels^2): a minimum footprint, gsplat's eps2d."""
ALPHA_MIN = 1.0 / 255.0
"""A Gaussian contributes to a pixel only where its alpha reaches this."""
ALPHA_MAX = 0.999
"""Alpha is clamped to this so transmittance never reaches exactly zero (gsplat 1.5.3's clamp)."""
TRANSMITTANCE_MIN = 1e-4
"""A pixel stops taking Gaussians before the one that would bring its transmittance to this or below."""
MAX_EXTENT_SIGMA = 3.33
"""Largest footprint half-size in standard deviations (opacity-aware extents are smaller)."""
TILE_SIZE = 16
"""gsplat's tile edge in pixels."""


@dataclass
class RasterOutput:
    """What `rasterize` returns; B cameras, H x W pixels, N Gaussians."""

    rgb: Tensor
    """[B, H, W, 3] premultiplied colour (no background); composite as ``rgb + (1 - alpha) * bg``."""
    alpha: Tensor
    """[B, H, W, 1] accumulated opacity."""
    depth: Tensor
    """[B, H, W, 1] alpha-normalised expected camera depth ``sum(w_i z_i) / max(alpha, 1e-10)``."""
    means2d: Tensor
    """[B, N, 2] projected centres in pixels (meaningless where radii == 0); ``.retain_grad()`` has been called
    on it when `track_means2d_grad` so densification can read ``means2d.grad`` after backward."""
    radii: Tensor
    """[B, N] int32 footprint radius in pixels (the larger of the x and y extents); 0 = culled / not visible."""


def gsplat_available() -> bool:
    """True when the gsplat package imports (its CUDA code may still need compiling on first use)."""
    try:
        import gsplat  # noqa: F401
    except ImportError:
        return False
    return True


def rasterize(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    colors: Tensor,
    viewmats: Tensor,
    Ks: Tensor,
    width: int,
    height: int,
    *,
    backend: Backend = "auto",
    track_means2d_grad: bool = False,
    near: float = 0.01,
    far: float = 1e4,
) -> RasterOutput:
    """Render B images of B sets of Gaussians, each seen by its own camera.

    Args:
        means: [B, N, 3] centres in world coordinates.
        quats: [B, N, 4] rotations (w, x, y, z); need not be normalised.
        scales: [B, N, 3] standard deviations along the rotated axes (already exp-activated).
        opacities: [B, N] in [0, 1].
        colors: [B, N, 3].
        viewmats: [B, 4, 4] world-to-camera, OpenCV axes (x right, y down, z forward).
        Ks: [B, 3, 3] pinhole intrinsics in pixels.
        width, height: image size in pixels.
        backend: "gsplat" (CUDA tensors only), "torch", or "auto" = gsplat when the tensors are on CUDA and
            gsplat imports, else torch.
        track_means2d_grad: keep the gradient of the returned `means2d` (for densification).
        near, far: Gaussians whose camera depth is outside [near, far] are culled.

    Returns:
        RasterOutput with rgb [B, H, W, 3], alpha and depth [B, H, W, 1], means2d [B, N, 2], radii [B, N].
    """
    _check_inputs(means, quats, scales, opacities, colors, viewmats, Ks, width, height)
    if backend == "auto":
        backend = "gsplat" if means.is_cuda and gsplat_available() else "torch"
    if backend == "gsplat":
        if not means.is_cuda:
            raise ValueError("the gsplat backend needs CUDA tensors; use backend='torch' on the CPU")
        from egstalker.render._gsplat_rasterizer import rasterize_gsplat

        fn = rasterize_gsplat
    elif backend == "torch":
        from egstalker.render._torch_rasterizer import rasterize_torch

        fn = rasterize_torch
    else:
        raise ValueError(f"unknown rasterizer backend {backend!r}; use 'auto', 'gsplat' or 'torch'")
    return fn(
        means, quats, scales, opacities, colors, viewmats, Ks, int(width), int(height),
        track_means2d_grad=track_means2d_grad, near=float(near), far=float(far),
    )


def _check_inputs(
    means: Tensor, quats: Tensor, scales: Tensor, opacities: Tensor, colors: Tensor,
    viewmats: Tensor, Ks: Tensor, width: int, height: int,
) -> None:
    """Shape checks with messages that name the offending tensor (programming errors, so ValueError)."""
    if means.dim() != 3 or means.shape[-1] != 3:
        raise ValueError(f"means must be [B, N, 3], got {tuple(means.shape)}")
    B, N = means.shape[:2]
    expected = {
        "quats": (quats, (B, N, 4)),
        "scales": (scales, (B, N, 3)),
        "opacities": (opacities, (B, N)),
        "colors": (colors, (B, N, 3)),
        "viewmats": (viewmats, (B, 4, 4)),
        "Ks": (Ks, (B, 3, 3)),
    }
    for name, (tensor, shape) in expected.items():
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{name} must be {list(shape)} for means {list(means.shape)}, got {list(tensor.shape)}")
        if tensor.device != means.device:
            raise ValueError(f"{name} is on {tensor.device} but means is on {means.device}")
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")

