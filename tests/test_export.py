"""ONNX export: metadata, dynamic batch, checker, parity gate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def test_metadata_and_dynamic_batch(tiny_run: Path) -> None:
    import numpy as np
    import onnx
    import onnxruntime as ort

    proto = onnx.load(str(tiny_run / "best.onnx"))
    onnx.checker.check_model(proto, full_check=True)
    props = {p.key: p.value for p in proto.metadata_props}
    summary = json.loads((tiny_run / "summary.json").read_text())
    assert json.loads(props["labels"]) == summary["config"]["classes"]
    assert props["task"] == "classification"
    preprocess = json.loads(props["preprocess"])
    assert preprocess["input_size"] == 32 and preprocess["channel_order"] == "RGB"
    assert {"resize", "interpolation", "mean", "std"} <= set(preprocess)
    assert props["backbone"] == "timm:test_efficientnet"
    assert json.loads(props["params"]) == summary["best"]["params"]
    assert float(props["parity_max_abs_diff"]) < 1e-4
    session = ort.InferenceSession(str(tiny_run / "best.onnx"))
    for batch in (1, 5):
        out = session.run(None, {"image": np.zeros((batch, 3, 32, 32), np.float32)})[0]
        assert out.shape == (batch, 3)
        assert np.allclose(out.sum(-1), 1.0, atol=1e-5)


def test_parity_gate_fails_clearly(tmp_path: Path) -> None:
    import timm
    import torch

    from tlengine import UserError
    from tlengine._export import export_onnx
    from tlengine._model import build_model, inference_model

    model = build_model(timm.create_model("test_efficientnet", num_classes=0), torch.nn.Linear(256, 3), "classification")
    with pytest.raises(UserError, match="onnxruntime differs from PyTorch"):
        export_onnx(inference_model(model), tmp_path / "m.onnx", torch.rand(4, 3, 32, 32), {"task": "classification"}, tolerance=-1.0)


def test_large_model_path_uses_external_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Models over the 2 GB protobuf limit keep weights in NAME.onnx.data; forced here with a zero threshold."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    import timm
    import torch

    from tlengine import _export
    from tlengine._model import build_model, inference_model

    monkeypatch.setattr(_export, "EXTERNAL_DATA_BYTES", 0)
    model = build_model(timm.create_model("test_efficientnet", num_classes=0), torch.nn.Linear(256, 3), "classification")
    path = tmp_path / "big.onnx"
    parity = _export.export_onnx(inference_model(model), path, torch.rand(4, 3, 32, 32), {"task": "classification", "labels": ["a", "b", "c"]})
    assert parity.max_abs_diff < 1e-4
    data_file = tmp_path / "big.onnx.data"
    assert data_file.is_file() and data_file.stat().st_size > path.stat().st_size
    onnx.checker.check_model(str(path), full_check=True)
    assert _export.read_metadata(path)["labels"] == '["a", "b", "c"]'
    out = ort.InferenceSession(str(path)).run(None, {"image": np.zeros((2, 3, 32, 32), np.float32)})[0]
    assert out.shape == (2, 3)


def test_export_memory_does_not_grow_with_the_validation_split(tmp_path: Path) -> None:
    """The export's parity check and scoring stream the validation images: 10x the images, the same peak memory."""
    import tracemalloc

    import numpy as np
    import timm
    import torch
    from PIL import Image

    from tlengine._export import ValidationImages, export_trial
    from tlengine._model import build_model
    from tlengine._preprocess import Preprocess

    rng = np.random.default_rng(0)
    paths = []
    for i in range(3000):
        path = tmp_path / "val" / f"{i:04d}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (36, 36, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    targets = [i % 3 for i in range(3000)]
    preprocess = Preprocess.from_data_config({"mean": (0.5,) * 3, "std": (0.25,) * 3}, 32)
    torch.manual_seed(0)
    model = build_model(timm.create_model("test_efficientnet", num_classes=0), torch.nn.Linear(256, 3), "classification")
    metadata = {"task": "classification", "labels": ["a", "b", "c"], "metric": "accuracy", "trial_number": 0}

    def peak_bytes(n: int) -> tuple[int, float]:
        images = ValidationImages(paths[:n], targets[:n], preprocess, classification=True)
        tracemalloc.start()
        try:
            report = export_trial(model, tmp_path / f"m{n}.onnx", metadata, images)
            return tracemalloc.get_traced_memory()[1], report.score_fp32
        finally:
            tracemalloc.stop()

    small, score_small = peak_bytes(300)
    large, score_large = peak_bytes(3000)
    assert 0.0 <= score_small <= 1.0 and 0.0 <= score_large <= 1.0
    # the whole split as float32 would add 2,700 x 12 KB = 33 MB; allow well under 1 KB per extra image
    assert large - small < 2700 * 1024, (small, large)
