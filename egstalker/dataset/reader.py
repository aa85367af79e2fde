"""Typed reader of a preprocessed dataset, streaming frames from disk (nothing is preloaded).

`open_dataset(root, split)` checks that every file training needs exists (naming the preprocessing task that
makes a missing one), reads the small whole-clip files (cameras, eye blink, the audio features as a memory
map) and returns a `TalkingDataset`. `FrameDataset` is the torch Dataset over its frames: workers read and
resize one frame's images on demand, so memory is bounded by the DataLoader's prefetch, not the clip length.

Cameras: `transforms_*.json` holds camera-to-world matrices in NeRF/OpenGL axes (x right, y up, z back) whose
world is the canonical head frame. The rasterizer wants world-to-camera in OpenCV axes (x right, y down,
z forward): viewmat = inverse(c2w @ diag(1, -1, -1, 1)).

Example:
    >>> data = open_dataset("datasets/lieu", "train", resolution=128)
    >>> sample = FrameDataset(data)[0]
    >>> sample["image"].shape, sample["audio"].shape
    (torch.Size([128, 128, 3]), torch.Size([8, 96]))
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
import torch

from egstalker.audio import LEGACY_DEFAULT_ENCODER
from egstalker.audio.base import window_offsets
from egstalker.dataset.layout import DATASET_FORMAT_VERSION, DatasetLayout
from egstalker.errors import EgstalkerError

Split = Literal["train", "val", "all"]
OPENGL_TO_OPENCV = np.diag([1.0, -1.0, -1.0, 1.0])
HEAD_RGB = (0, 0, 255)
NECK_RGB = (0, 255, 0)
TORSO_RGB = (255, 0, 0)

# Which preprocessing task makes each file (the seed's numbering, used by `egstalker preprocess --task N`).
TASK_OF = {
    "aud.wav": 1, "aud.npy": 2, "ori_imgs": 3, "parsing": 4, "bc.jpg": 5, "torso_imgs": 6, "gt_imgs": 6,
    "ori_imgs/*.lms": 7, "track_params.pt": 8, "au.csv": 8, "transforms_train.json": 9, "transforms_val.json": 9,
}


def _missing(root: Path, name: str, what: str) -> EgstalkerError:
    task = TASK_OF[name]
    return EgstalkerError(f"dataset {root} is incomplete: {what}; run `egstalker preprocess VIDEO -o {root} "
                          f"--task {task}` (or the whole preprocess) first")


def opengl_c2w_to_viewmat(c2w: np.ndarray) -> np.ndarray:
    """[..., 4, 4] camera-to-world (OpenGL axes) -> world-to-camera (OpenCV axes)."""
    return np.linalg.inv(c2w @ OPENGL_TO_OPENCV)


def read_landmarks(path: Path) -> np.ndarray:
    """68 iBUG points [68, 2] (x, y) in pixels."""
    points = np.loadtxt(path, dtype=np.float32).reshape(-1, 2)
    if points.shape[0] != 68:
        raise EgstalkerError(f"{path} has {points.shape[0]} landmarks, expected 68; re-run preprocess --task 7")
    return points


def read_au45(path: Path, n_frames: int) -> np.ndarray:
    """Eye blink per frame: AU45_r clipped to [0, 2] and divided by 2 -> [n_frames] float32 in [0, 1]."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        fields = {name.strip(): name for name in (reader.fieldnames or [])}
        if "AU45_r" not in fields:
            raise EgstalkerError(f"{path} has no AU45_r column (columns: {sorted(fields)}); re-run preprocess --task 8")
        values = [float(row[fields["AU45_r"]]) for row in reader]
    au = np.clip(np.asarray(values, np.float32), 0.0, 2.0) / 2.0
    if len(au) < n_frames:
        raise EgstalkerError(f"{path} has {len(au)} rows for {n_frames} frames; re-run preprocess --task 8")
    return au[:n_frames]


def audio_encoder_name(meta: dict) -> str:
    """The registry name of the encoder that made a dataset's aud.npy, from its meta.json."""
    encoder = meta.get("audio_encoder")  # {"name": ..., "feature_shape": ...} from task 2 (or a bare name)
    if isinstance(encoder, dict):
        encoder = encoder.get("name")
    return LEGACY_DEFAULT_ENCODER if encoder in (None, "", "default") else str(encoder)


