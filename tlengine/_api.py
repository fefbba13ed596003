"""The Python API: ``tlengine.search``, ``distill``, ``export``, ``show`` and ``report``, mirroring the commands.

Every keyword is the command-line option of the same name, with the same default
(``image_size`` is ``--image-size``); the command line calls these same functions.
``tests/test_api.py`` checks that the two stay in step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tlengine._errors import UserError
from tlengine._options import DEFAULT_BACKBONE, SearchConfig

if TYPE_CHECKING:
    from tlengine._export import ExportReport
    from tlengine._report import Board, Report
    from tlengine._search import SearchResult


def search(
    data: str | Path | None = None,
    backbone: str | Sequence[str] = DEFAULT_BACKBONE,
    trials: int | None = None,
    epochs: int | None = None,
    *,
    dataset: str = "auto",
    task: str | None = None,
    val_fraction: float = 0.2,
    weights: str = "auto",
    config: str | Path | None = None,
    param: Mapping[str, Any] | Sequence[str] = (),
    head: str | None = None,
    optimizer: str | None = None,
    timeout: float | None = None,
    image_size: int | None = None,
    batch_size: int | None = None,
    weight_decay: float | None = None,
    metric: str | None = None,
    objectives: str | Sequence[str] | None = None,
    class_weights: bool | None = None,
    eval_crop: str | None = None,
    rank: str | None = None,
    seed: int = 0,
    device: str = "auto",
    sampler: str | None = None,
    pruner: str | None = None,
    out: str | Path = "runs",
    study_name: str | None = None,
    storage: str | None = None,
    workers: int = 1,
    devices: str | Sequence[str] | None = None,
    max_bad_images: float = 0.01,
    confine_paths: bool = False,
    image_column: str | None = None,
    target_column: str | None = None,
    cache: bool = True,
    cache_dir: str | Path | None = None,
    cache_size_gb: float = 4.0,
    cache_views: int | None = None,
    early_size: int | None = None,
    early_epochs: int = 1,
    quiet: bool = False,
) -> SearchResult:
    """Run (or resume) a search over freeze depth, learning rate and the rest of the space; export its best trial.

    The same as ``tlengine search``: it writes ``OUT/STUDY/`` (``best.onnx``, ``best.safetensors``,
    ``summary.json``, ``report.html``, the study), and running it again resumes the study.
    (Long only in its signature and this docstring, one keyword per command-line option;
    the body is four lines.)

    Args:
        data: Image folder (``train/`` and ``val/``, or class folders) or CSV file; ``None``: the bundled demo.
        backbone: ``NAME``, ``NAME:ARCH``, or a timm model name; several (a list, or comma-separated) are
            ranked on their frozen features and searched.
        trials: Total trials in the study (default: the dataset's suggestion, else 20).
        epochs: Epochs per trial (default: the dataset's suggestion, else 5).
        dataset: Dataset plugin (``auto``: chosen from ``data``).
        task: ``classification`` or ``regression`` (default: the dataset's own).
        val_fraction: Held-out fraction when the data has no validation split.
        weights: ``auto``, ``hub``, ``none``, a ``.pth``/``.safetensors`` file, or ``pkg:DISTRIBUTION``.
        config: TOML file with ``[search]`` options and the ``[space]`` to search.
        param: Dimensions to fix or search: ``{"lr": 3e-4, "head": ["linear", "mlp"],
            "layer_decay": {"low": 0.6, "high": 1.0}}``, or ``["lr=3e-4", ...]`` as ``--param`` takes them.
        head: Head plugin (short for ``param={"head": NAME}``).
        optimizer: Optimizer plugin (short for ``param={"optimizer": NAME}``).
        timeout: End the search after this many seconds: no trial starts after it, the running one stops at its
            next epoch end (pruned, with its last score), then the best trial is exported.
        image_size: Input side in pixels (default: the dataset's suggestion, else the backbone's).
        batch_size: Short for ``param={"batch_size": N}``.
        weight_decay: Short for ``param={"weight_decay": X}``.
        metric: ``accuracy``, ``macro_f1``, ``balanced_accuracy``, ``top5``; ``rmse``, ``mae``, ``r2``.
        objectives: ``"METRIC,latency"`` or ``"METRIC,params"`` (or a pair): a Pareto front.
        class_weights: Weight the loss by inverse class frequency.
        eval_crop: ``auto``, ``center`` or ``whole``: how evaluation and the exported model crop (``--eval-crop``).
        rank: ``probe`` or ``logme``: how several backbones are ranked before the first trial (``--rank``; default ``probe``).
        seed: Seeds the sampler, the split and every trial.
        device: ``auto``, ``cpu`` or ``cuda``.
        sampler: ``tpe`` (multivariate), ``random`` or ``grid``.
        pruner: ``median``, ``hyperband`` or ``none``.
        out: Output folder; results go to ``OUT/STUDY/``.
        study_name: Default ``DATA-ARCH``.
        storage: Optuna storage URL (``sqlite:///FILE``, ``journal://FILE``, ``postgresql://...``).
        workers: Worker processes on this machine sharing the study.
        devices: CUDA devices, one worker each (``"0,1"`` or ``["0", "1"]``).
        max_bad_images: Unreadable images tolerated: a fraction below 1, or a count.
        confine_paths: Refuse CSV image paths outside the CSV's folder.
        image_column: The CSV column of image paths (default: found by name).
        target_column: The CSV column of labels or numeric targets (default: found by name, or the only other column).
        cache: Decode images once and cache frozen-prefix features (``False``: ``--no-cache``).
        cache_dir: Cache folder (default ``$TLENGINE_CACHE``, else ``~/.cache/tlengine``).
        cache_size_gb: Cap on the cache folder.
        cache_views: Cached augmented views per image for frozen layers (default: one per epoch).
        early_size: Train and validate the first ``early_epochs`` epochs of each trial at this side.
        early_epochs: Epochs at ``early_size``.
        quiet: Print nothing (progress and messages go to stderr otherwise).

    Returns:
        The trials, the best one, and the exported model's path and parity.

    Raises:
        UserError: A mistake in the options, the config file or the data (the message says which and what to do).
        SearchInterrupted: Ctrl-C; finished trials are kept and the same call resumes the search.
    """
    options = {name: value for name, value in locals().items() if name != "quiet"}
    from rich.console import Console

    from tlengine._search import run_search

    return run_search(search_config(**options), Console(stderr=True, quiet=quiet))


def search_config(*, param: Mapping[str, Any] | Sequence[str] = (), head: str | None = None, optimizer: str | None = None,
                  batch_size: int | None = None, weight_decay: float | None = None, objectives: str | Sequence[str] | None = None,
                  devices: str | Sequence[str] | None = None, argv: Sequence[str] = (), **options: Any) -> SearchConfig:
    """The :class:`~tlengine._options.SearchConfig` of :func:`search`'s keywords (the command line makes it the same way).

    Raises:
        UserError: A ``param`` that is not ``NAME=VALUE``.
    """
    from tlengine._space import parse_override

    if isinstance(param, Mapping):
        params = [(name, value, f"--param {name}") for name, value in param.items()]
    else:
        params = [(*parse_override(text), f"--param {text.partition('=')[0].strip()}") for text in param]
    for name, value in (("head", head), ("optimizer", optimizer), ("batch_size", batch_size), ("weight_decay", weight_decay)):
        if value is not None:
            params.append((name, value, f"--{name.replace('_', '-')}"))
    paths = {k: str(options[k]) for k in ("data", "config", "out", "cache_dir") if options.get(k) is not None}
    if isinstance(options.get("teacher"), str):  # a distillation worker's --teacher, as worker_argv writes it
        import json

        from tlengine._distill import TeacherRef

        paths["teacher"] = TeacherRef(**json.loads(options["teacher"]))
    if not isinstance(options.get("backbone", ""), str):  # several backbones, as --backbone takes them
        paths["backbone"] = ",".join(options["backbone"])
    return SearchConfig(**{**options, **paths}, params=tuple(params), objectives=_listed(objectives), devices=_listed(devices),
                        argv=tuple(argv))


def distill(
    study_name: str,
    student: str | Sequence[str],
    *,
    teacher: str = "best",
    storage: str | None = None,
    runs: str | Path = "runs",
    name: str | None = None,
    trials: int | None = None,
    epochs: int | None = None,
    timeout: float | None = None,
    image_size: int | None = None,
    weights: str = "auto",
    config: str | Path | None = None,
    param: Mapping[str, Any] | Sequence[str] = (),
    batch_size: int | None = None,
    device: str = "auto",
    sampler: str | None = None,
    pruner: str | None = None,
    workers: int = 1,
    devices: str | Sequence[str] | None = None,
    cache: bool = True,
    cache_dir: str | Path | None = None,
    cache_size_gb: float = 4.0,
    cache_views: int | None = None,
    quiet: bool = False,
) -> SearchResult:
    """Distil a finished study's best trial (or trial N, or its K best) into a student, as ``tlengine distill`` does.

    A new study (``name``, in the same storage rules as a search) trains the student on the teacher's soft
    targets and the true labels, on the teacher study's data and split, searching ``distill_alpha``,
    ``distill_temperature``, ``lr`` and the student's freeze depth; its best trial is exported like a
    search's, with the teacher in its metadata, and compared with the teacher (``result.distillation``).
    Running it again resumes the study.

    Args:
        study_name: The teacher's study.
        student: The student's backbone (``NAME``, ``NAME:ARCH`` or a timm model name).
        teacher: ``best``, a trial number, or ``top:K`` (the K best trials' outputs averaged).
        storage: The teacher study's storage URL (default: in ``RUNS/STUDY/``); the student's study goes there too.
        runs: Where the teacher's default storage lives, and the student's run folder goes.
        name: The student's study (default ``STUDY-distill-ARCH``).
        trials: Total student trials (default: 20).
        epochs: Epochs per student trial (default: the teacher study's).
        timeout: End after this many seconds, as ``search`` does.
        image_size: The student's input side in pixels (default: the dataset's suggestion, else the backbone's).
        weights: The student's pretrained weights, as ``search`` takes them.
        config: TOML file with ``[search]`` options and the ``[space]`` to search.
        param: Dimensions to fix or search, as ``search`` takes them (``distill_alpha``, ``distill_temperature`` too).
        batch_size: Short for ``param={"batch_size": N}``.
        device: ``auto``, ``cpu`` or ``cuda``.
        sampler: ``tpe``, ``random`` or ``grid``.
        pruner: ``median``, ``hyperband`` or ``none``.
        workers: Worker processes on this machine sharing the study.
        devices: CUDA devices, one worker each.
        cache: Decode images once and cache frozen-prefix features and the teacher's outputs (``False``: ``--no-cache``).
        cache_dir: Cache folder.
        cache_size_gb: Cap on the cache folder.
        cache_views: Cached augmented views per image for frozen layers (default: one per epoch).
        quiet: Print nothing.

    Returns:
        The student study's trials, its best one, its exported model, and ``distillation``: teacher and student
        side by side.

    Raises:
        UserError: No such study or trial, a teacher of another task or classes, a student that is the teacher.
        SearchInterrupted: Ctrl-C; finished trials are kept and the same call resumes.
    """
    options = {k: v for k, v in locals().items() if k != "quiet"}
    from rich.console import Console

    from tlengine._search import run_search

    return run_search(distill_config(**options), Console(stderr=True, quiet=quiet))


def distill_config(*, study_name: str, student: str | Sequence[str], teacher: str, storage: str | None, runs: str | Path,
                   name: str | None, epochs: int | None, argv: Sequence[str] = (), **options: Any) -> SearchConfig:
    """The :class:`~tlengine._options.SearchConfig` of :func:`distill`'s keywords: a search of the student on the
    teacher study's data, split, task and metric, with the teacher (the command line makes it the same way).

    Raises:
        UserError: No such study.
    """
    from tlengine._distill import TeacherRef, default_study_name
    from tlengine._record import read_record
    from tlengine._study import find_study

    study, url = find_study(study_name, storage, str(runs))
    record = read_record(study)
    students = [s.strip() for s in student.split(",")] if isinstance(student, str) else list(student)
    return search_config(
        data=record.data, dataset=record.dataset, task=record.task, val_fraction=record.val_fraction, seed=record.seed,
        backbone=students if len(students) > 1 else students[0], metric=record.metric, class_weights=record.class_weights or None,
        epochs=epochs or record.epochs, out=runs, study_name=name or default_study_name(study_name, students), storage=storage,
        max_bad_images=record.max_bad_images, confine_paths=record.confine_paths, image_column=record.image_column,
        target_column=record.target_column, teacher=TeacherRef(study_name, str(teacher), url, str(runs)), argv=argv, **options,
    )


def _listed(value: str | Sequence[str] | None) -> tuple[str, ...] | None:
    """``"a,b"`` or ``["a", "b"]`` as ``("a", "b")``; ``None`` or empty as ``None``."""
    if value is None:
        return None
    items = tuple(v.strip() for v in (value.split(",") if isinstance(value, str) else value) if str(v).strip())
    return items or None


def export(study_name: str, *, storage: str | None = None, runs: str | Path = "runs", trial: str | int = "best",
           out: str | Path | None = None, opset: int = 18, precision: str = "fp32", quantize: str = "none",
           calibration: str = "static", quiet: bool = True) -> ExportReport:
    """Export a finished trial of a study to ONNX, as ``tlengine export`` does.

    Args:
        study_name: The study.
        storage: Its Optuna storage URL (default: the database or journal file in ``RUNS/STUDY/``).
        runs: Where the default storage lives.
        trial: A trial number, or ``"best"``.
        out: The ``.onnx`` file to write (default: beside the study, ``trial-N[.fp16|.int8].onnx``).
        opset: ONNX opset.
        precision: ``fp32`` or ``fp16``.
        quantize: ``none`` or ``int8``.
        calibration: ``static`` (activations calibrated on training images) or ``dynamic``, for int8.
        quiet: Show no progress.

    Returns:
        The model's path, its parity with PyTorch, its validation score in the study's metric and its latency.

    Raises:
        UserError: No such study or trial, contradicting options, or an export that disagrees with PyTorch.
    """
    from rich.console import Console

    from tlengine._export import export_study_trial
    from tlengine._study import find_study, pick_trial
    from tlengine.plugins import get_registry

    if precision not in ("fp32", "fp16") or quantize not in ("none", "int8") or calibration not in ("static", "dynamic"):
        raise UserError(f"precision={precision!r}, quantize={quantize!r}, calibration={calibration!r}: "
                        "expected fp32|fp16, none|int8 and static|dynamic")
    if precision == "fp16" and quantize == "int8":
        raise UserError("--precision fp16 and --quantize int8 exclude each other; pick one")
    variant = "fp16" if precision == "fp16" else f"int8-{calibration}" if quantize == "int8" else None
    study, _ = find_study(study_name, storage, str(runs))
    chosen = pick_trial(study, str(trial))
    if out is None:
        run_dir = Path(chosen.user_attrs.get("checkpoint", "")).parent.parent
        suffix = {"fp16": ".fp16", "int8-static": ".int8", "int8-dynamic": ".int8-dynamic"}.get(variant or "", "")
        out = run_dir / f"trial-{chosen.number}{suffix}.onnx"
    with Console(stderr=True, quiet=quiet).status(f"exporting trial {chosen.number} and checking it on the validation images"):
        return export_study_trial(get_registry(), study, chosen, Path(out), variant=variant, opset=opset)


def show(study_name: str, *, storage: str | None = None, runs: str | Path = "runs") -> Board:
    """A study's leaderboard, best first, as ``tlengine show`` prints it (also while workers write to it).

    Raises:
        UserError: No such storage or study.
    """
    from tlengine._report import leaderboard
    from tlengine._study import find_study

    return leaderboard(find_study(study_name, storage, str(runs))[0])


def report(study_name: str, *, storage: str | None = None, runs: str | Path = "runs", out: str | Path | None = None) -> Report:
    """Draw a study's plots into one self-contained HTML page, as ``tlengine report`` does.

    Args:
        study_name: The study.
        storage: Its Optuna storage URL (default: the database or journal file in ``RUNS/STUDY/``).
        runs: Where the default storage lives.
        out: The ``.html`` file (default: ``report.html`` in the study's run folder).

    Raises:
        UserError: No such storage or study, or the page cannot be written.
    """
    from tlengine._report import default_report_path, write_report
    from tlengine._study import find_study

    study, url = find_study(study_name, storage, str(runs))
    return write_report(study, Path(out) if out else default_report_path(study, runs), storage=url)
