"""A training-only readout that teaches the audio adapter what the mouth does.

The renderer learns lip sync only through pixels: a mouth of a few hundred pixels in a 256 px frame, judged by
L1 and SSIM, is a weak and indirect signal for the audio adapter, and on lieu a trained head followed its audio
less well than a small regressor fitted straight from the same audio window to the tracked mouth (0.63-0.65
against 0.73 held out; docs/model.md). The probe gives the adapter that direct signal too: a linear map from
its per-frame code to the frame's tracked mouth shape (inner and outer lip gap and mouth width over the
eye-corner distance, from the dataset's landmarks, standardised over the training frames), fitted with a mean
squared error next to the image losses. It is not part of the model: inference never runs it, and the model
folder is unchanged.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from egstalker.dataset.reader import MOUTH_SHAPE_NAMES, TalkingDataset, mouth_shape


def split_mouth_shapes(data: TalkingDataset) -> np.ndarray:
    """[n, 3] mouth shape of every frame of a split with a detected face, as FrameDataset gives it (reads the
    landmark files)."""
    return np.stack([mouth_shape(data.landmarks(int(k))) for k in data.face_frames()])


class MouthProbe(nn.Module):
    """[B, audio_width] adapter codes -> [B, 3] standardised mouth shape; `loss` against the tracked shapes."""

    def __init__(self, audio_width: int, shapes: np.ndarray | None = None):
        super().__init__()
        self.linear = nn.Linear(audio_width, len(MOUTH_SHAPE_NAMES))
        self.register_buffer("shape_mean", torch.zeros(len(MOUTH_SHAPE_NAMES)))
        self.register_buffer("shape_std", torch.ones(len(MOUTH_SHAPE_NAMES)))
        if shapes is not None:
            self.shape_mean.copy_(torch.as_tensor(shapes.mean(0)))
            self.shape_std.copy_(torch.as_tensor(shapes.std(0)).clamp_min(1e-4))

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return self.linear(codes)

    def standardise(self, shapes: torch.Tensor) -> torch.Tensor:
        return (shapes - self.shape_mean) / self.shape_std

    def loss(self, codes: torch.Tensor, shapes: torch.Tensor) -> torch.Tensor:
        return torch.mean((self(codes) - self.standardise(shapes)) ** 2)


def probe_correlation(predicted: np.ndarray, tracked: np.ndarray) -> float:
    """Pearson correlation of the predicted and tracked inner-lip gap (NaN if either is constant)."""
    a, b = predicted[:, 0], tracked[:, 0]
    if a.std() < 1e-9 or b.std() < 1e-9:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])
