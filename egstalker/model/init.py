"""Dense volumetric initialisation of the canonical head Gaussians.

The seed started from the 478 MediaPipe landmarks: too few, too flat, and densification never caught up
(~1,500 Gaussians, blurry output). Here the head-mask pixels of several training frames (spread over the clip,
so over head poses) are lifted into the canonical head frame at the depth of the tracked face mesh
(interpolated between its projected vertices; nearest vertex outside the mesh, e.g. hair and ears), with the
frame's colours. A second set of points fills the volume behind that surface (skull, hair, the sides of the
head) by pushing lifted pixels further along their camera rays. The result is tens of thousands of coloured
points covering everything the head mask shows from any training pose.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.interpolate import LinearNDInterpolator, NearestNDInterpolator

from egstalker.dataset.reader import TalkingDataset
from egstalker.errors import EgstalkerError


@dataclass
class InitialPoints:
    means: torch.Tensor
    """[N, 3] canonical positions."""
    rgb: torch.Tensor
    """[N, 3] colours in [0, 1]."""
    head_center: torch.Tensor
    """[3] centre of the tracked face mesh."""
    head_radius: float
    """Largest distance of a mesh vertex from the centre (canonical units)."""
    box_center: torch.Tensor
    """[3] centre of the box the tri-planes cover."""
    box_half_size: torch.Tensor
    """[3] half size of that box."""


def project(points: np.ndarray, viewmat: np.ndarray, K: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[N, 3] world points -> ([N, 2] pixel coordinates (pixel centres at +0.5), [N] camera depth)."""
    cam = points @ viewmat[:3, :3].T + viewmat[:3, 3]
    z = cam[:, 2]
    uv = cam[:, :2] / np.maximum(z[:, None], 1e-6) * K[[0, 1], [0, 1]] + K[:2, 2]
    return uv, z


def unproject(uv: np.ndarray, depth: np.ndarray, viewmat: np.ndarray, K: np.ndarray) -> np.ndarray:
    """Pixel coordinates [N, 2] at camera depths [N] -> world points [N, 3]."""
    xy = (uv - K[:2, 2]) / K[[0, 1], [0, 1]] * depth[:, None]
    cam = np.concatenate([xy, depth[:, None]], axis=1)
    return (cam - viewmat[:3, 3]) @ viewmat[:3, :3]


def dense_head_points(data: TalkingDataset, vertices: np.ndarray, n_frames: int = 12, surface_points: int = 40000,
                      volume_points: int = 20000, volume_depth: float = 0.8, seed: int = 0,
                      show_progress: bool = False) -> InitialPoints:
    """Lift head pixels of `n_frames` training frames to 3D (see the module docstring).

    Args:
        data: the training split (images are read at its resolution).
        vertices: [n_frames_total or 1, V, 3] tracked face vertices in the canonical frame.
        volume_depth: how far behind the surface volume points go, as a fraction of the head radius.
    """
    rng = np.random.default_rng(seed)
    mean_vertices = vertices.mean(0)
    head_center = mean_vertices.mean(0)
    head_radius = float(np.linalg.norm(mean_vertices - head_center, axis=1).max())
    if not np.isfinite(head_radius) or head_radius <= 0:
        raise EgstalkerError(f"tracked vertices in {data.layout.track_params} are degenerate; re-run preprocess --task 8")

    faces = data.face_frames()  # an interpolated frame's pixels do not show the face its landmarks place
    picks = faces[np.unique(np.linspace(0, len(faces) - 1, min(n_frames, len(faces))).round().astype(int))]
    per_frame_surface = int(np.ceil(surface_points / len(picks)))
    per_frame_volume = int(np.ceil(volume_points / len(picks)))
    means, colors = [], []
    iterator = picks
    if show_progress:
        from tqdm import tqdm

        iterator = tqdm(picks, desc="initialising Gaussians", unit="frame", leave=False)
    for k in iterator:
        frame_id = int(data.frame_ids[k])
        frame_vertices = vertices[frame_id] if frame_id < len(vertices) else mean_vertices
        viewmat, K = data.viewmats[k].astype(np.float64), data.K.astype(np.float64)
        uv, z = project(frame_vertices.astype(np.float64), viewmat, K)
        if (z <= 0).mean() > 0.5:
            raise EgstalkerError("the tracked face is behind the camera in the dataset's transforms; "
                                 "re-run preprocess --task 8 and --task 9")
        mask = data.head_mask(k) > 0.5
        ys, xs = np.nonzero(mask)
        if len(xs) < 10:
            continue
        image = data.image(k)
        linear = LinearNDInterpolator(uv, z)
        nearest = NearestNDInterpolator(uv, z)
        for count, behind in ((per_frame_surface, False), (per_frame_volume, True)):
            pick = rng.integers(0, len(xs), size=count)
            # Jitter within the pixel so points from different frames do not stack on one grid.
            pix = np.stack([xs[pick], ys[pick]], axis=1) + rng.uniform(0.0, 1.0, size=(count, 2))
            depth = linear(pix)
            missing = ~np.isfinite(depth)
            if missing.any():
                depth[missing] = nearest(pix[missing])
            if behind:
                depth = depth + rng.uniform(0.05, 1.0, size=count) * volume_depth * head_radius
            means.append(unproject(pix, depth, viewmat, K))
            colors.append(image[ys[pick], xs[pick]])
    if not means:
        raise EgstalkerError(f"no head pixels in the parsing masks of {data.layout.root}; re-run preprocess --task 4")
    means_np = np.concatenate(means).astype(np.float32)
    lo, hi = np.percentile(means_np, 0.5, axis=0), np.percentile(means_np, 99.5, axis=0)
    box_center = 0.5 * (lo + hi)
    box_half = 0.5 * (hi - lo) * 1.2 + 0.05 * head_radius
    return InitialPoints(
        means=torch.from_numpy(means_np),
        rgb=torch.from_numpy(np.concatenate(colors).astype(np.float32)),
        head_center=torch.from_numpy(head_center.astype(np.float32)),
        head_radius=head_radius,
        box_center=torch.from_numpy(box_center.astype(np.float32)),
        box_half_size=torch.from_numpy(box_half.astype(np.float32)),
    )
