"""ONNX export with metadata and an onnxruntime parity check."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tlengine._errors import UserError

#: Version of the metadata layout written into ``metadata_props``.
METADATA_SCHEMA = "1"


@dataclass(frozen=True)
class Parity:
    """How closely onnxruntime reproduces PyTorch on real images.

    Attributes:
        max_abs_diff: Largest absolute difference over all outputs.
        top1_agreement: Fraction of images with the same arg-max (1.0 for regression).
        batch_sizes: The batch sizes that were compared.
    """

    max_abs_diff: float
    top1_agreement: float
    batch_sizes: tuple[int, ...]


def export_onnx(
    model: Any,
    path: Path,
    sample: Any,
    metadata: Mapping[str, Any],
    *,
    opset: int = 18,
    tolerance: float = 1e-4,
) -> Parity:
    """Export ``model`` (outputs as users read them) to ONNX and check it.

    The graph has one input ``image`` (N, 3, H, W) float32 with a dynamic batch
    axis and one output ``output``; it passes ``onnx.checker``. ``metadata`` goes
    into ``metadata_props`` (values that are not strings as JSON), together with
    the parity figures. onnxruntime then runs ``sample`` at batch 1 and whole.

    Args:
        model: An :func:`tlengine._model.inference_model`, on CPU, in eval mode.
        path: Where to write the ``.onnx`` file.
        sample: A float32 batch of real, preprocessed validation images.
        metadata: Labels, task, preprocessing and whatever else describes the model.
        opset: ONNX opset version.
        tolerance: Largest allowed absolute difference between PyTorch and onnxruntime.

    Raises:
        UserError: The exported model disagrees with PyTorch beyond ``tolerance``.
    """
    import onnx
    import torch

    model = model.cpu().eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.inference_mode():
        expected = model(sample).numpy()
    _torch_export(model, sample[:2], path, opset)
    parity = check_parity(path, sample.numpy(), expected, metadata.get("task") == "classification")
    if parity.max_abs_diff > tolerance:
        raise UserError(
            f"{path}: onnxruntime differs from PyTorch by {parity.max_abs_diff:.2e} "
            f"(tolerance {tolerance:.0e}); the exported model is not trustworthy"
        )
    proto = onnx.load(str(path))
    props = {**metadata, "parity_max_abs_diff": parity.max_abs_diff, "parity_top1_agreement": parity.top1_agreement}
    props["tlengine_metadata_schema"] = METADATA_SCHEMA
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key = key
        entry.value = value if isinstance(value, str) else json.dumps(value)
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))
    return parity


def _torch_export(model: Any, example: Any, path: Path, opset: int) -> None:
    """Export with torch's dynamo exporter; fall back to the TorchScript one if it fails."""
    import contextlib
    import io
    import warnings

    import torch

    names = {"input_names": ["image"], "output_names": ["output"], "opset_version": opset}
    quiet = io.StringIO()
    try:
        with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            batch = torch.export.Dim("batch", min=1)
            torch.onnx.export(model, (example,), str(path), dynamic_shapes=({0: batch},), dynamo=True, **names)
    except Exception:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            axes = {"image": {0: "batch"}, "output": {0: "batch"}}
            torch.onnx.export(model, (example,), str(path), dynamic_axes=axes, dynamo=False, **names)


def check_parity(path: Path, inputs: Any, expected: Any, classification: bool) -> Parity:
    """Run ``inputs`` through onnxruntime at batch 1 and as one batch; compare with ``expected``."""
    import numpy as np
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    single = np.concatenate([session.run(None, {"image": inputs[i : i + 1]})[0] for i in range(min(4, len(inputs)))])
    whole = session.run(None, {"image": inputs})[0]
    diff = max(float(np.abs(single - expected[: len(single)]).max()), float(np.abs(whole - expected).max()))
    agreement = float((whole.argmax(-1) == expected.argmax(-1)).mean()) if classification else 1.0
    return Parity(diff, agreement, (1, len(inputs)))
