"""The search setup: everything a search decides once from its options, before the first trial.

:func:`make_setup` merges the config file with the flags and checks them once, resolves
the plugins, loads and cleans the data, loads the backbone's weights, builds the search
space, probes the image sizes, computes the target statistics and makes the study's
record. The :class:`SearchSetup` it returns is frozen: the trial runner, the workers
and the end of the search only read it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tlengine._errors import UserError, unknown
from tlengine._options import DEFAULT_EPOCHS, DEFAULT_TRIALS, SearchConfig, merged_options
from tlengine._record import StudyRecord

if TYPE_CHECKING:
    import optuna
    import rich.console
    import torch

    from tlengine._records import Backbone, Dataset, ImageData
    from tlengine._space import Dimension
    from tlengine.plugins import Registry


@dataclass(frozen=True)
class SearchSetup:
    """What a search decided once from its options.

    Attributes:
        config: The options as given.
        registry: The installed plugins.
        backbone: The backbone plugin (``record.arch`` its architecture).
        dataset: The dataset plugin.
        data: The data, unreadable images left out.
        base: The backbone with its pretrained weights, which every trial starts from.
        stages: Parameter names of each of the backbone's stages.
        space: The search space, by dimension name.
        sampler_name: ``tpe``, ``random`` or ``grid``.
        sampler: Optuna's sampler.
        pruner: Optuna's pruner.
        n_trials: The study's total number of trials.
        timeout: ``--timeout``: seconds after which the search ends (no new trial; the running one stops at
            its next epoch end), or ``None``.
        device: The torch device trials train on.
        record: The study's record (stored in the study).
        class_weights: Per-class loss weights, or ``None``.
        study_name: The study.
        run_dir: Its run folder (checkpoints, ONNX model, report).
        storage: The Optuna storage URL.
        workers: Worker processes this command starts on this machine (1: none, it runs the trials itself).
        eval_crop: ``--eval-crop``: ``auto`` (decided from the data before the first trial), ``center`` or ``whole``.
    """

    config: SearchConfig
    registry: Registry
    backbone: Backbone
    dataset: Dataset
    data: ImageData
    base: torch.nn.Module
    stages: list[list[str]]
    space: dict[str, Dimension]
    sampler_name: str
    sampler: optuna.samplers.BaseSampler
    pruner: optuna.pruners.BasePruner
    n_trials: int
    timeout: float | None
    device: str
    record: StudyRecord
    class_weights: tuple[float, ...] | None
    study_name: str
    run_dir: Path
    storage: str
    workers: int
    eval_crop: str = "auto"

    @property
    def searched(self) -> tuple[str, ...]:
        """The dimensions Optuna chooses."""
        return tuple(name for name, dim in self.space.items() if dim.searched)

    @property
    def directions(self) -> list[str]:
        """The study's directions: the metric's, and ``minimize`` for a second objective."""
        from tlengine._metrics import METRICS

        return [METRICS[self.record.metric][1], *(["minimize"] if self.record.objectives else [])]

    @property
    def label(self) -> str:
        """``"worker N: "`` in a worker process, else empty: the prefix of its messages."""
        return f"worker {self.config.worker}: " if self.config.worker is not None else ""


def make_setup(config: SearchConfig, console: rich.console.Console) -> SearchSetup:
    """Decide everything a search needs before its first trial (see the module docstring).

    Raises:
        UserError: Any mistake in the options, the config file, the plugins or the data.
    """
    import torch
    from timm.data import resolve_data_config

    from tlengine._data import load_data, resolve_dataset
    from tlengine._model import resolve_backbone
    from tlengine._records import DatasetOptions
    from tlengine._space import for_grid, read_config
    from tlengine._stages import backbone_stages
    from tlengine._study import make_pruner, make_sampler
    from tlengine._timing import stage
    from tlengine._train import resolve_device
    from tlengine.plugins import get_registry

    file_config = read_config(config.config)
    options = merged_options(config, file_config["search"])
    registry = get_registry()
    backbone, arch = resolve_backbone(registry, config.backbone)
    _check_plugin_choices(registry, config.params)
    dataset = resolve_dataset(registry, config.dataset, config.data)
    sampler_name = options.get("sampler", "tpe")
    make_sampler(sampler_name, config.seed, {}) if sampler_name != "grid" else None  # an unknown name fails before any loading
    make_pruner(options.get("pruner", "median"))  # an unknown name fails before any loading
    device = resolve_device(config.device)
    if config.devices and config.worker is None and not torch.cuda.is_available():
        raise UserError(f"--devices {','.join(config.devices)}: CUDA is not available on this machine; use --workers N to run several workers on the CPU")
    torch.manual_seed(config.seed)
    with console.status("loading data and backbone"):
        warn = lambda line: console.print(line, soft_wrap=True, markup=False, highlight=False)  # noqa: E731
        dataset_options = DatasetOptions(config.task, config.val_fraction, config.seed, config.confine_paths, config.image_column,
                                         config.target_column)
        data = load_data(dataset, config.data, dataset_options, config.max_bad_images, warn)
        with stage("backbone"):
            base = backbone.factory(arch, config.weights)
    objectives, metric = _objectives(options, data.task)
    data_config = resolve_data_config(model=base)
    suggested = dataset.suggested
    image_size = options.get("image_size") or suggested.get("image_size") or data_config["input_size"][-1]
    epochs = options.get("epochs") or suggested.get("epochs") or DEFAULT_EPOCHS
    if config.early_size is not None and config.early_epochs >= epochs:
        raise UserError(f"--early-epochs {config.early_epochs}: must be fewer than the {epochs} epochs per trial (--epochs), "
                        "so that every trial ends at its own image size")
    stages = backbone_stages(base)
    if not stages:
        raise UserError(f"--backbone {config.backbone}: the backbone has no parameters")
    space = _space(config, registry, file_config["space"], len(stages), data.task, image_size)
    if sampler_name == "grid":
        space = for_grid(space)
    _probe_sizes(base, space, config.early_size)
    grid = {name: dim.grid() for name, dim in space.items() if dim.searched} if sampler_name == "grid" else None
    target_mean, target_std, class_weights = _targets(data, bool(options.get("class_weights")))
    study_name = config.study_name or f"{data.name}-{arch or backbone.name}"
    run_dir, storage, workers = _where(config, study_name)
    record = StudyRecord(
        backbone=backbone.name, arch=arch, weights=config.weights, task=data.task, classes=tuple(data.classes), epochs=epochs,
        metric=metric, objectives=objectives, class_weights=bool(class_weights), stages=len(stages),
        data_config={k: data_config[k] for k in ("mean", "std", "interpolation", "crop_pct")}, target_mean=target_mean,
        target_std=target_std, dataset=dataset.name, data=_data_ref(config.data), val_fraction=config.val_fraction, seed=config.seed,
        space={name: dim.to_dict() for name, dim in space.items()},
        # early rungs at another size score differently: a study keeps one setting
        early={"image_size": config.early_size, "epochs": config.early_epochs} if config.early_size else None,
        confine_paths=config.confine_paths, max_bad_images=config.max_bad_images, image_column=config.image_column,
        target_column=config.target_column,
    )
    return SearchSetup(
        config=config, registry=registry, backbone=backbone, dataset=dataset, data=data, base=base, stages=stages, space=space,
        sampler_name=sampler_name, sampler=make_sampler(sampler_name, config.seed, grid), pruner=make_pruner(options.get("pruner", "median"), epochs),
        n_trials=options.get("trials") or suggested.get("trials") or DEFAULT_TRIALS, timeout=options.get("timeout"), device=device,
        record=record, class_weights=class_weights, study_name=study_name, run_dir=run_dir, storage=storage, workers=workers,
        eval_crop=options.get("eval_crop") or "auto",
    )


def _check_plugin_choices(registry: Registry, params: tuple[tuple[str, Any, str], ...]) -> None:
    """Refuse ``--head`` / ``--optimizer`` (or their ``--param``) naming a plugin that is not installed."""
    for name, value, option in params:
        known = {"head": registry.heads, "optimizer": registry.optimizers}.get(name)
        for choice in (value if isinstance(value, list) else [value]) if known is not None else []:
            if choice != "search" and choice not in known:
                raise unknown(name, str(choice), known, option)


def _objectives(options: Mapping[str, Any], task: str) -> tuple[tuple[str, ...] | None, str]:
    """``(objectives, metric)``: ``--objectives`` checked against ``--metric``, and the metric for ``task``."""
    from tlengine._export import COSTS
    from tlengine._metrics import check_metric

    objectives, metric = options.get("objectives"), options.get("metric")
    if objectives is not None:
        if not isinstance(objectives, list) or len(objectives) != 2 or objectives[1] not in COSTS:
            raise UserError(f"--objectives {objectives}: expected METRIC,latency or METRIC,params (e.g. accuracy,latency)")
        if metric not in (None, objectives[0]):
            raise UserError(f"--objectives {','.join(objectives)}: the first objective is the metric; it differs from --metric {metric}")
        metric = objectives[0]
    return (tuple(objectives) if objectives else None), check_metric(metric, task)


def _space(config: SearchConfig, registry: Registry, config_space: Mapping[str, Any], n_stages: int, task: str,
           image_size: int) -> dict[str, Dimension]:
    """The search space: the defaults, the config's ``[space]``, then ``--param`` and the dedicated flags."""
    from tlengine._space import build_space

    plugin_params = {r.name: dict(r.params) for r in [*registry.heads.values(), *registry.optimizers.values()] if r.params}
    overrides = {name: (value, option) for name, value, option in config.params}
    if config.image_size is not None:
        overrides["image_size"] = (config.image_size, "--image-size")
    return build_space(
        config_space, overrides, plugin_params, n_stages=n_stages,
        lr_ranges={name: r.lr_range for name, r in registry.optimizers.items()}, heads=list(registry.heads),
        task=task, where=f"--config {config.config}", image_size=image_size,
    )


