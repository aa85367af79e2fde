"""The Gaussian head model on small synthetic scenes: shapes, adapters, caching, densification, model folder."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from egstalker.errors import EgstalkerError
from egstalker.model import deformation as deformation_module
from egstalker.model.audio_adapter import AudioAdapter
from egstalker.model.folder import MODEL_FORMAT_VERSION, ModelInfo, PoseSources, load_model, write_model
from egstalker.model.gaussians import PARAM_NAMES
from egstalker.model.head import GaussianHead, ModelSpec, build_head
from egstalker.model.hexplane import TriPlaneField
from egstalker.train.config import DensifyConfig
from egstalker.train.densify import DensifyStrategy

SIZE = 48


def small_head(n: int = 400, feature_shape=(96,), window: int = 8, seed: int = 0) -> GaussianHead:
    """A ball of n Gaussians of radius 1 around the origin."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(n, 3, generator=g) * 0.5
    rgb = torch.rand(n, 3, generator=g)
    scales = torch.full((n, 3), 0.08)
    spec = ModelSpec(feature_shape=tuple(feature_shape), audio_window=window, n_gaussians=n,
                     plane_resolutions=(16, 32), head_radius=1.0)
    return build_head(spec, means, rgb, scales, 0.5, torch.zeros(3), torch.full((3,), 1.5))


def cameras(b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """b cameras 4 units in front of the origin (OpenCV axes: looking down +z)."""
    viewmats = torch.eye(4).repeat(b, 1, 1)
    viewmats[:, 2, 3] = 4.0
    viewmats[:, 0, 3] = torch.linspace(-0.2, 0.2, b)
    K = torch.tensor([[60.0, 0, SIZE / 2], [0, 60.0, SIZE / 2], [0, 0, 1]]).repeat(b, 1, 1)
    return viewmats, K


def frame_inputs(model: GaussianHead, b: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    audio = torch.randn(b, model.spec.audio_window, *model.spec.feature_shape, generator=g)
    au45 = torch.rand(b, generator=g)
    return audio, au45


@pytest.mark.parametrize("shape", [(96,), (768,), (16, 29), (4, 80)])
def test_audio_adapter_takes_any_feature_shape(shape):
    adapter = AudioAdapter(shape, window=8, width=32)
    x = torch.randn(3, 8, *shape)
    adapter.set_statistics(x.reshape(-1, *shape))
    out = adapter(x)
    assert out.shape == (3, 32)
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match="model expects"):
        adapter(torch.randn(3, 8, 7))


def test_audio_input_dropout_acts_in_training_only():
    torch.manual_seed(0)
    plain = AudioAdapter((96,), window=8, width=32)
    dropped = AudioAdapter((96,), window=8, width=32, input_dropout=0.3)
    dropped.load_state_dict(plain.state_dict())  # same weights: dropout adds no parameters
    x = torch.randn(4, 8, 96)
    plain.eval(), dropped.eval()
    assert torch.equal(dropped(x), plain(x))  # inference: no dropout
    dropped.train()
    a, b = dropped(x), dropped(x)
    assert not torch.allclose(a, b) and not torch.allclose(a, plain(x))


def test_triplane_features_have_64_dims_and_respond_to_position():
    field = TriPlaneField(torch.zeros(3), torch.ones(3), channels=32, resolutions=(64, 128))
    pts = torch.rand(100, 3) * 2 - 1
    f = field(pts)
    assert f.shape == (100, 64)
    assert (f[:50] - f[50:]).abs().mean() > 1e-4  # different places, different features
    assert field.total_variation() > 0


def test_render_shapes_and_static_start():
    """A fresh model renders [B, H, W, 3]; its deformation starts near zero (the fine stage starts from the
    static head); gradients reach the Gaussians and the tri-planes."""
    model = small_head()
    viewmats, K = cameras(2)
    audio, au45 = frame_inputs(model, 2)
    bg = torch.ones(2, SIZE, SIZE, 3)
    out = model.render(viewmats, K, SIZE, SIZE, bg, audio=audio, au45=au45, dynamic=True, backend="torch")
    static = model.render(viewmats, K, SIZE, SIZE, bg, dynamic=False, backend="torch")
    assert out.image.shape == (2, SIZE, SIZE, 3) and out.alpha.shape == (2, SIZE, SIZE, 1)
    assert 0.0 <= float(out.image.detach().min()) and float(out.image.detach().max()) <= 1.0
    assert float(out.alpha.max().detach()) > 0.5  # the ball is in view
    assert (out.image - static.image).abs().max() < 0.05
    out.image.mean().backward()
    assert model.gaussians.params["means"].grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.deformation.field.planes)


