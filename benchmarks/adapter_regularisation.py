"""Does regularising the audio adapter help it generalise? The adapter and mouth probe alone, on a CPU.

A trained head's lip sync follows what its audio adapter's code says about the mouth (the mouth probe's
audio-only prediction is within 0.08 of the rendered score on every GPU run so far, docs/model.md). This trains just
that path, `AudioAdapter` + `MouthProbe` (the model's own classes, window 8 with 3 future rows, Adam at the
network's learning rate, batch 4), on a dataset's training frames and scores the probe's inner-lip gap on the
held-out frames, over several seeds, with and without input dropout (`model.audio_dropout`) and, with `--ema`,
scoring an exponential moving average of the weights instead. Each row also scores the seeds' held-out
predictions averaged (an ensemble of independently trained adapters). With `--members K`, K adapters in one model
share the probe, which reads their mean code: trained with a probe loss per adapter (`--member-loss each`) or one
loss on the mean code (`mean`). Minutes on 2 cores.

    python benchmarks/adapter_regularisation.py /tmp/ds/lieu_ph /tmp/ds/obama_ph --dropouts 0 0.3 0.5
        --json benchmarks/results/adapter_regularisation.json
    python benchmarks/adapter_regularisation.py /tmp/ds/lieu_wh --dropouts 0 --seeds 4 --ema 0 0.999
        --json benchmarks/results/adapter_ema_ensemble_whisper.json
    python benchmarks/adapter_regularisation.py /tmp/ds/lieu_wh --dropouts 0 --members 4 --member-loss each
        --json benchmarks/results/adapter_members_each_whisper.json      (and `mean`)
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from audio_mouth_ceiling import corr, windows  # noqa: E402


def fit(train_x, train_y, val_x, statistics, dropout: float, seed: int, steps: int, lr: float = 5e-4,
        ema: float = 0.0, members: int = 1, member_loss: str = "each"):
    """Held-out and training predictions of the inner-lip gap after `steps` Adam steps (of the weights' moving
    average with decay `ema` when it is above 0; of `members` adapters' mean code)."""
    import torch

    from egstalker.model.audio_adapter import AudioAdapter
    from egstalker.train.mouth_probe import MouthProbe

    torch.manual_seed(seed)
    adapters = torch.nn.ModuleList(
        AudioAdapter(tuple(train_x.shape[2:]), window=train_x.shape[1], input_dropout=dropout) for _ in range(members))
    for member in adapters:
        member.set_statistics(torch.as_tensor(statistics))  # the training frames' own rows, as the trainer does

    def adapter(windows):  # the mean code of the members (one member: its code)
        return torch.stack([member(windows) for member in adapters]).mean(0)

    probe = MouthProbe(32, train_y)
    optimizer = torch.optim.Adam([*adapters.parameters(), *probe.parameters()], lr=lr)
    x, y = torch.as_tensor(train_x), torch.as_tensor(train_y).float()
    generator = torch.Generator().manual_seed(seed)
    averaged = copy.deepcopy([adapters, probe]) if ema > 0 else None
    adapters.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (4,), generator=generator)
        if member_loss == "each":
            loss = sum(probe.loss(member(x[idx]), y[idx]) for member in adapters) / members
        else:
            loss = probe.loss(adapter(x[idx]), y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if averaged is not None:
            with torch.no_grad():
                for mean, now in zip([*averaged[0].parameters(), *averaged[1].parameters()],
                                     [*adapters.parameters(), *probe.parameters()]):
                    mean.lerp_(now, 1.0 - ema)
    if averaged is not None:
        adapters, probe = averaged
    adapters.eval()
    with torch.no_grad():
        return probe(adapter(torch.as_tensor(val_x))).numpy()[:, 0], probe(adapter(x)).numpy()[:, 0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("datasets", nargs="+", type=Path)
    parser.add_argument("--dropouts", type=float, nargs="+", default=[0.0, 0.3])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--ema", type=float, nargs="+", default=[0.0], help="weight-average decays to score (0: off)")
    parser.add_argument("--members", type=int, default=1, help="adapters in one model, sharing the probe")
    parser.add_argument("--member-loss", choices=("each", "mean"), default="each",
                        help="a probe loss per adapter, or one on their mean code")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    import torch

    from egstalker.dataset.reader import open_dataset
    from egstalker.train.mouth_probe import split_mouth_shapes

    torch.set_num_threads(2)
    results = {"command": " ".join(sys.argv), "window": 8, "future_rows": 3, "steps": args.steps, "clips": {}}
    for ds in args.datasets:
        train, val = open_dataset(ds, "train"), open_dataset(ds, "val")
        features = np.load(ds / "aud.npy").astype(np.float32)
        features = features.reshape(len(features), -1)
        dims = features.shape[1]
        train_x = windows(features, train.audio_ids, 8, 3).reshape(len(train), 8, dims)
        val_x = windows(features, val.audio_ids, 8, 3).reshape(len(val), 8, dims)
        train_y, val_y = split_mouth_shapes(train), split_mouth_shapes(val)
        rows = []
        for dropout in args.dropouts:
            for ema in args.ema:
                t0 = time.perf_counter()
                held, seen, predictions = [], [], []
                for seed in range(args.seeds):
                    val_pred, train_pred = fit(train_x, train_y, val_x, features[np.unique(train.audio_ids)], dropout,
                                               seed, args.steps, ema=ema, members=args.members,
                                               member_loss=args.member_loss)
                    predictions.append(val_pred)
                    held.append(round(corr(val_pred, val_y[:, 0]), 3))
                    seen.append(round(corr(train_pred, train_y[:, 0]), 3))
                row = {"audio_dropout": dropout, "ema": ema, "members": args.members,
                       "member_loss": args.member_loss, "heldout_corr": held,
                       "heldout_mean": round(float(np.mean(held)), 3), "train_mean": round(float(np.mean(seen)), 3),
                       "heldout_seed_ensemble": round(corr(np.mean(predictions, 0), val_y[:, 0]), 3)}
                rows.append(row)
                print(ds.name, json.dumps(row), f"({time.perf_counter() - t0:.0f} s)", flush=True)
        results["clips"][ds.name] = {"features": json.loads((ds / "meta.json").read_text())["audio_encoder"]["name"],
                                     "train_frames": len(train), "val_frames": len(val), "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
