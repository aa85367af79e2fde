"""Ground-truth and torso images (task 6), as the ER-NeRF / GaussianTalker family uses them.

- gt_imgs/N.jpg: the frame with its background pixels replaced by bc.jpg (the model renders over bc).
- torso_imgs/N.png: RGBA. Colour = the frame with the head replaced by the background, and the body (neck, and
  the shadow under the chin that parsing may label torso) continued upwards under the chin across the neck's
  columns (its top colours carried a few pixels into the head, slightly darkened), so a rendered head composited
  on it never shows a gap; alpha = neck + torso + that extension, 0 elsewhere (colour 0 there too, which keeps the
  PNG small). Task 6 rounds the colours to multiples of 4 (error <= 2 levels, below gt's own JPEG noise), which
  makes the PNG ~35 % smaller.
"""

from __future__ import annotations

import cv2
import numpy as np

from egstalker.preprocess.parsing import BACKGROUND, HEAD, NECK, TORSO


def ground_truth_image(frame: np.ndarray, labels: np.ndarray, background: np.ndarray) -> np.ndarray:
    """[H, W, 3]: frame with background pixels from `background` (same channel order as frame)."""
    out = frame.copy()
    cv2.copyTo(background, (labels == BACKGROUND).view(np.uint8), out)  # in place; ~40x faster than numpy masks
    return out


def extend_upwards(region: np.ndarray, into: np.ndarray, length: int) -> np.ndarray:
    """Pixels of `into` reached by going up at most `length` px from the top pixel of `region` in each column.

    Only columns whose top `region` pixel sits right under an `into` pixel are extended. Returns [H, W] bool.
    """
    height, width = region.shape
    has = region.any(0)
    top = np.where(has, region.argmax(0), height)  # first region row per column
    columns = np.flatnonzero(has & (top > 0))
    out = np.zeros_like(region)
    if len(columns) == 0:
        return out
    top_rows = top[columns]
    columns = columns[into[top_rows - 1, columns]]
    top_rows = top[columns]
    for step in range(1, length + 1):
        rows = top_rows - step
        ok = rows >= 0
        ok[ok] &= into[rows[ok], columns[ok]]
        top_rows, columns = top_rows[ok], columns[ok]
        out[rows[ok], columns] = True
    return out


def under_the_head(head: np.ndarray) -> np.ndarray:
    """[W] per column, the first row under the column's first run of head pixels (the chin's underside; the
    height where the head reaches the bottom, 0 where a column has none). The first run, not the last head pixel:
    long hair hanging in front of the neck is head below the body."""
    height = head.shape[0]
    rows = np.arange(height)[:, None]
    first = np.where(head.any(0), head.argmax(0), height)
    after = (rows >= first[None]) & ~head
    return np.where(head.any(0), np.where(after.any(0), after.argmax(0), height), 0)


def neck_columns(neck: np.ndarray) -> slice | None:
    """The columns the neck label spans, first to last (None without a neck). Parsing keeps only neck connected
    to the head, so its pieces are the throat's, split by the chin's shadow or fringed at the jaw's sides."""
    columns = np.flatnonzero(neck.any(0))
    return slice(int(columns[0]), int(columns[-1]) + 1) if len(columns) else None


def under_the_chin(neck: np.ndarray, torso: np.ndarray, head: np.ndarray) -> np.ndarray:
    """The body pixels whose top is continued under the head: [H, W] bool.

    Across the neck's columns that is the neck *and* the torso: the shadow right under the chin is often too
    dark for the skin test and labelled torso, and continuing only the neck there left a gap between a rendered
    chin and the neck whenever the jaw moved up (benchmarks/neck_stability.py found it as background showing
    through the seam on new speech). Only body pixels under a column's head count (parsing leaves stray torso
    pixels on the hair's edge, above the head). Outside the neck's columns (shoulders under long hair) nothing is
    continued; without a neck, the torso under the head is.
    """
    below = np.arange(head.shape[0])[:, None] >= under_the_head(head)[None]
    base = (neck | torso) & below
    span = neck_columns(neck)
    if span is None:  # no neck: base is the torso under the head
        return base
    inside = np.zeros(neck.shape[1], bool)
    inside[span] = True
    return base & inside[None]


