"""Where a served frame's device time goes, and what three speed-ups would give, on one trained model.

    python benchmarks/render_profile_gpu.py MODEL_DIR --dataset DATASET_DIR --json OUT.json [--trace OUT.txt]

At each batch size (fp16 deformation network, as served on CUDA), median wall time (synchronised) of:
  - tokens: the per-frame tokens (audio adapter, eye, camera, null);
  - deformation: the offset network over every Gaussian (the shipped code: a float16 copy of the network,
    LayerNorm and residual stream included), `deformation_autocast` (the code before: autocast, which keeps
    those in float32) and `deformation_autocast_fused_heads` (the same with the five heads as one product);
  - frame_gaussians: tokens + deformation + activations and view-dependent colour;
  - rasterize: gsplat's projection, tile sort and compositing of those Gaussians;
  - model_render: frame_gaussians + rasterize + compositing over the torso/background;
  - render_frames: the TalkingHead API (+ audio windows, torso images, uint8 frames copied to the host);
  - deformation_compiled: the float16 network under torch.compile, unchunked (batch 32 only; its compile time
    is reported).
Each variant's held-out renders are compared with the shipped code's (PSNR, largest 8-bit difference).
Then a torch.profiler table of the top device kernels of model_render at the largest batch (--trace).

Static Gaussians: over every training frame, how far each Gaussian's offsets stray from their mean, in pixels
(position, size, rotation x size) or 8-bit levels (colour, opacity). Gaussians that never move by more than a
threshold could be baked into the canonical head and skipped by the network; for each threshold the share of
such Gaussians, the held-out renders with them baked (PSNR against the full renders and the ground truth), and
the network's time over the rest.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from egstalker.model.deformation import HEAD_NAMES, Offsets, SpatialCache  # noqa: E402
from egstalker.model.gaussians import SH_C0  # noqa: E402


def wall(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of fn() over `repeats` synchronised calls, after two warm-up calls."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def earlier_forward(net, fused: bool):
    """The fp16 network as it ran before (fused=False): under autocast, which keeps LayerNorm and the residual
    stream in float32 and casts the hidden state to fp16 once per head; or the same with the five heads fused
    into one product (fused=True: first layers side by side, last layers block-diagonal; twice as slow on a CPU).
    Chunked over Gaussians as the shipped code is."""

    def rows(cache: SpatialCache, tokens: torch.Tensor) -> Offsets:
        b, t, _ = tokens.shape
        k, v = net.to_kv(net.token_norm(tokens)).view(b, t, 2, net.n_heads, net.head_dim).unbind(2)
        scores = torch.einsum("nhd,bthd->bnht", cache.queries, k) / math.sqrt(net.head_dim)
        mixed = torch.einsum("bnht,bthd->bnhd", torch.softmax(scores, dim=-1), v).reshape(b, -1, net.d_model)
        hidden = cache.features.unsqueeze(0) + net.attn_out(mixed)
        hidden = hidden + net.ffn(net.ffn_norm(hidden))
        if not fused:
            return Offsets(**{name: net.heads[name](hidden) * (net.position_scale if name == "means" else 1.0)
                              for name in HEAD_NAMES})
        first = [net.heads[name][0] for name in HEAD_NAMES]
        last = [net.heads[name][2] for name in HEAD_NAMES]
        inner = F.relu(F.linear(hidden, torch.cat([layer.weight for layer in first]),
                                torch.cat([layer.bias for layer in first])))
        out = F.linear(inner, torch.block_diag(*[layer.weight for layer in last]),
                       torch.cat([layer.bias for layer in last]))
        parts = dict(zip(HEAD_NAMES, out.split([layer.out_features for layer in last], dim=-1)))
        parts["means"] = parts["means"] * net.position_scale
        return Offsets(**parts)

    def forward(cache: SpatialCache, tokens: torch.Tensor) -> Offsets:
        b, n = tokens.shape[0], cache.features.shape[0]
        step = max(1, net.INFERENCE_CHUNK_ROWS // b)
        with torch.autocast("cuda", dtype=torch.float16, enabled=tokens.is_cuda):
            parts = [rows(SpatialCache(features=cache.features[i:i + step], queries=cache.queries[i:i + step]),
                          tokens) for i in range(0, n, step)]
        return Offsets(**{name: torch.cat([getattr(part, name) for part in parts], dim=1).float()
                          for name in HEAD_NAMES})

    return forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.25, 0.5, 1.0, 2.0])
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    parser.add_argument("--skip-static", action="store_true", help="skip the static Gaussians and the compiler")
    parser.add_argument("--json", required=True)
    parser.add_argument("--trace", default=None, help="write the profiler's kernel table here")
    args = parser.parse_args()

    from egstalker import metrics
    from egstalker.inference import TalkingHead
    from egstalker.render.rasterize import rasterize

    device = torch.device(args.device)
    head = TalkingHead.from_dir(args.model_dir, device=device, dataset_dir=args.dataset, check_encoder=False,
                                precision="auto")
    model, net = head.model, head.model.deformation
    features = np.load(Path(args.dataset) / "aud.npy")
    poses = head.poses
    n_gaussians = len(model.gaussians)
    result = {"command": " ".join(sys.argv), "torch": torch.__version__, "precision": head.precision,
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "gaussians": n_gaussians, "size": [head.width, head.height], "stages_ms": {}}
    print(json.dumps({k: result[k] for k in ("device", "gaussians", "size", "precision")}), flush=True)

    def inputs(b: int, start: int = 0):
        rows = (np.arange(b) + start) % len(features)
        pose_rows = (np.arange(b) + start) % poses.n_train
        idx = torch.from_numpy(pose_rows).to(device)
        audio = torch.from_numpy(head._windows(features, rows)).to(device)
        return rows, pose_rows, audio, head._viewmats[idx], head._K.expand(b, 3, 3), head._au45[idx], \
            head.torso_backgrounds(pose_rows)

    variants = {"deformation_autocast": earlier_forward(net, fused=False),
                "deformation_autocast_fused_heads": earlier_forward(net, fused=True)}
    with torch.no_grad():
        cache = model.spatial_cache()
        for b in args.batch_sizes:
            rows, pose_rows, audio, viewmats, Ks, au45, backgrounds = inputs(b)
            tokens = net.tokens(audio, au45, viewmats)
            g = model.frame_gaussians(viewmats, audio, au45)
            stages = {
                "tokens": lambda: net.tokens(audio, au45, viewmats),
                "deformation": lambda: net(cache, tokens),
                "frame_gaussians": lambda: model.frame_gaussians(viewmats, audio, au45),
                "rasterize": lambda: rasterize(g.means, g.quats, g.scales, g.opacities, g.colors, viewmats, Ks,
                                               head.width, head.height),
                "model_render": lambda: model.render(viewmats, Ks, head.width, head.height, backgrounds,
                                                     audio=audio, au45=au45),
                "render_frames": lambda: head.render_frames(features, rows, pose_rows),
            }
            times = {name: wall(fn, device, args.repeats) for name, fn in stages.items()}
            for name, variant in variants.items():
                times[name] = wall(lambda: variant(cache, tokens), device, args.repeats)
            times = {name: round(1000 * t, 3) for name, t in times.items()}
            times["render_frames_fps"] = round(1000 * b / times["render_frames"], 1)
            result["stages_ms"][str(b)] = times
            print(f"batch {b}: {json.dumps(times)}", flush=True)

        largest = max(args.batch_sizes)
        rows, pose_rows, audio, viewmats, Ks, au45, backgrounds = inputs(largest)
        tokens = net.tokens(audio, au45, viewmats)
        if device.type == "cuda":
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(3):
                    model.render(viewmats, Ks, head.width, head.height, backgrounds, audio=audio, au45=au45)
                torch.cuda.synchronize(device)
            try:
                table = prof.key_averages().table(sort_by="device_time_total", row_limit=30)
            except Exception:  # noqa: BLE001 - older torch names the column after CUDA
                table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30)
            if args.trace:
                Path(args.trace).write_text(f"model_render x3, batch {largest}, {n_gaussians} Gaussians, "
                                            f"{result['device']}\n{table}\n")
            print(table, flush=True)

        # each variant's held-out renders against the shipped code's (do they change the image?)
        held = np.arange(poses.n_train, len(poses.frame_ids))

        def render_held() -> np.ndarray:
            return np.concatenate([head.render_frames(features, poses.audio_ids[c], c)
                                   for c in np.array_split(held, max(1, len(held) // largest))])

        shipped = render_held()
        result["variants_psnr_vs_shipped"] = {}
        for name, variant in variants.items():
            net.forward = variant  # an instance attribute: the head's calls of the network reach the variant
            try:
                renders = render_held()
            finally:
                del net.forward
            result["variants_psnr_vs_shipped"][name] = {
                "psnr": float(np.mean(metrics.psnr(renders, shipped))),
                "max_abs_diff_8bit": int(np.abs(renders.astype(np.int16) - shipped.astype(np.int16)).max())}
        print("variants vs shipped:", json.dumps(result["variants_psnr_vs_shipped"]), flush=True)
        if args.skip_static:
            Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
            print("wrote", args.json, flush=True)
            return
        result["static"] = static_gaussians(head, features, args.thresholds, device, args.repeats, largest, cache,
                                            metrics)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")  # before the compiler, which may be slow
        if device.type == "cuda" and not args.no_compile:
            try:
                compiled = torch.compile(net._reduced_precision_copy()._forward)
                half = SpatialCache(features=cache.features.half(), queries=cache.queries.half())
                start = time.perf_counter()
                compiled(half, tokens.half())
                torch.cuda.synchronize(device)
                compile_s = time.perf_counter() - start
                ms = 1000 * wall(lambda: compiled(half, tokens.half()), device, args.repeats)
                result["deformation_compiled"] = {"batch": largest, "ms": round(ms, 3),
                                                  "compile_s": round(compile_s, 1)}
            except Exception as e:  # noqa: BLE001 - a missing compiler (triton) is a result too
                result["deformation_compiled"] = {"error": f"{e.__class__.__name__}: {str(e)[:300]}"}
            print("compiled:", json.dumps(result["deformation_compiled"]), flush=True)

    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    print("wrote", args.json, flush=True)


def static_gaussians(head, features, thresholds, device, repeats, batch, cache, metrics) -> dict:
    """How many Gaussians never move (training frames), and the held-out renders with those baked."""
    model, net, poses = head.model, head.model.deformation, head.poses
    p = model.gaussians.params
    depth = (head._viewmats[:, 2, :3] @ p["means"].T + head._viewmats[:, 2, 3:]).mean()
    pixel = float(depth / head._K[0, 0])  # world units per pixel at the head's mean depth

    def offsets(positions: np.ndarray) -> Offsets:
        idx = torch.from_numpy(positions).to(device)
        audio = torch.from_numpy(head._windows(features, poses.audio_ids[positions])).to(device)
        return net(cache, net.tokens(audio, head._au45[idx], head._viewmats[idx]))

    train = np.arange(poses.n_train)
    chunks = [train[i:i + batch] for i in range(0, len(train), batch)]
    mean = {name: 0.0 for name in HEAD_NAMES}
    for chunk in chunks:
        o = offsets(chunk)
        for name in HEAD_NAMES:
            mean[name] = mean[name] + getattr(o, name).sum(0)
    mean = {name: value / len(train) for name, value in mean.items()}
    scale_mean = torch.exp(p["scales"] + mean["scales"])
    quat_mean = F.normalize(p["quats"] + mean["quats"], dim=-1)
    opacity_mean = torch.sigmoid(p["opacities"] + mean["opacities"][:, 0])
    worst = torch.zeros(len(model.gaussians), device=device)
    for chunk in chunks:
        o = offsets(chunk)
        position = (o.means - mean["means"]).norm(dim=-1) / pixel
        size = (torch.exp(p["scales"] + o.scales) - scale_mean).abs().amax(-1) / pixel
        cos = (F.normalize(p["quats"] + o.quats, dim=-1) * quat_mean).sum(-1).abs().clamp(max=1.0)
        turn = 2 * torch.acos(cos) * torch.exp(p["scales"] + o.scales).amax(-1) / pixel
        colour = (o.colors - mean["colors"]).abs().amax(-1) * SH_C0 * 255
        opacity = (torch.sigmoid(p["opacities"] + o.opacities[..., 0]) - opacity_mean).abs() * 255
        step = torch.stack([position, size, turn, colour, opacity]).amax(0).amax(0)
        worst = torch.maximum(worst, step)
    out = {"pixel_world_units": pixel, "train_frames": int(len(train)),
           "max_change_quantiles": {str(q): round(float(torch.quantile(worst.float().cpu(), q)), 3)
                                    for q in (0.1, 0.25, 0.5, 0.75, 0.9)}}

    held = np.arange(poses.n_train, len(poses.frame_ids))
    truths = None
    try:
        import cv2

        truths = np.stack([cv2.resize(cv2.cvtColor(cv2.imread(str(Path(head.dataset_dir) / "gt_imgs" / f"{i}.jpg")),
                                                   cv2.COLOR_BGR2RGB), (head.width, head.height),
                                      interpolation=cv2.INTER_AREA) for i in poses.frame_ids[held]])
    except Exception:  # noqa: BLE001 - PSNR against the truth is optional (no gt_imgs)
        pass

    def render_held() -> np.ndarray:
        return np.concatenate([head.render_frames(features, poses.audio_ids[c], c)
                               for c in np.array_split(held, max(1, len(held) // batch))])

    full = render_held()
    out["full_psnr_vs_gt"] = float(np.mean(metrics.psnr(full, truths))) if truths is not None else None
    rows = np.arange(batch) % poses.n_train
    audio = torch.from_numpy(head._windows(features, poses.audio_ids[rows])).to(device)
    idx = torch.from_numpy(rows).to(device)
    tokens = net.tokens(audio, head._au45[idx], head._viewmats[idx])
    full_ms = 1000 * wall(lambda: net(cache, tokens), device, repeats)
    out["deformation_ms_all"] = round(full_ms, 3)
    real_forward = net.forward  # the shipped forward, which `baked` wraps
    out["thresholds"] = []
    for threshold in thresholds:
        static = worst < threshold
        moving = ~static
        sub = SpatialCache(features=cache.features[moving], queries=cache.queries[moving])
        sub_ms = 1000 * wall(lambda: net(sub, tokens), device, repeats)

        def baked(c, t, static=static):
            o = real_forward(c, t)
            for name in HEAD_NAMES:
                getattr(o, name)[:, static] = mean[name][static]
            return o

        net.forward = baked
        try:
            renders = render_held()
        finally:
            del net.forward  # back to the class's forward
        row = {"max_change": threshold, "static_share": round(float(static.float().mean()), 4),
               "deformation_ms_moving_only": round(sub_ms, 3),
               "psnr_vs_full": float(np.mean(metrics.psnr(renders, full))),
               "max_abs_diff_8bit": int(np.abs(renders.astype(np.int16) - full.astype(np.int16)).max()),
               "psnr_vs_gt": float(np.mean(metrics.psnr(renders, truths))) if truths is not None else None}
        out["thresholds"].append(row)
        print("static:", json.dumps(row), flush=True)
    return out


if __name__ == "__main__":
    main()
