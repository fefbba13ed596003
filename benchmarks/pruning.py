"""How often would a pruned trial have beaten the best? The old and the new ``--pruner median`` rule, replayed.

Runs one study on ../shared/data/fashion-mnist-2k (lite0 ImageNet weights, small images)
with ``--pruner none``, so that every trial runs to its last epoch, then replays each rule
on the trials in the order they ran, with Optuna's own pruners on an in-memory study:

- old: ``MedianPruner(n_startup_trials=3, n_warmup_steps=1)`` (judged from epoch 2, below the median);
- new: ``PercentilePruner(75, n_startup_trials=3, n_warmup_steps=epochs // 2)`` (what ``make_pruner``
  builds: judged from half the schedule, only the bottom quarter).

For each rule: trials it would stop, epochs it would save, and how many of the stopped trials
ended better than the best trial it let finish (a stop that cost the study its best result).
Writes benchmarks/results/pruning.json.

Usage: python benchmarks/pruning.py [--trials 12] [--epochs 4] [--image-size 48]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import report  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "fashion-mnist-2k"


def replay(pruner, curves: list[list[float]]) -> list[int | None]:
    """The epoch at which ``pruner`` stops each trial of ``curves`` (validation scores per epoch), or ``None``."""
    import optuna

    study = optuna.create_study(direction="maximize", pruner=pruner)
    stopped: list[int | None] = []
    for curve in curves:
        trial = study.ask()
        for epoch, value in enumerate(curve, 1):
            trial.report(value, epoch)
            if epoch < len(curve) and trial.should_prune():  # tlengine never prunes after the last epoch
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                stopped.append(epoch)
                break
        else:
            study.tell(trial, curve[-1])
            stopped.append(None)
    return stopped


def main() -> None:
    import optuna

    import tlengine
    from tlengine._study import make_pruner

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=48)
    args = parser.parse_args()
    if not DATA.is_dir():
        sys.exit(f"skipped: {DATA} is not present")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        result = tlengine.search(str(DATA), epochs=args.epochs, image_size=args.image_size, trials=args.trials, pruner="none",
                                 out=Path(tmp) / "runs", cache_dir=Path(tmp) / "cache", study_name="pruning", quiet=True)
        seconds = time.perf_counter() - started
        study = optuna.load_study(study_name="pruning", storage=result.storage)
        # trials solved in one step (the exact probe) have nothing to prune
        curves = [[t.intermediate_values[s] for s in sorted(t.intermediate_values)] for t in study.trials
                  if t.state.name == "COMPLETE" and len(t.intermediate_values) == args.epochs]
    rules = {"old: median from epoch 2": optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1),
             f"new: bottom quarter from epoch {max(1, args.epochs // 2) + 1}": make_pruner("median", args.epochs)}
    rows = []
    for name, pruner in rules.items():
        stopped = replay(pruner, curves)
        kept = [c[-1] for c, s in zip(curves, stopped) if s is None]
        best_kept = max(kept) if kept else float("nan")
        cut = [(c, s) for c, s in zip(curves, stopped) if s is not None]
        beaten = sum(c[-1] > best_kept for c, _ in cut)
        saved = sum(len(c) - s for c, s in cut)
        rows.append([name, len(curves), len(cut), saved, f"{saved / (len(curves) * args.epochs):.0%}", beaten,
                     round(best_kept, 4), round(max(c[-1] for c in curves), 4)])
    report("pruning", f"{len(curves)} trials of {args.epochs} epochs run to the end ({seconds:.0f} s), each rule replayed",
           ["rule", "trials", "stopped", "epochs saved", "share", "stopped that beat the best kept", "best kept", "best of all"], rows,
           {"curves": curves, "epochs": args.epochs, "image_size": args.image_size, "search_seconds": seconds})


if __name__ == "__main__":
    main()
