"""Audio decoding in egstalker.media on real encoded files: lengths in samples (AAC priming and padding left out
where the container states them, nothing cut where it does not), start alignment, a video's sound track, and the
errors for files that are not media or hold only cover art."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile

from egstalker.cli import main
from egstalker.errors import EgstalkerError
from egstalker.media import iter_audio, iter_frames, probe, read_audio, video_timestamps
from tests.conftest import shared_media

SECONDS = 2.0
RATE = 16000
N = int(SECONDS * RATE)


def speech() -> np.ndarray:
    wav, rate = soundfile.read(shared_media("audio/speech_10s_16k.wav"), dtype="float32")
    assert rate == RATE
    return wav[:N]


def encode(path: Path, codec: str, rate: int, layout: str, fmt: str | None = None, options=None) -> Path:
    """The first 2 s of the shared speech encoded with PyAV (as a user's tool would) at `rate` and `layout`."""
    with av.open(str(path), "w", format=fmt, options=options or {}) as out:
        stream = out.add_stream(codec, rate=rate, layout=layout)
        sample_format = stream.codec_context.format.name if stream.codec_context.format else "fltp"
        resampler = av.AudioResampler(format=sample_format, layout=layout, rate=rate)
        frame = av.AudioFrame.from_ndarray(speech()[None, :], format="flt", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = RATE, 0, Fraction(1, RATE)
        for resampled in resampler.resample(frame) + resampler.resample(None):
            out.mux(stream.encode(resampled))
        out.mux(stream.encode(None))
    return path


def undecoded_length(path: Path) -> tuple[int, int]:
    """(samples the decoder gives, at the stream's own rate; that rate), with no trimming of ours."""
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        return sum(frame.samples for frame in container.decode(stream)), stream.rate


def lag(audio: np.ndarray, reference: np.ndarray, search: int = 400) -> int:
    """Samples by which `audio` runs late against `reference` (cross-correlation peak)."""
    n = min(len(audio), len(reference)) - 2 * search
    scores = [float(np.dot(reference[search:n], audio[search + k:n + k])) for k in range(-search, search + 1)]
    return int(np.argmax(scores)) - search


@pytest.mark.parametrize("rate,layout", [(44100, "stereo"), (16000, "mono")])
def test_m4a_decodes_to_its_stated_length(tmp_path, rate, layout):
    m4a = encode(tmp_path / "speech.m4a", "aac", rate, layout)
    with av.open(str(m4a)) as container:  # what ffprobe reports: 2.000 s
        stream = container.streams.audio[0]
        assert float(stream.duration * stream.time_base) == pytest.approx(SECONDS, abs=1e-6)
        assert container.duration == pytest.approx(SECONDS * 1e6, abs=100)
    decoded, native = undecoded_length(m4a)
    assert decoded > SECONDS * native + 100  # the encoder's padding: what the bundled FFmpeg decodes on its own
    audio = read_audio(m4a, RATE, align_to_video=False)
    assert len(audio) == N  # 2 s of speech is 2 s: 50 frames at 25 fps, not 51
    assert len(read_audio(m4a, rate, align_to_video=False)) == int(SECONDS * rate)
    assert len(read_audio(m4a, RATE)) == N  # no video: the same
    assert lag(audio, speech()) == 0  # the priming at the start is left out too
    assert np.array_equal(np.concatenate(list(iter_audio(m4a, RATE))), audio)


def test_other_formats_keep_their_length(tmp_path):
    reference = speech()
    for name, codec, rate, layout in [("s.wav", "pcm_s16le", 16000, "mono"), ("s.mp3", "libmp3lame", 16000, "mono"),
                                      ("s44.mp3", "libmp3lame", 44100, "stereo"), ("s.flac", "flac", 16000, "mono"),
                                      ("s.ogg", "libopus", 48000, "mono")]:
        path = encode(tmp_path / name, codec, rate, layout)
        audio = read_audio(path, RATE, align_to_video=False)
        assert len(audio) == N, name
        assert lag(audio, reference) == 0, name
    wav = read_audio(tmp_path / "s.wav", RATE, align_to_video=False)
    assert np.abs(wav - reference).max() < 1e-3  # 16-bit: the very samples


def test_no_stated_length_cuts_nothing(tmp_path):
    """ADTS .aac only estimates its duration from the bit rate, Matroska states none per track: every decoded
    sample is kept (the padding too), never cut to a guess."""
    for path in (encode(tmp_path / "s.aac", "aac", 44100, "stereo", fmt="adts"),
                 encode(tmp_path / "s.mkv", "aac", 16000, "mono")):
        decoded, native = undecoded_length(path)
        assert abs(len(read_audio(path, RATE, align_to_video=False)) - decoded * RATE / native) <= 1, path.name


def test_priming_stamped_before_zero_is_left_out(tmp_path):
    """AAC packets remuxed into Matroska with negative timestamps (the priming before time 0, no skip marker):
    the audio starts at time 0, in step with the speech."""
    m4a = encode(tmp_path / "s.m4a", "aac", 16000, "mono")
    mkv = tmp_path / "s.mkv"
    with av.open(str(m4a)) as src, av.open(str(mkv), "w", options={"avoid_negative_ts": "disabled"}) as dst:
        stream = src.streams.audio[0]
        out = dst.add_stream_from_template(stream)
        for packet in src.demux(stream):
            if packet.dts is not None:
                packet.stream = out
                dst.mux(packet)
    with av.open(str(mkv)) as container:
        first = next(container.decode(audio=0))
        assert first.pts * first.time_base < 0
    audio = read_audio(mkv, RATE, align_to_video=False)
    assert lag(audio, speech()) == 0
    assert np.array_equal(np.concatenate(list(iter_audio(mkv, RATE))), audio)


def test_video_sound_track_length_and_alignment():
    """A video's AAC sound track loses only its padding (less than one 25 fps frame), aligned as before."""
    lieu = shared_media("video/lieu_60s_256.mp4")
    start = float(video_timestamps(lieu)[0])
    audio = read_audio(lieu, RATE, start=start)
    before = 959488  # samples this clip's sound decoded to before the padding was left out
    assert len(audio) == 959360  # the track's stated 59.96 s
    assert 0 <= before - len(audio) < RATE / 25
    assert np.array_equal(read_audio(lieu, RATE), audio)  # aligned to the first video frame by default


def test_not_media_advice_fits_the_reader(tmp_path):
    notes = tmp_path / "notes.mp4"
    notes.write_text("not a video at all\n" * 100)
    for reader in (probe, video_timestamps, lambda p: next(iter_frames(p))):
        with pytest.raises(EgstalkerError) as error:
            reader(notes)
        message = str(error.value)
        assert "is not a readable video file" in message and "give a video of the person speaking" in message
        assert "wav" not in message and "audio" not in message
    for reader in (read_audio, lambda p: next(iter_audio(p))):
        with pytest.raises(EgstalkerError) as error:
            reader(notes)
        message = str(error.value)
        assert "is not a readable audio or video file" in message and "give speech as an audio file" in message
    with pytest.raises(EgstalkerError, match="folder; give the path of a video file"):
        probe(tmp_path)
    with pytest.raises(EgstalkerError, match="folder; give the path of an audio or video file"):
        read_audio(tmp_path)


def test_cover_art_is_no_video(tmp_path, capsys):
    mp3 = encode(tmp_path / "s.mp3", "libmp3lame", 16000, "mono")
    cover = tmp_path / "cover.mp3"
    with av.open(str(mp3)) as src, av.open(str(cover), "w") as dst:
        stream = src.streams.audio[0]
        out = dst.add_stream_from_template(stream)
        picture = dst.add_stream("mjpeg", rate=1)
        picture.width, picture.height, picture.pix_fmt = 64, 64, "yuvj420p"
        picture.disposition = av.stream.Disposition.attached_pic
        image = av.VideoFrame.from_ndarray(np.full((64, 64, 3), 128, np.uint8), format="rgb24")
        packets = picture.encode(image.reformat(format="yuvj420p")) + picture.encode(None)
        for packet in src.demux(stream):
            if packet.dts is not None:
                packet.stream = out
                dst.mux(packet)
        for packet in packets:
            packet.stream = picture
            dst.mux(packet)
    with av.open(str(cover)) as container:  # PyAV shows the picture as a video stream
        assert container.streams.video and container.streams.video[0].disposition & av.stream.Disposition.attached_pic
    for reader in (probe, video_timestamps):
        with pytest.raises(EgstalkerError, match="has no video stream; give a video of the person speaking"):
            reader(cover)
    assert main(["preprocess", str(cover), "-o", str(tmp_path / "ds"), "--quiet"]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cover.mp3 has no video stream; give a video of the person speaking" in err
    assert not (tmp_path / "ds").exists()
    audio = read_audio(cover, RATE)  # the picture is no clock to align the sound to
    assert len(audio) == N and lag(audio, speech()) == 0
