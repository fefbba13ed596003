"""The Python API mirrors the command line, its guide's example runs, and workers start alike from either."""

from __future__ import annotations

import argparse
import inspect
import pydoc
import re
from pathlib import Path

import pytest

import tlengine
from conftest import ROOT

#: Command-line options with no keyword: the output format, and what --workers sets for its own processes
#: (``tlengine distill``'s workers are searches with its teacher).
CLI_ONLY = {"json", "worker", "teacher"}


def subparser(name: str) -> argparse.ArgumentParser:
    from tlengine._cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def options(parser: argparse.ArgumentParser) -> dict[str, object]:
    return {a.dest: a.default for a in parser._actions if a.dest not in ("help", *CLI_ONLY)}


@pytest.mark.parametrize("command", ["search", "distill", "export", "show", "report"])
def test_keywords_are_the_options_with_their_defaults(command: str) -> None:
    cli = options(subparser(command))
    if command == "distill":  # its --teacher is a keyword, unlike the hidden one of search's workers
        cli["teacher"] = "best"
    api = {name: p.default for name, p in inspect.signature(getattr(tlengine, command)).parameters.items() if name != "quiet"}
    assert set(api) == set(cli)
    for name, default in cli.items():
        expected = api[name]
        if expected is inspect.Parameter.empty:  # the study's name: positional in Python, required on the command line
            continue
        if isinstance(default, list):  # --param appends to a list
            assert list(expected) == default, name
        else:
            assert expected == default, name


def test_help_shows_the_options() -> None:
    text = pydoc.render_doc(tlengine.search, renderer=pydoc.plaintext)
    for option in options(subparser("search")):
        assert option in text, option


def test_the_guide_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """docs/python-api.md's example, exactly as written: a search with real weights, its model, an export, show and report."""
    code = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "python-api.md").read_text(), flags=re.S)[0]
    monkeypatch.setattr("tempfile.mkdtemp", lambda: str(tmp_path))
    exec(compile(code, "docs/python-api.md", "exec"), {})
    printed = capsys.readouterr().out
    assert re.search(r"best: trial [01], accuracy 0\.\d{3}", printed)
    assert (tmp_path / "api-demo" / "best.onnx").is_file() and list((tmp_path / "api-demo").glob("trial-*.fp16.onnx"))
    assert "report.html" in printed


def test_worker_command_line_reproduces_the_options() -> None:
    """A worker started by ``workers=N`` from Python parses back to the same options as the search that started it."""
    from tlengine._api import search_config
    from tlengine._cli import build_parser
    from tlengine._options import worker_argv

    config = search_config(data="photos", backbone="resnet18", trials=7, epochs=3, task="regression", val_fraction=0.3,
                           param={"lr": {"low": 1e-4, "high": 0.01, "log": True}, "head": ["linear", "mlp"], "hflip": 0.0},
                           batch_size=16, objectives="rmse,params", class_weights=True, cache=False, cache_views=2,
                           early_size=24, early_epochs=1, confine_paths=True, max_bad_images=3.0, workers=2, seed=4, timeout=60.0)
    argv = worker_argv(config, "journal:///tmp/s.log", "s", 1)
    args = vars(build_parser().parse_args(argv))
    again = search_config(**{k: v for k, v in args.items() if k not in ("command", "debug", "json")})
    assert again.worker == 1 and again.storage == "journal:///tmp/s.log" and again.study_name == "s"
    same = ("data", "backbone", "trials", "epochs", "task", "val_fraction", "objectives", "class_weights", "cache", "cache_views",
            "early_size", "early_epochs", "confine_paths", "max_bad_images", "seed", "timeout")
    assert {k: getattr(again, k) for k in same} == {k: getattr(config, k) for k in same}
    assert sorted(p[:2] for p in again.params) == sorted(p[:2] for p in config.params)


def test_a_mistake_raises_user_error(tmp_path: Path) -> None:
    with pytest.raises(tlengine.UserError, match="--trials 0: must be a positive integer"):
        tlengine.search(trials=0, out=tmp_path, quiet=True)
    with pytest.raises(tlengine.UserError, match="--study-name nothing: no study database"):
        tlengine.export("nothing", runs=tmp_path)
