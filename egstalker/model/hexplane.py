"""Tri-plane spatial feature field (the static half of a hex-plane: time comes from the tokens instead).

Each scale holds 3 axis-aligned grids (xy, xz, yz) of `channels` features. A point's feature at one scale is
the product of its bilinear samples on the three planes (multiplicative fusion, as in K-planes); the scales
are concatenated: `channels * len(resolutions)` features per point (64 with the defaults).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

PLANE_AXES = ((0, 1), (0, 2), (1, 2))


class TriPlaneField(nn.Module):
    """Features of 3D points from axis-aligned feature planes at several scales.

    Args:
        center: [3] centre of the box the planes cover (canonical head frame).
        half_size: [3] half extent of the box; points outside are clamped to its border.

    Example:
        >>> field = TriPlaneField(torch.zeros(3), torch.ones(3))
        >>> field(torch.rand(10, 3)).shape
        torch.Size([10, 64])
    """

    def __init__(self, center: torch.Tensor, half_size: torch.Tensor, channels: int = 32,
                 resolutions: tuple[int, ...] = (64, 128)):
        super().__init__()
        self.channels = channels
        self.resolutions = tuple(int(r) for r in resolutions)
        self.register_buffer("center", center.float().clone())
        self.register_buffer("half_size", half_size.float().clone())
        self.planes = nn.ParameterList()
        for res in self.resolutions:
            for _ in PLANE_AXES:
                # Uniform in [0.1, 0.5]: the product of three samples starts small but non-zero.
                self.planes.append(nn.Parameter(torch.empty(1, channels, res, res).uniform_(0.1, 0.5)))

    @property
    def out_dim(self) -> int:
        return self.channels * len(self.resolutions)

    def normalise(self, points: torch.Tensor) -> torch.Tensor:
        return ((points - self.center) / self.half_size).clamp(-1.0, 1.0)

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        """points: [N, 3] canonical positions -> [N, out_dim] features."""
        uvw = self.normalise(points)
        features = []
        for s in range(len(self.resolutions)):
            product = None
            for p, (a, b) in enumerate(PLANE_AXES):
                grid = uvw[:, (a, b)].view(1, -1, 1, 2)
                sample = F.grid_sample(self.planes[3 * s + p], grid, mode="bilinear", padding_mode="border",
                                       align_corners=True)  # [1, C, N, 1]
                sample = sample[0, :, :, 0].t()
                product = sample if product is None else product * sample
            features.append(product)
        return torch.cat(features, dim=-1)

    def total_variation(self) -> torch.Tensor:
        """Mean squared difference of neighbouring grid cells over all planes (a smoothness regulariser)."""
        total = 0.0
        for plane in self.planes:
            total = total + (plane[..., 1:, :] - plane[..., :-1, :]).pow(2).mean()
            total = total + (plane[..., :, 1:] - plane[..., :, :-1]).pow(2).mean()
        return total / len(self.planes)
