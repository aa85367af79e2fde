"""The audio/video offset estimator (egstalker.preprocess.av_sync) on sliding windows of real clips: how often a
short stretch of a recording gives a wrong offset that is still marked reliable, and which cheap statistics of the
estimator's own curve separate those wrong estimates from right ones.

For each dataset, window length (seconds; `whole` = the whole training part, as preprocessing task 9 sees it)
and offset added on purpose to the sound (0, +3, -3 frames: `shift_audio`, as benchmarks/av_offset.py does), the
estimator runs on the frames [start, start + len) of the training frames (start steps by half the window) with the
matching 16 kHz audio (the whole aud.wav for `whole`, as task 9 passes it). The mouth opening comes from the
dataset's landmark cache through the same code as task 9 (av_sync.mouth_openings of the training frames). The
per-fold scores of `ridge_cv_scores` are recorded while the estimator runs (the module's function is wrapped, not
re-implemented), so each window also gets:

- expected: the true offset plus the added one; error = frames - expected (an applied offset of 0 is right when
  |expected| <= 1, the dead band); `wrong` = reliable, |error| >= 2;
- score_at_expected / score_at_zero: the best curve value over the shifts that map to that offset inside the dead
  band (expected + 0..2 rows; 0..2 for no offset); score_at_chosen: the curve at the chosen peak's nearest shift;
- gap_zero = best - score_at_zero (the evidence that the offset is not 0), gap_zero_rel = gap_zero / best;
- top_width: how many shifts the top run (>= 0.9 best) spans;
- per fold: the best shift of each fold's curve and the decision it implies; fold_t: a paired t statistic over the 5
  folds of (fold score at the chosen shift - fold's best score over the no-offset shifts 0..2), folds_beating_zero;
- jackknife: the estimator's decision on the mean curve of each 4 of the 5 folds (jack_agree: how many equal the
  chosen frames; jack_peak_se: the jackknife standard error of the peak), and a bootstrap over folds (boot_agree:
  the fraction of 500 resamples that agree; boot_peak_sd: the spread of their peaks); fold_curves: every fold's
  curve, to try other statistics offline.

Window lengths 6-30 s (the brief's 6, 8, 10, 14, 20, plus 7, 12, 16, 18, 25, 30 to place the threshold). The rules
(`RULES`: the estimator's current `reliable`, the proposed one, an alternative for comparison) are evaluated on the
saved rows and printed per dataset and window length; `--evaluate` does only that on a saved JSON. About 5 minutes
on a free CPU core (one process):

    python benchmarks/av_offset_windows.py /tmp/ds/lieu_wh:0 /tmp/ds/obama_wh:4 /tmp/ds/ng_27s_256_30fps:0 \
        /tmp/ds/hill_8s_512:0 /tmp/ds/aoc_8s_512:0 --json benchmarks/results/av_offset_windows.json
    python benchmarks/av_offset_windows.py --evaluate benchmarks/results/av_offset_windows.json

Found (benchmarks/results/av_offset_windows.json, 429 windows): the estimator as it is marks 94 wrong estimates
reliable, 70 of them applied nonzero offsets 2+ frames off (all on windows under 16 s; 6 on lieu's 7 s ones);
Wrong and right estimates on short windows overlap in every statistic recorded here: the best rule on two of them
picked on the 6-20 s windows (bootstrap agreement >= 0.72, fold best-shift spread <= 16) let 2 wrong ones through
on the 12-30 s windows; the rules that held all lean on the window's length. Proposed: no estimate from under 16 s
of faces is reliable (`rule_proposed`, MIN_OFFSET_FRAMES): 0 wrong reliable, 57 of 210 right nonzero offsets kept
(all of those on 16 s and longer), obama's whole clip (+4, and +7 with 3 added) still applied. The 8 s clips (hill,
aoc) have no known offset: taken as 0 (their whole-clip curves are too weak to be applied either way).
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

FPS = 25
SAMPLES_PER_FRAME = 640
QUIET = ("curve", "fold_diff_vs_zero", "fold_scores_at_chosen", "fold_best_shift", "jack_frames", "jack_peaks",
         "fold_curves")
"""Row fields left out of the progress lines (they are in the JSON)."""


def decide(curve: np.ndarray, shifts: list[int]) -> tuple[int, float, bool]:
    """The estimator's decision (frames, peak, reliable) from a jackknife or bootstrap curve, without the length
    floor (av_sync.decide_offset; the main estimate comes from the estimator itself)."""
    from egstalker.preprocess.av_sync import MIN_OFFSET_FRAMES, decide_offset

    offset = decide_offset(list(np.asarray(curve, float)), shifts, MIN_OFFSET_FRAMES)
    return offset.frames, offset.peak_frames, offset.reliable


def estimate_with_folds(wav: np.ndarray, opening: np.ndarray):
    """estimate_audio_offset, with the per-fold scores of every shift recorded ([shifts, folds])."""
    from egstalker.preprocess import av_sync

    recorded = []
    original = av_sync.ridge_cv_scores

    def recording(*args, **kwargs):
        scores = original(*args, **kwargs)
        recorded.append(list(scores))
        return scores

    av_sync.ridge_cv_scores = recording
    try:
        estimate = av_sync.estimate_audio_offset(wav, opening)
    finally:
        av_sync.ridge_cv_scores = original
    return estimate, (np.array(recorded) if recorded else None)


def window_row(estimate, folds: np.ndarray | None, expected: int, rng: np.random.Generator) -> dict:
    from egstalker.preprocess import av_sync as m

    shifts = list(estimate.shifts)
    index = {s: i for i, s in enumerate(shifts)}
    r = lambda x, d=4: None if x is None or not np.isfinite(x) else round(float(x), d)  # noqa: E731
    row = {"frames": estimate.frames, "reliable": estimate.reliable, "at_edge": estimate.at_edge,
           "peak_frames": r(estimate.peak_frames, 3), "peak_corr": r(estimate.peak_corr), "expected": expected,
           "error": estimate.frames - expected}
    row["right"] = abs(row["error"]) <= 1 or (estimate.frames == 0 and abs(expected) <= 1)
    row["wrong"] = bool(estimate.reliable and abs(row["error"]) >= 2)
    if folds is None:
        return row
    curve = folds.mean(1)
    best_i = int(curve.argmax())
    best = float(curve[best_i])
    zero_ix = [index[s] for s in (0, 1, 2)]
    exp_ix = [index[s] for s in (expected, expected + 1, expected + 2) if s in index]
    chosen_i = index[int(round(estimate.peak_frames))] if np.isfinite(estimate.peak_frames) else best_i
    from egstalker.preprocess.av_sync import top_run

    lo, hi = top_run(curve)
    row.update({
        "best_shift": shifts[best_i], "score_at_chosen": r(curve[chosen_i]),
        "score_at_expected": r(curve[exp_ix].max()) if exp_ix else None, "score_at_zero": r(curve[zero_ix].max()),
        "gap_zero": r(best - curve[zero_ix].max()), "gap_zero_rel": r((best - curve[zero_ix].max()) / best),
        "gap_expected": r(best - curve[exp_ix].max()) if exp_ix else None,
        "top_width": hi - lo + 1, "top_lo": shifts[lo], "top_hi": shifts[hi],
        "curve": [r(c, 3) for c in curve]})
    # per fold
    fold_best = [shifts[int(folds[:, k].argmax())] for k in range(folds.shape[1])]
    fold_frames = []
    for b in fold_best:
        s = b - m.NATURAL_LEAD_FRAMES
        fold_frames.append(int(round(s)) if abs(s) >= m.DEADBAND_FRAMES else 0)
    d = folds[chosen_i] - folds[zero_ix].max(0)
    sd = float(d.std(ddof=1))
    row.update({"fold_best_shift": fold_best, "fold_frames": fold_frames,
                "fold_best_spread": int(max(fold_best) - min(fold_best)),
                "fold_frames_agree": int(sum(f == estimate.frames for f in fold_frames)),
                "fold_diff_vs_zero": [r(x) for x in d], "folds_beating_zero": int((d > 0).sum()),
                "fold_t": r(d.mean() / (sd / np.sqrt(len(d)))) if sd > 0 else None,
                "fold_scores_at_chosen": [r(x) for x in folds[chosen_i]]})
    # jackknife (leave one fold out) and bootstrap over folds of the mean curve
    k = folds.shape[1]
    jack = [decide(np.delete(folds, j, axis=1).mean(1), shifts) for j in range(k)]
    row["jack_frames"] = [f if ok else None for f, _, ok in jack]
    row["jack_peaks"] = [r(p, 3) if ok else None for _, p, ok in jack]
    row["jack_agree"] = int(sum(ok and f == estimate.frames for f, _, ok in jack))
    peaks = np.array([p if ok else np.nan for _, p, ok in jack])
    # jackknife standard error of the peak position (NaN when a leave-one-out curve gives no peak)
    row["jack_peak_se"] = r(np.sqrt((k - 1) / k * np.sum((peaks - peaks.mean()) ** 2)), 3)
    boot = [decide(folds[:, rng.integers(0, k, k)].mean(1), shifts) for _ in range(500)]
    row["boot_agree"] = r(np.mean([ok and f == estimate.frames for f, _, ok in boot]), 3)
    row["boot_reliable"] = r(np.mean([ok for _, _, ok in boot]), 3)
    boot_peaks = np.array([p for _, p, ok in boot if ok])
    row["boot_peak_sd"] = r(boot_peaks.std(), 3) if len(boot_peaks) > 1 else None
    row["fold_curves"] = [[r(x, 3) for x in folds[:, j]] for j in range(k)]
    return row


def measure(args) -> dict:
    import soundfile as sf
    from av_offset import training_mouth_opening  # the task-9 path: av_sync.mouth_openings of the training frames

    from egstalker.preprocess.av_sync import shift_audio

    results = {"command": " ".join(sys.argv), "windows_s": args.windows, "added": args.added, "clips": {}}
    rng = np.random.default_rng(0)
    for spec in args.datasets:
        path, _, true = spec.rpartition(":")
        ds, true = Path(path), int(true)
        wav, rate = sf.read(str(ds / "aud.wav"), dtype="float32", always_2d=False)
        assert rate == 16000, rate
        opening = training_mouth_opening(ds)
        n_train = len(opening)
        rows = []
        for added in [0, *args.added]:
            shifted = shift_audio(wav, added)
            for length in [*args.windows, "whole"]:
                if length == "whole":
                    spans = [(0, n_train)]
                else:
                    n = int(round(float(length) * FPS))
                    if n > n_train:
                        continue
                    step = max(1, n // 2)
                    spans = [(s, n) for s in range(0, n_train - n + 1, step)]
                for start, n in spans:
                    t0 = time.perf_counter()
                    audio = shifted if length == "whole" else \
                        shifted[start * SAMPLES_PER_FRAME:(start + n) * SAMPLES_PER_FRAME]
                    estimate, folds = estimate_with_folds(audio, opening[start:start + n])
                    row = {"window_s": length, "start_frame": start, "n_frames": n,
                           "face_frames": int(np.isfinite(opening[start:start + n]).sum()), "added": added,
                           **window_row(estimate, folds, true + added, rng),
                           "seconds": round(time.perf_counter() - t0, 2)}
                    rows.append(row)
                    print(ds.name, json.dumps({k: v for k, v in row.items() if k not in QUIET}), flush=True)
        results["clips"][ds.name] = {"true_offset_frames": true, "training_frames": n_train, "rows": rows}
        if args.json:  # after every clip: a long run keeps what it has
            args.json.write_text(json.dumps(results, indent=None, separators=(",", ":")) + "\n")
    return results


# --- reliability rules on the saved rows -----------------------------------------------------------------------

def rule_current(row: dict) -> bool:
    return row["reliable"]


MIN_OFFSET_FRAMES = 400
"""The proposed rule's floor: 16 s of training frames with a face (see the report in the module docstring)."""