def test_audio_changes_the_render_after_the_heads_learn():
    """Offsets depend on the audio tokens: with non-zero heads, two different audio windows render differently,
    and the same audio renders identically (no hidden state; eval mode)."""
    torch.manual_seed(0)
    model = small_head().eval()
    for head in model.deformation.heads.values():
        torch.nn.init.normal_(head[2].weight, std=0.5)
    viewmats, K = cameras(1)
    bg = torch.zeros(1, SIZE, SIZE, 3)
    a1, e1 = frame_inputs(model, 1, seed=1)
    a2, _ = frame_inputs(model, 1, seed=2)
    with torch.no_grad():
        r1 = model.render(viewmats, K, SIZE, SIZE, bg, audio=a1, au45=e1, backend="torch").image
        r1b = model.render(viewmats, K, SIZE, SIZE, bg, audio=a1, au45=e1, backend="torch").image
        r2 = model.render(viewmats, K, SIZE, SIZE, bg, audio=a2, au45=e1, backend="torch").image
    assert torch.equal(r1, r1b)
    assert (r1 - r2).abs().mean() > 1e-3


def test_cached_spatial_queries_give_the_same_frames():
    model = small_head().eval()
    viewmats, K = cameras(2)
    audio, au45 = frame_inputs(model, 2)
    bg = torch.zeros(2, SIZE, SIZE, 3)
    with torch.no_grad():
        plain = model.render(viewmats, K, SIZE, SIZE, bg, audio=audio, au45=au45, backend="torch").image
        model.freeze_cache()
        cached = model.render(viewmats, K, SIZE, SIZE, bg, audio=audio, au45=au45, backend="torch").image
    assert torch.allclose(plain, cached, atol=1e-6)


def test_inference_chunks_give_the_same_offsets(monkeypatch):
    """Without autograd the deformation runs over chunks of Gaussians (bounded memory): same offsets as one pass,
    with chunk edges that do not divide the Gaussian count."""
    model = small_head(n=401).eval()
    viewmats, _ = cameras(3)
    audio, au45 = frame_inputs(model, 3)
    net = model.deformation
    with torch.no_grad():
        cache = net.spatial_cache(model.gaussians.means)
        tokens = net.tokens(audio, au45, viewmats)
        whole = net(cache, tokens)
        monkeypatch.setattr(type(net), "INFERENCE_CHUNK_ROWS", 3 * 50)  # chunks of 50 Gaussians x 3 frames
        chunked = net(cache, tokens)
    for name in ("means", "scales", "quats", "opacities", "colors"):
        a, b = getattr(whole, name), getattr(chunked, name)
        assert a.shape == b.shape == (3, 401, a.shape[-1])
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk_rows", [None, 2 * 70])
def test_recomputing_the_network_in_backward_gives_the_same_gradients_from_less_memory(monkeypatch, chunk_rows):
    """Activation checkpointing in training: same loss and gradients, and the per-Gaussian activations are no
    longer kept for the backward pass. In one chunk with dropout on (the same masks are drawn again); in five
    chunks of 70 Gaussians x 2 frames with dropout off (chunks draw their masks piece by piece)."""
    regions = []
    checkpoint = deformation_module.checkpoint
    monkeypatch.setattr(deformation_module, "checkpoint", lambda *a, **k: regions.append(1) or checkpoint(*a, **k))

    def step(recompute: bool) -> tuple[float, dict, int]:
        torch.manual_seed(7)  # the same network weights and dropout masks in both runs
        model = small_head(n=300).train()
        model.deformation.recompute_in_backward = recompute
        model.deformation.recompute_chunk_rows = chunk_rows
        if chunk_rows is not None:
            model.deformation.dropout.p = 0.0
        viewmats, K = cameras(2)
        audio, au45 = frame_inputs(model, 2)
        kept = []

        def pack(t):
            kept.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            image = model.render(viewmats, K, SIZE, SIZE, torch.zeros(2, SIZE, SIZE, 3), audio=audio, au45=au45,
                                 backend="torch").image
            loss = (image - 0.5).square().mean()
        loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        return loss.item(), grads, sum(kept)

    loss_kept, grads_kept, saved_kept = step(False)
    loss_again, grads_again, saved_again = step(True)
    assert len(regions) == (1 if chunk_rows is None else 5)  # 300 Gaussians in chunks of 70
    assert loss_again == pytest.approx(loss_kept, rel=1e-6)
    assert grads_kept.keys() == grads_again.keys() and "deformation.heads.means.0.weight" in grads_kept
    for name, g in grads_kept.items():
        torch.testing.assert_close(grads_again[name], g, rtol=1e-4, atol=1e-7, msg=name)
    # the 300 x 2 rows of the network's ~2k activations each are no longer saved
    assert saved_kept - saved_again > 300 * 2 * 1000


