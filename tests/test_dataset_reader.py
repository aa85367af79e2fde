"""The dataset reader on a real preprocessed clip (the first 8 s of lieu_60s_256.mp4): cameras, samples,
streaming through DataLoader workers, and clear errors for incomplete datasets."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
import torch

from egstalker.dataset.reader import (FrameDataset, check_dataset, load_canonical_vertices, open_dataset,
                                      opengl_c2w_to_viewmat)
from egstalker.errors import EgstalkerError


def test_splits_sizes_and_intrinsics(small_dataset):
    train = open_dataset(small_dataset, "train", resolution=128)
    val = open_dataset(small_dataset, "val", resolution=128)
    full = open_dataset(small_dataset, "val")
    n = len(train) + len(val)
    assert len(train) == int(n * 10 / 11)  # the peers' split: the last 1/11 is held out
    assert val.frame_ids.min() > train.frame_ids.max()
    assert train.size == (128, 128) and full.size == (256, 256)
    assert np.allclose(train.K[:2] * 2, full.K[:2])  # intrinsics scale with the image
    assert train.feature_shape == tuple(json.loads((small_dataset / "meta.json").read_text())
                                        ["audio_encoder"]["feature_shape"])


def test_cameras_are_rigid_and_see_the_tracked_face(small_dataset):
    """viewmats are world-to-camera rotations+translations (OpenCV axes) that project the tracked face
    vertices onto the face's landmarks in the image."""
    data = open_dataset(small_dataset, "train")
    vertices = load_canonical_vertices(data.layout)
    for k in (0, len(data) // 2, len(data) - 1):
        R = data.viewmats[k][:3, :3]
        assert np.allclose(R @ R.T, np.eye(3), atol=1e-4) and np.linalg.det(R) == pytest.approx(1, abs=1e-4)
        v = vertices[data.frame_ids[k]]
        cam = v @ R.T + data.viewmats[k][:3, 3]
        assert (cam[:, 2] > 0).all()  # in front of the camera (+z forward)
        uv = cam[:, :2] / cam[:, 2:] * data.K[0, 0] + data.K[:2, 2]
        lms = data.landmarks(k)
        face_lo, face_hi = lms.min(0), lms.max(0)
        centre = uv.mean(0)
        assert (centre > face_lo).all() and (centre < face_hi).all()
        # The projected mesh spans about the landmarks' extent (same scale, not mirrored).
        assert 0.6 < (uv[:, 0].max() - uv[:, 0].min()) / (face_hi[0] - face_lo[0]) < 1.6
        assert np.corrcoef(uv[:, 1], v[:, 1])[0, 1] < 0  # canonical +y is up, image +y is down


def test_opengl_to_opencv_conversion():
    c2w = np.eye(4)
    c2w[2, 3] = 5.0  # an OpenGL camera at z=5 looking down -z at the origin
    viewmat = opengl_c2w_to_viewmat(c2w)
    origin_in_camera = viewmat @ np.array([0, 0, 0, 1.0])
    assert np.allclose(origin_in_camera[:3], [0, 0, 5])  # OpenCV: in front is +z
    up = viewmat[:3, :3] @ np.array([0, 1.0, 0])
    assert up[1] < 0  # world up is image up (-y in OpenCV)


def test_samples_have_the_documented_shapes_and_values(small_dataset):
    data = open_dataset(small_dataset, "train", resolution=128)
    sample = FrameDataset(data, audio_window=8)[5]
    assert sample["image"].shape == (128, 128, 3) and sample["image"].dtype == torch.float32
    assert sample["background"].shape == (128, 128, 3)
    assert sample["head_mask"].shape == (128, 128, 1)
    assert 0.0 <= float(sample["image"].min()) and float(sample["image"].max()) <= 1.0
    head = float(sample["head_mask"].mean())
    assert 0.05 < head < 0.6
    # The composite to render over keeps the torso and removes the head: it differs from the frame on the head.
    diff = (sample["background"] - sample["image"]).abs().mean(-1)
    mask = sample["head_mask"][..., 0] > 0.5
    assert float(diff[mask].mean()) > 3 * float(diff[~mask].mean())
    x0, y0, x1, y1 = sample["lip_box"].tolist()
    assert 0 <= x0 < x1 <= 128 and 0 <= y0 < y1 <= 128
    ys, xs = torch.nonzero(mask, as_tuple=True)
    assert y0 > float(ys.float().mean())  # the mouth is in the lower half of the head
    assert sample["audio"].shape == (8, *data.feature_shape)
    # The window is rows audio_id-4..audio_id+3 of aud.npy.
    features = np.load(small_dataset / "aud.npy")
    row = int(data.audio_ids[5])
    assert np.allclose(sample["audio"][4].numpy(), features[row])
    assert 0.0 <= float(sample["au45"]) <= 1.0
    assert sample["viewmat"].shape == (4, 4) and sample["K"].shape == (3, 3)


def test_audio_windows_clamp_at_the_clip_edges(small_dataset):
    data = open_dataset(small_dataset, "train")
    first = data.audio_window(0, 8, 3)
    assert np.allclose(first[:4], first[4])  # rows -4..-1 clamp to row 0
    last = data.audio_window(len(data.features) - 1, 8, 3)
    assert np.allclose(last[5:], last[4])


def test_audio_window_alignment_follows_the_future_rows(small_dataset):
    """`future` rows after the frame, the rest before it: the serving look-ahead is set by this alignment."""
    data = open_dataset(small_dataset, "train")
    features = np.asarray(data.features)
    k = 40
    for future in (0, 3, 7):
        window = data.audio_window(k, 12, future)
        assert np.allclose(window, features[k - 11 + future:k + future + 1])
    sample = FrameDataset(data, audio_window=8, audio_future=0, with_images=False)[5]
    assert np.allclose(sample["audio"][-1].numpy(), features[int(data.audio_ids[5])])
    with pytest.raises(ValueError, match="cannot read 8 future rows"):
        data.audio_window(k, 8, 8)


def test_streaming_loader_with_workers(small_dataset):
    """Frames are read in worker processes on demand; the Dataset object itself carries no images."""
    data = open_dataset(small_dataset, "train", resolution=64)
    dataset = FrameDataset(data)
    assert len(pickle.dumps(dataset)) < 2_000_000
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=2, shuffle=False)
    batches = [b for _, b in zip(range(3), loader)]
    assert batches[0]["image"].shape == (4, 64, 64, 3)
    assert batches[2]["index"].tolist() == [8, 9, 10, 11]


