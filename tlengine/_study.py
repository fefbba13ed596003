"""Studies: opening and reading the Optuna studies tlengine makes, their trials as rows, and the sampler and pruner."""

from __future__ import annotations

import datetime
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tlengine._errors import UserError, unknown
from tlengine._record import RECORD_KEY, StudyRecord, read_record, write_record

if TYPE_CHECKING:
    import optuna


@dataclass(frozen=True)
class TrialRow:
    """One trial of a study, as ``summary.json``, ``tlengine show`` and the report list it.

    Attributes:
        number: The trial number.
        state: Optuna's state name, lower case (``complete``, ``running``, ``pruned``, ``fail``).
        recipe: The hand-made recipe the trial ran (``linear probe``, ...), or ``None``.
        freeze_depth: Frozen stages, or ``None`` if the trial has not chosen yet.
        params: The values the sampler chose (searched dimensions only).
        values: Every value the trial used, fixed ones included (``None`` before it chose).
        score: The final metric of a completed trial, else the last epoch's (``final`` is then false).
        final: Whether ``score`` is the trial's final value.
        cost: The second objective of a multi-objective study.
        epochs: Epochs run so far.
        seconds: Duration; for a running trial, the time since it started.
        backbone: ``NAME:ARCH`` of its backbone in a search over several, else ``None``.
    """

    number: int
    state: str
    recipe: str | None
    freeze_depth: int | None
    params: dict[str, Any]
    values: dict[str, Any] | None
    score: float | None
    final: bool
    cost: float | None
    epochs: int
    seconds: float | None
    backbone: str | None = None


def trial_rows(study: optuna.Study) -> list[TrialRow]:
    """The trials a study ran or runs, by number: enqueued ones not yet started are left out, and so
    are the surplus trials a worker asked for after the study was full (it gave them back).

    Only reads the study, so it works on any storage, also while workers are writing to it.
    """
    now = datetime.datetime.now()
    rows = []
    for t in study.get_trials(deepcopy=False):
        if t.state.name == "WAITING" or t.user_attrs.get("surplus"):
            continue
        values = t.user_attrs.get("values")
        finished = t.state.name == "COMPLETE"
        last = t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None
        if t.duration is not None:
            seconds = t.duration.total_seconds()
        elif t.datetime_start is not None and t.state.name == "RUNNING":
            seconds = (now - t.datetime_start).total_seconds()
        else:
            seconds = None
        backbone = t.params.get("backbone", (values or {}).get("backbone"))
        depth = t.params.get("freeze_depth", t.params.get(f"freeze_depth[{backbone}]", (values or {}).get("freeze_depth")))
        rows.append(TrialRow(
            number=t.number, state=t.state.name.lower(), recipe=t.user_attrs.get("recipe"),
            freeze_depth=depth, params=dict(t.params), values=values, backbone=backbone,
            score=t.values[0] if finished and t.values else last, final=finished,
            cost=t.values[1] if finished and t.values and len(t.values) > 1 else None,
            epochs=len(t.intermediate_values) or len(t.user_attrs.get("history", ())), seconds=seconds,
        ))
    return rows


def best_numbers(study: optuna.Study) -> tuple[int, ...]:
    """The best trial's number (one, even when others tie with it), or the Pareto front's of a multi-objective study."""
    complete = study.get_trials(deepcopy=False, states=(_state("COMPLETE"),))
    if not complete:
        return ()
    if len(study.directions) == 1:
        return (study.best_trial.number,)
    return tuple(sorted(t.number for t in study.best_trials))


def _state(name: str) -> Any:
    from optuna.trial import TrialState

    return TrialState[name]


def make_sampler(name: str, seed: int, grid: dict[str, list[Any]] | None = None) -> Any:
    """Optuna's sampler for ``--sampler``: ``tpe`` (multivariate), ``random``, or ``grid`` over ``grid``.

    Raises:
        UserError: Unknown name, or a grid with nothing to sweep.
    """
    import optuna

    if name == "tpe":  # group: the policy's own dimensions and the plugins' are sampled in the trials that use them
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, n_startup_trials=5)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "grid":
        if grid is not None and not grid:
            raise UserError("--sampler grid: nothing is searched; give a dimension a list or a range")
        return optuna.samplers.GridSampler(grid or {"freeze_depth": [0]}, seed=seed)
    raise unknown("sampler", name, ["tpe", "random", "grid"], "--sampler")


