"""The data of a study: which dataset plugin reads ``--data``, and loading it clean for search, export and report."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tlengine._errors import UserError, unknown
from tlengine._records import Dataset, DatasetOptions, ImageData

if TYPE_CHECKING:
    from tlengine._record import StudyRecord
    from tlengine.plugins import Registry


def resolve_dataset(registry: Registry, name: str, data: str | None) -> Dataset:
    """Resolve ``--dataset`` (``auto`` asks each dataset whether it reads ``--data``).

    Raises:
        UserError: Unknown name, or nothing reads ``--data``.
    """
    if name != "auto":
        if name not in registry.datasets:
            raise unknown("dataset", name, registry.datasets, "--dataset")
        return registry.datasets[name]
    for record in registry.datasets.values():
        if record.matches is not None and record.matches(data):
            return record
    if data is not None and not Path(data).exists():
        raise UserError(f"--data {data}: no such file or folder")
    if data is not None and Path(data).is_dir():
        state = "is empty" if not any(Path(data).iterdir()) else "has no class subfolders"
        raise UserError(f"--data {data}: the folder {state}; put each class's images in a folder named after the class")
    raise UserError(f"--data {data}: no dataset plugin reads it; pass --dataset (known: {', '.join(registry.datasets)})")


def check_data(data: ImageData, source: str) -> None:
    """Refuse data that cannot be trained on: empty splits, fewer than two classes, bad targets.

    Raises:
        UserError: Naming ``source`` and what to fix.
    """
    if len(data.train) == 0:
        raise UserError(f"{source}: no training images found")
    if len(data.val) == 0:
        raise UserError(f"{source}: no validation images; add a val/ folder or raise --val-fraction")
    if data.task == "classification":
        if len(data.classes) < 2:
            raise UserError(f"{source}: classification needs at least two classes, found {len(data.classes)}")
        bad = [t for t in list(data.train.targets) + list(data.val.targets) if not 0 <= int(t) < len(data.classes)]
        if bad:
            raise UserError(f"{source}: target {bad[0]!r} is not a class index 0..{len(data.classes) - 1}")
        untrained = sorted(set(range(len(data.classes))) - set(data.train.targets))
        if untrained:
            raise UserError(f"{source}: class {data.classes[untrained[0]]!r} has no training images")
    else:
        values = list(data.train.targets)
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
            raise UserError(f"{source}: regression targets must be finite numbers")


def _readable(item: Any) -> str | None:
    """``None`` if ``item`` decodes as an image, else why not. JPEGs decode at reduced size (draft mode)."""
    if not isinstance(item, (str, Path)):
        return None
    from PIL import Image

    if not os.path.isfile(item):
        return "missing"
    try:
        with Image.open(item) as image:
            image.draft("RGB", (64, 64))
            image.load()
        return None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        return f"{type(exc).__name__}: {exc}"


def drop_unreadable(data: ImageData, max_bad: float, warn: Any) -> ImageData:
    """Decode every image file once and leave out the ones that fail.

    Args:
        data: The dataset.
        max_bad: The most unreadable images tolerated: a fraction of all images
            when below 1, else a count.
        warn: Called with one summary line when images are skipped.

    Raises:
        UserError: More images are unreadable than ``max_bad`` allows.
    """
    import dataclasses

    from tlengine._store import thread_map

    bad: list[tuple[Any, str]] = []

    def keep(split: Any) -> Any:
        errors = list(thread_map(lambda i: _readable(split.images[i]), len(split.images), 4))
        if not any(errors):
            return split
        bad.extend((item, error) for item, error in zip(split.images, errors) if error)
        kept = [i for i, error in enumerate(errors) if error is None]
        return type(split)([split.images[i] for i in kept], [split.targets[i] for i in kept])

    train, val = keep(data.train), keep(data.val)
    total = len(data.train) + len(data.val)
    if not bad:
        return data
    limit = max_bad if max_bad >= 1 else max_bad * total
    missing = sum(error == "missing" for _, error in bad)
    counts = {"missing": missing, "unreadable": len(bad) - missing}
    what = ", ".join(f"{n} {kind}" for kind, n in counts.items() if n)
    first = "; ".join(f"{item} ({error})" for item, error in bad[:3])
    if len(bad) > limit:
        raise UserError(f"--max-bad-images {max_bad:g}: {len(bad)} of {total} images cannot be used ({what}), e.g. {first}; "
                        "fix or remove them, or raise --max-bad-images")
    warn(f"warning: skipped {len(bad)} image(s) of {total} ({what}): {first}")
    return dataclasses.replace(data, train=train, val=val)


def load_data(dataset: Dataset, path: str | None, options: DatasetOptions, max_bad: float, warn: Callable[[str], None]) -> ImageData:
    """Read ``path`` with ``dataset``, leave out unreadable images (at most ``max_bad``) and check what is left.

    Raises:
        UserError: The dataset cannot read it, too many images are unreadable, or the data cannot be trained on.
    """
    from tlengine._timing import stage

    with stage("listing"):
        listed = dataset.factory(path, options)
    with stage("checking images"):
        data = drop_unreadable(listed, max_bad, warn)
    check_data(data, path or dataset.name)
    return data


def study_data(registry: Registry, record: StudyRecord, warn: Callable[[str], None] = lambda line: None) -> ImageData:
    """Load a study's data again, with the dataset plugin and options its record names, as the search loaded it:
    the same split, and unreadable images left out (any number: the search already held them to its limit).

    Raises:
        UserError: The dataset plugin is not installed, or it cannot read the data any more.
    """
    if record.dataset not in registry.datasets:
        raise UserError(f"the study's dataset plugin {record.dataset!r} is not installed")
    options = DatasetOptions(record.task, record.val_fraction, record.seed, record.confine_paths, record.image_column, record.target_column)
    return drop_unreadable(registry.datasets[record.dataset].factory(record.data, options), math.inf, warn)
