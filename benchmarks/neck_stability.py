"""Torso and neck stability: does the neck flicker, or the chin/neck seam open, when the head moves or the audio
is new? (issue 3: "justify the torso/neck design with renders")

The head is Gaussians; the neck and torso are the pose frame's own torso image (docs/model.md, "Torso and neck").
So the only ways the neck can go wrong are the head's Gaussians moving over it, and a gap between the rendered
chin and the torso image when the jaw moves differently from the pose frame's. This script renders a trained
model four ways and measures both, per frame, with the dataset's parsing labels of each pose frame:

- heldout_own:   held-out poses with their own audio (ground truth exists: errors against it);
- heldout_novel: the same poses with new speech (what changes when only the audio is new);
- loop_own:      the training poses in the `loop` schedule (ping-pong, as `render` plays long audio) with each
                 pose frame's own audio (what the training clip did);
- loop_novel:    the same schedule, driven by the new speech (what a user gets).

Per frame:
- neck_change: mean |frame t - frame t-1| over the neck (labels NECK of both pose frames), 8-bit levels; also
  for the torso image the head is rendered over ("source": the real neck's own motion) and the ground truth;
- neck_flicker: the same for |t+1 - 2t + t-1| (a flicker flips back; smooth motion does not);
- seam_holes: the fraction of the chin/neck seam band (HEAD and NECK pixels within `seam` px of both labels) where
  neither the head (alpha < 0.5) nor the torso image (alpha < 0.5) covers the pixel: background showing through,
  the "broken neck" of peers;
- with ground truth: mean absolute error over the neck, the seam band, the head and the whole frame.

Summaries add the frames around each turn of the loop, and the excess neck change (render minus source) by
quartile of head motion (rotation between consecutive pose frames). A contact sheet (JPEG) shows the lower face
and neck of the frames with the largest excess neck change and of the frames around the first loop turn.

    python benchmarks/neck_stability.py features MODEL SPEECH.wav OUT.npy     (encode new speech: needs the encoder)
    python benchmarks/neck_stability.py measure MODEL --dataset DS --speech-features OUT.npy --device cuda \
        --json benchmarks/results/neck_stability_h200_lieu.json --sheet benchmarks/results/neck_stability_h200_lieu.jpg

GPU runs: benchmarks/gpu_neck_stability.sh. Raw output: benchmarks/results/neck_stability_*.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from egstalker.dataset.layout import DatasetLayout  # noqa: E402
from egstalker.dataset.reader import load_torso_rgba  # noqa: E402
from egstalker.preprocess.parsing import HEAD, NECK, TORSO, load_labels  # noqa: E402


@dataclass
class PoseFrame:
    """What one pose frame contributes to the measures, at the model's size."""

    neck: np.ndarray        # [H, W] bool
    seam: np.ndarray        # [H, W] bool: chin/neck seam band
    head: np.ndarray        # [H, W] bool
    torso_alpha: np.ndarray  # [H, W] float32 in [0, 1]
    source_u8: np.ndarray   # [H, W, 3] uint8: torso image on the background (what the head is rendered over)
    truth_u8: np.ndarray | None  # [H, W, 3] uint8, when the dataset holds gt_imgs

    @property
    def source(self) -> np.ndarray:
        return self.source_u8.astype(np.float32)

    @property
    def truth(self) -> np.ndarray | None:
        return None if self.truth_u8 is None else self.truth_u8.astype(np.float32)


