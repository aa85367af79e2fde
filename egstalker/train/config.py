"""Training configuration: one dataclass tree, saved as `train_config.json` in every model folder.

Runtime values (the device, the dataset path) are passed when objects are built, never stored here.
Defaults are for a real run on one GPU; CPU tests override the schedule and sizes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from egstalker.errors import EgstalkerError


@dataclass
class DataConfig:
    resolution: int | None = None
    """Train at this size (pixels of the longer side); None keeps the dataset's size."""
    batch_size: int = 4
    """Frames per iteration (one shared deformation/rasterisation call)."""
    num_workers: int = 6
    """DataLoader worker processes streaming frames from disk (0 = load in the training process)."""
    prefetch_batches: int = 4
    """Batches each worker keeps ready: bounds the memory held by loading."""
    audio_window: int = 8
    """Audio feature frames each video frame reads."""
    audio_future: int | None = None
    """How many of them come after the frame; None: the centred window (3 of 8: frames -4..+3, what configs
    written before this field meant). Each future row adds 40 ms to the streaming latency (on top of the
    encoder's own look-ahead); fewer rows lose lip sync (docs/model.md, benchmarks/audio_mouth_ceiling.py)."""

    @property
    def future_rows(self) -> int:
        """audio_future, with None resolved to the centred window's."""
        from egstalker.audio.base import centred_future_rows

        return centred_future_rows(self.audio_window) if self.audio_future is None else int(self.audio_future)


@dataclass
class InitConfig:
    """Dense volumetric initialisation of the canonical Gaussians (see egstalker.model.init)."""

    n_frames: int = 12
    """Training frames (spread over the clip, so over head poses) whose head pixels are back-projected."""
    surface_points: int = 40000
    """Points on the visible head surface (head-mask pixels lifted to the depth of the tracked mesh)."""
    volume_points: int = 20000
    """Points filling the volume behind the visible surface (skull, hair, the sides of the head)."""
    volume_depth: float = 0.8
    """How deep behind the surface the volume points go, as a fraction of the head radius."""
    initial_opacity: float = 0.1


@dataclass
class ModelConfig:
    sh_degree: int = 1
    """Spherical-harmonic degree of the Gaussians' colour (0 = view-independent colour)."""
    plane_channels: int = 32
    """Channels of each hex-plane grid (features of the 3 planes are multiplied, scales concatenated)."""
    plane_resolutions: tuple[int, ...] = (64, 128)
    d_model: int = 64
    """Width of the per-frame tokens and of the spatial-audio attention."""
    n_heads: int = 4
    ffn_width: int = 128
    dropout: float = 0.1
    audio_width: int = 32
    """Per-frame width of the audio adapter's output (before the window attention)."""
    head_width: int = 128
    """Hidden width of the offset heads (position, scale, rotation, opacity, colour)."""
    audio_dropout: float = 0.0
    """Training only: dropout probability of each of the audio adapter's standardised input values, against
    overfitting the audio -> mouth map to a minute of speech. No measured gain on lieu (0.3: CPU probe readout
    0.715 vs 0.713, GPU renders the same on average), so off; docs/model.md "Three more tries"."""
    recompute_network: bool = True
    """Training only: compute the per-Gaussian network's activations again in the backward pass instead of
    keeping them (`DeformationNetwork.recompute_in_backward`). At the 150k-Gaussian cap on an H200 the peak fell
    from 6.2 to 3.9 GiB at 512x512 (4.1 -> 3.9 at 256) for one more forward pass of the network a step: 1-6 %
    fewer steps per second in three short same-call pairs, within those runs' noise (benchmarks/train_memory_gpu.py).
    The CPU preview, short of time rather than memory, turns it off."""
    recompute_chunk_rows: int = 0
    """With `recompute_network`: 0 recomputes the network for every Gaussian in one piece (a step's peak 3.9 GiB
    at the 150k cap, at any frame size up to 512 px); N recomputes it in chunks of at most N (frame, Gaussian) rows,
    for a card that cannot hold that. On an H200 at the cap, chunks of 131072 rows lowered the peak to 2.8 GiB at
    450 px and 1.4 GiB at 256 px, and cost 9 % and 20 % of the steps per second: more kernel launches
    (benchmarks/gpu_recheck.sh, results/train_memory_chunked_*_h200.json; docs/gpu.md "Training memory")."""
    pose_dropout: float = 0.0
    """Probability of hiding a training frame's pose token (so the mouth cannot key on memorised poses).
    Measured once on the H100 (with lip_l1 1.0, coarse 0.1): mouth corr obama 0.73 -> 0.90 but lieu
    0.69 -> 0.58 and PSNR -0.6/-1.2 dB (benchmarks/results/train_quality_h100_ablation_*): off by default."""


