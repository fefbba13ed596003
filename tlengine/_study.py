"""Studies: resolving plugins and data, opening and reading Optuna studies, exporting their trials."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tlengine._errors import UserError, did_you_mean, unknown
from tlengine._preprocess import Preprocess
from tlengine._records import Backbone, Dataset, DatasetOptions, ImageData
from tlengine.plugins import Registry

#: Study-config keys that define the objective: a study resumed with other values is refused.
OBJECTIVE_KEYS = (
    "backbone", "arch", "weights", "task", "classes", "epochs", "metric", "objectives", "class_weights",
    "dataset", "data", "val_fraction", "space", "early",
)


@dataclass(frozen=True)
class TrialRow:
    """One trial of the study, for the results table and ``summary.json``."""

    number: int
    state: str
    params: dict[str, Any]
    value: float | None
    duration_s: float | None
    epochs_run: int
    recipe: str | None = None
    values: dict[str, Any] | None = None
    cost: float | None = None


def resolve_backbone(registry: Registry, spec: str) -> tuple[Backbone, str | None]:
    """Resolve ``--backbone``: ``NAME``, ``NAME:ARCH``, or an ``ARCH`` some backbone lists.

    Raises:
        UserError: Nothing matches; close matches are suggested.
    """
    name, _, arch = spec.partition(":")
    if name in registry.backbones:
        record = registry.backbones[name]
        arch = arch or record.default_arch
        if arch and record.architectures is not None:
            known = list(record.architectures())
            if arch not in known:
                raise UserError(
                    f"--backbone: unknown {name} architecture {spec!r}{did_you_mean(arch, known)}; "
                    f"'tlengine plugins' lists the backbones"
                )
        return record, arch or None
    if not arch:
        archs: list[str] = []
        for record in registry.backbones.values():
            listed = list(record.architectures()) if record.architectures is not None else []
            if spec in listed:
                return record, spec
            archs.extend(listed)
        hint = did_you_mean(spec, list(registry.backbones) + archs)
        raise UserError(
            f"--backbone: unknown backbone {spec!r}{hint}; pass a backbone plugin "
            f"({', '.join(sorted(registry.backbones))}), NAME:ARCH, or an architecture one of them lists"
        )
    raise unknown("backbone", name, registry.backbones, "--backbone")


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
    from concurrent.futures import ThreadPoolExecutor

    bad: list[tuple[Any, str]] = []

    def keep(split: Any) -> Any:
        with ThreadPoolExecutor(max_workers=4) as pool:
            errors = list(pool.map(_readable, split.images, chunksize=64))
        bad.extend((item, error) for item, error in zip(split.images, errors) if error)
        kept = [i for i, error in enumerate(errors) if error is None]
        return type(split)([split.images[i] for i in kept], [split.targets[i] for i in kept])

    train, val = keep(data.train), keep(data.val)
    total = len(data.train) + len(data.val)
    if not bad:
        return data
    limit = max_bad if max_bad >= 1 else max_bad * total
    first = "; ".join(f"{item} ({error})" for item, error in bad[:3])
    if len(bad) > limit:
        raise UserError(f"--max-bad-images {max_bad:g}: {len(bad)} of {total} images cannot be read, e.g. {first}")
    warn(f"warning: skipped {len(bad)} unreadable image(s) of {total}: {first}")
    return dataclasses.replace(data, train=train, val=val)


def make_sampler(name: str, seed: int, grid: dict[str, list[Any]] | None = None) -> Any:
    """Optuna's sampler for ``--sampler``: ``tpe`` (multivariate), ``random``, or ``grid`` over ``grid``.

    Raises:
        UserError: Unknown name, or a grid with nothing to sweep.
    """
    import optuna

    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=5)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "grid":
        if grid is not None and not grid:
            raise UserError("--sampler grid: nothing is searched; give a dimension a list or a range")
        return optuna.samplers.GridSampler(grid or {"freeze_depth": [0]}, seed=seed)
    raise unknown("sampler", name, ["tpe", "random", "grid"], "--sampler")


def make_pruner(name: str) -> Any:
    """Optuna's pruner for ``--pruner``: ``median``, ``hyperband`` or ``none``.

    Raises:
        UserError: Unknown name.
    """
    import optuna

    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise unknown("pruner", name, ["median", "hyperband", "none"], "--pruner")


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (database drivers add paragraphs)."""
    return (str(exc).strip().splitlines() or [""])[0]


