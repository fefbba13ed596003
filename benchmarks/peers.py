"""tlengine against what its users would run instead, at the same wall budget, on data it was never tuned on.

Per dataset, one after the other, each tool in its own process (so that fastai's patches of
torch touch nothing else), with the same lite0 ImageNet weights (the offline weight package),
image size, epochs per run and CPU threads:

- ``tlengine``: ``tlengine.search(..., timeout=BUDGET)`` with its defaults, cold caches;
- ``tlengine lp-ft off``: the same with ``head_init = "random"`` (which default LP-FT earns);
- ``optuna loop``: a hand-written Optuna + timm loop (:func:`optuna_loop`, about 100 lines: seeded
  TPE over freeze depth and log lr in 1e-4..1e-2, AdamW, a per-step cosine schedule,
  torchvision transforms without flips, no pruning, no caching, images decoded every epoch);
- ``fastai``: ``vision_learner`` with the timm model (lite0 weights copied in), ``lr_find()``
  (valley), ``fine_tune(epochs, lr)``;
- ``fastai sweep``: a fastai user's LR sweep (``fine_tune`` at 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, in
  that order) until the budget is spent.

Datasets: ``fashion-mnist-2k`` (../shared; skipped where absent), ``digits`` (scikit-learn's
handwritten digits, 8x8 upscaled: flips change their labels), ``rotation`` (fashion-mnist-2k
images turned by a random angle, a regression from a CSV whose target column is ``angle``).
No colour image set ships offline with the packages this project can install, so none is used.

For each tool the table gives the best validation score reached within the budget and the
time to reach 99 % of the hand-written loop's best (regression: an RMSE within 1/0.99 of it).
Writes ``benchmarks/results/peers.json`` and ``peers.png`` (best score so far against wall time).

Usage: pip install -e '.[benchmarks]'; python benchmarks/peers.py [--budget 150] [--epochs 3]
[--image-size 64] [--datasets fashion-mnist-2k,digits,rotation] [--tools ...] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from collections.abc import Iterator
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS, report  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FASHION = ROOT.parent / "shared" / "data" / "fashion-mnist-2k"
ARCH = "tf_efficientnet_lite0"
TOOLS = ("tlengine", "tlengine lp-ft off", "optuna loop", "fastai", "fastai sweep")
DATASETS = ("fashion-mnist-2k", "digits", "rotation")
SWEEP = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
THREADS = 2


# ---------------------------------------------------------------- datasets


def make_dataset(name: str, root: Path, smoke: bool) -> dict[str, Any]:
    """Write dataset ``name`` under ``root``: ``{"path", "task", "format"}`` (an ImageFolder or a CSV)."""
    if name == "fashion-mnist-2k":
        if not FASHION.is_dir():
            raise FileNotFoundError(FASHION)
        return {"path": str(FASHION), "task": "classification", "format": "folder"}
    if name == "digits":
        return {"path": str(_digits(root / "digits", smoke)), "task": "classification", "format": "folder"}
    if name == "rotation":
        if not FASHION.is_dir():
            raise FileNotFoundError(FASHION)
        return {"path": str(_rotation(root / "rotation", smoke)), "task": "regression", "format": "csv"}
    raise ValueError(name)


def available(names: str, root: Path, smoke: bool) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(name, dataset)`` for each of the comma-separated ``names`` that can be made here (see :func:`make_dataset`);
    one line on stderr for each skipped because its data is not present."""
    for name in names.split(","):
        try:
            yield name, make_dataset(name, root, smoke)
        except FileNotFoundError as missing:
            print(f"{name}: skipped, {missing} is not present", file=sys.stderr)


