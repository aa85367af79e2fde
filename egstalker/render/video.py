"""MP4 writing through PyAV: H.264 (yuv420p) video with AAC audio, frames streamed, `+faststart` for browsers.

Frames are encoded as they arrive and the audio is interleaved with them (about one video frame's worth of audio
per frame), so memory stays flat however long the video is. The file is written under a temporary name in the
target folder and renamed on success: a crash or Ctrl-C never leaves a half-written OUT.mp4.

Example:
    >>> with Mp4Writer("out.mp4", width=512, height=512, fps=25, audio=wav48k, audio_rate=48000) as writer:
    ...     for frame in frames:          # uint8 [512, 512, 3] RGB
    ...         writer.write(frame)
"""

from __future__ import annotations

import os
import tempfile
from fractions import Fraction
from pathlib import Path

import numpy as np

from egstalker.errors import EgstalkerError

AUDIO_CHUNK = 1024  # samples per AAC frame
VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov")
"""Names the written file may have: all three are the same ISO media container, which players accept under them."""


def check_video_output(path: str | os.PathLike, inputs: tuple = ()) -> Path:
    """`path` as the Path of a video to write; EgstalkerError (one line) when it cannot be one: a folder, a name
    that is not an mp4's, one of the `inputs` (it would be overwritten), or a place this user cannot write."""
    path = Path(path)
    if path.is_dir():
        raise EgstalkerError(f"{path} is a folder; give the video's file name, e.g. {path / 'talk.mp4'}")
    if path.suffix.lower() not in VIDEO_SUFFIXES:
        raise EgstalkerError(f"{path}: the video is written as MP4 (H.264 + AAC); give a name ending in .mp4")
    for source in inputs:
        if path.exists() and Path(source).exists() and path.samefile(source):
            raise EgstalkerError(f"{path} is also an input ({source}); write the video to another file")
    folder = path.absolute().parent
    while not folder.exists():  # the folders still to be made go in the nearest one that exists
        folder = folder.parent
    try:
        if not folder.is_dir():
            raise NotADirectoryError(20, "not a folder")
        fd, probe = tempfile.mkstemp(prefix=".egstalker_probe.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise EgstalkerError(f"cannot write {path} ({folder}: {e.strerror}); choose a writable output path") from None
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def video_comment(path: str | os.PathLike) -> str | None:
    """The `comment` tag of a video file (None when it has none or is not a readable video)."""
    import av

    try:
        with av.open(str(path)) as container:
            return container.metadata.get("comment")
    except (OSError, av.error.FFmpegError):
        return None


class Mp4Writer:
    """Streams RGB frames (and optional mono float32 audio) into an H.264 + AAC mp4.

    Args:
        path: output file (.mp4); its folder must exist or be creatable.
        width, height: frame size in pixels; odd sizes are padded by one edge pixel (yuv420p needs even sizes).
        fps: frames per second (25 for egstalker).
        audio: [n_samples] float32 mono in [-1, 1], or an iterator of such chunks (streamed: memory stays flat),
            or None for a silent video.
        audio_rate: sample rate of `audio` (AAC supports 8-96 kHz; 16 kHz and 48 kHz both play in browsers).
        crf: x264 quality (lower is better; 18 is visually lossless for talking heads).
        preset: x264 speed/size trade-off ('veryfast' keeps encoding well above real time).
        comment: text for the file's `comment` tag (render writes what the video was made from: `video_comment`).
        inputs: files the video must not overwrite (the speech it is made from).
    """

    def __init__(self, path: str | os.PathLike, width: int, height: int, fps: float = 25.0,
                 audio: np.ndarray | None = None, audio_rate: int = 16000, crf: int = 18,
                 preset: str = "veryfast", comment: str | None = None, inputs: tuple = ()):
        import av

        self.path = check_video_output(path, inputs)
        self.width, self.height = int(width), int(height)
        self.fps = float(fps)
        self.frames_written = 0
        self._audio_source = None  # an iterator of chunks when the audio is streamed
        self._streamed = not (audio is None or isinstance(audio, np.ndarray))
        if audio is None or isinstance(audio, np.ndarray):
            self._audio = None if audio is None else np.asarray(audio, np.float32).reshape(-1)
        else:
            self._audio_source = iter(audio)
            self._audio = np.zeros(0, np.float32)  # pending samples, starting at sample self._audio_done
        self._audio_rate = int(audio_rate)
        self._audio_done = 0
        self._closed = False
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, self._tmp = tempfile.mkstemp(prefix=f".{self.path.stem}.", suffix=".mp4.tmp", dir=self.path.parent)
            os.close(fd)
        except OSError as e:
            raise EgstalkerError(f"cannot write {self.path} ({e.strerror}); choose a writable output path") from None
        self._container = av.open(self._tmp, mode="w", format="mp4", options={"movflags": "+faststart"})
        if comment is not None:
            self._container.metadata["comment"] = comment
        rate = Fraction(self.fps).limit_denominator(1001)
        self._video = self._container.add_stream("libx264", rate=rate)
        self._video.width = self.width + self.width % 2
        self._video.height = self.height + self.height % 2
        self._video.pix_fmt = "yuv420p"
        self._video.options = {"crf": str(crf), "preset": preset}
        self._video.codec_context.time_base = Fraction(1) / rate
        self._audio_stream = None
        if self._audio is not None:
            self._audio_stream = self._container.add_stream("aac", rate=self._audio_rate)
            self._audio_stream.layout = "mono"
            self._audio_stream.bit_rate = 128000

    def write(self, frame: np.ndarray) -> None:
        """Encode one RGB uint8 [H, W, 3] frame."""
        import av

        if frame.shape != (self.height, self.width, 3) or frame.dtype != np.uint8:
            raise ValueError(f"expected a uint8 frame of shape {(self.height, self.width, 3)}, got "
                             f"{frame.dtype} {frame.shape}")
        if self.width % 2 or self.height % 2:
            frame = np.pad(frame, ((0, self.height % 2), (0, self.width % 2), (0, 0)), mode="edge")
        video_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
        video_frame.pts = self.frames_written
        self._container.mux(self._video.encode(video_frame))
        self.frames_written += 1
        self._write_audio_until(self.frames_written / self.fps)

    def _pending_audio(self, upto: int | None) -> np.ndarray:
        """Samples from self._audio_done on, at least up to absolute sample `upto` (None: all) when available."""
        if not self._streamed:
            return self._audio[self._audio_done:] if upto is None else self._audio[self._audio_done:upto]
        # streamed: self._audio holds only the samples not yet encoded
        while self._audio_source is not None and (upto is None or self._audio_done + len(self._audio) < upto):
            chunk = next(self._audio_source, None)
            if chunk is None:
                self._audio_source = None
                break
            self._audio = np.concatenate([self._audio, np.asarray(chunk, np.float32).reshape(-1)])
        return self._audio if upto is None else self._audio[: max(0, upto - self._audio_done)]

    def _write_audio_until(self, seconds: float | None) -> None:
        """Encode the audio up to `seconds` (None: all of it), in whole AAC-sized chunks."""
        import av

        if self._audio is None:
            return
        upto = None if seconds is None else int(seconds * self._audio_rate)
        pending = self._pending_audio(upto)
        start = 0
        while len(pending) - start >= AUDIO_CHUNK or (seconds is None and start < len(pending)):
            chunk = pending[start:start + AUDIO_CHUNK]
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(chunk[None]), format="flt", layout="mono")
            frame.sample_rate = self._audio_rate
            frame.pts = self._audio_done + start
            frame.time_base = Fraction(1, self._audio_rate)
            self._container.mux(self._audio_stream.encode(frame))
            start += len(chunk)
        if self._streamed:
            self._audio = self._audio[start:]  # drop what was encoded: memory stays bounded
        self._audio_done += start

    def close(self) -> Path:
        """Flush the encoders, finish the file and move it to `path`. Returns `path`."""
        if self._closed:
            return self.path
        self._closed = True
        try:
            if self.frames_written == 0:
                raise EgstalkerError(f"no frames were rendered, so {self.path} was not written")
            self._write_audio_until(None)
            self._container.mux(self._video.encode(None))
            if self._audio_stream is not None:
                self._container.mux(self._audio_stream.encode(None))
            self._container.close()
            os.chmod(self._tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
            os.replace(self._tmp, self.path)
        except BaseException:
            self.abort()
            raise
        return self.path

    def abort(self) -> None:
        """Drop the temporary file (the target path is left untouched)."""
        self._closed = True
        try:
            self._container.close()
        except Exception:  # the container may be half-initialised; the temporary file goes anyway
            pass
        if os.path.exists(self._tmp):
            os.unlink(self._tmp)

    def __enter__(self) -> "Mp4Writer":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