def make_storage(url: str) -> Any:
    """The Optuna storage for ``--storage``: an RDB URL (``sqlite:///``, ``postgresql://``, ...), or
    ``journal://PATH`` for Optuna's journal file storage (several processes, one file); both with a
    heartbeat that fails and retries the trials of dead workers (see :mod:`tlengine._resume`).

    Raises:
        UserError: A journal path whose folder does not exist.
    """
    from tlengine._resume import journal_storage, rdb_storage

    if not url.startswith("journal://"):
        return rdb_storage(url)
    path = Path(url.removeprefix("journal://"))
    if not path.parent.is_dir():
        raise UserError(f"--storage {url}: folder {path.parent} does not exist")
    return journal_storage(str(path))


def default_storage(run_dir: Path, workers: int = 1) -> str:
    """The storage of a run folder when ``--storage`` is not given: its SQLite database, or its
    journal file when it has one or when several workers will share it."""
    journal = run_dir / "study.journal"
    if not (run_dir / "study.db").is_file() and (journal.is_file() or workers > 1):
        return f"journal://{journal.resolve()}"
    return f"sqlite:///{(run_dir / 'study.db').resolve()}"


def study_storage(storage: str | None, runs: str, study_name: str) -> str:
    """``--storage`` as given, or the storage in ``RUNS/STUDY/`` for commands that read a study.

    Raises:
        UserError: No ``--storage`` and no study in ``RUNS/STUDY/``.
    """
    if storage:
        return storage
    run_dir = Path(runs) / study_name
    if not (run_dir / "study.db").is_file() and not (run_dir / "study.journal").is_file():
        raise UserError(f"--study-name {study_name}: no study database at {run_dir}; pass --storage")
    return default_storage(run_dir)


def open_study(
    storage: str, study_name: str, directions: list[str], sampler: Any, pruner: Any, study_config: dict[str, Any]
) -> tuple[Any, bool]:
    """Create the study, or load it and check that it was made for the same objective.

    Returns:
        ``(study, created)``: ``created`` is true for the one worker that made the study
        (it enqueues the opening recipes, so several workers starting together enqueue them once).

    Raises:
        UserError: The storage cannot be opened, or the study was made with other options.
    """
    import optuna

    storage_object = None
    try:
        storage_object = make_storage(storage)
        try:
            study = optuna.create_study(study_name=study_name, storage=storage_object, directions=directions, sampler=sampler, pruner=pruner)
            created = True
        except optuna.exceptions.DuplicatedStudyError:
            study = optuna.load_study(study_name=study_name, storage=storage_object, sampler=sampler, pruner=pruner)
            created = False
    except UserError:
        raise
    except (ValueError, ImportError) as exc:
        raise UserError(f"--storage {storage}: cannot open it ({first_line(exc)})") from exc
    except Exception as exc:  # database drivers raise their own types
        raise UserError(f"--storage {storage}: cannot open it ({type(exc).__name__}: {first_line(exc)})") from exc
    saved = study.user_attrs.get("tlengine")
    if created or saved is None:  # saved is None: the creator is a moment behind, or an empty study
        study.set_user_attr("tlengine", study_config)
        return study, created
    existing = [d.name.lower() for d in study.directions]
    if existing != directions:
        have, want = " and ".join(f"{d}s" for d in existing), " and ".join(f"{d}s" for d in directions)
        raise UserError(f"--study-name {study_name}: the study {have}, not {want}; choose another --study-name")
    for key in OBJECTIVE_KEYS:
        if saved.get(key) != study_config.get(key):
            if key == "space":
                changed = sorted(k for k in set(saved["space"]) | set(study_config["space"]) if saved["space"].get(k) != study_config["space"].get(k))
                raise UserError(
                    f"--study-name {study_name}: this study searched another space ({', '.join(changed)} differ); "
                    "rerun with the same config or choose another --study-name"
                )
            raise UserError(
                f"--study-name {study_name}: this study was made with {key}={saved.get(key)!r}, "
                f"not {study_config.get(key)!r}; rerun with the same options or choose another --study-name"
            )
    return study, False


