"""Inference on exported models with onnxruntime, numpy and Pillow only (no PyTorch)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tlengine._errors import UserError
from tlengine._preprocess import Preprocess, list_images


@dataclass(frozen=True)
class Prediction:
    """The prediction for one image.

    Attributes:
        source: The image's path (or its index, for in-memory images).
        top: ``(label, probability)`` pairs, most probable first (classification).
        value: The predicted value (regression), else ``None``.
    """

    source: str
    top: tuple[tuple[str, float], ...] = ()
    value: float | None = None

    @property
    def label(self) -> str | None:
        """The most probable label (classification)."""
        return self.top[0][0] if self.top else None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        if self.value is not None:
            return {"source": self.source, "value": self.value}
        return {"source": self.source, "label": self.label, "top": [{"label": l, "probability": p} for l, p in self.top]}


class Model:
    """An exported tlengine model, ready to predict.

    Everything it needs (labels, task, preprocessing) is read from the model's
    ONNX metadata.

    Args:
        path: The ``.onnx`` file.
        threads: onnxruntime intra-op threads (``None``: its default).

    Raises:
        UserError: The file is missing, not an ONNX model, or lacks tlengine metadata.
    """

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"{self.path}: no such model file; pass the best.onnx written by 'tlengine search'")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise UserError(f"{self.path}: not a readable ONNX model ({type(exc).__name__})") from exc
        props = self.session.get_modelmeta().custom_metadata_map
        if "tlengine_metadata_schema" not in props:
            raise UserError(f"{self.path}: has no tlengine metadata; export it with 'tlengine search'")
        self.metadata: dict[str, Any] = {k: _decode(v) for k, v in props.items()}
        self.task: str = self.metadata["task"]
        self.labels: list[str] = list(self.metadata.get("labels", []))
        self.preprocess = Preprocess.from_dict(self.metadata["preprocess"])

    def predict(self, images: Iterable[Any], top_k: int = 5, batch_size: int = 32, skip_bad: bool = False) -> list[Prediction]:
        """Predict a batch of images.

        Args:
            images: Paths, PIL images or uint8 arrays.
            top_k: How many labels to return per image (classification).
            batch_size: Images per onnxruntime call.
            skip_bad: Leave out images that cannot be read (they are listed in
                :attr:`skipped`) instead of raising.

        Raises:
            UserError: An image cannot be read (unless ``skip_bad``).
        """
        import numpy as np

        items = list(images)
        results: list[Prediction] = []
        self.skipped: list[tuple[str, str]] = []
        for start in range(0, len(items), batch_size):
            chunk, arrays = [], []
            for offset, item in enumerate(items[start : start + batch_size]):
                source = str(item) if isinstance(item, (str, Path)) else str(start + offset)
                try:
                    arrays.append(self.preprocess(item))
                except (OSError, ValueError, SyntaxError) as exc:  # what Pillow raises for broken files
                    if not skip_bad:
                        raise UserError(f"{source}: cannot read the image ({type(exc).__name__}: {exc})") from exc
                    self.skipped.append((source, f"{type(exc).__name__}: {exc}"))
                    continue
                chunk.append(source)
            if not chunk:
                continue
            output = self.session.run(None, {"image": np.stack(arrays)})[0]
            for source, row in zip(chunk, output):
                if self.task == "regression":
                    results.append(Prediction(source, value=float(row.reshape(-1)[0])))
                else:
                    order = np.argsort(-row)[: max(1, top_k)]
                    results.append(Prediction(source, top=tuple((self.labels[i], float(row[i])) for i in order)))
        return results


def _decode(value: str) -> Any:
    try:
        return json.loads(value)
    except ValueError:
        return value


def load(path: str | Path, threads: int | None = None) -> Model:
    """Load an exported model: ``tlengine.load("best.onnx").predict(images)``."""
    return Model(path, threads=threads)


def expand_inputs(inputs: Sequence[str]) -> list[Path]:
    """Expand files, folders (recursively) and glob patterns into image paths.

    Raises:
        UserError: An input matches nothing, or no image is found at all.
    """
    import glob

    paths: list[Path] = []
    for text in inputs:
        path = Path(text)
        if path.is_dir():
            found = list_images(path)
            if not found:
                raise UserError(f"{path}: folder holds no images")
            paths.extend(found)
        elif path.is_file():
            paths.append(path)
        else:
            matches = sorted(Path(m) for m in glob.glob(text, recursive=True) if Path(m).is_file())
            if not matches:
                raise UserError(f"{text}: no such file, folder or glob match")
            paths.extend(matches)
    return paths
