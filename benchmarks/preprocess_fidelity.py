"""What the lossy storage of a preprocessed dataset costs the trainer: PSNR of what it reads vs. lossless.

The trainer reads gt_imgs/N.jpg (target) and torso_imgs/N.png composited on bc.jpg (what the head is rendered
over). Lossless references come from the video's own decoded frames with the dataset's parsing and bc.jpg:
    gt       = decoded frame with background pixels from bc.jpg
    torso    = decoded frame where the torso PNG's alpha is set (outside the neck extension), bc.jpg elsewhere
Also: ori_imgs/N.jpg vs the decoded frame, and bytes per frame of each folder.

    python benchmarks/preprocess_fidelity.py VIDEO DATASET [--step 10]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np

from egstalker.dataset.layout import DatasetLayout
from egstalker.media import iter_frames
from egstalker.preprocess.parsing import BACKGROUND, HEAD, load_labels


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 10 * np.log10(255.0 ** 2 / max(mse, 1e-10))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("video", type=Path)
    parser.add_argument("dataset", type=Path)
    parser.add_argument("--step", type=int, default=10, help="every step-th frame")
    args = parser.parse_args()
    layout = DatasetLayout(args.dataset)
    bc = cv2.imread(str(layout.background))
    rows = {"ori_imgs vs decoded video": [], "gt_imgs vs lossless gt": [],
            "torso composite vs lossless (torso region)": [], "torso composite vs lossless (whole frame)": []}
    n_frames = len(list(layout.frames_dir.glob("*.jpg")))
    for frame in iter_frames(str(args.video), 25.0, n_frames=n_frames, pixel_format="bgr24"):
        i = frame.index
        if i % args.step:
            continue
        source = frame.image
        labels = load_labels(layout.parsing(i))
        ori = cv2.imread(str(layout.frame(i)))
        gt = cv2.imread(str(layout.gt(i)))
        lossless_gt = np.where((labels == BACKGROUND)[..., None], bc, source)
        torso = cv2.imread(str(layout.torso(i)), cv2.IMREAD_UNCHANGED)
        alpha = torso[..., 3] > 0
        composite = np.where(alpha[..., None], torso[..., :3], bc)
        exact = alpha & (labels != HEAD)  # the neck extension under the jaw is synthesised: no reference
        lossless_composite = np.where(exact[..., None], source, composite)
        rows["ori_imgs vs decoded video"].append(psnr(ori, source))
        rows["gt_imgs vs lossless gt"].append(psnr(gt, lossless_gt))
        rows["torso composite vs lossless (torso region)"].append(psnr(composite[exact], lossless_composite[exact]))
        rows["torso composite vs lossless (whole frame)"].append(psnr(composite, lossless_composite))
    print(f"# {args.video.name}: {len(rows['gt_imgs vs lossless gt'])} frames (every {args.step}th)")
    for name, values in rows.items():
        print(f"{name:<45} PSNR mean {np.mean(values):5.1f} dB, worst {np.min(values):5.1f} dB")
    for folder in (layout.frames_dir, layout.gt_dir, layout.torso_dir, layout.parsing_dir):
        files = [f for f in folder.iterdir() if f.suffix in (".jpg", ".png")]
        print(f"{folder.name:<12} {sum(f.stat().st_size for f in files) / len(files) / 1e3:6.1f} kB/frame")


if __name__ == "__main__":
    main()
