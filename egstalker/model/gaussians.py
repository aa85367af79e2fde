"""Canonical 3D Gaussians of the head: raw parameters and their activations.

Parameters live in one `nn.ParameterDict` (one optimiser group per name) so densification can replace them
and keep the optimiser's state aligned (see egstalker.train.densify).
"""

from __future__ import annotations

import torch
from torch import nn

SH_C0 = 0.28209479177387814
SH_C1 = 0.4886025119029199
SH_C2 = (1.0925484305920792, -1.0925484305920792, 0.31539156525252005, -1.0925484305920792, 0.5462742152960396)
SH_C3 = (-0.5900435899266435, 2.890611442640554, -0.4570457994644658, 0.3731763325901154,
         -0.4570457994644658, 1.445305721320277, -0.5900435899266435)

PARAM_NAMES = ("means", "scales", "quats", "opacities", "sh0", "shN")


def rgb_to_sh0(rgb: torch.Tensor) -> torch.Tensor:
    return (rgb - 0.5) / SH_C0


def inverse_sigmoid(x: torch.Tensor) -> torch.Tensor:
    x = x.clamp(1e-6, 1 - 1e-6)
    return torch.log(x / (1 - x))


def eval_sh(degree: int, sh: torch.Tensor, dirs: torch.Tensor) -> torch.Tensor:
    """Colour from spherical harmonics.

    Args:
        sh: [..., K, 3] coefficients, K = (degree + 1) ** 2.
        dirs: [..., 3] unit viewing directions.
    Returns:
        [..., 3] colour (before the +0.5 offset and clamping).
    """
    result = SH_C0 * sh[..., 0, :]
    if degree < 1:
        return result
    x, y, z = dirs[..., 0:1], dirs[..., 1:2], dirs[..., 2:3]
    result = result - SH_C1 * y * sh[..., 1, :] + SH_C1 * z * sh[..., 2, :] - SH_C1 * x * sh[..., 3, :]
    if degree < 2:
        return result
    xx, yy, zz, xy, yz, xz = x * x, y * y, z * z, x * y, y * z, x * z
    result = (result + SH_C2[0] * xy * sh[..., 4, :] + SH_C2[1] * yz * sh[..., 5, :]
              + SH_C2[2] * (2 * zz - xx - yy) * sh[..., 6, :] + SH_C2[3] * xz * sh[..., 7, :]
              + SH_C2[4] * (xx - yy) * sh[..., 8, :])
    if degree < 3:
        return result
    return (result + SH_C3[0] * y * (3 * xx - yy) * sh[..., 9, :] + SH_C3[1] * xy * z * sh[..., 10, :]
            + SH_C3[2] * y * (4 * zz - xx - yy) * sh[..., 11, :]
            + SH_C3[3] * z * (2 * zz - 3 * xx - 3 * yy) * sh[..., 12, :]
            + SH_C3[4] * x * (4 * zz - xx - yy) * sh[..., 13, :] + SH_C3[5] * z * (xx - yy) * sh[..., 14, :]
            + SH_C3[6] * x * (xx - 3 * yy) * sh[..., 15, :])


class GaussianCloud(nn.Module):
    """N canonical Gaussians.

    Raw parameters (`self.params`):
        means [N, 3], scales [N, 3] (log), quats [N, 4] (wxyz, unnormalised), opacities [N] (logit),
        sh0 [N, 1, 3], shN [N, K-1, 3].
    """

    def __init__(self, means: torch.Tensor, rgb: torch.Tensor, scales: torch.Tensor, opacity: float = 0.1,
                 sh_degree: int = 1):
        super().__init__()
        n = means.shape[0]
        self.sh_degree = sh_degree
        quats = torch.zeros(n, 4)
        quats[:, 0] = 1.0
        n_rest = (sh_degree + 1) ** 2 - 1
        self.params = nn.ParameterDict({
            "means": nn.Parameter(means.float().clone()),
            "scales": nn.Parameter(torch.log(scales.float().clamp_min(1e-8))),
            "quats": nn.Parameter(quats),
            "opacities": nn.Parameter(inverse_sigmoid(torch.full((n,), float(opacity)))),
            "sh0": nn.Parameter(rgb_to_sh0(rgb.float()).unsqueeze(1)),
            "shN": nn.Parameter(torch.zeros(n, n_rest, 3)),
        })

    @classmethod
    def empty(cls, n: int, sh_degree: int) -> "GaussianCloud":
        """A cloud of n placeholder Gaussians, to be filled by `load_state_dict` (any n works)."""
        return cls(torch.zeros(n, 3), torch.full((n, 3), 0.5), torch.ones(n, 3), sh_degree=sh_degree)

    def __len__(self) -> int:
        return self.params["means"].shape[0]

    @property
    def means(self) -> torch.Tensor:
        return self.params["means"]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The count changes with densification: resize our parameters to the saved ones before loading.
        for name in PARAM_NAMES:
            key = f"{prefix}params.{name}"
            if key in state_dict and state_dict[key].shape != self.params[name].shape:
                self.params[name] = nn.Parameter(torch.empty_like(state_dict[key], device=self.params[name].device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def colors(self, sh: torch.Tensor, means: torch.Tensor, camera_centers: torch.Tensor) -> torch.Tensor:
        """View-dependent RGB in [0, 1].

        Args:
            sh: [B, N, K, 3] or [N, K, 3]; means: [B, N, 3] or [N, 3]; camera_centers: [B, 3].
        Returns:
            [B, N, 3].
        """
        if self.sh_degree == 0:
            rgb = SH_C0 * sh[..., 0, :] + 0.5
            return rgb.expand(camera_centers.shape[0], *rgb.shape[-2:]) if rgb.dim() == 2 else rgb
        dirs = means - camera_centers[:, None, :]
        dirs = dirs / dirs.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        return (eval_sh(self.sh_degree, sh, dirs) + 0.5).clamp_min(0.0)


def log_scale_from_neighbours(means: torch.Tensor, k: int = 3) -> torch.Tensor:
    """Initial isotropic scales: the mean distance to the k nearest neighbours (as in 3DGS). [N, 3]."""
    from scipy.spatial import cKDTree

    points = means.detach().cpu().numpy()
    dist, _ = cKDTree(points).query(points, k=k + 1)
    mean_dist = torch.from_numpy(dist[:, 1:].mean(axis=1)).float().clamp_min(1e-7)
    return mean_dist[:, None].expand(-1, 3).clone()


def quat_to_rotmat(quats: torch.Tensor) -> torch.Tensor:
    """[..., 4] (w, x, y, z), any norm -> [..., 3, 3] rotation matrices."""
    w, x, y, z = (quats / quats.norm(dim=-1, keepdim=True).clamp_min(1e-12)).unbind(-1)
    rows = [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
            2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
            2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)]
    return torch.stack(rows, dim=-1).reshape(quats.shape[:-1] + (3, 3))


def quaternion_normalise(q: torch.Tensor) -> torch.Tensor:
    return q / q.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def n_sh_coefficients(degree: int) -> int:
    return (degree + 1) ** 2


__all__ = ["GaussianCloud", "PARAM_NAMES", "eval_sh", "inverse_sigmoid", "log_scale_from_neighbours",
           "quaternion_normalise", "quat_to_rotmat", "rgb_to_sh0", "n_sh_coefficients"]
