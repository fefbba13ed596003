"""Built-in datasets: ``imagefolder``, ``csv`` and the bundled ``demo``."""

from __future__ import annotations

import csv
import random
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tlengine import Dataset, DatasetOptions, ImageData, Split, UserError, hookimpl

DEMO_FILE = Path(__file__).parent / "data" / "fashion_mnist_demo.npz"
IMAGE_COLUMNS = ("image", "path", "file", "filename", "filepath")
TARGET_COLUMNS = ("label", "class", "target", "value", "y")


@hookimpl
def register_datasets(register):
    register(
        Dataset(
            "demo",
            demo,
            "1,000 + 300 Fashion-MNIST images bundled with tlengine (MIT licence)",
            matches=lambda path: path is None,
            suggested={"image_size": 64, "epochs": 3, "trials": 8},
        )
    )
    register(
        Dataset(
            "imagefolder",
            imagefolder,
            "a folder with train/ and val/ class folders, or class folders split by --val-fraction",
            matches=_has_subfolders,
        )
    )
    register(
        Dataset(
            "csv",
            csv_dataset,
            "a CSV of image path (relative to the CSV) and label, or numeric target for regression",
            matches=lambda path: path is not None and path.lower().endswith(".csv"),
        )
    )


def _has_subfolders(path: str | None) -> bool:
    """``--dataset auto`` picks imagefolder for a folder that holds folders."""
    return path is not None and Path(path).is_dir() and any(p.is_dir() for p in Path(path).iterdir())


