"""gsplat 1.5.3 CUDA backend of `egstalker.render.rasterize` (imported only when that backend is used).

gsplat compiles its CUDA code with torch's JIT on first use (about 1.5 minutes on 16 cores) into
``$TORCH_EXTENSIONS_DIR/gsplat_cuda/``. Even with that folder present, torch re-runs ninja in every new process,
which rebuilds everything unless the object files, ninja logs and source timestamps all survived. So when a
prebuilt ``gsplat_cuda.so`` sits in that folder we load it directly and hand it to gsplat as its compiled module
(gsplat first tries ``from gsplat import csrc``); see docs/gpu.md for carrying it to a fresh GPU machine.
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
from pathlib import Path

import torch
from torch import Tensor

from egstalker.errors import EgstalkerWarning
from egstalker.render.rasterize import LOW_PASS_PX2, TILE_SIZE, RasterOutput

GSPLAT_VERSION = "1.5.3"
EXTENSION_NAME = "gsplat_cuda"


def prebuilt_extension_path() -> Path | None:
    """``$TORCH_EXTENSIONS_DIR/gsplat_cuda/gsplat_cuda.so`` when TORCH_EXTENSIONS_DIR is set and the file exists."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if not root:
        return None
    path = Path(root) / EXTENSION_NAME / f"{EXTENSION_NAME}.so"
    return path if path.is_file() else None


def _use_prebuilt_extension() -> None:
    """Register a prebuilt gsplat_cuda.so as ``gsplat.csrc`` so gsplat skips its JIT build (no-op otherwise)."""
    if "gsplat.csrc" in sys.modules:
        return
    path = prebuilt_extension_path()
    if path is None:
        return
    spec = importlib.util.spec_from_file_location(EXTENSION_NAME, path)
    try:  # module_from_spec dlopens the .so; it links against libtorch, already loaded by our torch import
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except (ImportError, OSError) as exc:  # built for another torch/CUDA: let gsplat build a fresh one
        import warnings

        warnings.warn(f"ignoring prebuilt {path} ({exc}); gsplat will compile its CUDA code", EgstalkerWarning,
                      stacklevel=3)
        return
    sys.modules["gsplat.csrc"] = module


def _import_gsplat():
    _use_prebuilt_extension()
    try:
        import gsplat
    except ImportError as exc:
        raise ImportError(
            f"the gsplat backend needs gsplat=={GSPLAT_VERSION} (pip install 'egstalker[cuda]'); "
            "or use backend='torch'"
        ) from exc
    if gsplat.__version__ != GSPLAT_VERSION:
        # Other versions may round or cull differently from the torch twin; warn once, do not refuse.
        import warnings

        warnings.warn(f"egstalker is tested with gsplat {GSPLAT_VERSION}, found {gsplat.__version__}", EgstalkerWarning,
                      stacklevel=3)
    return gsplat


def rasterize_gsplat(
    means: Tensor, quats: Tensor, scales: Tensor, opacities: Tensor, colors: Tensor, viewmats: Tensor,
    Ks: Tensor, width: int, height: int, *, track_means2d_grad: bool = False, near: float = 0.01,
    far: float = 1e4,
) -> RasterOutput:
    """The `egstalker.render.rasterize` contract on gsplat's CUDA kernels (see that function for shapes).

    Calls gsplat's four stages directly (rather than `gsplat.rasterization`) so the [B, N, 2] means2d handed
    back is the very tensor the rasterization kernel consumed, and its .grad is the densification signal.
    """
    gsplat = _import_gsplat()
    B, N = means.shape[:2]
    # One camera per batch element: gsplat's layout is [..., C, ...] with batch dims (B,) and C = 1.
    radii, means2d, depths, conics, _ = gsplat.fully_fused_projection(
        means.contiguous(), None, quats.contiguous(), scales.contiguous(),
        viewmats[:, None].contiguous(), Ks[:, None].contiguous(), width, height,
        eps2d=LOW_PASS_PX2, near_plane=near, far_plane=far, packed=False, opacities=opacities.contiguous(),
    )
    radii, means2d, depths, conics = radii[:, 0], means2d[:, 0], depths[:, 0], conics[:, 0]
    if track_means2d_grad and means2d.requires_grad:
        means2d.retain_grad()

    tiles_x = math.ceil(width / TILE_SIZE)
    tiles_y = math.ceil(height / TILE_SIZE)
    _, isect_ids, flatten_ids = gsplat.isect_tiles(means2d, radii, depths, TILE_SIZE, tiles_x, tiles_y)
    isect_offsets = gsplat.isect_offset_encode(isect_ids, B, tiles_x, tiles_y).reshape(B, tiles_y, tiles_x)

    # Depth rides along as a fourth colour channel, as in gsplat's "RGB+ED" mode.
    features = torch.cat([colors, depths[..., None]], dim=-1)  # [B, N, 4]
    image, alpha = gsplat.rasterize_to_pixels(
        means2d, conics, features.contiguous(), opacities.contiguous(), width, height, TILE_SIZE,
        isect_offsets, flatten_ids,
    )
    return RasterOutput(
        rgb=image[..., :3],
        alpha=alpha,
        depth=image[..., 3:4] / alpha.clamp(min=1e-10),
        means2d=means2d,
        radii=radii.amax(dim=-1).to(torch.int32),
    )
