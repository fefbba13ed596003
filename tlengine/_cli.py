"""The ``tlengine`` command line: one parser, one error boundary."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from tlengine._errors import UserError

if TYPE_CHECKING:
    from tlengine._options import SearchConfig
    from tlengine._search import SearchResult


class _Parser(argparse.ArgumentParser):
    """argparse, but usage mistakes exit 2 with one ``error:`` line."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"error: {message} (see '{self.prog} --help')\n")


def _positive_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``tlengine`` command (one line per option: long because the commands have many)."""
    parser = _Parser(prog="tlengine", description="Transfer-learning search over timm backbones, exported to ONNX.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    s = sub.add_parser("search", help="search freeze depth, learning rate and more; export the best model to ONNX")
    s.add_argument("--data", help="image folder (train/ and val/, or class folders) or CSV file; default: the bundled demo")
    s.add_argument("--dataset", default="auto", help="dataset plugin (default: auto, chosen from --data)")
    s.add_argument("--task", choices=["classification", "regression"], help="default: the dataset's own (classification)")
    s.add_argument("--val-fraction", type=float, default=0.2, help="held-out fraction when the data has no validation split (default: 0.2)")
    s.add_argument("--backbone", default="timm:tf_efficientnet_lite0", help="NAME, NAME:ARCH, or a timm model name; several, comma-separated, are ranked on the frozen "
                   "features and searched (default: timm:tf_efficientnet_lite0)")
    s.add_argument("--weights", default="auto", help="auto, hub, none, a .pth/.safetensors file, or pkg:DISTRIBUTION (default: auto)")
    s.add_argument("--config", help="TOML file with [search] options and the [space] to search (see docs/search-space.md)")
    s.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                   help="fix or search one dimension, VALUE in TOML: lr=3e-4, 'head=[\"linear\",\"mlp\"]', 'lr={low=1e-4,high=1e-2,log=true}'")
    s.add_argument("--head", help="head plugin; short for --param head=NAME (default: linear)")
    s.add_argument("--optimizer", help="optimizer plugin; short for --param optimizer=NAME (default: adamw)")
    s.add_argument("--trials", type=_positive_int, help="total trials in the study (default: the dataset's suggestion, else 20)")
    s.add_argument("--timeout", type=float, help="end the search after this many seconds: no trial starts after it, the running one "
                   "stops at its next epoch end (kept as pruned, with its last score), then the best trial is exported")
    s.add_argument("--epochs", type=_positive_int, help="epochs per trial (default: the dataset's suggestion, else 5)")
    s.add_argument("--image-size", type=_positive_int, help="input side in pixels (default: the dataset's suggestion, else the backbone's)")
    s.add_argument("--batch-size", type=_positive_int, help="short for --param batch_size=N (default: 32)")
    s.add_argument("--weight-decay", type=float, help="short for --param weight_decay=X (default: 0.01)")
    s.add_argument("--metric", help="accuracy, macro_f1, balanced_accuracy, top5 (classification); rmse, mae, r2 (regression)")
    s.add_argument("--objectives", help="METRIC,latency or METRIC,params: a Pareto front of the metric vs ONNX CPU latency (ms) or parameters (millions)")
    s.add_argument("--class-weights", action="store_true", default=None, help="weight the loss by inverse class frequency")
    s.add_argument("--eval-crop", help="how evaluation and the exported model crop: center (timm's crop_pct), whole (the whole "
                   "image, resized), or auto: whichever a linear probe on the frozen features scores better with (default: auto)")
    s.add_argument("--rank", help="how several backbones are ranked before the first trial: probe (the exact linear probe's "
                   "validation score on their frozen features) or logme (LogME evidence of those features) (default: probe)")
    s.add_argument("--seed", type=int, default=0, help="default: 0")
    s.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    s.add_argument("--sampler", help="tpe (multivariate), random, or grid over every searched value (default: tpe)")
    s.add_argument("--pruner", help="median, hyperband or none (default: median)")
    s.add_argument("--out", default="runs", help="output folder; results go to OUT/STUDY/ (default: runs)")
    s.add_argument("--study-name", help="default: DATA-ARCH")
    s.add_argument("--storage", help="Optuna storage URL: sqlite:///FILE, journal://FILE, postgresql://... "
                   "(default: sqlite:///OUT/STUDY/study.db; journal://OUT/STUDY/study.journal with --workers); see docs/storage.md")
    s.add_argument("--workers", type=_positive_int, default=1,
                   help="worker processes on this machine sharing the study (default: 1); on more machines, start the same command on each with one --storage")
    s.add_argument("--devices", help="CUDA devices, one worker each: 0,1,2,3")
    s.add_argument("--worker", type=int, help=argparse.SUPPRESS)  # set by --workers for the processes it starts
    s.add_argument("--teacher", help=argparse.SUPPRESS)  # set by tlengine distill --workers for the processes it starts
    s.add_argument("--max-bad-images", type=float, default=0.01,
                   help="unreadable images tolerated (skipped with a warning): a fraction below 1, or a count (default: 0.01)")
    s.add_argument("--confine-paths", action="store_true", help="refuse CSV image paths outside the CSV's folder")
    s.add_argument("--image-column", help="the CSV column of image paths (default: image, path, file, filename or filepath)")
    s.add_argument("--target-column", help="the CSV column of labels or numeric targets (default: label, class, target, value, y, "
                   "or the only other column)")
    s.add_argument("--no-cache", dest="cache", action="store_false",
                   help="decode images and run frozen layers anew in every trial (default: cached, see docs/caches.md)")
    s.add_argument("--cache-dir", help="cache folder (default: $TLENGINE_CACHE, else ~/.cache/tlengine)")
    s.add_argument("--cache-size-gb", type=float, default=4.0, help="cap on the cache folder; least recently used files go first (default: 4)")
    s.add_argument("--cache-views", type=int, default=None,
                   help="cached augmented views per image for frozen layers, reused in turn when fewer than the epochs; "
                        "fewer trade augmentation for speed (default: one per epoch, exactly as uncached)")
    s.add_argument("--early-size", type=_positive_int, metavar="PX",
                   help="train and validate the first --early-epochs epochs of each trial at PX pixels: cheaper early pruning "
                        "rungs (see benchmarks/early_rungs.py for when the ranking holds; default: off)")
    s.add_argument("--early-epochs", type=_positive_int, default=1, help="epochs at --early-size (default: 1)")
    s.add_argument("--json", action="store_true", help="print the summary as JSON instead of a table")

    d = sub.add_parser("distill", help="teach a smaller student with a finished trial (or the K best) of a study; export it to ONNX")
    _study_options(d)
    d.add_argument("--student", required=True, help="the student's backbone: NAME, NAME:ARCH or a timm model name (several, comma-separated, "
                   "are ranked and searched as in tlengine search)")
    d.add_argument("--teacher", default="best", help="best, a trial number, or top:K: the K best trials, their outputs averaged (default: best)")
    d.add_argument("--name", help="the student's study (default: STUDY-distill-ARCH), in --storage or RUNS/NAME/")
    d.add_argument("--trials", type=_positive_int, help="total student trials (default: 20)")
    d.add_argument("--epochs", type=_positive_int, help="epochs per student trial (default: the teacher study's)")
    d.add_argument("--timeout", type=float, help="end after this many seconds, as tlengine search does")
    d.add_argument("--image-size", type=_positive_int, help="the student's input side in pixels (default: the dataset's suggestion, else the backbone's)")
    d.add_argument("--weights", default="auto", help="the student's weights: auto, hub, none, a .pth/.safetensors file, or pkg:DISTRIBUTION (default: auto)")
    d.add_argument("--config", help="TOML file with [search] options and the [space] to search")
    d.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                   help="fix or search one dimension, as tlengine search takes it; also distill_alpha and distill_temperature")
    d.add_argument("--batch-size", type=_positive_int, help="short for --param batch_size=N (default: 32)")
    d.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    d.add_argument("--sampler", help="tpe (multivariate), random, or grid (default: tpe)")
    d.add_argument("--pruner", help="median, hyperband or none (default: median)")
    d.add_argument("--workers", type=_positive_int, default=1, help="worker processes on this machine sharing the study (default: 1)")
    d.add_argument("--devices", help="CUDA devices, one worker each: 0,1,2,3")
    d.add_argument("--no-cache", dest="cache", action="store_false", help="decode images, run frozen layers and the teacher anew in every trial")
    d.add_argument("--cache-dir", help="cache folder (default: $TLENGINE_CACHE, else ~/.cache/tlengine)")
    d.add_argument("--cache-size-gb", type=float, default=4.0, help="cap on the cache folder (default: 4)")
    d.add_argument("--cache-views", type=int, default=None, help="cached augmented views per image (default: one per epoch)")
    d.add_argument("--json", action="store_true", help="print the summary as JSON instead of a table")

    e = sub.add_parser("export", help="export any finished trial of a study to ONNX (optionally fp16 or int8)")
    _study_options(e)
    e.add_argument("--trial", default="best", help="trial number, or best (default: best)")
    e.add_argument("--out", help="the .onnx file to write (default: beside the study, trial-N[.fp16|.int8].onnx)")
    e.add_argument("--opset", type=_positive_int, default=18, help="ONNX opset (default: 18)")
    e.add_argument("--precision", choices=["fp32", "fp16"], default="fp32", help="default: fp32")
    e.add_argument("--quantize", choices=["none", "int8"], default="none", help="onnxruntime int8 quantization (default: none)")
    e.add_argument("--calibration", choices=["static", "dynamic"], default="static",
                   help="int8 with activations calibrated on training images (static) or at run time (dynamic); default: static")
    e.add_argument("--json", action="store_true", help="print the report as JSON")

    p = sub.add_parser("predict", help="predict images with an exported model (onnxruntime only, no PyTorch)")
    p.add_argument("model", help="the .onnx file written by 'tlengine search'")
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files, folders or glob patterns")
    p.add_argument("--top-k", type=_positive_int, default=3, help="labels shown per image (default: 3)")
    p.add_argument("--batch-size", type=_positive_int, default=32, help="default: 32")
    p.add_argument("--threads", type=_positive_int, help="onnxruntime threads (default: its own)")
    p.add_argument("--json", action="store_true", help="print JSON lines")
    p.add_argument("--csv", metavar="OUT", help="also write the predictions to this CSV file")

    w = sub.add_parser("show", help="a study's trials as a leaderboard, best first (also while workers still write to it)")
    _study_options(w)
    w.add_argument("--json", action="store_true", help="print the trials as JSON")

    r = sub.add_parser("report", help="draw a study's plots into one self-contained HTML page (also written after every search)")
    _study_options(r)
    r.add_argument("--out", help="the .html file to write, PNGs into NAME_files/ beside it "
                                 "(default: report.html in the study's run folder, where its checkpoints are)")

    g = sub.add_parser("plugins", help="list the installed plugins and what they register")
    g.add_argument("--json", action="store_true", help="print JSON")
    return parser


def _study_options(parser: argparse.ArgumentParser) -> None:
    """The options that name an existing study: ``--study-name``, ``--storage``, ``--runs``."""
    parser.add_argument("--study-name", required=True, help="the study")
    parser.add_argument("--storage", help="Optuna storage URL (default: RUNS/STUDY/study.db, or its study.journal)")
    parser.add_argument("--runs", default="runs", help="where the default storage lives (default: runs)")


def cli_reference(width: int = 100) -> str:
    """Markdown reference of every command and option, made from the parser itself (docs/cli.md)."""
    import os

    previous = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(width)
    try:
        parser = build_parser()
        parts = ["# Command reference", "", "Generated from the command line itself; `tests/test_docs.py` keeps it in sync.", "",
                 "## tlengine", "", "```text", parser.format_help().rstrip(), "```", ""]
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        for name, command in sub.choices.items():
            parts += [f"## tlengine {name}", "", "```text", command.format_help().rstrip(), "```", ""]
    finally:
        if previous is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = previous
    return "\n".join(parts)


def _version() -> str:
    from tlengine import __version__

    return __version__


def _cmd_search(args: argparse.Namespace) -> int:
    from tlengine._api import search_config

    options = {k: v for k, v in vars(args).items() if k not in ("command", "debug", "json")}
    return _run_search(args, search_config(**options))


def _cmd_distill(args: argparse.Namespace) -> int:
    from tlengine._api import distill_config

    options = {k: v for k, v in vars(args).items() if k not in ("command", "debug", "json")}
    return _run_search(args, distill_config(**options))


def _run_search(args: argparse.Namespace, config: SearchConfig) -> int:
    """Run the search (or distillation) ``config`` describes; print its results, or how to resume it."""
    from rich.console import Console

    from tlengine._search import SearchInterrupted, run_search
    from tlengine.plugins import failures

    console = Console(stderr=True)
    try:
        result = run_search(config, console)
    except SearchInterrupted as exc:
        if config.worker is None:
            console.print(f"\ninterrupted: {exc}; finished trials are kept. Resume with:\n  {_resume_command(args.argv)}",
                          markup=False, highlight=False, soft_wrap=True)
        return exc.exit_code
    finally:
        _warn_failures(failures)
    if config.worker is not None:
        return 0
    if args.json:
        print((result.run_dir / "summary.json").read_text(), end="")
        return 0
    _print_results(result)
    if result.distillation:
        _print_distillation(result)
    return 0


def _print_distillation(result: SearchResult) -> None:
    """Teacher and best student side by side: score, parameters, ONNX latency at batch 1."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    compared = result.distillation or {}
    table = Table(title=f"teacher vs student ({result.metric})", box=box.SIMPLE_HEAD, pad_edge=False)
    for column in ("model", "backbone", result.metric, "params (M)", "ms, batch 1"):
        table.add_column(column, justify="right" if column not in ("model", "backbone") else "left")
    teacher, student = compared["teacher"], compared["student"]
    trials = ",".join(str(n) for n in teacher["trials"])
    table.add_row(f"teacher {trials}", ",".join(b.rpartition(":")[2] for b in dict.fromkeys(teacher["backbones"])),
                  f"{teacher['score']:.4f}", f"{teacher['params_m']:.2f}", f"{teacher['latency_ms']:.2f}")
    table.add_row(f"student {student['trial']}", student["backbone"].rpartition(":")[2], f"{student['score']:.4f}",
                  f"{student['params_m']:.2f}", f"{student['latency_ms']:.2f}")
    Console().print(table)


