"""transforms_train.json / transforms_val.json (task 9) and the audio split aud_train.npy / aud_novel.npy.

Fields (the ER-NeRF / GaussianTalker names where they overlap; camera convention in tracking.py):

    focal_len           focal length in pixels (fl_x = fl_y = focal_len)
    fl_x, fl_y          the same, for readers that want them
    cx, cy              principal point in pixels (the image centre)
    w, h                image width and height in pixels
    camera_angle_x      horizontal field of view in radians
    units               "cm" (canonical head frame of MediaPipe's face model)
    frames              one entry per frame of the split:
        img_id          frame index: ori_imgs/{img_id}.jpg, parsing/{img_id}.png, torso_imgs/{img_id}.png, ...
        aud_id          row of aud.npy: img_id + the recording's audio offset (meta.json "audio_offset";
                        egstalker.preprocess.av_sync); frames whose sound is not in the recording are left
                        out (meta.json split.frames_without_audio)
        transform_matrix 4x4 camera-to-world, world = canonical head frame, camera axes OpenGL/NeRF
                         (x right, y up, z back); the camera orbits a fixed head
        face_box        [x0, y0, x1, y1] pixels, bounding box of the 68 landmarks
        lips_box        [x0, y0, x1, y1] pixels, square box around the outer lips (landmarks 48-59)
        eye_blink       AU45_r / 2 clipped to [0, 1] (the value peers feed the model)

Split: the first int(N * 10 / 11) frames train, the rest validate (the peers' rule; `val_fraction` generalises
it). aud_train.npy / aud_novel.npy hold the rows of aud.npy of each split (its frames' aud_id).
"""

from __future__ import annotations

import json
import math

import numpy as np

from egstalker.configs import atomic_write_text
from egstalker.dataset.layout import DatasetLayout
from egstalker.errors import EgstalkerError


def split_index(n_frames: int, val_fraction: float) -> int:
    """Number of training frames: int(N * (1 - val_fraction)), at least 1, leaving at least 1 for validation."""
    n_train = int(n_frames * (1.0 - val_fraction) + 1e-9)
    return min(max(n_train, 1), n_frames - 1)


def camera_to_world(rotation: np.ndarray, translation: np.ndarray) -> np.ndarray:
    """[N, 4, 4] c2w from head poses (X_camera = R X_world + t)."""
    n = len(rotation)
    c2w = np.tile(np.eye(4, dtype=np.float64), (n, 1, 1))
    rt = np.transpose(rotation, (0, 2, 1)).astype(np.float64)
    c2w[:, :3, :3] = rt
    c2w[:, :3, 3] = -np.einsum("nij,nj->ni", rt, translation.astype(np.float64))
    return c2w


def _box(points: np.ndarray) -> list[float]:
    x0, y0 = points.min(0)
    x1, y1 = points.max(0)
    return [round(float(x0), 2), round(float(y0), 2), round(float(x1), 2), round(float(y1), 2)]


def _square_box(points: np.ndarray, width: int, height: int) -> list[float]:
    points = points.astype(np.float64)
    centre = (points.min(0) + points.max(0)) / 2
    half = max(float(np.ptp(points[:, 0])), float(np.ptp(points[:, 1]))) / 2
    x0, y0 = max(0.0, float(centre[0]) - half), max(0.0, float(centre[1]) - half)
    x1, y1 = min(float(width), float(centre[0]) + half), min(float(height), float(centre[1]) + half)
    return [round(x0, 2), round(y0, 2), round(x1, 2), round(y1, 2)]


