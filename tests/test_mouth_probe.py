"""The mouth probe: a training-only readout from the audio adapter's code to the tracked mouth shape."""

from __future__ import annotations

import itertools

import numpy as np
import torch

from conftest import shared_media
from egstalker.dataset.reader import mouth_shape
from egstalker.model.audio_adapter import AudioAdapter
from egstalker.train.mouth_probe import MouthProbe, probe_correlation


def test_mouth_shape_of_known_landmarks():
    points = np.zeros((68, 2), np.float32)
    points[36], points[45] = (0, 0), (10, 0)       # eye corners 10 apart
    points[62], points[66] = (5, 20), (5, 23)      # inner lips 3 apart
    points[51], points[57] = (5, 18), (5, 26)      # outer lips 8 apart
    points[48], points[54] = (1, 22), (9, 22)      # corners 8 apart
    np.testing.assert_allclose(mouth_shape(points), [0.3, 0.8, 0.8], atol=1e-6)
    twice = mouth_shape(np.stack([points, points * 2]))  # a closer face: the same shape
    np.testing.assert_allclose(twice[0], twice[1], atol=1e-6)


def _fit_probe(windows: np.ndarray, shapes: np.ndarray, steps: int = 400) -> tuple[AudioAdapter, MouthProbe]:
    torch.manual_seed(0)
    x = torch.from_numpy(windows)
    adapter = AudioAdapter(tuple(windows.shape[2:]), window=windows.shape[1])
    adapter.set_statistics(x[:, 0])
    probe = MouthProbe(adapter.frame_net[-2].out_features, shapes)
    optimizer = torch.optim.Adam([*adapter.parameters(), *probe.parameters()], lr=1e-3, weight_decay=1e-4)
    y = torch.from_numpy(shapes)
    for _ in range(steps):
        loss = probe.loss(adapter(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return adapter, probe


def test_the_probe_reads_the_mouth_from_the_audio():
    """On 24 s of a real clip, adapter + probe fitted on the first 18 s predict the last 6 s's inner-lip gap from
    their audio windows, and clearly better than from audio 2 s away (what a misaligned input would give)."""
    from egstalker.audio import get_encoder
    from egstalker.audio.base import window_offsets
    from egstalker.media import iter_frames, read_audio
    from egstalker.metrics import detect_landmarks
    from egstalker.preprocess.landmarks68 import to_ibug68

    seconds, cut = 24, 18 * 25
    video = shared_media("video/lieu_60s_256.mp4")
    frames = (f.image for f in itertools.islice(iter_frames(video), seconds * 25))
    shapes = mouth_shape(to_ibug68(detect_landmarks(frames)))
    assert shapes.shape == (seconds * 25, 3) and (shapes >= 0).all() and shapes[:, 0].std() > 0.01
    features = get_encoder("mel").encode(read_audio(video, rate=16000)[: (seconds + 3) * 16000])
    scores = {}
    for shift in (0, 50):
        rows = np.clip(np.arange(len(shapes))[:, None] + shift + window_offsets(8, 3)[None], 0, len(features) - 1)
        windows = features[rows].astype(np.float32)
        adapter, probe = _fit_probe(windows[:cut], shapes[:cut], steps=200)
        with torch.no_grad():
            predicted = probe(adapter(torch.from_numpy(windows[cut:]))).numpy()
        scores[shift] = probe_correlation(predicted, shapes[cut:])
    print("probe held-out correlation, own audio / audio 2 s away:", scores)
    assert scores[0] > 0.25 and scores[0] > scores[50] + 0.2, scores


def test_training_keeps_the_probe_and_reports_it(small_dataset, tmp_path):
    """The probe trains with the model (on by default), its state is in the checkpoint, its held-out score in
    the result; a run started before the probe existed resumes without it."""
    import json

    from test_train import tiny_config

    from egstalker.train.trainer import train

    config = tiny_config(4)
    config.schedule.coarse_fraction = 1.0  # static head only: no image loss reaches the audio adapter
    assert config.loss.mouth_probe > 0
    result = train(small_dataset, tmp_path / "with", config, show_progress=False)
    assert -1.0 <= result.val_mouth_probe_corr <= 1.0
    state = torch.load(tmp_path / "with" / "checkpoints" / "step_0000004.pt", weights_only=False)
    first = torch.load(tmp_path / "with" / "checkpoints" / "step_0000000.pt", weights_only=False)
    assert state["probe"]["linear.weight"].shape == (3, 32)
    assert (state["probe"]["shape_std"] > 0).all()
    # the optimiser trains the probe, and through it the audio adapter (which only the probe reaches here)
    assert not torch.equal(state["probe"]["linear.weight"], first["probe"]["linear.weight"])
    key = "deformation.token_encoder.audio.frame_net.0.weight"
    assert not torch.equal(state["model"][key], first["model"][key])

    # an older run: no probe in its checkpoints, no mouth_probe field in its saved config
    config = tiny_config(4)
    config.loss.mouth_probe = 0.0
    old = tmp_path / "old"
    train(small_dataset, old, config, show_progress=False)
    saved = json.loads((old / "train_config.json").read_text())
    del saved["loss"]["mouth_probe"]
    (old / "train_config.json").write_text(json.dumps(saved))
    config.schedule.iterations = 6
    resumed = train(small_dataset, old, config, resume=True, show_progress=False)
    assert resumed.steps == 6 and resumed.val_mouth_probe_corr is None
