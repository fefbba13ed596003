"""End-to-end ``tlengine search`` runs on tiny real data, resume, outputs, regression."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import SHARED, TINY_BACKBONE, run_cli, write_brightness_csv


def test_outputs_written(tiny_run: Path) -> None:
    summary = json.loads((tiny_run / "summary.json").read_text())
    assert (tiny_run / "best.safetensors").is_file()
    assert (tiny_run / "best.onnx").is_file()
    assert (tiny_run / "study.db").is_file()
    assert summary["metric"] == "accuracy"
    assert len(summary["trials"]) == 2
    assert summary["best"]["number"] in {t["number"] for t in summary["trials"] if t["state"] == "complete"}
    assert summary["parity"]["max_abs_diff"] < 1e-4
    # the opening trials are the enqueued recipes: linear probe first, then the top half
    stages = summary["config"]["stages"]
    assert [t["params"]["freeze_depth"] for t in summary["trials"]] == [stages, stages // 2]
    assert [t["recipe"] for t in summary["trials"]] == ["linear probe", "top half"]


def test_trials_differ_in_depth_and_lr(tmp_path: Path, tiny_folder: Path) -> None:
    import tlengine

    result = tlengine.search(tiny_folder, TINY_BACKBONE, trials=4, epochs=1, weights="none", image_size=32, out=tmp_path,
                             study_name="s", pruner="none", quiet=True)
    trials = json.loads((tmp_path / "s" / "summary.json").read_text())["trials"]
    assert len(trials) == 4 and [t["number"] for t in trials] == [r.number for r in result.rows]
    assert len({t["params"]["freeze_depth"] for t in trials}) >= 3
    assert len({round(t["params"]["lr"], 12) for t in trials}) >= 3


def test_rerun_resumes_study(tmp_path: Path, tiny_folder: Path) -> None:
    from tlengine._cli import main

    base = ["search", "--data", str(tiny_folder), "--backbone", TINY_BACKBONE, "--weights", "none", "--epochs", "1",
            "--image-size", "32", "--out", str(tmp_path), "--study-name", "r"]
    assert main(base + ["--trials", "1"]) == 0
    first = json.loads((tmp_path / "r" / "summary.json").read_text())["trials"]
    assert main(base + ["--trials", "2"]) == 0
    second = json.loads((tmp_path / "r" / "summary.json").read_text())["trials"]
    assert len(second) == 2
    assert second[0] == first[0]  # the finished trial is kept as it was
    assert main(base + ["--trials", "2"]) == 0  # nothing left to run
    assert len(json.loads((tmp_path / "r" / "summary.json").read_text())["trials"]) == 2


def test_resume_with_other_objective_refused(tmp_path: Path, tiny_folder: Path, capsys: pytest.CaptureFixture) -> None:
    from tlengine._cli import main

    base = ["search", "--data", str(tiny_folder), "--backbone", TINY_BACKBONE, "--weights", "none", "--trials", "1",
            "--image-size", "32", "--out", str(tmp_path), "--study-name", "x"]
    assert main(base + ["--epochs", "1"]) == 0
    capsys.readouterr()
    assert main(base + ["--epochs", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --study-name x:") and "epochs" in err


def test_regression_from_csv(tmp_path: Path) -> None:
    """Predict each image's mean brightness: a real regression target from real images."""
    from tlengine._cli import main
    from tlengine._predict import load

    args = ["search", "--data", str(write_brightness_csv(tmp_path)), "--task", "regression", "--backbone", TINY_BACKBONE,
            "--weights", "none", "--trials", "2", "--epochs", "2", "--image-size", "32", "--out", str(tmp_path / "runs"),
            "--study-name", "reg"]
    assert main(args) == 0
    run = tmp_path / "runs" / "reg"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["metric"] == "rmse" and summary["direction"] == "minimize"
    model = load(run / "best.onnx")
    assert model.task == "regression"
    predictions = model.predict([tmp_path / "0.png", tmp_path / "1.png"])
    assert all(p.value is not None and -10 < p.value < 10 for p in predictions)


