"""What a study found, for people: the leaderboard, the plots, one self-contained HTML page.

``tlengine show`` prints the leaderboard; ``tlengine report`` (and every search, at its
end) draws the plots with Optuna's matplotlib visualizations and matplotlib, and writes
them into one HTML file with the images embedded, plus the PNGs beside it.
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tlengine._errors import UserError
from tlengine._record import read_record
from tlengine._storage import safe_url
from tlengine._study import TrialRow, best_numbers, first_line, trial_rows

if TYPE_CHECKING:
    import optuna
    import torch

    from tlengine._records import ImageData
    from tlengine.plugins import Registry

#: Order of the states on the leaderboard, after the completed trials.
STATE_ORDER = ("COMPLETE", "RUNNING", "PRUNED", "FAIL")

#: How many of the worst validation images the grid shows (in rows of six).
WORST_IMAGES = 18

#: Plots that take the page's whole width.
WIDE_PLOTS = ("freeze_depth", "per_class", "residuals", "worst")


@dataclass(frozen=True)
class Board:
    """A study's leaderboard: its trials, best first.

    Attributes:
        study_name: The study.
        metric: The validation metric.
        direction: ``maximize`` or ``minimize``.
        stages: Number of stages of the backbone (the deepest freeze depth).
        cost_name: The second objective (``latency``, ``params``) or ``None``.
        columns: The searched parameters shown after freeze depth and lr.
        rows: The trials: completed ones best first, then running, pruned, failed.
        best: The best trials' numbers (the Pareto front of a multi-objective study).
        stages_of: Each backbone's stage count, by ``NAME:ARCH``, in a search over several (else empty).
        short_names: Each backbone's short name (:meth:`~tlengine._record.StudyRecord.short_names`).
    """

    study_name: str
    metric: str
    direction: str
    stages: int
    cost_name: str | None
    columns: tuple[str, ...]
    rows: tuple[TrialRow, ...]
    best: tuple[int, ...]
    stages_of: Mapping[str, int] = field(default_factory=dict)
    short_names: Mapping[str, str] = field(default_factory=dict)

    def header(self) -> list[str]:
        """The column titles."""
        cost = [self.cost_name] if self.cost_name else []
        first = ["backbone"] if "backbone" in self.columns else []
        return ["trial", "recipe", "state", *first, "freeze depth", "lr", *(c.replace("_", " ") for c in self.columns if c != "backbone"),
                self.metric, *cost, "epochs", "seconds"]

    def cells(self, row: TrialRow) -> list[str]:
        """One row as text; a score in parentheses is the last epoch's of an unfinished trial."""
        mark = ("★ " if len(self.best) == 1 else "◆ ") if row.number in self.best else ""
        score = "" if row.score is None else f"{row.score:.4f}" if row.final else f"({row.score:.4f})"
        cost = [format_value(row.cost)] if self.cost_name else []
        return [
            f"{mark}{row.number}", row.recipe or "", row.state,
            *([self.short_names.get(row.backbone or "", row.backbone or "")] if "backbone" in self.columns else []),
            f"{row.freeze_depth}/{self.stages_of.get(row.backbone, self.stages)}" if row.freeze_depth is not None else "",
            format_value(row.params.get("lr")), *(format_value(row.params.get(c)) for c in self.columns if c != "backbone"),
            score, *cost, str(row.epochs), f"{row.seconds:.1f}" if row.seconds is not None else "",
        ]


