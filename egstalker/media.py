"""Video and audio I/O through PyAV (its wheels bundle FFmpeg, so users need no system ffmpeg).

Frames are resampled to a constant output rate by timestamp: output frame k (time k/fps after the first
video frame) shows the source frame whose timestamp is nearest to it. Audio is aligned to the same clock
(the first video frame is t=0), so 30 fps and variable-frame-rate input keep audio and video in sync.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from egstalker.errors import EgstalkerError

AUDIO_RATE = 16000
VIDEO_FPS = 25.0


@dataclass(frozen=True)
class VideoInfo:
    path: str
    width: int
    height: int
    source_fps: float
    """Average frame rate of the source (variable-frame-rate clips report their average)."""
    duration: float
    """Seconds from the first video frame to the end of the last one."""
    has_audio: bool
    audio_rate: int
    audio_channels: int


@dataclass(frozen=True)
class ResampledFrame:
    index: int
    """Output frame index at the output rate."""
    image: np.ndarray
    """[H, W, 3] uint8 RGB."""
    source_time: float
    """Timestamp (s, from the first video frame) of the source frame shown."""

    @property
    def offset(self) -> float:
        """Signed seconds between the source frame shown and this output frame's time slot."""
        return self.source_time - self._slot_time

    _slot_time: float = 0.0


def upright(frame, pixel_format: str = "rgb24") -> np.ndarray:
    """A decoded frame's picture as it is meant to be seen: phones store portrait video as landscape pictures with
    a display rotation (a multiple of 90 degrees, counter-clockwise), which players apply and decoders do not."""
    image = frame.to_ndarray(format=pixel_format)
    turns = round((frame.rotation or 0) / 90) % 4
    return np.ascontiguousarray(np.rot90(image, turns)) if turns else image


def _open(path: str | os.PathLike):
    import av

    path = Path(path)
    if not path.exists():
        raise EgstalkerError(f"{path} does not exist; check the path")
    if path.is_dir():
        raise EgstalkerError(f"{path} is a folder; give the path of a video or audio file")
    try:
        return av.open(str(path))
    except (av.error.InvalidDataError, av.error.FFmpegError, UnicodeDecodeError) as e:
        raise EgstalkerError(f"{path} is not a readable video or audio file ({e.__class__.__name__}); "
                             "give an mp4/mov/mkv/webm/wav file") from None


def probe(path: str | os.PathLike) -> VideoInfo:
    """Read a video's size, rate and duration, and whether it has audio, without decoding it all."""
    with _open(path) as container:
        if not container.streams.video:
            raise EgstalkerError(f"{path} has no video stream; give a video of the person speaking")
        stream = container.streams.video[0]
        if stream.width == 0 or stream.height == 0:
            raise EgstalkerError(f"{path} has a video stream of size 0; give a real video")
        rate = float(stream.average_rate or stream.guessed_rate or VIDEO_FPS)
        if stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration = container.duration / 1_000_000
        else:
            duration = 0.0
        audio = container.streams.audio[0] if container.streams.audio else None
        width, height = stream.width, stream.height
        if _display_turns(container, stream) % 2:  # shown a quarter turn round: a portrait phone video
            width, height = height, width
        return VideoInfo(
            path=str(path), width=width, height=height, source_fps=rate, duration=duration,
            has_audio=audio is not None, audio_rate=int(audio.rate) if audio else 0,
            audio_channels=int(audio.channels) if audio else 0,
        )


def _display_turns(container, stream) -> int:
    """Quarter turns (counter-clockwise) the first frame is shown with (see `upright`); 0 when it cannot be read."""
    import av

    try:
        for frame in container.decode(stream):
            return round((frame.rotation or 0) / 90) % 4
    except av.error.FFmpegError:
        pass  # a damaged stream: reported when it is decoded in full
    return 0


def _stream_start(stream) -> float:
    if stream.start_time is None or stream.time_base is None:
        return 0.0
    return float(stream.start_time * stream.time_base)


def iter_frames(path: str | os.PathLike, fps: float = VIDEO_FPS, *, n_frames: int | None = None,
                start: float | None = None, pixel_format: str = "rgb24") -> Iterator[ResampledFrame]:
    """Decode a video and yield frames resampled to a constant `fps`, one at a time (bounded memory).

    Args:
        n_frames: yield exactly this many frames (cut, or repeat the last picture), e.g. the count that
            `count_output_frames(video_timestamps(path))` predicted, so audio and frames agree exactly.
        start: absolute time (s) of output frame 0; default the first decoded frame's timestamp.
        pixel_format: "rgb24" (default) or "bgr24" (what OpenCV encoders take, saving a conversion).

    Example:
        >>> for frame in iter_frames("talk.mp4"):
        ...     print(frame.index, frame.image.shape, frame.offset)
    """
    frames = _iter_resampled(path, fps, start, pixel_format)
    if n_frames is None:
        yield from frames
        return
    last = None
    for last in frames:
        if last.index >= n_frames:
            break
        yield last
    if last is None:
        raise EgstalkerError(f"{path} has no decodable video frames; give a real video")
    for k in range(last.index + 1 if last.index < n_frames else n_frames, n_frames):
        yield ResampledFrame(k, last.image, last.source_time, _slot_time=k / fps)