def features_mismatch(dataset_dir: str | Path, encoder: str, trained_on: str) -> str:
    """The one-line explanation when a dataset's audio features (`encoder`) are not those a model was trained on."""
    return (f"{dataset_dir} now holds '{encoder}' audio features and the model was trained on '{trained_on}': "
            f"re-encode it with `egstalker preprocess VIDEO -o {dataset_dir} --audio-features {trained_on}` (tasks 2 "
            "and 9, under a minute), or train a new model on these features")


def target_size(width: int, height: int, resolution: int | None) -> tuple[int, int]:
    """(width, height) with the longer side = resolution (None keeps the size)."""
    if resolution is None or resolution == max(width, height):
        return width, height
    s = resolution / max(width, height)
    return max(1, int(round(width * s))), max(1, int(round(height * s)))


def _read_image(path: Path, flags: int = cv2.IMREAD_COLOR) -> np.ndarray:
    image = cv2.imread(str(path), flags)
    if image is None:
        raise EgstalkerError(f"cannot read {path} (missing or corrupt); re-run the preprocess task that makes it")
    return image


def _resize(image: np.ndarray, size: tuple[int, int], nearest: bool = False) -> np.ndarray:
    if (image.shape[1], image.shape[0]) == size:
        return image
    interp = cv2.INTER_NEAREST if nearest else (cv2.INTER_AREA if image.shape[1] > size[0] else cv2.INTER_LINEAR)
    return cv2.resize(image, size, interpolation=interp)


def load_background(layout: DatasetLayout, size: tuple[int, int]) -> np.ndarray:
    """bc.jpg as float32 RGB [H, W, 3] in [0, 1] at `size` (width, height)."""
    bgr = _read_image(layout.background)
    return _resize(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), size).astype(np.float32) / 255.0


def load_torso_rgba(layout: DatasetLayout, frame_id: int, size: tuple[int, int]) -> np.ndarray:
    """torso_imgs/N.png at `size` as uint8 RGBA [H, W, 4]; an RGB image (older tools) gets alpha 255."""
    torso = _read_image(layout.torso(frame_id), cv2.IMREAD_UNCHANGED)
    if torso.ndim == 2:
        torso = cv2.cvtColor(torso, cv2.COLOR_GRAY2BGR)
    torso = _resize(torso, size)
    if torso.shape[2] == 4:
        return cv2.cvtColor(torso, cv2.COLOR_BGRA2RGBA)
    return cv2.cvtColor(torso, cv2.COLOR_BGR2RGBA)


def load_torso_composite(layout: DatasetLayout, frame_id: int, size: tuple[int, int],
                         background: np.ndarray) -> np.ndarray:
    """What the head is rendered over for a pose frame: its torso/neck image on `background`.

    torso_imgs/N.png is RGBA (torso and neck, transparent elsewhere) or, from older tools, RGB already on the
    background. background: float32 [H, W, 3] at `size`. Returns float32 [H, W, 3] in [0, 1].
    """
    rgba = load_torso_rgba(layout, frame_id, size)
    rgb = rgba[..., :3].astype(np.float32) / 255.0
    alpha = rgba[..., 3:4].astype(np.float32) / 255.0
    return rgb * alpha + background * (1.0 - alpha)


def head_mask_from_parsing(parsing_rgb: np.ndarray) -> np.ndarray:
    """[H, W, 3] uint8 colour-coded parsing -> [H, W] bool head (face, hair, ears) mask."""
    p = parsing_rgb.astype(np.int16)
    return (p[..., 0] < 64) & (p[..., 1] < 64) & (p[..., 2] > 192)


