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


class SimulatedDevice(FreeRenderer):
    """A renderer shaped like a GPU call: `python_ms` of Python (kernel launches) in `ops` pieces, each followed by
    a release of the GIL (PyTorch drops it around every op it dispatches), and two GIL-free waits totalling
    `fixed_ms + per_frame_ms * batch` (the device working, the copy back). It shows whether the server process
    keeps such a device busy or leaves it waiting (GIL handoffs, event-loop turns), without a GPU."""

    def __init__(self, head, fixed_ms: float, per_frame_ms: float, python_ms: float, ops: float = 200):
        super().__init__(head)
        self.fixed_ms, self.per_frame_ms, self.python_ms, self.ops = fixed_ms, per_frame_ms, python_ms, int(ops)

    def _python(self, ms: float) -> None:
        end = time.perf_counter() + ms / 1000.0
        x = 0
        while time.perf_counter() < end:
            x += 1

    def render_frames(self, features, frame_indices, pose_indices, background=None):
        wait = (self.fixed_ms + self.per_frame_ms * len(frame_indices)) / 1000.0
        for k in range(self.ops):
            self._python(self.python_ms / self.ops)
            time.sleep(0)  # the GIL is released and must be taken back, as around each dispatched op
            if k in (self.ops // 2, self.ops - 1):
                time.sleep(wait / 2)
        return super().render_frames(features, frame_indices, pose_indices)


def serve_stub(model_dir: str, port: int, max_sessions: int, size: int | None,
               device_ms: tuple[float, float, float] | None = None, switch_ms: float | None = None) -> None:
    import sys as _sys

    if switch_ms is not None:  # an experiment: Python's thread switch interval (default 5 ms) in the server
        _sys.setswitchinterval(switch_ms / 1000.0)
    from render_speed import resized_head

    from egstalker.inference import TalkingHead
    from egstalker.serve.scheduler import ServeConfig
    from egstalker.serve.server import serve_forever

    head = TalkingHead.from_dir(model_dir, device="cpu")
    head = resized_head(head, size) if size else head
    head = SimulatedDevice(head, *device_ms) if device_ms else FreeRenderer(head)
    asyncio.run(serve_forever(head, "127.0.0.1", port, ServeConfig(max_sessions=max_sessions), None, "cpu"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("--levels", default="4,8,16,24,32")
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--audio", default=str(ROOT.parent / "shared" / "data" / "audio" / "speech_60s_16k.wav"))
    parser.add_argument("--size", type=int, default=256, help="frame size the server encodes (longer side)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--device-ms", default=None, metavar="FIXED,PER_FRAME,PYTHON[,OPS]",
                        help="simulate a device instead of a free renderer (milliseconds per call; SimulatedDevice)")
    parser.add_argument("--switch-ms", type=float, default=-1.0,
                        help="set Python's thread switch interval in the server (ms; -1: leave Python's 5 ms)")
    parser.add_argument("--stub-port", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--max-sessions", type=int, default=64, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stub_port:
        device_ms = tuple(float(x) for x in args.device_ms.split(",")) if args.device_ms else None
        serve_stub(args.model_dir, args.stub_port, args.max_sessions, args.size, device_ms,
                   None if args.switch_ms < 0 else args.switch_ms)
        return 0

    from serve_load import free_port, get_health, read_speech, rss_mib, run_level, summarise, wait_for_server

    levels = [int(x) for x in args.levels.split(",")]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen([sys.executable, __file__, args.model_dir, "--stub-port", str(port),
                                "--max-sessions", str(max(levels)),
                                "--size", str(args.size), "--switch-ms", str(args.switch_ms)]
                               + (["--device-ms", args.device_ms] if args.device_ms else []),
                               env=os.environ | {"PYTHONUNBUFFERED": "1"})
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
                  f"{record['server_cpu_seconds_per_second_of_speech']} s/s, mean batch "
                  f"{record['server'].get('mean_batch')}, {record['server'].get('mean_render_ms_per_call')} ms a call",
                  flush=True)
    finally:
        process.terminate()
        process.wait(20)
    result = {"command": " ".join(["python", "benchmarks/serve_overhead.py"] + sys.argv[1:]),
              "device_ms": args.device_ms, "gil_switch_ms": None if args.switch_ms < 0 else args.switch_ms,
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
