"""`egstalker render MODEL_DIR --audio SPEECH`: a lip-synced mp4 (H.264 + AAC) as long as the speech."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "render a talking-head video driven by new speech (mp4 with the audio muxed in)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="model folder written by `egstalker train`")
    parser.add_argument("--audio", required=True, metavar="SPEECH",
                        help="speech to drive the head: any common audio file (wav, mp3, m4a, flac, ogg) or a "
                             "video with sound, any sample rate")
    parser.add_argument("-o", "--output", metavar="OUT.mp4",
                        help="output video (default: <model folder name>_<audio name>.mp4 in the current folder)")
    parser.add_argument("--pose", choices=["loop", "static", "dataset"], default="loop",
                        help="head pose/torso source: 'loop' ping-pongs over the training frames (default), "
                             "'static' holds one pose, 'dataset' plays the training frames in order")
    parser.add_argument("--background", default="dataset", metavar="dataset|PATH|COLOR",
                        help="'dataset' (the filmed background, default), an image file, or a colour "
                             "(black, white, green, blue, grey, #rrggbb, r,g,b)")
    parser.add_argument("--device", default=None, help="torch device, e.g. cuda, cuda:1, cpu (default: cuda if "
                                                       "available)")
    parser.add_argument("--frames-dir", metavar="DIR", help="also write every frame as a PNG into DIR")
    parser.add_argument("--batch-size", type=int, default=8, help="frames per model call (default 8)")
    parser.add_argument("--dataset", metavar="DIR", default=None,
                        help="the dataset the model was trained on (torso/background source), if it moved")
    parser.add_argument("--no-video", action="store_true", help="write only the PNG frames (needs --frames-dir)")
    add_audio_weights_argument(parser)


def add_audio_weights_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--audio-weights", metavar="PATH", default=None,
                        help="the audio encoder's weights, if the dataset was preprocessed with --audio-weights and "
                             "they moved (default: the path preprocess recorded, else the encoder's default)")


def default_output(model_dir: str | Path, audio: str | Path) -> Path:
    return Path(f"{Path(model_dir).resolve().name}_{Path(audio).stem}.mp4")


def run(args: argparse.Namespace) -> int:
    from egstalker.devices import resolve_device
    from egstalker.errors import EgstalkerError
    from egstalker.inference import TalkingHead
    from egstalker.render.api import check_frames_dir, load_speech, parse_background, render_to_file
    from egstalker.render.video import check_video_output

    if args.no_video and not args.frames_dir:
        raise EgstalkerError("--no-video needs --frames-dir DIR (otherwise nothing would be written)")
    if args.no_video and args.output:
        raise EgstalkerError("--no-video writes no video, so -o has nothing to name; drop one of them")
    if args.batch_size < 1:
        raise EgstalkerError("--batch-size must be at least 1")
    if args.frames_dir:
        check_frames_dir(args.frames_dir)
    parse_background(args.background, 2, 2)  # a bad colour or image before the model loads
    load_speech(args.audio)  # check the audio and the output before the (slower) model load
    output = None if args.no_video else Path(args.output) if args.output else default_output(args.model_dir,
                                                                                              args.audio)
    if output is not None:
        check_video_output(output, inputs=(args.audio,))
    head = TalkingHead.from_dir(args.model_dir, device=resolve_device(args.device), dataset_dir=args.dataset,
                                audio_weights=args.audio_weights)
    result = render_to_file(head, args.audio, output, pose=args.pose, background=args.background,
                            frames_dir=args.frames_dir, batch_size=args.batch_size)
    where = ", ".join(str(p) for p in (result.path, result.frames_dir) if p is not None)
    print(f"wrote {result.n_frames} frames ({result.audio_seconds:.2f} s at {head.fps:g} fps, "
          f"{head.width}x{head.height}) to {where} in {result.render_seconds:.1f} s ({result.fps:.1f} frames/s)")
    return 0
