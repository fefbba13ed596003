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


#: Models with more weight bytes than this keep their weights in an external ``.onnx.data`` file.
EXTERNAL_DATA_BYTES = 1_800_000_000


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
    axis and one output ``output``; it passes ``onnx.checker``. Models over 1.8 GB
    of weights keep them in an external data file beside ``path``. ``metadata``
    goes into ``metadata_props`` (values that are not strings as JSON), together
    with the parity figures. onnxruntime runs ``sample`` at batch 1 and whole.

    Args:
        model: An :func:`tlengine._model.inference_model`, on CPU, in eval mode.
        path: Where to write the ``.onnx`` file.
        sample: A float32 batch of real, preprocessed validation images.
        metadata: Labels, task, preprocessing and whatever else describes the model.
        opset: ONNX opset version.
        tolerance: Largest allowed difference between PyTorch and onnxruntime, relative
            to the outputs' magnitude when it exceeds 1 (regression values in their
            own units); absolute for probabilities.

    Raises:
        UserError: The exported model disagrees with PyTorch beyond ``tolerance``.
    """
    import onnx
    import torch

    model = model.cpu().eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    large = sum(t.numel() * t.element_size() for t in model.state_dict().values()) > EXTERNAL_DATA_BYTES
    with torch.inference_mode():
        expected = model(sample).numpy()
    _torch_export(model, sample[:2], path, opset, external_data=large)
    parity = check_parity(path, sample.numpy(), expected, metadata.get("task") == "classification")
    allowed = tolerance * max(1.0, float(abs(expected).max()))
    if parity.max_abs_diff > allowed:
        raise UserError(
            f"{path}: onnxruntime differs from PyTorch by {parity.max_abs_diff:.2e} "
            f"(tolerance {allowed:.1e}); the exported model is not trustworthy"
        )
    set_metadata(path, {
        **metadata,
        "parity_max_abs_diff": parity.max_abs_diff,
        "parity_top1_agreement": parity.top1_agreement,
        "tlengine_metadata_schema": METADATA_SCHEMA,
    })
    onnx.checker.check_model(str(path), full_check=True)
    return parity


def read_metadata(path: Path) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file, as raw strings."""
    import onnx

    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def set_metadata(path: Path, values: Mapping[str, Any]) -> None:
    """Add or replace ``metadata_props`` entries (non-strings as JSON), leaving external data where it is."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    existing = {p.key: p for p in proto.metadata_props}
    for key, value in values.items():
        text = value if isinstance(value, str) else json.dumps(value)
        if key in existing:
            existing[key].value = text
        else:
            proto.metadata_props.add(key=key, value=text)
    onnx.save(proto, str(path))


def _torch_export(model: Any, example: Any, path: Path, opset: int, external_data: bool) -> None:
    """Export with torch's dynamo exporter; fall back to the TorchScript one if it fails."""
    import contextlib
    import io
    import warnings

    import torch

    names = {"input_names": ["image"], "output_names": ["output"], "opset_version": opset}
    Path(f"{path}.data").unlink(missing_ok=True)  # a previous export's external weights
    quiet = io.StringIO()
    try:
        with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            batch = torch.export.Dim("batch", min=1)
            torch.onnx.export(
                model, (example,), str(path), dynamic_shapes=({0: batch},), dynamo=True, external_data=external_data, **names
            )
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


@dataclass(frozen=True)
class ExportReport:
    """What ``tlengine export`` (and the export at the end of a search) produced.

    Attributes:
        path: The model to deploy.
        trial: The exported trial's number.
        parity: PyTorch vs onnxruntime on real validation images (fp32 model).
        metric: The validation metric's name.
        score_fp32: The fp32 ONNX model's validation score.
        latency_ms_fp32: Its median latency at batch 1 on this machine, in ms.
        variant: ``"fp16"``, ``"int8-static"``, ``"int8-dynamic"`` or ``None``.
        score: The deployed model's validation score.
        latency_ms: Its median latency at batch 1, in ms.
        reference: The fp32 model kept beside a reduced-precision one.
    """

    path: Path
    trial: int
    parity: Parity
    metric: str
    score_fp32: float
    latency_ms_fp32: float
    variant: str | None = None
    score: float | None = None
    latency_ms: float | None = None
    reference: Path | None = None


def trial_model(registry: Any, config: Mapping[str, Any], values: Mapping[str, Any], checkpoint: Path) -> Any:
    """Rebuild a trial's trained model from its study's config, its values and its checkpoint.

    Args:
        registry: The plugin registry.
        config: The study's ``tlengine`` config (backbone, task, classes, target statistics).
        values: Every value the trial used (``head`` and the head's parameters among them).
        checkpoint: The trial's ``.safetensors`` checkpoint.

    Raises:
        UserError: The plugin that built it is not installed, or the checkpoint is missing.
    """
    from safetensors.torch import load_model

    from tlengine._model import build_model, feature_width

    head_name = values["head"]
    if config["backbone"] not in registry.backbones or head_name not in registry.heads:
        raise UserError(f"the trial was made with backbone {config['backbone']!r} and head {head_name!r}; install their plugins")
    if not checkpoint.is_file():
        raise UserError(f"{checkpoint}: the trial's checkpoint is not on this machine; export it where the trial ran")
    backbone = registry.backbones[config["backbone"]].factory(config["arch"], "none")
    outputs = len(config["classes"]) if config["task"] == "classification" else 1
    head_record = registry.heads[head_name]
    head_kwargs = {p: values[f"{head_name}.{p}"] for p in head_record.params if f"{head_name}.{p}" in values}
    head = head_record.factory(feature_width(backbone), outputs, config["task"], **head_kwargs)
    model = build_model(backbone, head, config["task"], config["target_mean"], config["target_std"])
    load_model(model, str(checkpoint))
    return model.eval()


