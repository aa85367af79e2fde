"""Render speed of a trained model: model-only frames/s (batched), end to end to mp4, first-frame latency, memory.

Measured on one device, for the model folder given:
  - load: TalkingHead.from_dir time;
  - features: encode_audio time for the whole speech (and its real-time factor);
  - first frame: from calling `render()` on 2 s of speech to its first frame (features + one frame), cold (the
    first render in the process: CUDA kernels compiled/loaded) and warm;
  - model_only[batch]: `GaussianHead.render` on device tensors staged beforehand (deformation + rasterisation +
    compositing over the torso/background), synchronised, after a warm-up call: what the model itself can do;
  - render_frames[batch]: the TalkingHead API (also gathers audio windows, reads each pose frame's torso image
    from disk unless cached, copies uint8 frames to the host): what render/serve get; poses follow the 'loop'
    schedule as in a real render;
  - end_to_end: `render_to_file` on --e2e-seconds of speech (features, render, H.264 + AAC encoding, mux),
    frames/s and real-time factor;
  - peak GPU memory (torch.cuda.max_memory_allocated) of each measurement.

--features F.npy uses a dataset's audio features (e.g. DATASET/aud.npy) instead of encoding the speech, for
machines without the audio encoder's packages; the speech is then only needed for the mp4 run, which is skipped
(with a note) when PyAV is not installed.

--size S renders at S px on the longer side (intrinsics scaled; the torso/background images resized), so a model
trained at 450 px can be timed at 512x512. The Gaussian count is the trained model's.

On the GPU machine (no PyAV/openwakeword there), carry .render_bench (made by
`python benchmarks/render_speed.py --make-carry`: PyAV as tar.xz and openwakeword's two ONNX models) and run:
  mkdir -p /tmp/site && tar xJf .render_bench/av.tar.xz -C /tmp/site &&
  PYTHONPATH=/tmp/site:.render_bench/oww python benchmarks/render_speed.py MODEL_DIR --device cuda --size 512
      --dataset DATASET_DIR --audio .render_bench/speech_60s_16k.wav --json $OUT/render_gpu.json
(copy ../shared/data/audio/speech_60s_16k.wav into .render_bench: ../shared does not travel)

Usage:
  python benchmarks/render_speed.py MODEL_DIR --device cuda --size 512 --json benchmarks/results/render_gpu.json
  python benchmarks/render_speed.py MODEL_DIR --device cpu --frames 24 --batch-sizes 1 8 --e2e-seconds 2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
import wave
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing (the GPU machine)
DEFAULT_AUDIO = ROOT.parent / "shared" / "data" / "audio" / "speech_60s_16k.wav"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"


def resized_head(head, size: int):
    """The same model rendering at `size` px on the longer side (intrinsics scaled)."""
    from egstalker.inference import TalkingHead

    scale = size / max(head.width, head.height)
    width, height = int(round(head.width * scale)), int(round(head.height * scale))
    K = head.poses.K.copy()
    K[0] *= width / head.width
    K[1] *= height / head.height
    info = dataclasses.replace(head.info, width=width, height=height)
    poses = dataclasses.replace(head.poses, K=K)
    return TalkingHead(head.model, info, poses, head.dataset_dir, head.model_dir, head.device)


def time_model_only(head, features: np.ndarray, poses: np.ndarray, batch: int, n_frames: int,
                    device: torch.device) -> dict:
    """GaussianHead.render on device-resident inputs (no host I/O inside the timed loop)."""
    n_batches = max(1, n_frames // batch)
    w = head.audio_window
    rows = (np.arange(batch * (n_batches + 1)) % len(features))
    pose_rows = poses[np.arange(batch * (n_batches + 1)) % len(poses)]
    windows = torch.from_numpy(head._windows(features, rows)).to(device)
    viewmats = head._viewmats[torch.from_numpy(pose_rows).to(device)]
    au45 = head._au45[torch.from_numpy(pose_rows).to(device)]
    Ks = head._K.expand(batch, 3, 3)
    backgrounds = head.torso_backgrounds(pose_rows[:batch])
    assert windows.shape[1] == w

    def call(k: int):
        s = slice(k * batch, (k + 1) * batch)
        return head.model.render(viewmats[s], Ks, head.width, head.height, backgrounds, audio=windows[s],
                                 au45=au45[s], dynamic=True).image

    with torch.no_grad():
        call(n_batches)  # warm-up at this batch size
        _reset_peak(device)
        t0 = time.perf_counter()
        for k in range(n_batches):
            call(k)
        _sync(device)
        elapsed = time.perf_counter() - t0
    frames = n_batches * batch
    return {"frames": frames, "seconds": elapsed, "fps": frames / elapsed, "peak_gpu_mib": _peak_mib(device)}


def time_render_frames(head, features: np.ndarray, poses: np.ndarray, batch: int, n_frames: int,
                       device: torch.device) -> dict:
    n_batches = max(1, n_frames // batch)
    rows = np.arange(batch * (n_batches + 1)) % len(features)
    pose_rows = poses[np.arange(batch * (n_batches + 1)) % len(poses)]
    head.render_frames(features, rows[-batch:], pose_rows[-batch:])  # warm-up at this batch size
    _reset_peak(device)
    t0 = time.perf_counter()
    for k in range(n_batches):
        s = slice(k * batch, (k + 1) * batch)
        head.render_frames(features, rows[s], pose_rows[s])
    elapsed = time.perf_counter() - t0
    frames = n_batches * batch
    return {"frames": frames, "seconds": elapsed, "fps": frames / elapsed, "peak_gpu_mib": _peak_mib(device)}


def make_carry(target: Path) -> None:
    """PyAV (its installed files, tar.xz: ~25 MB) and openwakeword's mel + embedding ONNX models (~2.5 MB) for a
    machine that has neither; openwakeword is replaced by a stub package holding only those two models."""
    import importlib.util
    import shutil
    import subprocess

    target.mkdir(parents=True, exist_ok=True)
    models = target / "oww" / "openwakeword" / "resources" / "models"
    models.mkdir(parents=True, exist_ok=True)
    oww = Path(list(importlib.util.find_spec("openwakeword").submodule_search_locations)[0])
    for name in ("melspectrogram.onnx", "embedding_model.onnx"):
        shutil.copy2(oww / "resources" / "models" / name, models / name)
    (target / "oww" / "openwakeword" / "__init__.py").write_text('"""Stub: the two ONNX models egstalker reads."""\n')
    av_dir = Path(list(importlib.util.find_spec("av").submodule_search_locations)[0]).parent
    members = [p.name for p in av_dir.iterdir() if p.name == "av" or p.name.startswith("av.libs")
               or (p.name.startswith("av-") and p.name.endswith(".dist-info"))]
    subprocess.run(["tar", "-cJf", str(target / "av.tar.xz"), "-C", str(av_dir), *members], check=True)
    print(f"wrote {target}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", nargs="?")
    parser.add_argument("--dataset", default=None, help="the model's dataset folder, if it moved")
    parser.add_argument("--make-carry", action="store_true", help="build .render_bench here and exit")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, default=None, help="render at this size of the longer side")
    parser.add_argument("--audio", default=str(DEFAULT_AUDIO))
    parser.add_argument("--features", default=None, help="audio features .npy to use instead of encoding --audio")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--frames", type=int, default=512, help="frames per model-only measurement")
    parser.add_argument("--e2e-seconds", type=float, default=60.0, help="seconds of speech for the mp4 run")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.make_carry:
        make_carry(ROOT / ".render_bench")
        return 0
    if not args.model_dir:
        parser.error("MODEL_DIR is required")

    from egstalker.inference import TalkingHead

    device = torch.device(args.device)
    results: dict = {"command": " ".join(["python", "benchmarks/render_speed.py"] + sys.argv[1:]),
                     "device": device_name(device), "torch": torch.__version__,
                     "load_average_1min_at_start": os.getloadavg()[0]}

    t0 = time.perf_counter()
    head = TalkingHead.from_dir(args.model_dir, device=device, dataset_dir=args.dataset,
                                check_encoder=args.features is None)
    _sync(device)
    results["load_s"] = time.perf_counter() - t0
    results["trained_size"] = f"{head.width}x{head.height}"
    if args.size:
        head = resized_head(head, args.size)
    results["size"] = f"{head.width}x{head.height}"
    results["gaussians"] = len(head.model.gaussians)
    results["encoder"] = head.encoder_name

    try:
        import av  # noqa: F401 (PyAV: audio decoding and the mp4 writer)
        has_av = True
    except ImportError:
        has_av = False
    wav = None
    if args.features is None:
        from egstalker.render.api import load_speech, render

        wav = load_speech(args.audio)
        t0 = time.perf_counter()
        features = head.encode_audio(wav)
        results["features_s"] = time.perf_counter() - t0
        results["features_realtime_factor"] = len(wav) / 16000 / results["features_s"]
        for label in ("first_frame_cold_s", "first_frame_warm_s"):  # features of 2 s + the first frame
            _sync(device)
            t0 = time.perf_counter()
            next(iter(render(head, wav[: 16000 * 2], batch_size=1)))
            _sync(device)
            results[label] = time.perf_counter() - t0
    else:
        features = np.load(args.features).astype(np.float32)
        results["features"] = f"{args.features} ({len(features)} frames; encoder not timed)"
        for label in ("first_frame_cold_s", "first_frame_warm_s"):  # one frame, features given
            _sync(device)
            t0 = time.perf_counter()
            head.render_frames(features, [0], [0])
            _sync(device)
            results[label] = time.perf_counter() - t0

    poses = head.pose_schedule(max(args.frames, 2), "loop")
    results["model_only"], results["render_frames"] = {}, {}
    for batch in args.batch_sizes:
        results["model_only"][str(batch)] = time_model_only(head, features, poses, batch, args.frames, device)
        results["render_frames"][str(batch)] = time_render_frames(head, features, poses, batch, args.frames,
                                                                  device)
        print(f"batch {batch}: model-only {results['model_only'][str(batch)]['fps']:.1f} frames/s, "
              f"render_frames {results['render_frames'][str(batch)]['fps']:.1f} frames/s", file=sys.stderr)

    best = max(results["render_frames"], key=lambda b: results["render_frames"][b]["fps"])
    if has_av and wav is not None:
        from egstalker.render.api import n_frames_for, render_to_file

        e2e_wav = wav[: int(args.e2e_seconds * 16000)]
        with tempfile.TemporaryDirectory() as tmp:
            speech = Path(tmp) / "speech.wav"
            with wave.open(str(speech), "wb") as f:
                f.setnchannels(1)
                f.setsampwidth(2)
                f.setframerate(16000)
                f.writeframes((np.clip(e2e_wav, -1, 1) * 32767).astype("<i2").tobytes())
            _reset_peak(device)
            result = render_to_file(head, speech, Path(tmp) / "out.mp4", batch_size=int(best),
                                    show_progress=False)
            size_mb = (Path(tmp) / "out.mp4").stat().st_size / 1e6
        assert result.n_frames == n_frames_for(len(e2e_wav))
        results["end_to_end"] = {"batch_size": int(best), "frames": result.n_frames,
                                 "audio_s": result.audio_seconds, "seconds": result.render_seconds,
                                 "fps": result.fps, "realtime_factor": result.audio_seconds / result.render_seconds,
                                 "peak_gpu_mib": _peak_mib(device), "mp4_mb": size_mb}
    else:
        results["end_to_end"] = ("skipped: needs PyAV" if not has_av else "skipped: needs the audio encoder "
                                 "(run without --features)")

    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