@dataclass
class TalkingDataset:
    """A dataset split: small per-frame arrays in memory, images read on demand.

    Attributes:
        layout: where the files are.
        split: 'train', 'val' or 'all'.
        frame_ids: [n] image ids (file numbers) of this split's frames, in order.
        audio_ids: [n] rows of the audio features for each frame.
        viewmats: [n, 4, 4] float32 world-to-camera (OpenCV axes; world = canonical head frame).
        K: [3, 3] float32 intrinsics at the output size.
        width, height: output image size; source_width, source_height: the dataset's.
        au45: [n] eye blink in [0, 1].
        features: [n_audio_frames, *feature_shape] audio features (a read-only memory map).
        encoder_name: registry name of the audio encoder that made `features`.
        has_face: see below.
    """

    layout: DatasetLayout
    split: str
    frame_ids: np.ndarray
    audio_ids: np.ndarray
    viewmats: np.ndarray
    K: np.ndarray
    width: int
    height: int
    source_width: int
    source_height: int
    au45: np.ndarray
    features: np.ndarray
    encoder_name: str
    meta: dict
    has_face: np.ndarray | None = None
    """[n] bool: False where no face was detected (interpolated landmarks and pose): a pose, not an image to
    learn from. None: every frame has one."""

    def __len__(self) -> int:
        return len(self.frame_ids)

    def face_frames(self) -> np.ndarray:
        """Positions of the frames with a detected face: the ones to learn from and score on."""
        return np.arange(len(self)) if self.has_face is None else np.flatnonzero(self.has_face)

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return tuple(self.features.shape[1:])

    @property
    def size(self) -> tuple[int, int]:
        return self.width, self.height

    @cached_property
    def background(self) -> np.ndarray:
        return load_background(self.layout, self.size)

    def audio_window(self, audio_id: int, window: int, future: int) -> np.ndarray:
        """Features of rows audio_id + window_offsets(window, future), clamped at the clip's ends."""
        rows = np.clip(window_offsets(window, future) + audio_id, 0, len(self.features) - 1)
        return np.asarray(self.features[rows], dtype=np.float32)

    def image(self, k: int) -> np.ndarray:
        """Ground truth of frame k: float32 RGB [H, W, 3] in [0, 1]."""
        bgr = _read_image(self.layout.gt(int(self.frame_ids[k])))
        return _resize(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), self.size).astype(np.float32) / 255.0

    def head_mask(self, k: int) -> np.ndarray:
        """[H, W] float32 head mask of frame k (from parsing)."""
        bgr = _read_image(self.layout.parsing(int(self.frame_ids[k])))
        mask = head_mask_from_parsing(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)).astype(np.float32)
        return _resize(mask, self.size)

    def torso_composite(self, k: int) -> np.ndarray:
        return load_torso_composite(self.layout, int(self.frame_ids[k]), self.size, self.background)

    def landmarks(self, k: int) -> np.ndarray:
        """[68, 2] landmarks of frame k in output pixels."""
        points = read_landmarks(self.layout.landmarks(int(self.frame_ids[k])))
        return points * np.array([self.width / self.source_width, self.height / self.source_height], np.float32)

    def lip_box(self, k: int, margin: float = 0.25, points: np.ndarray | None = None) -> np.ndarray:
        """[4] int64 (x0, y0, x1, y1) box around landmarks 48-67 (x1/y1 exclusive), clipped to the image."""
        mouth = (self.landmarks(k) if points is None else points)[48:68]
        lo, hi = mouth.min(0), mouth.max(0)
        pad = (hi - lo) * margin
        lo = np.clip(np.floor(lo - pad), 0, [self.width - 1, self.height - 1])
        hi = np.maximum(np.minimum(np.ceil(hi + pad), [self.width, self.height]), lo + 1)
        return np.concatenate([lo, hi]).astype(np.int64)


MOUTH_SHAPE_NAMES = ("inner_opening", "outer_opening", "width")


def mouth_shape(points: np.ndarray) -> np.ndarray:
    """[..., 68, 2] landmarks -> [..., 3] float32: inner-lip gap (62-66), outer-lip gap (51-57) and mouth width
    (48-54), each over the outer eye-corner distance (36-45), so head size and distance to the camera cancel."""
    def dist(a: int, b: int) -> np.ndarray:
        return np.linalg.norm(points[..., a, :] - points[..., b, :], axis=-1)

    eyes = np.maximum(dist(36, 45), 1e-6)
    return (np.stack([dist(62, 66), dist(51, 57), dist(48, 54)], axis=-1) / eyes[..., None]).astype(np.float32)


def _load_json(path: Path, root: Path, name: str) -> dict:
    if not path.exists():
        raise _missing(root, name, f"{path.name} is missing")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise EgstalkerError(f"{path} is not valid JSON ({e}); re-run preprocess --task {TASK_OF[name]}") from None


