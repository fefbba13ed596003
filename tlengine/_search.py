"""``tlengine search``, the driver: setup, study, recipes, optimize, finish.

What each step does lives elsewhere: :mod:`tlengine._setup` decides everything once,
:mod:`tlengine._runner` runs a trial, :mod:`tlengine._inputs` feeds it,
:mod:`tlengine._workers` starts workers, and the finish exports the best trial
(:mod:`tlengine._export`) and draws the report (:mod:`tlengine._report`).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, replace
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tlengine._errors import UserError
from tlengine._options import SearchConfig
from tlengine._record import StudyRecord
from tlengine._study import TrialRow
from tlengine._timing import current_stages, stage, stopwatch
from tlengine._workers import SearchInterrupted

if TYPE_CHECKING:
    import optuna
    import rich.console
    import torch

    from tlengine._inputs import InputSource
    from tlengine._setup import SearchSetup

__all__ = ["SearchConfig", "SearchInterrupted", "SearchResult", "run_search"]


@dataclass(frozen=True)
class SearchResult:
    """What a search produced.

    Attributes:
        study_name: The study.
        storage: Its Optuna storage URL.
        run_dir: The run folder (checkpoints, ``best.onnx``, ``summary.json``, ``report.html``).
        record: The study's record (backbone, task, classes, metric, space, ...).
        rows: Every trial the study ran, by number.
        best: The best trial (``None`` if none completed).
        searched: The dimensions Optuna chose.
        pareto: The Pareto front's trial numbers of a multi-objective study.
        onnx_path: The exported best model, or ``None``.
        parity: onnxruntime vs PyTorch on the validation images (``max_abs_diff``, ``top1_agreement``).
        distillation: A distillation study's teacher and best student side by side (score, ``params_m``,
            ``latency_ms``), or ``None``.
        stages: Where this process's time and memory went: ``{stage: {"seconds", "calls",
            "peak_rss_mb", "peak_anon_mb"}}`` for listing, checking images, backbone, decoding,
            features, training, export, export scoring, report and report predictions
            (:mod:`tlengine._timing`); also in ``summary.json``.
    """

    study_name: str
    storage: str
    run_dir: Path
    record: StudyRecord
    rows: tuple[TrialRow, ...]
    best: TrialRow | None
    searched: tuple[str, ...] = ()
    pareto: tuple[int, ...] = ()
    onnx_path: Path | None = None
    parity: dict[str, Any] | None = None
    stages: dict[str, dict[str, Any]] | None = None
    distillation: dict[str, Any] | None = None

    @property
    def metric(self) -> str:
        """The validation metric."""
        return self.record.metric

    @property
    def direction(self) -> str:
        """``maximize`` or ``minimize``."""
        from tlengine._metrics import METRICS

        return METRICS[self.record.metric][1]

    @property
    def objectives(self) -> tuple[str, ...]:
        """``(metric, cost)`` of a multi-objective search, else empty."""
        return tuple(self.record.objectives or ())


def run_search(config: SearchConfig, console: rich.console.Console) -> SearchResult:
    """Run (or resume) a search and export its best trial.

    Args:
        config: The options.
        console: A ``rich.console.Console`` for progress and messages.

    Raises:
        UserError: For any mistake in the options, the config file or the data.
        SearchInterrupted: Ctrl-C stopped it; finished trials are kept and the same command resumes it.
    """
    with stopwatch():
        return _search(config, console)


def _search(config: SearchConfig, console: rich.console.Console) -> SearchResult:
    """:func:`run_search` inside its stopwatch."""
    import time

    import optuna

    from tlengine._decide import adopt, decide, rank
    from tlengine._setup import make_setup
    from tlengine._study import saved_record
    from tlengine._workers import run_workers

    started = time.monotonic()
    setup = make_setup(config, console)
    warn = lambda line: console.print(line, soft_wrap=True, markup=False, highlight=False)  # noqa: E731
    sources = _sources(setup, warn)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    saved = saved_record(setup.storage, setup.study_name)  # a storage that cannot be opened fails here, first
    if saved is None:
        setup = rank(setup, sources, warn)
    main = setup.record.backbone_spec if saved is None else saved.backbone_spec
    setup, source = adopt(setup, sources[main], saved) if saved is not None else decide(setup, sources[main], warn)
    sources = {spec: source if spec == main else s.with_data_config(setup.record.for_backbone(spec).data_config)
               for spec, s in sources.items()}
    if setup.teacher is not None:  # a distillation study's trials look the teacher's outputs up by image index
        sources = {spec: s.for_distillation() for spec, s in sources.items()}
    study = open_search_study(setup, console)
    done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    finished = sum(t.state in done for t in study.trials)
    remaining = max(0, setup.n_trials - finished)
    if setup.workers > 1 and config.worker is None:
        run_workers(setup, study, remaining, console)
        remaining = 0
    if finished and config.worker is None:
        console.print(f"resuming study [bold]{setup.study_name}[/]: {finished} of {setup.n_trials} trials already finished")
    if remaining:
        optimize(setup, study, sources, remaining, console, deadline=None if setup.timeout is None else started + setup.timeout)
    short = setup.record.short_names()
    for spec, summary in ((spec, s.summary()) for spec, s in sources.items()):
        if summary:
            warn(f"{setup.label}{short[spec] + ' ' if len(sources) > 1 else ''}{summary}")
    if config.worker is not None:
        return SearchResult(setup.study_name, setup.storage, setup.run_dir, setup.record, (), None, setup.searched,
                            stages=current_stages())
    return finish(setup, study, console)


def _sources(setup: SearchSetup, log: Callable[[str], None]) -> dict[str, InputSource]:
    """Each backbone's :class:`~tlengine._inputs.InputSource` (its own feature caches), by ``NAME:ARCH``."""
    from tlengine._inputs import input_source

    config = setup.config
    return {c.spec: input_source(setup.data, setup.record.for_backbone(c.spec).data_config, setup.device, seed=config.seed, cache=config.cache_options(), base=c.base,
                                 backbone_id=f"{c.backbone.name}:{c.arch}", stages=c.stages, log=log, early_size=config.early_size,
                                 early_epochs=config.early_epochs)
            for c in (setup.candidates or (setup.candidate(setup.record.backbone_spec),))}


