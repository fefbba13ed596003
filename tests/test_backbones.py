"""Searching several backbones: the ranking before the first trial, the backbone as a dimension with a freeze
depth of its own per backbone, export and resume of trials that differ in backbone, and the mistakes."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from conftest import TINY_BACKBONE

TWO = f"{TINY_BACKBONE},timm:resnet10t"


@pytest.fixture(scope="module")
def two_backbones(tmp_path_factory: pytest.TempPathFactory, tiny_folder: Path) -> Any:
    """A finished 5-trial search over two tiny timm models (the Python API), and what it printed; ``--param backbone``
    keeps both, whatever their ranking (with random weights, one is often far below the other)."""
    import io

    from rich.console import Console

    import tlengine
    from tlengine._api import search_config
    from tlengine._search import run_search

    out = tmp_path_factory.mktemp("two")
    printed = io.StringIO()
    options = dict(data=tiny_folder, backbone=TWO.split(","), trials=5, epochs=1, weights="none", image_size=32, batch_size=8, out=out,
                   study_name="two", pruner="none", seed=0, param={"backbone": TWO.split(",")})
    result = run_search(search_config(**options), Console(file=printed, width=200))
    assert isinstance(result, tlengine.SearchResult)
    return result, printed.getvalue(), options


def test_backbones_are_ranked_then_searched_each_with_its_own_depths(two_backbones: Any) -> None:
    result, printed, _ = two_backbones
    record = result.record
    assert record.backbones == ("timm:test_efficientnet", "timm:resnet10t")
    stages = {c["spec"]: c["stages"] for c in record.candidates}
    assert stages == {"timm:test_efficientnet": 6, "timm:resnet10t": 5}
    ranking = record.ranking
    assert ranking["method"] == "probe" and len(ranking["candidates"]) == 2 and ranking["forced"]
    assert "backbones ranked by the exact linear probe's validation accuracy" in printed and all(c["backbone"] in printed for c in ranking["candidates"])
    top = ranking["candidates"][0]["backbone"]
    assert record.backbone_spec == top and record.stages == stages[top]  # the main backbone is the top-ranked one
    rows = result.rows
    for row in rows:  # define-by-run: each trial's depth is its own backbone's parameter, within its stages
        assert row.backbone in stages and row.values["backbone"] == row.backbone
        assert set(p for p in row.params if p.startswith("freeze_depth")) == {f"freeze_depth[{row.backbone}]"}
        assert 0 <= row.freeze_depth <= stages[row.backbone] and row.values["freeze_depth"] == row.freeze_depth
    recipes = [r for r in rows if r.recipe]
    assert recipes and all(r.backbone == top for r in recipes)
    assert recipes[0].recipe == "linear probe" and recipes[0].freeze_depth == stages[top]
    assert {r.backbone for r in rows} == set(stages), "the search tried both backbones"
    from rich.console import Console

    from tlengine._cli import results_table

    table = Console(width=80, record=True)
    table.print(results_table(result))
    header = table.export_text().splitlines()[1]
    assert "backbone" in header, header  # the results table has a backbone column, in 80 columns
    assert "…" not in table.export_text()


def test_a_trial_on_each_backbone_exports_and_predicts(two_backbones: Any, tiny_folder: Path) -> None:
    import tlengine
    from tlengine._predict import load

    result, _, _ = two_backbones
    done = [r for r in result.rows if r.state == "complete"]
    for spec in {r.backbone for r in done}:
        row = next(r for r in done if r.backbone == spec)
        report = tlengine.export("two", runs=result.run_dir.parent, trial=row.number, out=result.run_dir / f"{row.number}.onnx")
        assert report.parity.max_abs_diff < 1e-4
        model = load(result.run_dir / f"{row.number}.onnx")
        assert model.metadata["backbone"] == spec and model.metadata["values"]["backbone"] == spec
        image = next(tiny_folder.rglob("*.png"))
        assert len(model.predict([image])[0].top) == 3


def test_report_draws_a_curve_per_backbone_and_the_ranking(two_backbones: Any) -> None:
    result, _, _ = two_backbones
    page = (result.run_dir / "report.html").read_text()
    assert "<h2>Backbones</h2>" in page and "exact linear probe" in page
    assert re.search(r'id="fig-freeze_depth"[^>]*><img', page)
    board = __import__("tlengine").show("two", runs=result.run_dir.parent)
    assert board.header()[3] == "backbone" and set(board.stages_of) == {"timm:test_efficientnet", "timm:resnet10t"}
    from tlengine._report import _freeze_depth_plot

    legend = [t.get_text() for t in _freeze_depth_plot(board).axes[0].get_legend().get_texts()]
    tried = {board.short_names[r.backbone] for r in board.rows if r.state == "complete"}
    assert {f"{name}: completed trial" for name in tried} <= set(legend) and len(tried) == 2  # one colour and curve each


def test_resume_keeps_the_ranking_and_trials(two_backbones: Any) -> None:
    import io

    from rich.console import Console

    from tlengine._api import search_config
    from tlengine._search import run_search

    result, _, options = two_backbones
    printed = io.StringIO()
    again = run_search(search_config(**{**options, "trials": 6}), Console(file=printed, width=200))
    assert "backbones ranked" not in printed.getvalue().split("searching")[0]  # adopted from the study, not measured again
    assert again.record.ranking == result.record.ranking and again.record.backbone_spec == result.record.backbone_spec
    assert len(again.rows) == 6 and [(r.number, r.params) for r in again.rows[:5]] == [(r.number, r.params) for r in result.rows]


def test_the_ranking_leaves_out_a_backbone_that_sees_nothing(tiny_folder: Path, tmp_path: Path, register_plugin: Any,
                                                            capsys: pytest.CaptureFixture) -> None:
    """The answer is known: a backbone whose features do not depend on the image ranks last and is left out;
    ``--param backbone`` keeps it."""
    import torch

    from tlengine import Backbone, hookimpl
    from tlengine._cli import main

    class Blind(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bias = torch.nn.Parameter(torch.linspace(-1, 1, 16))
            self.num_features = 16
            self.pretrained_cfg = {"input_size": (3, 32, 32), "interpolation": "bilinear", "crop_pct": 1.0,
                                   "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bias.expand(len(x), -1) + 0 * x.mean()

    class Plugin:
        @hookimpl
        def register_backbones(self, register: Any) -> None:
            register(Backbone("blind", lambda arch, weights: Blind(), "features that ignore the image"))

    register_plugin(Plugin(), "blind-plugin")
    base = ["search", "--data", str(tiny_folder), "--weights", "none", "--trials", "1", "--epochs", "1", "--image-size", "32",
            "--out", str(tmp_path)]
    assert main([*base, "--backbone", f"blind,{TINY_BACKBONE}", "--study-name", "b", "--rank", "logme"]) == 0
    err = capsys.readouterr().err
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    ranking = summary["config"]["ranking"]
    assert [c["backbone"] for c in ranking["candidates"]] == [TINY_BACKBONE, "blind"]
    assert [c["kept"] for c in ranking["candidates"]] == [True, False]
    assert "left out 1 more than 0.1 below the best" in err and "(left out)" in err
    assert summary["config"]["space"]["backbone"] == {**summary["config"]["space"]["backbone"], "kind": "fixed", "value": TINY_BACKBONE}
    assert main([*base, "--param", f'backbone=["blind", "{TINY_BACKBONE}"]', "--study-name", "kept"]) == 0  # ranked by the probe
    summary = json.loads((tmp_path / "kept" / "summary.json").read_text())
    assert summary["config"]["ranking"]["method"] == "probe" and summary["config"]["ranking"]["forced"]
    assert summary["config"]["space"]["backbone"]["choices"] == [TINY_BACKBONE, "blind"]


def test_weights_missing_for_one_backbone_leave_it_out(tiny_folder: Path, tmp_path: Path, register_plugin: Any,
                                                       capsys: pytest.CaptureFixture) -> None:
    from tlengine import Backbone, UserError, hookimpl
    from tlengine._cli import main

    def factory(arch: str | None, weights: str) -> Any:
        raise UserError(f"--weights {weights}: no weights for offline here")

    class Plugin:
        @hookimpl
        def register_backbones(self, register: Any) -> None:
            register(Backbone("noweights", factory, "weights never found"))

    register_plugin(Plugin(), "noweights-plugin")
    base = ["search", "--data", str(tiny_folder), "--weights", "none", "--trials", "1", "--epochs", "1", "--image-size", "32",
            "--out", str(tmp_path)]
    assert main([*base, "--backbone", f"noweights,{TINY_BACKBONE}", "--study-name", "w"]) == 0
    err = capsys.readouterr().err
    assert "warning: --backbone noweights: --weights none: no weights for offline here; left out of the search" in err
    assert json.loads((tmp_path / "w" / "summary.json").read_text())["config"]["candidates"] == []
    assert main([*base, "--backbone", "noweights", "--study-name", "w2"]) == 2
    assert capsys.readouterr().err.strip() == "error: --weights none: no weights for offline here"


def test_a_list_of_one_warns(tiny_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from tlengine._cli import main

    args = ["search", "--data", str(tiny_folder), "--weights", "none", "--trials", "1", "--epochs", "1", "--image-size", "32",
            "--out", str(tmp_path), "--param", f'backbone=["{TINY_BACKBONE}"]', "--study-name", "one"]
    assert main(args) == 0
    assert "warning: --param backbone: backbone lists one (timm:test_efficientnet): nothing to rank" in capsys.readouterr().err
    assert json.loads((tmp_path / "one" / "summary.json").read_text())["config"]["candidates"] == []


def test_latency_objective_across_backbones(tiny_folder: Path, tmp_path: Path) -> None:
    """A Pareto front over two backbones of different sizes: each trial's cost is its own backbone's."""
    import tlengine

    result = tlengine.search(tiny_folder, TWO, trials=3, epochs=1, weights="none", image_size=32, out=tmp_path, study_name="p",
                             objectives="accuracy,params", pruner="none", param={"backbone": TWO.split(",")}, quiet=True)
    costs = {r.backbone: r.cost for r in result.rows if r.cost is not None}
    assert result.pareto and costs
    import timm

    for spec, cost in costs.items():
        params = sum(p.numel() for p in timm.create_model(spec.partition(":")[2], num_classes=0).parameters()) / 1e6
        assert cost == pytest.approx(params, rel=0.05)
