"""Adaptive density control of the canonical Gaussians, as a Strategy object with training hooks.

`post_backward` accumulates each Gaussian's screen-space positional gradient (from the rasterizer's
`means2d`, normalised as in 3DGS) and, every `every` iterations between `start` and `stop`, clones small
Gaussians and splits large ones whose mean gradient is above the threshold, and prunes transparent or huge
ones. It keeps working through the audio-driven fine stage (the seed stopped early and stayed at ~1,500
Gaussians), so the count follows the detail the images need, up to `max_gaussians`.

Parameters are replaced in the model and the optimiser together; the Adam moments of new Gaussians start at
zero, those of kept ones are carried over.
"""

from __future__ import annotations

import torch
from torch import nn

from egstalker.model.gaussians import PARAM_NAMES, GaussianCloud, inverse_sigmoid, quat_to_rotmat
from egstalker.train.config import DensifyConfig


def _replace(optimizer: torch.optim.Optimizer, cloud: GaussianCloud, name: str, param_fn, state_fn) -> None:
    """Swap `cloud.params[name]` for `param_fn(old)`, transforming its optimiser state with `state_fn`."""
    old = cloud.params[name]
    new = nn.Parameter(param_fn(old.detach()))
    for group in optimizer.param_groups:
        if group.get("name") == name:
            state = optimizer.state.pop(old, None)
            if state:
                for key in ("exp_avg", "exp_avg_sq"):
                    if key in state:
                        state[key] = state_fn(state[key])
                optimizer.state[new] = state
            group["params"][0] = new
            break
    cloud.params[name] = new


def append_gaussians(optimizer, cloud: GaussianCloud, values: dict[str, torch.Tensor]) -> None:
    """Add Gaussians with the given raw values (one tensor per parameter name); Adam moments start at 0."""
    for name in PARAM_NAMES:
        extra = values[name]
        _replace(optimizer, cloud, name, lambda p, e=extra: torch.cat([p, e.to(p)]),
                 lambda s, e=extra: torch.cat([s, torch.zeros_like(e).to(s)]))


def keep_gaussians(optimizer, cloud: GaussianCloud, keep: torch.Tensor) -> None:
    """Keep only the Gaussians where `keep` [N] is True."""
    for name in PARAM_NAMES:
        _replace(optimizer, cloud, name, lambda p: p[keep], lambda s: s[keep])


