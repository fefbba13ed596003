"""Ranking backbones by transferability: LogME against a dense computation, the ranking and its margins."""

from __future__ import annotations

import math

import pytest
import torch

from tlengine._rank import MARGINS, Ranking, logme, rank_backbones


def _dense_evidence(f: torch.Tensor, y: torch.Tensor, alpha: float, beta: float) -> float:
    """The log evidence per sample of ``y`` under w ~ N(0, I/alpha), y ~ N(Fw, I/beta), by the textbook formula."""
    import numpy as np

    f, y = f.numpy(), y.numpy()
    n, d = f.shape
    a = alpha * np.eye(d) + beta * f.T @ f
    m = beta * np.linalg.solve(a, f.T @ y)
    total = (n / 2 * math.log(beta) + d / 2 * math.log(alpha) - n / 2 * math.log(2 * math.pi)
             - beta / 2 * float(((f @ m - y) ** 2).sum()) - alpha / 2 * float((m**2).sum()) - np.linalg.slogdet(a)[1] / 2)
    return total / n


@pytest.mark.parametrize("n,d", [(80, 6), (20, 40)])  # more images than features, and fewer
def test_logme_is_the_evidence_at_its_maximum(n: int, d: int) -> None:
    """LogME's fixed point maximises the evidence over both precisions: no point of a fine grid beats it, and the
    grid's best comes within a hair of it (regression: one standardised target)."""
    g = torch.Generator().manual_seed(0)
    f = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = f @ torch.randn(d, 1, generator=g, dtype=torch.float64) + 0.5 * torch.randn(n, 1, generator=g, dtype=torch.float64)
    value = logme(f.float(), y[:, 0].float(), task="regression", outputs=1)
    ys = (y - y.mean()) / y.std()
    grid = [10 ** (k / 20) for k in range(-80, 81)]
    best = max(_dense_evidence(f, ys, a, b) for a in grid[::4] for b in grid[::4])
    assert best <= value + 1e-4
    assert value - best < 0.05


def test_logme_classification_averages_one_hot_columns() -> None:
    """Classification: the mean over classes of each raw one-hot column's maximised evidence."""
    g = torch.Generator().manual_seed(1)
    f = torch.randn(60, 5, generator=g, dtype=torch.float64)
    labels = torch.arange(60) % 3
    f[:, 0] += labels.double()  # one feature tells the classes apart a little
    grid = [10 ** (k / 8) for k in range(-32, 33)]
    columns = [(labels == c).double()[:, None] for c in range(3)]
    expected = sum(max(_dense_evidence(f, y, a, b) for a in grid for b in grid) for y in columns) / 3
    assert logme(f.float(), labels, task="classification", outputs=3) == pytest.approx(expected, abs=0.02)


def test_informative_features_rank_above_noise() -> None:
    """The answer is known: features that carry the class (plus noise) against features of noise alone."""
    g = torch.Generator().manual_seed(2)
    labels = torch.arange(300) % 5
    informative = torch.nn.functional.one_hot(labels, 5).float() @ torch.randn(5, 32, generator=g) + 0.5 * torch.randn(300, 32, generator=g)
    noise = torch.randn(300, 32, generator=g)
    features = {"good": informative, "noise": noise}
    ranking = rank_backbones(["noise", "good"], lambda name: (logme(features[name], labels, task="classification", outputs=5), "computed"),
                             method="logme", metric="logme", higher_is_better=True)
    assert ranking.best == "good" and [c.backbone for c in ranking.candidates] == ["good", "noise"]
    assert ranking.candidates[0].score - ranking.candidates[1].score > MARGINS["logme"]
    assert ranking.kept == ("good",)  # far below: left out
    assert rank_backbones(["noise", "good"], lambda name: (0.0 if name == "noise" else 1.0, "cached"), method="logme", metric="logme",
                          higher_is_better=True, forced=True).kept == ("good", "noise")


def test_probe_margin_for_errors_is_relative() -> None:
    scores = {"a": 10.0, "b": 10.4, "c": 12.0}  # rmse: lower is better; 5 % of the best is 0.5
    ranking = rank_backbones(list(scores), lambda name: (scores[name], "computed"), method="probe", metric="rmse", higher_is_better=False)
    assert [c.backbone for c in ranking.candidates] == ["a", "b", "c"]
    assert ranking.kept == ("a", "b")
    lines = ranking.lines()
    assert "left out 1 more than 5% below the best" in lines[0] and lines[3].endswith("(left out)")


def test_ranking_round_trips_through_its_dict() -> None:
    ranking = rank_backbones(["x", "y"], lambda name: (0.3 if name == "x" else 0.25, "cached"), method="logme", metric="logme",
                             higher_is_better=True)
    again = Ranking.from_dict(ranking.to_dict())
    assert again == ranking and again.kept == ("x", "y") and again.seconds == ranking.seconds
