"""The CLI's error boundary: user mistakes are one ``error:`` line and exit code 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import TINY_BACKBONE, run_cli


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_help_is_fast_and_imports_no_torch() -> None:
    import subprocess
    import sys

    code = "import sys; from tlengine._cli import build_parser; build_parser().format_help(); import tlengine; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_missing_data() -> None:
    assert_one_line_error(run_cli("search", "--data", "/no/such/folder"), "--data /no/such/folder", "no such")


def test_empty_data_folder(tmp_path: Path) -> None:
    assert_one_line_error(run_cli("search", "--data", str(tmp_path)), str(tmp_path), "the folder is empty")


def test_loose_images_without_class_folders(tmp_path: Path) -> None:
    from PIL import Image

    Image.new("L", (8, 8)).save(tmp_path / "a.png")
    assert_one_line_error(run_cli("search", "--data", str(tmp_path)), str(tmp_path), "has no class subfolders")


def test_empty_class_folders(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert_one_line_error(run_cli("search", "--data", str(tmp_path)), "no images")


@pytest.mark.parametrize(
    "option,value,expected",
    [
        ("--backbone", "resnet19", "did you mean 'resnet18'"),
        ("--backbone", "timm:resnet19", "did you mean 'resnet18'"),
        ("--head", "mpl", "did you mean 'mlp'"),
        ("--optimizer", "adamww", "did you mean 'adamw'"),
        ("--dataset", "imagefoldr", "did you mean 'imagefolder'"),
        ("--sampler", "tpee", "did you mean 'tpe'"),
    ],
)
def test_unknown_names_suggest(option: str, value: str, expected: str, tiny_folder: Path) -> None:
    assert_one_line_error(run_cli("search", "--data", str(tiny_folder), option, value), option, repr(value), expected)


def test_csv_without_expected_columns(tmp_path: Path) -> None:
    csv = tmp_path / "d.csv"
    csv.write_text("picture,kind\na.png,cat\n")
    assert_one_line_error(run_cli("search", "--data", str(csv)), str(csv), "cannot tell which columns", "picture, kind", "--image-column",
                          "--target-column")


@pytest.mark.parametrize("option", ["--trials", "--epochs", "--batch-size"])
def test_non_positive_numbers(option: str, tiny_folder: Path) -> None:
    assert_one_line_error(run_cli("search", "--data", str(tiny_folder), option, "0"), option)


def test_debug_shows_traceback() -> None:
    result = run_cli("--debug", "search", "--data", "/no/such/folder")
    assert result.returncode != 0
    assert "Traceback" in result.stderr


def test_predict_non_model(tmp_path: Path) -> None:
    bogus = tmp_path / "x.onnx"
    bogus.write_text("not a model")
    image = tmp_path / "i.png"
    assert_one_line_error(run_cli("predict", str(bogus), str(image)), str(bogus))


def test_bad_image_size(tiny_folder: Path) -> None:
    result = run_cli("search", "--data", str(tiny_folder), "--backbone", "timm:test_vit", "--weights", "none",
                     "--image-size", "33", "--trials", "1", "--epochs", "1")
    assert_one_line_error(result, "--image-size 33")


def test_weights_hub_offline_or_missing_file(tiny_folder: Path, tmp_path: Path) -> None:
    result = run_cli("search", "--data", str(tiny_folder), "--backbone", TINY_BACKBONE, "--weights", str(tmp_path / "w.pth"))
    assert_one_line_error(result, "--weights", "does not exist")


def test_hub_weights_unreachable(tiny_folder: Path) -> None:
    result = run_cli("search", "--data", str(tiny_folder), "--backbone", "resnet10t", "--weights", "hub",
                     env={"HF_HUB_OFFLINE": "1"})
    assert_one_line_error(result, "--weights hub", "could not download pretrained weights for resnet10t", "--weights FILE")


def test_results_table_reads_in_80_columns(tiny_run: Path) -> None:
    """Every recipe, state and value of the demo's space fits: no cell cut short with an ellipsis, no line over 80."""
    import dataclasses

    import optuna
    from rich.console import Console

    from tlengine._cli import results_table
    from tlengine._record import read_record
    from tlengine._search import SearchResult
    from tlengine._study import trial_rows

    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tiny_run / 'study.db'}")
    rows = trial_rows(study)
    searched = ("freeze_depth", "lr", "layer_decay", "label_smoothing", "augment", "crop_scale")  # the demo's space
    params = {"freeze_depth": 6, "lr": 1.234e-5, "layer_decay": 0.8125, "label_smoothing": 0.0625, "augment": "randaugment",
              "crop_scale": 0.421875}
    rows += [dataclasses.replace(rows[0], number=17, recipe="top half", state="pruned", params=params, score=0.912345,
                                 seconds=1234.5, epochs=12),
             dataclasses.replace(rows[0], number=118, recipe=None, state="running", params={**params, "lr": 0.01, "augment": "crop"},
                                 score=None, seconds=None)]
    result = SearchResult("demo-tf_efficientnet_lite0", "sqlite:///x", tiny_run, read_record(study), tuple(rows), rows[0], searched)
    console = Console(width=80, record=True, color_system=None)
    console.print(results_table(result))
    text = console.export_text()
    assert "…" not in text and max(len(line) for line in text.splitlines()) <= 80, text
    assert "1.2e-05" in text and "1.0e-02" in text and "RA.42" in text and "crop.42" in text and "half FT" in text and "probe" in text and "0.9123" in text and "1234" in text and "118" in text
