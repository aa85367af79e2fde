"""Face tasks 4-9 on real clips (the first 3 s of hill_8s_512 and aoc_8s_512), and their bad inputs."""

from __future__ import annotations

import csv
import json
import shutil

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from egstalker.dataset.layout import DatasetLayout
from egstalker.errors import EgstalkerError
from egstalker.preprocess.config import PreprocessConfig
from egstalker.preprocess.face import FaceTrack, face_cache_path, frame_ranges
from egstalker.preprocess.landmarks68 import to_ibug68
from egstalker.preprocess.parsing import BACKGROUND, HEAD, NECK, TORSO, PALETTE, load_labels
from egstalker.preprocess.pipeline import preprocess
from egstalker.preprocess.torso import chin_gaps, torso_image
from egstalker.preprocess.tracking import (RIGID_POINTS, canonical_face, euler_to_rotation, eye_aspect_ratio,
                                           focal_length, project, rotation_to_euler, solve_pnp)
from egstalker.preprocess.transforms import split_index
from tests.conftest import shared_media
from tests.test_preprocess_pipeline import remux

FAST = PreprocessConfig()
FAST.audio.encoder = "mel"
SECONDS = 3.0


def _dataset(tmp_path_factory, clip: str) -> DatasetLayout:
    folder = tmp_path_factory.mktemp(clip)
    video = remux(shared_media(f"video/{clip}.mp4"), folder / "clip.mp4", SECONDS)
    return DatasetLayout(preprocess(video, folder / "ds", config=FAST, show_progress=False))


@pytest.fixture(scope="module")
def hill(tmp_path_factory) -> DatasetLayout:
    return _dataset(tmp_path_factory, "hill_8s_512")


@pytest.fixture(scope="module")
def aoc(tmp_path_factory) -> DatasetLayout:
    return _dataset(tmp_path_factory, "aoc_8s_512")


def _meta(layout: DatasetLayout) -> dict:
    return json.loads(layout.meta.read_text())


@pytest.mark.parametrize("clip", ["hill", "aoc"])
def test_every_output_agrees_in_count_and_shape(clip, request):
    layout: DatasetLayout = request.getfixturevalue(clip)
    meta = _meta(layout)
    n = meta["n_frames"]
    assert abs(n - SECONDS * 25) <= 1 and sorted(meta["tasks_complete"]) == list(range(1, 10))
    for folder, suffix in ((layout.parsing_dir, ".png"), (layout.torso_dir, ".png"), (layout.gt_dir, ".jpg")):
        assert sorted(int(p.stem) for p in folder.iterdir() if p.suffix == suffix) == list(range(n))
    assert len(list(layout.frames_dir.glob("*.lms"))) == n
    assert cv2.imread(str(layout.background)).shape == (512, 512, 3)
    for i in (0, n - 1):
        assert cv2.imread(str(layout.gt(i))).shape == (512, 512, 3)
        torso = cv2.imread(str(layout.torso(i)), cv2.IMREAD_UNCHANGED)
        assert torso.shape == (512, 512, 4) and set(np.unique(torso[..., 3])) <= {0, 255}
        assert (torso[..., :3][torso[..., 3] == 0] == 0).all()
        assert np.loadtxt(layout.landmarks(i)).shape == (68, 2)
    params = torch.load(layout.track_params, weights_only=True)
    assert params["vertices"].shape == (n, 478, 3) and params["rotation"].shape == (n, 3, 3)
    assert params["vertices"].dtype == torch.float16  # half the disk; the 1 GB goal at 8,000 frames of 512 px
    assert params["euler"].shape == (n, 3) and params["trans"].shape == (n, 3)
    assert params["focal"].shape == (1,) and tuple(params["image_size"].tolist()) == (512, 512)
    assert torch.allclose(params["rotation"] @ params["rotation"].transpose(1, 2), torch.eye(3).expand(n, 3, 3),
                          atol=1e-4)
    assert (params["trans"][:, 2] < -10).all()  # head in front of the camera, tens of cm away
    track = FaceTrack.load(face_cache_path(layout))
    assert len(track) == n and track.detected.all() and track.landmarks.shape == (n, 478, 3)
    assert meta["face"]["dropouts_interpolated"] == []