@dataclass
class DensifyConfig:
    start: int = 500
    """First iteration that densifies or prunes."""
    stop_fraction: float = 0.85
    """Densification stops after this fraction of all iterations (then the count is frozen to converge)."""
    every: int = 100
    grad_threshold: float = 0.0002
    """Mean screen-space gradient (normalised as in 3DGS) above which a Gaussian is cloned or split."""
    dense_fraction: float = 0.01
    """Gaussians larger than this fraction of the head radius are split, smaller ones cloned."""
    prune_opacity: float = 0.005
    max_scale_fraction: float = 0.5
    """Gaussians larger than this fraction of the head radius are pruned."""
    reset_opacity_every: int = 3000
    """Opacity reset period (coarse stage only; 0 = never)."""
    max_gaussians: int = 150000
    """Hard cap: densification stops adding once the count reaches it (bounds memory and render time)."""


@dataclass
class OptimConfig:
    means_lr: float = 1.6e-4
    """Position learning rate, times the head radius (as in 3DGS: scale-free)."""
    means_lr_final: float = 1.6e-6
    scales_lr: float = 5e-3
    quats_lr: float = 1e-3
    opacities_lr: float = 5e-2
    sh0_lr: float = 2.5e-3
    shN_lr: float = 1.25e-4
    planes_lr: float = 2e-3
    network_lr: float = 5e-4
    network_lr_final: float = 5e-5


@dataclass
class LossConfig:
    l1: float = 0.8
    dssim: float = 0.2
    lip_l1: float = 0.4
    """L1 on the lip box (landmarks 48-67), per pixel of the box: the mouth is small but matters most."""
    perceptual: float = 0.01
    """VGG16 perceptual term (0 disables it; it needs the offline VGG weights)."""
    perceptual_from: float = 0.3
    """Fraction of training after which the perceptual term is switched on (it is slow and fits detail)."""
    alpha: float = 0.1
    """L1 between the rendered head alpha and the head mask from parsing (keeps the head off the torso)."""
    plane_tv: float = 1e-4
    """Total-variation smoothness of the hex-plane grids."""
    mouth_probe: float = 0.05
    """Mean squared error of a linear readout from the audio adapter's code to the frame's tracked mouth shape
    (standardised lip gaps and width; `egstalker.train.mouth_probe`): direct lip-sync supervision for the audio
    path, training only. 0 disables it."""
    max_loss: float = 10.0
    """A loss above this (or NaN) stops training with an error, keeping the last good checkpoint."""


@dataclass
class ScheduleConfig:
    iterations: int = 6000
    coarse_fraction: float = 0.15
    """The first fraction of iterations trains the static head only (no deformation)."""
    checkpoint_every: int = 1000
    log_every: int = 50
    image_every: int = 500
    eval_every: int = 1000
    """Held-out PSNR every this many iterations (0 = only at the end)."""
    eval_frames: int = 16
    """Held-out frames used for the periodic PSNR."""
    keep_checkpoints: int = 2
    time_budget_minutes: float | None = None
    """If set, the iteration count is fitted (after `budget_probe` iterations and then every 100, from the
    measured speed; never above `iterations`, never undoing a stage already reached or raising a learning rate)
    so that the training loop ends within about this many minutes; the count reached is saved in
    train_config.json. (A budgeted run resumes, but not bit-exactly.)"""
    budget_probe: int = 200


