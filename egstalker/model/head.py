"""The audio-driven Gaussian head: canonical Gaussians + deformation network + rasterisation + compositing.

Only the head (face, hair, ears) is Gaussians. Each frame is rendered over a background image that already
holds the torso and neck of a *pose frame* of the dataset (its `torso_imgs` composite on `bc.jpg`), the same
frame whose camera gives the head pose: the torso then always agrees with the head pose, never flickers
(it is a real image), and novel audio can only move the head's Gaussians. An alpha loss against the head
mask keeps the Gaussians off the neck and torso. See docs/model.md.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from egstalker.model.deformation import DeformationNetwork, Offsets, SpatialCache
from egstalker.model.gaussians import GaussianCloud, n_sh_coefficients
from egstalker.model.hexplane import TriPlaneField


@dataclass
class ModelSpec:
    """Everything needed to rebuild the architecture (saved in model.json; the weights hold the values)."""

    feature_shape: tuple[int, ...]
    audio_window: int
    n_gaussians: int
    sh_degree: int = 1
    plane_channels: int = 32
    plane_resolutions: tuple[int, ...] = (64, 128)
    d_model: int = 64
    n_heads: int = 4
    ffn_width: int = 128
    dropout: float = 0.1
    audio_width: int = 32
    head_width: int = 128
    pose_dropout: float = 0.0
    """Training only: probability of replacing a frame's pose token with the null token."""
    audio_dropout: float = 0.0
    """Training only: dropout on the audio adapter's standardised input features."""
    head_radius: float = 1.0
    """Radius of the head in canonical units (sets the scale of position offsets and learning rates)."""
    audio_future: int | None = None
    """Feature rows after a frame's own row that its audio window reads (the model's share of the streaming
    look-ahead). None: the centred window of models saved before this field existed."""

    def __post_init__(self) -> None:
        if self.audio_future is None:
            from egstalker.audio.base import centred_future_rows

            self.audio_future = centred_future_rows(self.audio_window)
        if not 0 <= self.audio_future < self.audio_window:
            from egstalker.errors import EgstalkerError

            raise EgstalkerError(f"model spec: audio_future {self.audio_future} must be >= 0 and smaller than "
                                 f"audio_window {self.audio_window}; the model folder is damaged")

    @staticmethod
    def from_json(data: dict) -> "ModelSpec":
        data = dict(data)
        data["feature_shape"] = tuple(data["feature_shape"])
        data["plane_resolutions"] = tuple(data["plane_resolutions"])
        return ModelSpec(**data)

    def to_json(self) -> dict:
        data = asdict(self)
        data["feature_shape"] = list(self.feature_shape)
        data["plane_resolutions"] = list(self.plane_resolutions)
        return data


@dataclass
class FrameGaussians:
    """Activated Gaussians of B frames, ready to rasterise."""

    means: torch.Tensor       # [B, N, 3]
    quats: torch.Tensor       # [B, N, 4]
    scales: torch.Tensor      # [B, N, 3]
    opacities: torch.Tensor   # [B, N]
    colors: torch.Tensor      # [B, N, 3]


@dataclass
class HeadRender:
    image: torch.Tensor
    """[B, H, W, 3] head composited over the background, in [0, 1]."""
    alpha: torch.Tensor
    """[B, H, W, 1] head opacity."""
    raster: object = field(repr=False, default=None)
    """The rasterizer's RasterOutput (means2d, radii for densification)."""


def camera_centers(viewmats: torch.Tensor) -> torch.Tensor:
    """[B, 4, 4] world-to-camera -> [B, 3] camera centres in world coordinates."""
    rot, trans = viewmats[:, :3, :3], viewmats[:, :3, 3]
    return -(rot.transpose(1, 2) @ trans[..., None]).squeeze(-1)