class PoseFrames:
    def __init__(self, head, seam_px: int):
        self.layout = DatasetLayout(head.dataset_dir)
        self.size = (head.width, head.height)
        self.frame_ids = head.poses.frame_ids
        self.kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * seam_px + 1, 2 * seam_px + 1))
        from egstalker.dataset.reader import load_background

        self.background = load_background(self.layout, self.size)
        self._cache: dict[int, PoseFrame] = {}

    def __getitem__(self, pose: int) -> PoseFrame:
        if pose not in self._cache:  # all kept (uint8): the loop schedule comes back to every pose frame
            self._cache[pose] = self._load(int(self.frame_ids[pose]))
        return self._cache[pose]

    def _load(self, frame_id: int) -> PoseFrame:
        labels = cv2.resize(load_labels(self.layout.parsing(frame_id)), self.size, interpolation=cv2.INTER_NEAREST)
        head = labels == HEAD
        neck, seam = throat_regions(labels, self.kernel)
        rgba = load_torso_rgba(self.layout, frame_id, self.size).astype(np.float32) / 255.0
        torso_alpha = rgba[..., 3]
        # as TalkingHead.torso_backgrounds composites it (and the renders round it)
        source = rgba[..., :3] * rgba[..., 3:] + self.background * (1.0 - rgba[..., 3:])
        truth = None
        gt = self.layout.gt(frame_id)
        if gt.exists():
            bgr = cv2.imread(str(gt))
            truth = cv2.resize(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), self.size, interpolation=cv2.INTER_AREA)
        return PoseFrame(neck, seam, head, torso_alpha, (source * 255.0 + 0.5).astype(np.uint8), truth)