def rule_proposed(row: dict) -> bool:
    """The proposed rule: an estimate from under MIN_OFFSET_FRAMES frames with a face is not reliable (frames 0).
    The peak's position wanders by about a frame on 6-14 s of speech, which with the rounding and the clips' own lead (0.5-1.8 rows around NATURAL_LEAD_FRAMES) gives offsets 2-3
    frames wrong; no statistic of the curve (peak correlation, margin over the no-offset shifts, peak width, fold
    agreement, jackknife or bootstrap spread) told those apart from right ones on held-out window lengths."""
    return bool(row["reliable"] and row.get("face_frames", row["n_frames"]) >= MIN_OFFSET_FRAMES)


def rule_alternative(row: dict) -> bool:
    """Not proposed, for comparison: also trust 10-14 s when the curve is strong and every leave-one-fold-out curve
    agrees. It kept a few more right offsets here with no wrong one, but its thresholds were picked on these rows."""
    if not row["reliable"]:
        return False
    n = row.get("face_frames", row["n_frames"])
    return n >= MIN_OFFSET_FRAMES or (n >= 250 and row["peak_corr"] >= 0.5 and row.get("jack_agree") == 5)


RULES = {"current": rule_current, "proposed": rule_proposed, "alternative": rule_alternative}


def evaluate(results: dict, rule) -> dict:
    """Per clip and window length: windows; wrong-but-reliable (applied wrong: frames != 0); right nonzero kept."""
    table = {}
    for clip, data in results["clips"].items():
        for row in data["rows"]:
            key = (clip, str(row["window_s"]))
            t = table.setdefault(key, {"windows": 0, "wrong_reliable": 0, "wrong_applied": 0, "right_nonzero": 0,
                                       "right_nonzero_kept": 0})
            t["windows"] += 1
            ok = rule(row)
            if ok and abs(row["error"]) >= 2:
                t["wrong_reliable"] += 1
                t["wrong_applied"] += row["frames"] != 0
            if row["frames"] != 0 and abs(row["error"]) <= 1:
                t["right_nonzero"] += 1
                t["right_nonzero_kept"] += bool(ok)
            t["reliable"] = t.get("reliable", 0) + bool(ok)
    return table


