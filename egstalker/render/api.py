"""New speech in, talking-head video out: the Python API behind `egstalker render`.

`render(head, audio)` streams frames (what the server uses); `render_to_file(head, audio_path, out)` writes an
mp4 (H.264 + AAC, as long as the audio, 25 fps) with frames streamed to the encoder, optionally PNGs too.

Example:
    >>> head = TalkingHead.from_dir("models/lieu")
    >>> result = render_to_file(head, "speech.wav", "talk.mp4", pose="loop")
    >>> result.n_frames, result.path
    (250, PosixPath('talk.mp4'))
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Literal

import numpy as np

from egstalker.errors import EgstalkerError

if TYPE_CHECKING:
    from egstalker.inference import TalkingHead

PoseMode = Literal["dataset", "loop", "static"]
POSE_MODES = ("loop", "static", "dataset")
FEATURE_RATE = 16000
"""Sample rate the audio encoders read."""
MUX_RATE = 48000
"""Sample rate of the audio muxed into the video (the user's speech at full quality, not the 16 kHz copy)."""

NAMED_COLOURS = {"black": (0, 0, 0), "white": (255, 255, 255), "green": (0, 177, 64), "blue": (0, 71, 187),
                 "grey": (128, 128, 128), "gray": (128, 128, 128)}


def n_frames_for(n_samples: int, rate: int = FEATURE_RATE, fps: float = 25.0) -> int:
    """Frames a video needs to last as long as `n_samples` of audio: round(duration * fps), halves rounded up
    (as the audio encoders count frames; Python's round() would round 32.5 down to 32)."""
    return int(np.floor(n_samples / rate * fps + 0.5))


def load_speech(path: str | os.PathLike, rate: int = FEATURE_RATE, min_seconds: float = 0.1) -> np.ndarray:
    """Decode any audio (or video with sound) file to mono float32 at `rate`; refuse silence and empty files."""
    from egstalker.media import NEAR_SILENT_PEAK, read_audio

    path = Path(path)
    wav = read_audio(path, rate=rate, align_to_video=False)
    if len(wav) < min_seconds * rate:
        raise EgstalkerError(f"{path} holds {len(wav) / rate:.2f} s of audio; give at least {min_seconds} s of speech")
    if not np.isfinite(wav).all():
        raise EgstalkerError(f"{path} decodes to invalid samples (NaN/inf); re-encode it as a wav file")
    peak = float(np.abs(wav).max())
    if peak < NEAR_SILENT_PEAK:
        raise EgstalkerError(f"{path} is silent (peak {20 * np.log10(max(peak, 1e-12)):.0f} dBFS); the video is "
                             "driven by speech, so give a recording with someone speaking")
    return wav


def parse_background(spec: str | None, width: int, height: int) -> np.ndarray | None:
    """--background value -> uint8 [H, W, 3] RGB, or None for the dataset's own background.

    spec: 'dataset' (or None), an image path (resized to the frame), a colour name (black, white, green, blue,
    grey), '#rrggbb' or 'r,g,b'.
    """
    if spec is None or spec == "dataset":
        return None
    colour = None
    if spec.lower() in NAMED_COLOURS:
        colour = NAMED_COLOURS[spec.lower()]
    elif spec.startswith("#") and len(spec) == 7:
        try:
            colour = tuple(int(spec[i:i + 2], 16) for i in (1, 3, 5))
        except ValueError:
            colour = None
    elif spec.count(",") == 2 and not Path(spec).exists():
        try:
            colour = tuple(int(v) for v in spec.split(","))
        except ValueError:
            colour = None
        if colour is not None and not all(0 <= v <= 255 for v in colour):
            colour = None
    if colour is not None:
        return np.broadcast_to(np.array(colour, np.uint8), (height, width, 3)).copy()
    path = Path(spec)
    if not path.is_file():
        raise EgstalkerError(f"--background {spec!r} is neither 'dataset', a colour ({', '.join(NAMED_COLOURS)}, "
                             "#rrggbb or r,g,b) nor an existing image file")
    import cv2

    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise EgstalkerError(f"--background {path} is not a readable image; give a png or jpg")
    # scaled to cover the frame and centred, as a wallpaper is: never stretched out of its proportions
    scale = max(width / image.shape[1], height / image.shape[0])
    size = (max(width, round(image.shape[1] * scale)), max(height, round(image.shape[0] * scale)))
    image = cv2.resize(image, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    left, top = (size[0] - width) // 2, (size[1] - height) // 2
    return cv2.cvtColor(np.ascontiguousarray(image[top:top + height, left:left + width]), cv2.COLOR_BGR2RGB)


def check_frames_dir(frames_dir: str | os.PathLike) -> Path:
    """Refuse (EgstalkerError) a --frames-dir that is a file or already holds numbered frames: a new render's
    frames would mix with the old ones (a shorter render leaves the old tail behind)."""
    path = Path(frames_dir)
    if path.exists() and not path.is_dir():
        raise EgstalkerError(f"--frames-dir {path} is a file; give a folder for the frames")
    if path.is_dir() and next(path.glob("[0-9][0-9][0-9][0-9][0-9][0-9].png"), None) is not None:
        raise EgstalkerError(f"--frames-dir {path} already holds frames (000000.png ...); choose an empty folder or "
                             "delete them")
    return path


def render(head: "TalkingHead", audio: np.ndarray | str | os.PathLike, pose: PoseMode = "loop",
           background: np.ndarray | None = None, batch_size: int = 8) -> Iterator[np.ndarray]:
    """Stream frames (uint8 [H, W, 3]) for a whole utterance: exactly round(seconds * fps) of them.

    Args:
        head: a loaded model (`TalkingHead.from_dir`).
        audio: 16 kHz mono float32 samples, or the path of any audio/video file with speech.
        pose: head pose, eye blink and torso source: 'loop' ping-pongs over the training frames (no jump at the
            turn), 'static' holds one frame, 'dataset' plays the training frames in order (holding the last one).
        background: uint8 [H, W, 3] replacing the dataset background (see `parse_background`), or None.
        batch_size: frames rendered per model call.
    """
    if batch_size < 1:
        raise EgstalkerError(f"batch_size must be at least 1, not {batch_size}")
    wav = load_speech(audio) if isinstance(audio, (str, os.PathLike)) else np.asarray(audio, np.float32)
    features = head.encode_audio(wav)
    n_frames = n_frames_for(len(wav), FEATURE_RATE, head.fps)
    if abs(len(features) - n_frames) > 2:
        raise RuntimeError(f"the audio encoder gave {len(features)} feature frames for {n_frames} video frames")
    poses = head.pose_schedule(n_frames, pose)
    last_row = len(features) - 1
    for start in range(0, n_frames, batch_size):
        stop = min(n_frames, start + batch_size)
        rows = [min(i, last_row) for i in range(start, stop)]
        batch = head.render_frames(features, rows, poses[start:stop], background=background)
        yield from batch


@dataclass(frozen=True)
class RenderResult:
    path: Path | None
    """The mp4 written (None when only PNG frames were asked for)."""
    n_frames: int
    audio_seconds: float
    render_seconds: float
    """Wall time from the first model call to the finished file (features and encoding included)."""
    frames_dir: Path | None = None

    @property
    def fps(self) -> float:
        return self.n_frames / self.render_seconds if self.render_seconds > 0 else float("inf")


def _file_sha256(path: str | os.PathLike) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def render_provenance(model_dir: str | os.PathLike, audio_path: str | os.PathLike, pose: str,
                      background: str | None) -> str:
    """What a video is rendered from (the model's weights, the speech's bytes, the pose mode, the background), as
    render_to_file writes it into the mp4's `comment` tag: `egstalker run` reuses a video only when it matches."""
    import json

    return json.dumps({"egstalker_render": {
        "model_sha256": _file_sha256(Path(model_dir) / "model.pt"), "speech_sha256": _file_sha256(audio_path),
        "pose": pose, "background": background or "dataset"}}, sort_keys=True)


def render_to_file(head: "TalkingHead", audio_path: str | os.PathLike, output: str | os.PathLike | None,
                   pose: PoseMode = "loop", background: str | np.ndarray | None = None,
                   frames_dir: str | os.PathLike | None = None, batch_size: int = 8,
                   show_progress: bool = True) -> RenderResult:
    """Render speech to an mp4 (and/or numbered PNGs), streaming: memory does not grow with the audio's length.

    The mp4 is written under a temporary name and renamed when complete. PNGs go to `frames_dir` as
    000000.png, 000001.png, ... (each written through a temporary name).
    """
    from tqdm import tqdm

    from egstalker.media import iter_audio
    from egstalker.render.video import Mp4Writer

    if output is None and frames_dir is None:
        raise EgstalkerError("nothing to write: give an output mp4 path and/or a frames folder")
    audio_path = Path(audio_path)
    wav = load_speech(audio_path, FEATURE_RATE)
    comment = (render_provenance(head.model_dir, audio_path, pose, background)
               if output is not None and (background is None or isinstance(background, str)) else None)
    if isinstance(background, str) or background is None:
        background = parse_background(background, head.width, head.height)
    n_frames = n_frames_for(len(wav), FEATURE_RATE, head.fps)
    start = time.perf_counter()
    writer = None
    if output is not None:  # first: a bad output path is refused before the frames folder is made
        # the speech at full quality for the video's sound track, decoded as the frames are written (the same
        # samples as load_speech's, so the sound track is as long as the frames)
        writer = Mp4Writer(output, head.width, head.height, head.fps, audio=iter_audio(audio_path, MUX_RATE),
                           audio_rate=MUX_RATE, comment=comment, inputs=(audio_path,))
    frames_path = None
    try:
        if frames_dir is not None:
            frames_path = check_frames_dir(frames_dir)
            try:
                frames_path.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise EgstalkerError(f"cannot create frames folder {frames_path} ({e.strerror})") from None
        with tqdm(total=n_frames, desc="render", unit="frame", disable=not show_progress) as bar:
            frames = render(head, wav, pose=pose, background=background, batch_size=batch_size)
            # render the next batches on a worker thread while this one encodes (both release the GIL)
            for i, frame in enumerate(prefetch(frames, max_items=2 * batch_size)):
                if writer is not None:
                    writer.write(frame)
                if frames_path is not None:
                    _write_png(frames_path / f"{i:06d}.png", frame)
                bar.update(1)
        path = writer.close() if writer is not None else None
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    return RenderResult(path=path, n_frames=n_frames, audio_seconds=len(wav) / FEATURE_RATE,
                        render_seconds=time.perf_counter() - start, frames_dir=frames_path)


def prefetch(items: Iterator, max_items: int) -> Iterator:
    """Yield `items`, produced ahead on a worker thread (at most `max_items` waiting); errors are re-raised here.

    Leaving the loop early (or an error in the consumer) stops the worker after its current item.
    """
    import queue
    import threading

    buffer: queue.Queue = queue.Queue(maxsize=max(1, max_items))
    stop = threading.Event()
    done = object()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        buffer.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            buffer.put((done, None))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which re-raises it
            buffer.put((done, e))

    worker = threading.Thread(target=produce, name="egstalker-render", daemon=True)
    worker.start()
    try:
        while True:
            item, error = buffer.get()
            if item is done:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        stop.set()
        while worker.is_alive():  # unblock a producer waiting on a full queue
            try:
                buffer.get_nowait()
            except queue.Empty:
                pass
            worker.join(timeout=0.05)


def _write_png(path: Path, frame: np.ndarray) -> None:
    import cv2

    tmp = path.with_name(f".{path.name}.tmp.png")
    if not cv2.imwrite(str(tmp), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR)):
        raise EgstalkerError(f"cannot write {path}; check the folder is writable and the disk is not full")
    os.replace(tmp, path)
