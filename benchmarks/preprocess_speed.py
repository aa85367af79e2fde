"""Preprocessing speed, memory and disk: every clip in ../shared/data/video plus synthetic long videos.

Runs the whole `preprocess` (all available tasks) on each video in a fresh subprocess, and reports per-task
frames/s, total time, peak RSS of that process and the dataset's size on disk. Long videos (8000 frames,
5 min 20 s) are made by looping a clip with stream copy into a temporary folder (not the repo).

    python benchmarks/preprocess_speed.py [--tasks 1,2,3] [--long-only] [--keep DIR]

Raw output goes to stdout; the committed copy is benchmarks/results/preprocess_speed.txt.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VIDEOS = REPO.parent / "shared" / "data" / "video"

CHILD = r"""
import json, resource, sys, time
from egstalker.preprocess.pipeline import preprocess
started = time.perf_counter()
tasks = [int(t) for t in sys.argv[3].split(",")] if sys.argv[3] else None
root = preprocess(sys.argv[1], sys.argv[2], tasks=tasks, show_progress=False)
total = time.perf_counter() - started
meta = json.loads((root / "meta.json").read_text())
me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"total_s": total, "peak_rss_mb": me.ru_maxrss / 1024, "worker_peak_rss_mb": kids.ru_maxrss / 1024,
                  "cpu_s": me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime, "meta": meta}))
"""


def loop_video(source: Path, target: Path, n_frames: int) -> Path:
    """Concatenate copies of `source` (stream copy, no re-encoding) until it has `n_frames` video frames."""
    import av

    with av.open(str(source)) as src:
        rate = float(src.streams.video[0].average_rate)
        per_loop = sum(1 for p in src.demux(src.streams.video[0]) if p.pts is not None)
    span = per_loop / rate  # seconds of one copy
    seconds = n_frames / rate
    with av.open(str(target), "w") as dst:
        with av.open(str(source)) as src:
            out_v = dst.add_stream_from_template(src.streams.video[0])
            out_a = dst.add_stream_from_template(src.streams.audio[0])
        for loop in range(n_frames // per_loop + 1):
            with av.open(str(source)) as src:
                sv, sa = src.streams.video[0], src.streams.audio[0]
                for packet in src.demux(sv, sa):
                    if packet.pts is None or packet.dts is None:
                        continue
                    is_video = packet.stream.index == sv.index
                    if float(packet.pts * packet.time_base) >= span:  # audio running past the video's end
                        continue
                    if loop and not is_video and packet.pts < 0:  # encoder priming overlaps the last copy
                        continue
                    shift = int(round(loop * span / float(packet.time_base)))
                    packet.pts += shift
                    packet.dts += shift
                    if float(packet.pts * packet.time_base) >= seconds - 1e-6:
                        continue
                    packet.stream = out_v if is_video else out_a
                    dst.mux(packet)
    return target


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run_one(video: Path, work: Path, tasks: str = "") -> dict:
    output = work / (video.stem + "_dataset")
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, str(video), str(output), tasks], cwd=REPO,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"preprocess failed on {video}:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_s"] = time.perf_counter() - started
    result["bytes"] = dir_size(output)
    result["folders"] = folder_sizes(output)
    result["video"] = video.name
    return result


def folder_sizes(root: Path) -> str:
    sizes = {}
    for entry in root.iterdir():
        sizes[entry.name] = dir_size(entry) if entry.is_dir() else entry.stat().st_size
    big = sorted(sizes.items(), key=lambda kv: -kv[1])[:5]
    return ", ".join(f"{name} {size / 1e6:.1f} MB" for name, size in big)


def report(result: dict) -> str:
    meta = result["meta"]
    n = meta["n_frames"]
    tasks = " ".join(f"t{k}={n / max(v, 1e-9):.0f}fps({v:.1f}s)" for k, v in sorted(
        meta.get("task_seconds", {}).items(), key=lambda kv: int(kv[0])))
    return (f"{result['video']:<28} {meta['width']}x{meta['height']} {n:>5} frames  total {result['total_s']:6.1f} s "
            f"({n / result['total_s']:5.0f} frames/s)  peak RSS {result['peak_rss_mb']:6.0f} MB "
            f"(largest worker process {result.get('worker_peak_rss_mb', 0):4.0f} MB)  "
            f"disk {result['bytes'] / 1e6:7.1f} MB ({result['bytes'] / n / 1e3:.1f} kB/frame)  "
            f"worst A/V offset {meta.get('sync', {}).get('worst_offset_ms')} ms\n    per task: {tasks}\n"
            f"    CPU time {result.get('cpu_s', 0):.0f} s (this process and its workers: on 2 idle cores the wall time "
            f"would be about {result.get('cpu_s', 0) / 2:.0f}-{result.get('cpu_s', 0):.0f} s)\n"
            f"    largest: {result['folders']}; load average {os.getloadavg()[0]:.1f} at the end")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--long-only", action="store_true", help="only the synthetic 8000-frame videos")
    parser.add_argument("--tasks", default="", help="comma-separated task numbers (default: all available)")
    parser.add_argument("--keep", type=Path, help="keep datasets in this folder (default: a temp dir)")
    parser.add_argument("--match", default="", help="only videos whose file name contains this text")
    args = parser.parse_args()

    sys.path.insert(0, str(REPO))
    from egstalker.preprocess.pipeline import all_tasks

    print(f"# egstalker preprocess benchmark, {time.strftime('%Y-%m-%d %H:%M')}")
    print(f"# machine: {platform.machine()}, {os.cpu_count()} CPU cores visible ({platform.processor() or '?'}), "
          f"load average {os.getloadavg()[0]:.1f} at start; python {platform.python_version()}")
    chosen = {int(t) for t in args.tasks.split(",")} if args.tasks else None
    print(f"# tasks run: {', '.join(f'{t.number} {t.name}' for t in all_tasks() if not chosen or t.number in chosen)}")
    print(f"# command: python benchmarks/preprocess_speed.py {' '.join(sys.argv[1:])}")
    with tempfile.TemporaryDirectory(prefix="egstalker-bench-") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        videos = [] if args.long_only else sorted(VIDEOS.glob("*.mp4"))
        long_names = {"lieu_loop_8000f_256.mp4": "lieu_60s_256.mp4", "hill_loop_8000f_512.mp4": "hill_8s_512.mp4"}
        longs = [loop_video(VIDEOS / source, Path(tmp) / name, 8000) for name, source in long_names.items()
                 if args.match in name]
        for video in [v for v in videos if args.match in v.name] + longs:
            print(report(run_one(video, work, args.tasks)), flush=True)
    print("# peak RSS: the preprocess process (Python + libraries + models) and, separately, the largest of its "
          "worker processes; compare short vs 8000-frame rows of the same resolution to see growth with length")


if __name__ == "__main__":
    main()
