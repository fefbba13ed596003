"""The CUDA path: bf16 autocast and channels_last, the caches on the GPU, out-of-memory backoff, export of a
GPU-trained model. Marked ``gpu``: skipped where there is no CUDA device (CI never has one)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import TINY_BACKBONE

pytestmark = pytest.mark.gpu


def test_cuda_trains_in_bf16_and_channels_last() -> None:
    import torch

    from tlengine._train import amp_dtype, resolve_device

    assert resolve_device("auto").startswith("cuda")
    assert amp_dtype("cuda") == (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)


@pytest.mark.parametrize("cache", [True, False], ids=["cached", "uncached"])
def test_a_search_on_cuda_exports_a_model_onnxruntime_agrees_with(tmp_path: Path, tiny_folder: Path, cache: bool) -> None:
    """Every recipe on the GPU (caches computed there, augmentation on the GPU), exported and checked on the CPU."""
    import tlengine

    result = tlengine.search(tiny_folder, TINY_BACKBONE, trials=3, epochs=2, weights="none", image_size=32, out=tmp_path,
                             study_name="g", device="cuda", cache=cache, cache_dir=tmp_path / "cache", quiet=True)
    assert [r.state for r in result.rows] == ["complete"] * 3
    assert result.onnx_path is not None and result.parity["max_abs_diff"] < 1e-4
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["stages"]["training"]["calls"] == 3


def test_out_of_memory_halves_the_micro_batch_and_keeps_the_effective_batch() -> None:
    """Under a memory cap a batch that cannot fit is split into micro-batches with accumulated gradients."""
    import torch

    from tlengine._loaders import loader
    from tlengine._train import TrainPlan, fit, param_groups

    import timm

    from tlengine._model import build_model, feature_width

    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, 3e9 / total))  # about 3 GB
    try:
        backbone = timm.create_model("resnet50", pretrained=False, num_classes=0)
        model = build_model(backbone, torch.nn.Linear(feature_width(backbone), 10), "classification")
        x, y = torch.randn(512, 3, 160, 160), torch.randint(10, (512,))
        train = loader(torch.utils.data.TensorDataset(x, y), 256, True, "cuda")
        val = loader(torch.utils.data.TensorDataset(x[:64], y[:64]), 64, False, "cuda")
        micro: list[int] = []
        history = fit(model, torch.optim.AdamW(param_groups(model, 0.01, 1.0), lr=1e-3), train, val,
                      TrainPlan(epochs=1, task="classification", metric="accuracy", num_classes=10), device="cuda",
                      on_backoff=micro.append)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    assert micro and all(256 % m == 0 and m < 256 for m in micro)  # halved from the batch of 256
    assert len(history) == 1 and 0.0 <= history[0].score <= 1.0