def stratified_split(targets: Sequence[Any], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Split indices so that every class keeps ``fraction`` of its items for validation.

    Each class with two or more items gives at least one to each side. Regression
    targets (floats) are split at random. Written here because the project has no
    scikit-learn dependency.
    """
    rng = random.Random(seed)
    groups: dict[Any, list[int]] = defaultdict(list)
    stratify = all(isinstance(t, int) for t in targets)
    for index, target in enumerate(targets):
        groups[target if stratify else 0].append(index)
    train, val = [], []
    for key in sorted(groups):
        indices = groups[key]
        rng.shuffle(indices)
        n_val = round(len(indices) * fraction)
        if len(indices) >= 2:
            n_val = min(max(n_val, 1), len(indices) - 1)
        val.extend(indices[:n_val])
        train.extend(indices[n_val:])
    return sorted(train), sorted(val)


def split_by_fraction(everything: Split, classes: Sequence[str], options: DatasetOptions, source: str) -> tuple[Split, Split]:
    """Hold out ``options.val_fraction`` of every class; refuse classes too small to appear on both sides.

    Raises:
        UserError: A class has a single image.
    """
    if classes:
        counts = defaultdict(int)
        for target in everything.targets:
            counts[target] += 1
        lonely = [classes[t] for t in sorted(counts) if counts[t] < 2]
        if lonely:
            raise UserError(
                f"--data {source}: class {lonely[0]!r} has a single image; each class needs at least two "
                "(one to train on, one to validate), or remove the class"
            )
    train_idx, val_idx = stratified_split(everything.targets, options.val_fraction, options.seed)
    return _subset(everything, train_idx), _subset(everything, val_idx)


def _subset(split: Split, indices: list[int]) -> Split:
    return Split([split.images[i] for i in indices], [split.targets[i] for i in indices])


def _scan(folder: Path, class_to_idx: dict[str, int] | None = None) -> tuple[Split, dict[str, int]]:
    from torchvision.datasets.folder import find_classes, make_dataset

    from tlengine._preprocess import IMAGE_EXTENSIONS

    if class_to_idx is None:
        try:
            _, class_to_idx = find_classes(str(folder))
        except FileNotFoundError:
            raise UserError(f"--data {folder}: no class subfolders; put each class's images in a folder named after it") from None
    samples = make_dataset(str(folder), class_to_idx, extensions=IMAGE_EXTENSIONS, allow_empty=True)
    return Split([p for p, _ in samples], [t for _, t in samples]), class_to_idx  # str: compact for 100,000s of paths


def imagefolder(path: str | None, options: DatasetOptions) -> ImageData:
    """Read ``path/train`` and ``path/val`` (or ``valid``), or class folders split by ``options``."""
    if path is None:
        raise UserError("--data: pass an image folder for --dataset imagefolder")
    root = Path(path)
    if not root.is_dir():
        raise UserError(f"--data {path}: no such folder")
    if options.task == "regression":
        raise UserError(f"--data {path}: an image folder holds classes; for regression use a CSV with a numeric target")
    train_dir = root / "train"
    val_dir = next((root / n for n in ("val", "valid", "validation") if (root / n).is_dir()), None)
    if train_dir.is_dir():
        train, class_to_idx = _scan(train_dir)
        if val_dir is not None:
            extra = sorted(p.name for p in val_dir.iterdir() if p.is_dir() and p.name not in class_to_idx)
            if extra:
                raise UserError(f"--data {val_dir}: classes {', '.join(extra)} have no training images in {train_dir}")
            val, _ = _scan(val_dir, class_to_idx)
        else:
            names = sorted(class_to_idx, key=class_to_idx.__getitem__)
            train, val = split_by_fraction(train, names, options, path)
    else:
        everything, class_to_idx = _scan(root)
        if len(everything) == 0:
            raise UserError(f"--data {path}: no images found in its class folders")
        train, val = split_by_fraction(everything, sorted(class_to_idx, key=class_to_idx.__getitem__), options, path)
    classes = tuple(sorted(class_to_idx, key=class_to_idx.__getitem__))
    return ImageData(train, val, "classification", classes, name=root.resolve().name)


def _pick(header: list[str], names: Sequence[str]) -> str | None:
    lowered = {h.strip().lower(): h for h in header}
    return next((lowered[n] for n in names if n in lowered), None)


def csv_dataset(path: str | None, options: DatasetOptions) -> ImageData:
    """Read a CSV with an image column and a label (or numeric target) column.

    Columns are named by ``--image-column`` and ``--target-column``, else found by name:
    image (``image``, ``path``, ``file``, ...), label (``label``, ``class``, ``target``,
    ``value``, ``y``, else the only other column) and an optional ``split`` column of
    ``train``/``val``; without it ``--val-fraction`` splits the rows. Image paths are
    relative to the CSV's folder; rows whose file is missing are left out and counted
    with the unreadable images (``--max-bad-images``).
    """
    if path is None:
        raise UserError("--data: pass a CSV file for --dataset csv")
    file = Path(path)
    if not file.is_file():
        raise UserError(f"--data {path}: no such file")
    try:
        with open(file, newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.reader(handle))
    except UnicodeDecodeError:
        raise UserError(f"--data {path}: not UTF-8 text; save the CSV as UTF-8") from None
    if not rows:
        raise UserError(f"--data {path}: the CSV is empty")
    header, body = rows[0], [r for r in rows[1:] if any(cell.strip() for cell in r)]
    image_col, target_col = _columns(header, options, path)
    if not body:
        raise UserError(f"--data {path}: the CSV has a header but no rows")
    index = {name: i for i, name in enumerate(header)}
    split_col = _pick(header, ("split",))
    task = options.task or "classification"
    images, raw_targets, splits = [], [], []
    for line, row in enumerate(body, start=2):
        if len(row) < len(header):
            raise UserError(f"--data {path}: line {line} has {len(row)} fields, the header has {len(header)}")
        cell = row[index[image_col]]
        if not cell.strip():
            raise UserError(f"--data {path}: line {line}: the {image_col!r} column is empty; give each row an image path")
        try:
            image = (file.parent / cell.strip()).resolve()
        except (ValueError, OSError) as exc:  # NUL bytes, names too long
            raise UserError(f"--data {path}: line {line}: {cell!r} is not a usable file path ({exc})") from None
        if options.confine_paths and not image.is_relative_to(file.parent.resolve()):
            raise UserError(f"--data {path}: line {line}: image {cell!r} is outside the CSV's folder (--confine-paths)")
        images.append(str(image))  # a missing file is left out later and counted with the unreadable ones
        raw_targets.append(row[index[target_col]].strip())
        splits.append(row[index[split_col]].strip().lower() if split_col else "")
    if task == "regression":
        try:
            targets: list[Any] = [float(t) for t in raw_targets]
        except ValueError:
            bad = next(t for t in raw_targets if not _is_float(t))
            raise UserError(f"--data {path}: target {bad!r} is not a number; regression needs numeric targets") from None
        classes: tuple[str, ...] = ()
    else:
        classes = tuple(sorted(set(raw_targets)))
        if len(classes) > max(20, len(raw_targets) // 2) and all(_is_float(t) for t in raw_targets):
            raise UserError(
                f"--data {path}: column {target_col!r} holds {len(classes)} different numbers, "
                "which looks like a regression target; pass --task regression (or use text labels)"
            )
        lookup = {c: i for i, c in enumerate(classes)}
        targets = [lookup[t] for t in raw_targets]
    everything = Split(images, targets)
    if split_col:
        unknown = sorted({s for s in splits if s not in ("train", "val")})
        if unknown:
            raise UserError(f"--data {path}: split column values must be train or val, found {unknown[0]!r}")
        train_idx = [i for i, s in enumerate(splits) if s == "train"]
        val_idx = [i for i, s in enumerate(splits) if s == "val"]
        return ImageData(_subset(everything, train_idx), _subset(everything, val_idx), task, classes, name=file.stem)
    train, val = split_by_fraction(everything, classes, options, path)
    return ImageData(train, val, task, classes, name=file.stem)


def _columns(header: list[str], options: DatasetOptions, path: str) -> tuple[str, str]:
    """The image and target columns: as ``--image-column`` / ``--target-column`` name them, else found by
    name, else (the target) the only column besides the image and ``split`` columns."""
    def named(name: str, flag: str) -> str:
        found = name if name in header else _pick(header, (name.strip().lower(),))
        if found is None:
            raise UserError(f"--{flag} {name}: {path} has no such column; its header is {', '.join(header) or 'empty'}")
        return found

    image_col = named(options.image_column, "image-column") if options.image_column else _pick(header, IMAGE_COLUMNS)
    if options.target_column:
        target_col = named(options.target_column, "target-column")
    else:
        target_col = _pick(header, TARGET_COLUMNS)
        others = [h for h in header if h != image_col and h.strip().lower() != "split"]
        if target_col is None and image_col is not None and len(others) == 1:
            target_col = others[0]
    if image_col is None or target_col is None or image_col == target_col:
        raise UserError(
            f"--data {path}: cannot tell which columns hold the images and the targets (header: {', '.join(header) or 'none'}); "
            f"name them with --image-column and --target-column (found by name: {'/'.join(IMAGE_COLUMNS)} and {'/'.join(TARGET_COLUMNS)})"
        )
    return image_col, target_col


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def demo(path: str | None, options: DatasetOptions) -> ImageData:
    """The bundled Fashion-MNIST sample: 100 training and 30 validation images per class."""
    import numpy as np

    if options.task == "regression":
        raise UserError("--task regression: the demo dataset is a classification task")
    with np.load(DEMO_FILE) as archive:
        classes = tuple(str(c) for c in archive["classes"])
        train = Split(list(archive["train_images"]), [int(t) for t in archive["train_labels"]])
        val = Split(list(archive["val_images"]), [int(t) for t in archive["val_labels"]])
    return ImageData(train, val, "classification", classes, name="demo")