def _probe_sizes(base: torch.nn.Module, space: Mapping[str, Dimension], early_size: int | None) -> None:
    """Run the backbone once at every image size the search may use (and ``--early-size``).

    Raises:
        UserError: The backbone cannot take one of them, naming its option.
    """
    import torch

    from tlengine._study import first_line

    size = space["image_size"]
    sizes = [size.value] if not size.searched else list(size.choices) if size.kind == "categorical" else [size.low, size.high]
    probes = [(int(s), "--image-size") for s in sizes]
    if early_size is not None and any(early_size < s for s, _ in probes):
        probes.append((early_size, "--early-size"))
    for side, option in probes:
        try:
            with torch.inference_mode():
                base.eval()(torch.zeros(1, 3, side, side))
        except Exception as exc:
            raise UserError(f"{option} {side}: the backbone cannot take it ({type(exc).__name__}: {first_line(exc)})") from exc


def _targets(data: ImageData, class_weights: bool) -> tuple[float, float, tuple[float, ...] | None]:
    """``(mean, std, class weights)``: regression targets' training statistics, inverse class frequencies if asked."""
    import torch

    classification = data.task == "classification"
    targets = torch.tensor([float(t) for t in data.train.targets])
    mean = 0.0 if classification else float(targets.mean())
    std = 1.0 if classification or len(targets) < 2 else float(targets.std().clamp_min(1e-8))
    weights = None
    if class_weights and classification:
        counts = torch.bincount(torch.tensor(list(data.train.targets)), minlength=len(data.classes)).clamp_min(1).double()
        weights = tuple((counts.sum() / (len(data.classes) * counts)).tolist())
    return mean, std, weights


def _where(config: SearchConfig, study_name: str) -> tuple[Path, str, int]:
    """``(run folder, storage URL, workers)``; the run folder (and its ``trials/``) is created.

    Raises:
        UserError: The run folder cannot be created.
    """
    from tlengine._storage import default_storage

    run_dir = Path(config.out) / study_name
    try:
        (run_dir / "trials").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--out {config.out}: cannot create {run_dir} ({exc.strerror}); choose a writable folder") from exc
    workers = len(config.devices) if config.devices else config.workers
    return run_dir, config.storage or default_storage(run_dir, workers), workers


def _data_ref(data: str | None) -> str | None:
    """``--data`` as the study stores it: an absolute path where it is one."""
    return str(Path(data).resolve()) if data and Path(data).exists() else data
