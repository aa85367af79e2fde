"""Where each file of a preprocessed dataset lives (one place, used by every stage).

The layout follows the AD-NeRF / ER-NeRF / GaussianTalker family so peers' readers can load it where the
formats overlap; `meta.json` adds what they lack (audio encoder, frame rate, sync and tracking reports).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DATASET_FORMAT_VERSION = 1


@dataclass(frozen=True)
class DatasetLayout:
    root: Path

    def __init__(self, root: str | Path):
        object.__setattr__(self, "root", Path(root))

    # --- whole-clip files
    @property
    def meta(self) -> Path:
        """egstalker metadata: format version, fps, frame count, size, audio encoder, sync/tracking reports."""
        return self.root / "meta.json"

    @property
    def preprocess_config(self) -> Path:
        return self.root / "preprocess_config.json"

    @property
    def audio_wav(self) -> Path:
        """16 kHz mono, exactly n_frames / 25 s long."""
        return self.root / "aud.wav"

    @property
    def audio_features(self) -> Path:
        """[n_frames, ...] float32: one row (or window) per video frame."""
        return self.root / "aud.npy"

    @property
    def deepspeech_features(self) -> Path:
        """Optional peers' DeepSpeech logits [n_frames, 16, 29]."""
        return self.root / "aud_ds.npy"

    @property
    def background(self) -> Path:
        return self.root / "bc.jpg"

    @property
    def track_params(self) -> Path:
        return self.root / "track_params.pt"

    @property
    def action_units(self) -> Path:
        """OpenFace-style CSV (", " separated: the column is " AU45_r"); eye blink, 0 open .. 2+ closed."""
        return self.root / "au.csv"

    def transforms(self, split: str) -> Path:
        """split: 'train' or 'val'."""
        return self.root / f"transforms_{split}.json"

    # --- per-frame folders
    @property
    def frames_dir(self) -> Path:
        return self.root / "ori_imgs"

    @property
    def parsing_dir(self) -> Path:
        return self.root / "parsing"

    @property
    def torso_dir(self) -> Path:
        return self.root / "torso_imgs"

    @property
    def gt_dir(self) -> Path:
        return self.root / "gt_imgs"

    def frame(self, i: int) -> Path:
        return self.frames_dir / f"{i}.jpg"

    def landmarks(self, i: int) -> Path:
        """68 iBUG points, one 'x y' line each, in pixels of the frame."""
        return self.frames_dir / f"{i}.lms"

    def parsing(self, i: int) -> Path:
        return self.parsing_dir / f"{i}.png"

    def torso(self, i: int) -> Path:
        return self.torso_dir / f"{i}.png"

    def gt(self, i: int) -> Path:
        return self.gt_dir / f"{i}.jpg"
