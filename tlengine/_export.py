"""ONNX export with metadata and an onnxruntime parity check."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tlengine._errors import UserError

if TYPE_CHECKING:
    import optuna
    import torch

    from tlengine._preprocess import Preprocess
    from tlengine._records import ImageData
    from tlengine.plugins import Registry

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
    """Export with torch's TorchScript exporter, falling back to the dynamo one if it fails.

    TorchScript first because it traces the model once: EfficientNet-Lite0 exports in
    about 2 s where the dynamo exporter takes about 25 s on two CPU cores, and every
    search exports its best trial (and the ``latency`` objective every trial). Models
    whose weights need an external data file go through the dynamo exporter, which writes it.
    """
    import contextlib
    import io
    import warnings

    import torch

    names = {"input_names": ["image"], "output_names": ["output"], "opset_version": opset}
    Path(f"{path}.data").unlink(missing_ok=True)  # a previous export's external weights

    def torchscript() -> None:
        axes = {"image": {0: "batch"}, "output": {0: "batch"}}
        torch.onnx.export(model, (example,), str(path), dynamic_axes=axes, dynamo=False, **names)

    def dynamo() -> None:
        batch = torch.export.Dim("batch", min=1)
        torch.onnx.export(model, (example,), str(path), dynamic_shapes=({0: batch},), dynamo=True, external_data=external_data, **names)

    first, second = (dynamo, torchscript) if external_data else (torchscript, dynamo)
    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            first()
        except Exception:
            second()


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
        metric: The study's validation metric.
        score_fp32: The fp32 ONNX model's validation score in that metric.
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


class ValidationImages:
    """A split's images preprocessed as the exported model expects them, decoded a batch at a time.

    The export checks parity on a fixed sample of them (:meth:`sample`) and scores the
    model on all of them batch by batch (:meth:`batches`), so it holds one batch of
    float32 images however large the split (at 224 px a whole split would take 600 KB
    per image).

    Args:
        items: The images (paths or in-memory images).
        targets: Their targets.
        preprocess: The evaluation preprocessing.
        classification: Class indices (``int64``) rather than regression targets (``float32``).
    """

    def __init__(self, items: Sequence[Any], targets: Sequence[Any], preprocess: Preprocess, classification: bool) -> None:
        import numpy as np

        self.items, self.preprocess = items, preprocess
        self.targets = np.asarray(list(targets), dtype=np.int64 if classification else np.float32)

    def __len__(self) -> int:
        return len(self.items)

    def images(self, indices: Sequence[int]) -> Any:
        """Float32 ``(len(indices), 3, H, W)``: the images at ``indices``, decoded on several threads."""
        import numpy as np

        from tlengine._store import decode_threads, thread_map

        indices = list(indices)
        return np.stack(list(thread_map(lambda i: self.preprocess(self.items[indices[i]]), len(indices), decode_threads())))

    def sample(self, count: int = 16) -> Any:
        """``count`` images spread evenly over the split (the same ones every time)."""
        from tlengine._loaders import evenly_spaced

        return self.images(evenly_spaced(len(self), count))

    def batches(self, batch_size: int = 64) -> Iterator[tuple[Any, Any]]:
        """``(images, targets)`` over the whole split, ``batch_size`` at a time."""
        for start in range(0, len(self), batch_size):
            indices = range(start, min(start + batch_size, len(self)))
            yield self.images(indices), self.targets[start : indices.stop]


def onnx_score(path: Path, images: ValidationImages, metric: str, batch_size: int = 64) -> float:
    """Validation ``metric`` of an ONNX model over ``images``, batch by batch
    (:func:`tlengine._metrics.score`, as the search scores its trials)."""
    import numpy as np
    import onnxruntime as ort
    import torch

    from tlengine._metrics import score

    from tlengine._timing import stage

    with stage("export scoring"):
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        outputs = np.concatenate([session.run(None, {"image": batch})[0] for batch, _ in images.batches(batch_size)])
    return score(metric, torch.from_numpy(outputs).float(), torch.from_numpy(images.targets))


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
    images: ValidationImages,
    *,
    variant: str | None = None,
    calibration: Any = None,
    opset: int = 18,
) -> ExportReport:
    """Export a trained model, gate it on parity, and optionally reduce its precision.

    Args:
        model: The trained model (from :func:`tlengine._model.build_trial_model`).
        path: Where the model to deploy goes; with a ``variant``, the fp32 reference
            goes beside it as ``NAME.fp32.onnx``.
        metadata: Labels, task, preprocessing, backbone, params, metric, ...
        images: The validation images: a sample of them checks parity, all of them the score.
        variant: ``None``, ``"fp16"``, ``"int8-static"`` or ``"int8-dynamic"``.
        calibration: Preprocessed training images for static int8 calibration.
        opset: ONNX opset.
    """
    import onnx
    import torch

    from tlengine._model import inference_model

    metric = metadata["metric"]
    stem = path.stem.removesuffix(".fp16").removesuffix(".int8-dynamic").removesuffix(".int8")
    reference = path.with_name(stem + ".fp32.onnx") if variant else path
    sample = torch.from_numpy(images.sample(16))
    parity = export_onnx(inference_model(model), reference, sample, metadata, opset=opset)
    score_fp32 = onnx_score(reference, images, metric)
    one = sample[:1].numpy()
    latency_fp32 = latency_ms(reference, one)
    set_metadata(reference, {"precision": "fp32", "val_score": score_fp32})
    if not variant:
        return ExportReport(path, int(metadata.get("trial_number", -1)), parity, metadata.get("metric", ""), score_fp32, latency_fp32)
    reduce_precision(reference, path, variant, calibration)
    score = onnx_score(path, images, metric)
    set_metadata(path, {**read_metadata(reference), "precision": variant, "val_score": score, "val_score_fp32": score_fp32})
    onnx.checker.check_model(str(path))
    return ExportReport(
        path, int(metadata.get("trial_number", -1)), parity, metadata.get("metric", ""), score_fp32, latency_fp32,
        variant, score, latency_ms(path, one), reference,
    )


def export_study_trial(
    registry: Registry, study: optuna.Study, trial: optuna.trial.FrozenTrial, path: Path, *, data: ImageData | None = None,
    model: torch.nn.Module | None = None, variant: str | None = None, opset: int = 18,
) -> ExportReport:
    """Export one finished trial of a study to ONNX, checked and scored on the study's validation images.

    Args:
        registry: The plugin registry (to rebuild the model).
        study: The Optuna study.
        trial: One of its completed trials (with a checkpoint).
        path: Where the model goes.
        data: The study's data, if already loaded (unreadable images left out); else loaded again
            as the search loaded it.
        model: The trial's model, if already built from its checkpoint; else built here.
        variant: ``None``, ``"fp16"``, ``"int8-static"`` or ``"int8-dynamic"``.
        opset: ONNX opset.

    Raises:
        UserError: The model cannot be rebuilt, the data cannot be read, or the export disagrees with PyTorch.
    """
    import random

    from tlengine._data import study_data
    from tlengine._model import build_trial_model
    from tlengine._preprocess import Preprocess
    from tlengine._record import read_record

    record = read_record(study)
    data = study_data(registry, record) if data is None else data
    values = trial.user_attrs.get("values", trial.params)
    record = record.for_values(values)  # the trial's own backbone: its preprocessing and name
    preprocess = Preprocess.from_data_config(record.data_config, values["image_size"])
    images = ValidationImages(data.val.images, data.val.targets, preprocess, record.task == "classification")
    calibration = None
    if variant == "int8-static":
        picks = random.Random(0).sample(range(len(data.train)), min(128, len(data.train)))
        calibration = ValidationImages(data.train.images, data.train.targets, preprocess, record.task == "classification").images(picks)
    if model is None:
        model = build_trial_model(registry, record, values, checkpoint=Path(trial.user_attrs.get("checkpoint", "")))
    metadata = {
        "labels": list(record.classes), "task": record.task, "preprocess": preprocess.to_dict(), "backbone": record.backbone_spec,
        "head": values["head"], "params": trial.params, "values": values, "metric": record.metric, "metric_value": trial.values[0],
        "study_name": study.study_name, "trial_number": trial.number, "tlengine_version": version(),
        **({"teacher": dict(record.teacher)} if record.teacher else {}),
    }
    return export_trial(model, path, metadata, images, variant=variant, calibration=calibration, opset=opset)


def version() -> str:
    """tlengine's version."""
    from tlengine import __version__

    return __version__


def parameter_count(model: torch.nn.Module, size: int) -> float:
    """Millions of parameters of ``model`` (the ``params`` objective)."""
    return sum(p.numel() for p in model.parameters()) / 1e6


def onnx_latency(model: torch.nn.Module, size: int) -> float:
    """Median onnxruntime CPU latency of ``model`` at batch 1, in ms (the ``latency`` objective).

    The model is exported to a temporary ONNX file exactly as ``tlengine export`` would.
    """
    import tempfile

    import torch

    from tlengine._model import inference_model

    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / "m.onnx"
        _torch_export(inference_model(model.cpu()), torch.zeros(2, 3, size, size), onnx_path, 18, external_data=False)
        return latency_ms(onnx_path, torch.zeros(1, 3, size, size).numpy())


#: Second objectives of a multi-objective search, minimised.
COSTS = {"latency": onnx_latency, "params": parameter_count}
