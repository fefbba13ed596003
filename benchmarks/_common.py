"""Shared helpers for the benchmark scripts: timing, a rich table, a JSON record."""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def median_ms(fn: Callable[[], Any], repeats: int, warmup: int = 3) -> float:
    """Median wall time of ``fn()`` in milliseconds, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def report(name: str, title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], extra: dict[str, Any] | None = None) -> Path:
    """Print ``rows`` as a table and write them, with the machine's description, to ``results/NAME.json``."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(*(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row))
    Console().print(table)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    record = {
        "benchmark": name,
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "python": platform.python_version()},
        "columns": list(columns),
        "rows": [list(r) for r in rows],
        **(extra or {}),
    }
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")
    return path


def fixed_trials_study(storage: str, name: str, trials: Sequence[tuple[int, float]]) -> None:
    """Create a maximising study at ``storage`` with one enqueued trial per ``(freeze depth, lr)``."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=name, storage=storage, direction="maximize")
    for depth, lr in trials:
        study.enqueue_trial({"freeze_depth": depth, "lr": lr})


def read_idx(path: Path) -> Any:
    """A uint8 array from a gzipped IDX file (Fashion-MNIST's format: byte 3 the dimensions, then one
    big-endian uint32 per dimension, then the data)."""
    import gzip

    import numpy as np

    with gzip.open(path) as handle:
        data = handle.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * dims).reshape(shape)


def tlengine_model(arch: str, classes: int, **create_kwargs: Any) -> Any:
    """A timm ``arch`` backbone (random weights, seed 0) with a linear head, joined as ``tlengine search`` joins them."""
    import timm
    import torch

    from tlengine._model import build_model, feature_width

    torch.manual_seed(0)
    backbone = timm.create_model(arch, pretrained=False, num_classes=0, **create_kwargs)
    return build_model(backbone, torch.nn.Linear(feature_width(backbone), classes), "classification")


def fit_step_seconds(model: Any, classes: int, train: Any, val: Any, device: str, **fit_kwargs: Any) -> list[float]:
    """Seconds per step of one epoch of tlengine's ``fit`` (AdamW, as a search trains), measured between
    ``on_step`` calls; the first step is left out as warm-up."""
    import torch

    from tlengine._train import TrainPlan, fit, param_groups

    optimizer = torch.optim.AdamW(param_groups(model, 0.01, 1.0), lr=1e-3)
    plan = TrainPlan(epochs=1, task="classification", metric="accuracy", num_classes=classes)
    stamps: list[float] = []

    def on_step() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    fit(model, optimizer, train, val, plan, device=device, on_step=on_step, **fit_kwargs)
    return [b - a for a, b in zip(stamps[1:], stamps[2:])]
