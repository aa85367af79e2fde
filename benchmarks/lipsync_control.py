"""Does a trained head's mouth follow the audio, and how well does it fit what it was trained on?

Renders four sets of frames and scores mouth opening against the ground truth
(MediaPipe landmarks; 95% block-bootstrap intervals, egstalker.metrics.correlation_interval):
  val          held-out frames with their own audio (the number the quality benchmark reports)
  val_shifted  the same frames driven by audio from --shift-seconds later: if the mouth follows the audio this
               collapses towards 0; if it stays high the mouth follows something else (pose, blink, memory)
  train        the last --frames training frames: how well the model fits audio it has seen (the gap to val is
               what more speech would buy)
  val_static_pose  held-out audio, every frame rendered with the first held-out frame's pose, eye blink and
               torso: the mouth can follow only the audio, as it must when new speech drives looped poses

    python benchmarks/lipsync_control.py MODEL_DIR --dataset DATASET [--device cuda] [--json OUT.json]
    python benchmarks/lipsync_control.py MODEL_DIR --dataset DATASET --save-renders R.npz   # GPU, no MediaPipe
    python benchmarks/lipsync_control.py --from-renders R.npz --dataset DATASET --json OUT.json   # then here

`egstalker eval --lipsync-controls` computes val_static_pose and val_shifted in one process (MediaPipe and the
model on one machine); this script splits rendering from scoring for a GPU machine without MediaPipe.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from egstalker import metrics  # noqa: E402
from egstalker.evaluate.evaluate import heldout_frames, load_ground_truth  # noqa: E402
from egstalker.inference import TalkingHead  # noqa: E402


def finite(value: float, digits: int = 3) -> float | None:
    """Rounded, or None for NaN (strict JSON)."""
    return round(float(value), digits) if np.isfinite(value) else None


def render(head: TalkingHead, features: np.ndarray, rows: np.ndarray, poses: np.ndarray, batch: int) -> np.ndarray:
    return np.concatenate([head.render_frames(features, rows[i:i + batch], poses[i:i + batch])
                           for i in range(0, len(rows), batch)])


def render_sets(args) -> tuple[dict, dict]:
    """Render the sets; returns ({name: (frame_ids, uint8 frames, audio shift, seconds)}, run info)."""
    head = TalkingHead.from_dir(args.model_dir, device=args.device, dataset_dir=args.dataset, check_encoder=False)
    val, train = heldout_frames(head, "val"), heldout_frames(head, "train")
    n = min(args.frames or len(val.frame_ids), len(val.frame_ids), len(train.frame_ids))
    shift = int(round(args.shift_seconds * head.fps))
    last_train = slice(len(train.frame_ids) - n, None)
    # name: (truth frame ids, their own audio rows, offset added to those rows, poses rendered with)
    sets = {"val": (val.frame_ids[:n], val.audio_ids[:n], 0, val.pose_indices[:n]),
            "val_shifted": (val.frame_ids[:n], val.audio_ids[:n], shift, val.pose_indices[:n]),
            "train": (train.frame_ids[last_train], train.audio_ids[last_train], 0, train.pose_indices[last_train]),
            "val_static_pose": (val.frame_ids[:n], val.audio_ids[:n], 0, np.full(n, val.pose_indices[0]))}
    out = {}
    for name in args.sets:
        frame_ids, audio_rows, offset, poses = sets[name]
        t0 = time.perf_counter()
        frames = render(head, val.features, (audio_rows + offset) % len(val.features), poses, args.batch)
        out[name] = (np.asarray(frame_ids, np.int64), frames, offset, time.perf_counter() - t0)
    info = {"device": args.device, "n_gaussians": int(head.model.gaussians.means.shape[0]),
            "shift_seconds": args.shift_seconds,
            "gpu_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor()}
    return out, info


def save_renders(path: Path, sets: dict, info: dict) -> None:
    """JPEG (quality 95) frames of every set in one .npz: small enough to come back from a device call."""
    blob = {"info": np.frombuffer(json.dumps(info).encode(), np.uint8)}
    for name, (frame_ids, frames, offset, seconds) in sets.items():
        blob[f"{name}/meta"] = np.array([offset, round(seconds * 1000)], np.int64)
        blob[f"{name}/frame_ids"] = frame_ids
        for i, frame in enumerate(frames):
            ok, data = cv2.imencode(".jpg", cv2.cvtColor(frame, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
            blob[f"{name}/{i}"] = data.ravel()
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **blob)
    tmp.replace(path)


def load_renders(path: Path) -> tuple[dict, dict]:
    blob = np.load(path)
    info = json.loads(bytes(blob["info"]).decode())
    sets = {}
    for name in sorted({k.split("/")[0] for k in blob.files if "/" in k}):
        offset, ms = blob[f"{name}/meta"]
        frame_ids = blob[f"{name}/frame_ids"]
        frames = np.stack([cv2.cvtColor(cv2.imdecode(blob[f"{name}/{i}"], cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
                           for i in range(len(frame_ids))])
        sets[name] = (frame_ids, frames, int(offset), ms / 1000)
    return sets, info


def score(sets: dict, dataset: Path) -> dict:
    from egstalker.dataset.reader import open_dataset

    # Renders of frames the dataset no longer holds (their sound is not in the recording once its audio offset
    # is corrected: meta.json split.frames_without_audio) are not scored.
    held = set(open_dataset(dataset, "all").frame_ids.tolist())
    results = {}
    with metrics.FaceLandmarks() as detector:
        for name, (frame_ids, frames, offset, seconds) in sets.items():
            keep = np.array([int(f) in held for f in frame_ids])
            if not keep.all():
                print(f"{name}: {int((~keep).sum())} frames without their sound in {dataset} left out", flush=True)
                frame_ids, frames = frame_ids[keep], frames[keep]
            truth = np.stack([load_ground_truth(dataset, f, frames.shape[2], frames.shape[1]) for f in frame_ids])
            mouth = metrics.mouth_metrics(frames, truth, detector)
            results[name] = {"frames": int(len(frame_ids)), "audio_shift_frames": offset,
                             "mouth_corr": finite(mouth.mouth_corr),
                             "mouth_corr_interval95": [finite(v) for v in mouth.mouth_corr_interval],
                             "lmd_px": round(mouth.lmd_px, 3),
                             "psnr": round(float(np.mean(metrics.psnr(frames, truth))), 2),
                             "render_s": round(seconds, 1)}
            print(name, json.dumps(results[name]), flush=True)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path, nargs="?", help="omit with --from-renders")
    parser.add_argument("--dataset", type=Path, required=True, help="the dataset the model was trained on")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--frames", type=int, default=None, help="frames per set (default: every held-out frame)")
    parser.add_argument("--shift-seconds", type=float, default=2.0)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--sets", nargs="+", default=["val", "val_shifted", "train", "val_static_pose"],
                        choices=["val", "val_shifted", "train", "val_static_pose"])
    parser.add_argument("--save-renders", type=Path, help="only render, into this .npz (a GPU machine without "
                                                            "MediaPipe); score it later with --from-renders")
    parser.add_argument("--from-renders", type=Path, help="score renders saved by --save-renders")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    if args.from_renders:
        sets, info = load_renders(args.from_renders)
    else:
        if args.model_dir is None:
            parser.error("give MODEL_DIR or --from-renders")
        sets, info = render_sets(args)
        if args.save_renders:
            save_renders(args.save_renders, sets, info)
            print(f"wrote {args.save_renders}: " + ", ".join(f"{k} {len(v[0])} frames" for k, v in sets.items()))
            return 0
    report = {"command": "python " + " ".join(sys.argv), **info, "sets": score(sets, args.dataset)}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=1))
        tmp.replace(args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