def throat_regions(labels: np.ndarray, kernel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(neck, seam) [H, W] bool, as task 6 sees the throat (egstalker.preprocess.torso.under_the_chin).

    The neck is the body (NECK and TORSO labels) under the head across the neck label's columns, down to the
    neck label's lowest row: the shadow under the chin is often labelled torso. The seam band is the head pixels
    within the kernel's reach of that neck and the neck pixels within its reach of the head (stray torso pixels
    on the hair's edge are not body under the head, so the hair's edge is not in the band)."""
    from egstalker.preprocess.torso import under_the_chin

    neck_label = labels == NECK
    if not neck_label.any():
        empty = np.zeros(labels.shape, bool)
        return empty, empty
    head = labels == HEAD
    neck = under_the_chin(neck_label, labels == TORSO, head)
    neck[int(np.flatnonzero(neck_label.any(1))[-1]) + 1:] = False
    near_neck = cv2.dilate(neck.view(np.uint8), kernel).astype(bool)
    near_head = cv2.dilate(head.view(np.uint8), kernel).astype(bool)
    seam = (head & near_neck) | (neck & near_head)
    return neck, seam


def masked_mean(values: np.ndarray, mask: np.ndarray) -> float:
    """Mean of |values| over `mask` pixels (channels averaged); nan for an empty mask."""
    if not mask.any():
        return float("nan")
    return float(np.abs(values[mask]).mean())


@dataclass
class Series:
    """Per-frame measures of one rendered sequence (nan where not defined)."""

    poses: list[int] = field(default_factory=list)
    neck_change: list[float] = field(default_factory=list)
    source_neck_change: list[float] = field(default_factory=list)
    truth_neck_change: list[float] = field(default_factory=list)
    neck_flicker: list[float] = field(default_factory=list)
    source_neck_flicker: list[float] = field(default_factory=list)
    truth_neck_flicker: list[float] = field(default_factory=list)
    seam_holes: list[float] = field(default_factory=list)
    head_over_neck: list[float] = field(default_factory=list)
    error_neck: list[float] = field(default_factory=list)
    error_seam: list[float] = field(default_factory=list)
    error_head: list[float] = field(default_factory=list)
    error_frame: list[float] = field(default_factory=list)


def render_sequence(head, pose_frames: PoseFrames, features: np.ndarray, rows: np.ndarray, poses: np.ndarray,
                    with_truth_errors: bool, batch: int, keep: set[int] | None = None) -> tuple[Series, dict]:
    """Render frames (features[rows] around each row, pose frames `poses`) in batches and measure them.

    Frames are streamed: only the last two are kept, plus those whose index is in `keep` (returned)."""
    s = Series()
    kept: dict[int, np.ndarray] = {}
    history: list[tuple[np.ndarray, PoseFrame]] = []  # (frame levels float32, pose frame) of t-2, t-1
    nan = float("nan")
    for lo in range(0, len(rows), batch):
        frames, alphas = head.render_layers(features, rows[lo:lo + batch], poses[lo:lo + batch])
        for k, (frame, alpha) in enumerate(zip(frames, alphas)):
            t = lo + k
            p = pose_frames[int(poses[t])]
            if keep is not None and t in keep:
                kept[t] = frame
            level = frame.astype(np.float32)
            s.poses.append(int(poses[t]))
            holes = (alpha < 0.5) & (p.torso_alpha < 0.5) & p.seam
            s.seam_holes.append(float(holes.sum() / max(1, p.seam.sum())))
            s.head_over_neck.append(float(alpha[p.neck].mean()) if p.neck.any() else nan)
            if with_truth_errors and p.truth_u8 is not None:
                diff = level - p.truth
                s.error_neck.append(masked_mean(diff, p.neck))
                s.error_seam.append(masked_mean(diff, p.seam))
                s.error_head.append(masked_mean(diff, p.head))
                s.error_frame.append(float(np.abs(diff).mean()))
            if history:
                prev, pp = history[-1]
                neck = p.neck | pp.neck
                s.neck_change.append(masked_mean(level - prev, neck))
                s.source_neck_change.append(masked_mean(p.source - pp.source, neck))
                s.truth_neck_change.append(masked_mean(p.truth - pp.truth, neck)
                                           if p.truth_u8 is not None and pp.truth_u8 is not None else nan)
            else:
                for name in ("neck_change", "source_neck_change", "truth_neck_change"):
                    getattr(s, name).append(nan)
            if len(history) == 2:  # the flicker of frame t-1, appended at t (first and last frames: nan)
                (prev2, p2), (prev, pp) = history
                neck = p2.neck | pp.neck | p.neck
                s.neck_flicker.append(masked_mean(level - 2 * prev + prev2, neck))
                s.source_neck_flicker.append(masked_mean(p.source - 2 * pp.source + p2.source, neck))
                s.truth_neck_flicker.append(
                    masked_mean(p.truth - 2 * pp.truth + p2.truth, neck)
                    if p.truth_u8 is not None and pp.truth_u8 is not None and p2.truth_u8 is not None else nan)
            history = (history + [(level, p)])[-2:]
    for name in ("neck_flicker", "source_neck_flicker", "truth_neck_flicker"):  # align to frames: nan at both ends
        values = getattr(s, name)
        setattr(s, name, [nan] + values + [nan] if len(rows) >= 2 else [nan] * len(rows))
    return s, kept


def stats(values) -> dict | None:
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return None
    return {"mean": round(float(v.mean()), 4), "p95": round(float(np.percentile(v, 95)), 4),
            "max": round(float(v.max()), 4), "frames": int(len(v))}


def head_rotation_steps(viewmats: np.ndarray, poses: np.ndarray) -> np.ndarray:
    """Degrees the head turns between consecutive frames of a pose sequence ([n]; 0 for the first)."""
    rot = viewmats[poses, :3, :3]
    rel = np.einsum("nij,nkj->nik", rot[1:], rot[:-1])  # R_t R_{t-1}^T
    cos = np.clip((np.trace(rel, axis1=1, axis2=2) - 1.0) / 2.0, -1.0, 1.0)
    return np.concatenate([[0.0], np.degrees(np.arccos(cos))])


def loop_turns(poses: np.ndarray) -> np.ndarray:
    """Frames where a ping-pong schedule turns (the step changes sign)."""
    step = np.diff(poses)
    return np.flatnonzero(step[1:] * step[:-1] < 0) + 1


def summarise(s: Series, rotation: np.ndarray | None = None, turns: np.ndarray | None = None) -> dict:
    out: dict = {"frames": len(s.poses)}
    for name in ("neck_change", "source_neck_change", "truth_neck_change", "neck_flicker", "source_neck_flicker",
                 "truth_neck_flicker", "seam_holes", "head_over_neck", "error_neck", "error_seam", "error_head",
                 "error_frame"):
        values = getattr(s, name)
        if values:
            out[name] = stats(values)
    holes = np.asarray(s.seam_holes)
    out["frames_with_seam_holes_over_1pct"] = int((holes > 0.01).sum())
    excess = np.asarray(s.neck_change) - np.asarray(s.source_neck_change)
    out["excess_neck_change"] = stats(excess)
    if turns is not None and len(turns):
        near = np.zeros(len(s.poses), bool)
        for t in turns:
            near[max(0, t - 2):t + 3] = True
        out["loop_turns"] = [int(t) for t in turns]
        out["near_turns"] = {name: stats(np.asarray(getattr(s, name))[near])
                             for name in ("neck_change", "source_neck_change", "neck_flicker", "seam_holes")}
    if rotation is not None and len(rotation) > 8:
        finite = np.isfinite(excess)
        edges = np.quantile(rotation[finite], [0.25, 0.5, 0.75])
        quartile = np.searchsorted(edges, rotation)
        out["excess_neck_change_by_head_rotation_quartile"] = [
            {"rotation_deg_max": round(float(rotation[finite & (quartile == q)].max()), 3),
             "excess": stats(excess[finite & (quartile == q)])} for q in range(4)]
    return out


def crop_box(pose_frames: PoseFrames, poses: list[int], height: int, width: int) -> tuple[int, int, int, int]:
    """A square around the chin/neck seam of these pose frames, twice the seam's width (y0, y1, x0, x1)."""
    mask = np.zeros((height, width), bool)
    for p in poses:
        mask |= pose_frames[p].seam
    if not mask.any():
        return 0, height, 0, width
    ys, xs = np.nonzero(mask)
    cy, cx = (ys.min() + ys.max()) / 2, (xs.min() + xs.max()) / 2
    side = int(min(height, width, 2 * max(xs.max() - xs.min(), ys.max() - ys.min(), 16)))
    y0 = int(np.clip(cy - side / 2, 0, height - side))  # shifted, not clipped, at the image's edges: square
    x0 = int(np.clip(cx - side / 2, 0, width - side))
    return y0, y0 + side, x0, x0 + side