def _iter_resampled(path, fps: float, start: float | None, pixel_format: str) -> Iterator[ResampledFrame]:
    with _open(path) as container:
        if not container.streams.video:
            raise EgstalkerError(f"{path} has no video stream; give a video of the person speaking")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        t0 = None
        prev_image, prev_time = None, None
        intervals: list[float] = []
        k = 0
        try:
            for frame in container.decode(stream):
                if frame.pts is None:
                    continue
                t = float(frame.pts * frame.time_base)
                if t0 is None:
                    t0 = t if start is None else start
                t -= t0
                image = upright(frame, pixel_format)
                if prev_image is not None:
                    if t <= prev_time:  # out-of-order or duplicate timestamp: keep the later picture
                        prev_image = image
                        continue
                    intervals.append(t - prev_time)
                    midpoint = 0.5 * (prev_time + t)
                    while k / fps <= midpoint:
                        yield ResampledFrame(k, prev_image, prev_time, _slot_time=k / fps)
                        k += 1
                prev_image, prev_time = image, t
        except Exception as e:  # corrupt data mid-stream
            import av

            if isinstance(e, av.error.FFmpegError):
                raise EgstalkerError(f"{path} is damaged: decoding failed after {k} frames ({e}); "
                                     "re-encode or re-download the video") from None
            raise
        if prev_image is None:
            raise EgstalkerError(f"{path} has no decodable video frames; give a real video")
        last_duration = float(np.median(intervals)) if intervals else 1.0 / fps
        end = prev_time + last_duration
        while k / fps < end - 1e-6 and (k + 0.5) / fps <= end + 1e-6:
            yield ResampledFrame(k, prev_image, prev_time, _slot_time=k / fps)
            k += 1


def sample_frames(path: str | os.PathLike, times: list[float], pixel_format: str = "rgb24") -> list[np.ndarray]:
    """The pictures shown at a few `times` (s, from the first video frame), each found by seeking to the key
    frame before it and decoding from there: a handful of frames from a long video in a second or two, where
    decoding it all would take minutes. Times past the end give the last picture. Where seeking does not land on a
    key frame at or before the time (MPEG-TS camera files, .MTS), the video is decoded once from the start."""
    with _open(path) as container:
        if not container.streams.video:
            raise EgstalkerError(f"{path} has no video stream; give a video of the person speaking")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        first = _stream_start(stream)
        targets = [first + max(0.0, float(t)) for t in times]
        pictures = _seek_pictures(container, stream, targets, pixel_format)
    if pictures is None:
        with _open(path) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            pictures = _decode_pictures(container, stream, targets, pixel_format)
    if any(p is None for p in pictures):
        raise EgstalkerError(f"{path} has no decodable video frames; give a real video")
    return pictures


def _seek_pictures(container, stream, targets: list[float], pixel_format: str) -> list[np.ndarray] | None:
    """The picture shown at each absolute time, by seeking; None when a seek does not land on a key frame at or
    before its time."""
    import av

    pictures = []
    for target in targets:
        shown = None  # the last frame at or before the target, converted once found
        try:
            container.seek(int(target / float(stream.time_base)), stream=stream, backward=True, any_frame=False)
            for frame in container.decode(stream):
                if frame.pts is None:
                    continue
                t = float(frame.pts * frame.time_base)
                if shown is None and (not frame.key_frame or t > target + 1e-3):
                    return None  # mid-GOP (a broken picture) or past the time: seeking cannot be trusted here
                if shown is not None and t > target:
                    break
                shown = frame
        except av.error.FFmpegError:
            return None
        if shown is None:
            return None
        pictures.append(upright(shown, pixel_format))
    return pictures