def format_value(value: Any) -> str:
    """A parameter value as short text: small and large floats in scientific notation."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.2e}" if value != 0 and (abs(value) < 1e-2 or abs(value) >= 1e3) else f"{value:.3g}"
    return str(value)


def leaderboard(study: Any) -> Board:
    """The trials of a tlengine study (:func:`tlengine._study.trial_rows`), best first.

    Only reads the study, so it works on any storage, also while workers are writing to it.
    """
    record = read_record(study)
    maximize = study.directions[0].name == "MAXIMIZE"
    best = best_numbers(study)

    def order(row: TrialRow) -> tuple[int, float, bool, int]:
        rank = STATE_ORDER.index(row.state.upper()) if row.state.upper() in STATE_ORDER else len(STATE_ORDER)
        score = -math.inf if row.score is None or math.isnan(row.score) else row.score if maximize else -row.score
        return rank, -score, row.number not in best, row.number  # ties: the best trial first

    rows = sorted(trial_rows(study), key=order)
    searched = sorted({name for row in rows for name in row.params if not name.startswith("freeze_depth")} - {"lr"})
    space = list(record.space)
    columns = tuple(sorted(searched, key=lambda n: (space.index(n) if n in space else len(space), n)))
    return Board(
        study_name=study.study_name, metric=record.metric, direction="maximize" if maximize else "minimize",
        stages=record.stages, cost_name=record.cost, columns=columns, rows=tuple(rows), best=best,
        stages_of={spec: record.for_backbone(spec).stages for spec in record.backbones} if record.candidates else {},
        short_names=record.short_names() if record.candidates else {},
    )


@dataclass(frozen=True)
class Plot:
    """One figure of the report, or why it is missing.

    Attributes:
        name: File stem and HTML id (``freeze_depth``, ``history``, ...).
        title: Its heading.
        caption: What it shows, one or two sentences.
        png: The PNG image, or ``None`` when the plot could not be drawn.
        note: Why it is missing (when ``png`` is ``None``).
    """

    name: str
    title: str
    caption: str
    png: bytes | None = None
    note: str = ""


@dataclass(frozen=True)
class Report:
    """What :func:`write_report` wrote.

    Attributes:
        path: The HTML page.
        folder: The folder of PNGs beside it.
        plots: Every plot, drawn or not, in page order.
    """

    path: Path
    folder: Path
    plots: tuple[Plot, ...]

    @property
    def drawn(self) -> tuple[str, ...]:
        """Names of the plots that were drawn."""
        return tuple(p.name for p in self.plots if p.png is not None)

    @property
    def missing(self) -> tuple[Plot, ...]:
        """The plots that could not be drawn, with their notes."""
        return tuple(p for p in self.plots if p.png is None)


class _Skip(Exception):
    """A plot that cannot be drawn for this study; the message goes into the page."""


@dataclass(frozen=True)
class _Predictions:
    """The best trial's outputs on the validation images."""

    items: Sequence[Any]
    targets: Any
    outputs: Any
    classes: tuple[str, ...]
    task: str


def default_report_path(study: Any, runs: str | Path) -> Path:
    """``report.html`` in the study's run folder: where its checkpoints are, else ``RUNS/STUDY``."""
    for t in study.get_trials(deepcopy=False):
        checkpoint = t.user_attrs.get("checkpoint")
        if checkpoint and Path(checkpoint).parent.parent.is_dir():
            return Path(checkpoint).parent.parent / "report.html"
    return Path(runs) / study.study_name / "report.html"


def write_report(study: optuna.Study, path: Path, *, storage: str = "", registry: Registry | None = None,
                 best_model: torch.nn.Module | None = None, data: ImageData | None = None) -> Report:
    """Draw every plot of ``study`` and write the HTML page ``path`` with them embedded.

    The PNGs also go into ``NAME_files/`` beside the page. A plot that cannot be drawn
    for this study (too few trials, the best checkpoint on another machine, ...) is left
    out with a note on the page.

    Args:
        study: A tlengine study (see :func:`tlengine._study.load_study`).
        path: The ``.html`` file to write.
        storage: The storage URL, named in the page's footer (without its password).
        registry: The plugin registry (to rebuild the best model); loaded if ``None``.
        best_model: The best trial's model, if already built from its checkpoint; else built here.
        data: The study's data, if already loaded (unreadable images left out); else loaded again.

    Raises:
        UserError: The page or its folder cannot be written.
    """
    import warnings

    import matplotlib
    from optuna.exceptions import ExperimentalWarning

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    folder = path.with_name(path.stem + "_files")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{path}: cannot write the report ({exc.strerror or exc})") from exc
    board = leaderboard(study)
    with matplotlib.rc_context(), warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)  # Optuna's matplotlib plots are marked experimental
        warnings.filterwarnings("ignore", message=".*computes the importances of params to achieve low `target`")
        warnings.filterwarnings("ignore", message="Some regimes for parameter")  # a conditional parameter (one backbone's depth)
        plots = _draw_all(study, board, lambda: _best_predictions(study, registry, best_model, data))
    drawn = {p.name for p in plots if p.png is not None}
    partial = path.with_name(f".{path.name}.partial")  # a reader (or another worker) never sees half a page
    try:
        for stale in folder.glob("*.png"):  # plots of an earlier report that could not be drawn this time
            if stale.stem not in drawn:
                stale.unlink()
        for plot in plots:
            if plot.png is not None:
                (folder / f"{plot.name}.png").write_bytes(plot.png)
        partial.write_text(_page(study, board, plots, storage), encoding="utf-8")
        partial.replace(path)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise UserError(f"{path}: cannot write the report ({exc.strerror or exc})") from exc
    return Report(path, folder, tuple(plots))


