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

    from tlengine._distill import Teacher
    from tlengine._records import Backbone, Dataset, ImageData
    from tlengine._space import Dimension
    from tlengine.plugins import Registry


@dataclass(frozen=True)
class Candidate:
    """One backbone of a search over several.

    Attributes:
        spec: ``NAME:ARCH`` (or ``NAME``), as ``--backbone`` takes it.
        backbone: Its plugin.
        arch: Its architecture.
        base: Its pretrained weights.
        stages: Parameter names of each of its stages.
        data_config: timm's ``mean``, ``std``, ``interpolation``, ``crop_pct`` and ``input_size`` of it.
    """

    spec: str
    backbone: Backbone
    arch: str | None
    base: torch.nn.Module
    stages: list[list[str]]
    data_config: Mapping[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """What the study record keeps of it."""
        return {"spec": self.spec, "backbone": self.backbone.name, "arch": self.arch, "stages": len(self.stages),
                "data_config": {k: self.data_config[k] for k in ("mean", "std", "interpolation", "crop_pct")}}


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
        candidates: Every backbone searched, when there are several (``backbone``, ``base`` and ``stages``
            are then the main one's: the first listed, the top-ranked once ranked); empty for one.
        rank: ``[search] rank``: how several backbones are ranked before the first trial (``probe``, ``logme``).
        keep_backbones: ``--param backbone`` lists them: none is left out for ranking low.
        teacher: A distillation study's teacher (``tlengine distill``), or ``None``.
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
    candidates: tuple[Candidate, ...] = ()
    rank: str = "probe"
    keep_backbones: bool = False
    teacher: Teacher | None = None

    def candidate(self, spec: str) -> Candidate:
        """The candidate ``spec`` (the main backbone in a search of one)."""
        for found in self.candidates:
            if found.spec == spec:
                return found
        return Candidate(self.record.backbone_spec, self.backbone, self.record.arch, self.base, self.stages, self.record.data_config)

    def with_main(self, spec: str) -> SearchSetup:
        """This setup with candidate ``spec`` as its main backbone (in its fields and its record)."""
        import dataclasses

        found = self.candidate(spec)
        record = self.record.for_backbone(spec)
        return dataclasses.replace(self, backbone=found.backbone, base=found.base, stages=found.stages, record=record)

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

    from tlengine._data import load_data, resolve_dataset
    from tlengine._distill import check_student, load_teacher
    from tlengine._records import DatasetOptions
    from tlengine._space import Dimension, for_grid, read_config
    from tlengine._study import make_pruner, make_sampler
    from tlengine._timing import stage
    from tlengine.plugins import get_registry

    file_config = read_config(config.config)
    options = merged_options(config, file_config["search"])
    registry = get_registry()
    warn = lambda line: console.print(line, soft_wrap=True, markup=False, highlight=False)  # noqa: E731
    specs, keep_backbones, params = backbone_list(config, file_config["space"], warn)
    config_space = {k: v for k, v in file_config["space"].items() if k != "backbone"}
    resolved = _resolve_backbones(registry, specs, config.weights)
    backbone, arch = resolved[0]
    _check_plugin_choices(registry, params)
    dataset = resolve_dataset(registry, config.dataset, config.data)
    sampler_name, rank, device = _check_choices(config, options, len(resolved))
    teacher = load_teacher(config.teacher) if config.teacher is not None else None
    torch.manual_seed(config.seed)
    with console.status("loading data and backbone"):
        dataset_options = DatasetOptions(config.task, config.val_fraction, config.seed, config.confine_paths, config.image_column,
                                         config.target_column)
        data = load_data(dataset, config.data, dataset_options, config.max_bad_images, warn)
        with stage("backbone"):
            candidates = _load_candidates(resolved, config.weights, warn)
    objectives, metric = _objectives(options, data.task)
    main = candidates[0]
    backbone, arch, base, data_config = main.backbone, main.arch, main.base, main.data_config
    suggested = dataset.suggested
    image_size = options.get("image_size") or suggested.get("image_size") or data_config["input_size"][-1]
    epochs = options.get("epochs") or suggested.get("epochs") or DEFAULT_EPOCHS
    if config.early_size is not None and config.early_epochs >= epochs:
        raise UserError(f"--early-epochs {config.early_epochs}: must be fewer than the {epochs} epochs per trial (--epochs), "
                        "so that every trial ends at its own image size")
    stages = main.stages
    if teacher is not None:
        check_student(teacher, task=data.task, classes=data.classes, students=[c.spec for c in candidates], image_size=image_size)
    space = _space(config, registry, config_space, params, [len(c.stages) for c in candidates], data.task, image_size,
                   distill=teacher is not None)
    if len(candidates) > 1:
        space = {"backbone": Dimension("backbone", "categorical", choices=tuple(c.spec for c in candidates),
                                       source="cli" if keep_backbones else "default"), **space}
    if sampler_name == "grid":
        space = for_grid(space)
    for candidate in candidates:
        _probe_sizes(candidate.base, space, config.early_size)
    grid = {name: dim.grid() for name, dim in space.items() if dim.searched} if sampler_name == "grid" else None
    target_mean, target_std, class_weights = _targets(data, bool(options.get("class_weights")))
    study_name = config.study_name or f"{data.name}-{arch or backbone.name}" + (f"+{len(candidates) - 1}" if len(candidates) > 1 else "")
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
        target_column=config.target_column, candidates=tuple(c.to_dict() for c in candidates) if len(candidates) > 1 else (),
        teacher=teacher.to_dict() if teacher is not None else None,
    )
    return SearchSetup(
        config=config, registry=registry, backbone=backbone, dataset=dataset, data=data, base=base, stages=stages, space=space,
        sampler_name=sampler_name, sampler=make_sampler(sampler_name, config.seed, grid), pruner=make_pruner(options.get("pruner", "median"), epochs),
        n_trials=options.get("trials") or suggested.get("trials") or DEFAULT_TRIALS, timeout=options.get("timeout"), device=device,
        record=record, class_weights=class_weights, study_name=study_name, run_dir=run_dir, storage=storage, workers=workers,
        eval_crop=options.get("eval_crop") or "auto", candidates=tuple(candidates) if len(candidates) > 1 else (),
        rank=rank, keep_backbones=keep_backbones, teacher=teacher,
    )


def backbone_list(config: SearchConfig, config_space: Mapping[str, Any], warn: Any) -> tuple[list[str], bool, tuple[tuple[str, Any, str], ...]]:
    """The backbones to search, whether the user listed them as a space dimension (``--param backbone=[...]``:
    none is left out for ranking low), and the other ``--param`` overrides.

    ``--param backbone`` first, then ``[space] backbone`` in the config, then ``--backbone`` (comma-separated).

    Raises:
        UserError: An empty list, or one that is not of names.
    """
    params = tuple(p for p in config.params if p[0] != "backbone")
    given = [(value, option) for name, value, option in config.params if name == "backbone"]
    if given:
        value, where, keep = given[-1][0], given[-1][1], True
    elif "backbone" in config_space:
        value, where, keep = config_space["backbone"], f"--config {config.config}: backbone", False
    else:
        value, where, keep = config.backbone, "--backbone", False
    specs = [s.strip() for s in value.split(",")] if isinstance(value, str) else value
    if not isinstance(specs, list) or not specs or not all(isinstance(s, str) and s for s in specs):
        raise UserError(f"{where} {value!r}: expected backbone names, e.g. tf_efficientnet_lite0,tf_efficientnet_lite1")
    if len(specs) == 1 and (keep or where != "--backbone"):
        warn(f"warning: {where.split(':')[0]}: backbone lists one ({specs[0]}): nothing to rank or choose, it is searched alone")
    return specs, keep, params


def _resolve_backbones(registry: Registry, specs: list[str], weights: str) -> list[tuple[Backbone, str | None]]:
    """Each listed backbone's plugin and architecture.

    Raises:
        UserError: An unknown name, one listed twice, or one ``--weights`` file for several.
    """
    from tlengine._model import resolve_backbone

    resolved, seen = [], set()
    for spec in specs:
        backbone, arch = resolve_backbone(registry, spec)
        canonical = f"{backbone.name}:{arch}" if arch else backbone.name
        if canonical in seen:
            raise UserError(f"--backbone: {canonical} is listed twice")
        seen.add(canonical)
        resolved.append((backbone, arch))
    if len(resolved) > 1 and weights not in ("auto", "hub", "none"):
        raise UserError(f"--weights {weights}: one weights file cannot fit {len(resolved)} backbones; "
                        "use --weights auto (installed weight packages, else the hub) or search one backbone")
    return resolved


def _load_candidates(resolved: list[tuple[Backbone, str | None]], weights: str, warn: Any) -> list[Candidate]:
    """Load each backbone's weights and stages; with several, one whose weights cannot be had is left out
    with a warning (the search goes on with the others).

    Raises:
        UserError: The only backbone (or every one) cannot be loaded, or has no parameters.
    """
    from timm.data import resolve_data_config

    from tlengine._stages import backbone_stages

    candidates, failed = [], []
    for backbone, arch in resolved:
        spec = f"{backbone.name}:{arch}" if arch else backbone.name
        try:
            base = backbone.factory(arch, weights)
        except UserError as exc:
            if len(resolved) == 1:
                raise
            failed.append(f"{spec} ({exc})")
            warn(f"warning: --backbone {spec}: {exc}; left out of the search")
            continue
        stages = backbone_stages(base)
        if not stages:
            raise UserError(f"--backbone {spec}: the backbone has no parameters")
        config = resolve_data_config(model=base)
        candidates.append(Candidate(spec, backbone, arch, base, stages, {k: config[k] for k in ("mean", "std", "interpolation", "crop_pct", "input_size")}))
    if not candidates:
        raise UserError(f"--backbone: none of the {len(resolved)} backbones could be loaded; {failed[0]}")
    return candidates


def _check_choices(config: SearchConfig, options: Mapping[str, Any], backbones: int) -> tuple[str, str, str]:
    """The sampler's name, the ranking method and the device, checked before anything is loaded.

    Raises:
        UserError: An unknown sampler, pruner or ranking method; the grid sampler over several backbones; CUDA asked
            for where there is none.
    """
    import torch

    from tlengine._study import make_pruner, make_sampler
    from tlengine._train import resolve_device

    sampler_name = options.get("sampler", "tpe")
    make_sampler(sampler_name, config.seed, {}) if sampler_name != "grid" else None
    make_pruner(options.get("pruner", "median"))
    rank = _rank_method(options)
    if backbones > 1 and sampler_name == "grid":
        raise UserError("--sampler grid: cannot search several backbones (each has its own freeze depths); use tpe or random")
    device = resolve_device(config.device)
    if config.devices and config.worker is None and not torch.cuda.is_available():
        raise UserError(f"--devices {','.join(config.devices)}: CUDA is not available on this machine; use --workers N to run several workers on the CPU")
    return sampler_name, rank, device


def _rank_method(options: Mapping[str, Any]) -> str:
    """``[search] rank``, checked.

    Raises:
        UserError: Not a known ranking method.
    """
    from tlengine._rank import RANKERS

    method = options.get("rank", RANKERS[0])
    if method not in RANKERS:
        raise UserError(f"--rank {method}: expected {', '.join(RANKERS)}")
    return method


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


def _check_distill_space(space: Mapping[str, Dimension], overrides: Mapping[str, tuple[Any, str]], where: str) -> None:
    """Refuse what a distillation study cannot do: mix images (the teacher's outputs are per image and view), or weigh
    the teacher outside 0..1.

    Raises:
        UserError: Naming the option.
    """
    for name in ("mixup", "cutmix"):
        dim = space[name]
        if dim.searched or dim.value not in (0, 0.0):
            why = f"{name} mixes images the teacher never saw"
            raise UserError(f"{overrides.get(name, (None, where))[1]}: {name} is not for tlengine distill ({why}); remove it")
    alpha = space["distill_alpha"]
    values = alpha.choices if alpha.kind == "categorical" else [alpha.value] if alpha.kind == "fixed" else [alpha.low, alpha.high]
    if min(values) < 0 or max(values) > 1:
        raise UserError(f"{overrides.get('distill_alpha', (None, where))[1]}: distill_alpha must lie in 0..1 (the teacher's share of the loss)")


def _space(config: SearchConfig, registry: Registry, config_space: Mapping[str, Any], params: tuple[tuple[str, Any, str], ...],
           stages: list[int], task: str, image_size: int, *, distill: bool = False) -> dict[str, Dimension]:
    """The search space: the defaults, the config's ``[space]``, then ``--param`` and the dedicated flags.

    A distillation study (``distill``) adds ``distill_alpha`` and ``distill_temperature`` and has no mixup or cutmix.

    With several backbones (``stages`` their stage counts), ``freeze_depth`` spans the deepest one's
    stages; each trial's own depth is cut at its backbone's (:func:`tlengine._space.depth_dimension`),
    and a fixed depth must fit every backbone.

    Raises:
        UserError: See :func:`tlengine._space.build_space`; a fixed depth deeper than one of the backbones; mixup
            or cutmix in a distillation study.
    """
    from tlengine._distill import distillation_dimensions
    from tlengine._space import build_space

    plugin_params = {r.name: dict(r.params) for r in [*registry.heads.values(), *registry.optimizers.values()] if r.params}
    overrides = {name: (value, option) for name, value, option in params}
    if config.image_size is not None:
        overrides["image_size"] = (config.image_size, "--image-size")
    space = build_space(
        config_space, overrides, plugin_params, n_stages=max(stages),
        lr_ranges={name: r.lr_range for name, r in registry.optimizers.items()}, heads=list(registry.heads),
        task=task, where=f"--config {config.config}", image_size=image_size,
        extra=distillation_dimensions(task) if distill else None,
    )
    if distill:
        _check_distill_space(space, overrides, f"--config {config.config}")
    depth = space["freeze_depth"]
    if depth.kind == "fixed" and depth.value > min(stages):
        where = overrides["freeze_depth"][1] if "freeze_depth" in overrides else f"--config {config.config}"
        raise UserError(f"{where}: freeze_depth = {depth.value} is deeper than the {min(stages)} stages of one of the backbones searched; "
                        "search it (the default) or fix it at most that")
    return space


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
