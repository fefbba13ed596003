"""``tlengine search``: an Optuna study over freeze depth and learning rate."""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tlengine._errors import UserError, did_you_mean, unknown
from tlengine._preprocess import Preprocess
from tlengine._records import Backbone, Dataset, DatasetOptions, ImageData
from tlengine.plugins import Registry, get_registry

DEFAULT_BACKBONE = "timm:tf_efficientnet_lite0"
DEFAULT_TRIALS = 20
DEFAULT_EPOCHS = 5
#: Config keys that define the objective: a study resumed with other values is refused.
OBJECTIVE_KEYS = (
    "backbone", "arch", "weights", "head", "optimizer", "task", "classes", "image_size", "epochs", "batch_size",
    "dataset", "data", "val_fraction",
)


@dataclass(frozen=True)
class SearchConfig:
    """Everything ``tlengine search`` was asked to do (``None``: a default applies)."""

    data: str | None = None
    dataset: str = "auto"
    task: str | None = None
    val_fraction: float = 0.2
    backbone: str = DEFAULT_BACKBONE
    weights: str = "auto"
    head: str = "linear"
    optimizer: str = "adamw"
    trials: int | None = None
    timeout: float | None = None
    epochs: int | None = None
    image_size: int | None = None
    batch_size: int = 32
    weight_decay: float = 0.01
    seed: int = 0
    device: str = "auto"
    out: str = "runs"
    study_name: str | None = None
    storage: str | None = None
    sampler: str = "tpe"
    pruner: str = "median"
    max_bad_images: float = 0.01
    confine_paths: bool = False


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


@dataclass(frozen=True)
class SearchResult:
    """What a search produced."""

    study_name: str
    storage: str
    run_dir: Path
    metric: str
    direction: str
    rows: list[TrialRow]
    best: TrialRow | None
    onnx_path: Path | None = None
    parity: dict[str, Any] | None = None
    config: dict[str, Any] = field(default_factory=dict)


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


def _first_line(exc: BaseException) -> str:
    """The first line of an exception's message (database drivers add paragraphs)."""
    return (str(exc).strip().splitlines() or [""])[0]


def _storage_url(config: SearchConfig, run_dir: Path) -> str:
    if config.storage:
        return config.storage
    return f"sqlite:///{(run_dir / 'study.db').resolve()}"


def _sampler(name: str, seed: int) -> Any:
    import optuna

    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=5)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise unknown("sampler", name, ["tpe", "random"], "--sampler")


def _pruner(name: str) -> Any:
    import optuna

    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise unknown("pruner", name, ["median", "hyperband", "none"], "--pruner")


def _open_study(config: SearchConfig, storage: str, study_name: str, direction: str, study_config: dict[str, Any]) -> Any:
    import optuna

    try:
        study = optuna.create_study(
            study_name=study_name,
            storage=storage,
            direction=direction,
            sampler=_sampler(config.sampler, config.seed),
            pruner=_pruner(config.pruner),
            load_if_exists=True,
        )
    except UserError:
        raise
    except (ValueError, ImportError) as exc:
        raise UserError(f"--storage {storage}: cannot open it ({_first_line(exc)})") from exc
    except Exception as exc:  # database drivers raise their own types
        raise UserError(f"--storage {storage}: cannot open it ({type(exc).__name__}: {_first_line(exc)})") from exc
    saved = study.user_attrs.get("tlengine")
    if saved is None:
        study.set_user_attr("tlengine", study_config)
    else:
        for key in OBJECTIVE_KEYS:
            if saved.get(key) != study_config.get(key):
                raise UserError(
                    f"--study-name {study_name}: this study was made with {key}={saved.get(key)!r}, "
                    f"not {study_config.get(key)!r}; rerun with the same options or choose another --study-name"
                )
        if study.direction.name.lower() != direction:
            raise UserError(f"--study-name {study_name}: the study's direction is not {direction}")
    return study


def _rows(study: Any) -> list[TrialRow]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        if t.state == t.state.WAITING:  # an enqueued recipe not run yet
            continue
        duration = t.duration.total_seconds() if t.duration is not None else None
        rows.append(
            TrialRow(
                number=t.number,
                state=t.state.name,
                params=dict(t.params),
                value=t.value if t.values is not None else None,
                duration_s=duration,
                epochs_run=len(t.intermediate_values),
                recipe=t.user_attrs.get("recipe"),
            )
        )
    return rows


