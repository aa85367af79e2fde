"""The pure-PyTorch rasterizer against closed-form images, finite differences and the culling rules.

(The gsplat backend is compared with this one on a GPU by benchmarks/rasterizer_parity_gpu.py.)
"""

from __future__ import annotations

import math

import pytest
import torch

from egstalker.render.rasterize import ALPHA_MIN, LOW_PASS_PX2, rasterize

FOCAL = 40.0
SIZE = 32
CENTRE = SIZE / 2 + 0.5  # principal point on the centre of pixel (16, 16)


def camera(batch: int = 1, dtype=torch.float32):
    """Identity world-to-camera (OpenCV axes) and a pinhole whose principal point is a pixel centre."""
    viewmats = torch.eye(4, dtype=dtype).expand(batch, 4, 4).clone()
    Ks = torch.tensor([[FOCAL, 0, CENTRE], [0, FOCAL, CENTRE], [0, 0, 1]], dtype=dtype).expand(batch, 3, 3).clone()
    return viewmats, Ks


def scene(means, scales, opacities, colors, dtype=torch.float32):
    """Isotropic, unrotated Gaussians in a batch of one."""
    means = torch.tensor(means, dtype=dtype)[None]
    n = means.shape[1]
    quats = torch.tensor([1.0, 0, 0, 0], dtype=dtype).expand(1, n, 4).clone()
    scales = torch.tensor(scales, dtype=dtype)[:, None].expand(n, 3)[None].clone()
    return means, quats, scales, torch.tensor(opacities, dtype=dtype)[None], torch.tensor(colors, dtype=dtype)[None]


def test_single_gaussian_matches_closed_form():
    depth, sigma_world, opacity, colour = 2.0, 0.05, 0.8, [0.2, 0.6, 1.0]
    out = rasterize(*scene([[0.0, 0.0, depth]], [sigma_world], [opacity], [colour]), *camera(), SIZE, SIZE,
                    backend="torch")
    # Facing the camera the footprint is isotropic: variance (f s / z)^2 plus the 0.3 px^2 low-pass.
    variance = (FOCAL * sigma_world / depth) ** 2 + LOW_PASS_PX2
    cols = torch.arange(SIZE) + 0.5
    d2 = (cols[None, :] - CENTRE) ** 2 + (cols[:, None] - CENTRE) ** 2
    expected_alpha = opacity * torch.exp(-0.5 * d2 / variance)
    expected_alpha = torch.where(expected_alpha >= ALPHA_MIN, expected_alpha, torch.zeros(()))

    torch.testing.assert_close(out.alpha[0, ..., 0], expected_alpha, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.rgb[0], expected_alpha[..., None] * torch.tensor(colour), atol=1e-6, rtol=1e-5)
    assert out.alpha[0, 16, 16, 0].item() == pytest.approx(opacity, abs=1e-6)  # the peak sits on a pixel centre
    covered = expected_alpha > 0
    assert 20 < int(covered.sum()) < 200  # a small disc, not the whole image
    torch.testing.assert_close(out.depth[0, ..., 0][covered], torch.full((int(covered.sum()),), depth))
    assert out.means2d[0, 0].tolist() == pytest.approx([CENTRE, CENTRE])
    expected_radius = math.ceil(math.sqrt(2 * math.log(opacity * 255)) * math.sqrt(variance))
    assert out.radii.tolist() == [[expected_radius]]


def test_two_gaussians_composite_front_to_back_whatever_their_order():
    red, green = [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]
    front, back = ([0.0, 0.0, 2.0], 0.2, 0.6, red), ([0.0, 0.0, 3.0], 0.3, 0.9, green)
    images = []
    for first, second in ((front, back), (back, front)):
        parts = scene(*([g[i] for g in (first, second)] for i in range(4)))
        images.append(rasterize(*parts, *camera(), SIZE, SIZE, backend="torch"))
    for out in images:
        # Both Gaussians peak (opacity itself) on the centre pixel: red over green.
        assert out.rgb[0, 16, 16].tolist() == pytest.approx([0.6, 0.4 * 0.9, 0.0], abs=1e-5)
        assert out.alpha[0, 16, 16, 0].item() == pytest.approx(0.6 + 0.4 * 0.9, abs=1e-5)
        expected_depth = (0.6 * 2.0 + 0.4 * 0.9 * 3.0) / (0.6 + 0.4 * 0.9)
        assert out.depth[0, 16, 16, 0].item() == pytest.approx(expected_depth, abs=1e-4)
    torch.testing.assert_close(images[0].rgb, images[1].rgb)


