"""Does the search beat the recipes a user would try by hand, in the same wall time?

On ../shared/data/fashion-mnist-2k with the real ImageNet weights of
tf_efficientnet_lite0 (CPU, small images): runs the three recipes (linear probe;
full fine-tune with AdamW at 1e-3; head first, then unfreeze with layer decay),
each as its own one-trial study for the same epochs, and records wall time and
score; then runs ``tlengine search`` with a wall budget equal to the sum of the
three. The same again on a regression task built from the same images (each
image rotated by a random angle in [-45, 45] degrees, the angle is the target;
RMSE, lower is better). Prints a table and writes benchmarks/results/search_quality.json.

Usage: python benchmarks/search_quality.py [--epochs 3] [--image-size 64] [--task both|classification|regression]
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
STAGES = 8  # tf_efficientnet_lite0

RECIPES = {
    "linear probe": {"freeze_depth": STAGES, "lr": 1e-2},
    "full fine-tune (AdamW 1e-3)": {"freeze_depth": 0, "lr": 1e-3},
    "head first, then unfreeze": {"freeze_depth": 0, "lr": 1e-3, "layer_decay": 0.7, "head_epochs": 1},
}
FIXED = {"layer_decay": 1.0, "label_smoothing": 0.0, "head_epochs": 0}


def rotation_csv(folder: Path, column: str = "target", per_class: dict[str, int] | None = None) -> Path:
    """Rotate every fashion-mnist-2k image (the first ``per_class[split]`` of each class, where given) by a random
    angle in [-45, 45]; write the images and a CSV ``image,COLUMN,split`` of angles."""
    import random
    from collections import Counter

    from PIL import Image

    rng = random.Random(0)
    rows = [f"image,{column},split"]
    for split in ("train", "val"):
        taken: Counter[str] = Counter()
        for path in sorted((DATA / split).rglob("*.png")):
            if per_class is not None and taken[path.parent.name] >= per_class[split]:
                continue
            taken[path.parent.name] += 1
            angle = rng.uniform(-45, 45)
            name = f"{split}-{path.parent.name}-{path.stem}.png"
            Image.open(path).rotate(angle, resample=Image.Resampling.BILINEAR).save(folder / name)
            rows.append(f"{name},{angle:.3f},{split}")
    (folder / "angles.csv").write_text("\n".join(rows) + "\n")
    return folder / "angles.csv"


def run(out: Path, name: str, data: str, task: str, epochs: int, size: int, params: dict, seed: int = 0,
        trials: int = 1, timeout: float | None = None):
    import tlengine

    start = time.perf_counter()
    result = tlengine.search(data, task=task, epochs=epochs, image_size=size, trials=trials, timeout=timeout, seed=seed, param=params,
                             out=out, study_name=name, pruner="median" if trials > 1 else "none", quiet=True)
    return result, time.perf_counter() - start


def bench(task: str, data: str, out: Path, epochs: int, size: int, common: dict) -> list[list]:
    rows, spent, scores = [], 0.0, []
    for k, (recipe, params) in enumerate(RECIPES.items()):
        # seed k makes this one-trial study train exactly like trial k of the search (seed + trial number)
        result, seconds = run(out, f"{task}-recipe-{k}", data, task, epochs, size, {**FIXED, **common, **params}, seed=k)
        spent += seconds
        scores.append(result.best.score)
        rows.append([task, recipe, 1, round(seconds, 1), result.best.score])
        print(f"{task}: {recipe}: {result.metric} {result.best.score:.4f} in {seconds:.0f} s", file=sys.stderr)
    result, seconds = run(out, f"{task}-search", data, task, epochs, size, common, trials=200, timeout=spent)
    finished = [r for r in result.rows if r.state in ("complete", "pruned")]
    print(f"{task}: search: {result.metric} {result.best.score:.4f} after {len(finished)} trials in {seconds:.0f} s "
          f"(budget {spent:.0f} s)", file=sys.stderr)
    rows.append([task, f"tlengine search (budget {spent:.0f} s)", len(finished), round(seconds, 1), result.best.score])
    best_recipe = max(scores) if result.direction == "maximize" else min(scores)
    better = result.best.score >= best_recipe if result.direction == "maximize" else result.best.score <= best_recipe
    rows.append([task, "search best vs best recipe", "", "", f"{result.best.score - best_recipe:+.4f} ({'met' if better else 'missed'})"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--task", choices=["both", "classification", "regression"], default="both")
    args = parser.parse_args()
    if not DATA.is_dir():
        sys.exit(f"skipped: {DATA} is not present")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "runs"
        if args.task in ("both", "classification"):
            rows += bench("classification", str(DATA), out, args.epochs, args.image_size, {})
        if args.task in ("both", "regression"):
            images = Path(tmp) / "rotated"
            images.mkdir()
            # a horizontal flip negates a rotation angle: no flips for this task, in the recipes and the search alike
            rows += bench("regression", str(rotation_csv(images)), out, args.epochs, args.image_size, {"hflip": 0.0})
    report("search_quality", f"search vs hand recipes, fashion-mnist-2k, lite0 ImageNet weights, {args.image_size}px, {args.epochs} epochs, CPU",
           ["task", "run", "trials", "wall s", "score (accuracy / RMSE degrees)"], rows,
           {"epochs": args.epochs, "image_size": args.image_size})


if __name__ == "__main__":
    main()
