"""The serving process's own ceiling: `serve_load` against a server whose renderer costs nothing.

The server runs as usual (WebSocket sessions, per-session feature encoding, the batching scheduler, JPEG
encoding, sending), but `render_frames` returns precomputed frames of the model's size at once. The number of
sessions it holds at 25 fps is then what the process itself can carry on this machine, whatever the device.

    python benchmarks/serve_overhead.py MODEL_DIR --levels 4,8,16,24,32 --seconds 6 \
        --out benchmarks/results/serve_overhead_cpu.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


class FreeRenderer:
    """The head with a renderer that costs nothing: every frame is a copy of one real render."""

    def __init__(self, head):
        self._head = head
        features = np.zeros((1, *head.info.spec.feature_shape), np.float32)
        self._frame = head.render_frames(features, [0], [0])[0]

    def __getattr__(self, name):
        return getattr(self._head, name)

    def render_frames(self, features, frame_indices, pose_indices, background=None):
        return np.repeat(self._frame[None], len(frame_indices), axis=0)


def serve_stub(model_dir: str, port: int, max_sessions: int, size: int | None) -> None:
    from render_speed import resized_head

    from egstalker.inference import TalkingHead
    from egstalker.serve.scheduler import ServeConfig
    from egstalker.serve.server import serve_forever

    head = TalkingHead.from_dir(model_dir, device="cpu")
    head = FreeRenderer(resized_head(head, size) if size else head)
    asyncio.run(serve_forever(head, "127.0.0.1", port, ServeConfig(max_sessions=max_sessions), None, "cpu"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("--levels", default="4,8,16,24,32")
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--audio", default=str(ROOT.parent / "shared" / "data" / "audio" / "speech_60s_16k.wav"))
    parser.add_argument("--size", type=int, default=256, help="frame size the server encodes (longer side)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--stub-port", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--max-sessions", type=int, default=64, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stub_port:
        serve_stub(args.model_dir, args.stub_port, args.max_sessions, args.size)
        return 0

    from serve_load import free_port, get_health, read_speech, rss_mib, run_level, summarise, wait_for_server

    levels = [int(x) for x in args.levels.split(",")]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen([sys.executable, __file__, args.model_dir, "--stub-port", str(port),
                                "--max-sessions", str(max(levels)),
                                "--size", str(args.size)], env=os.environ | {"PYTHONUNBUFFERED": "1"})
    records = []
    try:
        health = wait_for_server(url, process)
        speech = read_speech(args.audio)
        asyncio.run(run_level(url, speech, 1, 2.0, np.random.default_rng(1)))  # warm-up
        rng = np.random.default_rng(0)
        for n in levels:
            t0 = time.process_time()
            cpu0 = _cpu_seconds(process.pid)
            streams = asyncio.run(run_level(url, speech, n, args.seconds, rng))
            time.sleep(0.5)
            record = summarise(n, streams, get_health(url), rss_mib(process.pid))
            record["server_cpu_seconds_per_second_of_speech"] = round(
                (_cpu_seconds(process.pid) - cpu0) / args.seconds, 2)
            record["client_cpu_seconds"] = round(time.process_time() - t0, 1)
            records.append(record)
            print(f"{n:>3} sessions: {record['streams_held_25fps']:>3} held, frame latency p95 "
                  f"{record['frame_latency_ms'].get('p95', 0):.0f} ms, server CPU "
                  f"{record['server_cpu_seconds_per_second_of_speech']} s/s", flush=True)
    finally:
        process.terminate()
        process.wait(20)
    result = {"command": " ".join(["python", "benchmarks/serve_overhead.py"] + sys.argv[1:]),
              "host": platform.node(), "cpu_count": os.cpu_count(), "model_size": [health["width"], health["height"]],
              "seconds_per_session": args.seconds, "levels": records,
              "max_sessions_held_25fps": max((r["sessions"] for r in records
                                              if r["streams_held_25fps"] == r["sessions"]), default=0)}
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(f"max sessions held with a free renderer: {result['max_sessions_held_25fps']}")
    return 0


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its threads (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


if __name__ == "__main__":
    raise SystemExit(main())
