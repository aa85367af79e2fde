"""Audio-driven deformation: per-frame tokens, spatial-audio cross attention, offset heads.

Per frame, 4 tokens of width d_model: audio (the adapter's window code), eye (AU45, sinusoidal encoding),
camera (the 12 numbers of the world-to-camera 3x4 pose, standardised) and a learned null token (lets a
Gaussian attend to "nothing" when no input moves it). Each Gaussian's tri-plane feature is a query; one
attention layer (pre-LayerNorm, residual, feed-forward) mixes the tokens into it, and five small heads
predict offsets of position, log-scale, rotation, opacity logit and colour. The heads' last layers start
near zero, so the fine stage begins from the static head.

The queries depend only on the canonical Gaussians and the planes: `spatial_cache` computes them once per
iteration (shared by the frames of a batch) or once per model at inference.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from egstalker.model.audio_adapter import AudioAdapter
from egstalker.model.hexplane import TriPlaneField

N_TOKENS = 4
HEAD_NAMES = ("means", "scales", "quats", "opacities", "colors")


def sinusoidal_encoding(x: torch.Tensor, n_frequencies: int) -> torch.Tensor:
    """x: [B] in about [0, 1] -> [B, 2 * n_frequencies]."""
    freqs = (2.0 ** torch.arange(n_frequencies, device=x.device, dtype=x.dtype)) * math.pi
    angles = x[:, None] * freqs
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)


@dataclass
class SpatialCache:
    """What does not change per frame: per-Gaussian features and attention queries."""

    features: torch.Tensor
    """[N, d_model] projected tri-plane features (the residual stream)."""
    queries: torch.Tensor
    """[N, n_heads, head_dim]."""


@dataclass
class Offsets:
    """Per-frame offsets of the canonical Gaussians; every tensor is [B, N, k]."""

    means: torch.Tensor
    scales: torch.Tensor
    quats: torch.Tensor
    opacities: torch.Tensor
    colors: torch.Tensor


class TokenEncoder(nn.Module):
    """Per-frame inputs -> [B, 4, d_model] tokens (audio, eye, camera, null)."""

    def __init__(self, feature_shape: tuple[int, ...], window: int, d_model: int, audio_width: int,
                 pose_dropout: float = 0.0, audio_dropout: float = 0.0):
        super().__init__()
        self.pose_dropout = float(pose_dropout)
        self.audio = AudioAdapter(feature_shape, window, width=audio_width, input_dropout=audio_dropout)
        self.audio_proj = nn.Linear(audio_width, d_model)
        self.eye_frequencies = 16
        self.eye_proj = nn.Linear(2 * self.eye_frequencies, d_model)
        self.register_buffer("pose_mean", torch.zeros(12))
        self.register_buffer("pose_std", torch.ones(12))
        self.camera_proj = nn.Linear(12, d_model)
        self.null = nn.Parameter(torch.randn(d_model) * 0.02)

    def set_pose_statistics(self, viewmats: torch.Tensor) -> None:
        poses = viewmats[:, :3, :4].reshape(-1, 12).float()
        self.pose_mean.copy_(poses.mean(0))
        self.pose_std.copy_(poses.std(0).clamp_min(1e-3) if poses.shape[0] > 1 else torch.ones(12))

    def forward(self, audio: torch.Tensor, au45: torch.Tensor, viewmats: torch.Tensor) -> torch.Tensor:
        """audio: [B, W, *feature_shape]; au45: [B] in [0, 1]; viewmats: [B, 4, 4] -> [B, 4, d_model]."""
        b = audio.shape[0]
        audio_token = self.audio_proj(self.audio(audio))
        eye_token = self.eye_proj(sinusoidal_encoding(au45.float(), self.eye_frequencies))
        pose = (viewmats[:, :3, :4].reshape(b, 12).float() - self.pose_mean) / self.pose_std
        camera_token = self.camera_proj(pose)
        null_token = self.null.expand(b, -1)
        if self.training and self.pose_dropout > 0:
            # Every training frame has its own pose, so the pose token alone could key a memorised mouth
            # shape per frame; hiding it at random makes the mouth follow the audio.
            hide = torch.rand(b, 1, device=pose.device) < self.pose_dropout
            camera_token = torch.where(hide, null_token, camera_token)
        return torch.stack([audio_token, eye_token, camera_token, null_token], dim=1)


def _small_head(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    head = nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, d_out))
    nn.init.xavier_uniform_(head[2].weight, gain=0.01)
    nn.init.zeros_(head[2].bias)
    return head


class DeformationNetwork(nn.Module):
    """Tri-plane features + tokens -> per-frame Gaussian offsets.

    Example:
        >>> net = DeformationNetwork(field, feature_shape=(768,), window=8)
        >>> cache = net.spatial_cache(means)                          # [N, 3] canonical positions
        >>> offsets = net(cache, net.tokens(audio, au45, viewmats))   # offsets.means: [B, N, 3]
    """

    def __init__(self, field: TriPlaneField, feature_shape: tuple[int, ...], window: int, d_model: int = 64,
                 n_heads: int = 4, ffn_width: int = 128, dropout: float = 0.1, audio_width: int = 32,
                 head_width: int = 128, n_color: int = 3, position_scale: float = 1.0, pose_dropout: float = 0.0,
                 audio_dropout: float = 0.0):
        super().__init__()
        self.field = field
        self.d_model, self.n_heads = d_model, n_heads
        self.head_dim = d_model // n_heads
        self.position_scale = float(position_scale)
        self.token_encoder = TokenEncoder(feature_shape, window, d_model, audio_width, pose_dropout, audio_dropout)
        self.feature_in = nn.Linear(field.out_dim, d_model)
        self.query_norm = nn.LayerNorm(d_model)
        self.to_q = nn.Linear(d_model, d_model)
        self.token_norm = nn.LayerNorm(d_model)
        self.to_kv = nn.Linear(d_model, 2 * d_model)
        self.attn_out = nn.Linear(d_model, d_model)
        self.ffn_norm = nn.LayerNorm(d_model)
        self.ffn = nn.Sequential(nn.Linear(d_model, ffn_width), nn.GELU(), nn.Linear(ffn_width, d_model))
        self.dropout = nn.Dropout(dropout)
        self.heads = nn.ModuleDict({
            "means": _small_head(d_model, head_width, 3),
            "scales": _small_head(d_model, head_width, 3),
            "quats": _small_head(d_model, head_width, 4),
            "opacities": _small_head(d_model, head_width, 1),
            "colors": _small_head(d_model, head_width, n_color),
        })

    def tokens(self, audio: torch.Tensor, au45: torch.Tensor, viewmats: torch.Tensor) -> torch.Tensor:
        return self.token_encoder(audio, au45, viewmats)

    def spatial_cache(self, means: torch.Tensor) -> SpatialCache:
        """means: [N, 3] canonical positions -> features and queries (constant across frames)."""
        features = self.feature_in(self.field(means))
        queries = self.to_q(self.query_norm(features)).view(-1, self.n_heads, self.head_dim)
        return SpatialCache(features=features, queries=queries)

    inference_dtype: torch.dtype | None = None
    """Inference on CUDA only (eval mode, no autograd): run the per-Gaussian network in this dtype end to end
    (torch.float16 halves the memory traffic of its activations, the bulk of a served frame's cost); None keeps
    float32. Offsets come back as float32 either way. Set through TalkingHead(precision=...)."""

    recompute_in_backward: bool = False
    """Training only: keep none of the per-Gaussian activations between the forward and backward passes and
    compute them again in the backward pass (activation checkpointing; dropout draws the same masks). They are
    3.3 GiB at 150k Gaussians x 4 frames (benchmarks/activation_memory_cpu.py). The price is a second forward
    pass of this network. Set by the trainer from `ModelConfig.recompute_network`."""

    recompute_chunk_rows: int | None = None
    """With `recompute_in_backward`: None recomputes every Gaussian in one piece, so the backward pass holds all
    their activations for a moment; N goes through in chunks of at most N (frame, Gaussian) rows, each checkpointed
    on its own, so it recomputes and frees one chunk at a time (about 0.7 GiB of activations at 2^17 rows, 5.7 KB
    a row), at the cost of more kernel launches. Set by the trainer from `ModelConfig.recompute_chunk_rows`."""

    INFERENCE_CHUNK_ROWS = 2**19
    """In eval mode without autograd, at most this many (frame, Gaussian) rows go through the network at once:
    every layer is per Gaussian, so chunking over Gaussians gives the same result while the 128-wide hidden
    layers stay at 256 MB instead of growing with batch x Gaussians."""

    def forward(self, cache: SpatialCache, tokens: torch.Tensor) -> Offsets:
        """cache: from `spatial_cache`; tokens: [B, T, d_model] -> offsets, each [B, N, k]."""
        b, n = tokens.shape[0], cache.features.shape[0]
        if self.training or torch.is_grad_enabled():
            if self.recompute_in_backward and torch.is_grad_enabled():
                return self._recomputed_forward(cache, tokens)
            return self._forward(cache, tokens)
        net = self
        if self.inference_dtype is not None and tokens.device.type == "cuda":
            # A copy of the weights in half precision, so LayerNorm and the residual stream run in it too (autocast
            # keeps them in float32): the network 19% faster than under autocast on an H200, the frames 74 dB from
            # float32's (benchmarks/render_profile_gpu.py, half_precision_gpu.py).
            net, dtype = self._reduced_precision_copy(), self.inference_dtype
            cache = SpatialCache(features=cache.features.to(dtype), queries=cache.queries.to(dtype))
            tokens = tokens.to(dtype)
        if b * n <= self.INFERENCE_CHUNK_ROWS:
            parts = [net._forward(cache, tokens)]
        else:
            step = max(1, self.INFERENCE_CHUNK_ROWS // b)
            parts = [net._forward(SpatialCache(features=cache.features[i:i + step],
                                               queries=cache.queries[i:i + step]), tokens)
                     for i in range(0, n, step)]
        return Offsets(**{name: (getattr(parts[0], name) if len(parts) == 1
                                 else torch.cat([getattr(part, name) for part in parts], dim=1)).float()
                          for name in HEAD_NAMES})

    def _recomputed_forward(self, cache: SpatialCache, tokens: torch.Tensor) -> Offsets:
        """`_forward` in chunks of Gaussians, each recomputed in the backward pass. split, not slicing: a slice's
        backward writes its gradient into a zero-filled copy of the whole tensor, once per chunk."""
        rows = self.recompute_chunk_rows or tokens.shape[0] * cache.features.shape[0]
        step = max(1, rows // tokens.shape[0])
        chunks = zip(cache.features.split(step), cache.queries.split(step))
        parts = [checkpoint(self._forward, SpatialCache(features=features, queries=queries), tokens,
                            use_reentrant=False) for features, queries in chunks]
        if len(parts) == 1:
            return parts[0]
        return Offsets(**{name: torch.cat([getattr(part, name) for part in parts], dim=1) for name in HEAD_NAMES})

    def _reduced_precision_copy(self) -> "DeformationNetwork":
        """This network with its weights in `inference_dtype`, kept outside the module tree (not saved, not
        trained) and made again when the dtype, the device or any weight changes. It leaves out the tri-plane
        field: the spatial cache is computed by this network."""
        key = (self.inference_dtype, self.to_q.weight.device, sum(p._version for p in self.parameters()))
        made = self.__dict__.get("_reduced_copy")
        if made is None or made[0] != key:
            self.__dict__.pop("_reduced_copy", None)
            copy_ = copy.deepcopy(self, memo={id(self.field): None}).to(self.inference_dtype)
            copy_.inference_dtype = None
            self.__dict__["_reduced_copy"] = made = (key, copy_)
        return made[1]

    def _forward(self, cache: SpatialCache, tokens: torch.Tensor) -> Offsets:
        b, t, _ = tokens.shape
        k, v = self.to_kv(self.token_norm(tokens)).view(b, t, 2, self.n_heads, self.head_dim).unbind(2)
        # N queries x T (= 4) keys per frame: the score tensor is tiny, so plain einsum beats fused kernels.
        scores = torch.einsum("nhd,bthd->bnht", cache.queries, k) / math.sqrt(self.head_dim)
        weights = self.dropout(torch.softmax(scores, dim=-1))
        mixed = torch.einsum("bnht,bthd->bnhd", weights, v).reshape(b, -1, self.d_model)
        hidden = cache.features.unsqueeze(0) + self.dropout(self.attn_out(mixed))
        hidden = hidden + self.dropout(self.ffn(self.ffn_norm(hidden)))
        # Five separate heads, not one fused 64 -> 640 product: on an H200 the fused product is 13% faster, but
        # on the CPU its 640-wide activations leave the cache and the network runs twice as slow
        # (benchmarks/render_profile_gpu.py).
        return Offsets(**{name: self.heads[name](hidden) * (self.position_scale if name == "means" else 1.0)
                          for name in HEAD_NAMES})


__all__ = ["DeformationNetwork", "HEAD_NAMES", "Offsets", "SpatialCache", "TokenEncoder", "N_TOKENS",
           "sinusoidal_encoding"]