def report_after_search(storage: str, study_name: str, run_dir: Path, *, best_model: torch.nn.Module | None = None,
                        data: ImageData | None = None) -> Path | None:
    """Write ``run_dir/report.html`` at the end of a search; a failure is a warning, never an error."""
    from tlengine._study import load_study

    try:
        study = load_study(storage, study_name)
        return write_report(study, run_dir / "report.html", storage=storage, best_model=best_model, data=data).path
    except Exception as exc:  # the search's results matter more than its pictures
        problem = str(exc) if isinstance(exc, UserError) else f"could not draw the report ({type(exc).__name__}: {first_line(exc)})"
        print(f"warning: {problem}; the search's results are kept, draw it again with "
              f"tlengine report --study-name {study_name} --storage {safe_url(storage)}", file=sys.stderr)
        return None


def _draw_all(study: optuna.Study, board: Board, best_predictions: Callable[[], _Predictions]) -> list[Plot]:
    record = read_record(study)
    metric = record.metric
    classification = record.task == "classification"
    drawers: list[tuple[str, str, str, Callable[[], Any]]] = [
        ("freeze_depth", f"Validation {metric} vs freeze depth",
         f"One point per trial; the stars mark the best trial at each depth. Depth 0 trains the whole backbone, "
         f"{board.stages} (all stages frozen) trains only the head.", lambda: _freeze_depth_plot(board)),
        ("history", "Optimization history", f"Each completed trial's {metric} in the order the trials ran, and the best so far.",
         lambda: _history_plot(study, metric)),
        ("importances", "Parameter importances", f"How much each searched parameter explains the {metric} (Optuna's PED-ANOVA evaluator).",
         lambda: _importance_plot(study, metric)),
        ("learning_curves", "Learning curves", f"Validation {metric} after each epoch; pruned trials stop early (×).",
         lambda: _learning_curves(study, metric)),
    ]
    predictions: list[_Predictions | str] = []

    def predicted() -> _Predictions:
        if not predictions:  # rebuilt and run once, for all the plots of the best model
            try:
                predictions.append(best_predictions())
            except (UserError, _Skip) as exc:
                predictions.append(str(exc))
            except Exception as exc:
                predictions.append(f"could not run the best model ({type(exc).__name__}: {first_line(exc)})")
        if isinstance(predictions[0], str):
            raise _Skip(predictions[0])
        return predictions[0]

    best = f"the best trial ({board.rows[0].number})" if board.best else "the best trial"
    if classification:
        drawers += [
            ("confusion_matrix", "Confusion matrix", f"{best.capitalize()} on the validation images: rows are the true classes, "
             "columns the predicted ones; the colour is the share of the row.", lambda: _confusion_plot(predicted())),
            ("per_class", "Precision and recall per class", f"{best.capitalize()} on the validation images.",
             lambda: _per_class_plot(predicted())),
            ("worst", "Worst-classified validation images", f"The validation images to which {best} gives the lowest probability "
             "of their true class, titled true → predicted (probability of the prediction).", lambda: _worst_grid(predicted())),
        ]
    else:
        drawers += [
            ("predicted_vs_true", "Predicted vs true", f"{best.capitalize()} on the validation images; the line is a perfect prediction.",
             lambda: _predicted_vs_true(predicted())),
            ("residuals", "Residuals", f"Prediction minus truth of {best}, against the truth and as a histogram.",
             lambda: _residual_plot(predicted())),
            ("worst", "Largest errors", f"The validation images {best} is furthest off for, titled true → predicted.",
             lambda: _worst_grid(predicted())),
        ]
    import matplotlib.pyplot as plt

    plots = []
    for name, title, caption, draw in drawers:
        before = set(plt.get_fignums())
        try:
            plots.append(Plot(name, title, caption, png=_png(draw())))
        except _Skip as exc:
            plots.append(Plot(name, title, caption, note=str(exc)))
        except Exception as exc:  # one broken plot costs that plot, not the page
            plots.append(Plot(name, title, caption, note=f"could not draw it ({type(exc).__name__}: {first_line(exc)})"))
        for number in set(plt.get_fignums()) - before:
            plt.close(number)
    return plots


def _png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def _figure(width: float = 7.5, height: float = 4.5, style: str = "ggplot") -> Any:
    """A new pyplot figure in the style of Optuna's plots."""
    import matplotlib.pyplot as plt

    plt.style.use(style)
    return plt.figure(figsize=(width, height), layout="constrained")


def _complete(study: Any) -> list[Any]:
    return [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]