def make_pruner(name: str, epochs: int = 5) -> Any:
    """Optuna's pruner for ``--pruner``: ``median``, ``hyperband`` or ``none``, for trials of ``epochs`` epochs.

    ``median`` knows the schedule: with warmup and a cosine decay a trial's score keeps
    rising to its last epoch, so early scores rank trials poorly (a trial of the demo rose
    from 0.47 to 0.88 to the study's best in its last epoch, after three others were stopped at
    0.79-0.84 below the median). No trial is judged before half its epochs are done, and
    then only one in the bottom quarter of the trials at the same epoch is stopped (Optuna's
    ``PercentilePruner`` keeping 75 %). ``benchmarks/pruning.py`` replays both rules on studies run
    without pruning and counts the stopped trials that would have ended best.

    Raises:
        UserError: Unknown name.
    """
    import optuna

    if name == "median":
        # Optuna's percentile is the share of trials kept: 75 stops the bottom quarter, in either direction
        return optuna.pruners.PercentilePruner(75.0, n_startup_trials=3, n_warmup_steps=max(1, epochs // 2))
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise unknown("pruner", name, ["median", "hyperband", "none"], "--pruner")


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (database drivers add paragraphs)."""
    return (str(exc).strip().splitlines() or [""])[0]


def _open_storage(storage: str) -> optuna.storages.BaseStorage:
    """``make_storage`` with its failures as one-line errors naming ``--storage``."""
    from tlengine._storage import make_storage

    try:
        return make_storage(storage)
    except UserError:
        raise
    except (ValueError, ImportError) as exc:
        raise UserError(f"--storage {storage}: cannot open it ({first_line(exc)})") from exc
    except Exception as exc:  # database drivers raise their own types
        raise UserError(f"--storage {storage}: cannot open it ({type(exc).__name__}: {first_line(exc)})") from exc


def open_study(storage: str, study_name: str, directions: list[str], sampler: optuna.samplers.BaseSampler,
               pruner: optuna.pruners.BasePruner, record: StudyRecord) -> tuple[optuna.Study, bool]:
    """Create the study with ``record``, or load it and check that it was made for the same objective.

    Returns:
        ``(study, created)``: ``created`` is true for the one worker that made the study
        (it enqueues the opening recipes, so several workers starting together enqueue them once).

    Raises:
        UserError: The storage cannot be opened, or the study was made with other options.
    """
    import optuna

    storage_object = _open_storage(storage)
    try:
        try:
            study = optuna.create_study(study_name=study_name, storage=storage_object, directions=directions, sampler=sampler, pruner=pruner)
            created = True
        except optuna.exceptions.DuplicatedStudyError:
            study = optuna.load_study(study_name=study_name, storage=storage_object, sampler=sampler, pruner=pruner)
            created = False
    except Exception as exc:  # database drivers raise their own types
        raise UserError(f"--storage {storage}: cannot open it ({type(exc).__name__}: {first_line(exc)})") from exc
    if created or RECORD_KEY not in study.user_attrs:  # not yet: the creator is a moment behind, or an empty study
        write_record(study, record)
        return study, created
    existing = [d.name.lower() for d in study.directions]
    if existing != directions:
        have, want = " and ".join(f"{d}s" for d in existing), " and ".join(f"{d}s" for d in directions)
        raise UserError(f"--study-name {study_name}: the study {have}, not {want}; choose another --study-name")
    conflict = record.conflict(read_record(study))
    if conflict:
        raise UserError(f"--study-name {study_name}: {conflict}")
    return study, False


def saved_record(storage: str, study_name: str) -> StudyRecord | None:
    """The record of an existing tlengine study, or ``None`` when there is no such study (yet).

    Raises:
        UserError: The storage cannot be opened.
    """
    import optuna

    storage_object, names = _study_names(storage)
    if study_name not in names:
        return None
    study = optuna.load_study(study_name=study_name, storage=storage_object)
    return read_record(study) if RECORD_KEY in study.user_attrs else None  # no record yet: its creator is a moment behind


def _study_names(storage: str) -> tuple[optuna.storages.BaseStorage, list[str]]:
    """The opened storage and the names of its studies.

    Raises:
        UserError: The storage cannot be opened.
    """
    import optuna

    storage_object = _open_storage(storage)
    try:
        return storage_object, optuna.get_all_study_names(storage_object)
    except Exception as exc:  # database drivers raise their own types
        raise UserError(f"--storage {storage}: cannot open it ({type(exc).__name__}: {first_line(exc)})") from exc


def load_study(storage: str, study_name: str) -> optuna.Study:
    """Open an existing tlengine study.

    Raises:
        UserError: The storage cannot be opened, the study does not exist, or it was not made by tlengine.
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage_object, names = _study_names(storage)
    if study_name not in names:
        raise UserError(f"--study-name {study_name}: no such study in {storage}; it has: {', '.join(names) or 'none'}")
    study = optuna.load_study(study_name=study_name, storage=storage_object)
    read_record(study)  # a tlengine study?
    return study


def find_study(study_name: str, storage: str | None = None, runs: str = "runs") -> tuple[optuna.Study, str]:
    """The study that ``export``, ``show`` and ``report`` name, and its storage URL: ``storage``, else
    the database or journal file in ``RUNS/STUDY/``.

    Raises:
        UserError: No such storage or study.
    """
    from tlengine._storage import study_storage

    url = study_storage(storage, runs, study_name)
    return load_study(url, study_name), url


def pick_trial(study: Any, which: str, option: str = "--trial") -> Any:
    """The study's best trial (``which == "best"``) or trial number ``which``, which must be complete
    (``option`` names the flag in messages).

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
        raise UserError(f"{option} {which}: expected a trial number or 'best'") from None
    if number not in numbers:
        listing = ", ".join(str(n) for n in sorted(numbers))
        raise UserError(f"{option} {number}: not a completed trial of study {study.study_name}; completed: {listing}")
    return numbers[number]
