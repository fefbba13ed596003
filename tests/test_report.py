"""``tlengine report`` and ``tlengine show``: the plots, the self-contained page, the leaderboard."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import TINY_BACKBONE, write_brightness_csv

TINY = ["--backbone", TINY_BACKBONE, "--weights", "none", "--image-size", "32", "--batch-size", "8"]
CLASSIFICATION_PLOTS = ("freeze_depth", "history", "importances", "learning_curves", "confusion_matrix", "per_class", "worst")
REGRESSION_PLOTS = ("freeze_depth", "history", "importances", "learning_curves", "predicted_vs_true", "residuals", "worst")
CHROMIUM = Path("/usr/bin/chromium")


def embedded_images(page: str) -> dict[str, bytes]:
    """The figures of a report page: figure id → the PNG embedded in it."""
    found = re.findall(r'<figure id="fig-(\w+)"[^>]*><img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    return {name: base64.b64decode(data) for name, data in found}


def expected_plots(storage: str, name: str, plots: tuple[str, ...]) -> tuple[str, ...]:
    """``plots``, less the parameter importances where every completed trial scored the same (nothing to explain).

    Tiny untrained models often all score chance accuracy; regression scores always differ.
    """
    from tlengine._study import load_study

    scores = {t.values[0] for t in load_study(storage, name).trials if t.state.name == "COMPLETE"}
    return plots if len(scores) > 1 else tuple(p for p in plots if p != "importances")


def check_report(html: Path, expected: tuple[str, ...]) -> dict[str, bytes]:
    """Every expected figure is in the page, decodes as an image, and is saved beside the page; the others have a note."""
    from PIL import Image

    page = html.read_text(encoding="utf-8")
    for name in set(CLASSIFICATION_PLOTS + REGRESSION_PLOTS) - set(expected):
        assert f'<figure id="fig-{name}"' not in page
    if "importances" not in expected:
        assert re.search(r'<div class="note" id="fig-importances"><b>Parameter importances</b>: not drawn: \w', page)
    assert "<script" not in page and "http://" not in page and "https://" not in page  # nothing to fetch
    images = embedded_images(page)
    assert set(images) == set(expected), page[:2000]
    for name, png in images.items():
        with Image.open(io.BytesIO(png)) as image:
            image.load()
            assert image.format == "PNG" and image.width > 200 and image.height > 150, name
        assert (html.parent / f"{html.stem}_files" / f"{name}.png").read_bytes() == png
    return images


def add_pruned_and_running_trials(storage: str, name: str) -> None:
    """What another worker leaves in a study: a trial pruned after one epoch and one still training."""
    import optuna

    from tlengine._storage import make_storage

    study = optuna.load_study(study_name=name, storage=make_storage(storage))
    depth = {"freeze_depth": study.trials[0].distributions["freeze_depth"]}
    pruned = study.ask(depth)
    pruned.report(0.05, 0)
    study.tell(pruned, state=optuna.trial.TrialState.PRUNED)
    running = study.ask(depth)
    running.report(0.5, 0)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, tiny_folder: Path) -> Path:
    """A finished three-trial classification search; its report is written by the search itself."""
    from tlengine._cli import main

    out = tmp_path_factory.mktemp("runs")
    assert main(["search", "--data", str(tiny_folder), *TINY, "--trials", "3", "--epochs", "2", "--out", str(out),
                 "--study-name", "rep"]) == 0
    return out


@pytest.fixture(scope="module")
def regression_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished regression search (each image's mean brightness) in a journal file storage."""
    from tlengine._cli import main

    folder = tmp_path_factory.mktemp("reg")
    assert main(["search", "--data", str(write_brightness_csv(folder)), "--task", "regression", *TINY, "--trials", "3", "--epochs", "2",
                 "--out", str(folder / "runs"), "--study-name", "reg", "--storage", f"journal://{folder / 'reg.log'}"]) == 0
    return folder


