"""Validation metrics against hand-computed values."""

from __future__ import annotations

import pytest

from tlengine import UserError
from tlengine._metrics import check_metric, score


def logits_for(predictions: list[int], classes: int = 3):
    import torch

    return torch.nn.functional.one_hot(torch.tensor(predictions), classes).float()


def test_classification_metrics() -> None:
    import torch

    targets = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])
    outputs = logits_for([0, 0, 0, 1, 1, 0, 2, 1])
    assert score("accuracy", outputs, targets) == pytest.approx(5 / 8)
    # recall per class: 3/4, 1/2, 1/2
    assert score("balanced_accuracy", outputs, targets) == pytest.approx((0.75 + 0.5 + 0.5) / 3)
    # precision: 3/4, 1/3, 1/1 -> F1: 0.75, 0.4, 2/3
    assert score("macro_f1", outputs, targets) == pytest.approx((0.75 + 0.4 + 2 / 3) / 3)
    ranked = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.0]])
    assert score("top5", ranked, torch.tensor([6])) == 0.0 and score("top5", ranked, torch.tensor([2])) == 1.0


def test_regression_metrics() -> None:
    import torch

    pred, target = torch.tensor([1.0, 2.0, 4.0]), torch.tensor([1.0, 3.0, 3.0])
    assert score("rmse", pred, target) == pytest.approx((2 / 3) ** 0.5)
    assert score("mae", pred, target) == pytest.approx(2 / 3)
    # mean 7/3: total sum of squares 16/9 + 4/9 + 4/9 = 8/3; residual sum of squares 2
    assert score("r2", pred, target) == pytest.approx(1 - 2 / (8 / 3))


def test_check_metric() -> None:
    assert check_metric(None, "classification") == "accuracy" and check_metric(None, "regression") == "rmse"
    with pytest.raises(UserError, match="--metric rmse: a regression metric, but the task is classification"):
        check_metric("rmse", "classification")
    with pytest.raises(UserError, match="did you mean 'macro_f1'"):
        check_metric("macro_f", "classification")
