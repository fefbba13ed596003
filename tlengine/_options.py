"""The options of a search, as the command line and the Python API take them, and their checks."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from tlengine._errors import UserError

if TYPE_CHECKING:
    from tlengine._distill import TeacherRef

DEFAULT_BACKBONE = "timm:tf_efficientnet_lite0"
DEFAULT_TRIALS = 20
DEFAULT_EPOCHS = 5
#: ``--eval-crop``: decided from the data, timm's centre crop, or the whole image.
EVAL_CROPS = ("auto", "center", "whole")


@dataclass(frozen=True)
class SearchConfig:
    """Everything ``tlengine search`` was asked to do (``None``: the config file or a default decides).

    Each field is the command-line option of the same name (``image_size`` is ``--image-size``);
    ``tlengine search --help`` and :func:`tlengine.search` describe them.

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
        teacher: ``tlengine distill``'s teacher (:class:`tlengine._distill.TeacherRef`): the search is then a
            distillation study on the teacher study's data and split; ``None`` for ``tlengine search``.
        worker: Set for the worker processes ``--workers`` starts (their number).
        argv: The command line as typed, for the message that tells how to resume.
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
    eval_crop: str | None = None
    rank: str | None = None
    sampler: str | None = None
    pruner: str | None = None
    seed: int = 0
    device: str = "auto"
    out: str = "runs"
    study_name: str | None = None
    storage: str | None = None
    max_bad_images: float = 0.01
    confine_paths: bool = False
    image_column: str | None = None
    target_column: str | None = None
    cache: bool = True
    cache_dir: str | None = None
    cache_size_gb: float = 4.0
    cache_views: int | None = None
    early_size: int | None = None
    early_epochs: int = 1
    workers: int = 1
    devices: tuple[str, ...] | None = None
    teacher: TeacherRef | None = None
    worker: int | None = None
    argv: tuple[str, ...] = ()

    def cache_options(self) -> Any:
        """The :class:`~tlengine._cache.CacheOptions` these options ask for."""
        from tlengine._cache import CacheOptions

        return CacheOptions(self.cache, self.cache_dir, self.cache_size_gb, self.cache_views)


def merged_options(config: SearchConfig, file_search: Mapping[str, Any]) -> dict[str, Any]:
    """The ``[search]`` table of the config file with the flags that were given laid over it, checked.

    Raises:
        UserError: A value out of range, naming its option.
    """
    flags = {"trials": config.trials, "epochs": config.epochs, "image_size": config.image_size, "timeout": config.timeout,
             "sampler": config.sampler, "pruner": config.pruner, "metric": config.metric, "class_weights": config.class_weights,
             "eval_crop": config.eval_crop, "rank": config.rank, "objectives": list(config.objectives) if config.objectives else None}
    options = {**file_search, **{k: v for k, v in flags.items() if v is not None}}
    check_options(config, options)
    return options


def check_options(config: SearchConfig, options: Mapping[str, Any]) -> None:
    """Refuse values out of range, once, before anything is loaded.

    Raises:
        UserError: Naming the option and what it must be.
    """
    for option in ("trials", "epochs", "image_size"):
        value = options.get(option)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise UserError(f"--{option.replace('_', '-')} {value}: must be a positive integer")
    timeout = options.get("timeout")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0):
        raise UserError(f"--timeout {timeout}: must be a positive number of seconds")
    crop = options.get("eval_crop")
    if crop is not None and crop not in EVAL_CROPS:
        raise UserError(f"--eval-crop {crop}: expected {', '.join(EVAL_CROPS)}")
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
    config.cache_options().check()


#: Fields that are not options of a worker's command line.
_NOT_FLAGS = ("params", "argv", "worker", "workers", "devices", "storage", "study_name", "cache", "objectives", "teacher")


def worker_argv(config: SearchConfig, storage: str, study_name: str, worker: int) -> list[str]:
    """The ``tlengine search`` command line of worker ``worker``: these options, on one storage and study.

    Made from the options themselves, so that a search started from the Python API starts its
    workers exactly as one started from the command line.
    """
    argv = ["search"]
    for f in fields(config):
        value = getattr(config, f.name)
        if f.name in _NOT_FLAGS or value is None or value == f.default or value is False:
            continue
        flag = "--" + f.name.replace("_", "-")
        argv += [flag] if value is True else [flag, str(value)]
    if not config.cache:
        argv.append("--no-cache")
    if config.objectives:
        argv += ["--objectives", ",".join(config.objectives)]
    for name, value, _ in config.params:
        argv += ["--param", f"{name}={toml_value(value)}"]
    if config.teacher is not None:  # a distillation study's workers: the same teacher, by its storage URL
        import dataclasses
        import json

        argv += ["--teacher", json.dumps(dataclasses.asdict(config.teacher))]
    return [*argv, "--storage", storage, "--study-name", study_name, "--worker", str(worker)]


def toml_value(value: Any) -> str:
    """``value`` written as TOML, as ``--param NAME=VALUE`` reads it back."""
    import json

    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if not math.isfinite(value):
            raise UserError(f"--param: {value} is not a finite number")
        return repr(value)
    if isinstance(value, (int, str)):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise UserError(f"--param: cannot write {value!r} as a TOML value")
