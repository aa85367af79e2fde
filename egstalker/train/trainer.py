"""The training loop: stream frames, render, compute losses, densify, checkpoint, log.

    result = train(dataset_dir, model_dir, TrainConfig(), device="cuda")

Stages: the first `coarse_fraction` of the iterations fit the static canonical head (no deformation); the rest
fit the audio-driven deformation together with the Gaussians. Densification runs through both stages.
Checkpoints (every `checkpoint_every` iterations and at the end) hold everything needed to continue exactly:
Gaussians (any count), network, optimiser moments, strategy statistics, the step and all random states; the
data order is a pure function of (seed, step), so a resumed run sees the same batches.
"""

from __future__ import annotations

import copy
import math
import os
import random
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from egstalker.configs import from_dict, load_config, save_config, to_dict
from egstalker.dataset.reader import FrameDataset, features_mismatch, load_canonical_vertices, open_dataset
from egstalker.errors import EgstalkerError, EgstalkerWarning
from egstalker.model.folder import (ModelInfo, PoseSources, atomic_torch_save, check_dataset_matches, dataset_source,
                                    read_model_info, read_poses, write_model)
from egstalker.model.gaussians import PARAM_NAMES
from egstalker.model.head import GaussianHead, ModelSpec, build_head
from egstalker.model.init import dense_head_points
from egstalker.preprocess.pipeline import outdated_dataset_note
from egstalker.train import losses
from egstalker.train.config import TrainConfig
from egstalker.train.densify import DensifyStrategy
from egstalker.train.mouth_probe import MouthProbe, probe_correlation, split_mouth_shapes

CHECKPOINT_VERSION = 1


@dataclass
class TrainResult:
    model_dir: Path
    steps: int
    n_gaussians: int
    val_psnr: float | None
    """Mean held-out PSNR (dB) on the full frame (up to schedule.eval_frames frames)."""
    val_psnr_head: float | None
    """The same inside the head mask."""
    val_mouth_probe_corr: float | None
    """Held-out correlation of the mouth probe's inner-lip gap with the tracked one (None without the probe)."""
    seconds: float
    iterations_per_second: float
    gaussian_counts: list[tuple[int, int]]
    """(step, count) pairs logged over training."""
    steps_this_run: int = 0
    """Iterations trained by this call (0 when a finished run was resumed without a larger count)."""
    peak_gpu_memory_gib: float | None = None
    """The most GPU memory the training loop's tensors took at once (torch.cuda.max_memory_allocated, from the
    loop's start); None off CUDA."""


class IterationBatchSampler(torch.utils.data.Sampler):
    """Batches of frame indices for steps start+1..end (None: endless): shuffled epochs, a pure function of
    (seed, step). `frames`: the indices to draw from (default: all n_frames)."""

    def __init__(self, n_frames: int, batch_size: int, seed: int, start_step: int, end_step: int | None,
                 frames: np.ndarray | None = None):
        self.frames = np.arange(n_frames) if frames is None else np.asarray(frames)
        if len(self.frames) == 0:
            raise EgstalkerError("the training split has no frame to learn from (none shows a face); preprocess the "
                                 "video again")
        self.n, self.batch_size, self.seed = len(self.frames), batch_size, seed
        self.start, self.end = start_step, end_step

    def batch_for_step(self, step: int) -> list[int]:
        """Frames of 1-based step `step`."""
        first = (step - 1) * self.batch_size
        out = []
        for position in range(first, first + self.batch_size):
            epoch, offset = divmod(position, self.n)
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            out.append(int(self.frames[perm[offset]]))
        return out

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start
        while self.end is None or step < self.end:
            step += 1
            yield self.batch_for_step(step)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def make_optimizer(model: GaussianHead, config: TrainConfig, probe: MouthProbe | None = None) -> torch.optim.Adam:
    """One Adam group per Gaussian parameter (densification swaps them), plus planes, network and mouth probe."""
    o, radius = config.optim, model.spec.head_radius
    lrs = {"means": o.means_lr * radius, "scales": o.scales_lr, "quats": o.quats_lr,
           "opacities": o.opacities_lr, "sh0": o.sh0_lr, "shN": o.shN_lr}
    groups = [{"name": name, "params": [model.gaussians.params[name]], "lr": lrs[name]} for name in PARAM_NAMES]
    planes = list(model.deformation.field.parameters())
    plane_ids = {id(p) for p in planes}
    network = [p for p in model.deformation.parameters() if id(p) not in plane_ids]
    groups.append({"name": "planes", "params": planes, "lr": o.planes_lr})
    groups.append({"name": "network", "params": network, "lr": o.network_lr})
    if probe is not None:
        groups.append({"name": "probe", "params": list(probe.parameters()), "lr": o.network_lr})
    return torch.optim.Adam(groups, lr=0.0, eps=1e-15)