class DensifyStrategy:
    """Clone / split / prune with pre- and post-backward hooks.

    Example:
        >>> strategy = DensifyStrategy(config, head_radius=1.0, stop=5000, reset_until=1000)
        >>> out = model.render(..., track_means2d_grad=True)
        >>> loss.backward()
        >>> info = strategy.post_backward(step, model.gaussians, optimizer, out.raster, width, height)
    """

    def __init__(self, config: DensifyConfig, head_radius: float, stop: int, reset_until: int):
        self.config = config
        self.head_radius = float(head_radius)
        self.stop = int(stop)
        self.reset_until = int(reset_until)
        self.grad_sum: torch.Tensor | None = None
        self.grad_count: torch.Tensor | None = None

    # --- state for exact resume
    def state_dict(self) -> dict:
        return {"grad_sum": self.grad_sum, "grad_count": self.grad_count}

    def load_state_dict(self, state: dict) -> None:
        self.grad_sum, self.grad_count = state["grad_sum"], state["grad_count"]

    def pre_backward(self, step: int) -> bool:
        """Whether this step's render must keep means2d gradients (True while densification runs)."""
        return step < self.stop

    def post_backward(self, step: int, cloud: GaussianCloud, optimizer, raster, width: int, height: int) -> dict:
        """Accumulate gradient statistics; densify/prune/reset on schedule. Returns counts of what changed.

        `step` is the 1-based number of the iteration just done.
        """
        info = {}
        if step >= self.stop:
            return info
        n = len(cloud)
        device = cloud.means.device
        if self.grad_sum is None or self.grad_sum.shape[0] != n:
            self.grad_sum = torch.zeros(n, device=device)
            self.grad_count = torch.zeros(n, device=device)
        grad = raster.means2d.grad
        if grad is not None:
            b = grad.shape[0]
            # 3DGS normalisation: gradients w.r.t. NDC-like coordinates, and undo the batch mean in the loss.
            scaled = grad.detach() * torch.tensor([width / 2.0, height / 2.0], device=device) * b
            norms = scaled.norm(dim=-1)  # [B, N]
            visible = (raster.radii > 0).float()
            self.grad_sum += (norms * visible).sum(0)
            self.grad_count += visible.sum(0)

        c = self.config
        if step >= c.start and step % c.every == 0:
            info.update(self._densify_and_prune(cloud, optimizer))
        if c.reset_opacity_every > 0 and step % c.reset_opacity_every == 0 and step < self.reset_until:
            self._reset_opacity(cloud, optimizer)
            info["opacity_reset"] = 1
        return info

    @torch.no_grad()
    def _densify_and_prune(self, cloud: GaussianCloud, optimizer) -> dict:
        c = self.config
        p = cloud.params
        n0 = len(cloud)
        mean_grad = self.grad_sum / self.grad_count.clamp_min(1.0)
        max_scale = torch.exp(p["scales"]).amax(dim=-1)
        candidates = mean_grad > c.grad_threshold
        room = max(0, c.max_gaussians - n0)
        if int(candidates.sum()) > room:
            # Over the cap: keep the candidates with the largest gradients (each adds at most one Gaussian).
            keep = torch.zeros_like(candidates)
            if room > 0:
                keep[torch.topk(torch.where(candidates, mean_grad, -1.0), room).indices] = True
            candidates = keep
        small = max_scale <= c.dense_fraction * self.head_radius
        clone = candidates & small
        split = candidates & ~small
        n_clone, n_split = int(clone.sum()), int(split.sum())

        if n_clone:
            append_gaussians(optimizer, cloud, {name: p[name][clone] for name in PARAM_NAMES})
        if n_split:
            # Two children sampled from the parent's Gaussian, 1.6x smaller; the parent is removed below.
            idx = torch.nonzero(split).squeeze(1)
            scales = torch.exp(p["scales"][idx])
            rot = quat_to_rotmat(p["quats"][idx])
            children = {}
            samples = torch.randn(2, len(idx), 3, device=scales.device) * scales
            offsets = (rot[None] @ samples[..., None]).squeeze(-1)
            children["means"] = (p["means"][idx][None] + offsets).reshape(-1, 3)
            children["scales"] = torch.log(scales / 1.6).repeat(2, 1)
            for name in ("quats", "opacities", "sh0", "shN"):
                children[name] = p[name][idx].repeat(2, *([1] * (p[name].dim() - 1)))
            append_gaussians(optimizer, cloud, children)

        # Prune: split parents, transparent Gaussians and ones grown far larger than facial detail.
        n_now = len(cloud)
        prune = torch.zeros(n_now, dtype=torch.bool, device=cloud.means.device)
        prune[:n0] = split
        prune |= torch.sigmoid(p["opacities"]) < c.prune_opacity
        prune |= torch.exp(p["scales"]).amax(dim=-1) > c.max_scale_fraction * self.head_radius
        if int((~prune).sum()) < 16:  # never prune everything away
            prune[:] = False
        n_pruned = int(prune.sum())
        if n_pruned:
            keep_gaussians(optimizer, cloud, ~prune)
        self.grad_sum = torch.zeros(len(cloud), device=cloud.means.device)
        self.grad_count = torch.zeros(len(cloud), device=cloud.means.device)
        return {"cloned": n_clone, "split": n_split, "pruned": n_pruned}

    @torch.no_grad()
    def _reset_opacity(self, cloud: GaussianCloud, optimizer) -> None:
        ceiling = float(inverse_sigmoid(torch.tensor(max(2 * self.config.prune_opacity, 0.01))))
        _replace(optimizer, cloud, "opacities", lambda p: p.clamp_max(ceiling), lambda s: torch.zeros_like(s))
