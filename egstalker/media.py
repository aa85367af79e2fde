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
NEAR_SILENT_PEAK = 10 ** (-50 / 20)
"""Sound whose loudest sample stays below -50 dBFS holds no usable speech (hiss, a muted microphone, silence):
refused by preprocessing and by render (so by run too)."""


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
    stated_duration: float | None = None
    """The video stream's length as the file states it (mp4 and mov do; mkv and webm do not): None when unstated."""


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


def _open(path: str | os.PathLike, wanted: str = "video"):
    """Open a media file for reading; `wanted` ("video" or "audio") is what the caller reads from it, so that the
    advice for a file that is not media fits (audio can come from an audio file or a video's sound track)."""
    import av

    path = Path(path)
    if wanted == "audio":
        what, advice = "audio or video file", ("give speech as an audio file (wav, mp3, m4a, flac, ogg) or a video "
                                               "with its sound track")
    else:
        what, advice = "video file", "give a video of the person speaking (mp4, mov, mkv or webm)"
    if not path.exists():
        raise EgstalkerError(f"{path} does not exist; check the path")
    if path.is_dir():
        raise EgstalkerError(f"{path} is a folder; give the path of {'an' if wanted == 'audio' else 'a'} {what}")
    try:
        return av.open(str(path))
    except (av.error.InvalidDataError, av.error.FFmpegError, UnicodeDecodeError) as e:
        raise EgstalkerError(f"{path} is not a readable {what} ({e.__class__.__name__}); {advice}") from None


def _video_stream(container):
    """The first video stream that is a moving picture, or None: an audio file's cover art (an mp3's or m4a's
    attached picture) shows up as a one-picture video stream marked attached_pic, and is no video."""
    import av

    for stream in container.streams.video:
        if not stream.disposition & av.stream.Disposition.attached_pic:
            return stream
    return None