def test_pixel_stops_before_transmittance_reaches_1e_minus_4():
    # Ten stacked Gaussians of opacity 0.8 on the centre pixel: T = 0.2^k, the 6th would take it to 6.4e-5.
    parts = scene([[0.0, 0.0, 2.0 + 0.1 * k] for k in range(10)], [0.1] * 10, [0.8] * 10,
                  [[1.0, 1.0, 1.0]] * 10)
    out = rasterize(*parts, *camera(), SIZE, SIZE, backend="torch")
    assert out.alpha[0, 16, 16, 0].item() == pytest.approx(1 - 0.2**5, abs=1e-6)
    assert out.depth[0, 16, 16, 0].item() == pytest.approx(sum(0.8 * 0.2**k * (2.0 + 0.1 * k) for k in range(5))
                                                           / (1 - 0.2**5), abs=1e-5)


def test_culled_gaussians_draw_nothing_and_get_zero_gradients():
    parts = scene([[0.0, 0.0, -2.0], [0.0, 0.0, 0.005], [50.0, 0.0, 2.0], [0.0, 0.0, 2.0]], [0.1] * 4,
                  [0.9, 0.9, 0.9, 0.001], [[1.0, 1.0, 1.0]] * 4)
    for tensor in parts:
        tensor.requires_grad_(True)
    # Behind the camera, in front of the near plane, far off-screen, and too transparent (< 1/255).
    out = rasterize(*parts, *camera(), SIZE, SIZE, backend="torch", track_means2d_grad=True)
    assert out.radii.tolist() == [[0, 0, 0, 0]]
    assert out.rgb.abs().max().item() == 0.0 and out.alpha.abs().max().item() == 0.0
    (out.rgb.sum() + out.alpha.sum() + out.depth.sum()).backward()
    for tensor in parts:
        assert tensor.grad is not None and torch.isfinite(tensor.grad).all() and tensor.grad.abs().max() == 0


def test_batch_of_two_cameras_gives_per_camera_images():
    torch.manual_seed(0)
    n = 40
    means = torch.randn(2, n, 3) * 0.3 + torch.tensor([0.0, 0.0, 3.0])
    quats, scales = torch.randn(2, n, 4), torch.rand(2, n, 3) * 0.1 + 0.02
    opacities, colors = torch.rand(2, n) * 0.8 + 0.1, torch.rand(2, n, 3)
    viewmats, Ks = camera(2)
    viewmats[1, 0, 3] = 0.4  # the second camera is shifted sideways
    Ks[1, 0, 0] = 50.0
    batched = rasterize(means, quats, scales, opacities, colors, viewmats, Ks, SIZE, 24, backend="torch")
    assert batched.rgb.shape == (2, 24, SIZE, 3) and batched.radii.shape == (2, n)
    for b in range(2):
        single = rasterize(means[b:b + 1], quats[b:b + 1], scales[b:b + 1], opacities[b:b + 1], colors[b:b + 1],
                           viewmats[b:b + 1], Ks[b:b + 1], SIZE, 24, backend="torch")
        torch.testing.assert_close(batched.rgb[b:b + 1], single.rgb)
        torch.testing.assert_close(batched.alpha[b:b + 1], single.alpha)
        torch.testing.assert_close(batched.radii[b:b + 1], single.radii)
    assert (batched.rgb[0] - batched.rgb[1]).abs().max() > 0.1  # different cameras, different images