def test_search_writes_the_report(run: Path) -> None:
    html = run / "rep" / "report.html"
    check_report(html, expected_plots(f"sqlite:///{run / 'rep' / 'study.db'}", "rep", CLASSIFICATION_PLOTS))
    page = html.read_text(encoding="utf-8")
    assert "Study rep" in page and "Best: trial" in page
    assert page.count('<tr class="') == 3  # the leaderboard: one row per trial


def test_report_command_with_pruned_and_running_trials(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from tlengine._cli import main

    copy = tmp_path / "runs"
    shutil.copytree(run, copy)
    add_pruned_and_running_trials(f"sqlite:///{copy / 'rep' / 'study.db'}", "rep")
    capsys.readouterr()
    assert main(["report", "--runs", str(copy), "--study-name", "rep", "--out", str(tmp_path / "r" / "page.html")]) == 0
    expected = expected_plots(f"sqlite:///{copy / 'rep' / 'study.db'}", "rep", CLASSIFICATION_PLOTS)
    assert f"wrote {tmp_path / 'r' / 'page.html'} ({len(expected)} plots" in capsys.readouterr().out
    check_report(tmp_path / "r" / "page.html", expected)
    page = (tmp_path / "r" / "page.html").read_text(encoding="utf-8")
    rows = re.findall(r'<tr class="(\w+)">(.*?)</tr>', page)
    assert [css for css, _ in rows] == ["best", "complete", "complete", "running", "pruned"]
    assert "(0.0500)" in rows[-1][1] and "(0.5000)" in rows[-2][1]  # unfinished trials show their last epoch's score


def test_report_default_path_is_the_run_folder(run: Path, tmp_path: Path) -> None:
    from tlengine._cli import main

    html = run / "rep" / "report.html"
    html.unlink()
    assert main(["report", "--runs", str(run), "--study-name", "rep"]) == 0
    check_report(html, expected_plots(f"sqlite:///{run / 'rep' / 'study.db'}", "rep", CLASSIFICATION_PLOTS))


def test_report_without_the_best_checkpoint(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Drawn on a machine without the checkpoints: the study's plots, and a note instead of the model's."""
    from tlengine._cli import main
    from tlengine._study import load_study

    copy = tmp_path / "copy.db"
    shutil.copyfile(run / "rep" / "study.db", copy)
    best = load_study(f"sqlite:///{copy}", "rep").best_trial
    storage = f"sqlite:///{copy}"
    checkpoint = Path(best.user_attrs["checkpoint"])
    moved = checkpoint.with_suffix(".away")
    checkpoint.rename(moved)
    try:
        capsys.readouterr()
        assert main(["report", "--storage", storage, "--study-name", "rep", "--out", str(tmp_path / "r.html")]) == 0
    finally:
        moved.rename(checkpoint)
    err = capsys.readouterr().err
    assert "note: confusion_matrix not drawn: the best trial's checkpoint" in err
    check_report(tmp_path / "r.html", expected_plots(storage, "rep", ("freeze_depth", "history", "importances", "learning_curves")))
    page = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert page.count("is not on this machine") == 3  # confusion matrix, per class, worst images


def test_regression_report(regression_run: Path) -> None:
    """Regression scores differ from trial to trial, so every plot is drawn, importances included."""
    assert expected_plots(f"journal://{regression_run / 'reg.log'}", "reg", REGRESSION_PLOTS) == REGRESSION_PLOTS
    check_report(regression_run / "runs" / "reg" / "report.html", REGRESSION_PLOTS)


def test_one_trial_report_leaves_out_importances(tmp_path: Path, tiny_folder: Path) -> None:
    from tlengine._cli import main

    assert main(["search", "--data", str(tiny_folder), *TINY, "--trials", "1", "--epochs", "1", "--out", str(tmp_path),
                 "--study-name", "one"]) == 0
    html = tmp_path / "one" / "report.html"
    check_report(html, tuple(p for p in CLASSIFICATION_PLOTS if p != "importances"))
    assert "needs at least two completed trials" in html.read_text(encoding="utf-8")


def test_multi_objective_report(tmp_path: Path, tiny_folder: Path, capsys: pytest.CaptureFixture) -> None:
    """Without per-epoch reports to Optuna, the learning curves come from each trial's recorded history."""
    from tlengine._cli import main

    assert main(["search", "--data", str(tiny_folder), *TINY, "--trials", "2", "--epochs", "2", "--out", str(tmp_path),
                 "--study-name", "mo", "--objectives", "accuracy,params"]) == 0
    storage = f"sqlite:///{tmp_path / 'mo' / 'study.db'}"
    check_report(tmp_path / "mo" / "report.html", expected_plots(storage, "mo", CLASSIFICATION_PLOTS))
    capsys.readouterr()
    assert main(["show", "--storage", storage, "--study-name", "mo", "--json"]) == 0
    board = json.loads(capsys.readouterr().out)
    assert all(t["cost"] is not None and t["epochs"] == (1 if t["recipe"] == "linear probe" else 2) for t in board["trials"]), board["trials"]


def test_a_report_that_cannot_be_written_costs_a_warning_not_the_search(tmp_path: Path, tiny_folder: Path,
                                                                       capsys: pytest.CaptureFixture) -> None:
    from tlengine._cli import main

    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "report_files").write_text("a file where the report's folder goes")
    assert main(["search", "--data", str(tiny_folder), *TINY, "--trials", "1", "--epochs", "1", "--out", str(tmp_path),
                 "--study-name", "s"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: {tmp_path}/s/report.html: cannot write the report (File exists); the search's results are kept, "
                        f"draw it again with tlengine report --study-name s --storage sqlite:///{tmp_path}/s/study.db"]
    assert (tmp_path / "s" / "best.onnx").is_file() and (tmp_path / "s" / "summary.json").is_file()
    assert not (tmp_path / "s" / "report.html").exists()


def test_show_sorts_by_score(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from tlengine._cli import main

    shutil.copytree(run, tmp_path / "runs")
    add_pruned_and_running_trials(f"sqlite:///{tmp_path / 'runs' / 'rep' / 'study.db'}", "rep")
    capsys.readouterr()
    assert main(["show", "--runs", str(tmp_path / "runs"), "--study-name", "rep", "--json"]) == 0
    board = json.loads(capsys.readouterr().out)
    trials = board["trials"]
    assert [t["state"] for t in trials] == ["complete", "complete", "complete", "running", "pruned"]
    scores = [t["score"] for t in trials[:3]]
    assert scores == sorted(scores, reverse=True) and board["direction"] == "maximize"
    assert board["best"] == [trials[0]["number"]]
    assert trials[3]["seconds"] is not None and trials[3]["seconds"] >= 0  # running: time so far
    assert main(["show", "--runs", str(tmp_path / "runs"), "--study-name", "rep"]) == 0
    table = capsys.readouterr().out
    assert "freeze depth" in table and "accuracy" in table and "running" in table and "pruned" in table
    first_cells = [line.split("│")[1].strip() for line in table.splitlines() if line.count("│") > 3]
    numbers = [cell for cell in first_cells if cell and cell != "trial"]
    assert numbers == [f"★ {trials[0]['number']}"] + [str(t["number"]) for t in trials[1:]]


def test_surplus_trials_are_listed_nowhere(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Regression test: a trial a worker asked for after the study was full is stored as failed and marked
    surplus; ``summary.json`` left it out but ``show`` and the report listed it as a failed trial. One row type
    (``tlengine._study.trial_rows``) serves all three now, without it."""
    import optuna

    from tlengine._cli import main
    from tlengine._report import write_report
    from tlengine._storage import make_storage
    from tlengine._study import load_study, trial_rows

    shutil.copytree(run, tmp_path / "runs")
    storage = f"sqlite:///{tmp_path / 'runs' / 'rep' / 'study.db'}"
    study = optuna.load_study(study_name="rep", storage=make_storage(storage))
    ran = sorted(t.number for t in study.trials)
    surplus = study.ask()
    surplus.set_user_attr("surplus", True)
    study.tell(surplus, state=optuna.trial.TrialState.FAIL)
    capsys.readouterr()
    assert main(["show", "--runs", str(tmp_path / "runs"), "--study-name", "rep", "--json"]) == 0
    assert sorted(t["number"] for t in json.loads(capsys.readouterr().out)["trials"]) == ran
    assert [r.number for r in trial_rows(load_study(storage, "rep"))] == ran
    page = write_report(load_study(storage, "rep"), tmp_path / "r.html", storage=storage).path.read_text()
    assert "fail" not in re.sub(r"<style>.*?</style>", "", page, flags=re.S)


def test_show_reads_a_journal_storage_being_written(regression_run: Path, capsys: pytest.CaptureFixture) -> None:
    from tlengine._cli import main

    storage = f"journal://{regression_run / 'reg.log'}"
    add_pruned_and_running_trials(storage, "reg")
    capsys.readouterr()
    assert main(["show", "--storage", storage, "--study-name", "reg", "--json"]) == 0
    board = json.loads(capsys.readouterr().out)
    assert board["direction"] == "minimize" and board["metric"] == "rmse"
    scores = [t["score"] for t in board["trials"] if t["state"] == "complete"]
    assert len(scores) == 3 and scores == sorted(scores)
    assert {t["state"] for t in board["trials"]} == {"complete", "pruned", "running"}


def test_show_unknown_study(run: Path, capsys: pytest.CaptureFixture) -> None:
    from tlengine._cli import main

    assert main(["show", "--storage", f"sqlite:///{run / 'rep' / 'study.db'}", "--study-name", "nope"]) == 2
    assert capsys.readouterr().err.strip() == f"error: --study-name nope: no such study in sqlite:///{run / 'rep' / 'study.db'}; it has: rep"


def test_optuna_dashboard_reads_the_storage(run: Path, regression_run: Path) -> None:
    """The dashboard's own API lists the study, its trials and their user attributes, from SQLite and a journal file."""
    dashboard = pytest.importorskip("optuna_dashboard")
    from wsgiref.util import setup_testing_defaults

    for storage, name, trials in ((f"sqlite:///{run / 'rep' / 'study.db'}", "rep", 3), (str(regression_run / "reg.log"), "reg", 3)):
        app = dashboard.wsgi(storage)

        def get(path: str) -> dict:
            environ: dict = {"PATH_INFO": path, "REQUEST_METHOD": "GET"}
            setup_testing_defaults(environ)
            status = []
            body = b"".join(app(environ, lambda s, headers, exc_info=None: status.append(s)))
            assert status[0].startswith("200"), (storage, path, status, body[:300])
            return json.loads(body)

        studies = get("/api/studies")["study_summaries"]
        assert [s["study_name"] for s in studies] == [name]
        detail = get(f"/api/studies/{studies[0]['study_id']}")
        complete = [t for t in detail["trials"] if t["state"] == "Complete"]
        assert len(complete) == trials, [t["state"] for t in detail["trials"]]
        assert {"values", "history", "checkpoint"} <= {a["key"] for a in complete[0]["user_attrs"]}


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.is_file(), reason="needs Debian's chromium (apt-get install chromium chromium-driver)")
def test_report_renders_in_headless_chromium(run: Path, tmp_path: Path) -> None:
    """The page opens offline in a real browser; the screenshot is a real picture, not a blank page."""
    import numpy as np
    from PIL import Image

    shot = tmp_path / "report.png"
    subprocess.run(
        [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
         f"--screenshot={shot}", "--window-size=1400,3000", (run / "rep" / "report.html").as_uri()],
        check=True, capture_output=True, timeout=120,
    )
    with Image.open(shot) as image:
        pixels = np.asarray(image.convert("L"), dtype=np.float32)
    assert pixels.shape == (3000, 1400)
    assert pixels.std() > 20  # plots drawn, not an empty or error page