def probe(path: str | os.PathLike) -> VideoInfo:
    """Read a video's size, rate and duration, and whether it has audio, without decoding it all."""
    with _open(path) as container:
        stream = _video_stream(container)
        if stream is None:
            raise EgstalkerError(f"{path} has no video stream; give a video of the person speaking")
        if stream.width == 0 or stream.height == 0:
            raise EgstalkerError(f"{path} has a video stream of size 0; give a real video")
        rate = float(stream.average_rate or stream.guessed_rate or VIDEO_FPS)
        stated = None  # the video stream's own length, when the file states one (mp4/mov do; mkv does not)
        if stream.duration is not None and stream.time_base is not None:
            duration = stated = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration = container.duration / 1_000_000
        else:
            duration = 0.0
        audio = container.streams.audio[0] if container.streams.audio else None
        width, height = stream.width, stream.height
        if _display_turns(container, stream) % 2:  # shown a quarter turn round: a portrait phone video
            width, height = height, width
        return VideoInfo(
            path=str(path), width=width, height=height, source_fps=rate, duration=duration, stated_duration=stated,
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
        stream = _video_stream(container)
        if stream is None:
            raise EgstalkerError(f"{path} has no video stream; give a video of the person speaking")
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
        stream = _video_stream(container)
        if stream is None:
            raise EgstalkerError(f"{path} has no video stream; give a video of the person speaking")
        stream.thread_type = "AUTO"
        first = _stream_start(stream)
        targets = [first + max(0.0, float(t)) for t in times]
        pictures = _seek_pictures(container, stream, targets, pixel_format)
    if pictures is None:
        with _open(path) as container:
            stream = _video_stream(container)
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
        stream = _video_stream(container)
        if stream is None:
            raise EgstalkerError(f"{path} has no video stream; give a video of the person speaking")
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
    Otherwise sample 0 is time 0 of the file (an encoder's priming samples stamped before it are dropped).

    The audio lasts as long as the file says it does: an AAC encoder's priming and padding samples are left out
    where the container describes them (see `_decode_mono`), so 2 s of speech in an .m4a decodes to 2 s.
    """
    with _open(path, "audio") as container:
        stream = _audio_stream(path, container)
        if start is None and align_to_video:
            video = _video_stream(container)
            if video is not None:
                start = _stream_start(video)
        decoded = _decode_mono(path, container, stream, rate)
        chunks = list(decoded if start is not None else _from_time_zero(decoded, stream, rate))
        audio = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)
        if start is not None:
            shift = (decoded.start if decoded.start is not None else _stream_start(stream)) - start
            n = int(round(abs(shift) * rate))
            if shift > 0:
                audio = np.concatenate([np.zeros(n, np.float32), audio])
            elif n:
                audio = audio[n:]
    return audio


def iter_audio(path: str | os.PathLike, rate: int = AUDIO_RATE) -> Iterator[np.ndarray]:
    """`read_audio(path, rate, align_to_video=False)` as float32 mono chunks, a packet or so at a time (memory
    does not grow with the file's length), e.g. a sound track to mux; the same samples, joined."""
    with _open(path, "audio") as container:
        stream = _audio_stream(path, container)
        yield from _from_time_zero(_decode_mono(path, container, stream, rate), stream, rate)


def _from_time_zero(decoded: "_decode_mono", stream, rate: int) -> Iterator[np.ndarray]:
    """The decoded chunks from time 0 of the file: samples stamped before it (an encoder's priming) dropped."""
    skip = None
    for chunk in decoded:
        if skip is None:  # the first frame has been decoded: its time is known
            first = decoded.start if decoded.start is not None else _stream_start(stream)
            skip = max(0, int(round(-first * rate)))
        cut = min(skip, len(chunk))
        skip -= cut
        if cut < len(chunk):
            yield chunk[cut:]


def _audio_stream(path, container):
    if not container.streams.audio:
        raise EgstalkerError(f"{path} has no audio stream; the model is driven by speech, so give a video "
                             "with its sound track (or mux one in)")
    return container.streams.audio[0]


def _declared_end(container, stream) -> float | None:
    """Where the audio ends (s, in the stream's times), when the container states it exactly, else None.

    MP4/MOV/M4A/3GP store each track's presented length (the edit list, or the track duration): the AAC (or mp3)
    encoder's padding after the last real sample lies beyond it, and the FFmpeg that PyAV bundles decodes it. The
    other demuxers either hand the decoder the codec's own trimming (mp3's LAME header, Ogg granule positions,
    Matroska's DiscardPadding), which it applies already, or only estimate a duration from the bit rate (ADTS .aac,
    mp3 without a header), which must not cut real audio: for them nothing is trimmed."""
    if "mp4" not in container.format.name.split(","):
        return None
    if not stream.duration or stream.duration <= 0 or stream.time_base is None:
        return None
    return float(((stream.start_time or 0) + stream.duration) * stream.time_base)


class _decode_mono:
    """Iterate over the first audio stream decoded to float32 mono chunks at `rate`, without the samples past the
    container's stated end (`_declared_end`): those are held back as they come and dropped at the end of the stream
    when they amount to codec padding (at most a few codec frames); a longer surplus means the stated length is not
    about padding (a damaged or odd file), and it is kept. The encoder's priming at the start is dropped by the
    decoder itself (the container marks it with skip samples or negative timestamps; see read_audio).

    `start` is the time (s) of the first decoded frame that has a timestamp, once iteration has begun."""

    PADDING_FRAMES = 3

    def __init__(self, path, container, stream, rate: int):
        self.path, self.container, self.stream, self.rate = path, container, stream, int(rate)
        self.start: float | None = None
        self._frame_seconds = 0.0  # the longest codec frame seen (s)

    def __iter__(self) -> Iterator[np.ndarray]:
        end = _declared_end(self.container, self.stream)
        chunks = self._resampled()
        if end is None:
            yield from chunks
            return
        keep = 0  # samples (at `rate`) from the first one up to the stated end
        emitted = 0  # samples yielded so far
        held: list[np.ndarray] = []  # samples past the stated end, not yet known to be padding
        n_held = 0
        started = False
        for chunk in chunks:
            if not started:  # the first frame has been decoded: its time is known
                started = True
                if self.start is None:  # no timestamp to measure from: nothing is trimmed
                    yield chunk
                    yield from chunks
                    return
                keep = max(0, int(round((end - self.start) * self.rate)))
            inside = min(len(chunk), max(0, keep - emitted))
            if inside:
                yield chunk[:inside]
                emitted += inside
            if inside < len(chunk):
                held.append(chunk[inside:])
                n_held += len(chunk) - inside
                if n_held > self.PADDING_FRAMES * self._frame_seconds * self.rate + 1:
                    yield from held  # far past the stated end: not padding, so keep it all
                    yield from chunks
                    return
        # what is held is the codec's padding: dropped

    def _resampled(self) -> Iterator[np.ndarray]:
        import av

        resampler = av.AudioResampler(format="flt", layout="mono", rate=self.rate)
        try:
            for frame in self.container.decode(self.stream):
                if self.start is None and frame.pts is not None and frame.time_base:
                    self.start = float(frame.pts * frame.time_base)
                if frame.sample_rate:
                    self._frame_seconds = max(self._frame_seconds, frame.samples / frame.sample_rate)
                for out in resampler.resample(frame):
                    yield out.to_ndarray().reshape(-1)
            for out in resampler.resample(None):
                yield out.to_ndarray().reshape(-1)
        except av.error.FFmpegError as e:
            raise EgstalkerError(f"audio of {self.path} is damaged ({e}); re-encode it") from None


def fit_length(audio: np.ndarray, n_samples: int) -> np.ndarray:
    """Pad with silence or cut so that `audio` has exactly `n_samples` samples."""
    if len(audio) >= n_samples:
        return audio[:n_samples]
    return np.concatenate([audio, np.zeros(n_samples - len(audio), audio.dtype)])
