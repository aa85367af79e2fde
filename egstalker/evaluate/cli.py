"""`egstalker eval MODEL_DIR`: self-reenactment metrics on the held-out frames (and an HTML report)."""

from __future__ import annotations

import argparse
import json
import math
import sys

HELP = "score a model on its held-out frames: PSNR, SSIM, LPIPS, mouth LMD and correlation, frames/s"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="model folder written by `egstalker train`")
    parser.add_argument("--split", choices=["val", "train"], default="val",
                        help="'val': the held-out last 1/11 of the clip (default); 'train': the training frames")
    parser.add_argument("--json", action="store_true", help="print one JSON object (keys psnr, ssim, lpips, lmd, "
                                                            "mouth_corr, fps, ...) and nothing else on stdout")
    parser.add_argument("--report", metavar="DIR", help="write an HTML report (index.html, frames, video) to DIR")
    parser.add_argument("--max-frames", type=int, default=None, help="evaluate only the first N frames")
    parser.add_argument("--lpips-net", choices=["alexnet", "vgg16"], default="alexnet",
                        help="LPIPS backbone (default alexnet, what papers usually report)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    parser.add_argument("--batch-size", type=int, default=8, help="frames per model call (default 8)")
    parser.add_argument("--lipsync-controls", action="store_true",
                        help="also score the mouth with every frame in one pose (it can follow only the audio) and "
                             "with audio 2 s later (it should not follow that): renders the frames 3 times")
    parser.add_argument("--dataset", metavar="DIR", default=None,
                        help="the dataset the model was trained on, if it moved since training")


def run(args: argparse.Namespace) -> int:
    from egstalker.devices import resolve_device
    from egstalker.evaluate.evaluate import evaluate
    from egstalker.evaluate.report import check_report_dir
    from egstalker.inference import TalkingHead

    if args.report:
        check_report_dir(args.report)  # before the model loads
    # the held-out frames come with their dataset's audio features: the encoder itself is not needed
    head = TalkingHead.from_dir(args.model_dir, device=resolve_device(args.device), dataset_dir=args.dataset,
                                check_encoder=False)
    result = evaluate(head, split=args.split, max_frames=args.max_frames, batch_size=args.batch_size,
                      lpips_net=args.lpips_net, report_dir=args.report, show_progress=not args.json,
                      lipsync_controls=args.lipsync_controls)
    if args.json:
        print(json.dumps(result.to_json()))
        return 0
    from egstalker.metrics import MIN_CORRELATION_FRAMES

    r = result
    print(f"{args.model_dir} on {r.n_frames} {r.split} frames ({r.width}x{r.height}, {r.device}):")
    print(f"  PSNR {r.psnr:.2f} dB   SSIM {r.ssim:.4f}   LPIPS-{r.lpips_net} {r.lpips:.4f}")
    interval = (f"95% interval {r.mouth_corr_low:.2f} to {r.mouth_corr_high:.2f}"
                if math.isfinite(r.mouth_corr_low) and math.isfinite(r.mouth_corr_high)
                else "too few frames for an interval")
    corr = (f"{r.mouth_corr:.3f} ({interval}; {r.mouth_frames} frames with faces)" if math.isfinite(r.mouth_corr)
            else f"n/a ({r.mouth_frames} frames with faces; it needs {MIN_CORRELATION_FRAMES} with a moving mouth)")
    print(f"  LMD {r.lmd:.4f} of eye distance ({r.lmd_px:.2f} px)   mouth-opening corr {corr}")
    if args.lipsync_controls:
        print(f"  lip-sync controls: mouth corr {r.mouth_corr_frozen_pose:.3f} with every frame in one pose (follows "
              f"the audio only), {r.mouth_corr_shifted_audio:.3f} with audio 2 s later (should be near 0)")
    print(f"  model speed {r.fps:.1f} frames/s")
    if args.report:
        print(f"  report: {args.report}/index.html", file=sys.stdout)
    return 0