class GaussianHead(nn.Module):
    """Canonical Gaussians deformed per frame by audio, eye blink and head pose."""

    def __init__(self, spec: ModelSpec, gaussians: GaussianCloud, field: TriPlaneField):
        super().__init__()
        self.spec = spec
        self.gaussians = gaussians
        self.deformation = DeformationNetwork(
            field, spec.feature_shape, spec.audio_window, d_model=spec.d_model, n_heads=spec.n_heads,
            ffn_width=spec.ffn_width, dropout=spec.dropout, audio_width=spec.audio_width,
            head_width=spec.head_width, n_color=3, position_scale=0.1 * spec.head_radius,
            pose_dropout=spec.pose_dropout, audio_dropout=spec.audio_dropout)
        self._cache: SpatialCache | None = None

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> "GaussianHead":
        """An empty model of the right architecture, to be filled with `load_state_dict`."""
        gaussians = GaussianCloud.empty(spec.n_gaussians, spec.sh_degree)
        field = TriPlaneField(torch.zeros(3), torch.ones(3), spec.plane_channels, spec.plane_resolutions)
        return cls(spec, gaussians, field)

    # --- caching what does not change per frame (inference)
    def freeze_cache(self) -> None:
        """Compute and keep the spatial features/queries: valid until the parameters change (inference)."""
        with torch.no_grad():
            self._cache = self.deformation.spatial_cache(self.gaussians.means)

    def clear_cache(self) -> None:
        self._cache = None

    def spatial_cache(self) -> SpatialCache:
        if self._cache is not None and self._cache.features.shape[0] == len(self.gaussians):
            return self._cache
        return self.deformation.spatial_cache(self.gaussians.means)

    # --- per-frame Gaussians
    def frame_gaussians(self, viewmats: torch.Tensor, audio: torch.Tensor | None = None,
                        au45: torch.Tensor | None = None, dynamic: bool = True) -> FrameGaussians:
        """Deformed, activated Gaussians for B frames.

        Args:
            viewmats: [B, 4, 4] world-to-camera (OpenCV axes), also the pose token.
            audio: [B, W, *feature_shape] feature windows; au45: [B] eye blink in [0, 1].
            dynamic: False renders the static canonical head (coarse stage; audio/au45 unused).
        """
        p = self.gaussians.params
        b = viewmats.shape[0]
        means, log_scales, quats = p["means"][None], p["scales"][None], p["quats"][None]
        opacity_logits = p["opacities"][None]
        sh = torch.cat([p["sh0"], p["shN"]], dim=1)[None]  # [1, N, K, 3]
        if dynamic:
            offsets: Offsets = self.deformation(self.spatial_cache(), self.deformation.tokens(audio, au45, viewmats))
            means = means + offsets.means
            log_scales = log_scales + offsets.scales
            quats = quats + offsets.quats
            opacity_logits = opacity_logits + offsets.opacities[..., 0]
            dc = sh[:, :, 0, :] + offsets.colors
            sh = torch.cat([dc.unsqueeze(2), sh[:, :, 1:, :].expand(b, -1, -1, -1)], dim=2)
        means = means.expand(b, -1, -1)
        colors = self.gaussians.colors(sh.expand(b, -1, -1, -1), means, camera_centers(viewmats))
        return FrameGaussians(
            means=means,
            quats=F.normalize(quats.expand(b, -1, -1), dim=-1),
            scales=torch.exp(log_scales).expand(b, -1, -1),
            opacities=torch.sigmoid(opacity_logits).expand(b, -1),
            colors=colors,
        )

    def render(self, viewmats: torch.Tensor, Ks: torch.Tensor, width: int, height: int,
               background: torch.Tensor, audio: torch.Tensor | None = None, au45: torch.Tensor | None = None,
               dynamic: bool = True, backend: str = "auto", track_means2d_grad: bool = False) -> HeadRender:
        """Render B frames composited over `background` [B, H, W, 3] (torso + background of the pose frames)."""
        from egstalker.render.rasterize import rasterize

        g = self.frame_gaussians(viewmats, audio, au45, dynamic)
        out = rasterize(g.means, g.quats, g.scales, g.opacities, g.colors, viewmats, Ks, width, height,
                        backend=backend, track_means2d_grad=track_means2d_grad)
        image = out.rgb + (1.0 - out.alpha) * background
        return HeadRender(image=image.clamp(0.0, 1.0), alpha=out.alpha, raster=out)


def build_head(spec: ModelSpec, means: torch.Tensor, rgb: torch.Tensor, scales: torch.Tensor, opacity: float,
               plane_center: torch.Tensor, plane_half_size: torch.Tensor) -> GaussianHead:
    """A freshly initialised model (training). means/rgb/scales: [N, 3]."""
    gaussians = GaussianCloud(means, rgb, scales, opacity=opacity, sh_degree=spec.sh_degree)
    field = TriPlaneField(plane_center, plane_half_size, spec.plane_channels, spec.plane_resolutions)
    assert n_sh_coefficients(spec.sh_degree) == 1 + gaussians.params["shN"].shape[1]
    return GaussianHead(spec, gaussians, field)
