"""One input adapter for any per-frame audio feature shape.

Each video frame reads a window of W audio-feature frames. Whatever one feature frame is ([768] Wav2Vec2,
[16, 29] DeepSpeech logits, the default encoder's shape), it is flattened, standardised with statistics of the
training clip (stored as buffers, so inference needs no dataset) and projected to `width`; a temporal
convolution mixes neighbouring frames and a learned softmax attention over the window pools them to one
vector per video frame.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class AudioAdapter(nn.Module):
    """[B, W, *feature_shape] audio windows -> [B, width] per-frame audio codes.

    Example:
        >>> adapter = AudioAdapter((16, 29), window=8)
        >>> adapter(torch.randn(2, 8, 16, 29)).shape
        torch.Size([2, 32])
    """

    def __init__(self, feature_shape: tuple[int, ...], window: int, width: int = 32, hidden: int = 128,
                 input_dropout: float = 0.0):
        super().__init__()
        self.feature_shape = tuple(int(s) for s in feature_shape)
        self.window = int(window)
        in_dim = math.prod(self.feature_shape)
        self.register_buffer("feature_mean", torch.zeros(in_dim))
        self.register_buffer("feature_std", torch.ones(in_dim))
        # training only: a minute of speech is few examples for a few hundred input values per frame
        self.input_dropout = nn.Dropout(input_dropout)
        self.frame_net = nn.Sequential(
            nn.Linear(in_dim, hidden), nn.LeakyReLU(0.02), nn.Linear(hidden, width), nn.LeakyReLU(0.02))
        self.temporal = nn.Conv1d(width, width, kernel_size=3, padding=1)
        self.attention = nn.Sequential(
            nn.Conv1d(width, 16, kernel_size=3, padding=1), nn.LeakyReLU(0.02), nn.Conv1d(16, 1, kernel_size=1))

    def set_statistics(self, features: torch.Tensor) -> None:
        """Standardise inputs with the per-dimension mean/std of `features` [n_frames, *feature_shape]."""
        flat = features.reshape(features.shape[0], -1).float()
        self.feature_mean.copy_(flat.mean(0))
        self.feature_std.copy_(flat.std(0).clamp_min(1e-3))

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        b, w = windows.shape[:2]
        if tuple(windows.shape[2:]) != self.feature_shape:
            raise ValueError(f"audio features of shape {tuple(windows.shape[2:])}, model expects {self.feature_shape}")
        flat = self.input_dropout((windows.reshape(b, w, -1).float() - self.feature_mean) / self.feature_std)
        codes = self.frame_net(flat).transpose(1, 2)  # [B, width, W]
        codes = codes + self.temporal(codes)
        weights = torch.softmax(self.attention(codes), dim=-1)  # [B, 1, W]
        return (codes * weights).sum(-1)
