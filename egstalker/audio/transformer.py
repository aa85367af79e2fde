"""`wav2vec2` and `hubert`: 768-d hidden states of a self-supervised speech transformer (as the seed used),
loaded through transformers from a local folder or the local Hugging Face cache only (never downloaded at run
time).

The model emits one state every 20 ms (50 Hz); frame i's feature is the mean of states 2i and 2i + 1, the two
inside its 40 ms slot. Attention sees the whole input, so clips are encoded in windows of `WINDOW_FRAMES`
frames with `CONTEXT_SECONDS` of audio on each side: memory stays bounded on long clips and a streaming
server, given the same context, gets nearly the same features (`exact_streaming` is False).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from egstalker.audio.base import SAMPLES_PER_FRAME, AudioEncoder
from egstalker.errors import EgstalkerError

HUB_NAMES = {"wav2vec2": "facebook/wav2vec2-base", "hubert": "facebook/hubert-base-ls960"}
CONTEXT_SECONDS = 2.0
LOOKAHEAD_SECONDS = 0.5
WINDOW_FRAMES = 250  # 10 s per forward pass
CONV_TAIL = 80  # the feature encoder's 400-sample receptive field needs 80 samples past the last 640-block


class TransformerEncoder(AudioEncoder):
    exact_streaming = False
    context_seconds = CONTEXT_SECONDS
    lookahead_seconds = LOOKAHEAD_SECONDS

    def __init__(self, name: str, weights: str | Path | None = None, device: str | None = None):
        try:
            import torch
            import transformers
        except ImportError:
            raise EgstalkerError(f"the '{name}' audio encoder needs torch and transformers: "
                                 "pip install torch transformers") from None
        model_class = transformers.Wav2Vec2Model if name == "wav2vec2" else transformers.HubertModel
        source = str(weights) if weights is not None else HUB_NAMES[name]
        how_to = (f"download it once on a machine with internet (`huggingface-cli download {HUB_NAMES[name]}`, "
                  f"then copy ~/.cache/huggingface or the snapshot folder here) and pass the folder with "
                  f"--audio-weights DIR")
        if weights is not None and not Path(weights).is_dir():
            raise EgstalkerError(f"{name} weights folder {weights} does not exist; {how_to}")
        try:
            self.model = model_class.from_pretrained(source, local_files_only=True)
        except (OSError, ValueError) as e:
            where = f"folder {weights}" if weights is not None else "the local Hugging Face cache"
            raise EgstalkerError(f"{name} weights ({HUB_NAMES[name]}) not found in {where} "
                                 f"({str(e).splitlines()[0][:120]}); {how_to}") from None
        self.model.eval()
        if device is not None:
            self.model.to(device)
        self.name = name
        self.source = source
        self.feature_shape = (int(self.model.config.hidden_size),)
        self.normalize = self._reads_normalize(source, default=(name == "wav2vec2"))
        self._torch = torch

    @staticmethod
    def _reads_normalize(source: str, default: bool) -> bool:
        """Whether the model expects zero-mean unit-variance input (its preprocessor_config.json says)."""
        try:
            from transformers import Wav2Vec2FeatureExtractor

            return bool(Wav2Vec2FeatureExtractor.from_pretrained(source, local_files_only=True).do_normalize)
        except (OSError, ValueError):
            return default

    def _forward(self, segment: np.ndarray) -> np.ndarray:
        """[len(segment) // 320 - 1 ...] 50 Hz hidden states of one window."""
        torch = self._torch
        x = segment
        if self.normalize:  # per window, as the feature extractor does per utterance
            x = (x - x.mean()) / np.sqrt(x.var() + 1e-7)
        device = next(self.model.parameters()).device
        with torch.inference_mode():
            states = self.model(torch.from_numpy(np.ascontiguousarray(x, np.float32))[None].to(device))
        return states.last_hidden_state[0].float().cpu().numpy()

    def _encode(self, wav: np.ndarray, n_frames: int) -> np.ndarray:
        # the same geometry as a FeatureStream window: context before, look-ahead after the frames wanted
        context = math.ceil(CONTEXT_SECONDS * 25)
        lookahead = math.ceil(LOOKAHEAD_SECONDS * 25)
        out = np.empty((n_frames, *self.feature_shape), np.float32)
        for a in range(0, n_frames, WINDOW_FRAMES):
            b = min(n_frames, a + WINDOW_FRAMES)
            first, last = max(0, a - context), b + lookahead  # frames [first, last) go through the model
            segment = np.zeros((last - first) * SAMPLES_PER_FRAME + CONV_TAIL, np.float32)
            piece = wav[first * SAMPLES_PER_FRAME:last * SAMPLES_PER_FRAME + CONV_TAIL]
            segment[:len(piece)] = piece
            states = self._forward(segment)  # [2 (last - first), D]
            pairs = states[:2 * (last - first)].reshape(last - first, 2, -1).mean(axis=1)
            out[a:b] = pairs[a - first:b - first]
        return out

    def describe(self) -> dict:
        return {**super().describe(), "weights": self.source, "normalize_input": self.normalize}