@pytest.mark.parametrize("clip", ["hill", "aoc"])
def test_parsing_has_four_plausible_classes(clip, request):
    layout: DatasetLayout = request.getfixturevalue(clip)
    n = _meta(layout)["n_frames"]
    track = FaceTrack.load(face_cache_path(layout))
    for i in (0, n // 2, n - 1):
        labels = load_labels(layout.parsing(i))
        # the same colours through PIL (RGB) and cv2 (BGR), as the peers' readers use them
        rgb = np.asarray(Image.open(layout.parsing(i)).convert("RGB"))
        assert np.array_equal(rgb, PALETTE[labels])
        assert np.array_equal(cv2.imread(str(layout.parsing(i)))[..., ::-1], PALETTE[labels])
        area = {k: (labels == k).mean() for k in (BACKGROUND, HEAD, NECK, TORSO)}
        assert all(a > 0.005 for a in area.values()), area
        assert 0.15 < area[HEAD] < 0.75 and area[BACKGROUND] > 0.1
        assert labels[:20, :20].max() == BACKGROUND and labels[:20, -20:].max() == BACKGROUND  # top corners
        # the face (inside the jaw) is head; the pixels just under the chin are neck
        oval = np.round(track.landmarks[i][[1, 4, 6, 168, 13, 14, 152 - 1], :2]).astype(int)
        assert (labels[oval[:, 1], oval[:, 0]] == HEAD).all()
        chin = track.landmarks[i][152, :2]
        face_height = np.linalg.norm(track.landmarks[i][10, :2] - chin)
        x, y = int(chin[0]), int(min(chin[1] + 0.15 * face_height, (chin[1] + labels.shape[0]) / 2))
        assert labels[y, x] == NECK
        # head lies above the torso
        rows = np.arange(labels.shape[0])[:, None]
        assert (rows * (labels == HEAD)).sum() / (labels == HEAD).sum() < \
            (rows * (labels == TORSO)).sum() / (labels == TORSO).sum()


def test_gt_and_torso_use_the_background(hill):
    bc = cv2.imread(str(hill.background)).astype(np.float32)
    labels = load_labels(hill.parsing(10))
    gt = cv2.imread(str(hill.gt(10))).astype(np.float32)
    frame = cv2.imread(str(hill.frame(10))).astype(np.float32)
    bg = labels == BACKGROUND
    assert np.abs(gt[bg] - bc[bg]).mean() < 4  # JPEG round trip
    assert np.abs(gt[labels == HEAD] - frame[labels == HEAD]).mean() < 4
    torso = cv2.imread(str(hill.torso(10)), cv2.IMREAD_UNCHANGED)
    alpha = torso[..., 3] > 0
    assert alpha[(labels == NECK) | (labels == TORSO)].all()
    assert alpha[labels == HEAD].mean() < 0.15  # only the neck's continuation under the jaw
    # torso colours are gt's (rounded to multiples of 4 for a smaller PNG: a trainer-invisible error)
    inside = labels == TORSO
    assert (torso[..., :3][inside] % 4 == 0).all()
    assert np.abs(torso[..., :3][inside].astype(np.float32) - gt[inside]).mean() < 3
    # the background where the person always stands is filled, not black
    assert bc.mean() > 40 and bc[300:, 200:300].mean() > 40


def test_torso_continues_under_the_whole_chin():
    # the shadow under the chin labelled torso between two neck strips (as parsing does on lieu's frames)
    labels = np.full((60, 40), BACKGROUND, np.uint8)
    labels[5:30, 8:32] = HEAD
    labels[30:60, 4:36] = TORSO
    labels[30:45, 12:16] = NECK
    labels[30:45, 24:28] = NECK
    labels[4, 14:20] = TORSO  # a stray torso sliver on the hair's edge, above the head
    labels[40:48, 20:22] = HEAD  # a strand of hair hanging in front of the neck
    gt = np.full((60, 40, 3), 120, np.uint8)
    torso = torso_image(gt, labels, np.zeros_like(gt), extension=6)
    alpha = torso[..., 3] > 0
    assert chin_gaps(labels, alpha, 6) == []
    assert alpha[24:30, 12:28].all() and not alpha[5:24, 12:28].any()  # 6 px under the head, no more
    assert not alpha[24:30, 8:12].any() and not alpha[24:30, 28:32].any()  # not beyond the neck's columns
    assert not alpha[40:48, 20:22].any()  # the hair strand is head: not covered
    assert (torso[24:30, 12:28, :3] > 0).all()  # in the neck's colour, not black


@pytest.mark.parametrize("clip", ["hill", "aoc"])
def test_torso_images_leave_no_gap_under_the_chin(clip, request):
    layout: DatasetLayout = request.getfixturevalue(clip)
    for i in (0, 35, 70):
        labels = load_labels(layout.parsing(i))
        alpha = cv2.imread(str(layout.torso(i)), cv2.IMREAD_UNCHANGED)[..., 3] > 0
        assert chin_gaps(labels, alpha, 4) == []


def test_a_dataset_from_before_a_fix_redoes_only_the_fixed_tasks(hill, tmp_path):
    dataset = tmp_path / "ds"
    shutil.copytree(hill.root, dataset)
    meta = _meta(DatasetLayout(dataset))
    assert meta["task_revisions"]["6"] == 2
    runs = dict(meta["task_runs"])
    del meta["task_revisions"]  # as written before revisions were recorded
    (dataset / "meta.json").write_text(json.dumps(meta))
    torso = DatasetLayout(dataset).torso(0)
    torso.write_bytes(b"stale")
    preprocess(hill.root.parent / "clip.mp4", dataset, config=FAST, show_progress=False)
    meta = _meta(DatasetLayout(dataset))
    assert meta["task_revisions"]["6"] == 2
    # tasks 4 and 9 too: their newer revisions (4: the person segmentation network; 9: the split's handling of
    # frames without a face or sound), and 5, which reads 4's parsing; not 1-3, 7 or 8
    assert sorted(n for n in runs if meta["task_runs"][n] != runs[n]) == ["4", "5", "6", "9"]
    assert cv2.imread(str(torso), cv2.IMREAD_UNCHANGED).shape == (512, 512, 4)


@pytest.mark.parametrize("clip", ["hill", "aoc"])
def test_landmarks_fall_inside_the_face(clip, request):
    layout: DatasetLayout = request.getfixturevalue(clip)
    n = _meta(layout)["n_frames"]
    track = FaceTrack.load(face_cache_path(layout))
    for i in range(0, n, 7):
        points = np.loadtxt(layout.landmarks(i))
        assert np.allclose(points, to_ibug68(track.landmarks[i])[:, :2], atol=0.01)
        hull = cv2.convexHull(track.landmarks[i][:, :2].astype(np.float32))
        inside = [cv2.pointPolygonTest(hull, (float(x), float(y)), True) >= -1.0 for x, y in points]
        assert all(inside)
        labels = load_labels(layout.parsing(i))
        assert (labels[points[:, 1].astype(int), points[:, 0].astype(int)] == HEAD).mean() >= 0.95
        # iBUG geometry: eyes above the nose tip above the mouth above the chin; right eye (36) left of 45
        assert points[36:48, 1].mean() < points[30, 1] < points[48:68, 1].mean() < points[8, 1]
        assert points[36, 0] < points[45, 0]


@pytest.mark.parametrize("clip, blink_frame", [("hill", 32), ("aoc", 35)])
def test_au45_varies_and_peaks_at_eye_closure(clip, blink_frame, request):
    layout: DatasetLayout = request.getfixturevalue(clip)
    with open(layout.action_units) as f:
        # OpenFace's spelling, as the peers' readers look it up: pandas.read_csv(path)[' AU45_r']
        assert f.readline().strip().split(",")[5] == " AU45_r"
        f.seek(0)
        au45 = np.array([float(row[" AU45_r"]) for row in csv.DictReader(f)])
    assert len(au45) == _meta(layout)["n_frames"] and au45.std() > 0.1 and au45.min() >= 0
    track = FaceTrack.load(face_cache_path(layout))
    ear = eye_aspect_ratio(track.landmarks)
    assert abs(int(np.argmax(au45)) - int(np.argmin(ear))) <= 1
    assert abs(int(np.argmax(au45)) - blink_frame) <= 2 and au45.max() > 1.5  # the blink seen in the video
    assert np.median(au45) < 0.5  # eyes open most of the time


def test_tracking_reprojects_onto_the_landmarks(hill):
    meta = _meta(hill)["tracking"]
    assert meta["mediapipe_matrix_reprojection_px"]["median"] < 10  # MediaPipe's 63 deg camera is consistent
    assert meta["smoothed_reprojection_px"]["median"] < 3.0
    assert meta["pnp_rigid_points_reprojection_px"]["median"] < 2.0 and "rigid" in meta["pose_points"]
    assert meta["jitter_translation_cm"]["smoothed"] < meta["jitter_translation_cm"]["raw"]
    params = torch.load(hill.track_params, weights_only=True)
    focal = float(params["focal"][0])
    # canonical vertices (mean over frames) under each frame's pose land on the detected landmarks
    vertices = params["vertices"].numpy().astype(np.float64)
    mean_shape = vertices.mean(0)
    camera = np.einsum("nij,vj->nvi", params["rotation"].numpy(), mean_shape) + params["trans"].numpy()[:, None]
    u = 256 + focal * camera[..., 0] / -camera[..., 2]
    v = 256 - focal * camera[..., 1] / -camera[..., 2]
    track = FaceTrack.load(face_cache_path(hill))
    error = np.hypot(u - track.landmarks[..., 0], v - track.landmarks[..., 1])
    assert np.median(error) < 3.0
    # the person's mean shape resembles MediaPipe's canonical face in size (cm)
    assert 0.7 < np.ptp(mean_shape[:468, 0]) / np.ptp(canonical_face()[:, 0]) < 1.4


def test_transforms_split_and_camera(hill):
    n = _meta(hill)["n_frames"]
    train = json.loads(hill.transforms("train").read_text())
    val = json.loads(hill.transforms("val").read_text())
    n_train = int(n * 10 / 11)
    assert split_index(n, 1 / 11) == n_train
    assert [f["img_id"] for f in train["frames"]] == list(range(n_train))
    assert [f["img_id"] for f in val["frames"]] == list(range(n_train, n))
    assert all(f["aud_id"] == f["img_id"] for f in train["frames"] + val["frames"])
    for key in ("focal_len", "cx", "cy", "w", "h"):
        assert train[key] == val[key]
    assert train["cx"] == 256 and train["w"] == 512
    params = torch.load(hill.track_params, weights_only=True)
    c2w = np.array(train["frames"][5]["transform_matrix"])
    # world-to-camera inverse of the tracked pose; the camera looks at the head (world origin) along -z
    w2c = np.linalg.inv(c2w)
    assert np.allclose(w2c[:3, :3], params["rotation"][5].numpy(), atol=1e-5)
    assert np.allclose(w2c[:3, 3], params["trans"][5].numpy(), atol=1e-4)
    to_head = -c2w[:3, 3] / np.linalg.norm(c2w[:3, 3])
    assert to_head @ -c2w[:3, 2] > 0.95
    x0, y0, x1, y1 = train["frames"][5]["lips_box"]
    assert 0 <= x0 < x1 <= 512 and 0 <= y0 < y1 <= 512
    audio = np.load(hill.audio_features)
    assert np.array_equal(np.load(hill.root / "aud_train.npy"), audio[:n_train])
    assert np.array_equal(np.load(hill.root / "aud_novel.npy"), audio[n_train:])


# --- bad input and drop-outs -----------------------------------------------------------------------------

def _frames_only(tmp_path, clip="aoc_8s_512", seconds=2.5) -> tuple:
    video = remux(shared_media(f"video/{clip}.mp4"), tmp_path / "clip.mp4", seconds)
    root = preprocess(video, tmp_path / "ds", tasks=[1, 2, 3], config=FAST, show_progress=False)
    return video, DatasetLayout(root)


def test_short_dropout_is_interpolated_and_listed(tmp_path):
    video, layout = _frames_only(tmp_path)
    grey = np.full((512, 512, 3), 128, np.uint8)
    for i in (20, 21, 22):
        cv2.imwrite(str(layout.frame(i)), grey)
    preprocess(video, layout.root, tasks=[4], config=FAST, show_progress=False)
    assert _meta(layout)["face"]["dropouts_interpolated"] == [[20, 22]]
    track = FaceTrack.load(face_cache_path(layout))
    assert frame_ranges(~track.detected) == [(20, 22)]
    expected = track.landmarks[19] + (track.landmarks[23] - track.landmarks[19]) * 2 / 4
    assert np.allclose(track.landmarks[21], expected, atol=1e-3)
    assert load_labels(layout.parsing(21)).max() > BACKGROUND  # parsed with the interpolated landmarks


def test_no_face_names_the_frames(tmp_path):
    video, layout = _frames_only(tmp_path)
    n = _meta(layout)["n_frames"]
    for i in range(10, n):  # the head turned away: a blank wall
        cv2.imwrite(str(layout.frame(i)), np.full((512, 512, 3), 90, np.uint8))
    with pytest.raises(EgstalkerError, match=f"no face found in {n - 10} of {n} frames \\(frames 10-{n - 1}\\)"):
        preprocess(video, layout.root, tasks=[4], config=FAST, show_progress=False)
    assert not layout.parsing_dir.exists() and not face_cache_path(layout).exists()
    assert not list(layout.root.glob(".staging*"))


def test_long_dropout_is_refused(tmp_path):
    video, layout = _frames_only(tmp_path)
    for i in range(20, 40):
        cv2.imwrite(str(layout.frame(i)), np.full((512, 512, 3), 90, np.uint8))
    # task 7 alone (it reads only the frames and the face cache, not tasks 4-6) runs the landmarker and refuses
    with pytest.raises(EgstalkerError, match="no face in frames 20-39"):
        preprocess(video, layout.root, tasks=[7], config=FAST, show_progress=False)
    with pytest.raises(EgstalkerError, match="task 6 needs task"):
        preprocess(video, layout.root, tasks=[6], config=FAST, show_progress=False)


def test_two_faces_are_refused(tmp_path):
    video, layout = _frames_only(tmp_path)
    other = remux(shared_media("video/hill_8s_512.mp4"), tmp_path / "other.mp4", 2.5)
    other_layout = DatasetLayout(preprocess(other, tmp_path / "other", tasks=[3], config=FAST,
                                            show_progress=False))
    n = _meta(layout)["n_frames"]
    for i in range(n):  # two people side by side
        pair = np.hstack([cv2.imread(str(layout.frame(i))), cv2.imread(str(other_layout.frame(i)))])
        cv2.imwrite(str(layout.frame(i)), cv2.resize(pair, (512, 256), interpolation=cv2.INTER_AREA))
    with pytest.raises(EgstalkerError, match="more than one face in frames 0-"):
        preprocess(video, layout.root, tasks=[4], config=FAST, show_progress=False)


def test_bisenet_without_support_is_a_clear_error(tmp_path):
    video, layout = _frames_only(tmp_path, seconds=2.2)
    config = PreprocessConfig()
    config.audio.encoder = "mel"
    config.face.parser = "bisenet"
    config.face.bisenet_weights = str(tmp_path / "79999_iter.pth")
    with pytest.raises(EgstalkerError, match="BiSeNet parser is not supported yet"):
        preprocess(video, layout.root, tasks=[4], config=config, show_progress=False)
    shutil.rmtree(layout.root)


def test_background_median_matches_nanmedian():
    import warnings

    from egstalker.preprocess.background import estimate_background

    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (40, 30, 3), dtype=np.uint8) for _ in range(7)]
    labels = [np.where(rng.random((40, 30)) < 0.4, HEAD, BACKGROUND).astype(np.uint8) for _ in range(7)]
    background, seen = estimate_background(frames, labels, margin=0)
    stack = np.stack(frames).astype(np.float32)
    stack[np.stack(labels) != BACKGROUND] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        expected = np.nanmedian(stack, axis=0)
    assert seen.mean() > 0.9
    assert np.abs(background[seen].astype(np.float32) - expected[seen].round()).max() <= 0.5


