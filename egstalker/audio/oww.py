"""`oww`: the speech embedding shipped with openwakeword 0.5.1 (Google's speech_embedding as two ONNX models:
a mel spectrogram and a 96-d embedding of 76 mel frames), run directly with onnxruntime. No download.

openwakeword feeds the models int16-scaled float samples, 32-band mel frames every 10 ms (512-sample
windows), transforms them with x / 10 + 2 and embeds windows of 76 frames (775 ms) every 8 frames (80 ms).
We embed a window every 4 mel frames instead, which is exactly one per 25 fps video frame, so no
resampling in time is needed.

One change: the shipped mel model ends with a clamp at (max over the whole input - 80 dB), which makes a
frame depend on the loudest moment of whatever chunk it was computed in. We cut the graph before that
clamp (with the `onnx` package, in memory) so features depend only on the frame's own window; digital
silence still meets the model's fixed floor of -100 dB.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from egstalker.audio.base import SAMPLE_RATE, SAMPLES_PER_FRAME, AudioEncoder
from egstalker.errors import EgstalkerError

MEL_HOP = 160
MEL_WINDOW = 512
EMBED_WINDOW = 76
EMBED_DIM = 96
MEL_BANDS = 32
WINDOW_SAMPLES = (EMBED_WINDOW - 1) * MEL_HOP + MEL_WINDOW  # 12512 samples = 782 ms
DEFAULT_LOOKAHEAD_SECONDS = 0.2
PRE_CLAMP_OUTPUT = "onnx::ReduceMax_31"
"""The mel model's tensor before its input-wide clamp: 10 log10(power) with a fixed floor."""

_sessions: dict[str, object] = {}
_sessions_lock = threading.Lock()


def models_dir() -> Path:
    try:
        import openwakeword
    except ImportError:
        raise EgstalkerError("the 'oww' audio encoder needs openwakeword 0.5.1: pip install openwakeword==0.5.1 "
                             "(or choose --audio-features mel)") from None
    return Path(openwakeword.__file__).parent / "resources" / "models"


def _session(kind: str):
    """Cached onnxruntime sessions: 'mel' (clamp removed) or 'embedding'."""
    with _sessions_lock:
        if kind not in _sessions:
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads = 1  # tiny models: threads cost more than they save here
            options.inter_op_num_threads = 1
            path = models_dir() / ("melspectrogram.onnx" if kind == "mel" else "embedding_model.onnx")
            if not path.exists():
                raise EgstalkerError(f"{path} is missing from the openwakeword install; reinstall it: "
                                     "pip install --force-reinstall openwakeword==0.5.1")
            model: bytes | str = str(path)
            if kind == "mel":
                import onnx

                graph_model = onnx.load(str(path))
                del graph_model.graph.output[:]
                graph_model.graph.output.append(onnx.helper.make_empty_tensor_value_info(PRE_CLAMP_OUTPUT))
                model = graph_model.SerializeToString()
            _sessions[kind] = ort.InferenceSession(model, sess_options=options,
                                                   providers=["CPUExecutionProvider"])
        return _sessions[kind]


class OwwEncoder(AudioEncoder):
    """Feature [96] per frame: the embedding of the 782 ms window that ends `lookahead_seconds` after the
    frame's slot."""

    name = "oww"
    feature_shape = (EMBED_DIM,)

    def __init__(self, lookahead_seconds: float = DEFAULT_LOOKAHEAD_SECONDS):
        # the window end is placed on the 10 ms mel grid
        lookahead = int(round(lookahead_seconds * SAMPLE_RATE / MEL_HOP)) * MEL_HOP
        if not 0 <= lookahead <= WINDOW_SAMPLES - SAMPLES_PER_FRAME:
            raise EgstalkerError(f"oww look-ahead must be between 0 and "
                                 f"{(WINDOW_SAMPLES - SAMPLES_PER_FRAME) / SAMPLE_RATE:.3f} s")
        self._lookahead = lookahead
        self._left_pad = WINDOW_SAMPLES - SAMPLES_PER_FRAME - lookahead
        self.lookahead_seconds = lookahead / SAMPLE_RATE
        self.context_seconds = self._left_pad / SAMPLE_RATE
        self._mel = _session("mel")
        self._embed = _session("embedding")

    def _mel_frames(self, samples: np.ndarray) -> np.ndarray:
        """[(len - 512) // 160 + 1, 32] transformed mel frames of int16-scaled samples, in blocks."""
        n = (len(samples) - MEL_WINDOW) // MEL_HOP + 1
        out = np.empty((n, MEL_BANDS), np.float32)
        block = 6000  # mel frames (60 s) per call: bounded memory
        for a in range(0, n, block):
            b = min(n, a + block)
            chunk = samples[a * MEL_HOP:(b - 1) * MEL_HOP + MEL_WINDOW][None]
            spec = self._mel.run([PRE_CLAMP_OUTPUT], {"input": chunk})[0]
            out[a:b] = spec.reshape(b - a, MEL_BANDS)
        return out / 10.0 + 2.0  # openwakeword's scaling towards the TensorFlow original

    def _padded(self, wav: np.ndarray, n_frames: int) -> np.ndarray:
        """int16-scaled samples with frame i's window at [640 i, 640 i + 12512): wav[640 i - left_pad, 640 (i + 1)
        + lookahead), zeros outside the clip."""
        total = WINDOW_SAMPLES + (n_frames - 1) * SAMPLES_PER_FRAME
        padded = np.zeros(total, np.float32)
        body = wav[:total - self._left_pad] * 32767.0
        padded[self._left_pad:self._left_pad + len(body)] = body
        return padded

    def _embed_windows(self, padded: np.ndarray, n_frames: int) -> np.ndarray:
        mel = self._mel_frames(padded)
        step = SAMPLES_PER_FRAME // MEL_HOP
        out = np.empty((n_frames, EMBED_DIM), np.float32)
        batch = 512
        for a in range(0, n_frames, batch):
            b = min(n_frames, a + batch)
            windows = np.lib.stride_tricks.sliding_window_view(mel, EMBED_WINDOW, axis=0)[a * step:b * step:step]
            windows = np.ascontiguousarray(windows.transpose(0, 2, 1))[..., None]  # [k, 76, 32, 1]
            out[a:b] = self._embed.run(None, {"input_1": windows})[0].reshape(b - a, EMBED_DIM)
        return out

    def _encode(self, wav: np.ndarray, n_frames: int) -> np.ndarray:
        if n_frames == 0:
            return np.zeros((0, EMBED_DIM), np.float32)
        return self._embed_windows(self._padded(wav, n_frames), n_frames)

    def _encode_last(self, wav: np.ndarray, n_frames: int, n_last: int) -> np.ndarray:
        # Only the last frames' windows: a streamed frame needs its context's samples, not the context's features.
        if n_last <= 0:
            return np.zeros((0, EMBED_DIM), np.float32)
        padded = self._padded(wav, n_frames)[(n_frames - n_last) * SAMPLES_PER_FRAME:]
        return self._embed_windows(padded, n_last)
