"""Self-reenactment evaluation: render the held-out frames from their own audio features and head poses and
compare them with the filmed frames.

Metrics (see egstalker.metrics): PSNR, SSIM, LPIPS (AlexNet by default) on the full frame, mouth landmark
distance (LMD) and mouth-opening correlation from MediaPipe landmarks, and the model's frames per second
(model time only: deformation, rasterisation, compositing and the copy to host; the first batch, which pays
one-off costs such as CUDA kernel compilation, is left out when there is more than one).

Frames are rendered, scored and dropped batch by batch: memory does not grow with the split's length.

Example:
    >>> head = TalkingHead.from_dir("models/lieu")
    >>> result = evaluate(head, split="val")
    >>> print(result.psnr, result.mouth_corr)
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from egstalker.errors import EgstalkerError

if TYPE_CHECKING:
    from egstalker.inference import TalkingHead

Split = Literal["val", "train"]


@dataclass(frozen=True)
class HeldOutFrames:
    """Which frames to re-enact and where their inputs come from."""

    pose_indices: np.ndarray
    """[n] rows of the model's pose sources (camera, eye blink, torso) for each frame."""
    audio_ids: np.ndarray
    """[n] rows of `features` for each frame."""
    frame_ids: np.ndarray
    """[n] dataset image ids (gt_imgs/<id>.jpg)."""
    features: np.ndarray
    """The dataset's audio features (the encoder the model was trained with), [n_audio_frames, ...]."""
    dataset_dir: Path


def heldout_frames(head: "TalkingHead", split: Split = "val") -> HeldOutFrames:
    """The split's frames of the dataset the model was trained on, with their own audio and poses."""
    from egstalker.dataset.layout import DatasetLayout
    from egstalker.dataset.reader import audio_encoder_name, features_mismatch

    if split not in ("val", "train"):
        raise EgstalkerError(f"unknown split {split!r}; use 'val' (held-out frames) or 'train'")
    poses = head.poses
    n_train = int(poses.n_train)
    positions = np.arange(n_train, len(poses.frame_ids)) if split == "val" else np.arange(n_train)
    layout = DatasetLayout(head.dataset_dir)
    faceless = _frames_without_face(layout, split)  # interpolated poses: their pictures show no face to score
    positions = positions[~np.isin(np.asarray(poses.frame_ids)[positions], faceless)]
    if len(positions) == 0:
        raise EgstalkerError(f"the model's dataset has no {split} frames to evaluate on")
    if not layout.audio_features.exists():
        raise EgstalkerError(f"{layout.audio_features} is missing: evaluation needs the dataset the model was "
                             f"trained on ({layout.root}); move it back or pass its new location")
    meta = json.loads(layout.meta.read_text()) if layout.meta.exists() else {}
    encoder = audio_encoder_name(meta)
    if encoder != head.encoder_name:  # evaluation reads the dataset's features, not the encoder's
        raise EgstalkerError(features_mismatch(layout.root, encoder, head.encoder_name))
    features = np.load(layout.audio_features, mmap_mode="r")
    audio_ids = np.asarray(poses.audio_ids)[positions]
    if int(audio_ids.max()) >= len(features):  # a clamped last row would score every frame on the wrong speech
        raise EgstalkerError(f"{layout.audio_features} has {len(features)} rows but the {split} frames read rows up "
                             f"to {int(audio_ids.max())}: it is damaged or from another clip; re-run "
                             f"`egstalker preprocess VIDEO -o {layout.root} --task 2 --force`")
    return HeldOutFrames(pose_indices=positions, audio_ids=audio_ids,
                         frame_ids=np.asarray(poses.frame_ids)[positions], features=features,
                         dataset_dir=layout.root)


