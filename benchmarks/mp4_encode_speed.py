"""Cost of the render pipeline around the model: audio decode, H.264 + AAC encode and mux, at 512x512.

A stand-in head returns ready frames (a moving gradient) instantly, so `render_to_file` measures only what the
pipeline adds to the model: the upper bound of end-to-end frames/s on this machine's CPU, and whether peak memory
stays flat as the speech gets longer (8 s vs 60 s).

Run: python benchmarks/mp4_encode_speed.py > benchmarks/results/mp4_encode_cpu.txt
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
AUDIO = ROOT.parent / "shared" / "data" / "audio"


class StandInHead:
    """The TalkingHead interface with frames that cost nothing to make."""

    fps, sample_rate, height, width = 25.0, 16000, 512, 512

    def encode_audio(self, wav: np.ndarray) -> np.ndarray:
        return np.zeros((int(round(len(wav) / 16000 * 25)), 1), np.float32)

    def pose_schedule(self, n: int, mode: str = "loop") -> np.ndarray:
        return np.arange(n)

    def render_frames(self, features, frame_indices, pose_indices, background=None) -> np.ndarray:
        x = np.arange(self.width, dtype=np.int64)
        rows = [np.broadcast_to(((x + 7 * i) % 256).astype(np.uint8)[None, :, None], (self.height, self.width, 3))
                for i in frame_indices]
        return np.stack(rows)


def one(audio: str) -> None:
    import tempfile

    from egstalker.render.api import render_to_file

    with tempfile.TemporaryDirectory() as tmp:
        r = render_to_file(StandInHead(), AUDIO / audio, Path(tmp) / "out.mp4", show_progress=False)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{audio}: {r.n_frames} frames 512x512 in {r.render_seconds:.2f} s = {r.fps:.0f} frames/s "
          f"({r.audio_seconds / r.render_seconds:.1f}x real time), peak RSS {peak:.0f} MB")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        one(sys.argv[1])
    else:
        print(f"CPU: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} (shared machine)")
        for name in ("speech_8s_16k_stereo.wav", "speech_60s_16k.wav"):  # a process each: separate peak RSS
            subprocess.run([sys.executable, __file__, name], check=True)