def run_search(config: SearchConfig, console: Any) -> SearchResult:
    """Run (or resume) a search and export its best trial.

    Args:
        config: The options.
        console: A ``rich.console.Console`` for progress and messages.

    Raises:
        UserError: For any mistake in the options or the data.
    """
    import copy

    import optuna
    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from safetensors.torch import save_model

    from tlengine._model import build_model
    from tlengine._stages import backbone_stages, freeze_stages
    from tlengine._train import EpochResult, eval_tensors, fit, loader, make_dataset, resolve_device, train_transform

    for option, value in (("--trials", config.trials), ("--epochs", config.epochs), ("--batch-size", config.batch_size), ("--image-size", config.image_size)):
        if value is not None and value < 1:
            raise UserError(f"{option} {value}: must be a positive integer")
    if config.timeout is not None and config.timeout <= 0:
        raise UserError(f"--timeout {config.timeout}: must be a positive number of seconds")
    if config.max_bad_images < 0:
        raise UserError(f"--max-bad-images {config.max_bad_images:g}: must be a fraction (below 1) or a count, not negative")
    if not 0.0 < config.val_fraction < 1.0:
        raise UserError(f"--val-fraction {config.val_fraction}: must be between 0 and 1")
    if config.task not in (None, "classification", "regression"):
        raise UserError(f"--task {config.task}: expected classification or regression")

    registry = get_registry()
    backbone_record, arch = resolve_backbone(registry, config.backbone)
    if config.head not in registry.heads:
        raise unknown("head", config.head, registry.heads, "--head")
    if config.optimizer not in registry.optimizers:
        raise unknown("optimizer", config.optimizer, registry.optimizers, "--optimizer")
    head_record = registry.heads[config.head]
    opt_record = registry.optimizers[config.optimizer]
    dataset_record = resolve_dataset(registry, config.dataset, config.data)
    _sampler(config.sampler, config.seed), _pruner(config.pruner)
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)

    with console.status("loading data and backbone"):
        options = DatasetOptions(config.task, config.val_fraction, config.seed, config.confine_paths)
        data = dataset_record.factory(config.data, options)
        warn = lambda line: console.print(line, soft_wrap=True, markup=False, highlight=False)  # noqa: E731
        data = drop_unreadable(data, config.max_bad_images, warn)
        check_data(data, config.data or dataset_record.name)
        base = backbone_record.factory(arch, config.weights)
    suggested = dataset_record.suggested
    from timm.data import resolve_data_config

    data_config = resolve_data_config(model=base)
    image_size = config.image_size or suggested.get("image_size") or data_config["input_size"][-1]
    epochs = config.epochs or suggested.get("epochs") or DEFAULT_EPOCHS
    n_trials = config.trials or suggested.get("trials") or DEFAULT_TRIALS
    preprocess = Preprocess.from_data_config(data_config, image_size)
    stages = backbone_stages(base)
    if not stages:
        raise UserError(f"--backbone {config.backbone}: the backbone has no parameters")
    try:
        with torch.inference_mode():
            base.eval()(torch.zeros(1, 3, image_size, image_size))
    except Exception as exc:
        raise UserError(f"--image-size {image_size}: the backbone cannot take it ({type(exc).__name__}: {exc})") from exc

    classification = data.task == "classification"
    metric, direction = ("accuracy", "maximize") if classification else ("rmse", "minimize")
    targets = torch.tensor([float(t) for t in data.train.targets])
    target_mean = 0.0 if classification else float(targets.mean())
    target_std = 1.0 if classification else float(targets.std().clamp_min(1e-8)) if len(targets) > 1 else 1.0
    num_outputs = len(data.classes) if classification else 1

    study_name = config.study_name or f"{data.name}-{arch or backbone_record.name}"
    run_dir = Path(config.out) / study_name
    try:
        (run_dir / "trials").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--out {config.out}: cannot create {run_dir} ({exc.strerror}); choose a writable folder") from exc
    storage = _storage_url(config, run_dir)
    study_config = {
        "backbone": backbone_record.name,
        "arch": arch,
        "weights": config.weights,
        "head": config.head,
        "optimizer": config.optimizer,
        "task": data.task,
        "classes": list(data.classes),
        "image_size": image_size,
        "epochs": epochs,
        "batch_size": config.batch_size,
        "weight_decay": config.weight_decay,
        "stages": len(stages),
        "preprocess": preprocess.to_dict(),
        "target_mean": target_mean,
        "target_std": target_std,
        "metric": metric,
        "dataset": dataset_record.name,
        "data": str(Path(config.data).resolve()) if config.data and Path(config.data).exists() else config.data,
        "val_fraction": config.val_fraction,
        "seed": config.seed,
    }
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = _open_study(config, storage, study_name, direction, study_config)

    n_stages = len(stages)
    lo, hi = opt_record.lr_range
    done_states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    if not study.trials:
        # The recipes a user would try by hand run first, so the search never does worse.
        clamp = lambda lr: min(hi, max(lo, lr))  # noqa: E731
        for recipe, depth, lr in (
            ("linear probe", n_stages, clamp(opt_record.default_lr * 10)),
            ("full fine-tune", 0, clamp(opt_record.default_lr)),
            ("half frozen", n_stages // 2, clamp(opt_record.default_lr)),
        ):
            study.enqueue_trial({"freeze_depth": depth, "lr": lr}, user_attrs={"recipe": recipe})
    finished = sum(t.state in done_states for t in study.trials)
    remaining = max(0, n_trials - finished)

    train_set = make_dataset(data.train, train_transform(preprocess), data.task)
    val_loader = loader(eval_tensors(data.val, preprocess, data.task), config.batch_size * 2, False, device)
    base_state = copy.deepcopy(base.state_dict())
    if finished:
        console.print(f"resuming study [bold]{study_name}[/]: {finished} of {n_trials} trials already finished")
    console.print(
        f"searching {n_trials} trials of {epochs} epochs: {backbone_record.name}:{arch} ({n_stages} stages), "
        f"{len(data.train)} train / {len(data.val)} val images, {image_size}px, {device}"
    )

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        overall = progress.add_task("trials", total=remaining)

        def objective(trial: optuna.Trial) -> float:
            depth = trial.suggest_int("freeze_depth", 0, n_stages)
            lr = trial.suggest_float("lr", lo, hi, log=True)
            torch.manual_seed(config.seed + trial.number)
            backbone = backbone_record.factory(arch, "none")
            backbone.load_state_dict(base_state)
            freeze_stages(backbone, depth)
            head = head_record.factory(base.num_features, num_outputs, data.task)
            model = build_model(backbone, head, data.task, target_mean, target_std)
            optimizer = opt_record.factory(model, lr, config.weight_decay)
            train_loader = loader(train_set, config.batch_size, True, device, seed=config.seed + trial.number)
            steps = epochs * max(1, len(train_loader))
            label = f"trial {trial.number} · depth {depth}/{n_stages} · lr {lr:.1e}"
            task_id = progress.add_task(label, total=steps)

            def on_epoch(result: EpochResult) -> None:
                trial.report(result.score, result.epoch)
                progress.update(task_id, description=f"{label} · {metric} {result.score:.4f}")
                if trial.should_prune():
                    raise optuna.TrialPruned(f"pruned after epoch {result.epoch + 1}")

            try:
                history = fit(
                    model, optimizer, train_loader, val_loader, task=data.task, epochs=epochs, device=device,
                    on_step=lambda: progress.advance(task_id), on_epoch=on_epoch,
                )
            except FloatingPointError as exc:
                trial.set_user_attr("prune_reason", str(exc))
                console.print(f"trial {trial.number}: pruned, {exc} (depth {depth}/{n_stages}, lr {lr:.1e})")
                raise optuna.TrialPruned(str(exc)) from exc
            except optuna.TrialPruned as exc:
                trial.set_user_attr("prune_reason", str(exc))
                console.print(f"trial {trial.number}: {exc} (depth {depth}/{n_stages}, lr {lr:.1e})")
                raise
            finally:
                progress.remove_task(task_id)
                progress.advance(overall)
            checkpoint = run_dir / "trials" / f"{trial.number}.safetensors"
            try:
                save_model(model.cpu(), str(checkpoint))
            except OSError as exc:
                checkpoint.unlink(missing_ok=True)
                raise UserError(
                    f"{checkpoint}: cannot write the checkpoint ({exc.strerror or exc}); finished trials are kept, "
                    "free some space and run the same command again to resume"
                ) from exc
            trial.set_user_attr("checkpoint", str(checkpoint.resolve()))
            trial.set_user_attr("history", [asdict(h) for h in history])
            console.print(f"trial {trial.number}: {metric} {history[-1].score:.4f} (depth {depth}/{n_stages}, lr {lr:.1e})")
            return history[-1].score

        if remaining:
            study.optimize(
                objective,
                n_trials=remaining,
                timeout=config.timeout,
                callbacks=[optuna.study.MaxTrialsCallback(n_trials, states=done_states)],
            )

    rows = _rows(study)
    completed = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))]
    result = SearchResult(study_name, storage, run_dir, metric, direction, rows, None, config=study_config)
    if not completed:
        _write_summary(result)
        return result
    best_trial = study.best_trial
    best = next(r for r in rows if r.number == best_trial.number)
    checkpoint = Path(best_trial.user_attrs.get("checkpoint", ""))
    if not checkpoint.is_file():
        console.print(f"[yellow]warning:[/] the best trial's checkpoint {checkpoint} is not on this machine; not exporting")
        result = SearchResult(**{**result.__dict__, "best": best})
        _write_summary(result)
        return result

    with console.status("exporting the best trial to ONNX and checking it with onnxruntime"):
        shutil.copyfile(checkpoint, run_dir / "best.safetensors")
        onnx_path = run_dir / "best.onnx"
        report = export_study_trial(registry, study, best_trial, onnx_path, data=data)
        parity = report.parity
    result = SearchResult(**{**result.__dict__, "best": best, "onnx_path": onnx_path, "parity": asdict(parity)})
    _write_summary(result)
    return result