def test_gradients_match_finite_differences():
    torch.manual_seed(3)
    n, dtype = 4, torch.float64
    means = (torch.randn(1, n, 3, dtype=dtype) * 0.15 + torch.tensor([0.0, 0.0, 2.5], dtype=dtype))
    quats = torch.randn(1, n, 4, dtype=dtype)
    scales = torch.rand(1, n, 3, dtype=dtype) * 0.06 + 0.04
    opacities = torch.rand(1, n, dtype=dtype) * 0.5 + 0.3
    colors = torch.rand(1, n, 3, dtype=dtype)
    viewmats, Ks = camera(1, dtype)
    Ks[:, :2] *= 0.25  # a 10 x 8 image keeps gradcheck quick
    Ks[:, :2, 2] = torch.tensor([5.0, 4.0], dtype=dtype)

    def render(means, quats, scales, opacities, colors):
        out = rasterize(means, quats, scales, opacities, colors, viewmats, Ks, 10, 8, backend="torch")
        return out.rgb, out.alpha, out.depth

    inputs = tuple(t.clone().requires_grad_(True) for t in (means, quats, scales, opacities, colors))
    assert torch.autograd.gradcheck(render, inputs, eps=1e-6, atol=1e-5, rtol=1e-3)


def test_means2d_gradient_is_populated_when_requested():
    torch.manual_seed(1)
    means = (torch.randn(1, 20, 3) * 0.3 + torch.tensor([0.0, 0.0, 3.0])).requires_grad_(True)
    quats, scales = torch.randn(1, 20, 4), torch.rand(1, 20, 3) * 0.1 + 0.02
    opacities, colors = torch.rand(1, 20) * 0.8 + 0.1, torch.rand(1, 20, 3)
    out = rasterize(means, quats, scales, opacities, colors, *camera(), SIZE, SIZE, backend="torch",
                    track_means2d_grad=True)
    assert out.means2d.shape == (1, 20, 2)
    ((out.rgb - 0.5) ** 2).sum().backward()
    grad = out.means2d.grad
    assert grad is not None and grad.shape == (1, 20, 2)
    visible = out.radii[0] > 0
    assert visible.sum() >= 10
    assert (grad[0][visible].abs().sum(-1) > 0).float().mean() > 0.9
    assert grad[0][~visible].abs().max() == 0 if (~visible).any() else True


def test_backend_choice():
    parts = scene([[0.0, 0.0, 2.0]], [0.1], [0.5], [[1.0, 1.0, 1.0]])
    auto = rasterize(*parts, *camera(), SIZE, SIZE)  # CPU tensors: 'auto' means torch
    torch.testing.assert_close(auto.rgb, rasterize(*parts, *camera(), SIZE, SIZE, backend="torch").rgb)
    with pytest.raises(ValueError, match="CUDA"):
        rasterize(*parts, *camera(), SIZE, SIZE, backend="gsplat")
    with pytest.raises(ValueError, match="quats"):
        rasterize(parts[0], parts[1][:, :, :3], *parts[2:], *camera(), SIZE, SIZE)


def test_rendering_without_autograd_gives_the_differentiable_frames_bit_for_bit():
    """Without autograd the rasterizer reuses the culling's alpha and gathers only colour and depth; with it, it
    recomputes alpha with its graph. Both give the same frames, on a crowded scene of two cameras."""
    g = torch.Generator().manual_seed(3)
    n = 300
    means = torch.cat([torch.rand(1, n, 2, generator=g) - 0.5, 2.0 + torch.rand(1, n, 1, generator=g)], dim=-1)
    quats = torch.randn(1, n, 4, generator=g)
    scales = 0.01 + 0.05 * torch.rand(1, n, 3, generator=g)
    opacities = torch.rand(1, n, generator=g)
    colors = torch.rand(1, n, 3, generator=g)
    inputs = [t.expand(2, *t.shape[1:]).contiguous() for t in (means, quats, scales, opacities, colors)]
    viewmats, Ks = camera(2)
    viewmats[1, 0, 3] = 0.1
    with torch.no_grad():
        rendered = rasterize(*inputs, viewmats, Ks, SIZE, SIZE, backend="torch")
    trained = rasterize(*[t.clone().requires_grad_(True) for t in inputs], viewmats, Ks, SIZE, SIZE,
                        backend="torch")
    assert trained.rgb.requires_grad and not rendered.rgb.requires_grad
    assert rendered.alpha.amax() > 0.9 and not torch.equal(rendered.rgb[0], rendered.rgb[1])
    for name in ("rgb", "alpha", "depth"):
        assert torch.equal(getattr(rendered, name), getattr(trained, name).detach()), name