def build_transforms(c2w: np.ndarray, focal: float, width: int, height: int, lms68: np.ndarray,
                     au45: np.ndarray, ids: range, audio_ids: np.ndarray | None = None,
                     no_face: np.ndarray | None = None) -> dict:
    """The JSON document of one split (see the module docstring); audio_ids[i]: frame i's row of aud.npy;
    no_face[i]: frame i had no detected face (its landmarks and pose are interpolated): marked "face": false."""
    frames = []
    for i in ids:
        frame = {
            "img_id": int(i), "aud_id": int(i if audio_ids is None else audio_ids[i]),
            "transform_matrix": np.round(c2w[i], 7).tolist(),
            "face_box": _box(lms68[i, :, :2]), "lips_box": _square_box(lms68[i, 48:60, :2], width, height),
            "eye_blink": round(float(np.clip(au45[i], 0, 2) / 2), 4),
        }
        if no_face is not None and no_face[i]:
            frame["face"] = False
        frames.append(frame)
    return {
        "focal_len": float(focal), "fl_x": float(focal), "fl_y": float(focal), "cx": width / 2.0, "cy": height / 2.0,
        "w": int(width), "h": int(height), "camera_angle_x": 2 * math.atan(width / (2 * focal)), "units": "cm",
        "frames": frames,
    }


def write_split(staging: DatasetLayout, dataset: DatasetLayout, c2w: np.ndarray, focal: float, width: int,
                height: int, lms68: np.ndarray, au45: np.ndarray, val_fraction: float, audio_offset: int = 0,
                unrecorded_rows: np.ndarray | None = None, no_face: np.ndarray | None = None) -> dict:
    """Write both transforms files (and the audio split when aud.npy exists) into `staging`; returns a report.
    audio_offset shifts every frame's aud_id. Left out of both splits: frames whose row falls outside aud.npy or
    is in `unrecorded_rows` (bool per aud.npy row: padding where the recording had no sound at its start or end),
    which would pair a speaking face with silence. (Only ends are cut: the training frames are also the poses a
    render loops over, and a gap inside them would make the head jump.) Frames in `no_face` (bool per frame: no
    face detected, landmarks interpolated) stay, marked "face": false: poses, not training images."""
    n = len(c2w)
    n_train = split_index(n, val_fraction)
    n_rows = len(np.load(dataset.audio_features, mmap_mode="r")) if dataset.audio_features.exists() else n
    audio_ids = np.arange(n) + int(audio_offset)
    # With an offset, the first (sound early) or last (sound late) frames' sound is not in the recording: they
    # are left out of both splits rather than given a neighbour's audio.
    has_audio = (audio_ids >= 0) & (audio_ids < n_rows)
    if unrecorded_rows is not None:
        has_audio[has_audio] &= ~unrecorded_rows[audio_ids[has_audio]]
    splits = {"train": [i for i in range(0, n_train) if has_audio[i]],
              "val": [i for i in range(n_train, n) if has_audio[i]]}
    for split, ids in splits.items():
        if not ids:
            raise EgstalkerError(f"no {split} frame has its sound (audio offset {audio_offset} frames); check the "
                                 "video's sound track and --audio-offset (frames of 40 ms; 'auto' estimates it)")
        if no_face is not None and all(no_face[i] for i in ids):
            raise EgstalkerError(f"no {split} frame shows a face (frames {ids[0]}-{ids[-1]}); film the face in the "
                                 "whole clip, or cut the end where it is missing")
    for split, ids in splits.items():
        document = build_transforms(c2w, focal, width, height, lms68, au45, ids, audio_ids, no_face)
        staging.transforms(split).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(staging.transforms(split), json.dumps(document, separators=(",", ":")))
    report = {"n_train": len(splits["train"]), "n_val": len(splits["val"]), "val_fraction": val_fraction,
              "audio_split": False}
    if not has_audio.all():
        report["frames_without_audio"] = [int(i) for i in np.flatnonzero(~has_audio)]
    if no_face is not None and np.any(no_face):
        report["frames_without_face"] = [int(i) for i in np.flatnonzero(no_face)]
    if dataset.audio_features.exists():
        features = np.load(dataset.audio_features, mmap_mode="r")
        np.save(staging.root / "aud_train.npy", np.ascontiguousarray(features[audio_ids[splits["train"]]]))
        np.save(staging.root / "aud_novel.npy", np.ascontiguousarray(features[audio_ids[splits["val"]]]))
        report["audio_split"] = True
    return report
