"""What task 3's framing saves on a phone-shaped video, on this CPU.

Lays the first 20 s of lieu (256x256) on a grey 1080x1920 portrait canvas and a 1920x1080 landscape one (scaled
to 1080 and 720 px, 30 fps, H.264 + AAC: the shapes phones film), preprocesses each with the default framing and
with `--crop none --max-size 0` (the whole frame, as before framing existed), and reports wall time, peak memory
(of the preprocess process and its children), dataset size on disk, frame size and the face's height in the frames.

    python benchmarks/preprocess_framing.py --json benchmarks/results/preprocess_framing.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CLIP = ROOT.parent / "shared" / "data" / "video" / "lieu_60s_256.mp4"
SHAPES = {"portrait 1080x1920": ((1080, 1920), 1080, 420), "landscape 1920x1080": ((1920, 1080), 720, 180)}


def phone_video(target: Path, canvas: tuple[int, int], content: int, top: int, seconds: float = 20.0) -> Path:
    import cv2

    from egstalker.media import iter_frames, read_audio
    from egstalker.render.video import Mp4Writer

    speech = read_audio(CLIP, 48000)[: int(seconds * 48000)]
    width, height = canvas
    with Mp4Writer(target, width, height, fps=30, audio=speech, audio_rate=48000, crf=20) as writer:
        for frame in iter_frames(CLIP, 30, n_frames=int(seconds * 30)):
            picture = np.full((height, width, 3), 128, np.uint8)
            left = (width - content) // 2
            picture[top:top + content, left:left + content] = cv2.resize(frame.image, (content, content),
                                                                         interpolation=cv2.INTER_LANCZOS4)
            writer.write(picture)
    return target


def disk_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def preprocess(video: Path, out: Path, extra: list[str]) -> dict:
    peak_file = out.with_suffix(".rss")
    started = time.perf_counter()
    # GNU time reports the run's own peak (its waited-for workers included)
    subprocess.run(["/usr/bin/time", "-f", "%M", "-o", str(peak_file), sys.executable, "-m", "egstalker",
                    "preprocess", str(video), "-o", str(out), "--quiet", *extra],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seconds = time.perf_counter() - started
    peak = int(peak_file.read_text().split()[-1])  # KB
    meta = json.loads((out / "meta.json").read_text())
    landmarks = np.load(out / "face_landmarks.npz")["landmarks"]
    face_h = float(np.median(landmarks[:, :, 1].max(1) - landmarks[:, :, 1].min(1)))
    return {"seconds": round(seconds, 1), "peak_rss_mb": round(peak / 1024),
            "dataset_mb": round(disk_bytes(out) / 1e6, 1), "frame_size": [meta["width"], meta["height"]],
            "face_height_px": round(face_h, 1), "framing": meta.get("framing"),
            "task_seconds": meta.get("task_seconds")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    results = {"command": "benchmarks/preprocess_framing.py" + (f" --json {args.json}" if args.json else ""),
               "machine": f"{subprocess.run(['uname', '-m'], capture_output=True, text=True).stdout.strip()}, "
                          f"{len(__import__('os').sched_getaffinity(0))} cores",
               "clip": "lieu_60s_256.mp4, first 20 s, laid on a grey canvas at 30 fps", "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name, (canvas, content, top) in SHAPES.items():
            video = phone_video(tmp / f"{name.split()[0]}.mp4", canvas, content, top)
            for label, extra in (("whole frame (--crop none --max-size 0)", ["--crop", "none", "--max-size", "0"]),
                                 ("framed (default)", [])):
                run = preprocess(video, tmp / f"{name.split()[0]}_{len(extra)}", extra)
                results["runs"][f"{name}, {label}"] = run
                print(name, label, json.dumps({k: v for k, v in run.items() if k != "task_seconds"}), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