def _resume_command(argv: Sequence[str]) -> str:
    """The command line that resumes a search: the same one."""
    import shlex

    return shlex.join(["tlengine", *argv])


#: Short column names of the results table, so that it reads in 80 columns.
SHORT_NAMES = {"layer_decay": "decay", "label_smoothing": "smooth", "weight_decay": "wd", "batch_size": "batch", "image_size": "size",
               "head_epochs": "head ep", "optimizer": "opt", "randaugment": "randaug", "drop_path": "drop", "accuracy": "acc",
               "balanced_accuracy": "bal.acc", "macro_f1": "f1", "latency": "ms", "params": "M par.", "augment": "aug",
               "head_init": "init"}
#: The augmentation policies in the results table; a cropping policy's cell adds its crop scale (``crop.42``).
SHORT_POLICIES = {"none": "none", "flip": "flip", "crop": "crop", "randaugment": "RA"}
#: Short names of the enqueued recipes.
SHORT_RECIPES = {"linear probe": "probe", "full fine-tune": "full FT", "top half": "half FT"}


def _cell(value: Any, name: str = "") -> str:
    """Parameter ``name``'s value in at most 7 characters: learning rates, and floats below 0.01, as ``1.0e-03``."""
    from tlengine._report import format_value

    if isinstance(value, float) and value != 0 and (name == "lr" or abs(value) < 1e-2 or abs(value) >= 1e3):
        return f"{value:.1e}"
    return format_value(value)


