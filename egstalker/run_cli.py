"""`egstalker run VIDEO --audio SPEECH`: preprocess, train and render in one command (finished stages are reused)."""

from __future__ import annotations

import argparse

from egstalker.train.config import QUALITY_PRESETS

HELP = "the whole pipeline: film of a person speaking + new speech -> lip-synced video (reuses finished stages)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("video", metavar="VIDEO", help="a few minutes of one person speaking to the camera, "
                                                       "with sound")
    parser.add_argument("--audio", required=True, metavar="SPEECH", help="new speech to lip-sync (any audio file)")
    parser.add_argument("-o", "--output", metavar="OUT.mp4",
                        help="output video (default: beside VIDEO, <video>_<speech>.mp4)")
    parser.add_argument("--dataset", metavar="DIR",
                        help="dataset folder (default: VIDEO without its extension, as preprocess names it)")
    parser.add_argument("--model", metavar="DIR", help="model folder (default: <dataset>_model)")
    parser.add_argument("--iterations", type=int, default=None, help="training iterations (default: the "
                                                                     "training config's)")
    parser.add_argument("--resolution", type=int, default=None, metavar="PX",
                        help="train and render at this size of the longer side (default: the dataset's framed size, at "
                             "most 512; 128 with the CPU's preview)")
    parser.add_argument("--quality", choices=QUALITY_PRESETS, default="auto",
                        help="training preset: 'full' (GPU defaults), 'preview' (CPU-sized: 128 px, about 10 "
                             "minutes of training on 2 cores), 'auto' (default: preview on the CPU, full on a GPU)")
    parser.add_argument("--audio-features", metavar="NAME",
                        help="audio encoder of the dataset: whisper (default, best lip sync), mel (lowest live "
                             "latency), ... (see `egstalker preprocess --help`); a re-run keeps the dataset's")
    parser.add_argument("--audio-weights", metavar="PATH",
                        help="the audio encoder's weights, as for `egstalker preprocess` (wav2vec2/hubert: a model "
                             "folder; deepspeech: the aud_ds.npy to import; whisper: another model.bin)")
    parser.add_argument("--pose", choices=["loop", "static", "dataset"], default="loop",
                        help="head pose of the render (default loop)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    parser.add_argument("--quiet", action="store_true", help="no progress display")


def run(args: argparse.Namespace) -> int:
    from egstalker.devices import resolve_device
    from egstalker.pipeline_run import apply_training_overrides, run_pipeline
    from egstalker.train.config import describe_length, preset_config, resolve_quality

    device = resolve_device(args.device)

    config = apply_training_overrides(preset_config(args.quality, device), args.iterations, args.resolution)
    if args.quality == "auto" and resolve_quality("auto", device) == "preview" and not args.quiet:
        print(f"egstalker run: no GPU here; training with the 'preview' preset ({describe_length(config)}); "
              "--quality full for the GPU defaults")
    result = run_pipeline(args.video, args.audio, args.output, dataset_dir=args.dataset, model_dir=args.model,
                          iterations=args.iterations, resolution=args.resolution, device=device, pose=args.pose,
                          show_progress=not args.quiet, config=config, audio_features=args.audio_features,
                          audio_weights=args.audio_weights)
    print(result.summary())
    return 0