def _optimizer(model):
    groups = [{"name": n, "params": [model.gaussians.params[n]], "lr": 1e-2} for n in PARAM_NAMES]
    groups.append({"name": "network", "params": list(model.deformation.parameters()), "lr": 1e-3})
    return torch.optim.Adam(groups)


def test_densify_clones_splits_prunes_and_keeps_optimizer_state_aligned():
    model = small_head(n=300)
    with torch.no_grad():  # a few transparent Gaussians to prune, some large ones to split
        model.gaussians.params["opacities"][:20] = -10.0
        model.gaussians.params["scales"][20:60] = np.log(0.3)
    opt = _optimizer(model)
    config = DensifyConfig(start=1, every=1, grad_threshold=0.0, dense_fraction=0.1, max_gaussians=10000)
    strategy = DensifyStrategy(config, head_radius=1.0, stop=100, reset_until=0)
    viewmats, K = cameras(2)
    out = model.render(viewmats, K, SIZE, SIZE, torch.zeros(2, SIZE, SIZE, 3), dynamic=False, backend="torch",
                       track_means2d_grad=True)
    out.image.mean().backward()
    opt.step()  # creates Adam moments
    visible = int((out.raster.radii > 0).any(0).sum())
    info = strategy.post_backward(1, model.gaussians, opt, out.raster, SIZE, SIZE)
    n = len(model.gaussians)
    assert info["pruned"] >= 20 and info["split"] > 0 and info["cloned"] > 0
    assert n == 300 + info["cloned"] + 2 * info["split"] - info["pruned"]
    assert info["cloned"] + info["split"] <= visible
    for group in opt.param_groups[:len(PARAM_NAMES)]:
        p = group["params"][0]
        assert p is model.gaussians.params[group["name"]]
        assert opt.state[p]["exp_avg"].shape == p.shape
    # Training goes on with the new count.
    opt.zero_grad()
    out = model.render(viewmats, K, SIZE, SIZE, torch.zeros(2, SIZE, SIZE, 3), dynamic=False, backend="torch")
    out.image.mean().backward()
    opt.step()


def test_densify_respects_the_cap():
    model = small_head(n=300)
    opt = _optimizer(model)
    strategy = DensifyStrategy(DensifyConfig(start=1, every=1, grad_threshold=0.0, max_gaussians=320,
                                             prune_opacity=0.0), head_radius=1.0, stop=100, reset_until=0)
    viewmats, K = cameras(1)
    out = model.render(viewmats, K, SIZE, SIZE, torch.zeros(1, SIZE, SIZE, 3), dynamic=False, backend="torch",
                       track_means2d_grad=True)
    out.image.mean().backward()
    strategy.post_backward(1, model.gaussians, opt, out.raster, SIZE, SIZE)
    assert len(model.gaussians) <= 320 + 20  # splits add at most one net Gaussian per candidate


def _poses(n: int = 4) -> PoseSources:
    viewmats, K = cameras(n)
    return PoseSources(frame_ids=np.arange(n), audio_ids=np.arange(n), viewmats=viewmats.numpy(), K=K[0].numpy(),
                       au45=np.zeros(n, np.float32), n_train=n - 1)


def test_model_folder_round_trip(tmp_path):
    model = small_head(n=250, feature_shape=(16, 29))
    with torch.no_grad():  # a densified-looking count and trained-looking heads
        for head in model.deformation.heads.values():
            torch.nn.init.normal_(head[2].weight, std=0.1)
    info = ModelInfo(spec=model.spec, encoder_name="deepspeech", width=SIZE, height=SIZE, dataset=str(tmp_path),
                     n_train_frames=3)
    write_model(tmp_path, model, info, _poses())
    loaded, loaded_info = load_model(tmp_path)
    assert loaded_info.spec.feature_shape == (16, 29) and len(loaded.gaussians) == 250
    viewmats, K = cameras(1)
    audio, au45 = frame_inputs(model, 1)
    bg = torch.zeros(1, SIZE, SIZE, 3)
    model.eval()
    with torch.no_grad():
        a = model.render(viewmats, K, SIZE, SIZE, bg, audio=audio, au45=au45, backend="torch").image
        b = loaded.render(viewmats, K, SIZE, SIZE, bg, audio=audio, au45=au45, backend="torch").image
    assert torch.equal(a, b)
    # model.json written before mel became the default named its encoder "default", which then meant oww
    data = json.loads((tmp_path / "model.json").read_text())
    (tmp_path / "model.json").write_text(json.dumps(data | {"encoder_name": "default"}))
    assert load_model(tmp_path)[1].encoder_name == "oww"