def open_search_study(setup: SearchSetup, console: rich.console.Console) -> optuna.Study:
    """Open (or create) the study, recover the trials of dead local workers, and, in the worker that
    created it, enqueue the recipes a user would try by hand, so the search never does worse than them."""
    from tlengine._resume import recover_dead_workers
    from tlengine._space import opening_recipes
    from tlengine._study import open_study

    study, created = open_study(setup.storage, setup.study_name, setup.directions, setup.sampler, setup.pruner, setup.record)
    recovered = recover_dead_workers(study)
    if recovered:
        console.print(f"trial(s) {', '.join(map(str, recovered))} lost their worker; each resumes from its last checkpoint")
    if created and setup.sampler_name != "grid":
        optimizer_dim = setup.space["optimizer"]
        first_optimizer = optimizer_dim.value if not optimizer_dim.searched else optimizer_dim.choices[0]
        default_lr = setup.record.lr_test["suggested"] if setup.record.lr_test else setup.registry.optimizers[first_optimizer].default_lr
        for recipe, params, overrides in opening_recipes(setup.space, setup.record.stages, default_lr):
            if optimizer_dim.searched:
                params["optimizer"] = first_optimizer
            if "backbone" in setup.space:  # on the top-ranked backbone, its own freeze-depth parameter
                main = setup.record.backbone_spec
                if setup.space["backbone"].searched:
                    params["backbone"] = main
                if "freeze_depth" in params:
                    params[f"freeze_depth[{main}]"] = params.pop("freeze_depth")
            study.enqueue_trial(params, user_attrs={"recipe": recipe, "overrides": overrides})
    return study


def optimize(setup: SearchSetup, study: optuna.Study, sources: Mapping[str, InputSource], remaining: int, console: rich.console.Console, *,
             deadline: float | None = None) -> None:
    """Run trials in this process until the study has its ``--trials`` or ``deadline`` (``time.monotonic()``,
    from ``--timeout``) passes, with progress bars: at the deadline no trial starts, and the running one
    stops at its next epoch end (pruned, with its last score).

    Raises:
        SearchInterrupted: Ctrl-C or SIGTERM: the running trial checkpointed (or, on a second Ctrl-C, stopped at once) and is queued to resume.
        UserError: A trial's checkpoint could not be written (it is queued to resume).
    """
    import signal
    import time

    import optuna
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from tlengine._resume import catch_interrupts, keep_for_resume
    from tlengine._runner import Surplus, TrialRunner
    from tlengine._train import TrialInterrupted

    record = setup.record
    console.print(
        f"{setup.label}searching {setup.n_trials} trials of {record.epochs} epochs over {', '.join(setup.searched) or 'nothing'}: "
        f"{_backbones(setup)}, {len(setup.data.train)} train / {len(setup.data.val)} val images, "
        f"{setup.space['image_size'].describe()}px, {record.metric}{' vs ' + record.cost if record.cost else ''}, {setup.device}"
        + (_taught(setup.teacher) if setup.teacher is not None else "")
    )
    done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    runner: TrialRunner | None = None

    def first_interrupt(signum: int) -> None:
        if runner is not None and runner.running is not None:
            why = " (SIGTERM)" if signum == signal.SIGTERM else ""
            console.print(f"stopping{why}: saving trial {runner.running}'s checkpoint first (Ctrl-C again to stop at once)")

    with Progress(*columns, console=console, transient=False, disable=setup.config.worker is not None) as progress, \
            catch_interrupts(first_interrupt) as stop:
        runner = TrialRunner(setup, study, sources, console=console, progress=progress, overall=progress.add_task("trials", total=remaining),
                             should_stop=stop, deadline=deadline)
        optuna.logging.set_verbosity(optuna.logging.ERROR)  # a surplus trial is not a failure to report
        try:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            study.optimize(runner, timeout=left, catch=(Surplus,),
                           callbacks=[optuna.study.MaxTrialsCallback(setup.n_trials, states=done), lambda s, t: s.stop() if stop() else None])
        except (TrialInterrupted, KeyboardInterrupt, UserError) as exc:
            keep_for_resume(study, runner.running, always=not isinstance(exc, UserError))
            if isinstance(exc, UserError):
                raise
            raise SearchInterrupted(f"trial {runner.running}'s checkpoint saved" if isinstance(exc, TrialInterrupted)
                                    else "stopped at once; the running trial resumes from its last epoch", stop.signum) from exc
        finally:
            summary = runner.distiller.summary() if runner.distiller is not None else None
            if summary:
                console.print(f"{setup.label}{summary}", soft_wrap=True, markup=False, highlight=False)
        if stop():
            raise SearchInterrupted("stopped between trials", stop.signum)