def _log_lerp(a: float, b: float, t: float) -> float:
    t = min(max(t, 0.0), 1.0)
    return math.exp(math.log(a) * (1 - t) + math.log(b) * t)


def update_learning_rates(optimizer, config: TrainConfig, radius: float, step: int) -> None:
    """Every group's learning rate at `step`, from the config alone (so a resumed run follows an edited
    train_config.json): exponential decay of the position and network rates (as in 3DGS / GaussianTalker), the
    others constant."""
    o = config.optim
    constant = {"scales": o.scales_lr, "quats": o.quats_lr, "opacities": o.opacities_lr, "sh0": o.sh0_lr,
                "shN": o.shN_lr}
    total = max(1, config.schedule.iterations)
    coarse = config.coarse_iterations
    fine_t = (step - coarse) / max(1, total - coarse)
    for group in optimizer.param_groups:
        if group["name"] == "means":
            group["lr"] = _log_lerp(o.means_lr * radius, o.means_lr_final * radius, step / total)
        elif group["name"] in ("network", "probe"):
            group["lr"] = _log_lerp(o.network_lr, o.network_lr_final, fine_t)
        elif group["name"] == "planes":
            group["lr"] = _log_lerp(o.planes_lr, o.planes_lr * o.network_lr_final / o.network_lr, fine_t)
        elif group["name"] in constant:
            group["lr"] = constant[group["name"]]


def keep_reached_stages(config: TrainConfig, reached_under: int, wanted: int, step: int,
                        keep_densify_stopped: bool = True) -> int:
    """The largest iteration count <= `wanted` that keeps every stage reached by `step` (under the count
    `reached_under`) reached. The end of the coarse stage, the stop of densification and the start of the perceptual
    term are fractions of the count, so a larger count can move them past `step`: the head would turn static, or
    densify, again (allowed with keep_densify_stopped=False: a longer run densifies longer). Never below step + 1."""
    cf, sf = config.schedule.coarse_fraction, config.densify.stop_fraction
    pf = config.loss.perceptual_from if config.loss.perceptual > 0 else None
    fine = step > round(reached_under * cf)
    stopped = keep_densify_stopped and step >= int(reached_under * sf)
    perceptual = pf is not None and step > pf * reached_under

    def keeps(n: int) -> bool:  # every term grows with n: the first n that fails bounds the search
        return not ((fine and round(n * cf) > step) or (stopped and int(n * sf) > step + 1)
                    or (perceptual and step + 1 <= pf * n))

    lo, hi = step + 1, max(step + 1, wanted)
    if keeps(hi):
        return hi
    while hi - lo > 1:  # keeps(lo) holds, keeps(hi) does not
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if keeps(mid) else (lo, mid)
    return lo


def psnr(pred: torch.Tensor, target: torch.Tensor) -> float:
    mse = torch.mean((pred.float() - target.float()) ** 2).item()
    return float(10.0 * math.log10(1.0 / max(mse, 1e-12)))