def _frames_without_face(layout, split: str) -> list[int]:
    """Image ids the split's transforms mark "face": false (none in datasets made before the mark)."""
    try:
        frames = json.loads(layout.transforms(split).read_text())["frames"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    return [int(f["img_id"]) for f in frames if isinstance(f, dict) and f.get("face", True) is False]


def load_ground_truth(dataset_dir: Path, frame_id: int, width: int, height: int) -> np.ndarray:
    """gt_imgs/<frame_id>.jpg as uint8 RGB [height, width, 3] (area-averaged when shrunk)."""
    import cv2

    from egstalker.dataset.layout import DatasetLayout

    path = DatasetLayout(dataset_dir).gt(int(frame_id))
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise EgstalkerError(f"cannot read {path}; the dataset is incomplete (re-run `egstalker preprocess`)")
    if (image.shape[1], image.shape[0]) != (width, height):
        shrink = image.shape[1] > width
        image = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


@dataclass
class EvalResult:
    psnr: float
    ssim: float
    lpips: float
    lmd: float
    """Lip-landmark distance / eye-corner distance (MediaPipe), lower is better."""
    mouth_corr: float
    fps: float
    """Model frames per second (batched, on the evaluation device)."""
    n_frames: int
    split: str
    lpips_net: str
    width: int
    height: int
    device: str
    lmd_px: float = float("nan")
    mouth_frames: int = 0
    """Frames where MediaPipe found the face in both render and ground truth (used for lmd / mouth_corr)."""
    mouth_corr_low: float = float("nan")
    mouth_corr_high: float = float("nan")
    """95% interval of mouth_corr over these frames (metrics.correlation_interval): short clips are noisy."""
    mouth_corr_frozen_pose: float = float("nan")
    """Lip-sync control (evaluate(lipsync_controls=True)): mouth corr of the same frames rendered with their own
    audio but all in the first frame's pose, eye blink and torso; the mouth can follow only the audio, as when new
    speech drives looped poses. NaN when not computed."""
    mouth_corr_shifted_audio: float = float("nan")
    """Lip-sync control: the frames' own poses with audio from `control_shift_seconds` later. Near mouth_corr
    means the mouth followed the pose, not the audio."""
    seconds: float = 0.0
    """Wall time of the whole evaluation (metrics included)."""
    per_frame: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    """'psnr', 'ssim', 'lpips', 'opening_pred', 'opening_true', 'frame_ids' -> [n_frames]."""

    def to_json(self) -> dict:
        """Scalars only; NaN/inf become null so the output is strict JSON."""
        out = {}
        for key in ("psnr", "ssim", "lpips", "lmd", "mouth_corr", "mouth_corr_low", "mouth_corr_high",
                    "mouth_corr_frozen_pose", "mouth_corr_shifted_audio", "fps", "lmd_px", "n_frames", "mouth_frames",
                    "split", "lpips_net", "width", "height", "device", "seconds"):
            value = getattr(self, key)
            if isinstance(value, float):
                value = round(value, 6) if math.isfinite(value) else None
            out[key] = value
        return out


def evaluate(head: "TalkingHead", split: Split = "val", max_frames: int | None = None, batch_size: int = 8,
             lpips_net: Literal["alexnet", "vgg16"] = "alexnet", metrics_device: str | None = None,
             report_dir: str | Path | None = None, report_video_seconds: float = 8.0, report_samples: int = 6,
             show_progress: bool = True, lipsync_controls: bool = False,
             control_shift_seconds: float = 2.0) -> EvalResult:
    """Re-enact the split's frames and score them against the filmed ones; optionally write an HTML report.

    Args:
        head: the model (`TalkingHead.from_dir`).
        split: 'val' (the held-out last 1/11 of the clip) or 'train'.
        max_frames: evaluate only the split's first frames (None = all).
        batch_size: frames per model call.
        lpips_net: LPIPS backbone.
        metrics_device: torch device for LPIPS (default: the model's device).
        report_dir: write index.html, sample frames and a side-by-side video there.
        lipsync_controls: also render the frames twice more for `mouth_corr_frozen_pose` and
            `mouth_corr_shifted_audio` (audio `control_shift_seconds` later): what the mouth follows.
    """
    from tqdm import tqdm

    from egstalker import metrics

    if batch_size < 1:
        raise EgstalkerError("batch size must be at least 1")
    if not hasattr(head, "poses"):
        raise EgstalkerError(f"evaluate takes a loaded model, not {head!r}: egstalker.inference.TalkingHead.from_dir("
                             "MODEL_DIR)")
    frames = heldout_frames(head, split)
    n = len(frames.pose_indices) if max_frames is None else min(max_frames, len(frames.pose_indices))
    if n < 1:
        raise EgstalkerError("nothing to evaluate: --max-frames must be at least 1")
    metrics_device = metrics_device or str(getattr(head, "device", "cpu"))
    sample_positions = set(np.linspace(0, n - 1, min(report_samples, n)).round().astype(int).tolist())
    samples: list[tuple[int, np.ndarray, np.ndarray]] = []
    video_frames = min(n, int(round(report_video_seconds * head.fps)))
    writer = None
    new_report_dir = report_dir is not None and not Path(report_dir).exists()
    if report_dir is not None:
        from egstalker.evaluate.report import check_report_dir

        check_report_dir(report_dir)
        writer = _report_video_writer(Path(report_dir), head, frames, video_frames)

    psnr, ssim, lpips = np.zeros(n), np.zeros(n), np.zeros(n)
    pred_landmarks, true_landmarks = [], []
    batch_times: list[tuple[int, float]] = []
    start = time.perf_counter()
    try:
        with metrics.FaceLandmarks() as detector, tqdm(total=n, desc=f"eval {split}", unit="frame",
                                                       disable=not show_progress) as bar:
            for lo in range(0, n, batch_size):
                hi = min(n, lo + batch_size)
                t0 = time.perf_counter()
                renders = head.render_frames(frames.features, frames.audio_ids[lo:hi], frames.pose_indices[lo:hi])
                batch_times.append((hi - lo, time.perf_counter() - t0))
                truths = np.stack([load_ground_truth(frames.dataset_dir, i, head.width, head.height)
                                   for i in frames.frame_ids[lo:hi]])
                psnr[lo:hi] = metrics.psnr(renders, truths)
                ssim[lo:hi] = metrics.ssim(renders, truths)
                lpips[lo:hi] = metrics.lpips(renders, truths, net=lpips_net, device=metrics_device)
                pred_landmarks.append(metrics.detect_landmarks(renders, detector))
                true_landmarks.append(metrics.detect_landmarks(truths, detector))
                for k in range(hi - lo):
                    if writer is not None and lo + k < video_frames:
                        from egstalker.evaluate.report import side_by_side

                        writer.write(side_by_side(renders[k], truths[k]))
                    if lo + k in sample_positions:
                        samples.append((lo + k, renders[k].copy(), truths[k].copy()))
                bar.update(hi - lo)
        if writer is not None:
            writer.close()
    except BaseException:
        if writer is not None:
            writer.abort()
        if new_report_dir:  # a failed or interrupted eval leaves no empty report folder behind
            shutil.rmtree(report_dir, ignore_errors=True)
        raise
    true_landmarks = np.concatenate(true_landmarks)
    mouth = metrics.mouth_scores(np.concatenate(pred_landmarks), true_landmarks)
    frozen = shifted = float("nan")
    if lipsync_controls:
        shift = int(round(control_shift_seconds * head.fps))
        rows = frames.audio_ids[:n]
        frozen = _control_mouth_corr(head, frames.features, rows, np.full(n, frames.pose_indices[0]),
                                     true_landmarks, batch_size, show_progress, "frozen pose")
        shifted = _control_mouth_corr(head, frames.features, (rows + shift) % len(frames.features),
                                      frames.pose_indices[:n], true_landmarks, batch_size, show_progress,
                                      f"audio +{control_shift_seconds:g} s")
    timed = batch_times[1:] if len(batch_times) > 1 else batch_times
    fps = sum(c for c, _ in timed) / max(sum(t for _, t in timed), 1e-9)
    # PSNR of identical frames is inf; cap at 100 dB so a mean stays meaningful
    result = EvalResult(
        psnr=float(np.mean(np.minimum(psnr, 100.0))), ssim=float(ssim.mean()), lpips=float(lpips.mean()),
        lmd=mouth.lmd, mouth_corr=mouth.mouth_corr, fps=float(fps), n_frames=n, split=split,
        lpips_net=lpips_net, width=head.width, height=head.height, device=str(getattr(head, "device", "cpu")),
        lmd_px=mouth.lmd_px, mouth_frames=mouth.n_frames, mouth_corr_low=mouth.mouth_corr_interval[0],
        mouth_corr_high=mouth.mouth_corr_interval[1], mouth_corr_frozen_pose=frozen,
        mouth_corr_shifted_audio=shifted, seconds=time.perf_counter() - start,
        per_frame={"psnr": psnr, "ssim": ssim, "lpips": lpips, "opening_pred": mouth.opening_pred,
                   "opening_true": mouth.opening_true, "frame_ids": frames.frame_ids[:n].copy()})
    if report_dir is not None:
        from egstalker.evaluate.report import write_report

        summary = {**result.to_json(), "model": str(getattr(head, "model_dir", "")),
                   "dataset": str(frames.dataset_dir)}
        try:
            write_report(report_dir, summary, result.per_frame, sorted(samples, key=lambda s: s[0]),
                         "side_by_side.mp4" if video_frames else None,
                         title=f"egstalker eval: {Path(str(getattr(head, 'model_dir', 'model'))).name} ({split})")
        except BaseException:
            if new_report_dir:
                shutil.rmtree(report_dir, ignore_errors=True)
            raise
    return result


def _control_mouth_corr(head: "TalkingHead", features: np.ndarray, audio_rows: np.ndarray, pose_indices: np.ndarray,
                        true_landmarks: np.ndarray, batch_size: int, show_progress: bool, what: str) -> float:
    """Mouth corr against the filmed frames' landmarks of renders driven by other audio rows / poses."""
    from tqdm import tqdm

    from egstalker import metrics

    landmarks = []
    with metrics.FaceLandmarks() as detector, tqdm(total=len(audio_rows), desc=f"control: {what}", unit="frame",
                                                   disable=not show_progress) as bar:
        for lo in range(0, len(audio_rows), batch_size):
            hi = min(len(audio_rows), lo + batch_size)
            renders = head.render_frames(features, audio_rows[lo:hi], pose_indices[lo:hi])
            landmarks.append(metrics.detect_landmarks(renders, detector))
            bar.update(hi - lo)
    return metrics.mouth_scores(np.concatenate(landmarks), true_landmarks).mouth_corr


def _report_video_writer(report_dir: Path, head: "TalkingHead", frames: HeldOutFrames, n_frames: int):
    """An Mp4Writer for render | ground truth with the held-out frames' own audio (dataset aud.wav)."""
    from egstalker.dataset.layout import DatasetLayout
    from egstalker.media import read_audio
    from egstalker.render.video import Mp4Writer

    try:
        report_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EgstalkerError(f"cannot create the report folder {report_dir} ({e.strerror}); give --report a new or "
                             "existing folder") from None
    audio = None
    wav_path = DatasetLayout(frames.dataset_dir).audio_wav
    if wav_path.exists() and n_frames:
        rate = 16000
        wav = read_audio(wav_path, rate=rate, align_to_video=False)
        first = int(frames.audio_ids[0])
        # the held-out audio rows are consecutive; take the samples of the frames shown
        audio = wav[int(first / head.fps * rate):int((first + n_frames) / head.fps * rate)]
        if len(audio) == 0:
            audio = None
    return Mp4Writer(report_dir / "side_by_side.mp4", 2 * head.width + 4, head.height, head.fps,
                     audio=audio, audio_rate=16000)