def chin_gaps(labels: np.ndarray, alpha: np.ndarray, rows: int) -> list[int]:
    """Columns of the neck's span where the head sits right on the body but the torso image (alpha > 0 where
    it covers) does not continue `rows` px under the head: a rendered chin that moves up shows the background
    there. A regression check of task 6's output (it follows the same reading of the labels as task 6, so it
    cannot judge that reading: benchmarks/neck_stability.py measures renders for that)."""
    head = labels == HEAD
    body = (labels == NECK) | (labels == TORSO)
    span = neck_columns(labels == NECK)
    if span is None:
        return []
    chin = under_the_head(head)
    gaps = []
    for x in range(span.start, span.stop):
        below = int(chin[x])  # the first row under the head
        under = slice(below - rows, below)
        if rows <= below < len(body) and body[below, x] and head[under, x].all() and not alpha[under, x].all():
            gaps.append(int(x))
    return gaps


def torso_image(gt: np.ndarray, labels: np.ndarray, background: np.ndarray, extension: int,
                colour_step: int = 1) -> np.ndarray:
    """[H, W, 4] uint8 torso image (channel order of `gt`, alpha last), see the module docstring.

    Args:
        extension: how far (px) the neck continues under the head (task 6: a fifth of the face height).
        colour_step: 1 keeps colours exact; 4 rounds them to multiples of 4 (error <= 2 levels, ~50 dB: far
            below the JPEG noise of gt itself) so the PNG is ~40 % smaller.
    """
    neck = labels == NECK
    torso = labels == TORSO
    head = labels == HEAD
    base = under_the_chin(neck, torso, head)
    grown = extend_upwards(base, head, extension)
    alpha = (neck | torso | grown).view(np.uint8)
    colour = cv2.bitwise_and(gt, gt, mask=alpha)  # cv2 masked ops: numpy's broadcast masks cost ~3 ms each
    if grown.any():
        height, width = gt.shape[:2]
        has = base.any(0)
        top = np.where(has, base.argmax(0), height - 1)
        ys, xs = np.nonzero(grown)
        source_rows = np.minimum(top[xs] + 2, height - 1)  # a little inside, away from the jaw's shadow edge
        darken = 0.985 ** (top[xs] - ys)
        # smooth the continued colours in a box around them (over the frame with its head on the background)
        y0, y1 = max(0, ys.min() - 3), min(height, ys.max() + 4)
        x0, x1 = max(0, xs.min() - 3), min(width, xs.max() + 4)
        box = gt[y0:y1, x0:x1].copy()
        cv2.copyTo(np.ascontiguousarray(background[y0:y1, x0:x1]),
                   np.ascontiguousarray(head[y0:y1, x0:x1]).view(np.uint8), box)
        box[ys - y0, xs - x0] = (gt[source_rows, xs].astype(np.float32) * darken[:, None]).astype(np.uint8)
        blurred = cv2.GaussianBlur(box, (5, 5), 0)
        colour[ys, xs] = blurred[ys - y0, xs - x0]
    if colour_step > 1:  # round to the nearest multiple (a power of two); 0 outside alpha stays 0
        if colour_step & (colour_step - 1):
            raise ValueError(f"colour_step must be a power of two, not {colour_step}")
        half = colour_step // 2  # cv2 scalars must name every channel (a bare int only reaches the first)
        colour = cv2.add(cv2.min(colour, (255 - half,) * 4), (half,) * 4)
        colour = cv2.bitwise_and(colour, (256 - colour_step,) * 4)
    return cv2.merge([*cv2.split(colour), alpha * 255])
