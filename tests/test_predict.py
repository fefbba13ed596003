"""``tlengine predict`` and ``tlengine.load``: onnxruntime only, labels from the metadata."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_cli

BLOCK_TORCH = """
import sys
class BlockTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch.") or name in ("timm", "torchvision"):
            raise ImportError("torch is blocked in this test")
sys.meta_path.insert(0, BlockTorch())
sys.argv = ["tlengine"] + sys.argv[1:]
from tlengine._cli import main
code = main()
assert "torch" not in sys.modules
sys.exit(code)
"""


def torch_predictions(run: Path, images: list[Path]) -> list[str]:
    """Labels from the PyTorch checkpoint, through timm's own evaluation transform."""
    import torch
    from safetensors.torch import load_model

    from tlengine._model import build_model
    from tlengine._preprocess import Preprocess, load_image
    from tlengine._loaders import eval_transform
    from tlengine.plugins import get_registry

    summary = json.loads((run / "summary.json").read_text())
    config, values = summary["config"], summary["best"]["values"]
    registry = get_registry()
    backbone = registry.backbones[config["backbone"]].factory(config["arch"], "none")
    head = registry.heads[values["head"]].factory(backbone.num_features, len(config["classes"]), config["task"])
    model = build_model(backbone, head, config["task"])
    load_model(model, str(run / "best.safetensors"))
    transform = eval_transform(Preprocess.from_data_config(config["data_config"], values["image_size"]))
    with torch.no_grad():
        logits = model.eval()(torch.stack([transform(load_image(p)) for p in images]))
    return [config["classes"][i] for i in logits.argmax(-1).tolist()]


def test_predict_without_torch_matches_pytorch(tiny_run: Path, tiny_folder: Path) -> None:
    images = sorted((tiny_folder / "val").rglob("*.png"))
    result = subprocess.run(
        [sys.executable, "-c", BLOCK_TORCH, "predict", str(tiny_run / "best.onnx"), str(tiny_folder / "val"), "--json"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [Path(r["source"]) for r in rows] == images
    assert [r["label"] for r in rows] == torch_predictions(tiny_run, images)
    for row in rows:
        probabilities = [t["probability"] for t in row["top"]]
        assert probabilities == sorted(probabilities, reverse=True)
        assert 0.0 <= probabilities[-1] <= probabilities[0] <= 1.0


def test_predict_text_output_and_glob(tiny_run: Path, tiny_folder: Path) -> None:
    result = run_cli("predict", str(tiny_run / "best.onnx"), str(tiny_folder / "val" / "*" / "000.png"), "--top-k", "2")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 3
    source, labels = lines[0].split("\t")
    assert source.endswith("000.png")
    assert len(labels.split("  ")) == 2


def test_python_api(tiny_run: Path, tiny_folder: Path) -> None:
    import numpy as np
    from PIL import Image

    import tlengine

    model = tlengine.load(tiny_run / "best.onnx")
    classes = json.loads((tiny_run / "summary.json").read_text())["config"]["classes"]
    assert model.labels == classes
    path = next((tiny_folder / "val").rglob("*.png"))
    by_path, by_image, by_array = model.predict([path, Image.open(path), np.asarray(Image.open(path))], top_k=3)
    assert by_path.top == by_image.top == by_array.top
    assert len(by_path.top) == 3 and by_path.label in classes
    assert sum(p for _, p in by_path.top) == pytest.approx(1.0, abs=1e-5)


def test_missing_inputs(tiny_run: Path, tmp_path: Path) -> None:
    result = run_cli("predict", str(tiny_run / "best.onnx"), str(tmp_path / "nothing*.png"))
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "no such file" in result.stderr


def test_unreadable_image_skipped_with_warning(tiny_run: Path, tiny_folder: Path, tmp_path: Path) -> None:
    import shutil

    good = next((tiny_folder / "val").rglob("*.png"))
    shutil.copy(good, tmp_path / "good.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    result = run_cli("predict", str(tiny_run / "best.onnx"), str(tmp_path), "--json")
    assert result.returncode == 0, result.stderr
    assert [json.loads(line)["source"] for line in result.stdout.splitlines()] == [str(tmp_path / "good.png")]
    assert result.stderr.startswith("warning: skipped 1 unreadable image(s): " + str(tmp_path / "broken.png"))
