"""Write a `mel_phones_oww` feature overlay for the GPU sweep 'phones_oww': a mel_phones dataset's features with
openwakeword's 96-d speech embedding appended, its 782 ms window ending 360 ms after each frame's slot (so the
slot sits near the window's middle, where its information is; within mel_phones' 1 s look-ahead).

A linear fit from this window to the mouth opening beat mel_phones on both clips (cross-validated: lieu 0.68 ->
0.73, obama 0.56 -> 0.63; benchmarks/results/audio_mouth_ceiling_cv_phones_oww.json), but trained heads did not
(benchmarks/results/train_phones_oww_h200.json; docs/model.md "Three more tries on the GPU"), so it is not an
encoder of the package.

    python benchmarks/phones_oww_overlay.py /tmp/ds/lieu_ph .carry_po/lieu_po
    (then train_quality_gpu.py device ... --features lieu_po)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

EMBEDDING_LOOKAHEAD_SECONDS = 0.36


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", type=Path, help="a dataset preprocessed with --audio-features mel_phones")
    parser.add_argument("out", type=Path, help="folder to write aud.npy + meta.json into")
    args = parser.parse_args()

    import soundfile as sf

    from egstalker.audio.oww import OwwEncoder

    meta = json.loads((args.dataset / "meta.json").read_text())
    if meta["audio_encoder"]["name"] != "mel_phones":
        sys.exit(f"{args.dataset} holds '{meta['audio_encoder']['name']}' features; preprocess it with "
                 "--audio-features mel_phones first")
    phones = np.load(args.dataset / "aud.npy")
    wav, rate = sf.read(str(args.dataset / "aud.wav"), dtype="float32")
    assert rate == 16000
    embedding_encoder = OwwEncoder(EMBEDDING_LOOKAHEAD_SECONDS)
    embedding = embedding_encoder.encode(wav)
    if len(embedding) != len(phones):
        sys.exit(f"{len(phones)} feature rows but {len(embedding)} embedding rows: the dataset's aud.wav changed")
    meta["audio_encoder"] = {**meta["audio_encoder"], "name": "mel_phones_oww",
                             "feature_shape": [phones.shape[1] + embedding.shape[1]],
                             "speech_embedding": {"name": "oww",
                                                  "lookahead_seconds": embedding_encoder.lookahead_seconds}}
    args.out.mkdir(parents=True, exist_ok=True)
    for name, write in (("aud.npy", lambda f: np.save(f, np.hstack([phones, embedding]).astype(np.float32))),
                        ("meta.json", lambda f: f.write(json.dumps(meta, indent=1).encode()))):
        tmp = args.out / f".{name}.tmp"
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, args.out / name)
    print(f"wrote {args.out}: {len(phones)} rows of {phones.shape[1] + embedding.shape[1]}")


if __name__ == "__main__":
    main()