def contact_sheet(rows: list[tuple[str, np.ndarray, np.ndarray]], box: tuple[int, int, int, int],
                  cell: int = 192) -> np.ndarray:
    """BGR image: one row per (label, render, pose frame's truth or source), both cropped to `box`."""
    y0, y1, x0, x1 = box
    out = []
    for label, render, reference in rows:
        cells = [cv2.resize(np.ascontiguousarray(im[y0:y1, x0:x1]), (cell, cell), interpolation=cv2.INTER_NEAREST)
                 for im in (render, reference)]
        row = cv2.cvtColor(np.hstack(cells).astype(np.uint8), cv2.COLOR_RGB2BGR)
        cv2.putText(row, label, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 255, 255), 1, cv2.LINE_AA)
        out.append(row)
    return np.vstack(out)


def measure(model_dir: Path, dataset: Path | None, speech_features: Path, device: str, batch: int,
            seam_fraction: float, max_frames: int | None) -> tuple[dict, np.ndarray]:
    import torch

    from egstalker.inference import TalkingHead

    t0 = time.perf_counter()
    head = TalkingHead.from_dir(model_dir, device=device, dataset_dir=dataset, check_encoder=False)
    novel = np.load(speech_features).astype(np.float32)
    if tuple(novel.shape[1:]) != tuple(head.info.spec.feature_shape):
        raise SystemExit(f"{speech_features}: features {novel.shape[1:]} but the model takes "
                         f"{tuple(head.info.spec.feature_shape)}; encode the speech with the model's encoder")
    own = np.load(DatasetLayout(head.dataset_dir).audio_features).astype(np.float32)
    seam_px = max(2, int(round(seam_fraction * head.height)))
    pose_frames = PoseFrames(head, seam_px)
    poses = head.poses
    viewmats = np.asarray(poses.viewmats)
    n_novel = len(novel) if max_frames is None else min(len(novel), max_frames)
    held = np.arange(poses.n_train, len(poses.frame_ids))
    held = held[:n_novel]
    loop = head.pose_schedule(n_novel, "loop")
    turns = loop_turns(loop)
    result: dict = {
        "command": "python " + " ".join(sys.argv),
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else f"CPU {platform.machine()}",
        "torch": torch.__version__, "model": str(model_dir), "dataset": str(head.dataset_dir),
        "size": [head.width, head.height], "gaussians": int(head.info.spec.n_gaussians),
        "encoder": head.encoder_name, "speech_frames": int(n_novel), "pose_frames_train": int(poses.n_train),
        "seam_band_px": seam_px, "units": "8-bit levels (0-255), fractions for seam_holes and head_over_neck",
        "sequences": {},
    }
    # the frames the contact sheet shows are chosen after measuring: render loop_novel once, keeping candidates
    sequences = {
        "heldout_own": (own, poses.audio_ids[held], held, True),
        "heldout_novel": (novel, np.arange(len(held)), held, False),
        "loop_own": (own, poses.audio_ids[loop], loop, True),
        "loop_novel": (novel, np.arange(n_novel), loop, False),
    }
    series = {}
    kept_loop: dict[int, np.ndarray] = {}
    for name, (features, rows, pose_rows, errors) in sequences.items():
        t = time.perf_counter()
        keep = None
        if name == "loop_novel":  # every frame's neck is measured; the turns' frames are kept for the sheet
            keep = {int(x) for turn in turns[:1] for x in range(turn - 2, turn + 2)}
        s, kept = render_sequence(head, pose_frames, features, np.asarray(rows), np.asarray(pose_rows), errors,
                                  batch, keep)
        kept_loop.update(kept)
        series[name] = s
        rotation = head_rotation_steps(viewmats, np.asarray(pose_rows))
        result["sequences"][name] = summarise(s, rotation, turns if name.startswith("loop") else None)
        result["sequences"][name]["seconds"] = round(time.perf_counter() - t, 2)
        print(json.dumps({name: {k: v for k, v in result["sequences"][name].items()
                                 if k in ("frames", "neck_change", "source_neck_change", "truth_neck_change",
                                          "seam_holes", "error_seam", "seconds")}}), flush=True)
    # the worst frames of loop_novel (largest render-minus-source neck change): rendered again for the sheet
    s = series["loop_novel"]
    excess = np.nan_to_num(np.asarray(s.neck_change) - np.asarray(s.source_neck_change), nan=-1e9)
    worst = [int(t) for t in np.argsort(-excess)[:4]]
    rows_sheet = []
    box = crop_box(pose_frames, [int(loop[t]) for t in worst + sorted(kept_loop)], head.height, head.width)
    for t in worst:
        frame = head.render_frames(novel, [t], [loop[t]])[0]
        ref = pose_frames[int(loop[t])]
        reference = ref.truth if ref.truth_u8 is not None else ref.source
        rows_sheet.append((f"new speech t={t} {excess[t]:+.2f} lv", frame, reference))
    for t in sorted(kept_loop):
        ref = pose_frames[int(loop[t])]
        reference = ref.truth if ref.truth_u8 is not None else ref.source
        rows_sheet.append((f"loop turn t={t} pose {int(loop[t])}", kept_loop[t], reference))
    sheet = contact_sheet(rows_sheet, box)
    result["sheet"] = {"rows": [label for label, _, _ in rows_sheet], "columns": ["render", "pose frame's truth"],
                       "crop_yxyx": list(box)}
    result["per_frame"] = {name: {k: [round(x, 4) if np.isfinite(x) else None for x in getattr(s, k)]
                                  for k in ("neck_change", "source_neck_change", "seam_holes")}
                           | {"poses": s.poses} for name, s in series.items()}
    result["wall_seconds"] = round(time.perf_counter() - t0, 1)
    return result, sheet