def _digits(folder: Path, smoke: bool) -> Path:
    """scikit-learn's 1,797 digits (8x8, 16 grey levels) as 24 px PNGs, 600 train / 300 val (60 / 30 in a smoke run)."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.target))
    n_train, n_val = (60, 30) if smoke else (600, 300)
    for split, picks in (("train", order[:n_train]), ("val", order[n_train:n_train + n_val])):
        for i in picks:
            path = folder / split / str(digits.target[i]) / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            pixels = (digits.images[i] * (255 / 16)).astype(np.uint8)
            Image.fromarray(pixels, "L").resize((24, 24), Image.Resampling.BILINEAR).save(path)
    return folder


def _rotation(folder: Path, smoke: bool) -> Path:
    """fashion-mnist-2k images turned by a random angle in [-45, 45]; ``image,angle,split`` (800 / 200 rows)."""
    from search_quality import rotation_csv

    folder.mkdir(parents=True, exist_ok=True)
    return rotation_csv(folder, "angle", {"train": 8 if smoke else 80, "val": 2 if smoke else 20})


def read_items(data: dict[str, Any]) -> tuple[list[tuple[str, Any]], list[tuple[str, Any]], list[str]]:
    """``(train, val, classes)``: ``(path, label index or target)`` pairs, as a user's own loop reads them."""
    path = Path(data["path"])
    if data["format"] == "folder":
        classes = sorted(p.name for p in (path / "train").iterdir())
        split = {s: [(str(f), classes.index(c.name)) for c in sorted((path / s).iterdir()) for f in sorted(c.glob("*.png"))]
                 for s in ("train", "val")}
        return split["train"], split["val"], classes
    import csv

    with path.open() as handle:
        rows = list(csv.DictReader(handle))
    split = {s: [(str(path.parent / r["image"]), float(r["angle"])) for r in rows if r["split"] == s] for s in ("train", "val")}
    return split["train"], split["val"], []


# ---------------------------------------------------------------- the tools, one per process


def lite0_backbone() -> Any:
    """timm's tf_efficientnet_lite0 without a classifier, with the ImageNet weights of the offline package."""
    from tlengine_plugins.timm_backbone import create

    return create(ARCH, "auto")


def run_tlengine(data: dict[str, Any], budget: float, epochs: int, size: int, work: Path, head_init: str | None) -> list[dict]:
    """``tlengine search`` with its defaults and ``--timeout BUDGET``: each completed trial's score and finish time."""
    import optuna

    import tlengine

    started = time.time()
    result = tlengine.search(data["path"], task=data["task"], epochs=epochs, image_size=size, trials=500, timeout=budget,
                             out=work / "runs", cache_dir=work / "cache", study_name="peers", quiet=True,
                             **({"param": {"head_init": head_init}} if head_init else {}))
    study = optuna.load_study(study_name="peers", storage=result.storage)
    return [{"seconds": t.datetime_complete.timestamp() - started, "score": t.value, "what": _describe(t.params)}
            for t in study.trials if t.state.name == "COMPLETE"]


def _describe(params: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:.2g}" if isinstance(v, float) else f"{k} {v}" for k, v in params.items())


class ItemDataset:
    """A user's own dataset: decode, resize to ``size`` (no crop), to tensor, normalise; every epoch."""

    def __init__(self, items: list[tuple[str, Any]], size: int) -> None:
        from torchvision import transforms

        self.items = items
        self.transform = transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor(),
                                             transforms.Normalize([0.5] * 3, [0.5] * 3)])

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[Any, Any]:
        from PIL import Image

        path, target = self.items[i]
        return self.transform(Image.open(path).convert("RGB")), target