def load_study(storage: str, study_name: str) -> Any:
    """Open an existing tlengine study.

    Raises:
        UserError: The storage cannot be opened, the study does not exist, or it was not made by tlengine.
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        names = optuna.get_all_study_names(storage)
    except Exception as exc:
        raise UserError(f"--storage {storage}: cannot open it ({type(exc).__name__}: {_first_line(exc)})") from exc
    if study_name not in names:
        raise UserError(f"--study-name {study_name}: no such study in {storage}; it has: {', '.join(names) or 'none'}")
    study = optuna.load_study(study_name=study_name, storage=storage)
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
        return study.best_trial
    numbers = {t.number: t for t in complete}
    try:
        number = int(which)
    except ValueError:
        raise UserError(f"--trial {which}: expected a trial number or 'best'") from None
    if number not in numbers:
        listing = ", ".join(str(n) for n in sorted(numbers))
        raise UserError(f"--trial {number}: not a completed trial of study {study.study_name}; completed: {listing}")
    return numbers[number]


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
        if config["dataset"] not in registry.datasets:
            raise UserError(f"the study's dataset plugin {config['dataset']!r} is not installed")
        options = DatasetOptions(config["task"], config.get("val_fraction", 0.2), config.get("seed", 0))
        data = registry.datasets[config["dataset"]].factory(config["data"], options)
    preprocess = Preprocess.from_dict(config["preprocess"])
    val_images = np.stack([preprocess(item) for item in data.val.images])
    dtype = np.int64 if config["task"] == "classification" else np.float32
    val_targets = np.asarray(list(data.val.targets), dtype=dtype)
    calibration = None
    if variant == "int8-static":
        picks = random.Random(0).sample(range(len(data.train)), min(128, len(data.train)))
        calibration = np.stack([preprocess(data.train.images[i]) for i in picks])
    model = trial_model(registry, config, Path(trial.user_attrs.get("checkpoint", "")))
    metadata = {
        "labels": config["classes"],
        "task": config["task"],
        "preprocess": config["preprocess"],
        "backbone": f"{config['backbone']}:{config['arch']}" if config["arch"] else config["backbone"],
        "head": config["head"],
        "params": trial.params,
        "metric": config["metric"],
        "metric_value": trial.value,
        "study_name": study.study_name,
        "trial_number": trial.number,
        "tlengine_version": _version(),
    }
    return export_trial(model, path, metadata, val_images, val_targets, variant=variant, calibration=calibration, opset=opset)


def _version() -> str:
    from tlengine import __version__

    return __version__


def _write_summary(result: SearchResult) -> None:
    summary = {
        "study_name": result.study_name,
        "storage": result.storage,
        "metric": result.metric,
        "direction": result.direction,
        "best": asdict(result.best) if result.best else None,
        "onnx": str(result.onnx_path) if result.onnx_path else None,
        "parity": result.parity,
        "config": result.config,
        "trials": [asdict(r) for r in result.rows],
    }
    (result.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
