"""Property-based tests: arbitrary CSV input gives a dataset or a one-line UserError, nothing else."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tlengine import DatasetOptions, ImageData, UserError
from tlengine_plugins.datasets import csv_dataset

FOLDER = Path(tempfile.mkdtemp(prefix="tlengine-props-"))
for _name, _value in (("a.png", 0), ("b.png", 120), ("c.png", 250)):
    from PIL import Image

    Image.new("L", (6, 6), _value).save(FOLDER / _name)

cells = st.one_of(
    st.sampled_from(["a.png", "b.png", "c.png", "missing.png", "../a.png", "/etc/passwd", "", " a.png "]),
    st.sampled_from(["cat", "dog", "1", "2.5", "-3e2", "nan", "inf", "train", "val", "test"]),
    st.text(max_size=12),
)
headers = st.lists(st.sampled_from(["image", "path", "label", "target", "split", "class", "file", "x", "Image", ""]), min_size=0, max_size=4)


@st.composite
def csv_texts(draw) -> str:
    header = draw(headers)
    width = max(1, len(header))
    rows = draw(st.lists(st.lists(cells, min_size=0, max_size=width + 1), max_size=8))
    quote = lambda cell: '"' + cell.replace('"', '""') + '"' if any(c in cell for c in ',"\n\r') else cell  # noqa: E731
    return "\n".join(",".join(quote(c) for c in row) for row in [header, *rows])


@st.composite
def mostly_valid_csv_texts(draw) -> str:
    """Near-valid CSVs (so that the success path is exercised too), with the odd defect."""
    header = draw(st.sampled_from([["image", "label"], ["path", "target"], ["file", "class", "split"], ["image", "label", "split"]]))
    images = st.sampled_from(["a.png", "b.png", "c.png"]) | cells
    labels = st.sampled_from(["cat", "dog", "1.5", "2"]) | cells
    splits = st.sampled_from(["train", "val"]) | cells
    n = draw(st.integers(min_value=0, max_value=10))
    rows = [[draw(images), draw(labels)] + ([draw(splits)] if len(header) == 3 else []) for _ in range(n)]
    return "\n".join(",".join(row) for row in [header, *rows])


def check(content: bytes, task: str | None, confine: bool) -> None:
    with tempfile.NamedTemporaryFile("wb", suffix=".csv", dir=FOLDER, delete=False) as handle:
        handle.write(content)
    try:
        data = csv_dataset(handle.name, DatasetOptions(task=task, val_fraction=0.3, confine_paths=confine))
    except UserError as exc:
        assert str(exc).startswith("--data ")
        assert "\n" not in str(exc)
        return
    finally:
        Path(handle.name).unlink()
    assert isinstance(data, ImageData)
    assert len(data.train.images) == len(data.train.targets)
    if data.task == "classification":
        assert all(0 <= t < len(data.classes) for t in list(data.train.targets) + list(data.val.targets))
    if confine:
        assert all(Path(p).is_relative_to(FOLDER) for p in list(data.train.images) + list(data.val.images))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(csv_texts() | mostly_valid_csv_texts(), st.sampled_from([None, "classification", "regression"]), st.booleans())
def test_structured_csv(text: str, task: str | None, confine: bool) -> None:
    check(text.encode("utf-8"), task, confine)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200), st.sampled_from([None, "regression"]))
def test_arbitrary_bytes(content: bytes, task: str | None) -> None:
    check(content, task, False)


@pytest.mark.parametrize("content", [b"\xff\xfe\x00", "image,label\n".encode("utf-16"), b"image,label\na.png,\xe9\n"])
def test_not_utf8(content: bytes) -> None:
    with pytest.raises(UserError, match="not UTF-8"):
        path = FOLDER / "enc.csv"
        path.write_bytes(content)
        csv_dataset(str(path), DatasetOptions())


toml_scalars = st.one_of(st.booleans(), st.integers(-5, 2000), st.floats(allow_nan=True, allow_infinity=True, width=32),
                         st.sampled_from(["search", "linear", "mlp", "adamw", "sgd", "x"]), st.text(max_size=5))
toml_values = st.recursive(
    toml_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(["low", "high", "log", "step", "other"]), inner, max_size=4),
    max_leaves=8,
)
space_keys = st.sampled_from(["freeze_depth", "lr", "layer_decay", "label_smoothing", "weight_decay", "batch_size", "head",
                              "optimizer", "warmup", "head_epochs", "randaugment", "mixup", "cutmix", "sgd", "mlp", "lr_", "nope"])


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(space_keys, toml_values, max_size=5), st.sampled_from(["classification", "regression"]))
def test_space_parser_total(config: dict, task: str) -> None:
    """Arbitrary [space] tables give a valid space or a one-line UserError naming the config."""
    from tlengine._space import Dimension, build_space

    try:
        space = build_space(config, {}, {"sgd": {"momentum": 0.9}, "mlp": {"hidden": 1024}}, n_stages=5,
                            lr_ranges={"adamw": (1e-5, 1e-2), "sgd": (1e-4, 1e-1)}, heads=["linear", "mlp"], task=task,
                            where="--config c.toml")
    except UserError as exc:
        assert str(exc).startswith(("--config c.toml: ", "default: ")) and "\n" not in str(exc)
        return
    assert all(isinstance(d, Dimension) for d in space.values())
    for dim in space.values():
        if dim.kind in ("int", "float"):
            assert dim.low < dim.high
        if dim.kind == "categorical":
            assert dim.choices


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_config_reader_total(text: str) -> None:
    """Arbitrary config files are read or refused with a one-line UserError."""
    from tlengine._space import read_config

    path = FOLDER / "c.toml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass") if "\ud800" not in text else path.write_bytes(b"\xff")
    try:
        config = read_config(str(path))
    except UserError as exc:
        assert str(exc).startswith(f"--config {path}: ") and "\n" not in str(exc)
        return
    assert set(config) == {"search", "space"}
