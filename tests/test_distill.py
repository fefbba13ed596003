"""``tlengine distill``: a student taught by a finished trial (or the K best) of a tiny search, end to end; the
teacher's outputs cached once per view and equal to the teacher on exactly the student's views; regression; mistakes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY_BACKBONE, write_brightness_csv, write_image_folder

TEACHER = "timm:resnet10t"
TINY = ["--weights", "none", "--image-size", "32", "--batch-size", "8", "--pruner", "none"]


@pytest.fixture(scope="module")
def teacher_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 3-trial search with resnet10t (the teacher's study ``t``), on its own copy of the images."""
    import tlengine

    root = tmp_path_factory.mktemp("teacher")
    data = write_image_folder(root / "data")
    tlengine.search(data, TEACHER, trials=3, epochs=1, weights="none", image_size=32, batch_size=8, out=root / "runs", study_name="t",
                    pruner="none", quiet=True)
    return root / "runs"


def test_a_student_is_taught_exported_and_predicted_without_torch(teacher_runs: Path, capsys: pytest.CaptureFixture) -> None:
    from tlengine._cli import main

    assert main(["distill", "--study-name", "t", "--runs", str(teacher_runs), "--student", TINY_BACKBONE, "--trials", "3",
                 "--epochs", "2", "--name", "s", *TINY]) == 0
    captured = capsys.readouterr()
    assert "taught by trial" in captured.err and "of study t (resnet10t" in captured.err
    assert "teacher vs student" in captured.out
    summary = json.loads((teacher_runs / "s" / "summary.json").read_text())
    teacher = summary["config"]["teacher"]
    assert teacher["study_name"] == "t" and teacher["backbones"] == [TEACHER] and len(teacher["trials"]) == 1
    assert {"distill_alpha", "distill_temperature"} <= set(summary["searched"])
    for trial in summary["trials"]:
        values = trial["values"]
        assert 0.1 <= values["distill_alpha"] <= 0.9 and 1.0 <= values["distill_temperature"] <= 8.0
        assert values["mixup"] == 0 and values["cutmix"] == 0
    taught = [t for t in summary["trials"] if t["values"]["freeze_depth"] < 6]  # the exact probe learns from the labels alone
    assert taught and all(t["state"] == "complete" for t in taught)
    compared = summary["distillation"]
    assert compared["student"]["params_m"] < compared["teacher"]["params_m"]  # test_efficientnet is the smaller
    assert compared["teacher"]["score"] == pytest.approx(teacher["scores"][0])
    page = (teacher_runs / "s" / "report.html").read_text()
    assert "<h2>Teacher</h2>" in page and "ONNX ms, batch 1" in page
    # the exported student names its teacher, and predicts with onnxruntime alone
    from test_predict import BLOCK_TORCH

    image = next((teacher_runs.parent / "data" / "val").rglob("*.png"))
    done = subprocess.run([sys.executable, "-c", BLOCK_TORCH, "predict", str(teacher_runs / "s" / "best.onnx"), str(image), "--json"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[0])["top"]
    import tlengine

    assert tlengine.load(teacher_runs / "s" / "best.onnx").metadata["teacher"]["study_name"] == "t"


def test_teacher_outputs_are_the_teacher_on_the_students_views_computed_once(teacher_runs: Path, tmp_path: Path,
                                                                              capsys: pytest.CaptureFixture) -> None:
    """Two trials with the same augmentation share one table per view (a second run computes none), and each row is
    the teacher's output on exactly the image the student's loader gave for that index in that epoch."""
    import numpy as np
    import torch

    import tlengine
    from tlengine._api import distill_config
    from tlengine._distill import Distiller, load_teacher
    from tlengine._inputs import InputRequest
    from tlengine._loaders import Augment
    from tlengine._preprocess import Preprocess
    from tlengine._search import _sources
    from tlengine._setup import make_setup
    from rich.console import Console

    cache = tmp_path / "cache"
    options = dict(runs=teacher_runs, trials=2, epochs=2, weights="none", image_size=32, batch_size=8, pruner="none", cache_dir=cache,
                   param={"augment": "crop", "crop_scale": 0.5, "hflip": 0.5, "freeze_depth": 0})
    capsys.readouterr()
    tlengine.distill("t", TINY_BACKBONE, name="once", **options)
    tables = sorted((cache / "teacher").glob("*.npy"))
    assert len(tables) == 2  # one per epoch's view, for both trials
    assert "teacher outputs: 2 view(s) computed, 2 reused" in capsys.readouterr().err
    tlengine.distill("t", TINY_BACKBONE, name="again", **options)  # another study, same views: read, not computed
    assert sorted((cache / "teacher").glob("*.npy")) == tables
    assert "teacher outputs: 0 view(s) computed, 4 reused" in capsys.readouterr().err

    config = distill_config(study_name="t", student=TINY_BACKBONE, teacher="best", storage=None, runs=teacher_runs, name="check",
                            epochs=2, weights="none", image_size=32, cache_dir=str(cache), param={"augment": "crop"})
    setup = make_setup(config, Console(quiet=True))
    source = _sources(setup, lambda line: None)[setup.record.backbone_spec].for_distillation()
    teacher = load_teacher(config.teacher)
    distiller = Distiller(teacher, setup.registry, "cpu", source.caches.store)
    augment = Augment(crop_scale=0.5, hflip=0.5)
    request = InputRequest(depth=0, image_size=32, augment=augment, mixup=False, batch_size=8, epochs=2, shuffle_seed=3)
    model = tlengine._model.build_trial_model(setup.registry, setup.record, {"head": "linear", "freeze_depth": 0},
                                              backbone_state=setup.base.state_dict())
    loader = source.inputs(model, model.backbone, request, count=False).train_loader
    (net,) = teacher.models(setup.registry)
    theirs = Preprocess.from_data_config(teacher.record.data_config, 32)
    mine = source.preprocess(32)
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        x, index = next(iter(loader))
        table = distiller.outputs(source, mine, augment, epoch)
        pixels = x * torch.tensor(mine.std).view(1, 3, 1, 1) + torch.tensor(mine.mean).view(1, 3, 1, 1)
        with torch.no_grad():
            expected = net((pixels - torch.tensor(theirs.mean).view(1, 3, 1, 1)) / torch.tensor(theirs.std).view(1, 3, 1, 1))
        assert np.allclose(table[index.numpy(), 0], expected.numpy(), atol=1e-4)


def test_top_k_averages_an_ensemble(teacher_runs: Path, tmp_path: Path) -> None:
    import numpy as np
    import optuna

    import tlengine

    result = tlengine.distill("t", TINY_BACKBONE, teacher="top:2", name="ens", runs=teacher_runs, trials=2, epochs=1, weights="none",
                              image_size=32, batch_size=8, pruner="none", cache_dir=tmp_path / "c", quiet=True)
    study = optuna.load_study(study_name="t", storage=f"sqlite:///{teacher_runs}/t/study.db")
    best_two = sorted((t for t in study.trials if t.state.name == "COMPLETE"), key=lambda t: (-t.values[0], t.number))[:2]
    assert list(result.record.teacher["trials"]) == [t.number for t in best_two]
    tables = list((tmp_path / "c" / "teacher").glob("*.npy"))
    assert tables and all(np.load(p).shape[1] == 2 for p in tables)  # (images, K teachers, classes)
    assert result.distillation["teacher"]["params_m"] == pytest.approx(2 * 4.924, rel=0.01)  # both models count


def test_regression_distils_the_teachers_predictions(tmp_path: Path) -> None:
    import numpy as np

    import tlengine

    csv = write_brightness_csv(tmp_path, 30)
    tlengine.search(csv, TEACHER, task="regression", trials=2, epochs=1, weights="none", image_size=32, batch_size=8,
                    out=tmp_path / "runs", study_name="r", pruner="none", quiet=True)
    result = tlengine.distill("r", TINY_BACKBONE, runs=tmp_path / "runs", trials=2, epochs=1, weights="none", image_size=32,
                              batch_size=8, pruner="none", quiet=True)
    assert result.record.task == "regression" and result.record.metric == "rmse"
    assert "distill_temperature" not in result.record.space and "distill_alpha" in result.searched
    assert all(r.state == "complete" and np.isfinite(r.score) for r in result.rows)
    assert result.distillation["student"]["score"] == pytest.approx(result.best.score)


#: The mistakes of ``tlengine distill`` (docs/errors.md's "Distillation" rows come from here: tests/gen_errors_doc.py).
MISTAKES = ("no such teacher study", "no such teacher trial", "`--teacher top:K` beyond the completed trials",
            "`--teacher` that is neither best, a number nor top:K", "a student that is the teacher (same backbone and image size)",
            "mixup or cutmix in a distillation study", "`distill_alpha` outside 0..1")
DISTILL_CASES = [
    (["--study-name", "nope", "--student", TINY_BACKBONE], "error: --study-name nope: no study database at"),
    (["--study-name", "t", "--student", TINY_BACKBONE, "--teacher", "99"], "error: --teacher 99: not a completed trial of study t"),
    (["--study-name", "t", "--student", TINY_BACKBONE, "--teacher", "top:9"], "error: --teacher top:9: study t has 3 completed trials"),
    (["--study-name", "t", "--student", TINY_BACKBONE, "--teacher", "top:x"], "error: --teacher top:x: expected best, a trial number"),
    (["--study-name", "t", "--student", TEACHER], "error: --student timm:resnet10t: the same as the teacher"),
    (["--study-name", "t", "--student", TINY_BACKBONE, "--param", "mixup=0.2"], "error: --param mixup: mixup is not for tlengine distill"),
    (["--study-name", "t", "--student", TINY_BACKBONE, "--param", "distill_alpha=1.5"], "error: --param distill_alpha: distill_alpha must lie in 0..1"),
]


@pytest.mark.parametrize("extra, expected", DISTILL_CASES, ids=MISTAKES)
def test_mistakes(teacher_runs: Path, capsys: pytest.CaptureFixture, extra: list[str], expected: str) -> None:
    from tlengine._cli import main

    assert main(["distill", "--runs", str(teacher_runs), *extra, *TINY, "--trials", "1", "--epochs", "1", "--name", "m"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(expected) and len(err.strip().splitlines()) == 1, err


def test_a_teacher_of_other_classes_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The data changed since the teacher's search (a class added): the student would learn classes the teacher never had."""
    import shutil

    import tlengine
    from tlengine._cli import main

    data = write_image_folder(tmp_path / "d", 4, 2)
    tlengine.search(data, TEACHER, trials=1, epochs=1, weights="none", image_size=32, out=tmp_path / "runs", study_name="c", quiet=True)
    for split in ("train", "val"):
        shutil.copytree(next((data / split).iterdir()), data / split / "zebra")
    assert main(["distill", "--runs", str(tmp_path / "runs"), "--study-name", "c", "--student", TINY_BACKBONE, *TINY]) == 2
    assert capsys.readouterr().err.startswith("error: --study-name c: the teacher was trained on other classes")


def test_workers_start_as_searches_with_the_same_teacher(teacher_runs: Path) -> None:
    """``--workers`` starts ``tlengine search`` processes: their command line carries the teacher (by its storage URL)."""
    import dataclasses

    from tlengine._api import distill_config, search_config
    from tlengine._cli import build_parser
    from tlengine._options import worker_argv

    config = distill_config(study_name="t", student=TINY_BACKBONE, teacher="top:2", storage=None, runs=teacher_runs, name="w",
                            epochs=1, weights="none", workers=2)
    argv = worker_argv(config, "journal:///x", "w", 1)
    args = {k: v for k, v in vars(build_parser().parse_args(argv)).items() if k not in ("command", "debug", "json")}
    again = search_config(**args)
    assert again.teacher == config.teacher and again.teacher.storage.startswith("sqlite:///") and again.teacher.which == "top:2"
    assert dataclasses.replace(again, worker=None, storage=None, study_name=None, workers=1, argv=()) == \
        dataclasses.replace(config, storage=None, study_name=None, workers=1, argv=())