def _augment_cell(params: dict[str, Any]) -> str:
    """The policy, and for a cropping one its crop scale: ``flip``, ``crop.42``, ``RA.8``."""
    policy = params.get("augment")
    scale = params.get("crop_scale")
    cell = SHORT_POLICIES.get(policy, str(policy or ""))
    return f"{cell}{f'{scale:.2f}'.lstrip('0')}" if scale is not None and policy in ("crop", "randaugment") else cell


def results_table(result: SearchResult) -> Any:
    """The trials as a ``rich`` table that reads in 80 columns for the demo's space (short headers, no borders)."""
    from rich import box
    from rich.table import Table

    table = Table(title=f"study {result.study_name}: {result.metric} ({result.direction})", box=box.SIMPLE_HEAD, pad_edge=False,
                  collapse_padding=True, show_edge=False)
    params = [p for p in result.searched if p not in ("freeze_depth", "crop_scale", "backbone")]  # the crop scale is in the policy's cell
    several = "backbone" in result.searched
    short = result.record.short_names()
    cost = result.objectives[1:] if result.objectives else ()
    for column in ("#", "recipe", "state", *(["backbone"] if several else []), "depth", *params, result.metric, *cost, "ep", "s"):
        table.add_column(SHORT_NAMES.get(column, column.replace("_", " ")), justify="left" if column in ("recipe", "state") else "right",
                         no_wrap=True)
    for row in result.rows:
        best = result.best is not None and row.number == result.best.number
        front = row.number in result.pareto
        depth = row.freeze_depth
        stages = result.record.for_backbone(row.backbone).stages if row.backbone else result.record.stages
        table.add_row(
            f"{'★' if best else '◆' if front else ''}{row.number}",
            SHORT_RECIPES.get(row.recipe or "", row.recipe or ""),
            "done" if row.state == "complete" else row.state,
            *([short.get(row.backbone or "", "")] if several else []),
            f"{depth}/{stages}" if depth is not None else "",
            *(_augment_cell(row.params) if p == "augment" else _cell(row.params.get(p), p) for p in params),
            f"{row.score:.4f}" if row.score is not None else "",
            *([f"{row.cost:.3g}" if row.cost is not None else ""] if cost else []),
            str(row.epochs),
            f"{row.seconds:.0f}" if row.seconds is not None else "",
            style="bold green" if best else None,
        )
    return table


