"""The inference object: a trained talking head rebuilt from its model folder (imports nothing of training).

    >>> head = TalkingHead.from_dir("models/lieu", device="cuda")
    >>> for frame in head(wav16k):          # uint8 [H, W, 3], exactly round(len(wav) / 16000 * 25) frames
    ...     ...

Pose sources (camera, eye blink, torso image) are the dataset's frames: `poses` holds every frame's camera
(the training frames first, then the held-out ones, `poses.n_train` of them training), and the torso images
and background are read from the dataset folder recorded in the model (pass `dataset_dir=` if it moved).
The spatial features/queries of the Gaussians are computed once at load (they do not change per frame).
"""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path
from typing import Iterator, Literal, Sequence

import numpy as np
import torch

from egstalker.audio.base import window_offsets
from egstalker.dataset.layout import DatasetLayout
from egstalker.dataset.reader import load_background, load_torso_rgba
from egstalker.errors import EgstalkerError, EgstalkerWarning
from egstalker.model.folder import ModelInfo, PoseSources, check_dataset_matches, load_model, read_poses
from egstalker.preprocess.pipeline import outdated_dataset_note

PoseMode = Literal["dataset", "loop", "static"]
Precision = Literal["auto", "fp32", "fp16"]
PRECISIONS = ("auto", "fp32", "fp16")


def resolve_precision(precision: str, device: str | torch.device) -> str:
    """'fp32' or 'fp16': what `precision` means on `device` ('auto': fp16 on CUDA, where its frames are 74 dB
    from fp32's and render 1.4-1.6x as fast (docs/gpu.md), fp32 elsewhere, where fp16 would change nothing)."""
    if precision not in PRECISIONS:
        raise EgstalkerError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "fp16" if torch.device(device).type == "cuda" else "fp32"
    return precision