def _freeze_depth_plot(board: Board) -> Any:
    """Score against freeze depth: every trial, and a line through the best at each depth; one colour and
    line per backbone in a search over several."""
    done = [r for r in board.rows if r.score is not None and r.freeze_depth is not None and r.state in ("complete", "pruned")]
    if not done:
        raise _Skip("no trial has a score yet")
    maximize = board.direction == "maximize"
    figure = _figure(11.0, 4.6)
    ax = figure.subplots()
    groups: dict[str | None, list[TrialRow]] = {}
    for row in sorted(done, key=lambda r: r.number):
        groups.setdefault(row.backbone if board.stages_of else None, []).append(row)
    finals = [r.score for r in done if r.final]
    limits = _score_range(finals) if finals else None
    if limits:  # the completed trials set the scale; a pruned trial far off it sits on the edge, marked ▼ or ▲
        ax.set_ylim(*limits)
    colours = ("#348ABD", "#E24A33", "#988ED5", "#8EBA42", "#FBC15E", "#777777")
    width = 0.36 / max(1, len(groups))
    tops: list[tuple[float, TrialRow]] = []
    labelled: set[str] = set()
    for g, (backbone, rows) in enumerate(sorted(groups.items(), key=lambda item: str(item[0]))):
        shift = (g - (len(groups) - 1) / 2) * width * 1.2 if len(groups) > 1 else 0.0
        name = board.short_names.get(backbone or "", backbone) if backbone else None
        tops += _depth_group(ax, rows, shift, width, limits, maximize, colours[g % len(colours)], name, labelled)
    if tops:
        x, top = (max if maximize else min)(tops, key=lambda item: item[1].score)
        ax.annotate(f"trial {top.number}: {top.score:.4f}", (x, top.score), textcoords="offset points",
                    xytext=(10, -14 if maximize else 10), fontsize=9)
    stages = max([board.stages, *board.stages_of.values(), *(r.freeze_depth for r in done)])
    ax.set_xticks(range(stages + 1))
    labels = [str(d) for d in range(stages + 1)]
    labels[0] = "0\nfull fine-tune"
    if not board.stages_of:
        labels[-1] = f"{stages}\nlinear probe"
    ax.set_xticklabels(labels)
    ax.set_xlim(-0.6, stages + 0.6)
    ax.set_xlabel("freeze depth: frozen stages of the backbone" + (" (each backbone's deepest is its linear probe)" if board.stages_of else ""))
    ax.set_ylabel(f"validation {board.metric}")
    ax.set_title(f"{board.metric} vs freeze depth ({'higher' if maximize else 'lower'} is better)")
    ax.legend(loc="best", fontsize=8)
    return figure


def _depth_group(ax: Any, rows: list[TrialRow], shift: float, width: float, limits: tuple[float, float] | None, maximize: bool,
                 colour: str, name: str | None, labelled: set[str]) -> list[tuple[float, TrialRow]]:
    """Draw one backbone's trials (offset by ``shift``) and the line through its best at each depth; the stars' places."""
    import numpy as np

    by_depth: dict[int, list[TrialRow]] = {}
    for row in rows:
        by_depth.setdefault(row.freeze_depth, []).append(row)
    xs, ys, where = [], [], {}
    for depth, group in by_depth.items():
        offsets = np.linspace(-width / 2, width / 2, len(group)) if len(group) > 1 else [0.0]
        for row, offset in zip(group, offsets):
            x = where[row.number] = depth + shift + offset
            if row.final:
                xs.append(x)
                ys.append(row.score)
                continue
            low, high = limits or (-math.inf, math.inf)
            inset = 0.02 * (high - low) if limits else 0.0
            y = row.score
            clipped = y if low <= y <= high else low + inset if y < low else high - inset
            label = "pruned (score when stopped)" if clipped == y else "pruned, off the scale"
            ax.scatter([x], [clipped], marker="x" if clipped == y else "v" if y < low else "^", color="#888888", s=40, zorder=2,
                       clip_on=False, label=None if label in labelled else label)
            labelled.add(label)
            if clipped != y:
                ax.annotate(f"{y:.3g}", (x, clipped), textcoords="offset points", xytext=(6, 4 if y < low else -10), fontsize=8,
                            color="#666666")
    ax.scatter(xs, ys, color=colour, s=40, alpha=0.8, label=f"{name}: completed trial" if name else "completed trial", zorder=3)
    bests = {d: (max if maximize else min)(f, key=lambda r: r.score) for d, g in by_depth.items() if (f := [r for r in g if r.final])}
    stars = [bests[d] for d in sorted(bests)]
    ax.plot([where[r.number] for r in stars], [r.score for r in stars], color=colour if name else "#E24A33", alpha=0.6, zorder=2)
    ax.scatter([where[r.number] for r in stars], [r.score for r in stars], marker="*", s=260, color=colour if name else "#E24A33",
               edgecolor="black", linewidth=0.6, label=f"{name}: best at this depth" if name else "best at this depth", zorder=4)
    return [(where[r.number], r) for r in stars]


