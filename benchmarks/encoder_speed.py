"""Audio encoders' speed on this machine's CPU: whole clips, and the feature latency of a live stream.

Whole clip: seconds to encode SPEECH once (real-time factor = seconds / clip length).

Live stream: speech arrives in real time; one worker, as the server's, takes all the speech that has arrived
whenever it is free and pushes it into `encoder.encode_stream()`. The clock advances by the measured compute time
of each push (and by 40 ms when nothing new has arrived), so the run takes only the compute time. A frame's
feature latency = when its feature came out - when its 40 ms slot of speech ended: the encoder's look-ahead plus
waiting and computing. The server adds rendering and transport on top (benchmarks/serve_load.py).

    python benchmarks/encoder_speed.py ../shared/data/audio/speech_60s_16k.wav --encoders mel mel_phones \
        --stream-seconds 30 --json benchmarks/results/encoder_speed_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from egstalker.audio import SAMPLES_PER_FRAME, get_encoder  # noqa: E402


def live_latencies(encoder, wav: np.ndarray, rate: int = 16000) -> tuple[np.ndarray, float]:
    """Per-frame feature latency (s) of a stream fed in real time, and the compute seconds spent."""
    stream = encoder.encode_stream()
    clock, sent, emitted, busy = 0.0, 0, [], 0.0
    while sent < len(wav):
        arrived = min(len(wav), int(clock * rate))
        if arrived <= sent:
            clock += 0.04
            continue
        started = time.perf_counter()
        rows = stream.push(wav[sent:arrived])
        spent = time.perf_counter() - started
        sent, clock, busy = arrived, clock + spent, busy + spent
        emitted += [clock] * len(rows)
    started = time.perf_counter()
    emitted += [clock + time.perf_counter() - started] * len(stream.flush())
    ends = (np.arange(len(emitted)) + 1) * SAMPLES_PER_FRAME / rate
    return np.asarray(emitted) - ends, busy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("speech", type=Path, help="16 kHz mono wav")
    parser.add_argument("--encoders", nargs="+", default=["mel", "mel_phones"])
    parser.add_argument("--stream-seconds", type=float, default=30.0, help="length of the live-stream test")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    import soundfile as sf

    wav, rate = sf.read(str(args.speech), dtype="float32")
    assert rate == 16000 and wav.ndim == 1, "give 16 kHz mono speech"
    results = {"command": " ".join(sys.argv), "machine": f"{platform.processor() or platform.machine()}, "
               f"{os.cpu_count()} cores", "speech_seconds": round(len(wav) / rate, 2), "encoders": {}}
    for name in args.encoders:
        encoder = get_encoder(name)
        started = time.perf_counter()
        encoder.encode(wav)
        whole = time.perf_counter() - started
        latency, busy = live_latencies(encoder, wav[: int(args.stream_seconds * rate)])
        row = {"whole_clip_s": round(whole, 2), "whole_clip_realtime_factor": round(whole / (len(wav) / rate), 3),
               "lookahead_ms": round(1000 * encoder.lookahead_seconds, 1),
               "live_compute_realtime_factor": round(busy / args.stream_seconds, 3),
               "live_latency_ms": {q: round(1000 * float(np.percentile(latency, p)), 1)
                                   for q, p in (("p50", 50), ("p95", 95), ("max", 100))}}
        results["encoders"][name] = row
        print(name, json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