def count_gaps(datasets: list[Path], rows: int) -> dict:
    """Task 6's output alone: frames whose torso image leaves a gap under the chin (chin_gaps, `rows` px)."""
    from egstalker.preprocess.torso import chin_gaps

    out = {}
    for root in datasets:
        layout = DatasetLayout(root)
        frames = sorted(int(p.stem) for p in layout.torso_dir.glob("*.png"))
        if not frames:
            raise SystemExit(f"{root}: no torso_imgs/*.png; give a preprocessed dataset folder")
        columns = []
        for i in frames:
            torso = cv2.imread(str(layout.torso(i)), cv2.IMREAD_UNCHANGED)
            covered = torso[..., 3] > 0 if torso.ndim == 3 and torso.shape[2] == 4 else np.ones(torso.shape[:2], bool)
            columns.append(len(chin_gaps(load_labels(layout.parsing(i)), covered, rows)))
        out[str(root)] = {"frames": len(frames), "frames_with_a_gap": int(np.count_nonzero(columns)),
                          "gap_columns_mean": round(float(np.mean(columns)), 2), "gap_columns_max": int(max(columns))}
        print(json.dumps({str(root): out[str(root)]}), flush=True)
    return {"command": "python " + " ".join(sys.argv), "rows_under_the_head": rows, "datasets": out}


