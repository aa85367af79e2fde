"""The static background (bc.jpg): the person removed from a static-camera clip.

Each pixel takes the temporal median of the frames in which the parsing calls it background (a few pixels away
from the person, whose edges blend colours). Pixels never uncovered (behind the torso, usually) are filled
from the nearest uncovered pixel and blurred, so the fill has no streaks.
"""

from __future__ import annotations

import cv2
import numpy as np

from egstalker.preprocess.parsing import BACKGROUND


def estimate_background(frames: list[np.ndarray], labels: list[np.ndarray], margin: int = 4,
                        rows_per_chunk: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Median background of sample frames.

    Args:
        frames: K BGR frames [H, W, 3] uint8.
        labels: K parsing label maps [H, W] uint8 (0 = background).
        margin: pixels kept away from the person.

    Returns:
        (background [H, W, 3] uint8 BGR, seen [H, W] bool: the pixel was background in at least one frame).
    """
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * margin + 1, 2 * margin + 1))
    is_bg = np.stack([cv2.erode((lab == BACKGROUND).astype(np.uint8), kernel).astype(bool) for lab in labels])
    height, width = is_bg.shape[1:]
    background = np.zeros((height, width, 3), np.uint8)
    for top in range(0, height, rows_per_chunk):  # bounded memory for large frames
        rows = slice(top, top + rows_per_chunk)
        stack = np.stack([f[rows] for f in frames]).astype(np.float32)
        stack[~is_bg[:, rows]] = np.inf  # sorted last; np.nanmedian's masked-array path is ~10x slower
        stack.sort(axis=0)
        valid = is_bg[:, rows].sum(0)[..., None]  # [rows, W, 1] frames in which the pixel is background
        low = np.take_along_axis(stack, np.broadcast_to(np.maximum(valid - 1, 0) // 2, (1,) + stack.shape[1:]), 0)
        high = np.take_along_axis(stack, np.broadcast_to(valid // 2, (1,) + stack.shape[1:]).clip(0, len(stack) - 1),
                                  0)
        median = np.where(valid > 0, 0.5 * (low[0] + high[0]), 0.0)
        background[rows] = median.round().clip(0, 255).astype(np.uint8)
    seen = is_bg.any(0)
    return fill_unseen(background, seen), seen


def fill_unseen(image: np.ndarray, seen: np.ndarray) -> np.ndarray:
    """Fill pixels where `seen` is False smoothly from the seen ones (push-pull: mask-weighted image pyramid,
    coarse levels fill the holes of finer ones), so large holes get a soft gradient rather than streaks."""
    if seen.all() or not seen.any():
        return image
    weight = seen.astype(np.float32)
    colour = image.astype(np.float32) * weight[..., None]
    levels = []
    while True:  # push: average the seen pixels down to a level with no holes
        levels.append((colour, weight))
        if min(weight.shape) <= 2 or weight.min() > 0:
            break
        colour = cv2.pyrDown(colour)
        weight = cv2.pyrDown(weight)
    colour, weight = levels[-1]
    filled = colour / np.maximum(weight, 1e-6)[..., None]
    for colour, weight in reversed(levels[:-1]):  # pull: holes take the upsampled coarser estimate
        up = cv2.resize(filled, (weight.shape[1], weight.shape[0]), interpolation=cv2.INTER_LINEAR)
        known = colour / np.maximum(weight, 1e-6)[..., None]
        w = np.clip(weight, 0.0, 1.0)[..., None]
        filled = known * w + up * (1 - w)
    out = image.copy()
    out[~seen] = np.clip(filled[~seen], 0, 255).astype(np.uint8)
    return out