def _partial_copy(src, dst, skip: set[str]):
    dst.mkdir()
    for entry in src.iterdir():
        if entry.name not in skip:
            os.symlink(entry, dst / entry.name)
    return dst


@pytest.mark.parametrize("missing, task", [("aud.npy", 2), ("transforms_val.json", 9), ("track_params.pt", 8),
                                           ("parsing", 4), ("torso_imgs", 6), ("bc.jpg", 5)])
def test_incomplete_datasets_name_the_task_to_run(small_dataset, tmp_path, missing, task):
    broken = _partial_copy(small_dataset, tmp_path / "broken", {missing})
    with pytest.raises(EgstalkerError, match=rf"--task {task}\b"):
        open_dataset(broken, "train")


def test_bad_dataset_paths(tmp_path, small_dataset):
    with pytest.raises(EgstalkerError, match="does not exist"):
        check_dataset(tmp_path / "nowhere")
    (tmp_path / "file").write_text("x")
    with pytest.raises(EgstalkerError, match="not a dataset folder"):
        check_dataset(tmp_path / "file")
    with pytest.raises(EgstalkerError, match="unknown split"):
        open_dataset(small_dataset, "test")
    broken = _partial_copy(small_dataset, tmp_path / "nolms", {"ori_imgs"})
    (broken / "ori_imgs").mkdir()
    with pytest.raises(EgstalkerError, match="--task 7"):
        open_dataset(broken, "train")
