"""`egstalker train DATASET -o MODEL_DIR`: fit an audio-driven Gaussian head to a preprocessed dataset."""

from __future__ import annotations

import argparse
from pathlib import Path

from egstalker.train.config import QUALITY_PRESETS

HELP = "train a talking head on a preprocessed dataset (writes a model folder)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", metavar="DATASET", help="dataset folder made by `egstalker preprocess`")
    parser.add_argument("-o", "--output", required=True, metavar="MODEL_DIR",
                        help="model folder to write (config, checkpoints, logs, weights)")
    parser.add_argument("--iterations", type=int, default=None,
                        help="training iterations (default: the preset's: 6000 with 'full', as many as fit 10 minutes "
                             "with 'preview'); 0 writes the untrained model")
    parser.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    parser.add_argument("--resolution", type=int, default=None, metavar="PX",
                        help="train at this size of the longer image side, at most the dataset's (default: the dataset's on a "
                             "GPU, 128 with the CPU's preview preset)")
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="JSON TrainConfig (e.g. a model folder's train_config.json); flags override it")
    parser.add_argument("--quality", choices=QUALITY_PRESETS, default="auto",
                        help="'full': the GPU defaults; 'preview': a CPU-sized run (128 px, <= 20k Gaussians, "
                             "~10 min on 2 cores); 'auto' (default): preview on the CPU, full on a GPU. "
                             "Ignored with --config; --iterations (which also lifts the time budget) and --resolution override it")
    parser.add_argument("--resume", action="store_true", help="continue the run in MODEL_DIR exactly where it stopped")
    parser.add_argument("--workers", type=int, default=None,
                        help="data loading worker processes (default 6, 2 with 'preview'; at most one per CPU)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from egstalker.configs import load_config
    from egstalker.devices import resolve_device
    from egstalker.train.config import TrainConfig, describe_length, preset_config, resolve_quality
    from egstalker.train.trainer import train

    device = resolve_device(args.device)
    if args.resume:
        # a resume continues the saved run (train_config.json, or its checkpoint's copy), changed only by an
        # explicit --iterations
        ignored = [flag for flag, given in (("--config", args.config), ("--resolution", args.resolution),
                                            ("--quality", args.quality != "auto"),
                                            ("--workers", args.workers is not None)) if given]
        if ignored and not args.quiet:
            print(f"egstalker train: {', '.join(ignored)} ignored with --resume: the run continues with its saved "
                  f"config, {Path(args.output) / 'train_config.json'} (edit it to change a setting such as the "
                  "learning rates)")
        config = TrainConfig() if args.iterations is not None else None  # only its length is read
    else:
        config = load_config(TrainConfig, args.config) if args.config else preset_config(args.quality, device)
        if args.resolution is not None:
            config.data.resolution = args.resolution
        if args.workers is not None:
            config.data.num_workers = args.workers
    if args.iterations is not None:  # an explicit count is trained in full, whatever the time
        config.schedule.iterations = args.iterations
        config.schedule.time_budget_minutes = None
    if not args.resume and not args.config and not args.quiet and str(device).startswith("cpu"):
        if resolve_quality(args.quality, device) == "preview":
            print(f"egstalker train: training on the CPU with the 'preview' preset ({describe_length(config)}); "
                  "--quality full for the GPU defaults")
        else:
            print(f"egstalker train: training the GPU defaults on the CPU ({describe_length(config)}): many times "
                  "longer than on a GPU, as the progress bar's estimate will show after a few iterations; "
                  "--quality preview trains a 128 px model in about 10 minutes")
    result = train(args.dataset, args.output, config, device=device, resume=args.resume,
                   show_progress=not args.quiet)
    psnr = (f"{result.val_psnr:.2f} dB (head {result.val_psnr_head:.2f} dB)" if result.val_psnr is not None
            else "n/a")
    memory = f", peak GPU memory {result.peak_gpu_memory_gib:.1f} GiB" if result.peak_gpu_memory_gib else ""
    rate = result.iterations_per_second
    speed = f"{rate:.1f} it/s" if rate >= 1 or not rate else f"{1 / rate:.1f} s/it"
    if args.resume and not result.steps_this_run:
        print(f"nothing left to train: the run had finished at iteration {result.steps} (give a larger --iterations "
              f"to extend it); model files written again to {result.model_dir}: {result.n_gaussians} Gaussians, "
              f"held-out PSNR {psnr}")
    else:
        print(f"model written to {result.model_dir}: {result.steps} iterations, {result.n_gaussians} Gaussians, "
              f"held-out PSNR {psnr}, {result.seconds:.0f} s ({speed}){memory}")
    if result.val_mouth_probe_corr is not None:
        print(f"held-out mouth opening predicted from the audio alone (the mouth probe): correlation "
              f"{result.val_mouth_probe_corr:.2f}")
    return 0
