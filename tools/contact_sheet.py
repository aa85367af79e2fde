"""Contact sheet of the face parser on every test clip: frames beside their parsing overlay.

    python tools/contact_sheet.py [VIDEO ...] [-o docs/parsing_contact_sheet.png] [--work /tmp/egs_sheet]

Runs preprocessing tasks 3 (frames) and 4 (parsing) on each video (default: every clip in ../shared/data/video),
then lays out, per clip, `--frames` evenly spaced frames: the frame and the frame with the labels blended in
(head blue, neck green, torso red, background left as is). Datasets are kept in --work so a re-run is quick.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from egstalker.dataset.layout import DatasetLayout  # noqa: E402
from egstalker.preprocess.parsing import BACKGROUND, PALETTE, load_labels  # noqa: E402
from egstalker.preprocess.pipeline import preprocess  # noqa: E402

DEFAULT_VIDEOS = REPO.parent / "shared" / "data" / "video"


def overlay(frame_bgr: np.ndarray, labels: np.ndarray, strength: float = 0.5) -> np.ndarray:
    colours = PALETTE[labels][..., ::-1].astype(np.float32)
    out = frame_bgr.astype(np.float32)
    person = labels != BACKGROUND
    out[person] = (1 - strength) * out[person] + strength * colours[person]
    # background: dimmed, so a leak of the person mask into it shows
    out[~person] *= 0.55
    return out.clip(0, 255).astype(np.uint8)


def clip_row(layout: DatasetLayout, n_frames: int, count: int, tile: int, name: str) -> np.ndarray:
    tiles = []
    for i in np.linspace(0, n_frames - 1, count).round().astype(int):
        frame = cv2.imread(str(layout.frame(int(i))))
        labels = load_labels(layout.parsing(int(i)))
        pair = [cv2.resize(image, (tile, tile), interpolation=cv2.INTER_AREA)
                for image in (frame, overlay(frame, labels))]
        cv2.putText(pair[0], f"{name} #{i}", (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 255, 255), 1, cv2.LINE_AA)
        tiles.append(np.hstack(pair))
    return np.hstack(tiles)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("videos", nargs="*", type=Path)
    parser.add_argument("-o", "--output", type=Path, default=REPO / "docs" / "parsing_contact_sheet.png")
    parser.add_argument("--work", type=Path, default=Path("/tmp/egstalker_contact_sheet"))
    parser.add_argument("--frames", type=int, default=4, help="frames per clip")
    parser.add_argument("--tile", type=int, default=160, help="tile size in pixels")
    args = parser.parse_args(argv)
    videos = args.videos or sorted(DEFAULT_VIDEOS.glob("*.mp4"))
    rows = []
    for video in videos:
        root = preprocess(video, args.work / video.stem, tasks=[3, 4], show_progress=False)
        layout = DatasetLayout(root)
        n = len(list(layout.parsing_dir.glob("*.png")))
        rows.append(clip_row(layout, n, args.frames, args.tile, video.stem))
        print(f"{video.name}: {n} frames parsed", flush=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    sheet = np.vstack(rows)
    ok, data = cv2.imencode(".png", sheet, [cv2.IMWRITE_PNG_COMPRESSION, 9])
    args.output.write_bytes(data.tobytes())
    print(f"wrote {args.output} ({sheet.shape[1]}x{sheet.shape[0]}, {len(data) // 1024} KiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
