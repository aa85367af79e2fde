"""Face parser (task 4) at the picture's edges: background beside the shoulders, black padding bars.

Per clip dataset (made by `egstalker preprocess CLIP -o DIR --task 1 --task 3 --task 4`, short cuts of the test
clips), the clip model is fitted on the same 40 sample frames as task 4, then N evenly spaced frames are parsed
with the parser under test and with a reference copy (the code before the change, `--reference FILE.py`).

Measures per clip (means over the N frames):
  torso           share of the frame labelled torso
  corner_far      share of the frame that is torso more than 1.6 face widths from the face centre
  corner_box      share of the frame that is torso in the bottom corner boxes (the bottom third of the rows,
                  the outer fifth of the columns on each side): where lieu's shelf and desk were torso
  person          share labelled anything but background
  agree_rest      agreement of the labels with the reference outside the corner boxes and padding bars
  torso_kept      of the reference's torso pixels outside the corner boxes and bars, the share still torso
  padding         share of the frame in black bars (any label there but background is wrong)
  padding_torso   share of the frame that is torso inside those bars

Usage: python benchmarks/parsing_edges.py --reference /tmp/parsing_old.py --datasets lieu=/tmp/pe/lieu ...
       [--frames 12] [--out benchmarks/results/parsing_edges.json] [--label after] [--segment]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import cv2
import numpy as np

from egstalker.preprocess import parsing as current
from egstalker.preprocess.face import FACE_CACHE_NAME, FaceTrack


def load_module(path: str):
    spec = importlib.util.spec_from_file_location("parsing_reference", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def padding_mask(frames: list[np.ndarray]) -> np.ndarray:
    """Black bars: full rows / columns at the edges that are near-black in every frame."""
    dark = np.all(np.stack([f.max(-1) < 24 for f in frames]), axis=0)
    rows, cols = dark.all(1), dark.all(0)
    mask = np.zeros(dark.shape, bool)
    for line, axis in ((rows, 0), (cols, 1)):
        n = len(line)
        top = 0
        while top < n and line[top]:
            top += 1
        bottom = n
        while bottom > top and line[bottom - 1]:
            bottom -= 1
        if axis == 0:
            mask[:top] = mask[bottom:] = True
        else:
            mask[:, :top] = mask[:, bottom:] = True
    return mask


def parse_clip(module, root: Path, track, samples, frames_idx, width, height, segment=None):
    factor = module.reduction_factor(width, height)
    images = [module.imread_reduced(str(root / "ori_imgs" / f"{i}.jpg"), factor) for i in samples]
    cv2.setRNGSeed(0)  # GrabCut's k-means start: the same for both parsers (else the fits differ by chance)
    t = time.perf_counter()
    model = module.fit_clip_model(images, [track.landmarks[i] for i in samples], factor)
    fit_s = time.perf_counter() - t
    labels, t = [], time.perf_counter()
    for i in frames_idx:
        small = module.imread_reduced(str(root / "ori_imgs" / f"{i}.jpg"), factor)
        extra = {} if segment is None else {"segment": segment}
        labels.append(module.parse_frame(small, track.landmarks[i], model, (width, height), **extra))
    return labels, fit_s, (time.perf_counter() - t) / len(frames_idx)


def measure(name: str, root: Path, reference, n_frames: int, samples_n: int = 40, segment=None) -> dict:
    track = FaceTrack.load(root / FACE_CACHE_NAME)
    n = len(track.landmarks)
    height, width = cv2.imread(str(root / "ori_imgs" / "0.jpg")).shape[:2]
    samples = np.unique(np.linspace(0, n - 1, min(n, samples_n)).round().astype(int))
    frames_idx = np.unique(np.linspace(0, n - 1, min(n, n_frames)).round().astype(int))
    originals = [cv2.imread(str(root / "ori_imgs" / f"{i}.jpg")) for i in frames_idx]
    pad = padding_mask(originals)
    yy, xx = np.mgrid[:height, :width]
    box = (yy >= 2 * height // 3) & ((xx < width // 5) | (xx >= width - width // 5))
    rest = ~box & ~pad
    out = {}
    for label, module in (("reference", reference), ("current", current)):
        labels, fit_s, frame_s = parse_clip(module, root, track, samples, frames_idx, width, height,
                                            segment if module is current else None)
        rows = []
        for k, i in enumerate(frames_idx):
            lab = labels[k]
            g = current.FaceGeometry.from_landmarks(track.landmarks[i])
            far = np.hypot(xx - g.centre[0], yy - g.centre[1]) > 1.6 * g.width
            torso = lab == current.TORSO
            rows.append({"torso": torso.mean(), "corner_far": (torso & far).mean(), "corner_box": (torso & box).mean(),
                         "person": (lab != current.BACKGROUND).mean(), "padding_torso": (torso & pad).mean(),
                         "head": (lab == current.HEAD).mean()})
        out[label] = {key: round(float(np.mean([r[key] for r in rows])), 4) for key in rows[0]}
        out[label]["fit_s"] = round(fit_s, 2)
        out[label]["parse_s_per_frame"] = round(frame_s, 4)
        out[label]["_labels"] = labels
    ref, cur = out["reference"].pop("_labels"), out["current"].pop("_labels")
    agree = [float((r == c)[rest].mean()) for r, c in zip(ref, cur)]
    kept = [float(((c == current.TORSO) & (r == current.TORSO) & rest).sum() / max(1, ((r == current.TORSO) & rest).sum()))
            for r, c in zip(ref, cur)]
    out["agree_rest"] = round(float(np.mean(agree)), 4)
    out["agree_rest_min"] = round(float(np.min(agree)), 4)
    out["torso_kept"] = round(float(np.mean(kept)), 4)
    out["torso_kept_min"] = round(float(np.min(kept)), 4)
    out["padding"] = round(float(pad.mean()), 4)
    out["frames"] = int(len(frames_idx))
    out["size"] = [int(width), int(height)]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", required=True, help="the parser before the change (a copy of parsing.py)")
    parser.add_argument("--datasets", nargs="+", required=True, help="NAME=DATASET_DIR")
    parser.add_argument("--frames", type=int, default=12)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "parsing_edges.json"))
    parser.add_argument("--label", default="after", help="key under which this run's numbers are stored")
    parser.add_argument("--segment", action="store_true",
                        help="the parser under test also reads the person segmentation network (task 4 does)")
    args = parser.parse_args()
    reference = load_module(args.reference)
    segment = None
    if args.segment:
        from egstalker.preprocess.segmentation import PersonSegmenter, model_path

        segment = PersonSegmenter(model_path())
    path = Path(args.out)
    results = json.loads(path.read_text()) if path.exists() else {}
    run = {}
    for item in args.datasets:
        name, root = item.split("=", 1)
        run[name] = measure(name, Path(root), reference, args.frames, segment=segment)
        r = run[name]
        print(f"{name:18s} torso {r['reference']['torso']:.3f} -> {r['current']['torso']:.3f}  "
              f"corner_box {r['reference']['corner_box']:.3f} -> {r['current']['corner_box']:.3f}  "
              f"corner_far {r['reference']['corner_far']:.3f} -> {r['current']['corner_far']:.3f}  "
              f"pad_torso {r['reference']['padding_torso']:.3f} -> {r['current']['padding_torso']:.3f}  "
              f"head {r['reference']['head']:.3f} -> {r['current']['head']:.3f}  "
              f"agree_rest {r['agree_rest']:.3f} (min {r['agree_rest_min']:.3f})  torso_kept {r['torso_kept']:.3f} "
              f"(min {r['torso_kept_min']:.3f})", flush=True)
    if segment is not None:
        segment.close()
    results[args.label] = run
    path.write_text(json.dumps(results, indent=1) + "\n")
    print("saved", path)


if __name__ == "__main__":
    main()
