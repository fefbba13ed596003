"""Shared fixtures: tiny real image data, a finished tiny search, temporary plugins."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
TINY_BACKBONE = "timm:test_efficientnet"

os.environ.setdefault("OMP_NUM_THREADS", "2")


def demo_arrays() -> Any:
    """The bundled demo images: (train_images, train_labels, val_images, val_labels, classes)."""
    import numpy as np

    from tlengine_plugins.datasets import DEMO_FILE

    with np.load(DEMO_FILE) as archive:
        return tuple(archive[k] for k in ("train_images", "train_labels", "val_images", "val_labels", "classes"))


def write_image_folder(root: Path, per_class: int = 8, classes: int = 3, val: bool = True) -> Path:
    """Write real Fashion-MNIST PNGs as ``root/train/<class>/`` (and ``root/val/<class>/``)."""
    from PIL import Image

    train_x, train_y, val_x, val_y, names = demo_arrays()
    splits = [("train", train_x, train_y, per_class)] + ([("val", val_x, val_y, max(2, per_class // 2))] if val else [])
    for split, xs, ys, n in splits:
        for c in range(classes):
            folder = root / split / str(names[c])
            folder.mkdir(parents=True, exist_ok=True)
            for i, index in enumerate([j for j, y in enumerate(ys) if y == c][:n]):
                Image.fromarray(xs[index]).save(folder / f"{i:03d}.png")
    return root


def write_brightness_csv(folder: Path, n: int = 40) -> Path:
    """A real regression task: ``n`` demo images as PNGs with their mean brightness (0..1) as target; returns the CSV."""
    from PIL import Image

    train_x, *_ = demo_arrays()
    rows = ["image,target"]
    for i in range(n):
        Image.fromarray(train_x[i]).save(folder / f"{i}.png")
        rows.append(f"{i}.png,{train_x[i].mean() / 255:.6f}")
    (folder / "b.csv").write_text("\n".join(rows) + "\n")
    return folder / "b.csv"


def run_cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``python -m tlengine ARGS`` in a subprocess."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "tlengine", *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="session", autouse=True)
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Searches in the tests cache under a temporary folder, never in the user's ~/.cache."""
    path = tmp_path_factory.mktemp("cache")
    os.environ["TLENGINE_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three classes of real images: 8 training and 4 validation images each."""
    return write_image_folder(tmp_path_factory.mktemp("folder"))


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, tiny_folder: Path) -> Path:
    """A finished two-trial search with a tiny timm model (through the Python API); returns its run folder."""
    import tlengine

    out = tmp_path_factory.mktemp("runs")
    result = tlengine.search(tiny_folder, TINY_BACKBONE, trials=2, epochs=2, weights="none", image_size=32, batch_size=8, out=out,
                             study_name="tiny", quiet=True)
    assert result.run_dir == out / "tiny" and result.onnx_path == out / "tiny" / "best.onnx"
    return result.run_dir


@pytest.fixture
def register_plugin() -> Iterator[Any]:
    """Register plugin objects for one test; they are unregistered afterwards, whatever happens."""
    from tlengine.plugins import load_plugins, pm

    load_plugins()
    names: list[str] = []

    def register(plugin: object, name: str) -> None:
        pm.register(plugin, name=name)
        names.append(name)

    try:
        yield register
    finally:
        for name in names:
            pm.unregister(name=name)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import importlib.util

    has_cuda = False
    if importlib.util.find_spec("torch") is not None:
        import torch

        has_cuda = torch.cuda.is_available()
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip)