def trial_rows(study: Any) -> list[TrialRow]:
    """The study's trials (enqueued ones not yet run are left out), for tables and summaries."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        if t.state == t.state.WAITING or t.user_attrs.get("surplus"):  # not run yet; or asked for after the study was full
            continue
        duration = t.duration.total_seconds() if t.duration is not None else None
        rows.append(
            TrialRow(
                number=t.number,
                state=t.state.name,
                params=dict(t.params),
                value=t.values[0] if t.values else None,
                cost=t.values[1] if t.values and len(t.values) > 1 else None,
                duration_s=duration,
                epochs_run=len(t.intermediate_values) or len(t.user_attrs.get("history", ())),
                recipe=t.user_attrs.get("recipe"),
                values=t.user_attrs.get("values"),
            )
        )
    return rows


def load_study(storage: str, study_name: str) -> Any:
    """Open an existing tlengine study.

    Raises:
        UserError: The storage cannot be opened, the study does not exist, or it was not made by tlengine.
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        storage_object = make_storage(storage)
        names = optuna.get_all_study_names(storage_object)
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"--storage {storage}: cannot open it ({type(exc).__name__}: {first_line(exc)})") from exc
    if study_name not in names:
        raise UserError(f"--study-name {study_name}: no such study in {storage}; it has: {', '.join(names) or 'none'}")
    study = optuna.load_study(study_name=study_name, storage=storage_object)
    if "tlengine" not in study.user_attrs:
        raise UserError(f"--study-name {study_name}: not a tlengine study")
    return study


def pick_trial(study: Any, which: str) -> Any:
    """The study's best trial (``which == "best"``) or trial number ``which``, which must be complete.

    Raises:
        UserError: No such trial, or it did not complete.
    """
    import optuna

    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not complete:
        raise UserError(f"study {study.study_name}: no trial has completed yet")
    if which == "best":
        if len(study.directions) == 1:
            return study.best_trial
        # multi-objective: the Pareto-optimal trial with the best metric
        sign = 1 if study.directions[0].name == "MAXIMIZE" else -1
        return max(study.best_trials, key=lambda t: sign * t.values[0])
    numbers = {t.number: t for t in complete}
    try:
        number = int(which)
    except ValueError:
        raise UserError(f"--trial {which}: expected a trial number or 'best'") from None
    if number not in numbers:
        listing = ", ".join(str(n) for n in sorted(numbers))
        raise UserError(f"--trial {number}: not a completed trial of study {study.study_name}; completed: {listing}")
    return numbers[number]


def study_data(registry: Registry, config: dict[str, Any]) -> ImageData:
    """Load a study's data again, with the dataset plugin and options its config names.

    Raises:
        UserError: The dataset plugin is not installed, or it cannot read the data any more.
    """
    if config["dataset"] not in registry.datasets:
        raise UserError(f"the study's dataset plugin {config['dataset']!r} is not installed")
    options = DatasetOptions(config["task"], config.get("val_fraction", 0.2), config.get("seed", 0))
    return registry.datasets[config["dataset"]].factory(config["data"], options)


def export_study_trial(
    registry: Registry, study: Any, trial: Any, path: Path, *, data: ImageData | None = None, variant: str | None = None, opset: int = 18
) -> Any:
    """Export one finished trial of a study to ONNX, checked on the study's validation images.

    Args:
        registry: The plugin registry (to rebuild the model).
        study: The Optuna study.
        trial: One of its completed trials (with a checkpoint).
        path: Where the model goes.
        data: The study's data, if already loaded; else it is loaded again from the study's config.
        variant: ``None``, ``"fp16"``, ``"int8-static"`` or ``"int8-dynamic"``.
        opset: ONNX opset.
    """
    import random

    import numpy as np

    from tlengine._export import export_trial, trial_model

    config = study.user_attrs["tlengine"]
    if data is None:
        data = study_data(registry, config)
    values = trial.user_attrs.get("values", trial.params)
    preprocess = Preprocess.from_data_config(config["data_config"], values["image_size"])
    val_images = np.stack([preprocess(item) for item in data.val.images])
    dtype = np.int64 if config["task"] == "classification" else np.float32
    val_targets = np.asarray(list(data.val.targets), dtype=dtype)
    calibration = None
    if variant == "int8-static":
        picks = random.Random(0).sample(range(len(data.train)), min(128, len(data.train)))
        calibration = np.stack([preprocess(data.train.images[i]) for i in picks])
    model = trial_model(registry, config, values, Path(trial.user_attrs.get("checkpoint", "")))
    metadata = {
        "labels": config["classes"],
        "task": config["task"],
        "preprocess": preprocess.to_dict(),
        "backbone": f"{config['backbone']}:{config['arch']}" if config["arch"] else config["backbone"],
        "head": values["head"],
        "params": trial.params,
        "values": values,
        "metric": config["metric"],
        "metric_value": trial.values[0],
        "study_name": study.study_name,
        "trial_number": trial.number,
        "tlengine_version": version(),
    }
    return export_trial(model, path, metadata, val_images, val_targets, variant=variant, calibration=calibration, opset=opset)


def version() -> str:
    """tlengine's version."""
    from tlengine import __version__

    return __version__