def encode_features(model_dir: Path, speech: Path, out: Path) -> None:
    from egstalker.inference import TalkingHead
    from egstalker.render.api import load_speech

    head = TalkingHead.from_dir(model_dir)
    features = head.encode_audio(load_speech(speech))
    tmp = out.with_name(f".{out.name}.tmp.npy")
    np.save(tmp, features.astype(np.float16))  # travels to the GPU machine: half the size, well inside its noise
    tmp.replace(out)
    print(f"{out}: {features.shape} ({head.encoder_name})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("features", help="encode new speech with the model's encoder (float16 .npy)")
    f.add_argument("model", type=Path)
    f.add_argument("speech", type=Path)
    f.add_argument("out", type=Path)
    m = sub.add_parser("measure", help="render and measure the neck (see the module docstring)")
    m.add_argument("model", type=Path)
    m.add_argument("--dataset", type=Path, default=None, help="the dataset folder (default: model.json's)")
    m.add_argument("--speech-features", type=Path, required=True, help="new speech, encoded by `features`")
    m.add_argument("--device", default="cuda")
    m.add_argument("--batch", type=int, default=16)
    m.add_argument("--seam", type=float, default=0.02, help="seam band half-width, a fraction of the height")
    m.add_argument("--max-frames", type=int, default=None, help="limit the new speech (CPU dry runs)")
    m.add_argument("--json", type=Path, required=True)
    m.add_argument("--sheet", type=Path, default=None)
    g = sub.add_parser("gaps", help="count torso images that leave a gap under the chin (no model needed)")
    g.add_argument("datasets", type=Path, nargs="+")
    g.add_argument("--rows", type=int, default=4, help="px under the head the torso image must continue")
    g.add_argument("--json", type=Path, required=True)
    args = ap.parse_args()
    if args.cmd == "features":
        encode_features(args.model, args.speech, args.out)
        return
    if args.cmd == "gaps":
        result = count_gaps(args.datasets, args.rows)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
        return
    result, sheet = measure(args.model, args.dataset, args.speech_features, args.device, args.batch, args.seam,
                            args.max_frames)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.json.with_name(f".{args.json.name}.tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(args.json)
    if args.sheet is not None:
        cv2.imwrite(str(args.sheet), sheet, [cv2.IMWRITE_JPEG_QUALITY, 92])
    print(f"wrote {args.json}" + (f" and {args.sheet}" if args.sheet else ""))


if __name__ == "__main__":
    main()