def _print_results(result: SearchResult) -> None:
    from rich.console import Console
    from rich.table import Table

    out = Console()
    params = [p for p in result.searched if p != "freeze_depth"]
    out.print(results_table(result))
    if result.record.ranking:
        from tlengine._rank import Ranking

        out.print("\n".join(Ranking.from_dict(result.record.ranking).lines()), markup=False, highlight=False)
    if result.best is None:
        out.print("no trial completed, so nothing was exported")
        return
    if result.pareto:
        front = [r for r in result.rows if r.number in result.pareto]
        pareto = Table(title=f"Pareto front: {result.metric} vs {result.objectives[1]} (◆; export one with tlengine export --trial N)")
        for column in ("trial", result.metric, result.objectives[1], "freeze depth", *params):
            pareto.add_column(column.replace("_", " "), justify="right")
        for row in sorted(front, key=lambda r: r.cost):
            pareto.add_row(str(row.number), f"{row.score:.4f}", f"{row.cost:.3g}", str(row.freeze_depth if row.freeze_depth is not None else ""),
                           *(_cell(row.params.get(p), p) for p in params))
        out.print(pareto)
    out.print(f"best: trial {result.best.number}, {result.metric} {result.best.score:.4f}")
    if result.onnx_path is not None:
        parity = result.parity or {}
        out.print(
            f"wrote {result.onnx_path} (onnxruntime vs PyTorch: max abs diff {parity.get('max_abs_diff', float('nan')):.1e}, "
            f"top-1 agreement {parity.get('top1_agreement', float('nan')):.0%})"
        )
        out.print(f"try it: tlengine predict {result.onnx_path} IMAGE_OR_DIR")
    out.print(f"summary: {result.run_dir / 'summary.json'}; study: {result.storage}")
    if (result.run_dir / "report.html").is_file():
        out.print(f"report: {result.run_dir / 'report.html'} (plots of every trial; tlengine show for the leaderboard)")