def optuna_loop(data: dict[str, Any], budget: float, epochs: int, size: int, work: Path) -> list[dict]:
    """The hand-written loop a user writes in an afternoon: seeded TPE over freeze depth (leading blocks of the
    EfficientNet kept frozen) and log lr, AdamW, cosine per step, no flips, no pruning, no caching."""
    import optuna
    import torch

    regression = data["task"] == "regression"
    train_items, val_items, classes = read_items(data)
    mean = sum(t for _, t in train_items) / len(train_items) if regression else 0.0
    std = (sum((t - mean) ** 2 for _, t in train_items) / len(train_items)) ** 0.5 if regression else 1.0
    train = torch.utils.data.DataLoader(ItemDataset(train_items, size), batch_size=32, shuffle=True,
                                        generator=torch.Generator().manual_seed(0))
    val = torch.utils.data.DataLoader(ItemDataset(val_items, size), batch_size=64)
    started, found = time.time(), []

    def objective(trial: optuna.Trial) -> float:
        depth = trial.suggest_int("freeze_depth", 0, 8)
        lr = trial.suggest_float("lr", 1e-4, 1e-2, log=True)
        torch.manual_seed(trial.number)
        backbone = lite0_backbone()
        units = [torch.nn.ModuleList([backbone.conv_stem, backbone.bn1]), *backbone.blocks]  # 8 units
        for unit in units[:depth]:
            unit.requires_grad_(False)
        model = torch.nn.Sequential(backbone, torch.nn.Linear(backbone.num_features, 1 if regression else len(classes)))
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * len(train), pct_start=0.1,
                                                        anneal_strategy="cos")
        loss_fn = torch.nn.MSELoss() if regression else torch.nn.CrossEntropyLoss()
        for _ in range(epochs):
            model.train()
            for unit in units[:depth]:
                unit.eval()  # frozen BatchNorm keeps its statistics
            for x, y in train:
                out = model(x)
                loss = loss_fn(out.squeeze(-1), (y.float() - mean) / std) if regression else loss_fn(out, y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                scheduler.step()
        model.eval()
        errors, correct = 0.0, 0
        with torch.no_grad():
            for x, y in val:
                out = model(x)
                if regression:
                    errors += float(((out.squeeze(-1) * std + mean - y.float()) ** 2).sum())
                else:
                    correct += int((out.argmax(1) == y).sum())
        score = math.sqrt(errors / len(val_items)) if regression else correct / len(val_items)
        found.append({"seconds": time.time() - started, "score": score, "what": f"depth {depth}, lr {lr:.2g}"})
        return score

    study = optuna.create_study(direction="minimize" if regression else "maximize", sampler=optuna.samplers.TPESampler(seed=0))
    study.optimize(objective, timeout=budget)
    return found


def _fastai_learner(data: dict[str, Any], size: int, work: Path) -> Any:
    """A fastai ``vision_learner`` on the timm model, lite0 ImageNet weights copied into its body."""
    import pandas as pd
    from fastai.vision.all import (CategoryBlock, ColReader, ColSplitter, DataBlock, ImageBlock, MSELossFlat, Normalize,
                                   RegressionBlock, Resize, accuracy, rmse, vision_learner)

    regression = data["task"] == "regression"
    train_items, val_items, _ = read_items(data)
    frame = pd.DataFrame([{"image": p, "target": t, "is_valid": False} for p, t in train_items]
                         + [{"image": p, "target": t, "is_valid": True} for p, t in val_items])
    block = DataBlock(blocks=(ImageBlock, RegressionBlock if regression else CategoryBlock), get_x=ColReader("image"),
                      get_y=ColReader("target"), splitter=ColSplitter("is_valid"), item_tfms=Resize(size, method="squish"),
                      batch_tfms=[Normalize.from_stats([0.5] * 3, [0.5] * 3)])
    dls = block.dataloaders(frame, bs=32, num_workers=0)
    learn = vision_learner(dls, ARCH, pretrained=False, n_out=1 if regression else None, metrics=rmse if regression else accuracy,
                           loss_func=MSELossFlat() if regression else None, path=work)
    body = learn.model[0].model  # fastai's TimmBody around the timm model
    missing, _ = body.load_state_dict(lite0_backbone().state_dict(), strict=False)
    assert not [k for k in missing if not k.startswith("classifier")], missing
    return learn


def run_fastai(data: dict[str, Any], budget: float, epochs: int, size: int, work: Path, sweep: bool) -> list[dict]:
    """``lr_find()`` (valley) then ``fine_tune(epochs, lr)``; or, with ``sweep``, ``fine_tune`` at each rate of
    :data:`SWEEP` until the budget is spent. The score is the last epoch's validation metric."""
    import torch

    started, found = time.time(), []
    for lr in (SWEEP if sweep else (None,)):
        if sweep and time.time() - started >= budget:
            break
        torch.manual_seed(0)
        learn = _fastai_learner(data, size, work)
        with learn.no_bar(), learn.no_logging():
            if lr is None:
                lr = float(learn.lr_find(show_plot=False).valley)
            learn.fine_tune(epochs, lr)
            score = float(learn.validate()[1])
        found.append({"seconds": time.time() - started, "score": score, "what": f"lr {lr:.2g}"})
    return found


def run_tool(tool: str, data: dict[str, Any], budget: float, epochs: int, size: int, work: Path) -> list[dict]:
    import torch

    torch.set_num_threads(THREADS)
    if tool.startswith("tlengine"):
        return run_tlengine(data, budget, epochs, size, work, "random" if tool == "tlengine lp-ft off" else None)
    if tool == "optuna loop":
        return optuna_loop(data, budget, epochs, size, work)
    return run_fastai(data, budget, epochs, size, work, sweep=tool == "fastai sweep")


# ---------------------------------------------------------------- the table


def best_within(found: list[dict], budget: float, minimize: bool) -> float | None:
    scores = [f["score"] for f in found if f["seconds"] <= budget]
    return (min(scores) if minimize else max(scores)) if scores else None


def time_to(found: list[dict], target: float, minimize: bool) -> float | None:
    for f in sorted(found, key=lambda f: f["seconds"]):
        if (f["score"] <= target) if minimize else (f["score"] >= target):
            return f["seconds"]
    return None


def plot(curves: dict[str, dict[str, list[dict]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 4), squeeze=False)
    for ax, (dataset, tools) in zip(axes[0], curves.items()):
        minimize = dataset == "rotation"
        for tool, found in tools.items():
            points, best = [], None
            for f in sorted(found, key=lambda f: f["seconds"]):
                best = f["score"] if best is None else (min if minimize else max)(best, f["score"])
                points.append((f["seconds"], best))
            if points:
                ax.step(*zip(*points), where="post", marker="o", label=tool)
        ax.set_title(dataset)
        ax.set_xlabel("wall seconds")
        ax.set_ylabel("best RMSE so far (lower is better)" if minimize else "best accuracy so far")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=150.0, help="wall seconds per tool and dataset")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--tools", default=",".join(TOOLS))
    parser.add_argument("--smoke", action="store_true", help="tiny datasets, one epoch, 20 s budgets: check that every tool runs")
    parser.add_argument("--name", default="peers", help="results/NAME.json and NAME.png")
    parser.add_argument("--one", nargs=3, metavar=("TOOL", "DATA_JSON", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        tool, spec, out = args.one
        spec = json.loads(spec)
        found = run_tool(tool, spec["data"], spec["budget"], spec["epochs"], spec["size"], Path(spec["work"]))
        Path(out).write_text(json.dumps(found))
        return
    budget, epochs = (20.0, 1) if args.smoke else (args.budget, args.epochs)
    rows, curves = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for dataset, data in available(args.datasets, Path(tmp) / "data", args.smoke):
            minimize = data["task"] == "regression"
            curves[dataset] = {}
            for tool in args.tools.split(","):
                work = Path(tmp) / dataset / tool.replace(" ", "-")
                work.mkdir(parents=True)
                spec = {"data": data, "budget": budget, "epochs": epochs, "size": args.image_size, "work": str(work)}
                started = time.perf_counter()
                subprocess.run([sys.executable, __file__, "--one", tool, json.dumps(spec), str(work / "found.json")], check=True)
                curves[dataset][tool] = json.loads((work / "found.json").read_text())
                print(f"{dataset}: {tool}: {len(curves[dataset][tool])} runs in {time.perf_counter() - started:.0f} s; best "
                      f"{best_within(curves[dataset][tool], math.inf, minimize)}", file=sys.stderr)
            loop = best_within(curves[dataset].get("optuna loop", []), budget, minimize)
            target = None if loop is None else (loop / 0.99 if minimize else 0.99 * loop)
            loop_time = None if target is None else time_to(curves[dataset]["optuna loop"], target, minimize)
            for tool, found in curves[dataset].items():
                best = best_within(found, budget, minimize)
                reach = None if target is None else time_to(found, target, minimize)
                speedup = f"{loop_time / reach:.1f}x" if reach and loop_time else ""
                rows.append([dataset, tool, len([f for f in found if f["seconds"] <= budget]),
                             "" if best is None else round(best, 4), "" if reach is None else round(reach), speedup])
    RESULTS.mkdir(exist_ok=True)
    name = f"{args.name}-smoke" if args.smoke else args.name
    report(name, f"best score within {budget:.0f} s (accuracy; rotation: RMSE in degrees), {epochs} epochs, "
                 f"{args.image_size} px, lite0 ImageNet weights, {THREADS} threads",
           ["dataset", "tool", "runs", "best", "s to 99% of loop", "vs loop"], rows,
           {"budget": budget, "epochs": epochs, "image_size": args.image_size, "curves": curves})
    plot(curves, RESULTS / f"{name}.png")
    print(f"wrote {RESULTS / f'{name}.png'}")


if __name__ == "__main__":
    main()