def check_dataset(root: str | Path) -> DatasetLayout:
    """Raise EgstalkerError naming the first missing piece (and the task that makes it); return the layout."""
    root = Path(root)
    if not root.exists():
        raise EgstalkerError(f"dataset folder {root} does not exist; run `egstalker preprocess VIDEO -o {root}` first")
    if not root.is_dir():
        raise EgstalkerError(f"{root} is a file, not a dataset folder; give the folder `egstalker preprocess` made")
    layout = DatasetLayout(root)
    if layout.meta.exists():
        try:
            version = json.loads(layout.meta.read_text()).get("format_version", DATASET_FORMAT_VERSION)
        except json.JSONDecodeError:
            raise EgstalkerError(f"{layout.meta} is not valid JSON; re-run `egstalker preprocess`") from None
        if version != DATASET_FORMAT_VERSION:
            raise EgstalkerError(f"dataset {root} has format version {version}, this egstalker reads version "
                                 f"{DATASET_FORMAT_VERSION}; preprocess the video again")
    for name, path in (("aud.npy", layout.audio_features), ("bc.jpg", layout.background),
                       ("track_params.pt", layout.track_params), ("au.csv", layout.action_units),
                       ("transforms_train.json", layout.transforms("train")),
                       ("transforms_val.json", layout.transforms("val"))):
        if not path.exists():
            raise _missing(root, name, f"{path.name} is missing")
    for name, folder in (("parsing", layout.parsing_dir), ("torso_imgs", layout.torso_dir),
                         ("gt_imgs", layout.gt_dir), ("ori_imgs", layout.frames_dir)):
        if not folder.is_dir():
            raise _missing(root, name, f"folder {folder.name}/ is missing")
    return layout


def open_dataset(root: str | Path, split: Split = "train", resolution: int | None = None,
                 check_frames: bool = True) -> TalkingDataset:
    """Read a dataset split's cameras, eye blink and audio features; check its per-frame files exist.

    Args:
        root: dataset folder made by `egstalker preprocess`.
        split: 'train' (first 10/11), 'val' (last 1/11) or 'all'.
        resolution: output size of the longer image side (None = the dataset's).
        check_frames: verify every frame's gt/torso/parsing/landmark file exists (cheap `stat`s).
    """
    layout = check_dataset(root)
    root = layout.root
    splits = ["train", "val"] if split == "all" else [split]
    if split not in ("train", "val", "all"):
        raise EgstalkerError(f"unknown split {split!r}; use 'train', 'val' or 'all'")
    frames, focal, cx, cy = [], None, None, None
    for s in splits:
        data = _load_json(layout.transforms(s), root, f"transforms_{s}.json")
        try:
            focal, cx, cy = float(data["focal_len"]), float(data["cx"]), float(data["cy"])
            frames += [(int(f["img_id"]), int(f.get("aud_id", f["img_id"])),
                        np.asarray(f["transform_matrix"], np.float64), bool(f.get("face", True)))
                       for f in data["frames"]]
        except (KeyError, TypeError, ValueError) as e:
            raise EgstalkerError(f"{layout.transforms(s)} lacks a field ({e}); re-run preprocess --task 9") from None
    if not frames:
        raise EgstalkerError(f"dataset {root} has no {split} frames; the clip is too short (preprocess a longer video)")
    meta = json.loads(layout.meta.read_text()) if layout.meta.exists() else {}

    try:
        features = np.load(layout.audio_features, mmap_mode="r")
    except ValueError as e:
        raise EgstalkerError(f"{layout.audio_features} is unreadable ({e}); re-run preprocess --task 2") from None
    frame_ids = np.array([f[0] for f in frames], np.int64)
    audio_ids = np.array([f[1] for f in frames], np.int64)
    if features.ndim < 2 or audio_ids.max() >= len(features):
        raise EgstalkerError(f"{layout.audio_features} has {len(features)} frames of features, the transforms "
                             f"need {audio_ids.max() + 1}; re-run preprocess --task 2")

    # The source size: from meta.json when recorded, else from the first gt image.
    src_w, src_h = meta.get("width"), meta.get("height")
    if not src_w or not src_h:
        first = layout.gt(int(frame_ids[0]))
        if not first.exists():
            raise _missing(root, "gt_imgs", f"{first.name} is missing from gt_imgs/")
        src_h, src_w = _read_image(first).shape[:2]
    if resolution is not None and resolution > max(int(src_w), int(src_h)):
        raise EgstalkerError(f"resolution {resolution} px is larger than the dataset's frames "
                             f"({int(src_w)}x{int(src_h)}): upscaled frames add no detail; use at most "
                             f"{max(int(src_w), int(src_h))} (or leave it out)")
    width, height = target_size(int(src_w), int(src_h), resolution)
    sx, sy = width / src_w, height / src_h
    K = np.array([[focal * sx, 0, cx * sx], [0, focal * sy, cy * sy], [0, 0, 1]], np.float32)

    if check_frames:
        for i in frame_ids:
            for name, path in (("gt_imgs", layout.gt(i)), ("torso_imgs", layout.torso(i)),
                               ("parsing", layout.parsing(i)), ("ori_imgs/*.lms", layout.landmarks(i))):
                if not path.exists():
                    raise _missing(root, name, f"{path.relative_to(root)} is missing")

    n_total = int(max(frame_ids.max(), audio_ids.max()) + 1)
    au_all = read_au45(layout.action_units, n_total)
    encoder = audio_encoder_name(meta)
    return TalkingDataset(
        layout=layout, split=split, frame_ids=frame_ids, audio_ids=audio_ids,
        viewmats=opengl_c2w_to_viewmat(np.stack([f[2] for f in frames])).astype(np.float32), K=K,
        width=width, height=height, source_width=int(src_w), source_height=int(src_h),
        au45=au_all[frame_ids], features=features, encoder_name=encoder, meta=meta,
        has_face=np.array([f[3] for f in frames], bool),
    )


