"""Pure-PyTorch Gaussian rasterizer, differentiable through autograd (the twin of the gsplat backend).

Memory and time scale with the number of (pixel, Gaussian) pairs inside the Gaussians' footprints, not with
N x H x W: Gaussians are projected and culled, sorted by depth, each one's footprint box is enumerated as
pixel ids, pairs below the alpha threshold are dropped, and the survivors are stable-sorted by pixel so each
pixel's pairs are contiguous and front to back. Transmittance is then a segmented exclusive cumulative sum of
log(1 - alpha) (in float64, so the global running sum keeps precision), and colours are scattered back with
index_add.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from egstalker.render.rasterize import (
    ALPHA_MAX,
    ALPHA_MIN,
    LOW_PASS_PX2,
    MAX_EXTENT_SIGMA,
    TRANSMITTANCE_MIN,
    RasterOutput,
)


def quat_to_rotmat(quats: Tensor) -> Tensor:
    """[..., 4] (w, x, y, z), any norm -> [..., 3, 3] rotation matrices."""
    w, x, y, z = F.normalize(quats, dim=-1).unbind(-1)
    rows = [
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ]
    return torch.stack(rows, dim=-1).reshape(quats.shape[:-1] + (3, 3))


def project_gaussians(
    means: Tensor, quats: Tensor, scales: Tensor, opacities: Tensor, viewmats: Tensor, Ks: Tensor,
    width: int, height: int, near: float, far: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """EWA projection of world-space Gaussians into each camera, as gsplat's fused projection kernel.

    Args: means [B, N, 3], quats [B, N, 4], scales [B, N, 3], opacities [B, N], viewmats [B, 4, 4], Ks [B, 3, 3].

    Returns:
        means2d [B, N, 2] pixel centres, conics [B, N, 3] (upper triangle of the inverse blurred 2D covariance:
        a, b, c), depths [B, N] camera z, radii [B, N, 2] int64 footprint half-sizes (0 where culled).
    """
    rot = viewmats[:, None, :3, :3]  # [B, 1, 3, 3]
    means_cam = (rot @ means[..., None]).squeeze(-1) + viewmats[:, None, :3, 3]  # [B, N, 3]
    x, y, z = means_cam.unbind(-1)
    in_depth = (z >= near) & (z <= far)
    # Culled Gaussians must not put inf/NaN into the graph (0 * inf in backward): give them a harmless depth.
    z = torch.where(in_depth, z, torch.ones_like(z))

    m = quat_to_rotmat(quats) * scales[..., None, :]  # R diag(s): [B, N, 3, 3]
    cov_world = m @ m.transpose(-1, -2)
    cov_cam = rot @ cov_world @ rot.transpose(-1, -2)

    fx, fy = Ks[:, 0, 0, None], Ks[:, 1, 1, None]  # [B, 1]
    cx, cy = Ks[:, 0, 2, None], Ks[:, 1, 2, None]
    # The Jacobian is evaluated at a centre clamped to 1.3x the field of view, so Gaussians far outside the
    # image do not get huge footprints (gsplat's persp_proj does the same).
    lim_x_pos = (width - cx) / fx + 0.3 * (0.5 * width / fx)
    lim_x_neg = cx / fx + 0.3 * (0.5 * width / fx)
    lim_y_pos = (height - cy) / fy + 0.3 * (0.5 * height / fy)
    lim_y_neg = cy / fy + 0.3 * (0.5 * height / fy)
    tx = z * torch.minimum(torch.maximum(x / z, -lim_x_neg), lim_x_pos)
    ty = z * torch.minimum(torch.maximum(y / z, -lim_y_neg), lim_y_pos)
    zeros = torch.zeros_like(z)
    jac = torch.stack(
        [fx / z, zeros, -fx * tx / (z * z), zeros, fy / z, -fy * ty / (z * z)], dim=-1
    ).reshape(z.shape + (2, 3))
    cov2d = jac @ cov_cam @ jac.transpose(-1, -2)  # [B, N, 2, 2]

    a = cov2d[..., 0, 0] + LOW_PASS_PX2
    b = 0.5 * (cov2d[..., 0, 1] + cov2d[..., 1, 0])
    c = cov2d[..., 1, 1] + LOW_PASS_PX2
    det = a * c - b * b
    det_ok = det > 0
    safe_det = torch.where(det_ok, det, torch.ones_like(det))
    conics = torch.stack([c / safe_det, -b / safe_det, a / safe_det], dim=-1)
    means2d = torch.stack([fx * x / z + cx, fy * y / z + cy], dim=-1)

    with torch.no_grad():
        # Opacity-aware extent: beyond sqrt(2 ln(255 o)) sigmas alpha is below 1/255 anyway.
        visible_opacity = opacities >= ALPHA_MIN
        extent = torch.sqrt(2.0 * torch.log(opacities.clamp(min=ALPHA_MIN) / ALPHA_MIN)).clamp(max=MAX_EXTENT_SIGMA)
        radius_x = torch.ceil(extent * torch.sqrt(a.clamp(min=0)))
        radius_y = torch.ceil(extent * torch.sqrt(c.clamp(min=0)))
        mx, my = means2d.unbind(-1)
        on_screen = (mx + radius_x > 0) & (mx - radius_x < width) & (my + radius_y > 0) & (my - radius_y < height)
        nonzero = (radius_x > 0) | (radius_y > 0)
        visible = in_depth & det_ok & visible_opacity & nonzero & on_screen
        radii = torch.stack([radius_x, radius_y], dim=-1).to(torch.int64) * visible[..., None]
    return means2d, conics, means_cam[..., 2], radii


def rasterize_torch(
    means: Tensor, quats: Tensor, scales: Tensor, opacities: Tensor, colors: Tensor, viewmats: Tensor,
    Ks: Tensor, width: int, height: int, *, track_means2d_grad: bool = False, near: float = 0.01,
    far: float = 1e4,
) -> RasterOutput:
    """The `egstalker.render.rasterize` contract in pure PyTorch (see that function for shapes)."""
    B, N = means.shape[:2]
    n_pixels = height * width
    means2d, conics, depths, radii = project_gaussians(
        means, quats, scales, opacities, viewmats, Ks, width, height, near, far
    )
    if track_means2d_grad and means2d.requires_grad:
        means2d.retain_grad()

    pixel_ids, gaussian_ids, pair_alpha = _footprint_pairs(means2d.detach(), conics.detach(), opacities.detach(),
                                                           depths.detach(), radii, width, height)

    if torch.is_grad_enabled() and any(t.requires_grad for t in (means2d, conics, opacities, colors, depths)):
        # Everything below is differentiable w.r.t. means2d, conics, opacities, colors and depths. One gather of all
        # per-Gaussian attributes (index_select: its backward is a single index_add, far cheaper than indexing's),
        # and the pairs' alpha again, now with its graph (the same values as the culling's).
        attributes = torch.cat(
            [means2d, conics, opacities[..., None], colors, depths[..., None]], dim=-1
        ).reshape(B * N, 10).index_select(0, gaussian_ids)  # [M, 10]
        # split, not slicing: its backward concatenates the pieces' gradients once, where each slice's backward
        # would zero-fill a whole [M, 10] tensor
        pair_means2d, pair_conics, pair_opacity, pair_features = attributes.split([2, 3, 1, 4], dim=1)  # rgb, z
        pixel_in_image = pixel_ids % n_pixels
        centres = torch.stack([(pixel_in_image % width), (pixel_in_image // width)], dim=-1).to(means.dtype) + 0.5
        alpha = _pair_alpha(centres, pair_means2d, pair_conics, pair_opacity.squeeze(1))
    else:  # rendering: the culling's alpha as is, and only colour and depth gathered
        alpha = pair_alpha
        pair_features = torch.cat([colors, depths[..., None]], dim=-1).reshape(B * N, 4).index_select(0, gaussian_ids)
    log_transmit = torch.log1p(-alpha)  # [M]

    # Exclusive cumulative log-transmittance within each pixel's (contiguous, front-to-back) run of pairs.
    running = torch.cumsum(log_transmit.double(), dim=0) - log_transmit.double()
    _, run_lengths = torch.unique_consecutive(pixel_ids, return_counts=True)
    run_starts = torch.cumsum(run_lengths, dim=0) - run_lengths
    before = running - running.index_select(0, torch.repeat_interleave(run_starts, run_lengths))
    with torch.no_grad():
        # gsplat stops a pixel *before* the Gaussian that would take T to <= 1e-4; T only decreases along the
        # run, so the pairs it keeps are exactly those whose transmittance after them stays above the bound.
        keep = (before + log_transmit.double()) > math.log(TRANSMITTANCE_MIN)
    weights = (alpha * torch.exp(before).to(alpha.dtype)) * keep  # [M]

    channels = torch.cat([pair_features, torch.ones_like(alpha)[:, None]], dim=-1)  # rgb, z, 1
    image = means.new_zeros(B * n_pixels, 5).index_add(0, pixel_ids, weights[:, None] * channels)
    rgb, depth_sum, alpha_image = image.reshape(B, height, width, 5).split([3, 1, 1], dim=-1)
    return RasterOutput(
        rgb=rgb,
        alpha=alpha_image,
        depth=depth_sum / alpha_image.clamp(min=1e-10),
        means2d=means2d,
        radii=radii.amax(dim=-1).to(torch.int32),
    )


def _pair_alpha(centres: Tensor, means2d: Tensor, conics: Tensor, opacities: Tensor) -> Tensor:
    """Alpha of M (pixel, Gaussian) pairs: centres/means2d [M, 2], conics [M, 3], opacities [M] -> [M]."""
    dx, dy = (means2d - centres).unbind(-1)
    sigma = 0.5 * (conics[:, 0] * dx * dx + conics[:, 2] * dy * dy) + conics[:, 1] * dx * dy
    return torch.clamp(opacities * torch.exp(-sigma), max=ALPHA_MAX)


@torch.no_grad()
def _footprint_pairs(
    means2d: Tensor, conics: Tensor, opacities: Tensor, depths: Tensor, radii: Tensor, width: int, height: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """All (pixel, Gaussian) pairs with alpha >= 1/255, sorted by pixel and, within a pixel, by depth.

    Returns pixel_ids [M] (b * H * W + row * W + col) and gaussian_ids [M] (b * N + n), both int64, and the pairs'
    alpha [M].
    """
    B, N = means2d.shape[:2]
    device = means2d.device
    visible = (radii > 0).any(-1).reshape(-1).nonzero().squeeze(1)  # flat ids b * N + n
    empty = torch.zeros(0, dtype=torch.int64, device=device)
    no_alpha = means2d.new_zeros(0)
    if visible.numel() == 0:
        return empty, empty, no_alpha
    # Front to back: the stable sort by pixel below keeps this order inside each pixel.
    visible = visible[torch.argsort(depths.reshape(-1)[visible], stable=True)]

    centre = means2d.reshape(-1, 2)[visible]
    radius = radii.reshape(-1, 2)[visible].to(centre.dtype)
    # Pixels whose centre (col + 0.5) lies inside [mean - r, mean + r]; the alpha test below trims the rest.
    col0 = torch.ceil(centre[:, 0] - radius[:, 0] - 0.5).clamp(0, width).long()
    col1 = (torch.floor(centre[:, 0] + radius[:, 0] - 0.5) + 1).clamp(0, width).long()
    row0 = torch.ceil(centre[:, 1] - radius[:, 1] - 0.5).clamp(0, height).long()
    row1 = (torch.floor(centre[:, 1] + radius[:, 1] - 0.5) + 1).clamp(0, height).long()
    box_w = (col1 - col0).clamp(min=0)
    counts = box_w * (row1 - row0).clamp(min=0)
    total = int(counts.sum())
    if total == 0:
        return empty, empty, no_alpha

    # index_select rather than x[ids] throughout: on the CPU it gathers 1-D ids several times faster
    owner = torch.repeat_interleave(torch.arange(visible.numel(), device=device), counts)  # [M]
    offset = torch.arange(total, device=device) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    owner_w = box_w.index_select(0, owner)
    col = col0.index_select(0, owner) + offset % owner_w
    row = row0.index_select(0, owner) + torch.div(offset, owner_w, rounding_mode="floor")
    gaussian_ids = visible.index_select(0, owner)
    image_ids = torch.div(gaussian_ids, N, rounding_mode="floor")
    pixel_ids = image_ids * (height * width) + row * width + col

    centres = torch.stack([col, row], dim=-1).to(means2d.dtype) + 0.5
    alpha = _pair_alpha(centres, centre.index_select(0, owner), conics.reshape(-1, 3).index_select(0, gaussian_ids),
                        opacities.reshape(-1).index_select(0, gaussian_ids))
    kept = (alpha >= ALPHA_MIN).nonzero().squeeze(1)
    pixel_ids = pixel_ids.index_select(0, kept)
    by_pixel = torch.argsort(pixel_ids, stable=True)
    order = kept.index_select(0, by_pixel)  # the kept pairs, sorted, as positions among all enumerated pairs
    return pixel_ids.index_select(0, by_pixel), gaussian_ids.index_select(0, order), alpha.index_select(0, order)
