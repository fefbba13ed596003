"""The study record: one typed record written by the search and read back by every command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tlengine._record import StudyRecord, read_record


def record(**changes: object) -> StudyRecord:
    base = StudyRecord(
        backbone="timm", arch="resnet18", weights="none", task="classification", classes=("a", "b"), epochs=2, metric="accuracy",
        objectives=None, class_weights=False, stages=5, data_config={"mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic",
                                                                     "crop_pct": 0.875},
        target_mean=0.0, target_std=1.0, dataset="imagefolder", data="/d", space={"lr": {"kind": "float", "low": 1e-4, "high": 1e-2}},
    )
    return StudyRecord(**{**base.__dict__, **changes})


def test_round_trip_through_json() -> None:
    original = record(objectives=("accuracy", "latency"), early={"image_size": 16, "epochs": 1})
    again = StudyRecord.from_dict(json.loads(json.dumps(original.to_dict())))
    assert again == original and again.cost == "latency" and again.num_outputs == 2 and again.backbone_spec == "timm:resnet18"


def test_an_older_study_without_the_newer_keys_reads_back() -> None:
    stored = {k: v for k, v in record().to_dict().items() if k not in ("confine_paths", "max_bad_images", "early", "seed")}
    stored["something_later_versions_add"] = 1
    again = StudyRecord.from_dict(stored)
    assert again.confine_paths is False and again.max_bad_images == 0.01 and again.early is None and again.seed == 0


def test_conflicts_name_what_differs() -> None:
    assert record().conflict(record(seed=3, max_bad_images=5.0)) is None  # not part of the objective
    assert "epochs=3, not 2" in record().conflict(record(epochs=3))
    changed = record().conflict(record(space={"lr": {"kind": "float", "low": 1e-5, "high": 1e-2}}))
    assert changed.startswith("this study searched another space (lr differ)")


def test_every_command_reads_the_same_record(tiny_run: Path) -> None:
    """The search stored it; export, show and report read it back through ``read_record``."""
    import tlengine
    from tlengine._study import find_study

    study, _ = find_study("tiny", runs=str(tiny_run.parent))
    stored = read_record(study)
    summary = json.loads((tiny_run / "summary.json").read_text())
    assert stored.to_dict() == summary["config"] and stored.stages == 6 and stored.classes == tuple(summary["config"]["classes"])
    assert tlengine.show("tiny", runs=tiny_run.parent).stages == stored.stages


def test_a_study_not_made_by_tlengine_is_refused(tmp_path: Path) -> None:
    import optuna

    from tlengine import UserError

    study = optuna.create_study(study_name="plain", storage=f"sqlite:///{tmp_path / 'p.db'}")
    with pytest.raises(UserError, match="--study-name plain: not a tlengine study"):
        read_record(study)