def _decode_pictures(container, stream, targets: list[float], pixel_format: str) -> list[np.ndarray | None]:
    """The picture shown at each absolute time, by decoding the whole stream once (one frame held at a time)."""
    order = sorted(range(len(targets)), key=lambda i: targets[i])
    pictures: list[np.ndarray | None] = [None] * len(targets)
    last, k = None, 0
    for frame in container.decode(stream):
        if frame.pts is None:
            continue
        t = float(frame.pts * frame.time_base)
        while k < len(order) and t > targets[order[k]]:
            pictures[order[k]] = upright(last if last is not None else frame, pixel_format)
            k += 1
        last = frame
        if k == len(order):
            break
    for i in order[k:]:  # times past the last frame
        pictures[i] = upright(last, pixel_format) if last is not None else None
    return pictures


def video_timestamps(path: str | os.PathLike) -> np.ndarray:
    """Presentation times (s, absolute, sorted) of all video frames, read by demuxing packets (no decoding:
    about 10 ms for a minute of video)."""
    with _open(path) as container:
        if not container.streams.video:
            raise EgstalkerError(f"{path} has no video stream; give a video of the person speaking")
        stream = container.streams.video[0]
        try:
            pts = [packet.pts for packet in container.demux(stream) if packet.pts is not None and packet.size]
        except Exception as e:
            import av

            if isinstance(e, av.error.FFmpegError):
                raise EgstalkerError(f"{path} is damaged ({e}); re-encode or re-download the video") from None
            raise
        return np.sort(np.asarray(pts, dtype=np.float64)) * float(stream.time_base)


def count_output_frames(timestamps: np.ndarray, fps: float = VIDEO_FPS) -> int:
    """How many frames `iter_frames` yields for source frames at `timestamps` (sorted seconds): the same
    nearest-frame rule, computed from timestamps alone."""
    times = np.asarray(timestamps, dtype=np.float64)
    if len(times) == 0:
        return 0
    times = times - times[0]
    keep = np.concatenate([[True], np.diff(times) > 0])  # duplicates are skipped by iter_frames
    times = times[keep]
    k = 0
    if len(times) > 1:
        last_midpoint = 0.5 * (times[-2] + times[-1])
        k = int(np.floor(last_midpoint * fps + 1e-9)) + 1
        # float rounding: match iter_frames' `k / fps <= midpoint` test exactly
        while k > 0 and (k - 1) / fps > last_midpoint:
            k -= 1
        while k / fps <= last_midpoint:
            k += 1
    intervals = np.diff(times)
    last_duration = float(np.median(intervals)) if len(intervals) else 1.0 / fps
    end = times[-1] + last_duration
    while k / fps < end - 1e-6 and (k + 0.5) / fps <= end + 1e-6:
        k += 1
    return k


def count_resampled_frames(info: VideoInfo, fps: float = VIDEO_FPS) -> int:
    """An estimate of how many frames `iter_frames` yields (for progress bars)."""
    return max(1, int(round(info.duration * fps)))


def read_audio(path: str | os.PathLike, rate: int = AUDIO_RATE, align_to_video: bool = True, *,
               start: float | None = None) -> np.ndarray:
    """Decode the first audio stream to float32 mono at `rate`, from any sample rate or channel layout.

    With `align_to_video` and a video stream present, sample 0 is the time of the first video frame (audio
    that starts later is padded with silence, audio that starts earlier is cut), matching `iter_frames`.
    `start` (absolute seconds) overrides that time, e.g. the first entry of `video_timestamps(path)`.
    """
    import av

    with _open(path) as container:
        if not container.streams.audio:
            raise EgstalkerError(f"{path} has no audio stream; the model is driven by speech, so give a video "
                                 "with its sound track (or mux one in)")
        stream = container.streams.audio[0]
        resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
        chunks = []
        audio_start = None
        try:
            for frame in container.decode(stream):
                if audio_start is None and frame.pts is not None and frame.time_base is not None:
                    audio_start = float(frame.pts * frame.time_base)
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1))
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray().reshape(-1))
        except av.error.FFmpegError as e:
            raise EgstalkerError(f"audio of {path} is damaged ({e}); re-encode it") from None
        audio = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)
        if audio_start is None:
            audio_start = _stream_start(stream)
        if start is None and align_to_video and container.streams.video:
            start = _stream_start(container.streams.video[0])
        if start is not None:
            shift = audio_start - start
            n = int(round(abs(shift) * rate))
            if shift > 0:
                audio = np.concatenate([np.zeros(n, np.float32), audio])
            elif n:
                audio = audio[n:]
    return audio


def fit_length(audio: np.ndarray, n_samples: int) -> np.ndarray:
    """Pad with silence or cut so that `audio` has exactly `n_samples` samples."""
    if len(audio) >= n_samples:
        return audio[:n_samples]
    return np.concatenate([audio, np.zeros(n_samples - len(audio), audio.dtype)])