def _score_range(scores: Sequence[float]) -> tuple[float, float]:
    """Axis limits that show ``scores`` with some room around them."""
    low, high = min(scores), max(scores)
    span = high - low if high > low else max(abs(high) * 0.05, 0.01)
    return low - 0.6 * span, high + 0.4 * span


def _history_plot(study: Any, metric: str) -> Any:
    import optuna.visualization.matplotlib as ovm

    if not _complete(study):
        raise _Skip("no trial has completed yet")
    multi = len(study.directions) > 1
    ax = ovm.plot_optimization_history(study, target=(lambda t: t.values[0]) if multi else None, target_name=metric)
    ax.set_ylabel(metric)
    return ax.figure


def _importance_plot(study: Any, metric: str) -> Any:
    import optuna.visualization.matplotlib as ovm
    from optuna.importance import PedAnovaImportanceEvaluator

    complete = _complete(study)
    varied = {name for name in {n for t in complete for n in t.params} if len({repr(t.params.get(name)) for t in complete}) > 1}
    if len(complete) < 2 or not varied:
        raise _Skip(f"needs at least two completed trials that differ in a searched parameter (this study has {len(complete)} completed)")
    if len({t.values[0] for t in complete}) == 1:
        raise _Skip(f"every completed trial scored the same {metric} ({complete[0].values[0]:.4f}), so no parameter made a difference yet")
    target = None
    if len(study.directions) > 1:  # rank by the metric alone; the evaluator takes lower as better
        sign = -1.0 if study.directions[0].name == "MAXIMIZE" else 1.0
        target = lambda t: sign * t.values[0]  # noqa: E731
    try:
        ax = ovm.plot_param_importances(study, evaluator=PedAnovaImportanceEvaluator(), target=target, target_name=metric)
    except (ValueError, RuntimeError) as exc:
        raise _Skip(f"Optuna could not evaluate them ({first_line(exc)})") from exc
    if not ax.patches:
        raise _Skip("Optuna found no parameter that explains the score yet")
    return ax.figure


def _learning_curves(study: Any, metric: str) -> Any:
    import optuna.visualization.matplotlib as ovm

    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    if any(t.intermediate_values for t in trials.values()):
        ax = ovm.plot_intermediate_values(study)
        for line in list(ax.get_lines()):
            number = int(line.get_label().removeprefix("Trial")) if line.get_label().startswith("Trial") else None
            trial = trials.get(number)
            if trial is None:
                continue
            state = trial.state.name.lower()
            line.set_label(f"trial {number}" + ("" if state == "complete" else f" ({state})"))
            if state == "pruned":
                x, y = line.get_data()
                ax.plot(x[-1:], y[-1:], marker="x", markersize=11, markeredgewidth=2.5, color=line.get_color(), zorder=5)
        ax.set_title("Learning curves")
        if len(trials) <= 20:
            ax.legend(bbox_to_anchor=(1.02, 1), loc="upper left", borderaxespad=0.0, fontsize=8)
        elif ax.get_legend() is not None:
            ax.get_legend().remove()
    else:  # multi-objective studies report no epochs to Optuna: draw each trial's recorded history
        histories = {n: t.user_attrs["history"] for n, t in trials.items() if t.user_attrs.get("history")}
        if not histories:
            raise _Skip("no trial has finished an epoch yet")
        figure = _figure()
        ax = figure.subplots()
        for number, history in histories.items():
            ax.plot([h["epoch"] for h in history], [h["score"] for h in history], marker=".", alpha=0.7, label=f"trial {number}")
        ax.legend(bbox_to_anchor=(1.02, 1), loc="upper left", borderaxespad=0.0, fontsize=8)
        ax.set_title("Learning curves")
    ax.set_xlabel("epoch (from 0)")
    ax.set_ylabel(f"validation {metric}")
    ax.xaxis.get_major_locator().set_params(integer=True)
    return ax.figure


