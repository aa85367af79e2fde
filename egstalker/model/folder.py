"""The model folder: what `train` writes and `render`/`eval`/`serve` read (nothing else of training needed).

    MODEL_DIR/
      model.json          format version, architecture (ModelSpec), audio encoder, output size, dataset path
      model.pt            weights of the latest checkpoint (GaussianHead state dict), written atomically
      poses.npz           pose sources: every frame's camera (train frames first, then val), K, eye blink
      train_config.json   the TrainConfig tree it was trained with
      checkpoints/        full training states (step_000123.pt) for --resume
      logs/               TensorBoard

Torso and background images are *referenced* from the dataset folder recorded in model.json (they are large:
one torso image per frame); `TalkingHead.from_dir(..., dataset_dir=...)` accepts a moved dataset.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from egstalker.configs import atomic_write_text
from egstalker.errors import EgstalkerError
from egstalker.model.head import GaussianHead, ModelSpec

MODEL_FORMAT_VERSION = 1


@dataclass
class ModelInfo:
    """Contents of model.json."""

    spec: ModelSpec
    encoder_name: str
    width: int
    height: int
    dataset: str
    """Absolute path of the dataset it was trained on (torso/background sources)."""
    n_train_frames: int
    step: int = 0
    fps: float = 25.0
    sample_rate: int = 16000
    format_version: int = MODEL_FORMAT_VERSION
    dataset_source: dict | None = None
    """What identifies the dataset's footage (`dataset_source`): its source video's name and size, its frame count
    and the framed frames' size, from meta.json; None for a dataset without meta.json or a model written before it
    was recorded."""

    def to_json(self) -> dict:
        return {"format_version": self.format_version, "step": self.step, "encoder_name": self.encoder_name,
                "width": self.width, "height": self.height, "fps": self.fps, "sample_rate": self.sample_rate,
                "dataset": self.dataset, "n_train_frames": self.n_train_frames, "dataset_source": self.dataset_source,
                "spec": self.spec.to_json()}


def dataset_source(dataset_dir: str | Path) -> dict | None:
    """The footage a dataset was made from (source video name and bytes, frame count, the framed frames' size) and
    the audio weights its features came from (`--audio-weights`; None: the encoder's own), from its meta.json; None
    without one (a peer's dataset)."""
    path = Path(dataset_dir) / "meta.json"
    try:
        meta = json.loads(path.read_text())
        video = meta["source_video"]
        size = [int(meta["width"]), int(meta["height"])] if "width" in meta and "height" in meta else None
        source = {"video": Path(video["path"]).name, "video_bytes": int(video["bytes"]),
                  "n_frames": int(meta["n_frames"]), "frame_size": size}
        if "weights_path" in meta.get("audio_encoder", {}):
            source["audio_weights"] = meta["audio_encoder"]["weights_path"]
        return source
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_dataset_matches(info: ModelInfo, poses: PoseSources, dataset_dir: str | Path) -> None:
    """Raise EgstalkerError when `dataset_dir` is not the footage the model was trained on: its torso images and
    background would be another video's, composited under this head without a word."""
    found = dataset_source(dataset_dir)
    if info.dataset_source and found and (found["video_bytes"], found["n_frames"]) != (
            info.dataset_source["video_bytes"], info.dataset_source["n_frames"]):
        raise EgstalkerError(f"dataset {dataset_dir} was made from {found['video']} ({found['n_frames']} frames), but "
                             f"the model was trained on {info.dataset_source['video']} "
                             f"({info.dataset_source['n_frames']} frames); pass the dataset it was trained on")
    if info.dataset_source and found and "audio_weights" in info.dataset_source and \
            found.get("audio_weights") != info.dataset_source["audio_weights"]:
        now, then = (w or "the encoder's own" for w in (found.get("audio_weights"),
                                                         info.dataset_source["audio_weights"]))
        raise EgstalkerError(f"dataset {dataset_dir}'s audio features were made again with other weights ({now}) "
                             f"since the model was trained on those of {then}; train again, or re-encode the dataset "
                             "with the weights it was trained on (preprocess --audio-weights)")
    trained_size = (info.dataset_source or {}).get("frame_size")
    if trained_size and found and found["frame_size"] and found["frame_size"] != trained_size:
        raise EgstalkerError(f"dataset {dataset_dir} was preprocessed again with other framing since the model was "
                             f"trained (frames {trained_size[0]}x{trained_size[1]} then, {found['frame_size'][0]}x"
                             f"{found['frame_size'][1]} now: another --crop or --max-size): its torso and background "
                             "no longer fit the head; train again on it, or preprocess with the settings it was trained on")
    last = int(poses.frame_ids.max()) if len(poses.frame_ids) else -1
    if (found and found["n_frames"] <= last) or (last >= 0 and not (Path(dataset_dir) / "torso_imgs" / f"{last}.png").is_file()):
        raise EgstalkerError(f"dataset {dataset_dir} has no torso image for frame {last}, which the model was trained "
                             "on: it is another video's dataset or incomplete; pass the dataset the model was trained "
                             "on (re-run `egstalker preprocess` on its video if it is incomplete)")


@dataclass
class PoseSources:
    """Per-frame pose sources (train frames first, then held-out ones)."""

    frame_ids: np.ndarray   # [n] dataset image ids
    audio_ids: np.ndarray   # [n] rows of the dataset's audio features
    viewmats: np.ndarray    # [n, 4, 4] world-to-camera (OpenCV axes)
    K: np.ndarray           # [3, 3] at the model's output size
    au45: np.ndarray        # [n] eye blink in [0, 1]
    n_train: int


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    """torch.save through a temporary file + rename (an interrupted save never leaves half a file)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def write_model(model_dir: Path, model: GaussianHead, info: ModelInfo, poses: PoseSources | None = None) -> None:
    """Write model.pt (+ model.json, poses.npz) atomically."""
    model_dir = Path(model_dir)
    info.spec.n_gaussians = len(model.gaussians)
    atomic_torch_save({k: v.detach().cpu() for k, v in model.state_dict().items()}, model_dir / "model.pt")
    atomic_write_text(model_dir / "model.json", json.dumps(info.to_json(), indent=2) + "\n")
    if poses is not None:
        buffer = io.BytesIO()
        np.savez(buffer, frame_ids=poses.frame_ids, audio_ids=poses.audio_ids, viewmats=poses.viewmats,
                 K=poses.K, au45=poses.au45, n_train=np.int64(poses.n_train))
        tmp = model_dir / ".poses.npz.tmp"
        tmp.write_bytes(buffer.getvalue())
        os.replace(tmp, model_dir / "poses.npz")


def read_model_info(model_dir: str | Path) -> ModelInfo:
    model_dir = Path(model_dir)
    if not model_dir.exists():
        raise EgstalkerError(f"model folder {model_dir} does not exist; train one with `egstalker train DATASET -o {model_dir}`")
    if not model_dir.is_dir():
        raise EgstalkerError(f"{model_dir} is a file, not a model folder; give the folder `egstalker train -o` wrote")
    path = model_dir / "model.json"
    if not path.exists():
        raise EgstalkerError(f"{model_dir} is not a model folder (no model.json); give the folder `egstalker train -o` wrote")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise EgstalkerError(f"{path} is not valid JSON ({e}); the model folder is damaged, train again") from None
    version = data.get("format_version")
    if version != MODEL_FORMAT_VERSION:
        raise EgstalkerError(f"model {model_dir} has format version {version}; this egstalker reads version "
                             f"{MODEL_FORMAT_VERSION}: train the model again with this version")
    try:
        encoder_name = data["encoder_name"]
        if encoder_name in ("", "default"):  # written before the default encoder changed: it meant oww
            from egstalker.audio import LEGACY_DEFAULT_ENCODER

            encoder_name = LEGACY_DEFAULT_ENCODER
        return ModelInfo(spec=ModelSpec.from_json(data["spec"]), encoder_name=encoder_name,
                         width=int(data["width"]), height=int(data["height"]), dataset=data["dataset"],
                         n_train_frames=int(data["n_train_frames"]), step=int(data.get("step", 0)),
                         fps=float(data.get("fps", 25.0)), sample_rate=int(data.get("sample_rate", 16000)),
                         dataset_source=data.get("dataset_source"))
    except (KeyError, TypeError) as e:
        raise EgstalkerError(f"{path} lacks field {e}; the model folder is damaged, train again") from None


def load_model(model_dir: str | Path, device: str | torch.device = "cpu") -> tuple[GaussianHead, ModelInfo]:
    """Rebuild the trained GaussianHead from a model folder (eval mode, on `device`)."""
    model_dir = Path(model_dir)
    info = read_model_info(model_dir)
    weights = model_dir / "model.pt"
    if not weights.exists():
        raise EgstalkerError(f"{model_dir} has no model.pt (training never wrote one); train again or --resume")
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError, EOFError, UnpicklingError... for a damaged file
        raise EgstalkerError(f"{weights} is damaged and cannot be read ({type(e).__name__}); "
                             "`egstalker train DATASET -o MODEL --resume` writes it again from the last checkpoint") from None
    try:
        model = GaussianHead.from_spec(info.spec)
    except (TypeError, ValueError) as e:
        raise EgstalkerError(f"{model_dir / 'model.json'} holds an architecture that cannot be built ({e}); the "
                             "model folder is damaged, train again") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise EgstalkerError(f"{weights} does not match model.json ({str(e).splitlines()[0]}); train again") from None
    return model.to(device).eval(), info


def read_poses(model_dir: str | Path) -> PoseSources:
    path = Path(model_dir) / "poses.npz"
    if not path.exists():
        raise EgstalkerError(f"{path} is missing; the model folder is incomplete, train again")
    try:
        with np.load(path) as z:
            return PoseSources(frame_ids=z["frame_ids"], audio_ids=z["audio_ids"], viewmats=z["viewmats"], K=z["K"],
                               au45=z["au45"], n_train=int(z["n_train"]))
    except Exception as e:  # a truncated or foreign file: BadZipFile, KeyError, ValueError, OSError...
        raise EgstalkerError(f"{path} is damaged and cannot be read ({type(e).__name__}); "
                             "`egstalker train DATASET -o MODEL --resume` writes it again from the last checkpoint") from None
