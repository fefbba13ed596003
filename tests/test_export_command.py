"""``tlengine export``: any finished trial, fp16 and int8 variants, clear errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from conftest import run_cli


def storage(run: Path) -> str:
    return f"sqlite:///{run / 'study.db'}"


def test_export_a_chosen_trial(tiny_run: Path, tmp_path: Path) -> None:
    import onnx

    summary = json.loads((tiny_run / "summary.json").read_text())
    other = next(t for t in summary["trials"] if t["state"] == "complete" and t["number"] != summary["best"]["number"])
    out = tmp_path / "other.onnx"
    result = run_cli("export", "--storage", storage(tiny_run), "--study-name", "tiny", "--trial", str(other["number"]),
                     "--out", str(out), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["trial"] == other["number"]
    assert report["parity"]["max_abs_diff"] < 1e-4
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(props["params"]) == other["params"]
    assert int(props["trial_number"]) == other["number"]
    # the exported model scores what the trial scored on the same validation images
    assert report["score_fp32"] == pytest.approx(other["score"], abs=1e-6)


@pytest.mark.parametrize("flags,precision", [(["--precision", "fp16"], "fp16"), (["--quantize", "int8"], "int8-static"),
                                             (["--quantize", "int8", "--calibration", "dynamic"], "int8-dynamic")])
def test_reduced_precision_reports_score_and_latency(tiny_run: Path, tiny_folder: Path, tmp_path: Path, flags: list[str], precision: str) -> None:
    import onnx

    out = tmp_path / "m.onnx"
    result = run_cli("export", "--storage", storage(tiny_run), "--study-name", "tiny", "--out", str(out), "--json", *flags)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["variant"] == precision
    assert 0.0 <= report["score"] <= 1.0 and report["latency_ms"] > 0
    assert (tmp_path / "m.fp32.onnx").is_file()
    onnx.checker.check_model(str(out))
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert props["precision"] == precision
    assert json.loads(props["val_score"]) == pytest.approx(report["score"])
    assert "labels" in props and "preprocess" in props
    predicted = run_cli("predict", str(out), str(tiny_folder / "val"), "--json")
    assert predicted.returncode == 0, predicted.stderr
    labels = [json.loads(line)["label"] for line in predicted.stdout.splitlines()]
    assert len(labels) == len(list((tiny_folder / "val").rglob("*.png"))) and set(labels) <= set(json.loads(props["labels"]))


def test_unknown_trial_and_study(tiny_run: Path) -> None:
    result = run_cli("export", "--storage", storage(tiny_run), "--study-name", "tiny", "--trial", "99")
    assert result.returncode == 2 and result.stderr.startswith("error: --trial 99: not a completed trial")
    result = run_cli("export", "--storage", storage(tiny_run), "--study-name", "nope")
    assert result.returncode == 2 and "no such study" in result.stderr and "tiny" in result.stderr


def test_predict_csv(tiny_run: Path, tiny_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "p.csv"
    result = run_cli("predict", str(tiny_run / "best.onnx"), str(tiny_folder / "val"), "--top-k", "2", "--csv", str(out))
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == len(list((tiny_folder / "val").rglob("*.png")))
    assert set(rows[0]) == {"image", "label_1", "probability_1", "label_2", "probability_2"}
    assert float(rows[0]["probability_1"]) >= float(rows[0]["probability_2"])


@pytest.mark.parametrize("task,metric", [("regression", "r2"), ("classification", "macro_f1")])
def test_export_scores_with_the_study_metric(task: str, metric: str, tiny_folder: Path, tmp_path: Path) -> None:
    """Regression test: the export scored with accuracy or RMSE whatever the study's metric, and labelled it with the
    metric (an r2 study's export showed its RMSE as r2). It scores a trial with the study's metric, as the search did."""
    from conftest import TINY_BACKBONE, write_brightness_csv

    data = str(write_brightness_csv(tmp_path)) if task == "regression" else str(tiny_folder)
    result = run_cli("search", "--data", data, "--task", task, "--metric", metric, "--backbone", TINY_BACKBONE, "--weights", "none",
                     "--trials", "3", "--epochs", "1", "--image-size", "32", "--out", str(tmp_path / "runs"), "--study-name", "m", "--json")
    assert result.returncode == 0, result.stderr
    fine_tune = json.loads(result.stdout)["trials"][2]  # trained on decoded images, as the export evaluates it
    assert fine_tune["recipe"] == "full fine-tune" and fine_tune["state"] == "complete"
    result = run_cli("export", "--storage", storage(tmp_path / "runs" / "m"), "--study-name", "m", "--trial", "2", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["metric"] == metric
    assert report["score_fp32"] == pytest.approx(fine_tune["score"], abs=1e-4)


def test_export_leaves_out_unreadable_images(tmp_path: Path) -> None:
    """Regression test: the search left out an unreadable validation and training image, but ``tlengine export``
    loaded the data again with them and crashed (validation scoring, then int8 calibration on training images)."""
    from conftest import TINY_BACKBONE, write_image_folder

    folder = write_image_folder(tmp_path / "d")
    sorted((folder / "val").rglob("*.png"))[0].write_bytes(b"not an image")
    sorted((folder / "train").rglob("*.png"))[0].write_bytes(b"\x89PNG broken")
    result = run_cli("search", "--data", str(folder), "--backbone", TINY_BACKBONE, "--weights", "none", "--trials", "1", "--epochs", "1",
                     "--image-size", "32", "--max-bad-images", "2", "--out", str(tmp_path / "runs"), "--study-name", "b")
    assert result.returncode == 0, result.stderr
    assert "skipped 2 image(s) of" in result.stderr and "(2 unreadable)" in result.stderr
    for flags in ([], ["--quantize", "int8"]):
        result = run_cli("export", "--runs", str(tmp_path / "runs"), "--study-name", "b", "--json", *flags)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["parity"]["max_abs_diff"] < 1e-4
