"""Task 3: ori_imgs/N.jpg at 25 fps, framed around the speaker (egstalker.preprocess.framing), streamed (one frame
in memory per worker) and cropped, scaled and JPEG-encoded in threads."""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from egstalker.dataset.layout import DatasetLayout
from egstalker.preprocess.face import face_cache_path
from egstalker.preprocess.framing import Framing, choose_framing
from egstalker.preprocess.tasks import Task, TaskContext


def _write_jpeg(path, image_bgr: np.ndarray, quality: int) -> int:
    import cv2

    # optimised Huffman tables: 3 % smaller for free in quality, ~0.8 ms more per 512x512 frame
    ok, data = cv2.imencode(".jpg", image_bgr, [cv2.IMWRITE_JPEG_QUALITY, quality, cv2.IMWRITE_JPEG_OPTIMIZE, 1])
    if not ok:
        raise RuntimeError(f"JPEG encoding failed for {path}")
    with open(path, "wb") as f:
        f.write(data.tobytes())
    return len(data)


def _write_frame(path, image_bgr: np.ndarray, framing: Framing, quality: int) -> int:
    return _write_jpeg(path, framing.apply(image_bgr), quality)


def extract_frames(ctx: TaskContext) -> None:
    """Write every 25 fps frame, framed; record the framing (meta 'framing', 'width', 'height') and the
    audio/video sync report (meta 'sync')."""
    from tqdm import tqdm

    from egstalker.media import iter_frames

    n_frames = int(ctx.meta["n_frames"])
    quality = int(ctx.config.frames.jpeg_quality)
    width, height = video_size(ctx.meta)
    framing, report = choose_framing(ctx.video_path, width, height, n_frames / ctx.config.frames.fps,
                                     ctx.config.frames.crop, ctx.config.frames.max_size)
    # the face cache holds pixel positions in the old frames: tasks 4, 7 and 8 detect again in the new ones
    face_cache_path(ctx.dataset).unlink(missing_ok=True)
    ctx.staging.frames_dir.mkdir(parents=True, exist_ok=True)
    workers = max(1, min(4, os.cpu_count() or 1))
    offsets = np.zeros(n_frames, np.float64)
    source_times = np.zeros(n_frames, np.float64)
    pending: deque = deque()
    bytes_written = 0
    with ThreadPoolExecutor(workers, thread_name_prefix="jpeg") as pool, \
            tqdm(total=n_frames, desc="3 frames", unit="frame", disable=not ctx.show_progress) as bar:
        for frame in iter_frames(ctx.video_path, ctx.config.frames.fps, n_frames=n_frames,
                                 start=float(ctx.meta["video_start"]), pixel_format="bgr24"):
            offsets[frame.index] = frame.offset
            source_times[frame.index] = frame.source_time
            pending.append(pool.submit(_write_frame, ctx.staging.frame(frame.index), frame.image, framing, quality))
            while len(pending) > 2 * workers:  # bounded memory: at most a few decoded frames wait
                bytes_written += pending.popleft().result()
                bar.update()
        while pending:
            bytes_written += pending.popleft().result()
            bar.update()
    shown = np.unique(source_times)
    ctx.meta["sync"] = {
        "source_fps": ctx.meta.get("source_fps"),
        "output_fps": ctx.config.frames.fps,
        "worst_offset_ms": round(float(np.max(np.abs(offsets))) * 1000, 2),
        "mean_abs_offset_ms": round(float(np.mean(np.abs(offsets))) * 1000, 2),
        "source_frames": int(ctx.meta.get("source_frames", 0)),
        "source_frames_shown": int(len(shown)),
        "repeated_frames": int(n_frames - len(shown)),
        "audio_samples_per_frame": 640,
        "note": "offset = time of the source frame shown - the output frame's time; audio sample 0 is output "
                "frame 0's time, so this is also the worst audio/video offset",
    }
    ctx.meta["frames"] = {"jpeg_quality": quality, "bytes": int(bytes_written)}
    ctx.meta["framing"] = report
    ctx.meta["width"], ctx.meta["height"] = framing.width, framing.height


def video_size(meta: dict) -> tuple[int, int]:
    """The source video's size (datasets made before framing record it as the frames' size)."""
    return int(meta.get("video_width", meta.get("width"))), int(meta.get("video_height", meta.get("height")))


def framing_changed(meta: dict, config) -> bool:
    """Whether the frames were framed with other settings than `config` asks for (task 3 then redoes them);
    datasets made before framing existed are kept as they are."""
    recorded = meta.get("framing")
    return recorded is not None and (recorded.get("crop"), recorded.get("max_size")) != \
        (config.frames.crop, int(config.frames.max_size))


def _frames_done(layout: DatasetLayout, meta: dict) -> list:
    return [layout.frame(i) for i in range(int(meta.get("n_frames", 0)))] or [layout.frames_dir]


FRAMES_TASK = Task(3, "frames", extract_frames, outputs=_frames_done)