class FrameDataset(torch.utils.data.Dataset):
    """Per-frame training samples, read from disk in `__getitem__` (safe in DataLoader workers).

    Each sample is a dict:
        index: int, position in the split; frame_id: int, file number.
        image: [H, W, 3] float32 ground truth in [0, 1].
        background: [H, W, 3] float32 torso/neck of this frame over bc.jpg (what the head is rendered over).
        head_mask: [H, W, 1] float32 head (face + hair) mask from parsing.
        lip_box: [4] int64 (x0, y0, x1, y1) around landmarks 48-67.
        mouth_shape: [3] float32 tracked mouth opening and width (`mouth_shape`).
        viewmat: [4, 4] world-to-camera (OpenCV axes); K: [3, 3].
        audio: [window, *feature_shape] float32 features around the frame (edges clamped).
        au45: float32 eye blink in [0, 1].
    """

    def __init__(self, data: TalkingDataset, audio_window: int = 8, audio_future: int = 3,
                 with_images: bool = True):
        self.data = data
        self.audio_window = audio_window
        self.audio_future = audio_future
        self.with_images = with_images

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, k: int) -> dict:
        d = self.data
        sample = {
            "index": int(k),
            "frame_id": int(d.frame_ids[k]),
            "viewmat": torch.from_numpy(d.viewmats[k]),
            "K": torch.from_numpy(d.K),
            "audio": torch.from_numpy(d.audio_window(int(d.audio_ids[k]), self.audio_window, self.audio_future)),
            "au45": torch.tensor(float(d.au45[k])),
        }
        if self.with_images:
            sample["image"] = torch.from_numpy(d.image(k))
            sample["background"] = torch.from_numpy(d.torso_composite(k))
            sample["head_mask"] = torch.from_numpy(d.head_mask(k))[..., None]
            points = d.landmarks(k)
            sample["lip_box"] = torch.from_numpy(d.lip_box(k, points=points))
            sample["mouth_shape"] = torch.from_numpy(mouth_shape(points))
        return sample


def load_canonical_vertices(layout: DatasetLayout) -> np.ndarray:
    """Per-frame tracked face vertices in the canonical head frame, [n_frames, V, 3] float32."""
    try:
        params = torch.load(layout.track_params, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling problem means a damaged file
        raise EgstalkerError(f"{layout.track_params} is unreadable ({e.__class__.__name__}); "
                             "re-run preprocess --task 8") from None
    if "vertices" not in params:
        raise EgstalkerError(f"{layout.track_params} has no 'vertices'; re-run preprocess --task 8")
    vertices = torch.as_tensor(params["vertices"]).float().numpy()
    if vertices.ndim == 2:
        vertices = vertices[None]
    return vertices
