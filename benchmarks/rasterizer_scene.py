"""A head-sized random Gaussian scene for the rasterizer benchmarks (shared by the CPU and GPU scripts).

N Gaussians fill a unit ball 4 units in front of an identity camera whose focal length makes the ball span
about 70% of the image, with sizes near the mean spacing of their centres (so the image is covered a few
Gaussians deep, like a densified head), random rotations, opacities in (0.05, 0.95) and colours in [0, 1].
"""

from __future__ import annotations

import torch


def head_scene(n: int, size: int, batch: int = 1, seed: int = 0, device="cpu", dtype=torch.float32):
    """Returns (means, quats, scales, opacities, colors, viewmats, Ks) for `rasterize` at size x size."""
    gen = torch.Generator().manual_seed(seed)
    direction = torch.nn.functional.normalize(torch.randn(batch, n, 3, generator=gen), dim=-1)
    radius = torch.rand(batch, n, 1, generator=gen) ** (1 / 3)
    means = direction * radius + torch.tensor([0.0, 0.0, 4.0])
    spacing = (4.19 / n) ** (1 / 3)
    scales = spacing * 0.5 * torch.exp(0.3 * torch.randn(batch, n, 3, generator=gen))
    quats = torch.randn(batch, n, 4, generator=gen)
    opacities = 0.05 + 0.9 * torch.rand(batch, n, generator=gen)
    colors = torch.rand(batch, n, 3, generator=gen)
    focal = 0.7 * size / 2 * 4.0
    viewmats = torch.eye(4).expand(batch, 4, 4).clone()
    viewmats[:, 0, 3] = 0.05 * torch.arange(batch)  # distinct cameras within a batch
    Ks = torch.tensor([[focal, 0, size / 2], [0, focal, size / 2], [0, 0, 1.0]]).expand(batch, 3, 3).clone()
    tensors = (means, quats, scales, opacities, colors, viewmats, Ks)
    return tuple(t.to(device=device, dtype=dtype) for t in tensors)