def test_head_pose_ignores_the_jaw():
    """A mouth opening under a fixed head pose must not move the pose (else the pose token tells the model the
    mouth opening): PnP on the rigid points recovers the pose, PnP on every point tilts with the jaw."""
    shape = canonical_face()[:468].astype(np.float64)
    jaw = shape[:, 1] < shape[[61, 291], 1].mean()  # below the mouth corners: lower lip, chin, jaw
    assert not jaw[RIGID_POINTS].any()
    n = 5
    true_r = np.repeat(euler_to_rotation(np.array([0.1, -0.2, 0.05]))[None], n, 0).astype(np.float64)
    true_t = np.repeat(np.array([[1.0, -2.0, -45.0]]), n, 0)
    focal, centre = focal_length(512), (256.0, 256.0)
    landmarks = np.stack([project(shape - np.where(jaw[:, None], [0.0, 0.5 * k, 0.1 * k], 0.0), true_r[k], true_t[k],
                                  focal, centre) for k in range(n)])  # the jaw drops up to 2 cm
    guess_r = np.repeat(euler_to_rotation(np.array([0.12, -0.18, 0.04]))[None], n, 0).astype(np.float64)
    guess_t = true_t + [0.3, 0.2, 1.0]
    pitch_error = {}
    for name, points in (("rigid", RIGID_POINTS), ("all", np.arange(468))):
        r, t = solve_pnp(shape[points], landmarks[:, points], guess_r, guess_t, focal, centre)
        pitch_error[name] = np.degrees(np.abs(rotation_to_euler(r) - rotation_to_euler(true_r))).max(axis=1)
    assert pitch_error["rigid"].max() < 0.05, pitch_error
    assert pitch_error["all"][-1] > 10 * max(pitch_error["rigid"][-1], 0.01), pitch_error  # the open jaw tilts it