class Trainer:
    """Owns the data, the model, the optimiser and the strategy of one training run."""

    def __init__(self, dataset_dir: str | Path, model_dir: str | Path, config: TrainConfig | None,
                 device: str | torch.device = "cpu", resume: bool = False, show_progress: bool = True,
                 backend: str = "auto"):
        self.dataset_dir = Path(dataset_dir).resolve()
        self.model_dir = Path(model_dir)
        self.device = torch.device(device)
        user_allocator = "PYTORCH_CUDA_ALLOC_CONF" in os.environ or "PYTORCH_ALLOC_CONF" in os.environ
        if self.device.type == "cuda" and not torch.cuda.is_initialized() and not user_allocator:
            # gsplat's buffers change size every step; in fixed segments the cache fragments and a run at the
            # Gaussian cap reserves 0.7-2.6 GiB beyond what it uses (benchmarks/train_memory_gpu.py). Growable
            # segments keep the card's footprint near the real peak. Read when CUDA starts; a user's setting wins.
            os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
        self.show_progress = show_progress
        self.backend = backend
        self.checkpoint_dir = self.model_dir / "checkpoints"
        latest = self.latest_checkpoint()
        if resume:
            if latest is None:
                raise EgstalkerError(f"nothing to resume in {self.model_dir} (no checkpoints/); drop --resume to start")
            state = self._read_checkpoint(latest)
            saved_path = self.model_dir / "train_config.json"
            if saved_path.is_file():
                saved = load_config(TrainConfig, saved_path)
            else:  # deleted or never copied: every checkpoint holds the config it ran under
                warnings.warn(f"{saved_path} is missing; the run continues with the config saved in {latest.name} "
                              "(it is written again)", EgstalkerWarning, stacklevel=2)
                saved = from_dict(TrainConfig, state["config"], source=f"{latest}'s config")
            # the one thing a resume may change: how long it trains (an iteration count, or a time budget)
            if config is not None:
                saved.schedule.iterations = config.schedule.iterations
                saved.schedule.time_budget_minutes = config.schedule.time_budget_minutes
            config = saved
        elif latest is not None:
            raise EgstalkerError(f"{self.model_dir} already holds a training run ({latest.name}); add --resume to "
                                 "continue it, or choose a new output folder")
        self.config = config = (config or TrainConfig()).validate()
        # a time budget fits the count between step + 1 and this (the count asked for)
        self.planned_iterations = config.schedule.iterations
        res = config.data.resolution
        self.train_data = open_dataset(self.dataset_dir, "train", resolution=res)
        self.val_data = open_dataset(self.dataset_dir, "val", resolution=res)
        stale = outdated_dataset_note(self.dataset_dir)
        if stale:
            warnings.warn(stale, EgstalkerWarning, stacklevel=2)
        tracking = self.train_data.meta.get("tracking") or {}
        if tracking and "pose_points" not in tracking:
            # poses fitted to every landmark tilt with the jaw: the model can open the mouth from the pose
            warnings.warn(f"{self.dataset_dir}'s head poses were fitted to every face landmark (egstalker before "
                          "2026-12-02), so they move with the mouth; redo them in seconds: egstalker preprocess "
                          "VIDEO -o DATASET --task 8 --task 9 --force", EgstalkerWarning, stacklevel=2)
        elif tracking and "audio_offset" not in self.train_data.meta:
            # a recording with its sound late teaches the wrong alignment (obama: 160 ms; docs/model.md)
            warnings.warn(f"{self.dataset_dir} was made before egstalker checked the recording's audio/video offset "
                          "(2026-12-02); check it in seconds: egstalker preprocess VIDEO -o DATASET --task 9 --force",
                          EgstalkerWarning, stacklevel=2)
        try:
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise EgstalkerError(f"cannot create {self.model_dir} ({e.strerror}); choose a writable -o MODEL_DIR") from None
        self.width, self.height = self.train_data.size
        self.step = 0
        torch.manual_seed(config.seed)
        np.random.seed(config.seed)
        random.seed(config.seed)

        if resume:
            if (self.model_dir / "model.json").is_file():  # the run goes on with the footage and features it had
                info = read_model_info(self.model_dir)
                check_dataset_matches(info, read_poses(self.model_dir), self.dataset_dir)
                if info.encoder_name != self.train_data.encoder_name:
                    raise EgstalkerError(features_mismatch(self.dataset_dir, self.train_data.encoder_name,
                                                           info.encoder_name))
            spec = ModelSpec.from_json(state["spec"])
            self.model = GaussianHead.from_spec(spec)
            self.model.load_state_dict(state["model"])
        else:
            self.model = self._initial_model()
        self.model.to(self.device)
        self.model.deformation.recompute_in_backward = config.model.recompute_network
        self.model.deformation.recompute_chunk_rows = config.model.recompute_chunk_rows or None
        self.probe: MouthProbe | None = None
        if resume and "probe" not in state:
            config.loss.mouth_probe = 0.0  # a run started before the probe existed continues without it
        if config.loss.mouth_probe > 0:
            shapes = None if resume else split_mouth_shapes(self.train_data)
            self.probe = MouthProbe(self.model.spec.audio_width, shapes)
            if resume:
                self.probe.load_state_dict(state["probe"])
            self.probe.to(self.device)
        self._val_mouth_shapes: np.ndarray | None = None
        self.optimizer = make_optimizer(self.model, config, self.probe)
        self.strategy = DensifyStrategy(config.densify, self.model.spec.head_radius, stop=config.densify_stop,
                                        reset_until=config.coarse_iterations)
        if resume:
            self.optimizer.load_state_dict(state["optimizer"])
            self.strategy.load_state_dict({k: (v.to(self.device) if torch.is_tensor(v) else v)
                                           for k, v in state["strategy"].items()})
            self.step = int(state["step"])
            self.gaussian_counts = [tuple(x) for x in state.get("gaussian_counts", [])]
            self._rng_to_restore = state["rng"]
            if config.schedule.time_budget_minutes:
                # A budgeted run had fitted its count; asking for the full count again would move the stages and
                # the learning rates' decay (fractions of the count) back under the checkpoint's step. It goes on
                # under the count its checkpoint ran under, and the budget's fits take it from there.
                ran_under = int(state["config"]["schedule"]["iterations"])
                if self.step < ran_under:
                    self._set_iterations(min(ran_under, config.schedule.iterations))
                else:  # it had finished: a new budget continues it, keeping its stages
                    self._set_iterations(keep_reached_stages(config, ran_under, config.schedule.iterations,
                                                             self.step))
            else:  # an explicit count: refused when it would send the run back to a stage it has left
                ran_under = int(state["config"]["schedule"]["iterations"])
                wanted = config.schedule.iterations
                if wanted < self.step:
                    raise EgstalkerError(f"--iterations {wanted} is below step {self.step}, where this run already is: "
                                         "nothing to train; give a larger count to extend it")
                allowed = keep_reached_stages(config, ran_under, wanted, self.step, keep_densify_stopped=False)
                if allowed < wanted:
                    raise EgstalkerError(f"--iterations {wanted} would end the static coarse stage (or start the VGG "
                                         f"term: fractions of the count) after step {self.step}, which this run has "
                                         f"passed; extend it to at most --iterations {allowed} at a time")
        else:
            self.gaussian_counts = [(0, len(self.model.gaussians))]
            self._rng_to_restore = None
        self._last_fit_step = self.step  # the step of the time budget's last fit (or where this run started)
        save_config(self.config, self.model_dir / "train_config.json")
        self._perceptual = None

    # --- setup
    def _initial_model(self) -> GaussianHead:
        c = self.config
        vertices = load_canonical_vertices(self.train_data.layout)
        points = dense_head_points(self.train_data, vertices, n_frames=c.init.n_frames,
                                   surface_points=c.init.surface_points, volume_points=c.init.volume_points,
                                   volume_depth=c.init.volume_depth, seed=c.seed, show_progress=self.show_progress)
        from egstalker.model.gaussians import log_scale_from_neighbours

        scales = log_scale_from_neighbours(points.means).clamp_max(0.05 * points.head_radius)
        m = c.model
        spec = ModelSpec(feature_shape=self.train_data.feature_shape, audio_window=c.data.audio_window,
                         audio_future=c.data.future_rows,
                         n_gaussians=len(points.means), sh_degree=m.sh_degree, plane_channels=m.plane_channels,
                         plane_resolutions=tuple(m.plane_resolutions), d_model=m.d_model, n_heads=m.n_heads,
                         ffn_width=m.ffn_width, dropout=m.dropout, audio_width=m.audio_width,
                         head_width=m.head_width, pose_dropout=m.pose_dropout, audio_dropout=m.audio_dropout,
                         head_radius=points.head_radius)
        model = build_head(spec, points.means, points.rgb, scales, c.init.initial_opacity,
                           points.box_center, points.box_half_size)
        train_rows = np.unique(self.train_data.audio_ids)
        model.deformation.token_encoder.audio.set_statistics(
            torch.from_numpy(np.asarray(self.train_data.features[train_rows], np.float32)))
        model.deformation.token_encoder.set_pose_statistics(torch.from_numpy(self.train_data.viewmats))
        return model

    def _read_checkpoint(self, path: Path) -> dict:
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:  # torch raises RuntimeError, EOFError, OSError... for a damaged file
            older = sorted(self.checkpoint_dir.glob("step_*.pt"))[:-1]
            advice = (f"delete it to resume from {older[-1].name}" if older
                      else f"it is the only one: train again into a new folder (or delete {self.model_dir})")
            raise EgstalkerError(f"the last checkpoint {path} is damaged and cannot be read ({type(e).__name__}); "
                                 f"{advice}") from None
        if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
            raise EgstalkerError(f"{path} was written by an incompatible egstalker; start a new training")
        return state

    def latest_checkpoint(self) -> Path | None:
        if not self.checkpoint_dir.is_dir():
            return None
        found = sorted(self.checkpoint_dir.glob("step_*.pt"))
        return found[-1] if found else None

    def _loader(self, start: int, end: int | None) -> torch.utils.data.DataLoader:
        c = self.config.data
        faces = self.train_data.face_frames()
        # frames without a detected face are poses to render, not images to learn from
        sampler = IterationBatchSampler(len(self.train_data), c.batch_size, self.config.seed, start, end,
                                        frames=None if len(faces) == len(self.train_data) else faces)
        # more readers than CPUs only compete with the training step (torch warns); frames are read
        # deterministically, so the count does not change the run
        workers = min(c.num_workers, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                      else os.cpu_count() or 1)
        kwargs = {}
        if workers > 0:
            kwargs = {"prefetch_factor": c.prefetch_batches, "persistent_workers": False}
        # A private generator: creating the loader must not consume the global RNG (exact resume).
        return torch.utils.data.DataLoader(
            FrameDataset(self.train_data, c.audio_window, c.future_rows), batch_sampler=sampler,
            num_workers=workers,
            pin_memory=self.device.type == "cuda", generator=torch.Generator().manual_seed(self.config.seed),
            **kwargs)

    # --- writing
    def model_info(self) -> ModelInfo:
        return ModelInfo(spec=self.model.spec, encoder_name=self.train_data.encoder_name, width=self.width,
                         height=self.height, dataset=str(self.dataset_dir), n_train_frames=len(self.train_data),
                         step=self.step, dataset_source=dataset_source(self.dataset_dir))

    def pose_sources(self) -> PoseSources:
        t, v = self.train_data, self.val_data
        return PoseSources(frame_ids=np.concatenate([t.frame_ids, v.frame_ids]),
                           audio_ids=np.concatenate([t.audio_ids, v.audio_ids]),
                           viewmats=np.concatenate([t.viewmats, v.viewmats]), K=t.K,
                           au45=np.concatenate([t.au45, v.au45]), n_train=len(t))

    def save_checkpoint(self) -> Path:
        """Full training state + the inference files, atomically; keeps the newest `keep_checkpoints`. Refuses
        (EgstalkerError) parameters that are no longer finite: a finite loss can still give NaN gradients, and
        the checkpoint kept must be a good one."""
        model_state = self.model.state_dict()
        bad = [name for name, value in model_state.items()
               if value.is_floating_point() and not bool(torch.isfinite(value).all())]
        if bad:
            raise EgstalkerError(
                f"training diverged before iteration {self.step}: {', '.join(bad[:3])} hold NaN or infinite values; "
                f"the last good checkpoint {self.latest_checkpoint()} is kept: lower the learning rates (optim.* in "
                f"{self.model_dir / 'train_config.json'}) and run again with --resume")
        state = {
            "version": CHECKPOINT_VERSION, "step": self.step, "spec": self.model.spec.to_json(),
            "model": model_state, "optimizer": self.optimizer.state_dict(),
            "strategy": self.strategy.state_dict(), "rng": _rng_state(), "config": to_dict(self.config),
            "gaussian_counts": self.gaussian_counts,
        }
        if self.probe is not None:
            state["probe"] = self.probe.state_dict()
        self.model.spec.n_gaussians = len(self.model.gaussians)
        state["spec"] = self.model.spec.to_json()
        path = self.checkpoint_dir / f"step_{self.step:07d}.pt"
        atomic_torch_save(state, path)
        write_model(self.model_dir, self.model, self.model_info(), self.pose_sources())
        for old in sorted(self.checkpoint_dir.glob("step_*.pt"))[:-max(1, self.config.schedule.keep_checkpoints)]:
            old.unlink()
        return path

    # --- evaluation
    @torch.no_grad()
    def evaluate(self, n_frames: int | None = None) -> dict[str, float]:
        """Mean PSNR over (up to n_frames evenly spaced) held-out frames: 'psnr' on the full image, 'psnr_head'
        inside the head mask (the part the model renders; the rest is the dataset's torso/background)."""
        self.model.eval()
        data = self.val_data
        faces = data.face_frames()
        n = len(faces) if n_frames is None else min(n_frames, len(faces))
        picks = faces[np.unique(np.linspace(0, len(faces) - 1, n).round().astype(int))]
        dataset = FrameDataset(data, self.config.data.audio_window, self.config.data.future_rows)
        values, head_values = [], []
        dynamic = self.step > self.config.coarse_iterations
        bs = self.config.data.batch_size
        for i in range(0, len(picks), bs):
            samples = [dataset[int(k)] for k in picks[i:i + bs]]
            batch = _to_device(torch.utils.data.default_collate(samples), self.device)
            out = self._render(batch, dynamic)
            for b in range(out.image.shape[0]):
                values.append(psnr(out.image[b], batch["image"][b]))
                mask = batch["head_mask"][b, ..., 0] > 0.5
                if mask.any():
                    head_values.append(psnr(out.image[b][mask], batch["image"][b][mask]))
        scores = {"psnr": float(np.mean(values)), "psnr_head": float(np.mean(head_values)) if head_values else 0.0}
        if self.probe is not None:
            scores["mouth_probe_corr"] = self._probe_correlation()
        self.model.train()
        return scores

    @torch.no_grad()
    def _probe_correlation(self) -> float:
        """How well the adapter's code predicts the held-out frames' inner-lip gap (through the probe)."""
        data = self.val_data
        if self._val_mouth_shapes is None:
            self._val_mouth_shapes = split_mouth_shapes(data)
        c = self.config.data
        windows = np.stack([data.audio_window(int(a), c.audio_window, c.future_rows)
                            for a in data.audio_ids[data.face_frames()]])  # the frames split_mouth_shapes reads
        codes = self.model.deformation.token_encoder.audio(torch.from_numpy(windows).to(self.device))
        predicted = self.probe(codes).cpu().numpy()
        return probe_correlation(predicted, self._val_mouth_shapes)

    def _render(self, batch: dict, dynamic: bool, track: bool = False):
        return self.model.render(batch["viewmat"], batch["K"], self.width, self.height, batch["background"],
                                 audio=batch["audio"], au45=batch["au45"], dynamic=dynamic, backend=self.backend,
                                 track_means2d_grad=track)

    # --- the loop
    def compute_loss(self, out, batch: dict, step: int, dynamic: bool) -> tuple[torch.Tensor, dict]:
        lc = self.config.loss
        pred = out.image.permute(0, 3, 1, 2)
        gt = batch["image"].permute(0, 3, 1, 2)
        terms = {"l1": losses.l1(pred, gt), "dssim": losses.d_ssim(pred, gt),
                 "lip_l1": losses.crop_l1(pred, gt, batch["lip_box"]),
                 "alpha": (out.alpha - batch["head_mask"]).abs().mean()}
        weights = {"l1": lc.l1, "dssim": lc.dssim, "lip_l1": lc.lip_l1, "alpha": lc.alpha}
        if lc.perceptual > 0 and step > lc.perceptual_from * self.config.schedule.iterations:
            if self._perceptual is None:
                with torch.random.fork_rng(devices=[]):  # building VGG must not shift the training RNG (resume)
                    self._perceptual = losses.PerceptualLoss().to(self.device).eval()
            terms["perceptual"] = self._perceptual(pred, gt)
            weights["perceptual"] = lc.perceptual
        if self.probe is not None:
            # a second pass of the small audio adapter (B windows, negligible beside rendering) keeps the model's
            # forward free of training-only outputs
            codes = self.model.deformation.token_encoder.audio(batch["audio"])
            terms["mouth_probe"] = self.probe.loss(codes, batch["mouth_shape"])
            weights["mouth_probe"] = lc.mouth_probe
        if dynamic and lc.plane_tv > 0:
            terms["plane_tv"] = self.model.deformation.field.total_variation()
            weights["plane_tv"] = lc.plane_tv
        total = sum(weights[k] * terms[k] for k in terms)
        return total, terms

    def _out_of_memory_message(self, step: int, last_good: Path | None) -> str:
        """What ran out, how full the card was, and the three ways on."""
        c = self.config
        what = (f"{len(self.model.gaussians):,} Gaussians, {c.data.batch_size} frames of {self.width}x{self.height} "
                "a step")
        if self.device.type == "cuda":
            total = torch.cuda.get_device_properties(self.device).total_memory / 2**30
            held = torch.cuda.max_memory_reserved(self.device) / 2**30
            what += f"; this run held {held:.1f} GiB of the card's {total:.1f}"
        return (f"the GPU ran out of memory at iteration {step} ({what}); the last checkpoint {last_good} is "
                f"kept: close other programs using the GPU, or in {self.model_dir / 'train_config.json'} set "
                "model.recompute_chunk_rows to 131072 (about 1-2.5 GiB less, a tenth to a fifth slower) or lower "
                "data.batch_size, and run again with --resume, or train a new model with a smaller --resolution")

    def _set_iterations(self, n: int) -> None:
        c = self.config
        c.schedule.iterations = n
        self.strategy.stop = c.densify_stop
        self.strategy.reset_until = c.coarse_iterations

    def _fit_time_budget(self, remaining_s: float, per_step_s: float, safety: float) -> int:
        """Fit the iteration count to the time left at `per_step_s`: fewer when the run is slower than the last
        fit assumed, more (up to the count asked for) when it is faster, as when the cautious first fit made in
        the fast coarse stage proves too short. Growing never undoes a stage already reached, and never raises a
        learning rate above its value at the last fit."""
        c = self.config
        fitted = self.step + int(max(0.0, remaining_s) / max(per_step_s, 1e-6) * safety)
        fitted = min(fitted, self.planned_iterations)
        if self._last_fit_step > 0:
            # the rates decay with step / count (and the fine stage's share of it): at most count * step / last
            # keeps that fraction at or above its value at the last fit
            fitted = min(fitted, c.schedule.iterations * self.step // self._last_fit_step)
        self._last_fit_step = self.step
        fitted = keep_reached_stages(c, c.schedule.iterations, fitted, self.step)
        if fitted != c.schedule.iterations:
            self._set_iterations(fitted)
            save_config(c, self.model_dir / "train_config.json")
        return c.schedule.iterations

    def run(self) -> TrainResult:
        c = self.config
        end = c.schedule.iterations
        from torch.utils.tensorboard import SummaryWriter

        # a resumed run drops what an interrupted one logged after its checkpoint: no step is logged twice
        writer = SummaryWriter(str(self.model_dir / "logs"), purge_step=self.step + 1 if self.step else None)
        if self.step == 0:
            self.save_checkpoint()
        if self._rng_to_restore is not None:
            _set_rng_state(self._rng_to_restore)
        start_step, t0 = self.step, time.perf_counter()
        progress = None
        if self.show_progress and end > self.step:
            from tqdm import tqdm

            progress = tqdm(total=end, initial=self.step, desc="training", unit="it", dynamic_ncols=True)
        self.model.train()
        last_good = self.latest_checkpoint()
        budget = c.schedule.time_budget_minutes
        probe_at = start_step + c.schedule.budget_probe if budget else None
        budget_mark = (t0, start_step)
        step = self.step + 1  # the iteration under way (named if the GPU runs out of memory)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)  # this run's peak, not the process's
        try:
            for batch in (self._loader(self.step, None) if end > self.step else []):
                if self.step >= end:
                    break
                step = self.step + 1
                batch = _to_device(batch, self.device)
                dynamic = step > c.coarse_iterations
                update_learning_rates(self.optimizer, c, self.model.spec.head_radius, step)
                track = self.strategy.pre_backward(step)
                out = self._render(batch, dynamic, track)
                loss, terms = self.compute_loss(out, batch, step, dynamic)
                loss_value = float(loss.item())
                if not math.isfinite(loss_value) or loss_value > c.loss.max_loss:
                    raise EgstalkerError(
                        f"training diverged at iteration {step} (loss {loss_value:.4g}); the last good checkpoint "
                        f"{last_good} is kept: lower the learning rates (optim.* in {self.model_dir / 'train_config.json'}) "
                        "and run again with --resume")
                loss.backward()
                info = self.strategy.post_backward(step, self.model.gaussians, self.optimizer, out.raster,
                                                   self.width, self.height)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.step = step
                n = len(self.model.gaussians)
                if info or step % c.schedule.log_every == 0:
                    self.gaussian_counts.append((step, n))
                if step % c.schedule.log_every == 0 or step == end:
                    for k, v in terms.items():
                        writer.add_scalar(f"loss/{k}", float(v.detach()), step)
                    writer.add_scalar("loss/total", loss_value, step)
                    writer.add_scalar("train/psnr", psnr(out.image.detach(), batch["image"]), step)
                    writer.add_scalar("gaussians/count", n, step)
                    if self.device.type == "cuda":
                        writer.add_scalar("gpu/peak_memory_gib", torch.cuda.max_memory_allocated(self.device) / 2**30,
                                          step)
                    writer.add_scalar("train/stage_fine", float(dynamic), step)
                if c.schedule.image_every and (step % c.schedule.image_every == 0 or step == end):
                    side = torch.cat([out.image[0].detach(), batch["image"][0]], dim=1).clamp(0, 1)
                    writer.add_image("train/render_vs_gt", side.cpu(), step, dataformats="HWC")
                if c.schedule.eval_every and step % c.schedule.eval_every == 0 and step < end:
                    scores = self.evaluate(c.schedule.eval_frames)
                    writer.add_scalar("val/psnr", scores["psnr"], step)
                    writer.add_scalar("val/psnr_head", scores["psnr_head"], step)
                    if "mouth_probe_corr" in scores:
                        writer.add_scalar("val/mouth_probe_corr", scores["mouth_probe_corr"], step)
                if step % c.schedule.checkpoint_every == 0 and step < end:
                    last_good = self.save_checkpoint()
                if probe_at is not None and step >= probe_at and (step == probe_at or step % 100 == 0):
                    # Fit the count to the time left, from the speed of the last steps (the fine stage and the
                    # perceptual term are slower than the first steps, so it is re-fitted as they start).
                    now = time.perf_counter()
                    if step == probe_at:
                        per_step = (now - t0) / max(1, step - start_step)
                    else:
                        per_step = (now - budget_mark[0]) / max(1, step - budget_mark[1])
                    budget_mark = (now, step)
                    safety = 0.5 if step <= c.coarse_iterations else 0.95
                    end = self._fit_time_budget(budget * 60.0 - (now - t0), per_step, safety)
                    if progress is not None:
                        progress.total = end
                        progress.refresh()
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(loss=f"{loss_value:.4f}", gaussians=n, stage="fine" if dynamic else "coarse")
        except torch.cuda.OutOfMemoryError:
            raise EgstalkerError(self._out_of_memory_message(step, last_good)) from None
        finally:
            if progress is not None:
                progress.close()
        seconds = time.perf_counter() - t0
        if self.step > start_step or self.step == 0:
            self.save_checkpoint()
        else:  # a finished run resumed: write the model files again from its last checkpoint (repairs a damaged one)
            write_model(self.model_dir, self.model, self.model_info(), self.pose_sources())
        scores = self.evaluate(c.schedule.eval_frames)
        writer.add_scalar("val/psnr", scores["psnr"], self.step)
        writer.add_scalar("val/psnr_head", scores["psnr_head"], self.step)
        if "mouth_probe_corr" in scores:
            writer.add_scalar("val/mouth_probe_corr", scores["mouth_probe_corr"], self.step)
        writer.add_scalar("gaussians/count", len(self.model.gaussians), self.step)
        writer.close()
        steps_done = self.step - start_step
        return TrainResult(model_dir=self.model_dir, steps=self.step, n_gaussians=len(self.model.gaussians),
                           val_psnr=scores["psnr"], val_psnr_head=scores["psnr_head"],
                           val_mouth_probe_corr=scores.get("mouth_probe_corr"), seconds=seconds,
                           iterations_per_second=steps_done / seconds if seconds > 0 and steps_done else 0.0,
                           gaussian_counts=list(self.gaussian_counts), steps_this_run=steps_done,
                           peak_gpu_memory_gib=(torch.cuda.max_memory_allocated(self.device) / 2**30
                                                if self.device.type == "cuda" else None))


def train(dataset_dir: str | Path, model_dir: str | Path, config: TrainConfig | None = None,
          device: str | torch.device | None = "cpu", resume: bool = False, show_progress: bool = True,
          backend: str = "auto") -> TrainResult:
    """Train (or resume) a talking head on a preprocessed dataset; write the model folder. See the module doc.

    config: default TrainConfig(), the GPU defaults (6,000 iterations at the dataset's size); for a CPU-sized run
    pass `egstalker.train.config.preset_config("preview", "cpu")`, as `egstalker train` does on a CPU. With
    resume, None continues the saved run as it was; a config given changes only its length (schedule.iterations
    and schedule.time_budget_minutes)."""
    from egstalker.devices import resolve_device

    model_dir = Path(model_dir)
    if model_dir.resolve().is_relative_to(Path(dataset_dir).resolve()):
        raise EgstalkerError("the model folder must be a folder of its own, outside the dataset folder "
                             f"{dataset_dir} (-o MODEL_DIR)")
    if config is not None and not isinstance(config, TrainConfig):
        raise EgstalkerError(f"config must be a TrainConfig (egstalker.train.config), not {type(config).__name__}; "
                             "load a JSON one with egstalker.configs.load_config(TrainConfig, PATH)")
    device = resolve_device(None if device is None else str(device), "device")  # "auto": cuda when there is one
    config = copy.deepcopy(config)  # a budgeted run fits its count: the caller's object stays as given
    created = not model_dir.exists()
    try:
        trainer = Trainer(dataset_dir, model_dir, config, device=device, resume=resume,
                          show_progress=show_progress, backend=backend)
        return trainer.run()
    except (EgstalkerError, KeyboardInterrupt):
        if created and not any(model_dir.glob("checkpoints/step_*.pt")):  # nothing to resume: leave no folder
            shutil.rmtree(model_dir, ignore_errors=True)
        raise


__all__ = ["Trainer", "TrainResult", "train", "IterationBatchSampler", "make_optimizer"]
