"""Does fine-tuning Whisper's block 3 on one clip lift how well its features predict the held-out mouth? On a CPU.

The default `whisper` features are block 3 of Whisper base's encoder, frozen. Here block 3 is trained on a
clip's training frames (blocks 1-2 stay frozen, their states computed once): a linear read-out from each
frame's window (8 rows, 3 ahead, dropout 0.2, weight decay 1) to its standardised mouth opening, AdamW, all
training frames per step. After each epoch the features are scored as `whisper_layers.py` scores them: a ridge
fit (alpha = input dims) on the training frames, correlation on the held-out split (never trained on) and on
the training frames themselves. Epoch 0 is the packaged encoder (checked equal to `WhisperEncoder(layer=3)`).

    python benchmarks/whisper_finetune.py /tmp/ds/lieu_wh /tmp/ds/obama_wh --lr 1e-4 --epochs 5 \
        --json benchmarks/results/whisper_finetune.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

WINDOW, AHEAD = 8, 3


def finetune_clip(ds: Path, lr: float, epochs: int, steps: int, seed: int) -> dict:
    import soundfile as sf
    import torch
    from audio_mouth_ceiling import corr, fit_ridge, mouth_openings

    from egstalker.audio.base import SAMPLE_RATE, SAMPLES_PER_FRAME, window_offsets
    from egstalker.audio.whisper import (BATCH_WINDOWS, BLOCK_FRAMES, WINDOW_CONTEXT_SECONDS,
                                         WINDOW_LOOKAHEAD_SECONDS, WhisperEncoder, encoder_block)
    from egstalker.dataset.reader import open_dataset

    torch.manual_seed(seed)
    functional = torch.nn.functional
    wav, rate = sf.read(str(ds / "aud.wav"), dtype="float32")
    assert rate == SAMPLE_RATE
    train, val = open_dataset(ds, "train"), open_dataset(ds, "val")
    y_train, y_val = mouth_openings(train), mouth_openings(val)
    below, top = WhisperEncoder(layer=2), WhisperEncoder(layer=3)

    # the encoder's own 2.4 s windows, one per 200 ms block
    block = BLOCK_FRAMES * SAMPLES_PER_FRAME
    before = round(WINDOW_CONTEXT_SECONDS * SAMPLE_RATE)
    length = before + block + round(WINDOW_LOOKAHEAD_SECONDS * SAMPLE_RATE)
    n_frames = len(wav) // SAMPLES_PER_FRAME
    n_blocks = -(-n_frames // BLOCK_FRAMES)
    windows = np.zeros((n_blocks, length), np.float32)
    for k in range(n_blocks):
        start = k * block - before
        lo, hi = max(0, start), min(len(wav), start + length)
        if hi > lo:
            windows[k, lo - start:hi - start] = wav[lo:hi]
    states = torch.from_numpy(np.concatenate([below.states(windows[i:i + BATCH_WINDOWS])
                                              for i in range(0, n_blocks, BATCH_WINDOWS)]))
    width, heads = states.shape[-1], top.heads
    params = {k[len("layer_2/"):]: torch.nn.Parameter(v.clone()) for k, v in top.weights.items()
              if k.startswith("layer_2/")}
    own = slice(before // 320, (before + block) // 320)  # the block's own 20 ms states

    def block3(x):
        return encoder_block(x, params, heads, own).reshape(-1, BLOCK_FRAMES, 2, width).mean(dim=2) \
            .reshape(-1, width)[:n_frames]

    offsets = torch.from_numpy(window_offsets(WINDOW, AHEAD))
    rows_train = torch.clamp(torch.from_numpy(train.audio_ids)[:, None] + offsets, 0, n_frames - 1)
    rows_val = torch.clamp(torch.from_numpy(val.audio_ids)[:, None] + offsets, 0, n_frames - 1)

    def scores(feats) -> dict:
        f = feats.detach().numpy()
        xa, xb = f[rows_train.numpy()].reshape(len(rows_train), -1), f[rows_val.numpy()].reshape(len(rows_val), -1)
        alpha = float(xa.shape[1])
        return {"heldout_corr": round(corr(fit_ridge(xa, y_train, xb, alpha), y_val), 3),
                "train_corr": round(corr(fit_ridge(xa, y_train, xa, alpha), y_train), 3)}

    with torch.no_grad():
        start_feats = block3(states)
    packaged = top.encode(wav).reshape(-1, width)[:n_frames]
    max_diff = float(np.abs(start_feats.numpy() - packaged).max())
    mean, std = start_feats.mean(0), start_feats.std(0) + 1e-6
    target = torch.from_numpy(((y_train - y_train.mean()) / y_train.std()).astype(np.float32))
    readout = torch.nn.Linear(WINDOW * width, 1)
    torch.nn.init.zeros_(readout.weight)
    torch.nn.init.zeros_(readout.bias)
    optimiser = torch.optim.AdamW([{"params": list(params.values()), "lr": lr},
                                   {"params": readout.parameters(), "lr": 1e-3, "weight_decay": 1.0}])
    curve = [{"epoch": 0, "loss": None, **scores(start_feats)}]
    print(ds.name, json.dumps(curve[-1]), flush=True)
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        for _ in range(steps):
            feats = (block3(states) - mean) / std
            x = functional.dropout(feats[rows_train].reshape(len(rows_train), -1), 0.2)
            loss = functional.mse_loss(readout(x).squeeze(-1), target)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        with torch.no_grad():
            curve.append({"epoch": epoch, "loss": round(float(loss), 4), **scores(block3(states)),
                          "seconds": round(time.perf_counter() - t0, 1)})
        print(ds.name, json.dumps(curve[-1]), flush=True)
    return {"train_frames": len(train), "val_frames": len(val), "blocks": n_blocks,
            "max_abs_diff_from_packaged_features": max_diff, "curve": curve}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("datasets", nargs="+", type=Path, help="datasets preprocessed with the whisper encoder")
    parser.add_argument("--lr", type=float, default=1e-4, help="block 3's learning rate")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="steps per epoch (each over all training frames)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    import torch
    from audio_mouth_ceiling import write_json

    torch.set_num_threads(2)
    results = {"command": " ".join(sys.argv), "window": WINDOW, "ahead": AHEAD, "lr": args.lr,
               "steps_per_epoch": args.steps, "clips": {}}
    for ds in args.datasets:
        results["clips"][ds.name] = finetune_clip(ds, args.lr, args.epochs, args.steps, args.seed)
    if args.json:
        write_json(args.json, results)


if __name__ == "__main__":
    main()