def test_mediapipe_start_up_notices_stay_off_the_terminal(capfd):
    """MediaPipe's native code prints glog/TFLite notices on stderr each time a landmarker starts (`--quiet` showed
    five lines); they are kept off the terminal."""
    from egstalker.metrics import FaceLandmarks
    from egstalker.preprocess.face import image_landmarker

    with image_landmarker():
        pass
    with FaceLandmarks():
        pass
    err = capfd.readouterr().err
    assert "FaceBlendshapesGraph" not in err and "Feedback manager" not in err, err


@pytest.mark.parametrize("stored", [cv2.ROTATE_180, cv2.ROTATE_90_COUNTERCLOCKWISE, cv2.ROTATE_90_CLOCKWISE])
def test_a_picture_stored_turned_is_named(aoc, tmp_path, stored):
    """A video stored sideways or upside down without a rotation tag: MediaPipe finds no face upside down and odd
    ones sideways (it was reported as "no face ... well lit" or "more than one face"); the error says to turn it."""
    from egstalker.preprocess.face import detect_faces

    turned = DatasetLayout(tmp_path / "turned")
    turned.frames_dir.mkdir(parents=True)
    for i in range(12):
        cv2.imwrite(str(turned.frame(i)), cv2.rotate(cv2.imread(str(aoc.frame(5 * i))), stored))
    with pytest.raises(EgstalkerError, match=r"^the picture is stored turned \(sideways or upside down\) without a "
                                             r"rotation tag.*transpose=1"):
        detect_faces(turned, 12, show_progress=False)
    # upright frames pass; upright frames failing for another reason (a long drop-out) are not blamed on a turn,
    # though MediaPipe finds most upright faces turned a quarter
    detect_faces(aoc, 12, show_progress=False)
    gap = DatasetLayout(tmp_path / "gap")
    gap.frames_dir.mkdir(parents=True)
    for i in range(30):
        frame = cv2.imread(str(aoc.frame(i)))
        cv2.imwrite(str(gap.frame(i)), np.full_like(frame, 128) if 10 <= i < 25 else frame)
    with pytest.raises(EgstalkerError, match=r"^no face in frames 10-24 \(longer than 12 frames\)"):
        detect_faces(gap, 30, show_progress=False)
