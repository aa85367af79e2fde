"""The static background (bc.jpg): the person removed from a static-camera clip.

Each pixel takes the temporal median of the frames in which the parsing calls it background (a few pixels away
from the person, whose edges blend colours). Pixels never uncovered (behind the torso, usually) are filled
from the nearest uncovered pixel and blurred, so the fill has no streaks.
"""

from __future__ import annotations

import warnings

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
        stack[~is_bg[:, rows]] = np.nan
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            median = np.nanmedian(stack, axis=0)
        background[rows] = np.nan_to_num(median, nan=0.0).round().clip(0, 255).astype(np.uint8)
    seen = is_bg.any(0)
    return fill_unseen(background, seen), seen


def fill_unseen(image: np.ndarray, seen: np.ndarray) -> np.ndarray:
    """Fill pixels where `seen` is False by their nearest seen pixel, then blur the filled area."""
    if seen.all() or not seen.any():
        return image
    # distance transform to the nearest seen pixel, with its label giving the source pixel
    _, nearest = cv2.distanceTransformWithLabels((~seen).astype(np.uint8), cv2.DIST_L2, 5,
                                                 labelType=cv2.DIST_LABEL_PIXEL)
    seen_ys, seen_xs = np.nonzero(seen)
    # labels number the zero (seen) pixels in row-major scan order, starting at 1
    order = np.zeros(nearest.max() + 1, np.int64)
    zero_labels = nearest[seen]
    order[zero_labels] = np.arange(len(seen_ys))
    source = order[nearest]
    filled = image.copy()
    holes = ~seen
    filled[holes] = image[seen_ys[source[holes]], seen_xs[source[holes]]]
    size = max(3, int(0.03 * max(image.shape[:2])) | 1)
    blurred = cv2.GaussianBlur(filled, (size, size), 0)
    filled[holes] = blurred[holes]
    return filled
