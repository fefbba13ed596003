"""Does training the first epochs at a lower resolution keep the ranking the pruner sees?

On ../shared/data/fashion-mnist-2k with the lite0 ImageNet weights, the same enqueued
trials (freeze depths and learning rates from good to poor) run three ways: every epoch
at full size, and with ``--early-size`` at half the side for the first 1 or 2 epochs.
No pruning, so every trial's every epoch is scored. For each run: wall time; the
Spearman rank correlation between each trial's score at the median pruner's first rung
(epoch 2) and the trials' final scores at full size (the ranking a pruner needs); the
rank correlation of final scores with the full-size run; whether the best full-size
trial would have survived the median pruner's first rung; and the best final score.
Prints a table and writes benchmarks/results/early_rungs.json.

Usage: python benchmarks/early_rungs.py [--epochs 3] [--image-size 64] [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import fixed_trials_study, report  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "fashion-mnist-2k"
#: (freeze depth, lr): a spread of settings, some good and some poor.
TRIALS = [(8, 1e-2), (8, 1e-4), (6, 3e-3), (4, 1e-3), (4, 3e-5), (2, 3e-4), (0, 1e-3), (0, 1e-2)]
RUNG = 1  # MedianPruner(n_warmup_steps=1): the first epoch it may prune after is the second


def ranks(values: list[float]) -> list[float]:
    """Ranks from 1, ties averaged."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(a: list[float], b: list[float]) -> float:
    import numpy as np

    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


def median_survivors(scores: list[float], startup: int = 3) -> list[bool]:
    """Whether each trial, in order, passes the median pruner's rung (maximising): at or above the median
    of the earlier trials' scores there, once ``startup`` trials have finished."""
    import statistics

    return [i < startup or s >= statistics.median(scores[:i]) for i, s in enumerate(scores)]


def run(out: Path, name: str, epochs: int, size: int, early: int | None, early_epochs: int) -> tuple:
    import optuna

    import tlengine

    storage = f"sqlite:///{out / f'{name}.db'}"
    fixed_trials_study(storage, name, TRIALS)
    start = time.perf_counter()
    tlengine.search(DATA, epochs=epochs, image_size=size, trials=len(TRIALS), pruner="none", seed=0, out=out, study_name=name,
                    storage=storage, param={"layer_decay": 1.0, "label_smoothing": 0.0}, cache_dir=out / "cache",
                    early_size=early, early_epochs=early_epochs, quiet=True)
    seconds = time.perf_counter() - start
    trials = sorted(optuna.load_study(study_name=name, storage=storage).trials, key=lambda t: t.number)
    return seconds, [[h["score"] for h in t.user_attrs["history"]] for t in trials]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if not DATA.is_dir():
        sys.exit(f"skipped: {DATA} is not present")
    half = args.image_size // 2
    plan = [("full size", None, 1)] + [(f"{half}px for {k} epoch{'s' if k > 1 else ''}", half, k) for k in (1, 2) if k < args.epochs]
    with tempfile.TemporaryDirectory() as tmp:
        runs = {label: run(Path(tmp), f"r{i}", args.epochs, args.image_size, early, k) for i, (label, early, k) in enumerate(plan)}
    base_seconds, base = runs["full size"]
    final = [h[-1] for h in base]
    best = max(range(len(final)), key=lambda i: final[i])
    rows, summary = [], {}
    for label, (seconds, history) in runs.items():
        rung = [h[RUNG] for h in history]
        survives = median_survivors(rung)
        row = {
            "seconds": round(seconds, 1),
            "speed-up": round(base_seconds / seconds, 2),
            "rung vs final (spearman)": round(spearman(rung, final), 3),
            "final vs full-size final (spearman)": round(spearman([h[-1] for h in history], final), 3),
            "best full-size trial survives rung": survives[best],
            "best final": round(max(h[-1] for h in history), 4),
            "scores": history,
        }
        summary[label] = row
        rows.append([label, row["seconds"], f"{row['speed-up']:.2f}x", row["rung vs final (spearman)"],
                     row["final vs full-size final (spearman)"], "yes" if row["best full-size trial survives rung"] else "no", row["best final"]])
    report("early_rungs", f"early epochs at {half}px: fashion-mnist-2k, lite0 ImageNet weights, {args.image_size}px, {args.epochs} epochs, "
           f"{len(TRIALS)} trials, CPU",
           ["run", "wall s", "speed-up", "rung (epoch 2) vs final, spearman", "final vs full-size final, spearman",
            "best trial survives rung", "best final accuracy"], rows,
           {"epochs": args.epochs, "image_size": args.image_size, "trials": TRIALS, "runs": summary})


if __name__ == "__main__":
    main()
