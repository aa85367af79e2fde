"""68 iBUG/300-W landmarks from MediaPipe's 478 (a fixed index map), written as ori_imgs/N.lms.

The map, by iBUG group (iBUG "right" = the subject's right = image left). Entries that are pairs are the mean
of two MediaPipe points: MediaPipe draws each eyebrow as an upper and a lower edge, iBUG as a middle line.

    jaw 0-16         234 93 132 58 172 136 150 176 152 400 379 365 397 288 361 323 454   (152 = chin, point 8)
    right brow 17-21 (70,46) (63,53) (105,52) (66,65) (107,55)                          outer -> inner
    left brow 22-26  (336,285) (296,295) (334,282) (293,283) (300,276)                  inner -> outer
    nose bridge 27-30 168 197 5 4
    nostrils 31-35   98 97 2 326 327
    right eye 36-41  33 160 158 133 153 144                                             outer corner first
    left eye 42-47   362 385 387 263 373 380                                            inner corner first
    outer lips 48-59 61 39 37 0 267 269 291 405 314 17 84 181                           48 right corner, 54 left
    inner lips 60-67 78 81 13 311 308 402 14 178

File format (peers' `np.loadtxt` reads it): 68 lines "x y" in pixels of the frame.
"""

from __future__ import annotations

import numpy as np

IBUG68_FROM_MEDIAPIPE: list[tuple[int, ...]] = (
    [(i,) for i in (234, 93, 132, 58, 172, 136, 150, 176, 152, 400, 379, 365, 397, 288, 361, 323, 454)]
    + [(70, 46), (63, 53), (105, 52), (66, 65), (107, 55)]
    + [(336, 285), (296, 295), (334, 282), (293, 283), (300, 276)]
    + [(i,) for i in (168, 197, 5, 4)]
    + [(i,) for i in (98, 97, 2, 326, 327)]
    + [(i,) for i in (33, 160, 158, 133, 153, 144)]
    + [(i,) for i in (362, 385, 387, 263, 373, 380)]
    + [(i,) for i in (61, 39, 37, 0, 267, 269, 291, 405, 314, 17, 84, 181)]
    + [(i,) for i in (78, 81, 13, 311, 308, 402, 14, 178)]
)
assert len(IBUG68_FROM_MEDIAPIPE) == 68

LIPS = slice(48, 60)
"""Outer lip points (peers crop the mouth with these)."""


def _map_matrix() -> np.ndarray:
    matrix = np.zeros((68, 478), np.float32)
    for row, sources in enumerate(IBUG68_FROM_MEDIAPIPE):
        matrix[row, list(sources)] = 1.0 / len(sources)
    return matrix


_MAP = _map_matrix()


def to_ibug68(landmarks: np.ndarray) -> np.ndarray:
    """[..., 478, D] MediaPipe landmarks -> [..., 68, D] iBUG landmarks."""
    return np.einsum("kn,...nd->...kd", _MAP, landmarks)


def format_lms(points: np.ndarray) -> str:
    """68 lines 'x y' (pixels, 2 decimals)."""
    return "".join(f"{x:.2f} {y:.2f}\n" for x, y in points[:, :2])