def test_model_spec_window_alignment_defaults_to_the_centred_window_of_older_models():
    old = {"feature_shape": [96], "audio_window": 8, "n_gaussians": 10, "plane_resolutions": [64]}
    assert ModelSpec.from_json(old).audio_future == 3  # frames -4..+3, what models without the field used
    assert ModelSpec.from_json(old | {"audio_window": 12}).audio_future == 5
    assert ModelSpec.from_json(old | {"audio_future": 0}).audio_future == 0
    assert ModelSpec.from_json(ModelSpec.from_json(old | {"audio_future": 1}).to_json()).audio_future == 1
    with pytest.raises(EgstalkerError, match="audio_future 8 must be"):
        ModelSpec.from_json(old | {"audio_future": 8})


def test_reduced_precision_copy_is_made_once_and_kept_out_of_the_model():
    """fp16 inference (CUDA) runs a half copy of the network: same function up to rounding, made once per dtype,
    not among the model's parameters or saved weights."""
    model = small_head().eval()
    net = model.deformation
    net.inference_dtype = torch.bfloat16  # the CPU runs bfloat16 matrix products; fp16 is the CUDA case
    half = net._reduced_precision_copy()
    assert half is net._reduced_precision_copy() and half.inference_dtype is None
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())
    assert all(p.dtype == torch.float32 for p in net.parameters())
    assert not any("_reduced" in key for key in model.state_dict())
    viewmats, _ = cameras(2)
    audio, au45 = frame_inputs(model, 2)
    with torch.no_grad():
        cache = net.spatial_cache(model.gaussians.means)
        tokens = net.tokens(audio, au45, viewmats)
        full = net._forward(cache, tokens).means
        reduced = half._forward(type(cache)(features=cache.features.bfloat16(), queries=cache.queries.bfloat16()),
                                tokens.bfloat16()).means
    assert reduced.dtype == torch.bfloat16
    torch.testing.assert_close(reduced.float(), full, atol=0.05 * full.abs().max().item(), rtol=0.0)
    assert half.field is None  # the planes stay with the full-precision network, which computes the cache
    with torch.no_grad():
        net.heads["means"][2].bias.add_(1.0)  # new weights (e.g. load_state_dict): a new copy
    renewed = net._reduced_precision_copy()
    assert renewed is not half and torch.equal(renewed.heads["means"][2].bias.float(), net.heads["means"][2].bias)
    net.inference_dtype = torch.float16
    assert net._reduced_precision_copy() is not renewed  # a new dtype, a new copy


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 inference runs on CUDA only")
def test_fp16_inference_offsets_match_fp32(monkeypatch):
    model = small_head().cuda().eval()
    b = 2
    audio, au45 = (t.cuda() for t in frame_inputs(model, b))
    viewmats = cameras(b)[0].cuda()
    with torch.no_grad():
        cache = model.deformation.spatial_cache(model.gaussians.means)
        tokens = model.deformation.tokens(audio, au45, viewmats)
        full = model.deformation(cache, tokens)
        model.deformation.inference_dtype = torch.float16
        half = model.deformation(cache, tokens)
        monkeypatch.setattr(type(model.deformation), "INFERENCE_CHUNK_ROWS", 256)  # the chunked path too
        chunked = model.deformation(cache, tokens)
    for name in ("means", "scales", "quats", "opacities", "colors"):
        a, h, c = getattr(full, name), getattr(half, name), getattr(chunked, name)
        assert h.dtype == c.dtype == torch.float32
        # the whole network runs in fp16 (LayerNorm too): within 1% of the largest offset (74 dB on rendered frames)
        error = ((h - a).abs().max() / (a.abs().max() + 1e-6)).item()
        assert error < 1e-2, f"{name}: fp16 is {error:.2%} of the largest offset away from fp32"
        torch.testing.assert_close(c, h, atol=1e-3 * h.abs().max().item() + 1e-6, rtol=0.0)
    assert not torch.equal(half.means, full.means), "fp16 changed nothing: it did not run"


def test_model_folder_errors(tmp_path):
    with pytest.raises(EgstalkerError, match="does not exist"):
        load_model(tmp_path / "nope")
    with pytest.raises(EgstalkerError, match="not a model folder"):
        load_model(tmp_path)
    model = small_head(n=100)
    info = ModelInfo(spec=model.spec, encoder_name="oww", width=SIZE, height=SIZE, dataset=str(tmp_path),
                     n_train_frames=3)
    write_model(tmp_path, model, info, _poses())
    data = json.loads((tmp_path / "model.json").read_text())
    data["format_version"] = MODEL_FORMAT_VERSION + 1
    (tmp_path / "model.json").write_text(json.dumps(data))
    with pytest.raises(EgstalkerError, match="format version"):
        load_model(tmp_path)