def onnx_score(path: Path, images: Any, targets: Any, task: str, batch_size: int = 64) -> float:
    """Validation score of an ONNX model: accuracy, or RMSE for regression."""
    import numpy as np
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outputs = np.concatenate([session.run(None, {"image": images[i : i + batch_size]})[0] for i in range(0, len(images), batch_size)])
    if task == "classification":
        return float((outputs.argmax(-1) == targets).mean())
    return float(np.sqrt(np.mean((outputs.reshape(-1) - targets) ** 2)))


def latency_ms(path: Path, image: Any, repeats: int = 30) -> float:
    """Median onnxruntime latency of one image, in milliseconds (after warm-up)."""
    import statistics
    import time

    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for _ in range(3):
        session.run(None, {"image": image})
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, {"image": image})
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def reduce_precision(reference: Path, path: Path, variant: str, calibration: Any) -> None:
    """Write a fp16 or int8 version of the fp32 model ``reference`` to ``path``.

    fp16 uses onnxruntime's float16 converter (inputs and outputs stay float32);
    int8 uses onnxruntime's quantization: static QDQ per-channel with
    ``calibration`` (preprocessed training images), or dynamic.
    """
    import tempfile

    import onnx

    if variant == "fp16":
        from onnxruntime.transformers.float16 import convert_float_to_float16

        import onnx_ir

        # The converter appends its input casts at the end; sort the graph so that it is valid ONNX.
        converted = onnx_ir.from_proto(convert_float_to_float16(onnx.load(str(reference)), keep_io_types=True))
        converted.graph.sort()
        onnx.save(onnx_ir.to_proto(converted), str(path))
        return
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quant_pre_process, quantize_dynamic, quantize_static

    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(reference), str(prepared))
        if variant == "int8-dynamic":
            quantize_dynamic(str(prepared), str(path), weight_type=QuantType.QInt8)
            return

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self.batches = iter([{"image": calibration[i : i + 8]} for i in range(0, len(calibration), 8)])

            def get_next(self) -> dict | None:
                return next(self.batches, None)

        quantize_static(
            str(prepared), str(path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
        )


def export_trial(
    model: Any,
    path: Path,
    metadata: Mapping[str, Any],
    val_images: Any,
    val_targets: Any,
    *,
    variant: str | None = None,
    calibration: Any = None,
    opset: int = 18,
) -> ExportReport:
    """Export a trained model, gate it on parity, and optionally reduce its precision.

    Args:
        model: The trained model (from :func:`trial_model` or the search).
        path: Where the model to deploy goes; with a ``variant``, the fp32 reference
            goes beside it as ``NAME.fp32.onnx``.
        metadata: Labels, task, preprocessing, backbone, params, metric, ...
        val_images: Preprocessed validation images, float32 numpy (N, 3, H, W).
        val_targets: Their targets (numpy).
        variant: ``None``, ``"fp16"``, ``"int8-static"`` or ``"int8-dynamic"``.
        calibration: Preprocessed training images for static int8 calibration.
        opset: ONNX opset.
    """
    import onnx
    import torch

    from tlengine._model import inference_model

    task = metadata["task"]
    stem = path.stem.removesuffix(".fp16").removesuffix(".int8-dynamic").removesuffix(".int8")
    reference = path.with_name(stem + ".fp32.onnx") if variant else path
    sample = torch.from_numpy(val_images[:16])
    parity = export_onnx(inference_model(model), reference, sample, metadata, opset=opset)
    score_fp32 = onnx_score(reference, val_images, val_targets, task)
    latency_fp32 = latency_ms(reference, val_images[:1])
    set_metadata(reference, {"precision": "fp32", "val_score": score_fp32})
    if not variant:
        return ExportReport(path, int(metadata.get("trial_number", -1)), parity, metadata.get("metric", ""), score_fp32, latency_fp32)
    reduce_precision(reference, path, variant, calibration)
    score = onnx_score(path, val_images, val_targets, task)
    set_metadata(path, {**read_metadata(reference), "precision": variant, "val_score": score, "val_score_fp32": score_fp32})
    onnx.checker.check_model(str(path))
    return ExportReport(
        path, int(metadata.get("trial_number", -1)), parity, metadata.get("metric", ""), score_fp32, latency_fp32,
        variant, score, latency_ms(path, val_images[:1]), reference,
    )