@dataclass
class TrainConfig:
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    init: InitConfig = field(default_factory=InitConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    densify: DensifyConfig = field(default_factory=DensifyConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)

    def validate(self) -> "TrainConfig":
        """Raise EgstalkerError naming the first value that cannot work."""
        checks = [
            (self.schedule.iterations >= 0, "schedule.iterations must be >= 0"),
            (0.0 <= self.schedule.coarse_fraction <= 1.0, "schedule.coarse_fraction must be in [0, 1]"),
            (self.schedule.checkpoint_every > 0, "schedule.checkpoint_every must be > 0"),
            (self.data.batch_size >= 1, "data.batch_size must be >= 1"),
            (self.data.num_workers >= 0, "data.num_workers must be >= 0"),
            (self.data.audio_window >= 1, "data.audio_window must be >= 1"),
            (self.data.audio_window < 1 or 0 <= self.data.future_rows < self.data.audio_window,
             "data.audio_future must be >= 0 and smaller than data.audio_window"),
            (self.data.resolution is None or self.data.resolution >= 16, "data.resolution must be >= 16 pixels"),
            (self.init.surface_points + self.init.volume_points >= 100, "init needs >= 100 points in total"),
            (self.init.n_frames >= 1, "init.n_frames must be >= 1"),
            (self.model.sh_degree in (0, 1, 2, 3), "model.sh_degree must be 0..3"),
            (self.model.recompute_chunk_rows == 0 or self.model.recompute_chunk_rows >= 4096,
             "model.recompute_chunk_rows must be 0 (the network recomputed in one piece) or >= 4096 (131072 is "
             "the measured choice)"),
            (self.model.d_model % self.model.n_heads == 0, "model.d_model must be divisible by model.n_heads"),
            (all(0.0 <= getattr(self.model, k) < 1.0 for k in ("dropout", "audio_dropout", "pose_dropout")),
             "model.dropout, model.audio_dropout and model.pose_dropout must be in [0, 1)"),
            (len(self.model.plane_resolutions) >= 1, "model.plane_resolutions needs at least one resolution"),
            (self.densify.max_gaussians >= 100, "densify.max_gaussians must be >= 100"),
            (self.densify.every > 0, "densify.every must be > 0"),
            (self.densify.start >= 0 and self.densify.reset_opacity_every >= 0,
             "densify.start and densify.reset_opacity_every must be >= 0"),
            (0.0 <= self.densify.stop_fraction <= 1.0, "densify.stop_fraction must be in [0, 1]"),
            (self.schedule.log_every > 0, "schedule.log_every must be > 0"),
            (self.schedule.image_every >= 0 and self.schedule.eval_every >= 0,
             "schedule.image_every and schedule.eval_every must be >= 0 (0 turns them off)"),
            (self.schedule.eval_frames >= 1, "schedule.eval_frames must be >= 1"),
            (self.schedule.keep_checkpoints >= 1, "schedule.keep_checkpoints must be >= 1"),
            (self.data.prefetch_batches >= 1, "data.prefetch_batches must be >= 1"),
            (self.init.surface_points >= 0 and self.init.volume_points >= 0,
             "init.surface_points and init.volume_points must be >= 0"),
            (all(r >= 2 for r in self.model.plane_resolutions), "model.plane_resolutions must all be >= 2"),
            (self.loss.max_loss > 0, "loss.max_loss must be > 0"),
            (self.schedule.time_budget_minutes is None or self.schedule.time_budget_minutes > 0,
             "schedule.time_budget_minutes must be > 0 (or null)"),
        ]
        for ok, message in checks:
            if not ok:
                raise EgstalkerError(f"invalid training config: {message}")
        for name in ("l1", "dssim", "lip_l1", "perceptual", "alpha", "plane_tv", "mouth_probe"):
            if not getattr(self.loss, name) >= 0:
                raise EgstalkerError(f"invalid training config: loss.{name} must be >= 0 (0 turns the term off)")
        for name in ("means_lr", "scales_lr", "quats_lr", "opacities_lr", "sh0_lr", "planes_lr", "network_lr"):
            if not getattr(self.optim, name) > 0:
                raise EgstalkerError(f"invalid training config: optim.{name} must be > 0")
        return self

    @property
    def coarse_iterations(self) -> int:
        return int(round(self.schedule.iterations * self.schedule.coarse_fraction))

    @property
    def densify_stop(self) -> int:
        return int(self.schedule.iterations * self.densify.stop_fraction)


QUALITY_PRESETS = ("auto", "preview", "full")


def resolve_quality(quality: str, device: str | None) -> str:
    """'preview' or 'full': what 'auto' means on `device` (preview on the CPU, full on a GPU; device None or
    'auto': the one egstalker would pick)."""
    if quality not in QUALITY_PRESETS:
        raise EgstalkerError(f"unknown quality {quality!r}; use one of {', '.join(QUALITY_PRESETS)}")
    if quality == "auto":
        if device in (None, "auto"):
            from egstalker.devices import resolve_device

            device = resolve_device(device)
        return "preview" if str(device).startswith("cpu") else "full"
    return quality


def describe_length(config: TrainConfig) -> str:
    """'128 px, about 10 minutes' or '64 px, 30 iterations': the size and length a run will train, for messages."""
    budget = config.schedule.time_budget_minutes
    length = f"about {budget:g} minutes" if budget else f"{config.schedule.iterations} iterations"
    size = f"{config.data.resolution} px" if config.data.resolution else "the dataset's size"
    return f"{size}, {length}"


def preset_config(quality: str, device: str) -> TrainConfig:
    """The TrainConfig of a quality preset: 'full' (the defaults, sized for one GPU), 'preview' (a CPU-sized run:
    128 px, ~8k Gaussians growing to at most 20k, no VGG term, about 10 minutes of training on 2 cores, enough to
    see a lip-synced head), or 'auto' (see `resolve_quality`)."""
    config = TrainConfig()
    if resolve_quality(quality, device) == "full":
        return config
    config.data.resolution = 128
    config.data.batch_size = 2
    config.data.num_workers = 2
    config.init.surface_points, config.init.volume_points = 6000, 2000
    config.densify.start, config.densify.every, config.densify.max_gaussians = 100, 50, 20000
    config.loss.perceptual = 0.0
    config.model.recompute_network = False
    config.schedule.iterations = 3000
    config.schedule.time_budget_minutes = 10.0
    config.schedule.budget_probe = 30
    config.schedule.checkpoint_every = 200
    config.schedule.eval_every = 0
    config.schedule.image_every = 200
    return config