def test_json_output(tmp_path: Path, tiny_folder: Path) -> None:
    result = run_cli("search", "--data", str(tiny_folder), "--backbone", TINY_BACKBONE, "--weights", "none",
                     "--trials", "1", "--epochs", "1", "--image-size", "32", "--out", str(tmp_path), "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["study_name"] == f"{tiny_folder.name}-test_efficientnet"
    assert len(summary["trials"]) == 1


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED / "fashion-mnist-2k").is_dir(), reason="../shared/data/fashion-mnist-2k not present")
def test_real_data_real_weights(tmp_path: Path) -> None:
    """lite0 with its real ImageNet weights on the 2,000-image Fashion-MNIST cut."""
    result = run_cli("search", "--data", str(SHARED / "fashion-mnist-2k"), "--trials", "4", "--epochs", "2",
                     "--image-size", "64", "--out", str(tmp_path), "--study-name", "fm", "--json", timeout=1800)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["best"]["score"] > 0.75


def test_journal_storage(tmp_path: Path, tiny_folder: Path) -> None:
    """Optuna's journal file storage (for several processes on one machine) works for search and export."""
    from tlengine._cli import main

    storage = f"journal://{tmp_path / 'study.log'}"
    args = ["search", "--data", str(tiny_folder), "--backbone", TINY_BACKBONE, "--weights", "none", "--trials", "2",
            "--epochs", "1", "--image-size", "32", "--out", str(tmp_path), "--study-name", "j", "--storage", storage]
    assert main(args) == 0
    assert (tmp_path / "study.log").stat().st_size > 0 and not (tmp_path / "j" / "study.db").exists()
    assert main(args[:args.index("--trials") + 1] + ["3"] + args[args.index("--trials") + 2:]) == 0
    assert len(json.loads((tmp_path / "j" / "summary.json").read_text())["trials"]) == 3
    assert main(["export", "--storage", storage, "--study-name", "j", "--out", str(tmp_path / "e.onnx")]) == 0
    assert (tmp_path / "e.onnx").is_file()


def test_same_command_same_model(tmp_path: Path, tiny_folder: Path) -> None:
    """Seeded trials train bit-identically (torch, numpy and Python's random, which timm's crops use)."""
    import torch
    from safetensors.torch import load_file

    from tlengine._cli import main

    for run in ("a", "b"):
        assert main(["search", "--data", str(tiny_folder), "--backbone", TINY_BACKBONE, "--weights", "none", "--trials", "2",
                     "--epochs", "1", "--image-size", "32", "--out", str(tmp_path / run), "--study-name", "d"]) == 0
    first, second = (load_file(str(tmp_path / run / "d" / "trials" / "1.safetensors")) for run in ("a", "b"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_backbone_with_a_head_convolution(tmp_path: Path, tiny_folder: Path) -> None:
    """MobileNetV3 pools, then widens (288 channels to 1024 features): heads take its ``head_hidden_size``.
    The search's own export rebuilds the model from its checkpoint as ``tlengine export`` does."""
    from tlengine._cli import main

    args = ["search", "--data", str(tiny_folder), "--backbone", "mobilenetv3_small_050", "--weights", "none", "--trials", "1",
            "--epochs", "1", "--image-size", "32", "--out", str(tmp_path), "--study-name", "m"]
    assert main(args) == 0
    summary = json.loads((tmp_path / "m" / "summary.json").read_text())
    assert [t["state"] for t in summary["trials"]] == ["complete"]
    assert summary["parity"]["max_abs_diff"] < 1e-4 and (tmp_path / "m" / "best.onnx").is_file()


def test_timeout_ends_the_running_trial_at_its_next_epoch_end(tmp_path: Path, tiny_folder: Path) -> None:
    """--timeout bounds the whole search: the trial running at the deadline stops after its epoch, pruned with
    its last score and the reason, and no trial starts after it."""
    import optuna

    import tlengine

    # 2,000 epochs take minutes: the deadline, 8 s after the start (setup included), falls inside the first trial
    result = tlengine.search(tiny_folder, TINY_BACKBONE, trials=5, epochs=2000, weights="none", image_size=16, out=tmp_path,
                             study_name="t", pruner="none", timeout=8, cache=False, param={"hflip": 0.5}, quiet=True)
    study = optuna.load_study(study_name="t", storage=result.storage)
    stopped = [t for t in study.trials if str(t.user_attrs.get("prune_reason", "")).startswith("stopped at the --timeout deadline")]
    assert len(stopped) == 1 and stopped[0].state.name == "PRUNED"
    assert all(t.state.name == "WAITING" for t in study.trials[stopped[0].number + 1:])  # nothing started after it
    assert 1 <= len(stopped[0].intermediate_values) < 2000
    row = next(r for r in result.rows if r.number == stopped[0].number)
    assert row.state == "pruned" and row.score == stopped[0].intermediate_values[max(stopped[0].intermediate_values)]