def _best_predictions(study: optuna.Study, registry: Registry | None, model: torch.nn.Module | None,
                      data: ImageData | None) -> _Predictions:
    """Run the best trial's model (built from its checkpoint unless given) over the study's validation images."""
    import numpy as np
    import torch

    from tlengine._data import study_data
    from tlengine._export import ValidationImages
    from tlengine._timing import stage
    from tlengine._model import build_trial_model, inference_model
    from tlengine._preprocess import Preprocess
    from tlengine._study import pick_trial
    from tlengine.plugins import get_registry

    if not _complete(study):
        raise _Skip("no trial has completed yet")
    registry = registry or get_registry()
    record = read_record(study)
    trial = pick_trial(study, "best")
    checkpoint = Path(trial.user_attrs.get("checkpoint", ""))
    if model is None and not checkpoint.is_file():
        raise _Skip(f"the best trial's checkpoint {checkpoint} is not on this machine; draw the report where the trial ran")
    values = trial.user_attrs.get("values", trial.params)
    model = inference_model(model if model is not None else build_trial_model(registry, record, values, checkpoint=checkpoint))
    data = data if data is not None else study_data(registry, record)
    preprocess = Preprocess.from_data_config(record.for_values(values).data_config, values["image_size"])
    images = ValidationImages(data.val.images, data.val.targets, preprocess, record.task == "classification")
    with torch.inference_mode(), stage("report predictions"):  # a batch of images at a time
        outputs = [model(torch.from_numpy(batch)).numpy() for batch, _ in images.batches(64)]
    dtype = np.int64 if record.task == "classification" else np.float64
    return _Predictions(data.val.images, images.targets.astype(dtype), np.concatenate(outputs), record.classes, record.task)


def _confusion(p: _Predictions) -> Any:
    import numpy as np

    matrix = np.zeros((len(p.classes), len(p.classes)), dtype=np.int64)
    np.add.at(matrix, (p.targets, p.outputs.argmax(-1)), 1)
    return matrix


