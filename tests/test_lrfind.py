"""tlengine._lrfind: the learning-rate range test that sets where ``lr`` is searched."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from conftest import TINY_BACKBONE


def test_suggestion_is_a_tenth_of_the_lowest_loss_and_the_range_a_decade_either_side() -> None:
    from tlengine._lrfind import suggest

    lrs = [1e-6 * 10 ** (i / 10) for i in range(61)]
    losses = [abs(math.log10(lr) + 2) + 1 for lr in lrs]  # lowest at 1e-2
    suggested, low, high = suggest(lrs, losses, (1e-5, 1e-1))
    assert suggested == pytest.approx(1e-3) and low == pytest.approx(1e-4) and high == pytest.approx(1e-2)


def test_range_is_shifted_inside_the_optimizer_bounds() -> None:
    from tlengine._lrfind import suggest

    lrs = [1e-6 * 10 ** (i / 10) for i in range(61)]
    lowest_at = lambda target: [abs(math.log10(lr) - math.log10(target)) for lr in lrs]  # noqa: E731
    assert suggest(lrs, lowest_at(1e-5), (1e-5, 1e-2)) == pytest.approx((1e-5, 1e-5, 1e-3))  # the floor, two decades up
    assert suggest(lrs, lowest_at(1.0), (1e-5, 1e-2)) == pytest.approx((1e-2, 1e-4, 1e-2))  # the ceiling, two decades down
    suggested, low, high = suggest(lrs, lowest_at(2e-4), (1e-5, 1e-2))  # a decade below would leave the bounds
    assert suggested == pytest.approx(2e-5, rel=0.15) and (low, high) == pytest.approx((1e-5, 1e-3))


def test_range_test_on_a_separable_problem_finds_rates_that_learn() -> None:
    """A linear classifier on separable data: the smoothed loss falls, then blows up at large rates; the test
    stops there, and training at the suggested rate for the same number of steps lowers the loss."""
    import torch

    from tlengine._lrfind import END, START, lr_range_test

    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 8, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long()

    class Batches:
        def __init__(self) -> None:
            self.epoch = 0

        def set_epoch(self, epoch: int) -> None:
            self.epoch = epoch

        def __len__(self) -> int:
            return 16

        def __iter__(self):
            order = torch.randperm(512, generator=torch.Generator().manual_seed(self.epoch))
            for i in range(16):
                idx = order[i * 32:(i + 1) * 32]
                yield x[idx], y[idx]

    torch.manual_seed(0)
    model = torch.nn.Linear(8, 2)
    loss_fn = torch.nn.CrossEntropyLoss()
    test = lr_range_test(model, lambda lr: torch.optim.SGD(model.parameters(), lr=lr), Batches(), loss_fn=loss_fn, device="cpu",
                         bounds=(1e-5, 10.0), steps=60)
    assert len(test.lrs) == len(test.losses) <= 60 and test.lrs[0] == pytest.approx(START) and test.lrs[-1] <= END
    assert all(b > a for a, b in zip(test.lrs, test.lrs[1:]))  # geometric and increasing, cycling over the 16 batches
    assert min(test.losses) < test.losses[0] - 0.1  # it learned somewhere in the sweep
    assert 1e-5 <= test.low < test.suggested < test.high <= 10.0
    assert test.to_dict()["suggested"] == test.suggested and "a range test of" in test.line()
    torch.manual_seed(0)
    fresh = torch.nn.Linear(8, 2)
    before = loss_fn(fresh(x), y).item()
    optimizer = torch.optim.SGD(fresh.parameters(), lr=test.suggested)
    for _ in range(3):
        for bx, by in Batches():
            optimizer.zero_grad()
            loss_fn(fresh(bx), by).backward()
            optimizer.step()
    assert loss_fn(fresh(x), y).item() < before - 0.1


def test_search_measures_the_range_once_and_a_fixed_lr_skips_it(tmp_path: Path, tiny_folder: Path) -> None:
    """The range test runs before the first trial, its curve is kept in the study record, the searched range and
    the recipes' rate come from it; ``--param lr=...`` skips it; a resumed study adopts it without measuring again."""
    import optuna

    import tlengine

    common = dict(data=tiny_folder, backbone=TINY_BACKBONE, epochs=1, weights="none", image_size=32, out=tmp_path,
                  cache_dir=tmp_path / "cache", quiet=True)
    result = tlengine.search(trials=3, study_name="l", **common)
    test = result.record.lr_test
    assert test is not None and len(test["lrs"]) == len(test["losses"]) > 5
    assert (result.record.space["lr"]["low"], result.record.space["lr"]["high"]) == (test["low"], test["high"])
    study = optuna.load_study(study_name="l", storage=f"sqlite:///{tmp_path / 'l' / 'study.db'}")
    full = next(t for t in study.trials if t.user_attrs.get("recipe") == "full fine-tune")
    assert full.params["lr"] == pytest.approx(test["suggested"])
    resumed = tlengine.search(trials=4, study_name="l", **common)  # the same options: the stored decisions, not new ones
    assert resumed.record.lr_test == test and resumed.record.space["lr"] == result.record.space["lr"]
    fixed = tlengine.search(trials=1, study_name="f", param={"lr": 1e-3}, **common)
    assert fixed.record.lr_test is None and fixed.record.space["lr"]["value"] == 1e-3
