"""Head tracking (task 8): camera, per-frame head pose, canonical-frame vertices, eye blink.

Camera convention (one for the whole project)
---------------------------------------------
- Camera space is OpenGL's, as MediaPipe's: x right, y up, z towards the viewer; the camera looks down -z.
- Intrinsics are MediaPipe's perspective camera: vertical field of view 63 degrees, principal point at the
  image centre, square pixels: focal = (H / 2) / tan(31.5 deg) pixels. A camera-space point (X, Y, Z), Z < 0,
  lands on pixel u = cx + focal * X / -Z, v = cy - focal * Y / -Z (v grows downwards, as image rows).
- World space is the canonical head frame of MediaPipe's canonical face model: x to the image right (the
  subject's left), y up, z out of the face (towards the camera when the head faces it); units: centimetres.
- Head pose per frame: X_camera = R @ X_world + t (rotation [3, 3], translation [3] in cm).
- Camera-to-world (NeRF / OpenGL, as transforms_*.json): c2w = [[R^T, -R^T t], [0, 0, 0, 1]].
- Euler angles: R = Rx(euler[0]) @ Ry(euler[1]) @ Rz(euler[2]) (radians; pitch, yaw, roll).

The measured consistency of that camera (median reprojection error of MediaPipe's canonical model under its own
facial transformation matrix) is recorded in meta.json; the pose is then refined by PnP against the person's
own mean shape, which removes the identity mismatch of the generic canonical model. The PnP fits only the upper
face (`RIGID_POINTS`: forehead, temples, eye corners, nose): fitted to every point, the pose tilts and shifts
as the jaw opens, and a pose that encodes the mouth lets the model open the mouth from the pose instead of the
audio (held-out mouth opening predicted from pose alone, ridge: lieu r = 0.59 with all points, 0.08 with these;
obama 0.89 and 0.46, the same with every upper-face subset tried, so that rest is his head moving with his
speech; benchmarks/results/pose_mouth_leak*.json).

Vertices [N, 478, 3] are the frame's landmarks lifted to 3D (depth from the pose plus MediaPipe's relative z)
and brought into the canonical frame with the smoothed pose: head motion removed, expression kept.

Smoothing (offline, so it can look ahead): see `smooth_poses`; 'savgol' (default) is a centred Savitzky-Golay
filter: no lag, keeps the shape of deliberate head motion, removes frame-to-frame jitter. The seed's EMA
(alpha 0.7) lags motion by (1 - alpha) / alpha = 0.43 frames and only halves the jitter; One-Euro is causal
too (made for live input). benchmarks/tracking_jitter.py measures all of them.
"""

from __future__ import annotations

import math
import struct
import zipfile
from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np

FOV_Y_DEGREES = 63.0
SMOOTHERS = ("none", "ema", "one_euro", "savgol", "gaussian")
_GL_TO_CV = np.diag([1.0, -1.0, -1.0])


def focal_length(height: int) -> float:
    """Focal length in pixels of MediaPipe's perspective camera for frames `height` pixels tall."""
    return (height / 2.0) / math.tan(math.radians(FOV_Y_DEGREES / 2.0))


