"""How much faster is a search with caches on? The same fixed trials with caches on and off, in one run.

On ../shared/data/fashion-mnist-2k with the real ImageNet weights of
tf_efficientnet_lite0: a study whose trials are enqueued with fixed parameters
(freeze depths from the linear probe, 8 of 8 stages, down to full fine-tuning, 0),
run with ``--no-cache``, with caches on (one cached view per epoch: the default, which
trains on exactly the images the uncached run does), and with ``--cache-views 1`` (one
augmented view for every epoch: faster, less augmentation), each cached run starting
from an empty cache folder (so it pays for decoding and computing every feature file).
Optionally one more run with the cache the default run left (--warm). Records each
trial's wall time, the study's wall time, their ratios and the best score of each run.
Prints a table and writes benchmarks/results/cache_speedup.json.

Usage: python benchmarks/cache_speedup.py [--epochs 3] [--image-size 64] [--warm] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import fixed_trials_study, report  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "fashion-mnist-2k"
STAGES = 8  # tf_efficientnet_lite0
#: (freeze depth, lr): two linear probes, partial freezes, one full fine-tune.
TRIALS = [(8, 1e-2), (8, 3e-3), (7, 3e-3), (6, 1e-3), (5, 1e-3), (4, 1e-3), (2, 1e-3), (0, 1e-3)]
FIXED = {"layer_decay": 1.0, "label_smoothing": 0.0}


def run(out: Path, name: str, epochs: int, size: int, cache: bool, cache_dir: Path, views: int | None = None) -> tuple:
    import tlengine

    out.mkdir(parents=True, exist_ok=True)
    storage = f"sqlite:///{out / f'{name}.db'}"
    fixed_trials_study(storage, name, TRIALS)
    start = time.perf_counter()
    result = tlengine.search(DATA, epochs=epochs, image_size=size, trials=len(TRIALS), pruner="none", seed=0, out=out,
                             study_name=name, storage=storage, param=FIXED, cache=cache, cache_dir=cache_dir, cache_views=views,
                             quiet=True)
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--warm", action="store_true", help="also run with the cache the first cached run left")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: on CPUs shared with other jobs, more threads oversubscribe and run slower)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if not DATA.is_dir():
        sys.exit(f"skipped: {DATA} is not present")
    with tempfile.TemporaryDirectory() as tmp:
        out, cache_dir = Path(tmp) / "runs", Path(tmp) / "cache"
        runs = {}
        plan = [("off", False, cache_dir, None), ("on", True, cache_dir, None), ("on, 1 view", True, Path(tmp) / "cache-1", 1)]
        if args.warm:
            plan.append(("on, warm", True, cache_dir, None))
        for label, cache, folder, views in plan:
            result, seconds = run(out, label.replace(", ", "-").replace(" ", "-"), args.epochs, args.image_size, cache, folder, views)
            runs[label] = (result, seconds)
            print(f"caches {label}: {seconds:.0f} s, best {result.metric} {result.best.score:.4f}", file=sys.stderr)
    off_rows = {r.number: r for r in runs["off"][0].rows}
    labels = [k for k in runs if k != "off"]
    rows = []
    for number, (depth, lr) in enumerate(TRIALS):
        off = off_rows[number].seconds
        row = [number, f"{depth}/{STAGES}", f"{lr:g}", round(off, 1)]
        for label in labels:
            on = next(r for r in runs[label][0].rows if r.number == number)
            row += [round(on.seconds, 1), f"{off / on.seconds:.1f}x"]
        row += [f"{off_rows[number].score:.4f}"] + [f"{next(r for r in runs[k][0].rows if r.number == number).score:.4f}" for k in labels]
        rows.append(row)
    head_only = [n for n, (d, _) in enumerate(TRIALS) if d == STAGES]
    summary = {"study_ratio": {}, "head_only_ratio": {}, "best": {"off": runs["off"][0].best.score}}
    total = ["study", "", "", round(runs["off"][1], 1)]
    probe = ["head-only trials", "", "", round(sum(off_rows[n].seconds for n in head_only), 1)]
    for label in labels:
        result, seconds = runs[label]
        on_rows = {r.number: r for r in result.rows}
        head = sum(on_rows[n].seconds for n in head_only)
        summary["study_ratio"][label] = runs["off"][1] / seconds
        summary["head_only_ratio"][label] = probe[3] / head
        summary["best"][label] = result.best.score
        total += [round(seconds, 1), f"{runs['off'][1] / seconds:.1f}x"]
        probe += [round(head, 1), f"{probe[3] / head:.1f}x"]
    total += [f"{runs['off'][0].best.score:.4f}"] + [f"{runs[k][0].best.score:.4f}" for k in labels]
    probe += [""] * (1 + len(labels))
    rows += [probe, total]
    columns = ["trial", "freeze depth", "lr", "off s"]
    for label in labels:
        columns += [f"{label} s", f"speed-up ({label})"]
    columns += ["accuracy off"] + [f"accuracy {k}" for k in labels]
    gaps = {k: round(abs(summary["best"][k] - summary["best"]["off"]) * 100, 2) for k in labels}
    summary["targets"] = {
        "study >= 3x": {k: v >= 3 for k, v in summary["study_ratio"].items()},
        "head-only >= 5x": {k: v >= 5 for k, v in summary["head_only_ratio"].items()},
        "best within 0.5 points": {k: v <= 0.5 for k, v in gaps.items()},
        "best gap points": gaps,
        "median per-trial ratio (on)": round(statistics.median(
            off_rows[n].seconds / next(r for r in runs["on"][0].rows if r.number == n).seconds for n in off_rows), 2),
    }
    report("cache_speedup", f"caches on vs off: fashion-mnist-2k, lite0 ImageNet weights, {args.image_size}px, {args.epochs} epochs, CPU",
           columns, rows, {"epochs": args.epochs, "image_size": args.image_size, "trials": TRIALS, **summary})
    print(summary["targets"])


if __name__ == "__main__":
    main()