def _taught(teacher: Any) -> str:
    """``; taught by trial 3 of study s (resnet50, accuracy 0.9120)``."""
    trials = ", ".join(str(n) for n in teacher.trials)
    archs = ", ".join(dict.fromkeys(b.rpartition(":")[2] for b in teacher.backbones))
    return (f"; taught by trial{'s' if len(teacher.trials) > 1 else ''} {trials} of study {teacher.study_name} ({archs}, "
            f"{teacher.record.metric} {', '.join(f'{s:.4f}' for s in teacher.scores)})")


def _backbones(setup: SearchSetup) -> str:
    """``NAME:ARCH (N stages)``, for each backbone the search trains."""
    dim = setup.space.get("backbone")
    specs = [setup.record.backbone_spec] if dim is None else [dim.value] if dim.kind == "fixed" else list(dim.choices)
    return ", ".join(f"{spec} ({setup.record.for_backbone(spec).stages} stages)" for spec in specs)


def finish(setup: SearchSetup, study: optuna.Study, console: rich.console.Console) -> SearchResult:
    """List the trials, export the best one to ONNX beside the study, and write ``summary.json`` and ``report.html``.

    The best trial's model is built once from its checkpoint, for the export and the report.
    """
    from tlengine._export import export_study_trial
    from tlengine._model import build_trial_model
    from tlengine._study import best_numbers, pick_trial, trial_rows

    rows = tuple(trial_rows(study))
    pareto = best_numbers(study) if setup.record.objectives else ()
    result = SearchResult(setup.study_name, setup.storage, setup.run_dir, setup.record, rows, None, setup.searched, pareto)
    if not any(row.state == "complete" for row in rows):
        return write_summary(result)
    best_trial = pick_trial(study, "best")
    result = replace(result, best=next(r for r in rows if r.number == best_trial.number))
    checkpoint = Path(best_trial.user_attrs.get("checkpoint", ""))
    if not checkpoint.is_file():
        console.print(f"[yellow]warning:[/] the best trial's checkpoint {checkpoint} is not on this machine; not exporting "
                      f"(export it where it is: tlengine export --storage URL --study-name {setup.study_name} --trial {best_trial.number})")
        return write_summary(result)
    values = best_trial.user_attrs.get("values", best_trial.params)
    model = build_trial_model(setup.registry, setup.record, values, checkpoint=checkpoint)
    with console.status("exporting the best trial to ONNX and checking it with onnxruntime"), stage("export"):
        shutil.copyfile(checkpoint, setup.run_dir / "best.safetensors")
        onnx_path = setup.run_dir / "best.onnx"
        report = export_study_trial(setup.registry, study, best_trial, onnx_path, data=setup.data, model=model)
    result = replace(result, onnx_path=onnx_path, parity=asdict(report.parity))
    if setup.teacher is not None:
        from tlengine._distill import comparison

        with console.status("comparing the student with its teacher"):
            compared = comparison(setup.teacher, setup.registry, study, setup.record, setup.data)
        study.set_user_attr("distillation", compared)
        result = replace(result, distillation=compared)
    return write_summary(result, best_model=model, data=setup.data)


def write_summary(result: SearchResult, *, best_model: torch.nn.Module | None = None, data: Any = None) -> SearchResult:
    """Write ``report.html`` and ``summary.json`` (best trial, record, every trial, stages) beside the study.

    The report goes first, so that the summary's stages count it.

    Args:
        result: The search's result.
        best_model: The best trial's model, if already built (the report runs it on the validation images).
        data: The study's data, if already loaded.

    Returns:
        ``result`` with its stages.
    """
    from tlengine._report import report_after_search

    with stage("report"):
        report_after_search(result.storage, result.study_name, result.run_dir, best_model=best_model, data=data)
    result = replace(result, stages=current_stages())
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
        "config": result.record.to_dict(),
        "trials": [asdict(r) for r in result.rows],
        "stages": result.stages,
        **({"distillation": result.distillation} if result.distillation else {}),
    }
    (result.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return result