def _cmd_export(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from rich.console import Console
    from rich.table import Table

    from tlengine._api import export

    report = export(args.study_name, storage=args.storage, runs=args.runs, trial=args.trial, out=args.out, opset=args.opset,
                    precision=args.precision, quantize=args.quantize, calibration=args.calibration, quiet=False)
    if args.json:
        print(json.dumps(asdict(report), default=str, indent=2))
        return 0
    table = Table(title=f"trial {report.trial} of {args.study_name}")
    for column in ("model", "precision", f"val {report.metric}", "latency batch 1 (ms)"):
        table.add_column(column)
    reference = report.reference or report.path
    table.add_row(str(reference), "fp32", f"{report.score_fp32:.4f}", f"{report.latency_ms_fp32:.2f}")
    if report.variant:
        delta = report.score - report.score_fp32
        table.add_row(str(report.path), report.variant, f"{report.score:.4f} ({delta:+.4f})",
                      f"{report.latency_ms:.2f} ({_speed(report.latency_ms_fp32, report.latency_ms)})")
    Console().print(table)
    print(f"parity with PyTorch (fp32): max abs diff {report.parity.max_abs_diff:.1e}, top-1 agreement {report.parity.top1_agreement:.0%}")
    print(f"wrote {report.path}")
    return 0


def _speed(reference_ms: float, ms: float) -> str:
    ratio = reference_ms / ms
    return f"{ratio:.2f}x faster" if ratio >= 1 else f"{1 / ratio:.2f}x slower"


def _cmd_predict(args: argparse.Namespace) -> int:
    from tlengine._predict import expand_inputs, load

    model = load(args.model, threads=args.threads)
    paths = expand_inputs(args.inputs)
    predictions = model.predict(paths, top_k=args.top_k, batch_size=args.batch_size, skip_bad=True)
    if model.skipped:
        first = "; ".join(f"{source} ({error})" for source, error in model.skipped[:3])
        if not predictions:
            raise UserError(f"none of the {len(paths)} inputs is a readable image: {first}")
        print(f"warning: skipped {len(model.skipped)} unreadable image(s): {first}", file=sys.stderr)
    if args.csv:
        _write_predictions_csv(args.csv, predictions, model.task)
    for prediction in predictions:
        if args.json:
            print(json.dumps(prediction.to_dict()))
        elif prediction.value is not None:
            print(f"{prediction.source}\t{prediction.value:.6g}")
        else:
            print(prediction.source + "\t" + "  ".join(f"{label} {p:.3f}" for label, p in prediction.top))
    return 0


def _write_predictions_csv(path: str, predictions: Sequence[Any], task: str) -> None:
    import csv

    try:
        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            if task == "regression":
                writer.writerow(["image", "value"])
                writer.writerows([p.source, p.value] for p in predictions)
                return
            k = max((len(p.top) for p in predictions), default=0)
            writer.writerow(["image"] + [f"{field}_{i + 1}" for i in range(k) for field in ("label", "probability")])
            for p in predictions:
                writer.writerow([p.source] + [x for label, prob in p.top for x in (label, f"{prob:.6f}")])
    except OSError as exc:
        raise UserError(f"--csv {path}: cannot write it ({exc.strerror})") from exc


def _cmd_show(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from tlengine._api import show

    board = show(args.study_name, storage=args.storage, runs=args.runs)
    if args.json:
        from dataclasses import asdict

        print(json.dumps({"study_name": board.study_name, "metric": board.metric, "direction": board.direction,
                          "stages": board.stages, "cost_name": board.cost_name, "best": list(board.best), "trials": [asdict(r) for r in board.rows]}, indent=2))
        return 0
    table = Table(title=f"study {board.study_name}: {board.metric} ({board.direction}), best first")
    for i, column in enumerate(board.header()):
        table.add_column(column, justify="left" if i in (1, 2) else "right")
    for row in board.rows:
        best = row.number in board.best
        table.add_row(*board.cells(row), style="bold green" if best else "dim" if row.state in ("pruned", "fail") else None)
    Console(width=None if sys.stdout.isatty() else 1000).print(table)  # into a file or pipe: the whole table, unsqueezed
    if not board.rows:
        print("no trials yet")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from rich.console import Console

    from tlengine._api import report as draw

    with Console(stderr=True).status("drawing the report"):
        report = draw(args.study_name, storage=args.storage, runs=args.runs, out=args.out)
    for plot in report.missing:
        print(f"note: {plot.name} not drawn: {plot.note}", file=sys.stderr)
    print(f"wrote {report.path} ({len(report.drawn)} plots; PNGs in {report.folder})")
    return 0


def _cmd_plugins(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from tlengine.plugins import failures, get_plugins

    infos = get_plugins()
    if args.json:
        print(json.dumps({"plugins": [asdict(i) for i in infos], "failures": [asdict(f) for f in failures]}, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title="tlengine plugins")
    for column in ("plugin", "package", "hooks", "registers"):
        table.add_column(column)
    for info in infos:
        names = "; ".join(f"{hook.removeprefix('register_')}: {', '.join(n)}" for hook, n in info.registers.items() if n)
        package = f"{info.package} {info.version}" if info.package else "(in code)"
        table.add_row(info.name, package, ", ".join(info.hooks), names)
    Console().print(table)
    _warn_failures(failures)
    return 0


def _warn_failures(failures: Sequence[Any]) -> None:
    for failure in failures:
        print(f"warning: plugin {failure.name!r} from package {failure.package!r} failed to load and is skipped: {failure.error}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``tlengine`` command; return its exit code.

    The single error boundary: a :class:`UserError` prints one ``error:`` line and
    exits 2; any other exception prints one line and exits 1; ``--debug`` re-raises.
    """
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    if args.command is None:
        parser.print_help()
        return 0
    commands = {"search": _cmd_search, "distill": _cmd_distill, "export": _cmd_export, "predict": _cmd_predict, "show": _cmd_show, "report": _cmd_report,
                "plugins": _cmd_plugins}
    try:
        return commands[args.command](args)
    except UserError as exc:
        if args.debug:
            raise
        print("error: " + " ".join(str(exc).split()), file=sys.stderr)  # always one line
        return 2
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader (e.g. `| head`) went away: stop quietly, as Unix tools do.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as exc:
        if args.debug:
            raise
        print(f"error: unexpected {type(exc).__name__}: {exc} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1


def entry() -> None:
    """Console-script entry point."""
    sys.exit(main())