def dataset_audio_weights(dataset_dir: Path) -> str | None:
    """The audio weights a dataset was preprocessed with (`--audio-weights`), or None: a model must hear speech
    through the weights its training features came from (`TalkingHead.from_dir` refuses a path that is gone rather
    than fall back to other weights). deepspeech's "weights" are the training clip's own imported features,
    never right for other speech: not returned."""
    try:
        audio = json.loads((Path(dataset_dir) / "preprocess_config.json").read_text())["audio"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return None if audio.get("encoder") == "deepspeech" else audio.get("weights")


class TalkingHead:
    """A trained person-specific head, rebuilt from a model folder alone."""

    def __init__(self, model, info: ModelInfo, poses: PoseSources, dataset_dir: Path, model_dir: Path,
                 device: torch.device, torso_cache_mib: float = 1024.0, precision: Precision = "fp32",
                 audio_weights: str | Path | None = None, encoder_device: str | torch.device | None = None):
        precision = resolve_precision(precision, device)
        self.model = model
        # fp16: the deformation network's products in half precision on CUDA (rasterisation stays float32)
        self.precision = precision
        model.deformation.inference_dtype = torch.float16 if precision == "fp16" else None
        self.info = info
        self.poses = poses
        self.dataset_dir = Path(dataset_dir)
        self.layout = DatasetLayout(self.dataset_dir)
        self.model_dir = Path(model_dir)
        self.device = torch.device(device)
        self.fps = float(info.fps)
        self.sample_rate = int(info.sample_rate)
        self.height, self.width = int(info.height), int(info.width)
        self.encoder_name = info.encoder_name
        self.audio_weights = audio_weights
        self.encoder_device = torch.device(encoder_device) if encoder_device is not None else torch.device(device)
        self.audio_window = int(info.spec.audio_window)
        self.audio_future = int(info.spec.audio_future)
        self.n_pose_frames = int(poses.n_train)
        self._encoder = None
        self.warm_up_seconds = 0.0
        """How long `warm_up` took (0: not warmed up)."""
        self._background = torch.from_numpy(load_background(self.layout, (self.width, self.height))).to(self.device)
        # Torso images stay on the device as uint8 RGBA (a 256 px clip of 1,500 frames: 390 MB), composited there:
        # reading and compositing PNGs on the host per frame was most of a served frame's cost.
        self._torso_cache: dict[int, torch.Tensor] = {}
        self._torso_cache_frames = max(1, int(torso_cache_mib * 2**20 // (self.width * self.height * 4)))
        self._torso_pool = None
        self._viewmats = torch.from_numpy(poses.viewmats).float().to(self.device)
        self._K = torch.from_numpy(poses.K).float().to(self.device)
        self._au45 = torch.from_numpy(poses.au45).float().to(self.device)
        self.model.freeze_cache()

    @classmethod
    def from_dir(cls, model_dir: str | Path, device: str | torch.device = "cpu",
                 dataset_dir: str | Path | None = None, check_encoder: bool = True,
                 precision: Precision = "fp32", audio_weights: str | Path | None = None,
                 encoder_device: str | torch.device | None = None) -> "TalkingHead":
        """Load a model folder written by `egstalker train`.

        Raises EgstalkerError for a missing folder, a folder that is not a model, an incompatible format
        version, a missing dataset (torso/background source) or (with `check_encoder`) an audio encoder whose
        weights are absent. check_encoder=False serves callers that bring their own features (evaluation of
        the dataset's features on a machine without the encoder). precision="fp16" runs the deformation
        network in half precision on CUDA (faster serving; see docs/gpu.md for its measured error); it changes
        nothing on the CPU; "auto" is fp16 on CUDA and fp32 elsewhere. audio_weights: the audio encoder's weights
        (egstalker.audio.get_encoder), by default those the dataset was preprocessed with (its
        preprocess_config.json), else the encoder's default. encoder_device: where the encoder runs (default
        `device`).
        """
        from egstalker.devices import resolve_device

        device = resolve_device(None if device is None else str(device), "device")  # None/"auto": cuda if any
        model_dir = Path(model_dir)
        model, info = load_model(model_dir, device)
        poses = read_poses(model_dir)
        dataset = Path(dataset_dir) if dataset_dir is not None else Path(info.dataset)
        layout = DatasetLayout(dataset)
        if not layout.background.exists() or not layout.torso_dir.is_dir():
            raise EgstalkerError(f"the model's torso/background source, dataset {dataset}, is missing or incomplete; "
                                 "pass the dataset folder it was trained on (--dataset DIR)")
        check_dataset_matches(info, poses, dataset)
        stale = outdated_dataset_note(dataset)
        if stale:  # e.g. torso images from before the chin/neck seam fix
            warnings.warn(stale, EgstalkerWarning, stacklevel=2)
        if audio_weights is None:
            audio_weights = dataset_audio_weights(dataset)
            # eval (check_encoder=False) reads the dataset's features and never needs them
            if check_encoder and audio_weights is not None and not Path(audio_weights).exists():
                raise EgstalkerError(f"the audio weights the model's features came from, {audio_weights} (recorded in "
                                     f"{dataset / 'preprocess_config.json'}), are not there any more; pass their new "
                                     "location with --audio-weights PATH (render, serve)")
        head = cls(model, info, poses, dataset, model_dir, torch.device(device), precision=precision,
                   audio_weights=audio_weights, encoder_device=encoder_device)
        if check_encoder:
            head.encoder  # fail early (clear error) when the encoder's weights are unavailable here
        return head

    # --- audio
    @property
    def encoder(self):
        """The audio encoder the model was trained with (egstalker.audio)."""
        if self._encoder is None:
            from egstalker.audio import get_encoder

            self._encoder = get_encoder(self.encoder_name, weights=self.audio_weights, device=self.encoder_device)
        return self._encoder

    @property
    def lookahead_frames(self) -> int:
        """Future frames of audio a frame needs: the window's future rows + the encoder's look-ahead."""
        return int(self.audio_future + np.ceil(self.encoder.lookahead_seconds * self.fps))

    def encode_audio(self, wav: np.ndarray) -> np.ndarray:
        """16 kHz mono float32 -> per-frame features [n_frames, *feature_shape] with the model's encoder."""
        features = self.encoder.encode(wav)
        expected = tuple(self.info.spec.feature_shape)
        if tuple(features.shape[1:]) != expected:
            raise EgstalkerError(f"encoder {self.encoder_name} gives features {tuple(features.shape[1:])}, the model "
                                 f"was trained on {expected}; use the encoder weights it was trained with")
        return features

    # --- poses
    def pose_schedule(self, n_frames: int, mode: PoseMode = "loop") -> np.ndarray:
        """[n_frames] indices into the training frames (pose, eye blink, torso, background).

        'loop' ping-pongs over the training frames (0, 1, .., n-1, n-2, .., 1, 0, 1, ..: no jump at the turn),
        'static' repeats frame 0, 'dataset' plays them in order (clamped at the last one).
        """
        n = self.n_pose_frames
        steps = np.arange(int(n_frames))
        if mode == "static" or n == 1:
            return np.zeros(len(steps), np.int64)
        if mode == "dataset":
            return np.minimum(steps, n - 1).astype(np.int64)
        if mode == "loop":
            period = 2 * (n - 1)
            phase = steps % period
            return np.where(phase < n, phase, period - phase).astype(np.int64)
        raise EgstalkerError(f"unknown pose mode {mode!r}; use 'dataset', 'loop' or 'static'")

    def torso_backgrounds(self, pose_indices: Sequence[int], background: torch.Tensor | None = None) -> torch.Tensor:
        """What each frame's head is rendered over: its pose frame's torso/neck on the background.

        Args:
            pose_indices: [B] rows of `poses`.
            background: optional float32 [H, W, 3] in [0, 1] on the device, replacing the dataset's bc.jpg.
        Returns:
            float32 [B, H, W, 3] in [0, 1] on the device.
        """
        frame_ids = [int(self.poses.frame_ids[int(p)]) for p in pose_indices]
        batch = {f: self._torso_cache[f] for f in frame_ids if f in self._torso_cache}
        missing = list(dict.fromkeys(f for f in frame_ids if f not in batch))
        if missing:
            size = (self.width, self.height)
            if len(missing) > 1:  # cv2 decodes without the GIL: read a batch's new frames in parallel
                if self._torso_pool is None:
                    from concurrent.futures import ThreadPoolExecutor

                    self._torso_pool = ThreadPoolExecutor(min(8, os.cpu_count() or 1), thread_name_prefix="egs-torso")
                images = list(self._torso_pool.map(lambda f: load_torso_rgba(self.layout, f, size), missing))
            else:
                images = [load_torso_rgba(self.layout, missing[0], size)]
            for f, image in zip(missing, images):
                batch[f] = torch.from_numpy(image).to(self.device)
                if len(self._torso_cache) >= self._torso_cache_frames:
                    self._torso_cache.pop(next(iter(self._torso_cache)))  # oldest first
                self._torso_cache[f] = batch[f]
        rgba = torch.stack([batch[f] for f in frame_ids]).float() / 255.0
        alpha = rgba[..., 3:]
        bg = self._background if background is None else background
        return rgba[..., :3] * alpha + bg * (1.0 - alpha)

    def preload_torso(self, batch: int = 64) -> int:
        """Load the training pose frames' torso images into the device cache now (as many as it holds), so the
        first streams after a server starts do not wait for them; returns how many the cache holds."""
        n = min(self.n_pose_frames, self._torso_cache_frames)
        for start in range(0, n, batch):
            self.torso_backgrounds(np.arange(start, min(n, start + batch)))
        return len(self._torso_cache)

    def warm_up(self, batch_sizes: Sequence[int]) -> float:
        """Render one throwaway batch of each size, so that the first live calls of each size do not pay for
        CUDA's lazy kernel loading and the allocator's growth (on an H200 the first 8-16 sessions after a start
        lost frames without it); returns the seconds it took. A size the device cannot render raises
        EgstalkerError."""
        if not len(batch_sizes):
            return 0.0
        start = time.perf_counter()
        features = np.zeros((1, *self.info.spec.feature_shape), np.float32)
        for size in batch_sizes:
            rows = np.zeros(int(size), np.int64)
            try:
                self.render_frames(features, rows, np.arange(int(size)) % self.n_pose_frames)
            except RuntimeError as e:  # e.g. out of device memory at the largest batch
                raise EgstalkerError(f"rendering a warm-up batch of {int(size)} frames failed "
                                     f"({e.__class__.__name__}: {e}); lower --max-batch") from e
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.warm_up_seconds = time.perf_counter() - start
        return self.warm_up_seconds

    # --- rendering
    def _windows(self, features: np.ndarray, frame_indices: Sequence[int]) -> np.ndarray:
        offsets = window_offsets(self.audio_window, self.audio_future)
        rows = np.clip(np.asarray(frame_indices)[:, None] + offsets[None], 0, len(features) - 1)
        return np.asarray(features, np.float32)[rows]  # [B, W, *feature_shape]

    @torch.no_grad()
    def render_frames(self, features: np.ndarray, frame_indices: Sequence[int], pose_indices: Sequence[int],
                      background: np.ndarray | None = None, out: np.ndarray | None = None) -> np.ndarray:
        """Render a batch; returns uint8 [B, H, W, 3] (`out`, when given: the frames are copied into it).

        Args:
            features: [n_frames, *feature_shape] audio features of the utterance.
            frame_indices: [B] rows of `features`; each frame reads the window around its row (edges clamped).
            pose_indices: [B] rows of `poses` (training frames first, then held-out) for camera/eye/torso.
            background: optional [H, W, 3] uint8 replacing the dataset background (needs RGBA torso images).
            out: optional uint8 [B, H, W, 3] array to write the frames into (e.g. shared memory).
        """
        rendered = self._render(features, frame_indices, pose_indices, background)
        if rendered is None:
            return np.zeros((0, self.height, self.width, 3), np.uint8)
        frames = (rendered.image * 255.0 + 0.5).clamp(0, 255).to(torch.uint8)
        if out is None:
            return frames.cpu().numpy()
        if out.shape != tuple(frames.shape) or out.dtype != np.uint8:
            raise ValueError(f"out must be uint8 {list(frames.shape)}, got {out.dtype} {list(out.shape)}")
        torch.from_numpy(out).copy_(frames)
        return out

    @torch.no_grad()
    def render_layers(self, features: np.ndarray, frame_indices: Sequence[int],
                      pose_indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Frames and the head's own coverage, for compositing and for measuring the head/neck seam.

        Same arguments as `render_frames`. Returns (uint8 [B, H, W, 3] frames, float32 [B, H, W] head alpha in
        [0, 1]: how much of each pixel the Gaussians cover; the pose frame's torso shows through the rest).
        """
        rendered = self._render(features, frame_indices, pose_indices, None)
        if rendered is None:
            empty = np.zeros((0, self.height, self.width), np.float32)
            return np.zeros((*empty.shape, 3), np.uint8), empty
        frames = (rendered.image * 255.0 + 0.5).clamp(0, 255).to(torch.uint8)
        return frames.cpu().numpy(), rendered.alpha[..., 0].float().cpu().numpy()

    def _render(self, features: np.ndarray, frame_indices: Sequence[int], pose_indices: Sequence[int],
                background: np.ndarray | None):
        """The model's HeadRender of a batch over its pose frames' torso images (None for an empty batch)."""
        frame_indices = np.asarray(frame_indices, np.int64)
        pose_indices = np.asarray(pose_indices, np.int64)
        if len(frame_indices) != len(pose_indices):
            raise ValueError(f"{len(frame_indices)} frame indices but {len(pose_indices)} pose indices")
        if len(frame_indices) == 0:
            return None
        if pose_indices.min() < 0 or pose_indices.max() >= len(self.poses.frame_ids):
            raise ValueError(f"pose indices must be in [0, {len(self.poses.frame_ids)})")
        bg = None
        if background is not None:
            bg = np.asarray(background)
            if bg.shape != (self.height, self.width, 3):
                raise EgstalkerError(f"background must be {self.height}x{self.width} RGB, got {list(bg.shape)}")
            bg = torch.from_numpy(bg.astype(np.float32) / 255.0).to(self.device)
        dev = self.device
        audio = torch.from_numpy(self._windows(features, frame_indices)).to(dev)
        idx = torch.from_numpy(pose_indices).to(dev)
        viewmats = self._viewmats[idx]
        Ks = self._K.expand(len(idx), 3, 3)
        backgrounds = self.torso_backgrounds(pose_indices, bg)
        return self.model.render(viewmats, Ks, self.width, self.height, backgrounds, audio=audio,
                                 au45=self._au45[idx], dynamic=True)

    def __call__(self, wav: np.ndarray, pose: PoseMode = "loop", batch_size: int = 8) -> Iterator[np.ndarray]:
        """Stream frames (uint8 [H, W, 3]) for a whole utterance: exactly round(len(wav)/16000*25) frames."""
        if batch_size < 1:
            raise EgstalkerError(f"batch_size must be at least 1, not {batch_size}")
        features = self.encode_audio(wav)
        n = len(features)
        poses = self.pose_schedule(n, pose)
        for start in range(0, n, batch_size):
            rows = np.arange(start, min(n, start + batch_size))
            yield from self.render_frames(features, rows, poses[rows])
