"""Task 3's framing of faces too small for one look at the whole frame (a waist-up or wider shot): the closer
search in tiles finds them and the crop lands around them; a face still tiny, two people, no face and an extreme
close-up are each reported clearly."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from egstalker.dataset.layout import DatasetLayout
from egstalker.errors import EgstalkerError
from egstalker.preprocess.config import PreprocessConfig
from egstalker.preprocess.framing import choose_framing, tile_levels
from egstalker.preprocess.pipeline import preprocess
from tests.conftest import shared_media

FAST = PreprocessConfig()
FAST.audio.encoder = "mel"  # the encoders have their own tests
CANVAS = (1280, 720)


def canvas_video(target: Path, seconds: float, places: list[tuple[int, int, int]], canvas=CANVAS,
                 closeup: bool = False) -> Path:
    """obama's first `seconds` at 25 fps with its sound, each frame scaled to `content` px and laid on a grey
    `canvas` at every (content, left, top) of `places` (none: a clip without a face). `closeup`: the frame cut to
    the face instead (forehead to chin filling ~90 % of it)."""
    from egstalker.media import iter_frames, read_audio
    from egstalker.render.video import Mp4Writer

    source = shared_media("video/obama_20s_450.mp4")
    speech = read_audio(source, 48000)[: int(seconds * 48000)]
    width, height = (400, 400) if closeup else canvas
    with Mp4Writer(target, width, height, fps=25, audio=speech, audio_rate=48000) as writer:
        for frame in iter_frames(source, 25, n_frames=int(seconds * 25)):
            if closeup:
                writer.write(np.ascontiguousarray(cv2.resize(frame.image[100:340, 105:345], (width, height))))
                continue
            picture = np.full((height, width, 3), 128, np.uint8)
            for content, left, top in places:
                picture[top:top + content, left:left + content] = cv2.resize(frame.image, (content, content),
                                                                             interpolation=cv2.INTER_AREA)
            writer.write(picture)
    return target


def test_tiles_hold_every_small_face():
    """Each level's tiles cover the frame, and any face up to half a tile's side lies wholly in one of them."""
    for width, height in ((1280, 720), (720, 1280), (1920, 1080), (3840, 2160)):
        levels = tile_levels(width, height)
        assert levels and max(levels[0][0][2:]) == max(width, height) // 2
        for tiles in levels:
            face = max(tiles[0][2:]) // 2
            for fx in range(0, width - face + 1, 37):
                for fy in range(0, height - face + 1, 41):
                    assert any(x <= fx and fx + face <= x + w and y <= fy and fy + face <= y + h
                               for x, y, w, h in tiles), (width, height, face, fx, fy)
    assert [len(tiles) for tiles in tile_levels(1280, 720)] == [6, 28, 120]
    assert [len(tiles) for tiles in tile_levels(3840, 2160)] == [6, 28, 120]  # finer ones cost too much
    assert tile_levels(300, 300) == []  # the whole frame already finds any face worth keeping


def test_small_face_found_and_framed(tmp_path):
    """obama at 220 px in a 1280x720 frame (face ~112 px, 16 % of the height: the whole frame finds no face) is
    found in every sample and cut out around where it was laid; the frames then show it about half their height."""
    video = canvas_video(tmp_path / "small.mp4", 3.0, [(220, 800, 300)])
    root = preprocess(video, tmp_path / "ds", tasks=[1, 3], config=FAST, show_progress=False)
    meta = json.loads(DatasetLayout(root).meta.read_text())
    framing = meta["framing"]
    assert framing["faces_sampled"] == [16, 16] and framing["faces_found_closer"] == 16
    x, y, w, h = framing["crop_xywh"]
    assert w == h and 200 <= w <= 250  # twice the face: the 220 px picture, give or take
    assert abs(x - 800) <= 15 and abs(y - 300) <= 20  # where it was laid
    assert framing["size"] == [w, h] and (meta["width"], meta["height"]) == (w, h)  # never enlarged
    assert 0.45 * h < framing["face_height_px"] < 0.55 * h and "warning" not in framing
    frame = cv2.imread(str(DatasetLayout(root).frame(40)))
    assert frame.shape == (h, w, 3)
    grey = np.all(np.abs(frame.astype(int) - 128) < 6, axis=2)
    assert grey.mean() < 0.1  # the canvas is cut off


def test_face_too_small_two_people_and_no_face(tmp_path):
    """A face under 40 px after the closer search is refused in one line; two people too; a clip without a face
    keeps the whole frame at task 3 and fails clearly at task 4."""
    tiny = canvas_video(tmp_path / "tiny.mp4", 1.0, [(60, 600, 300)])  # face ~30 px
    with pytest.raises(EgstalkerError, match=r"face is too small in the frame: \d+ px tall in the 1280x720 video.*"
                                             r"film closer or give a higher-resolution video") as raised:
        choose_framing(str(tiny), *CANVAS, 1.0, "auto", 512)
    assert "\n" not in str(raised.value)
    two = canvas_video(tmp_path / "two.mp4", 1.0, [(220, 100, 300), (220, 900, 250)])
    with pytest.raises(EgstalkerError, match="more than one face in 16 of 16 sampled frames .*one person only"):
        choose_framing(str(two), *CANVAS, 1.0, "auto", 512)
    empty = canvas_video(tmp_path / "empty.mp4", 2.0, [])  # preprocess takes 2 s or more
    root = preprocess(empty, tmp_path / "ds", tasks=[1, 3], config=FAST, show_progress=False)
    framing = json.loads(DatasetLayout(root).meta.read_text())["framing"]
    assert framing["faces_sampled"] == [0, 16] and framing["crop_xywh"] == [0, 0, *CANVAS]
    with pytest.raises(EgstalkerError, match="no face found in 50 of 50 frames"):
        preprocess(empty, root, tasks=[4], config=FAST, show_progress=False)


def test_extreme_closeup_warned(tmp_path):
    """A face filling nearly the whole frame, chin at its bottom edge, is kept but warned about (and noted in
    meta.json): the model needs the neck and shoulders."""
    video = canvas_video(tmp_path / "closeup.mp4", 1.0, [], closeup=True)
    with pytest.warns(UserWarning, match="neck and shoulders in view"):
        framing, report = choose_framing(str(video), 400, 400, 1.0, "auto", 512)
    assert framing.is_identity and report["face_height_px"] > 0.8 * 400
    assert "chin reaches the bottom edge" in report["warning"]
