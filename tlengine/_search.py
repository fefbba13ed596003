"""``tlengine search``: an Optuna study over freeze depth, learning rate and the rest of the space."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tlengine._errors import UserError, unknown
from tlengine._preprocess import Preprocess
from tlengine._records import DatasetOptions
from tlengine._study import (
    TrialRow,
    check_data,
    default_storage,
    drop_unreadable,
    export_study_trial,
    first_line,
    make_pruner,
    make_sampler,
    open_study,
    pick_trial,
    resolve_backbone,
    resolve_dataset,
    trial_rows,
)
from tlengine.plugins import get_registry

DEFAULT_BACKBONE = "timm:tf_efficientnet_lite0"
DEFAULT_TRIALS = 20
DEFAULT_EPOCHS = 5


@dataclass(frozen=True)
class SearchConfig:
    """Everything ``tlengine search`` was asked to do (``None``: the config file or a default decides).

    Attributes:
        params: ``(name, value, option)`` overrides of the search space from
            ``--param NAME=VALUE`` and the dedicated flags (``--head``,
            ``--optimizer``, ``--batch-size``, ``--weight-decay``); ``option``
            names the flag in messages.
        cache: Decode images once and cache frozen-prefix features (``--no-cache``: off);
            ``cache_dir``, ``cache_size_gb`` and ``cache_views`` as in :class:`tlengine._cache.CacheOptions`.
        early_size: Train and validate the first ``early_epochs`` epochs of every trial at this
            side in pixels (trials whose image size is not larger keep theirs): cheaper early
            pruning rungs. ``None``: every epoch at the trial's image size.
    """

    data: str | None = None
    dataset: str = "auto"
    task: str | None = None
    val_fraction: float = 0.2
    backbone: str = DEFAULT_BACKBONE
    weights: str = "auto"
    config: str | None = None
    params: tuple[tuple[str, Any, str], ...] = ()
    trials: int | None = None
    timeout: float | None = None
    epochs: int | None = None
    image_size: int | None = None
    metric: str | None = None
    objectives: tuple[str, ...] | None = None
    class_weights: bool | None = None
    sampler: str | None = None
    pruner: str | None = None
    seed: int = 0
    device: str = "auto"
    out: str = "runs"
    study_name: str | None = None
    storage: str | None = None
    max_bad_images: float = 0.01
    confine_paths: bool = False
    cache: bool = True
    cache_dir: str | None = None
    cache_size_gb: float = 4.0
    cache_views: int | None = None
    early_size: int | None = None
    early_epochs: int = 1
    workers: int = 1
    devices: tuple[str, ...] | None = None
    worker: int | None = None
    argv: tuple[str, ...] = ()


class SearchInterrupted(Exception):
    """Ctrl-C stopped the search after checkpointing; the message says how far it got."""


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
    searched: tuple[str, ...] = ()
    objectives: tuple[str, ...] = ()
    pareto: tuple[int, ...] = ()
    onnx_path: Path | None = None
    parity: dict[str, Any] | None = None
    config: dict[str, Any] = field(default_factory=dict)


def parameter_count(model: Any, size: int) -> float:
    """Millions of parameters of ``model`` (the ``params`` objective)."""
    return sum(p.numel() for p in model.parameters()) / 1e6


def onnx_latency(model: Any, size: int) -> float:
    """Median onnxruntime CPU latency of ``model`` at batch 1, in ms (the ``latency`` objective).

    The model is exported to a temporary ONNX file exactly as ``tlengine export`` would.
    """
    import tempfile

    import torch

    from tlengine._export import _torch_export, latency_ms
    from tlengine._model import inference_model

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.onnx"
        _torch_export(inference_model(model.cpu()), torch.zeros(2, 3, size, size), path, 18, external_data=False)
        return latency_ms(path, torch.zeros(1, 3, size, size).numpy())


#: Second objectives of a multi-objective search, minimised.
COSTS = {"latency": onnx_latency, "params": parameter_count}


def seed_everything(seed: int) -> None:
    """Seed torch, numpy and Python's ``random`` (timm's random resized crop draws from the latter)."""
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _unwritable(path: Path, exc: OSError) -> UserError:
    """The one-line error for a checkpoint that could not be written (the trial is marked for resumption)."""
    return UserError(f"{path}: cannot write the checkpoint ({exc.strerror or exc}); finished trials are kept, "
                     "free some space and run the same command again to resume")


class _Surplus(Exception):
    """A worker asked for a trial after the others had already taken the study's last ones."""


