"""Face parser (task 4) at the picture's edges: black padding bars, background beside the shoulders."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np

from egstalker.dataset.layout import DatasetLayout
from egstalker.preprocess.config import PreprocessConfig
from egstalker.preprocess.face import FaceTrack, face_cache_path
from egstalker.preprocess.parsing import BACKGROUND, HEAD, TORSO, FaceGeometry, load_labels
from egstalker.preprocess.pipeline import preprocess
from tests.conftest import shared_media
from tests.test_preprocess_pipeline import remux

FAST = PreprocessConfig()
FAST.audio.encoder = "mel"
FAST.frames.crop = "none"
FAST.frames.max_size = 0  # keep 450 x 800
SECONDS = 2.5
ABOVE, BELOW = 250, 100  # black bars of the portrait frame (450 x 800) around the 450 x 450 obama picture


def _padded(source: Path, target: Path) -> Path:
    """The first SECONDS of a clip letterboxed with black bars into 450 x 800, its sound kept."""
    with av.open(str(source)) as src, av.open(str(target), "w") as dst:
        video = dst.add_stream("libx264", rate=25)
        video.width, video.height, video.pix_fmt = 450, ABOVE + 450 + BELOW, "yuv420p"
        video.options = {"crf": "16"}
        audio = dst.add_stream("aac", rate=16000)
        for frame in src.decode(src.streams.video[0]):
            if frame.time >= SECONDS:
                break
            canvas = np.zeros((ABOVE + 450 + BELOW, 450, 3), np.uint8)
            canvas[ABOVE:ABOVE + 450] = frame.to_ndarray(format="rgb24")
            for packet in video.encode(av.VideoFrame.from_ndarray(canvas, format="rgb24")):
                dst.mux(packet)
        for packet in video.encode():
            dst.mux(packet)
        src.seek(0)
        resampler = av.AudioResampler(format="fltp", layout="mono", rate=16000)
        for frame in src.decode(src.streams.audio[0]):
            if frame.time is not None and frame.time >= SECONDS:
                break
            for chunk in resampler.resample(frame):
                for packet in audio.encode(chunk):
                    dst.mux(packet)
        for packet in audio.encode(None):
            dst.mux(packet)
    return target


def _labels_and_faces(layout: DatasetLayout, count: int = 6):
    track = FaceTrack.load(face_cache_path(layout))
    n = len(track.landmarks)
    for i in np.linspace(0, n - 1, count).round().astype(int):
        yield load_labels(layout.parsing(int(i))), FaceGeometry.from_landmarks(track.landmarks[i])


def _shoulders(labels: np.ndarray, g: FaceGeometry, bottom: int, under: float = 0.35) -> float:
    """Share of torso in boxes over both shoulders: 0.5-1.0 face widths beside the chin, from `under` face
    heights below it down to the picture's bottom (the smaller of the two sides)."""
    top = int(g.chin[1] + under * g.height)
    shares = []
    for sign in (-1, 1):
        x0, x1 = sorted((int(g.chin[0] + sign * 0.5 * g.width), int(g.chin[0] + sign * 1.0 * g.width)))
        shares.append((labels[top:bottom, max(0, x0):x1] == TORSO).mean())
    return float(min(shares))


def test_black_padding_bars_are_background_and_the_dark_suit_is_torso(tmp_path):
    """obama letterboxed into a portrait frame: the bars are no scene (as background they made the dark suit
    background or hair, as person the bar under the picture was torso); the suit stays torso as unpadded."""
    video = _padded(shared_media("video/obama_20s_450.mp4"), tmp_path / "padded.mp4")
    layout = DatasetLayout(preprocess(video, tmp_path / "ds", tasks=[1, 3, 4], config=FAST, show_progress=False))
    for labels, g in _labels_and_faces(layout):
        assert labels.shape == (ABOVE + 450 + BELOW, 450)
        # the encoder smears the picture's edge into the bar's first rows (up to half a 16-row macroblock)
        assert (labels[:ABOVE - 8] == BACKGROUND).all() and (labels[ABOVE + 458:] == BACKGROUND).all()
        picture = labels[ABOVE:ABOVE + 450]
        assert 0.12 < (picture == TORSO).mean() < 0.25  # unpadded obama: 0.16-0.20
        assert _shoulders(labels, g, ABOVE + 450) > 0.9
        below_chin = labels[int(g.chin[1] + 0.35 * g.height):ABOVE + 450]
        assert (below_chin == HEAD).mean() < 0.02  # the suit is no hanging hair


def test_lieu_torso_covers_the_shoulders(tmp_path):
    clip = remux(shared_media("video/lieu_60s_256.mp4"), tmp_path / "lieu.mp4", SECONDS)
    layout = DatasetLayout(preprocess(clip, tmp_path / "ds", tasks=[1, 3, 4], config=FAST, show_progress=False))
    for labels, g in _labels_and_faces(layout):
        # lieu's face is half the picture: the shoulders show from about 0.1 face heights under the chin; at the
        # picture's edge they slope below the box's top (0.59 in one frame with the network; the colour model's
        # share counted the shelf above them)
        assert _shoulders(labels, g, labels.shape[0], under=0.1) > 0.5


def test_lieu_bottom_corners_are_not_torso(tmp_path):
    """lieu's shelf and bookcase beside the shoulders are never uncovered and look like the suit: the colour model
    alone kept them torso; the person segmentation network tells them from him."""
    clip = remux(shared_media("video/lieu_60s_256.mp4"), tmp_path / "lieu.mp4", SECONDS)
    layout = DatasetLayout(preprocess(clip, tmp_path / "ds", tasks=[1, 3, 4], config=FAST, show_progress=False))
    for labels, g in _labels_and_faces(layout):
        h, w = labels.shape
        # the shelf (left) and the bookcase edge (right) above the shoulder line
        assert (labels[int(0.55 * h):int(0.85 * h), :int(0.12 * w)] == TORSO).mean() < 0.1
        assert (labels[int(0.55 * h):int(0.8 * h), int(0.9 * w):] == TORSO).mean() < 0.1