def _confusion_plot(p: _Predictions) -> Any:
    import numpy as np

    matrix = _confusion(p)
    k = len(p.classes)
    share = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    side = min(12.0, 3.0 + 0.5 * k)
    figure = _figure(side + 1.2, side, style="default")
    ax = figure.subplots()
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    if k <= 30:
        for i in range(k):
            for j in range(k):
                if matrix[i, j]:
                    ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=8 if k > 12 else 10,
                            color="white" if share[i, j] > 0.5 else "black")
    ticks = range(k)
    ax.set_xticks(ticks, p.classes, rotation=45 if k > 4 else 0, ha="right" if k > 4 else "center")
    ax.set_yticks(ticks, p.classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    accuracy = np.trace(matrix) / max(matrix.sum(), 1)
    ax.set_title(f"{matrix.sum()} validation images, accuracy {accuracy:.3f}")
    return figure


def _per_class_plot(p: _Predictions) -> Any:
    import numpy as np

    matrix = _confusion(p)
    right = np.diag(matrix).astype(float)
    precision = right / np.maximum(matrix.sum(axis=0), 1)
    recall = right / np.maximum(matrix.sum(axis=1), 1)
    k = len(p.classes)
    figure = _figure(max(6.0, 0.7 * k + 2), 4.2)
    ax = figure.subplots()
    x = np.arange(k)
    ax.bar(x - 0.2, precision, width=0.4, label="precision")
    ax.bar(x + 0.2, recall, width=0.4, label="recall")
    ax.set_xticks(x, p.classes, rotation=45 if k > 4 else 0, ha="right" if k > 4 else "center")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("precision / recall")
    ax.legend(loc="lower right", fontsize=8)
    return figure


def _predicted_vs_true(p: _Predictions) -> Any:
    import numpy as np

    predicted = p.outputs.reshape(-1)
    figure = _figure(5.5, 5.0)
    ax = figure.subplots()
    ax.scatter(p.targets, predicted, s=18, alpha=0.7)
    low, high = float(min(p.targets.min(), predicted.min())), float(max(p.targets.max(), predicted.max()))
    ax.plot([low, high], [low, high], color="black", linewidth=1, label="perfect")
    rmse = float(np.sqrt(np.mean((predicted - p.targets) ** 2)))
    ax.set_title(f"{len(predicted)} validation images, RMSE {rmse:.4g}")
    ax.set_xlabel("true")
    ax.set_ylabel("predicted")
    ax.legend(loc="upper left", fontsize=8)
    return figure


def _residual_plot(p: _Predictions) -> Any:
    residuals = p.outputs.reshape(-1) - p.targets
    figure = _figure(9.0, 4.0)
    left, right = figure.subplots(1, 2, width_ratios=(2, 1))
    left.scatter(p.targets, residuals, s=18, alpha=0.7)
    left.axhline(0, color="black", linewidth=1)
    left.set_xlabel("true")
    left.set_ylabel("predicted − true")
    right.hist(residuals, bins=min(30, max(5, len(residuals) // 5)))
    right.set_xlabel("predicted − true")
    right.set_ylabel("images")
    return figure


def _worst_grid(p: _Predictions) -> Any:
    import numpy as np

    from tlengine._preprocess import load_image

    if p.task == "classification":
        true_prob = p.outputs[np.arange(len(p.targets)), p.targets]
        order = np.argsort(true_prob, kind="stable")[:WORST_IMAGES]
        titles = [f"{p.classes[p.targets[i]]} → {p.classes[p.outputs[i].argmax()]} ({p.outputs[i].max():.2f})" for i in order]
    else:
        predicted = p.outputs.reshape(-1)
        order = np.argsort(-np.abs(predicted - p.targets), kind="stable")[:WORST_IMAGES]
        titles = [f"{p.targets[i]:.3g} → {predicted[i]:.3g}" for i in order]
    columns = max(1, min(6, len(order)))
    rows = math.ceil(len(order) / columns)
    figure = _figure(2.4 * columns, 2.6 * rows, style="default")
    axes = np.atleast_1d(figure.subplots(rows, columns)).reshape(-1)
    for ax in axes:
        ax.axis("off")
    for ax, index, title in zip(axes, order, titles):
        image = load_image(p.items[index])
        image.thumbnail((160, 160))
        ax.imshow(np.asarray(image), interpolation="nearest" if max(image.size) < 64 else "antialiased")
        ax.set_title(title, fontsize=9)
    return figure


_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 2rem auto; max-width: 1400px;
       padding: 0 1.5rem; color: #222; background: #fff; }
h1 { margin-bottom: 0.2rem; } h2 { margin-top: 2.5rem; border-bottom: 1px solid #ddd; padding-bottom: 0.3rem; }
.meta { color: #555; margin: 0.2rem 0; }
.best { background: #eef6ee; border-left: 4px solid #3a3; padding: 0.6rem 1rem; margin: 1rem 0; }
.plots { display: grid; grid-template-columns: repeat(auto-fit, minmax(560px, 1fr)); gap: 1.5rem; }
figure { margin: 0; border: 1px solid #e3e3e3; border-radius: 6px; padding: 0.8rem; background: #fafafa; }
figure.wide { grid-column: 1 / -1; }
figure img { max-width: 100%; height: auto; display: block; margin: 0 auto; }
figcaption { margin-top: 0.5rem; font-size: 0.92rem; color: #444; }
.note { border: 1px dashed #bbb; border-radius: 6px; padding: 0.8rem; color: #666; background: #fcfcfc; }
table { border-collapse: collapse; font-size: 0.9rem; }
th, td { padding: 0.25rem 0.7rem; border-bottom: 1px solid #e5e5e5; text-align: right; white-space: nowrap; }
th { background: #f3f3f3; } td.text { text-align: left; }
tr.best td { font-weight: 600; background: #eef6ee; } tr.pruned td, tr.fail td { color: #888; }
footer { margin-top: 2rem; color: #888; font-size: 0.85rem; }
"""


def _stage_counts(board: Board) -> str:
    """``5 stages``, or each backbone's: ``lite0 6, lite1 6 stages``."""
    if not board.stages_of:
        return f"{board.stages} stages"
    return ", ".join(f"{board.short_names.get(s, s)} {n}" for s, n in board.stages_of.items()) + " stages"


def _ranking_table(raw: Mapping[str, Any]) -> str:
    """The backbones' ranking before the first trial, as an HTML table."""
    from tlengine._rank import Ranking

    e = html.escape
    ranking = Ranking.from_dict(raw)
    rows = "".join(f'<tr class="{"best" if i == 0 else "" if c.kept else "pruned"}"><td>{i + 1}</td><td class="text">{e(c.backbone)}</td>'
                   f"<td>{c.score:.4f}</td><td>{c.seconds:.1f}</td><td class=\"text\">{'searched' if c.kept else 'left out'}</td></tr>"
                   for i, c in enumerate(ranking.candidates))
    return (f'<h2>Backbones</h2><p class="meta">{e(ranking.lines()[0])}.</p><table><thead><tr><th>rank</th><th>backbone</th>'
            f"<th>{e(ranking.metric)}</th><th>seconds</th><th>search</th></tr></thead><tbody>{rows}</tbody></table>")


def _teacher_table(teacher: Mapping[str, Any], compared: Mapping[str, Any] | None) -> str:
    """A distillation study's teacher, and (once a student completed) teacher and best student side by side."""
    e = html.escape
    trials = ", ".join(str(n) for n in teacher["trials"])
    head = (f'<h2>Teacher</h2><p class="meta">Distilled from trial{"s" if len(teacher["trials"]) > 1 else ""} {e(trials)} of study '
            f'{e(teacher["study_name"])} ({e(", ".join(dict.fromkeys(teacher["backbones"])))}; {e(teacher["metric"])} '
            f'{", ".join(f"{s:.4f}" for s in teacher["scores"])}).</p>')
    if not compared:
        return head
    rows = "".join(f'<tr><td class="text">{e(who)}</td><td class="text">{e(b)}</td><td>{m["score"]:.4f}</td><td>{m["params_m"]:.2f}</td>'
                   f'<td>{m["latency_ms"]:.2f}</td></tr>'
                   for who, b, m in (("teacher " + trials, ", ".join(dict.fromkeys(compared["teacher"]["backbones"])), compared["teacher"]),
                                     (f"student {compared['student']['trial']}", compared["student"]["backbone"], compared["student"])))
    return (head + f'<table><thead><tr><th>model</th><th>backbone</th><th>{e(teacher["metric"])}</th><th>params (M)</th>'
            f"<th>ONNX ms, batch 1</th></tr></thead><tbody>{rows}</tbody></table>")


def _page(study: optuna.Study, board: Board, plots: Sequence[Plot], storage: str) -> str:
    """The HTML page: a summary, the plots (images embedded as data URIs) and the leaderboard."""
    from tlengine import __version__

    e = html.escape
    record = read_record(study)
    counts: dict[str, int] = {}
    for row in board.rows:
        counts[row.state] = counts.get(row.state, 0) + 1
    backbone = record.backbone_spec if not record.candidates else ", ".join(record.backbones)
    task = f"{len(record.classes)} classes" if record.task == "classification" else "regression"
    parts = [
        "<!doctype html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>tlengine report: {e(study.study_name)}</title>", f"<style>{_STYLE}</style>", "</head>", "<body>",
        f"<h1>Study {e(study.study_name)}</h1>",
        f'<p class="meta">{e(backbone)} ({_stage_counts(board)}) · {e(record.dataset)} dataset, {e(task)} · '
        f'{e(board.metric)} ({e(board.direction)}), {record.epochs} epochs per trial</p>',
        f'<p class="meta">{len(board.rows)} trials: ' + ", ".join(f"{n} {e(s)}" for s, n in counts.items()) + "</p>",
    ]
    if record.ranking:
        parts.append(_ranking_table(record.ranking))
    if record.teacher:
        parts.append(_teacher_table(record.teacher, study.user_attrs.get("distillation")))
    best_rows = [r for r in board.rows if r.number in board.best]
    if best_rows:
        top = best_rows[0]
        chosen = ", ".join(f"{e(k.replace('_', ' '))} {e(format_value(v))}" for k, v in top.params.items() if not k.startswith("freeze_depth"))
        parts.append(f'<div class="best"><b>Best: trial {top.number}</b>, {e(board.metric)} <b>{top.score:.4f}</b> · '
                     f"freeze depth {top.freeze_depth}/{board.stages_of.get(top.backbone, board.stages)}" + (f" · {chosen}" if chosen else "") +
                     (f" · recipe: {e(top.recipe)}" if top.recipe else "") + "</div>")
    else:
        parts.append('<div class="note">No trial has completed yet.</div>')
    parts.append('<h2>Plots</h2>')
    parts.append('<div class="plots">')
    for plot in plots:
        headline = ' class="wide"' if plot.name in WIDE_PLOTS else ""
        if plot.png is None:
            parts.append(f'<div class="note" id="fig-{plot.name}"><b>{e(plot.title)}</b>: not drawn: {e(plot.note)}</div>')
            continue
        data = base64.b64encode(plot.png).decode("ascii")
        parts.append(
            f'<figure id="fig-{plot.name}"{headline}><img src="data:image/png;base64,{data}" alt="{e(plot.title)}" '
            f'data-file="{e(plot.name)}.png"><figcaption><b>{e(plot.title)}.</b> {e(plot.caption)}</figcaption></figure>'
        )
    parts.append("</div>")
    parts.append("<h2>Leaderboard</h2>")
    parts.append("<p class=\"meta\">Best first; a score in parentheses is the last epoch's of a trial that did not finish. "
                 "★ marks the best trial (◆ the Pareto front).</p>")
    parts.append("<table><thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in board.header()) + "</tr></thead><tbody>")
    text_columns = {1, 2}
    for row in board.rows:
        css = "best" if row.number in board.best else row.state
        cells = "".join(f'<td class="text">{e(c)}</td>' if i in text_columns else f"<td>{e(c)}</td>"
                        for i, c in enumerate(board.cells(row)))
        parts.append(f'<tr class="{css}">{cells}</tr>')
    parts.append("</tbody></table>")
    made = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    where = safe_url(storage) or "(not given)"
    parts.append(f"<footer>tlengine {e(__version__)} · {made} · storage {e(where)}</footer>")
    parts += ["</body>", "</html>", ""]
    return "\n".join(parts)

