"""A third-party plugin package, installed for the test and found through its entry point."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, demo_arrays, run_cli

EXAMPLE = ROOT / "examples" / "tlengine-idx"


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``pip install`` the example plugin into its own folder (put on PYTHONPATH by the tests)."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--target", str(target), str(EXAMPLE)],
        check=True, capture_output=True, timeout=300,
    )
    return target


@pytest.fixture(scope="module")
def idx_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A slice of the real Fashion-MNIST in its original IDX format."""
    folder = tmp_path_factory.mktemp("idx")
    train_x, train_y, val_x, val_y, classes = demo_arrays()
    keep_train = np.flatnonzero(train_y < 3)[:30]
    keep_val = np.flatnonzero(val_y < 3)[:12]
    write_idx(folder / "train-images-idx3-ubyte.gz", train_x[keep_train])
    write_idx(folder / "train-labels-idx1-ubyte.gz", train_y[keep_train])
    write_idx(folder / "t10k-images-idx3-ubyte.gz", val_x[keep_val])
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", val_y[keep_val])
    (folder / "classes.txt").write_text("\n".join(str(c) for c in classes[:3]))
    return folder


def test_discovered_through_entry_point(site: Path) -> None:
    result = run_cli("plugins", "--json", env={"PYTHONPATH": str(site)})
    assert result.returncode == 0, result.stderr
    plugins = {p["name"]: p for p in json.loads(result.stdout)["plugins"]}
    assert plugins["idx"]["package"] == "tlengine-idx"
    assert plugins["idx"]["registers"] == {"register_backbones": ["minicnn"], "register_datasets": ["idx"]}


def test_search_with_third_party_backbone_and_dataset(site: Path, idx_folder: Path, tmp_path: Path) -> None:
    result = run_cli(
        "search", "--data", str(idx_folder), "--backbone", "minicnn", "--trials", "2", "--epochs", "2",
        "--image-size", "32", "--out", str(tmp_path), "--study-name", "idx", "--json",
        env={"PYTHONPATH": str(site)},
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["config"]["backbone"] == "minicnn" and summary["config"]["dataset"] == "idx"
    assert summary["config"]["stages"] == 3
    assert summary["config"]["classes"] == ["t-shirt", "trouser", "pullover"]
    assert (tmp_path / "idx" / "best.onnx").is_file()
    predicted = run_cli("predict", str(tmp_path / "idx" / "best.onnx"), str(next(ROOT.joinpath("plugins").rglob("*.npz"))))
    assert predicted.returncode == 2  # an .npz is not an image: one-line error, no traceback
    assert predicted.stderr.startswith("error: ")


def test_plugin_passes_its_own_contract_tests(site: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(EXAMPLE / "tests")],
        capture_output=True, text=True, timeout=300, env={**__import__("os").environ, "PYTHONPATH": str(site)},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert " passed" in result.stdout
