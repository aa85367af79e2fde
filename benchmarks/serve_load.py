"""Load generator for `egstalker serve`: ramps concurrent real-time sessions and measures what each one gets.

For each level N it starts N clients together (start times spread over 1 s), each streaming a different
`--seconds` piece of speech in real time in 20 ms chunks, exactly as the browser page does, and records per stream:
  - held 25 fps: every frame arrived with a new image (none skipped by the server's overload policy) and none
    later than a player that starts 150 ms after the first frame would need it (no stall);
  - first-frame latency: arrival of frame 0 - the end of its 40 ms of speech (includes the model's look-ahead);
  - per-frame latency percentiles (same definition), frame-interval jitter;
plus, from the server's /health, the accelerator memory, render throughput, mean batch size and the render
process's busy share, and the CPU cores each process used during the level (server, its event-loop thread, render
process, this load generator). --render-queue passes serve's option; --profile-server runs the server under
cProfile and writes its stats. Only 127.0.0.1 is contacted. The server is started here (`egstalker serve
MODEL_DIR`) unless --url points at a running one.

Usage (CPU, small model):
    python benchmarks/serve_load.py MODEL_DIR --device cpu --levels 1,2,4
GPU (H100):
    python benchmarks/serve_load.py MODEL_DIR --device cuda --levels 1,4,8,12,16,20,24,32
Results: a JSON file in benchmarks/results/ (one record per level) and a table on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from egstalker.serve.client import load_speech, stream_speech  # noqa: E402

DEFAULT_AUDIO = ROOT.parent / "shared" / "data" / "audio" / "speech_60s_16k.wav"
PLAYOUT_BUFFER_S = 0.15
FIRST_FRAME_BUDGET_MS = 300.0


def read_speech(path: str) -> np.ndarray:
    """16 kHz mono int16 wav through the standard library (the GPU image has no PyAV); anything else via PyAV."""
    import wave

    try:
        with wave.open(path) as f:
            if f.getframerate() == 16000 and f.getnchannels() == 1 and f.getsampwidth() == 2:
                return np.frombuffer(f.readframes(f.getnframes()), "<i2").astype(np.float32) / 32768.0
    except (wave.Error, EOFError):
        pass
    return load_speech(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_health(url: str) -> dict:
    with urllib.request.urlopen(f"{url}/health", timeout=10) as response:
        return json.loads(response.read())


def wait_for_server(url: str, process: subprocess.Popen | None, timeout: float = 600.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise SystemExit(f"the server exited with code {process.returncode} before answering")
        try:
            return get_health(url)
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"no answer from {url}/health within {timeout:.0f} s")


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def cpu_seconds(pid: int, thread: int | None = None) -> float | None:
    """User + system CPU seconds of a process (or one of its threads) so far (Linux /proc; None elsewhere)."""
    path = f"/proc/{pid}/task/{thread}/stat" if thread is not None else f"/proc/{pid}/stat"
    try:
        fields = Path(path).read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def child_pids(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


class CpuMeter:
    """CPU cores used over a level by the server (its event-loop thread apart), its render process and this load
    generator: which one runs out of CPU first."""

    def __init__(self, server_pid: int | None):
        self.server_pid = server_pid
        self.start = self._read()

    def _read(self) -> dict:
        pids = {"load_generator": os.getpid()}
        if self.server_pid is not None:
            pids["server"] = self.server_pid
            for child in child_pids(self.server_pid):  # the render process (spawned; its resource tracker is tiny)
                pids[f"server_child_{child}"] = child
        times = {name: cpu_seconds(pid) for name, pid in pids.items()}
        if self.server_pid is not None:
            times["server_event_loop_thread"] = cpu_seconds(self.server_pid, self.server_pid)
        return {"wall": time.monotonic()} | {k: v for k, v in times.items() if v is not None}

    def cores(self) -> dict:
        end = self._read()
        wall = end["wall"] - self.start["wall"]
        return {name: round((end[name] - self.start[name]) / wall, 2) for name in end
                if name != "wall" and name in self.start}


async def run_level(url: str, speech: np.ndarray, n: int, seconds: float, rng: np.random.Generator) -> list:
    import aiohttp

    piece = int(seconds * 16000)
    offsets = rng.integers(0, max(1, len(speech) - piece), size=n)
    delays = np.sort(rng.uniform(0.0, 1.0, size=n))

    async def one(offset: int, delay: float):
        await asyncio.sleep(delay)
        return await stream_speech(url, speech[offset:offset + piece], realtime=True, session=session,
                                   timeout_s=seconds + 60)

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        return await asyncio.gather(*(one(int(o), float(d)) for o, d in zip(offsets, delays)))


def summarise(n: int, streams: list, health: dict, rss: float | None) -> dict:
    timings = [s.timing(playout_buffer_s=PLAYOUT_BUFFER_S) for s in streams]
    complete = [t for t in timings if t["frames"] == t["expected_frames"] and not t["error"]]
    held = [t for t in complete if t["late_frames"] == 0 and t["skipped_frames"] == 0]
    first = np.array([t["first_frame_latency_ms"] for t in timings if t["frames"]])
    latency = np.concatenate([
        np.array([(s.received[i] - s.slot_complete_time(f.index)) * 1000 for i, f in enumerate(s.frames)])
        for s in streams if s.frames] or [np.zeros(0)])
    gaps = np.concatenate([np.diff(s.received) * 1000 for s in streams if len(s.frames) > 1] or [np.zeros(0)])

    def pct(values: np.ndarray) -> dict:
        if len(values) == 0:
            return {}
        return {f"p{q}": round(float(np.percentile(values, q)), 1) for q in (50, 90, 95, 99)} | {
            "max": round(float(values.max()), 1)}

    return {
        "sessions": n,
        "streams_complete": len(complete),
        "streams_held_25fps": len(held),
        "streams_first_frame_within_300ms": int((first <= FIRST_FRAME_BUDGET_MS).sum()),
        "errors": sorted({t["error"] for t in timings if t["error"]}),
        "first_frame_latency_ms": pct(first),
        "frame_latency_ms": pct(latency),
        "frame_interval_ms": pct(gaps),
        "late_frames_total": int(sum(t.get("late_frames", 0) for t in timings)),
        "frames_without_image_total": int(sum(t.get("skipped_frames", 0) for t in timings)),
        "frames_total": int(sum(t["frames"] for t in timings)),
        "processing_after_lookahead_ms": pct(latency - float(health.get("lookahead_ms") or 0.0)),
        "received_fps_min": min((t["received_fps"] or 0.0) for t in timings if t["frames"]) if first.size else 0,
        "av_offset_ms_max": max((abs(t["av_offset_ms"] or 0.0) for t in timings if t["frames"]), default=None),
        "server": {key: health.get(key) for key in ("render_fps", "mean_batch", "mean_render_ms_per_call",
                                                   "gpu_memory_mb", "gpu_peak_memory_mb", "lookahead_ms",
                                                   "precision", "warm_up_s", "render_queue", "render_busy",
                                                   "encoder_device", "encoder_calls_merged")},
        "server_rss_mib": rss,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", nargs="?", help="model folder (omit with --url)")
    parser.add_argument("--url", help="benchmark an already running server instead of starting one")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--levels", default="1,2,4,8,16", help="comma-separated session counts")
    parser.add_argument("--seconds", type=float, default=10.0, help="speech per session")
    parser.add_argument("--audio", default=str(DEFAULT_AUDIO), help="speech the sessions take pieces of")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--precision", choices=("auto", "fp32", "fp16"), default="auto", help="passed to serve")
    parser.add_argument("--render-process", choices=("auto", "yes", "no"), default="auto", help="passed to serve")
    parser.add_argument("--render-queue", type=int, default=2, help="passed to serve")
    parser.add_argument("--encoder-device", default="auto", help="passed to serve")
    parser.add_argument("--dataset", help="the model's dataset folder, if it moved (passed to serve)")
    parser.add_argument("--audio-weights", help="the audio encoder's weights (passed to serve)")
    parser.add_argument("--stop-below", type=float, default=0.5,
                        help="stop the ramp once fewer than this fraction of streams hold 25 fps")
    parser.add_argument("--profile-server", metavar="PATH",
                        help="run the server under cProfile (its event-loop thread) and write the stats here")
    parser.add_argument("--out", help="result JSON (default benchmarks/results/serve_load_<device>_<time>.json)")
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    speech = read_speech(args.audio)

    process = None
    if args.url:
        url = args.url.rstrip("/")
    else:
        if not args.model_dir:
            parser.error("give MODEL_DIR or --url")
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        profiler = ["-m", "cProfile", "-o", args.profile_server] if args.profile_server else []
        command = [sys.executable, *profiler, "-m", "egstalker", "serve", args.model_dir, "--host", "127.0.0.1",
                   "--port", str(port), "--device", args.device, "--max-sessions", str(max(levels)),
                   "--max-batch", str(args.max_batch), "--precision", args.precision,
                   "--render-process", args.render_process, "--render-queue", str(args.render_queue), "--encoder-device", args.encoder_device]
        command += ["--dataset", args.dataset] if args.dataset else []
        command += ["--audio-weights", args.audio_weights] if args.audio_weights else []
        print("starting:", " ".join(command), flush=True)
        process = subprocess.Popen(command, cwd=ROOT, env=os.environ | {"PYTHONUNBUFFERED": "1"})
    try:
        health = wait_for_server(url, process)
        print(f"server: {health['width']}x{health['height']} on {health['device']} "
              f"{health.get('gpu_name', '')}, look-ahead {health['lookahead_ms']} ms", flush=True)
        # warm-up (kernels, caches) outside the measurements
        asyncio.run(run_level(url, speech, 1, 2.0, np.random.default_rng(1)))
        rng = np.random.default_rng(0)
        records = []
        print(f"{'sessions':>8} {'held25':>6} {'first<=300':>10} {'first p50/p95 ms':>17} "
              f"{'frame p50/p95/p99 ms':>21} {'batch':>6} {'render fps':>10} {'GPU MiB':>8}", flush=True)
        for n in levels:
            meter = CpuMeter(process.pid if process else None)
            streams = asyncio.run(run_level(url, speech, n, args.seconds, rng))
            cores = meter.cores()
            time.sleep(0.5)
            health = get_health(url)
            record = summarise(n, streams, health, rss_mib(process.pid) if process else None)
            record["cpu_cores"] = cores
            print(f"  CPU cores used: {json.dumps(cores)}; encoder calls merged per call: "
                  f"{record['server'].get('encoder_calls_merged')}", flush=True)
            records.append(record)
            first, frame, server = record["first_frame_latency_ms"], record["frame_latency_ms"], record["server"]
            print(f"{n:>8} {record['streams_held_25fps']:>6} {record['streams_first_frame_within_300ms']:>10} "
                  f"{first.get('p50', 0):>8.0f}/{first.get('p95', 0):<8.0f} "
                  f"{frame.get('p50', 0):>7.0f}/{frame.get('p95', 0):.0f}/{frame.get('p99', 0):<6.0f} "
                  f"{server['mean_batch'] or 0:>6.1f} {server['render_fps'] or 0:>10.1f} "
                  f"{server.get('gpu_peak_memory_mb') or '-':>8}", flush=True)
            if record["errors"]:
                print("  errors:", record["errors"], flush=True)
            if record["streams_held_25fps"] < args.stop_below * n:
                print(f"stopping: fewer than {args.stop_below:.0%} of {n} streams held 25 fps", flush=True)
                break
        result = {
            "command": " ".join([Path(sys.executable).name] + sys.argv),
            "device": health["device"], "gpu_name": health.get("gpu_name"), "host": platform.node(),
            "cpu_count": os.cpu_count(), "model_size": [health["width"], health["height"]],
            "lookahead_ms": health["lookahead_ms"], "seconds_per_session": args.seconds,
            "playout_buffer_ms": PLAYOUT_BUFFER_S * 1000, "levels": records,
            "max_sessions_held_25fps": max((r["sessions"] for r in records
                                            if r["streams_held_25fps"] == r["sessions"]), default=0),
        }
        out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / (
            f"serve_load_{health['device'].replace(':', '')}_{time.strftime('%Y%m%d_%H%M%S')}.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"max sessions all held at 25 fps: {result['max_sessions_held_25fps']}; wrote {out}")
    finally:
        if process is not None:
            # SIGINT stops the server cleanly (cProfile then writes its stats); SIGTERM would not
            process.send_signal(signal.SIGINT if args.profile_server else signal.SIGTERM)
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