def _keep_for_resume(study: Any, number: int | None, always: bool) -> None:
    """After a trial stopped unfinished (Ctrl-C, a full disk), enqueue its retry, which resumes from its checkpoint."""
    from optuna.trial import TrialState

    from tlengine._resume import fail_and_retry, retry

    if number is None:
        return
    trial = study._storage.get_trial(study._storage.get_trial_id_from_study_id_trial_number(study._study_id, number))
    if trial.state == TrialState.RUNNING:
        fail_and_retry(study, number, "stopped")
    elif trial.state == TrialState.FAIL and (always or "resumable" in trial.user_attrs):
        retry(study, number)


def _without(argv: tuple[str, ...], options: tuple[str, ...]) -> list[str]:
    """``argv`` without the given options and their values (``--opt V`` and ``--opt=V``)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in options:
            skip = True
        elif not arg.startswith(tuple(f"{o}=" for o in options)):
            out.append(arg)
    return out


def _run_workers(config: SearchConfig, study: Any, storage: str, study_name: str, workers: int, n_trials: int,
                 remaining: int, console: Any) -> None:
    """Run ``workers`` copies of this search as processes on this machine (one per ``--devices`` entry on CUDA),
    sharing the study through its storage; show their combined progress and wait for them.

    Each worker is ``tlengine search`` with the same options: Optuna's storage hands out
    the trials, so nothing here schedules anything.

    Raises:
        SearchInterrupted: Ctrl-C (forwarded to every worker, which checkpoints its trial).
        UserError: A worker failed.
    """
    import os
    import signal
    import subprocess
    import sys
    import threading
    import time

    import optuna
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from tlengine._resume import catch_interrupts

    argv = _without(config.argv, ("--workers", "--devices", "--storage", "--study-name"))
    threads = max(1, (os.cpu_count() or 1) // workers)
    procs: list[subprocess.Popen] = []
    for i in range(workers):
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        command = [sys.executable, "-m", "tlengine", *argv, "--storage", storage, "--study-name", study_name, "--worker", str(i)]
        if config.devices:
            env["CUDA_VISIBLE_DEVICES"] = config.devices[i]
            command += ["--device", "cuda"]
        else:
            env["OMP_NUM_THREADS"] = str(threads)
        # A session of its own: one Ctrl-C reaches each worker once, forwarded from here.
        procs.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      start_new_session=True))
    console.print(f"started {workers} workers on study [bold]{study_name}[/] ({storage})")
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    done_states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    with Progress(*columns, console=console, transient=False) as progress:
        def relay(proc: subprocess.Popen) -> None:
            for line in proc.stdout:
                progress.console.print(line.rstrip(), markup=False, highlight=False, soft_wrap=True)

        relays = [threading.Thread(target=relay, args=(p,), daemon=True) for p in procs]
        for thread in relays:
            thread.start()
        task = progress.add_task(f"trials ({workers} workers)", total=remaining)
        forward = lambda: [p.send_signal(signal.SIGINT) for p in procs if p.poll() is None]  # noqa: E731
        with catch_interrupts(forward) as stop:
            try:
                while any(p.poll() is None for p in procs):
                    finished = len(study.get_trials(deepcopy=False, states=done_states))
                    progress.update(task, completed=max(0, finished - (n_trials - remaining)))
                    time.sleep(1)
            except KeyboardInterrupt:
                for p in procs:
                    if p.poll() is None:
                        p.send_signal(signal.SIGINT)
                for p in procs:
                    p.wait()
                raise SearchInterrupted("workers stopped at once; their running trials resume from their last epochs") from None
            for thread in relays:
                thread.join()
    codes = [p.returncode for p in procs]
    if stop() or 130 in codes:
        raise SearchInterrupted("each worker saved its trial's checkpoint")
    failed = [(i, code) for i, code in enumerate(codes) if code != 0]
    if failed:
        i, code = failed[0]
        raise UserError(f"--workers {workers}: worker {i} stopped with exit code {code} (its message is above); "
                        "finished trials are kept, run the same command again to resume")


def _check_numbers(config: SearchConfig, options: dict[str, Any]) -> None:
    for option in ("trials", "epochs", "image_size"):
        value = options.get(option)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise UserError(f"--{option.replace('_', '-')} {value}: must be a positive integer")
    timeout = options.get("timeout")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0):
        raise UserError(f"--timeout {timeout}: must be a positive number of seconds")
    for name, value, option in config.params:
        if option in ("--batch-size", "--weight-decay") and value < (1 if name == "batch_size" else 0):
            raise UserError(f"{option} {value}: must be a {'positive integer' if name == 'batch_size' else 'zero or positive number'}")
    if config.max_bad_images < 0:
        raise UserError(f"--max-bad-images {config.max_bad_images:g}: must be a fraction (below 1) or a count, not negative")
    if not 0.0 < config.val_fraction < 1.0:
        raise UserError(f"--val-fraction {config.val_fraction}: must be between 0 and 1")
    if config.task not in (None, "classification", "regression"):
        raise UserError(f"--task {config.task}: expected classification or regression")
    if config.workers < 1:
        raise UserError(f"--workers {config.workers}: must be a positive integer")
    if config.early_size is not None and config.early_size < 16:
        raise UserError(f"--early-size {config.early_size}: must be at least 16 pixels")
    if config.early_epochs < 1:
        raise UserError(f"--early-epochs {config.early_epochs}: must be a positive integer")
    from tlengine._cache import CacheOptions

    CacheOptions(config.cache, config.cache_dir, config.cache_size_gb, config.cache_views).check()


def _recipes(space: dict[str, Any], n_stages: int, epochs: int, default_lr: float) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """The recipes a user would try by hand, as (name, enqueued params, overrides of default-fixed values).

    Linear probe; full fine-tuning; and training the head first, then unfreezing
    everything with a lower learning rate for earlier layers (layer decay 0.7).
    """
    recipes = [
        ("linear probe", {"freeze_depth": n_stages, "lr": default_lr * 10, "layer_decay": 1.0, "label_smoothing": 0.0, "head_epochs": 0}),
        ("full fine-tune", {"freeze_depth": 0, "lr": default_lr, "layer_decay": 1.0, "label_smoothing": 0.0, "head_epochs": 0}),
        ("head first, then unfreeze", {"freeze_depth": 0, "lr": default_lr, "layer_decay": 0.7, "label_smoothing": 0.0,
                                       "head_epochs": max(1, epochs // 3) if epochs > 1 else 0}),
    ]
    out = []
    for name, values in recipes:
        params, overrides = {}, {}
        for key, value in values.items():
            dim = space[key]
            if dim.searched:
                if dim.kind in ("int", "float"):
                    value = min(dim.high, max(dim.low, value))
                if dim.contains(value):
                    params[key] = value
            elif dim.source == "default":
                overrides[key] = value
        out.append((name, params, overrides))
    return out


def run_search(config: SearchConfig, console: Any) -> SearchResult:
    """Run (or resume) a search and export its best trial.

    Args:
        config: The options.
        console: A ``rich.console.Console`` for progress and messages.

    Raises:
        UserError: For any mistake in the options, the config file or the data.
    """
    from tlengine._metrics import METRICS, check_metric
    from tlengine._space import build_space, read_config

    file_config = read_config(config.config)
    cli = {"trials": config.trials, "epochs": config.epochs, "image_size": config.image_size, "timeout": config.timeout,
           "sampler": config.sampler, "pruner": config.pruner, "metric": config.metric, "class_weights": config.class_weights,
           "objectives": list(config.objectives) if config.objectives else None}
    options = {**file_config["search"], **{k: v for k, v in cli.items() if v is not None}}
    _check_numbers(config, options)
    where = f"--config {config.config}"

    registry = get_registry()
    backbone_record, arch = resolve_backbone(registry, config.backbone)
    for name, value, option in config.params:
        known = {"head": registry.heads, "optimizer": registry.optimizers}.get(name)
        for choice in (value if isinstance(value, list) else [value]) if known is not None else []:
            if choice != "search" and choice not in known:
                raise unknown(name, str(choice), known, option)
    dataset_record = resolve_dataset(registry, config.dataset, config.data)
    sampler_name, pruner_name = options.get("sampler", "tpe"), options.get("pruner", "median")
    make_sampler(sampler_name, config.seed, {}) if sampler_name != "grid" else None
    pruner = make_pruner(pruner_name)

    import optuna
    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from safetensors.torch import save_model
    from timm.data import resolve_data_config

    from tlengine._cache import image_train_loader
    from tlengine._model import build_model, feature_width
    from tlengine._resume import catch_interrupts, load_checkpoint, recover_dead_workers, retried_from, save_checkpoint, worker_identity
    from tlengine._stages import backbone_stages, freeze_stages
    from tlengine._train import (
        EpochResult, OutOfMemory, PhasedLoader, TrialInterrupted, TrainPlan, eval_tensors, fit, loader, param_groups, resolve_device,
    )

    device = resolve_device(config.device)
    if config.devices and config.worker is None and not torch.cuda.is_available():
        raise UserError(f"--devices {','.join(config.devices)}: CUDA is not available on this machine; use --workers N to run several workers on the CPU")
    torch.manual_seed(config.seed)
    with console.status("loading data and backbone"):
        dataset_options = DatasetOptions(config.task, config.val_fraction, config.seed, config.confine_paths)
        data = dataset_record.factory(config.data, dataset_options)
        warn = lambda line: console.print(line, soft_wrap=True, markup=False, highlight=False)  # noqa: E731
        data = drop_unreadable(data, config.max_bad_images, warn)
        check_data(data, config.data or dataset_record.name)
        base = backbone_record.factory(arch, config.weights)
    objectives = options.get("objectives")
    if objectives is not None:
        if not isinstance(objectives, list) or len(objectives) != 2 or objectives[1] not in COSTS:
            raise UserError(f"--objectives {objectives}: expected METRIC,latency or METRIC,params (e.g. accuracy,latency)")
        if options.get("metric") not in (None, objectives[0]):
            raise UserError(f"--objectives {','.join(objectives)}: the first objective is the metric; it differs from --metric {options['metric']}")
        options["metric"] = objectives[0]
    metric = check_metric(options.get("metric"), data.task)
    direction = METRICS[metric][1]
    directions = [direction, "minimize"] if objectives else [direction]
    suggested = dataset_record.suggested
    data_config = resolve_data_config(model=base)
    image_size = options.get("image_size") or suggested.get("image_size") or data_config["input_size"][-1]
    epochs = options.get("epochs") or suggested.get("epochs") or DEFAULT_EPOCHS
    if config.early_size is not None and config.early_epochs >= epochs:
        raise UserError(f"--early-epochs {config.early_epochs}: must be fewer than the {epochs} epochs per trial (--epochs), "
                        "so that every trial ends at its own image size")
    n_trials = options.get("trials") or suggested.get("trials") or DEFAULT_TRIALS
    stages = backbone_stages(base)
    if not stages:
        raise UserError(f"--backbone {config.backbone}: the backbone has no parameters")
    n_stages = len(stages)
    caches = None
    if config.cache:
        from tlengine._cache import CacheOptions, SearchCaches

        caches = SearchCaches(CacheOptions(True, config.cache_dir, config.cache_size_gb, config.cache_views), data, base,
                              f"{backbone_record.name}:{arch}", stages, device, warn)
    plugin_params = {r.name: dict(r.params) for r in [*registry.heads.values(), *registry.optimizers.values()] if r.params}
    overrides = {name: (value, option) for name, value, option in config.params}
    if config.image_size is not None:
        overrides["image_size"] = (config.image_size, "--image-size")
    space = build_space(
        file_config["space"], overrides, plugin_params, n_stages=n_stages,
        lr_ranges={name: r.lr_range for name, r in registry.optimizers.items()}, heads=list(registry.heads),
        task=data.task, where=where, image_size=image_size,
    )
    size_dim = space["image_size"]
    sizes = [size_dim.value] if not size_dim.searched else list(size_dim.choices) if size_dim.kind == "categorical" else [size_dim.low, size_dim.high]
    probes = [(int(size), "--image-size") for size in sizes]
    if config.early_size is not None and any(config.early_size < size for size, _ in probes):
        probes.append((config.early_size, "--early-size"))
    for size, option in probes:
        try:
            with torch.inference_mode():
                base.eval()(torch.zeros(1, 3, size, size))
        except Exception as exc:
            raise UserError(f"{option} {size}: the backbone cannot take it ({type(exc).__name__}: {first_line(exc)})") from exc
    data_config = {k: data_config[k] for k in ("mean", "std", "interpolation", "crop_pct")}
    searched = tuple(name for name, dim in space.items() if dim.searched)
    grid = {name: space[name].grid() for name in searched} if sampler_name == "grid" else None
    sampler = make_sampler(sampler_name, config.seed, grid)

    classification = data.task == "classification"
    targets = torch.tensor([float(t) for t in data.train.targets])
    target_mean = 0.0 if classification else float(targets.mean())
    target_std = 1.0 if classification or len(targets) < 2 else float(targets.std().clamp_min(1e-8))
    num_outputs = len(data.classes) if classification else 1
    class_weights = None
    if options.get("class_weights") and classification:
        counts = torch.bincount(torch.tensor(list(data.train.targets)), minlength=num_outputs).clamp_min(1).double()
        class_weights = tuple((counts.sum() / (num_outputs * counts)).tolist())

    study_name = config.study_name or f"{data.name}-{arch or backbone_record.name}"
    run_dir = Path(config.out) / study_name
    try:
        (run_dir / "trials").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--out {config.out}: cannot create {run_dir} ({exc.strerror}); choose a writable folder") from exc
    workers = len(config.devices) if config.devices else config.workers
    storage = config.storage or default_storage(run_dir, workers)
    data_ref = str(Path(config.data).resolve()) if config.data and Path(config.data).exists() else config.data
    study_config = {
        "backbone": backbone_record.name, "arch": arch, "weights": config.weights, "task": data.task,
        "classes": list(data.classes), "epochs": epochs, "metric": metric, "objectives": objectives,
        "class_weights": bool(class_weights), "stages": n_stages, "data_config": data_config,
        "target_mean": target_mean, "target_std": target_std, "dataset": dataset_record.name, "data": data_ref,
        "val_fraction": config.val_fraction, "seed": config.seed,
        "space": {name: dim.to_dict() for name, dim in space.items()},
        # early rungs at another size score differently: a study keeps one setting
        "early": {"image_size": config.early_size, "epochs": config.early_epochs} if config.early_size else None,
    }
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study, created = open_study(storage, study_name, directions, sampler, pruner, study_config)
    recovered = recover_dead_workers(study)
    if recovered:
        console.print(f"trial(s) {', '.join(map(str, recovered))} lost their worker; each resumes from its last checkpoint")

    done_states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    if created and sampler_name != "grid":
        # The recipes a user would try by hand run first, so the search never does worse than them.
        optimizer_dim = space["optimizer"]
        first_optimizer = optimizer_dim.value if not optimizer_dim.searched else optimizer_dim.choices[0]
        for recipe, params, overrides in _recipes(space, n_stages, epochs, registry.optimizers[first_optimizer].default_lr):
            if optimizer_dim.searched:
                params["optimizer"] = first_optimizer
            study.enqueue_trial(params, user_attrs={"recipe": recipe, "overrides": overrides})
    finished = sum(t.state in done_states for t in study.trials)
    remaining = max(0, n_trials - finished)
    worker_label = f"worker {config.worker}: " if config.worker is not None else ""
    if workers > 1 and config.worker is None:
        _run_workers(config, study, storage, study_name, workers, n_trials, remaining, console)
        remaining = 0

    val_loaders: dict[int, Any] = {}
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    if finished and config.worker is None:
        console.print(f"resuming study [bold]{study_name}[/]: {finished} of {n_trials} trials already finished")
    if remaining:
        console.print(
            f"{worker_label}searching {n_trials} trials of {epochs} epochs over {', '.join(searched) or 'nothing'}: "
            f"{backbone_record.name}:{arch} ({n_stages} stages), {len(data.train)} train / {len(data.val)} val images, "
            f"{size_dim.describe()}px, {metric}{' vs ' + objectives[1] if objectives else ''}, {device}"
        )

    running: dict[str, Any] = {}  # the trial this worker runs, for Ctrl-C and failures
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False, disable=config.worker is not None) as progress:
        overall = progress.add_task("trials", total=remaining)

        def objective(trial: optuna.Trial) -> float | tuple[float, float]:
            running.clear()
            running["number"] = trial.number
            trial.set_user_attr("worker", worker_identity())
            # --trials is the study's total: count the trials finished or running ahead of this one, and the
            # retries of stopped trials still waiting (they resume work already done, so they go first).
            system_attrs = study._storage.get_trial(trial._trial_id).system_attrs
            states = (*done_states, optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING)
            others = study.get_trials(deepcopy=False, states=states)
            ahead = [t for t in others if t.state in done_states or t.state.name == "RUNNING" and t.number < trial.number]
            retries = [] if "failed_trial" in system_attrs else [
                t for t in others if t.state.name == "WAITING" and "failed_trial" in t.system_attrs]
            if len(ahead) + len(retries) >= n_trials:
                if not retries:  # the other workers finish the study
                    study.stop()
                trial.set_user_attr("surplus", True)
                if "fixed_params" in system_attrs:  # enqueued work (a recipe, a retry) stays queued
                    study.enqueue_trial(trial.params, user_attrs={k: v for k, v in trial.user_attrs.items() if k not in ("surplus", "worker")})
                raise _Surplus(f"the study already has its {n_trials} trials")
            overrides = trial.user_attrs.get("overrides", {})
            values = {name: overrides.get(name, dim.value) if not dim.searched else dim.suggest(trial)
                      for name, dim in space.items() if "." not in name}
            head_record, opt_record = registry.heads[values["head"]], registry.optimizers[values["optimizer"]]
            head_kwargs = {p: space[f"{head_record.name}.{p}"].suggest(trial) for p in head_record.params}
            opt_kwargs = {p: space[f"{opt_record.name}.{p}"].suggest(trial) for p in opt_record.params}
            values.update({f"{head_record.name}.{p}": v for p, v in head_kwargs.items()})
            values.update({f"{opt_record.name}.{p}": v for p, v in opt_kwargs.items()})
            trial.set_user_attr("values", values)
            depth, head_epochs = values["freeze_depth"], values["head_epochs"]

            seed_everything(config.seed + trial.number)
            backbone = backbone_record.factory(arch, "none")
            backbone.load_state_dict(base_state)
            freeze_stages(backbone, depth)
            head = head_record.factory(feature_width(base), num_outputs, data.task, **head_kwargs)
            model = build_model(backbone, head, data.task, target_mean, target_std)
            groups = param_groups(model, values["weight_decay"], values["layer_decay"])
            optimizer = opt_record.factory(groups, values["lr"], values["weight_decay"], **opt_kwargs)
            size, augment = values["image_size"], (values["randaugment"], values["hflip"])
            preprocess = Preprocess.from_data_config(data_config, size)
            # caches (tlengine/_cache.py): decoded images, and cached frozen-prefix features on which `fit` trains
            # the trainable suffix (sharing `model`'s modules); None: the plain path below
            # augmentation is seeded per image and epoch from the search's seed (tlengine._cache.image_seed): every trial,
            # cached or not, sees the same augmented images, so cached views serve every trial
            seeds = {"shuffle_seed": config.seed + trial.number, "augment_seed": config.seed}
            mixup = values["mixup"] > 0 or values["cutmix"] > 0
            early = config.early_size if config.early_size is not None and config.early_size < size else None
            prepared = caches.prepare(
                model, backbone, depth=depth, preprocess=preprocess, augment=augment, mixup=mixup, batch_size=values["batch_size"],
                epochs=epochs, first_epoch=config.early_epochs if early else 0, **seeds,
            ) if caches else None
            early_prepared = None
            if early is not None:  # the first epochs at a lower resolution, with the same model (or cached suffix)
                early_pre = Preprocess.from_data_config(data_config, early)
                on_features = bool(prepared and prepared.features)
                early_prepared = caches.prepare(
                    model, backbone, depth=depth if on_features else 0, preprocess=early_pre, augment=augment, mixup=mixup,
                    batch_size=values["batch_size"], epochs=config.early_epochs, count=False, **seeds,
                ) if caches else None
                if on_features and not (early_prepared and early_prepared.features and early_prepared.cut == prepared.cut):
                    console.print(f"{worker_label}trial {trial.number}: no cached features at {early}px to match those at {size}px; "
                                  f"all its epochs at {size}px")
                    early = None
                    prepared = caches.prepare(model, backbone, depth=depth, preprocess=preprocess, augment=augment, mixup=mixup,
                                              batch_size=values["batch_size"], epochs=epochs, count=False, **seeds)
            fit_model = prepared.model if prepared else model
            loaders = []
            for phase_size, phase_pre, phase in ((early, early_pre, early_prepared), (size, preprocess, prepared)) if early else ((size, preprocess, prepared),):
                if phase:
                    loaders.append((phase.train_loader, phase.val_loader))
                    continue
                if phase_size not in val_loaders:
                    val_loaders[phase_size] = loader(eval_tensors(data.val, phase_pre, data.task), 64, False, device)
                loaders.append((image_train_loader(data.train, data.task, phase_pre, augment, values["batch_size"], device, **seeds),
                                val_loaders[phase_size]))
            if early:
                train_loader = PhasedLoader([(config.early_epochs, loaders[0][0]), (epochs, loaders[1][0])])
                val_loader = PhasedLoader([(config.early_epochs, loaders[0][1]), (epochs, loaders[1][1])])
                trial.set_user_attr("early", {"image_size": early, "epochs": config.early_epochs})
            else:
                train_loader, val_loader = loaders[0]
            # end caches
            plan = TrainPlan(
                epochs=epochs, task=data.task, metric=metric, label_smoothing=values["label_smoothing"], warmup=values["warmup"],
                mixup=values["mixup"], cutmix=values["cutmix"], num_classes=num_outputs, class_weights=class_weights,
            )
            described = f"depth {depth}/{n_stages}, lr {values['lr']:.1e}"
            resume, origin = None, retried_from(trial)
            previous = Path(trial.user_attrs.get("epoch_checkpoint", "")) if origin is not None else None
            if previous is not None and previous.is_file():
                try:
                    resume = load_checkpoint(previous, model)
                except Exception as exc:  # a damaged checkpoint costs the epochs it held, not the trial
                    console.print(f"{worker_label}trial {trial.number}: cannot read {previous} ({first_line(exc)}); starting it afresh")
                else:
                    trial.set_user_attr("resumed_from", {"trial": origin, "epoch": resume.epoch, "step": resume.step})
                    console.print(f"{worker_label}trial {trial.number} resumes trial {origin} at epoch {resume.epoch + 1}"
                                  + (f", batch {resume.step + 1}" if resume.step else ""))
            epoch_checkpoint = run_dir / "trials" / f"{trial.number}.last.safetensors"
            trial.set_user_attr("epoch_checkpoint", str(epoch_checkpoint.resolve()))
            if resume is not None and not objectives:  # the pruner sees the epochs trained before the stop
                for epoch_result in resume.history:
                    trial.report(epoch_result.score, epoch_result.epoch)
            label = f"trial {trial.number} · depth {depth}/{n_stages} · lr {values['lr']:.1e}"
            label += " · cached" if prepared and prepared.features else ""
            steps = max(1, len(train_loader))
            task_id = progress.add_task(label, total=epochs * steps, completed=(resume.epoch * steps + resume.step) if resume else 0)

            def save(state: Any) -> None:
                try:
                    save_checkpoint(epoch_checkpoint, model, state)
                except OSError as exc:  # the previous epoch's checkpoint stays for the resume
                    trial.set_user_attr("resumable", "its checkpoint could not be written")
                    raise _unwritable(epoch_checkpoint, exc) from exc

            def on_epoch_start(epoch: int) -> None:
                if head_epochs:
                    freeze_stages(backbone, n_stages if epoch < head_epochs else depth)

            def on_epoch(result: EpochResult) -> None:
                progress.update(task_id, description=f"{label} · {metric} {result.score:.4f}")
                if objectives:  # Optuna prunes single-objective studies only
                    return
                trial.report(result.score, result.epoch)
                if trial.should_prune():
                    raise optuna.TrialPruned(f"pruned after epoch {result.epoch + 1}")

            def on_backoff(micro: int) -> None:
                trial.set_user_attr("micro_batch", micro)
                console.print(f"{worker_label}trial {trial.number}: out of memory; micro-batch {micro} with gradient accumulation "
                              f"(effective batch {values['batch_size']})")

            try:
                history = fit(fit_model, optimizer, train_loader, val_loader, plan, device=device, resume=resume, save=save,
                              should_stop=stop, on_step=lambda: progress.advance(task_id), on_epoch=on_epoch,
                              on_epoch_start=on_epoch_start, on_backoff=on_backoff)
            except (FloatingPointError, OutOfMemory) as exc:
                trial.set_user_attr("prune_reason", str(exc))
                console.print(f"{worker_label}trial {trial.number}: pruned, {exc} ({described})")
                epoch_checkpoint.unlink(missing_ok=True)
                raise optuna.TrialPruned(str(exc)) from exc
            except optuna.TrialPruned as exc:
                trial.set_user_attr("prune_reason", str(exc))
                console.print(f"{worker_label}trial {trial.number}: {exc} ({described})")
                epoch_checkpoint.unlink(missing_ok=True)
                raise
            except TrialInterrupted as exc:
                trial.set_user_attr("resumable", str(exc))
                raise
            finally:
                progress.remove_task(task_id)
                progress.advance(overall)
            checkpoint = run_dir / "trials" / f"{trial.number}.safetensors"
            try:
                save_model(model.cpu(), str(checkpoint))
            except OSError as exc:
                checkpoint.unlink(missing_ok=True)
                trial.set_user_attr("resumable", "its checkpoint could not be written")
                raise _unwritable(checkpoint, exc) from exc
            trial.set_user_attr("checkpoint", str(checkpoint.resolve()))
            trial.set_user_attr("history", [asdict(h) for h in history])
            epoch_checkpoint.unlink(missing_ok=True)
            if previous is not None:
                previous.unlink(missing_ok=True)
            if not objectives:
                console.print(f"{worker_label}trial {trial.number}: {metric} {history[-1].score:.4f} ({described})")
                return history[-1].score
            cost = COSTS[objectives[1]](model.eval(), size)
            console.print(f"{worker_label}trial {trial.number}: {metric} {history[-1].score:.4f}, {objectives[1]} {cost:.3g} ({described})")
            return history[-1].score, cost

        def first_interrupt() -> None:
            if "number" in running:
                console.print(f"stopping: saving trial {running['number']}'s checkpoint first (Ctrl-C again to stop at once)")

        def stop_between_trials(study: Any, trial: Any) -> None:
            if stop():
                study.stop()

        if remaining:
            optuna.logging.set_verbosity(optuna.logging.ERROR)  # a surplus trial is not a failure to report
            with catch_interrupts(first_interrupt) as stop:
                try:
                    study.optimize(objective, timeout=options.get("timeout"), catch=(_Surplus,),
                                   callbacks=[optuna.study.MaxTrialsCallback(n_trials, states=done_states), stop_between_trials])
                except (TrialInterrupted, KeyboardInterrupt, UserError) as exc:
                    _keep_for_resume(study, running.get("number"), always=not isinstance(exc, UserError))
                    if isinstance(exc, UserError):
                        raise
                    raise SearchInterrupted(
                        f"trial {running['number']}'s checkpoint saved" if isinstance(exc, TrialInterrupted)
                        else "stopped at once; the running trial resumes from its last epoch"
                    ) from exc
                if stop():
                    raise SearchInterrupted("stopped between trials")
    if caches and caches.trials:
        console.print(f"{worker_label}{caches.summary()}", soft_wrap=True, markup=False, highlight=False)
    if config.worker is not None:
        return SearchResult(study_name, storage, run_dir, metric, direction, [], None, searched, config=study_config)

    rows = trial_rows(study)
    pareto = tuple(sorted(t.number for t in study.best_trials)) if objectives else ()
    result = SearchResult(study_name, storage, run_dir, metric, direction, rows, None, searched, tuple(objectives or ()), pareto,
                          config=study_config)
    if not study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        write_summary(result)
        return result
    best_trial = pick_trial(study, "best")
    best = next(r for r in rows if r.number == best_trial.number)
    checkpoint = Path(best_trial.user_attrs.get("checkpoint", ""))
    if not checkpoint.is_file():
        console.print(f"[yellow]warning:[/] the best trial's checkpoint {checkpoint} is not on this machine; not exporting "
                      f"(export it where it is: tlengine export --storage URL --study-name {study_name} --trial {best_trial.number})")
        result = SearchResult(**{**result.__dict__, "best": best})
        write_summary(result)
        return result
    with console.status("exporting the best trial to ONNX and checking it with onnxruntime"):
        shutil.copyfile(checkpoint, run_dir / "best.safetensors")
        onnx_path = run_dir / "best.onnx"
        report = export_study_trial(registry, study, best_trial, onnx_path, data=data)
    result = SearchResult(**{**result.__dict__, "best": best, "onnx_path": onnx_path, "parity": asdict(report.parity)})
    write_summary(result)
    return result


def write_summary(result: SearchResult) -> None:
    """Write ``summary.json`` (best trial, config, every trial) and ``report.html`` beside the study."""
    summary = {
        "study_name": result.study_name,
        "storage": result.storage,
        "metric": result.metric,
        "direction": result.direction,
        "searched": list(result.searched),
        "objectives": list(result.objectives),
        "pareto_front": list(result.pareto),
        "best": asdict(result.best) if result.best else None,
        "onnx": str(result.onnx_path) if result.onnx_path else None,
        "parity": result.parity,
        "config": result.config,
        "trials": [asdict(r) for r in result.rows],
    }
    (result.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    from tlengine._report import report_after_search

    report_after_search(result.storage, result.study_name, result.run_dir)