def _varint(buffer: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buffer[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, i


def _proto_fields(buffer: bytes):
    """(field number, wire type, value) of a protobuf message (just enough to read MediaPipe's metadata)."""
    i = 0
    while i < len(buffer):
        key, i = _varint(buffer, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buffer, i)
        elif wire == 2:
            size, i = _varint(buffer, i)
            value, i = buffer[i:i + size], i + size
        elif wire == 5:
            value, i = buffer[i:i + 4], i + 4
        elif wire == 1:
            value, i = buffer[i:i + 8], i + 8
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield number, wire, value


@lru_cache(maxsize=1)
def canonical_face() -> np.ndarray:
    """[468, 3] float32 MediaPipe canonical face model (cm), read from the landmarker's own metadata."""
    from egstalker.preprocess.face import landmarker_model_path

    with zipfile.ZipFile(landmarker_model_path()) as bundle:
        metadata = bundle.read("geometry_pipeline_metadata_landmarks.binarypb")
    mesh = next(value for number, wire, value in _proto_fields(metadata) if number == 1 and wire == 2)
    floats = []
    for number, wire, value in _proto_fields(mesh):
        if number == 3 and wire == 5:
            floats.append(struct.unpack("<f", value)[0])
        elif number == 3 and wire == 2:  # packed encoding
            floats.extend(np.frombuffer(value, "<f4").tolist())
    return np.asarray(floats, np.float32).reshape(-1, 5)[:, :3]  # x y z u v per vertex


def project(points: np.ndarray, rotation: np.ndarray, translation: np.ndarray, focal: float,
            centre: tuple[float, float]) -> np.ndarray:
    """World points [..., V, 3] under poses [..., 3, 3], [..., 3] -> pixels [..., V, 2] (see module docstring)."""
    camera = np.einsum("...ij,...vj->...vi", rotation, points) + translation[..., None, :]
    depth = np.maximum(-camera[..., 2], 1e-6)
    u = centre[0] + focal * camera[..., 0] / depth
    v = centre[1] - focal * camera[..., 1] / depth
    return np.stack([u, v], -1)


def reprojection_error(points: np.ndarray, rotation: np.ndarray, translation: np.ndarray, focal: float,
                       centre: tuple[float, float], observed: np.ndarray) -> np.ndarray:
    """[N, V] pixel distances between projected points and observed [N, V, 2] landmarks."""
    return np.linalg.norm(project(points, rotation, translation, focal, centre) - observed, axis=-1)


def lift_landmarks(landmarks: np.ndarray, rotation: np.ndarray, translation: np.ndarray, focal: float,
                   centre: tuple[float, float], reference: np.ndarray) -> np.ndarray:
    """Camera-space 3D points [N, 478, 3] of landmarks [N, 478, 3] (pixels; z in pixels, smaller = nearer).

    Depth: the pose's depth of the `reference` shape's centroid, plus MediaPipe's relative z scaled to cm at
    that depth. Every lifted point projects exactly onto its landmark.
    """
    centroid = reference.mean(0)
    depth_centre = -(np.einsum("nij,j->ni", rotation, centroid) + translation)[:, 2]  # [N]
    z = landmarks[..., 2] - landmarks[:, :468, 2].mean(1, keepdims=True)
    depth = depth_centre[:, None] + z * depth_centre[:, None] / focal
    x = (landmarks[..., 0] - centre[0]) * depth / focal
    y = -(landmarks[..., 1] - centre[1]) * depth / focal
    return np.stack([x, y, -depth], -1)


def to_canonical(camera_points: np.ndarray, rotation: np.ndarray, translation: np.ndarray) -> np.ndarray:
    """Camera-space points [N, V, 3] -> canonical head frame: R^T (X - t)."""
    return np.einsum("nji,nvj->nvi", rotation, camera_points - translation[:, None, :])


RIGID_POINTS = np.array([
    10, 338, 297, 332, 284, 251, 389, 356, 454, 109, 67, 103, 54, 21, 162, 127, 234,  # forehead, temples
    151, 9, 8, 168, 6, 197, 195, 5, 4, 1, 122, 351, 245, 465, 193, 417,  # brow ridge midline, nose
    33, 133, 362, 263, 130, 359, 243, 463, 226, 446,  # eye corners
])
"""MediaPipe face-mesh points that move with the skull, not with the jaw, lips, cheeks or eyelids."""


def solve_pnp(shape: np.ndarray, landmarks_2d: np.ndarray, rotation: np.ndarray, translation: np.ndarray,
              focal: float, centre: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Refine poses [N, 3, 3], [N, 3] so that `shape` [V, 3] projects onto landmarks_2d [N, V, 2]."""
    camera_matrix = np.array([[focal, 0, centre[0]], [0, focal, centre[1]], [0, 0, 1]], np.float64)
    out_r, out_t = rotation.copy(), translation.copy()
    for i in range(len(rotation)):
        r_cv = _GL_TO_CV @ rotation[i]
        t_cv = _GL_TO_CV @ translation[i]
        rvec, _ = cv2.Rodrigues(r_cv)
        ok, rvec, tvec = cv2.solvePnP(shape.astype(np.float64), landmarks_2d[i].astype(np.float64), camera_matrix,
                                      None, rvec, t_cv.reshape(3, 1).astype(np.float64), useExtrinsicGuess=True,
                                      flags=cv2.SOLVEPNP_ITERATIVE)
        if ok:
            out_r[i] = _GL_TO_CV @ cv2.Rodrigues(rvec)[0]
            out_t[i] = _GL_TO_CV @ tvec.ravel()
    return out_r, out_t


def rotation_to_euler(rotation: np.ndarray) -> np.ndarray:
    """[N, 3, 3] -> [N, 3] with R = Rx(a) Ry(b) Rz(c)."""
    from scipy.spatial.transform import Rotation

    return Rotation.from_matrix(rotation).as_euler("XYZ").astype(np.float32)


def euler_to_rotation(euler: np.ndarray) -> np.ndarray:
    from scipy.spatial.transform import Rotation

    return Rotation.from_euler("XYZ", euler).as_matrix().astype(np.float32)


# --- smoothing -------------------------------------------------------------------------------------------

def _ema(x: np.ndarray, alpha: float) -> np.ndarray:
    out = x.copy()
    for i in range(1, len(x)):
        out[i] = alpha * x[i] + (1 - alpha) * out[i - 1]
    return out


def _one_euro(x: np.ndarray, rate: float = 25.0, min_cutoff: float = 1.0, beta: float = 0.05,
              d_cutoff: float = 1.0) -> np.ndarray:
    def alpha(cutoff):
        tau = 1.0 / (2 * math.pi * cutoff)
        return 1.0 / (1.0 + tau * rate)

    out = x.copy()
    derivative = np.zeros_like(x[0])
    for i in range(1, len(x)):
        d = (x[i] - out[i - 1]) * rate
        a_d = alpha(d_cutoff)
        derivative = a_d * d + (1 - a_d) * derivative
        cutoff = min_cutoff + beta * np.abs(derivative)
        a = 1.0 / (1.0 + rate / (2 * math.pi * cutoff))
        out[i] = a * x[i] + (1 - a) * out[i - 1]
    return out


def smooth_series(x: np.ndarray, method: str, ema_alpha: float = 0.7, window: int = 9, sigma: float = 1.5) -> np.ndarray:
    """Smooth [N, D] along time."""
    if method == "none" or len(x) < 3:
        return x.copy()
    if method == "ema":
        return _ema(x, ema_alpha)
    if method == "one_euro":
        return _one_euro(x)
    if method == "savgol":
        from scipy.signal import savgol_filter

        w = min(window, len(x) if len(x) % 2 else len(x) - 1)
        return savgol_filter(x, w, min(2, w - 1), axis=0, mode="interp") if w >= 3 else x.copy()
    if method == "gaussian":
        from scipy.ndimage import gaussian_filter1d

        return gaussian_filter1d(x, sigma, axis=0, mode="nearest")
    raise ValueError(f"unknown smoother {method!r}; choose one of {SMOOTHERS}")


def smooth_poses(rotation: np.ndarray, translation: np.ndarray, method: str,
                 ema_alpha: float = 0.7) -> tuple[np.ndarray, np.ndarray]:
    """Smooth poses: rotations as rotation vectors about their mean (no wrap-around for head motion)."""
    from scipy.spatial.transform import Rotation

    rotations = Rotation.from_matrix(rotation)
    mean = rotations.mean()
    relative = (mean.inv() * rotations).as_rotvec()
    relative = smooth_series(relative, method, ema_alpha)
    smoothed = (mean * Rotation.from_rotvec(relative)).as_matrix().astype(np.float32)
    return smoothed, smooth_series(translation, method, ema_alpha).astype(np.float32)


def jitter(series: np.ndarray) -> float:
    """RMS of the second difference (frame-to-frame acceleration) of [N, D]."""
    if len(series) < 3:
        return 0.0
    return float(np.sqrt((np.diff(series, 2, axis=0) ** 2).sum(-1).mean()))


# --- eye blink -------------------------------------------------------------------------------------------

RIGHT_EYE = (33, 160, 158, 133, 153, 144)  # corner, top, top, corner, bottom, bottom
LEFT_EYE = (362, 385, 387, 263, 373, 380)


def eye_aspect_ratio(landmarks: np.ndarray) -> np.ndarray:
    """[N] mean eye aspect ratio of both eyes (small = closed) from [N, 478, 2+] landmarks."""
    def ear(ids):
        p = landmarks[:, ids, :2]
        vertical = np.linalg.norm(p[:, 1] - p[:, 5], axis=-1) + np.linalg.norm(p[:, 2] - p[:, 4], axis=-1)
        horizontal = 2.0 * np.linalg.norm(p[:, 0] - p[:, 3], axis=-1)
        return vertical / np.maximum(horizontal, 1e-6)

    return 0.5 * (ear(RIGHT_EYE) + ear(LEFT_EYE))


def blink_au45(blink_score: np.ndarray | None, ear: np.ndarray) -> np.ndarray:
    """AU45_r per frame on OpenFace's 0..5 scale: 0 open, about 2 fully closed (peers clip to [0, 2], / 2).

    From MediaPipe's eyeBlinkLeft/Right mean when present, else from the eye aspect ratio; normalised per
    clip between the open-eye level (10th percentile) and the closed level (99.5th percentile, or at least
    0.3 above open, so a clip without blinks is not amplified into noise).
    """
    if blink_score is None or not np.isfinite(blink_score).all() or np.ptp(blink_score) < 1e-4:
        blink_score = -ear / max(float(np.median(ear)), 1e-6)  # closed = small EAR
        floor = 0.3
    else:
        floor = 0.3
    open_level = float(np.percentile(blink_score, 10))
    closed_level = max(float(np.percentile(blink_score, 99.5)), open_level + floor)
    return np.clip(2.0 * (blink_score - open_level) / (closed_level - open_level), 0.0, 5.0).astype(np.float32)


@dataclass
class TrackingResult:
    rotation: np.ndarray  # [N, 3, 3] float32
    translation: np.ndarray  # [N, 3] float32 (cm)
    vertices: np.ndarray  # [N, 478, 3] float32 canonical frame (cm)
    focal: float
    width: int
    height: int
    au45: np.ndarray  # [N]
    ear: np.ndarray  # [N]
    report: dict


def track(landmarks: np.ndarray, matrices: np.ndarray, width: int, height: int, method: str = "savgol",
          ema_alpha: float = 0.7, blink_score: np.ndarray | None = None) -> TrackingResult:
    """Poses, vertices and blink from the cached MediaPipe results.

    Args:
        landmarks: [N, 478, 3] pixels (z in pixels).
        matrices: [N, 4, 4] MediaPipe facial transformation matrices.
        blink_score: [N] mean of eyeBlinkLeft/Right, or None.
    """
    focal = focal_length(height)
    centre = (width / 2.0, height / 2.0)
    canonical = canonical_face()
    rotation = matrices[:, :3, :3].astype(np.float64)
    translation = matrices[:, :3, 3].astype(np.float64)
    observed = landmarks[:, :468, :2].astype(np.float64)
    mp_error = reprojection_error(canonical, rotation, translation, focal, centre, observed)

    # the person's own shape: landmarks lifted with MediaPipe's pose, averaged in the canonical frame
    lifted = lift_landmarks(landmarks.astype(np.float64), rotation, translation, focal, centre, canonical)
    person = to_canonical(lifted, rotation, translation).mean(0)  # [478, 3]
    rotation, translation = solve_pnp(person[RIGID_POINTS], observed[:, RIGID_POINTS], rotation, translation, focal,
                                      centre)
    raw_error = reprojection_error(person[:468], rotation, translation, focal, centre, observed)
    rigid_error = reprojection_error(person[RIGID_POINTS], rotation, translation, focal, centre,
                                     observed[:, RIGID_POINTS])

    smooth_r, smooth_t = smooth_poses(rotation, translation, method, ema_alpha)
    smooth_error = reprojection_error(person[:468], smooth_r, smooth_t, focal, centre, observed)
    lifted = lift_landmarks(landmarks.astype(np.float64), smooth_r, smooth_t, focal, centre, person[:468])
    vertices = to_canonical(lifted, smooth_r.astype(np.float64), smooth_t.astype(np.float64)).astype(np.float32)

    ear = eye_aspect_ratio(landmarks).astype(np.float32)
    au45 = blink_au45(blink_score, ear)
    report = {
        "camera": {"model": "perspective, MediaPipe's", "fov_y_degrees": FOV_Y_DEGREES, "focal_px": focal,
                   "cx": centre[0], "cy": centre[1]},
        "mediapipe_matrix_reprojection_px": {"median": float(np.median(mp_error)),
                                             "p95": float(np.percentile(mp_error, 95))},
        "pose_points": f"{len(RIGID_POINTS)} rigid upper-face points (egstalker.preprocess.tracking.RIGID_POINTS)",
        "pnp_person_shape_reprojection_px": {"median": float(np.median(raw_error)),
                                             "p95": float(np.percentile(raw_error, 95))},
        "pnp_rigid_points_reprojection_px": {"median": float(np.median(rigid_error)),
                                             "p95": float(np.percentile(rigid_error, 95))},
        "smoothed_reprojection_px": {"median": float(np.median(smooth_error)),
                                     "p95": float(np.percentile(smooth_error, 95))},
        "smoothing": method,
        "jitter_translation_cm": {"raw": jitter(translation), "smoothed": jitter(smooth_t)},
    }
    return TrackingResult(smooth_r, smooth_t, vertices, focal, width, height, au45, ear, report)
