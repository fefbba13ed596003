"""Trials per minute with 1 and with N worker processes sharing one study in a journal file.

The same short search (bundled demo data, real lite0 ImageNet weights, small
images, one epoch per trial, no pruning) runs as ``tlengine search --workers 1``
and ``--workers N`` on one journal-file storage each. Throughput is counted from
the trials' own start and end times in the study (process start-up and the final
ONNX export are left out), so the ratio compares the trial work alone. On a CPU
machine each worker gets cores/N threads; with a GPU, use ``--devices``.

Usage: python benchmarks/workers_scaling.py [--workers 2] [--trials 8] [--image-size 64]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import report  # noqa: E402


def run(out: Path, workers: int, trials: int, size: int) -> tuple[float, int, float]:
    """Run one search; return (trials per minute, finished trials, wall seconds of the whole command)."""
    import optuna

    name = f"w{workers}"
    command = [sys.executable, "-m", "tlengine", "search", "--trials", str(trials), "--epochs", "1", "--image-size", str(size),
               "--pruner", "none", "--workers", str(workers), "--storage", f"journal://{out / f'{name}.journal'}",
               "--study-name", name, "--out", str(out)]
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - start
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(out / f"{name}.journal")))
    done = [t for t in optuna.load_study(study_name=name, storage=storage).trials if t.state.name == "COMPLETE"]
    span = (max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)).total_seconds()
    return len(done) / span * 60, len(done), wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=64)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        one, n1, wall1 = run(Path(tmp), 1, args.trials, args.image_size)
        many, n2, wall2 = run(Path(tmp), args.workers, args.trials, args.image_size)
    rows.append(["1 worker", n1, round(wall1, 1), round(one, 2), 1.0])
    rows.append([f"{args.workers} workers", n2, round(wall2, 1), round(many, 2), round(many / one, 2)])
    report("workers_scaling", f"workers on one journal-file study: demo data, lite0, {args.image_size}px, 1 epoch per trial",
           ["run", "trials", "command wall s", "trials/min", "ratio"], rows,
           {"trials": args.trials, "image_size": args.image_size, "workers": args.workers})


if __name__ == "__main__":
    main()