def print_tables(results: dict) -> dict:
    tables = {name: evaluate(results, rule) for name, rule in RULES.items()}
    print("wrong = reliable with |frames - expected| >= 2 (applied: frames != 0); right nonzero = |error| <= 1, "
          "frames != 0: kept (reliable) / all")
    print(f"{'clip':18s} {'window':>6s} {'n':>4s} | wrong (applied): current proposed alternative | "
          "right nonzero kept: current proposed alternative")
    for key in tables["current"]:
        a, b, c = (tables[name][key] for name in ("current", "proposed", "alternative"))
        print(f"{key[0]:18s} {key[1]:>6s} {a['windows']:4d} | " + "  ".join(
            f"{t['wrong_reliable']:3d} ({t['wrong_applied']:3d})" for t in (a, b, c)) + " | " + "  ".join(
            f"{t['right_nonzero_kept']:3d}/{t['right_nonzero']:3d}" for t in (a, b, c)))
    totals = {name: {k: sum(t[k] for t in table.values()) for k in next(iter(table.values()))}
              for name, table in tables.items()}
    for name, t in totals.items():
        print(f"total {name:12s} {t}")
    return {"tables": {name: {f"{k[0]} {k[1]}": v for k, v in t.items()} for name, t in tables.items()},
            "totals": totals}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("datasets", nargs="*", help="DATASET:TRUE_OFFSET_FRAMES, e.g. /tmp/ds/obama_wh:4")
    parser.add_argument("--windows", type=float, nargs="*", default=[6, 7, 8, 10, 12, 14, 16, 18, 20, 25, 30],
                        help="window lengths, s")
    parser.add_argument("--added", type=int, nargs="*", default=[3, -3], help="offsets added to the sound, frames")
    parser.add_argument("--json", type=Path, default=None, help="write the rows (and the rule tables) here")
    parser.add_argument("--evaluate", type=Path, default=None, help="only evaluate the rules on a saved JSON")
    args = parser.parse_args()
    if args.evaluate:
        results = json.loads(args.evaluate.read_text())
        print_tables(results)
        return
    results = measure(args)
    results["rules"] = print_tables(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=None, separators=(",", ":")) + "\n")


if __name__ == "__main__":
    main()
