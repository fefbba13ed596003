"""tlengine._probe: the exact linear probe, against gradient descent on the same features, and in a search."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import TINY_BACKBONE


def blobs(n: int = 400, d: int = 24, classes: int = 4, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, d, generator=g) * 1.5
    y = torch.arange(n) % classes
    return centres[y] + torch.randn(n, d, generator=g), y


def objective(x, y, w, b, l2: float):
    import torch

    return torch.nn.functional.cross_entropy(x @ w.T + b, y) + 0.5 * l2 * (w * w).sum()


def test_exact_probe_reaches_the_optimum_gradient_descent_approaches() -> None:
    """The solved head has a zero gradient; 3,000 full-batch Adam steps on the same objective end no lower."""
    import torch

    from tlengine._probe import fit_linear_probe

    x, y = blobs()
    fit = fit_linear_probe(x, y, task="classification", metric="accuracy", outputs=4)
    w, b = fit.weight.clone().requires_grad_(True), fit.bias.clone().requires_grad_(True)
    loss = objective(x, y, w, b, fit.l2)
    loss.backward()
    assert float(w.grad.abs().max()) < 1e-4 and float(b.grad.abs().max()) < 1e-4
    assert loss.item() == pytest.approx(fit.train_loss, abs=1e-5)

    sw, sb = torch.zeros(4, x.shape[1], requires_grad=True), torch.zeros(4, requires_grad=True)
    adam = torch.optim.Adam([sw, sb], lr=0.05)
    for _ in range(3000):
        adam.zero_grad()
        sgd_loss = objective(x, y, sw, sb, fit.l2)
        sgd_loss.backward()
        adam.step()
    assert sgd_loss.item() >= fit.train_loss - 1e-5
    assert fit.inner_score > 0.9  # the blobs are separable enough


def test_ridge_probe_is_the_closed_form_solution() -> None:
    import torch

    from tlengine._probe import _ridge, Rows, fit_linear_probe

    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 10, generator=g)
    y = x @ torch.arange(1.0, 11.0) * 0.1 + 0.3 + 0.05 * torch.randn(300, generator=g)
    fit = fit_linear_probe(x, y, task="regression", metric="rmse", outputs=1)
    xc = (x - x.mean(0)).double()
    expected = torch.linalg.solve(xc.T @ xc / 300 + fit.l2 * torch.eye(10, dtype=torch.float64), xc.T @ (y.double() - y.double().mean()) / 300)
    torch.testing.assert_close(fit.weight[0].double(), expected, rtol=1e-4, atol=1e-5)
    w, b, _ = _ridge(Rows(x), y, 1, 1e-5, None, 0.0, None)
    assert float(((x @ w.T + b).squeeze(-1) - y).pow(2).mean().sqrt()) < 0.06  # recovers the line to the noise level


def test_probe_on_a_cache_file_read_in_chunks_equals_the_one_in_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import numpy as np

    from tlengine import _probe
    from tlengine._store import NpyFile

    x, y = blobs(n=300)
    file = NpyFile.create(tmp_path / "f.npy", tuple(x.shape), "float16")
    file[0 : len(x)] = x.numpy().astype(np.float16)
    in_memory = _probe.fit_linear_probe(NpyFile(tmp_path / "f.npy"), y, task="classification", metric="accuracy", outputs=4)
    monkeypatch.setattr(_probe, "IN_MEMORY_BYTES", 0)
    monkeypatch.setattr(_probe, "_CHUNK", 64)
    chunked = _probe.fit_linear_probe(NpyFile(tmp_path / "f.npy"), y, task="classification", metric="accuracy", outputs=4)
    assert chunked.l2 == in_memory.l2
    np.testing.assert_allclose(chunked.weight.numpy(), in_memory.weight.numpy(), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("cache", [True, False], ids=["cached", "uncached"])
def test_a_linear_probe_trial_is_solved_exactly_and_exported(tmp_path: Path, tiny_folder: Path, cache: bool) -> None:
    """The linear-probe recipe solves its head in one step (on cached or computed features); probe=sgd trains it by epochs."""
    import optuna

    import tlengine

    result = tlengine.search(tiny_folder, TINY_BACKBONE, trials=1, epochs=3, weights="none", image_size=32, out=tmp_path,
                             study_name="p", cache=cache, cache_dir=tmp_path / "cache", quiet=True)
    trial = optuna.load_study(study_name="p", storage=result.storage).trials[0]
    assert trial.user_attrs["recipe"] == "linear probe" and trial.state.name == "COMPLETE"
    assert trial.user_attrs["probe"]["features"] == ("cached" if cache else "computed")
    assert trial.user_attrs["probe"]["l2"] in (1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 1e-5)
    assert len(trial.user_attrs["history"]) == 1 and list(trial.intermediate_values) == [2]
    assert result.onnx_path is not None and result.best.score == pytest.approx(trial.value)
    from tlengine._export import read_metadata

    exported = float(read_metadata(result.onnx_path)["val_score"])  # the ONNX model, scored on decoded images
    val_images = sum(1 for _ in (tiny_folder / "val").rglob("*.png"))
    assert exported == pytest.approx(trial.value, abs=1 / val_images + 1e-9 if cache else 1e-6)  # cached features are fp16

    sgd = tlengine.search(tiny_folder, TINY_BACKBONE, trials=1, epochs=3, weights="none", image_size=32, out=tmp_path,
                          study_name="s", cache=cache, cache_dir=tmp_path / "cache", param={"probe": "sgd"}, quiet=True)
    trained = optuna.load_study(study_name="s", storage=sgd.storage).trials[0]
    assert "probe" not in trained.user_attrs and len(trained.user_attrs["history"]) == 3
    summary = json.loads((sgd.run_dir / "summary.json").read_text())
    assert summary["trials"][0]["values"]["probe"] == "sgd"


def test_l2_chosen_on_a_subset_then_the_head_solved_on_every_row(monkeypatch: pytest.MonkeyPatch) -> None:
    """Large sets choose the L2 strength on a subset; the head is still the optimum over all rows."""
    from tlengine import _probe

    monkeypatch.setattr(_probe, "SELECT_ROWS", 100)
    x, y = blobs(n=400)
    fit = _probe.fit_linear_probe(x, y, task="classification", metric="accuracy", outputs=4)
    w, b = fit.weight.clone().requires_grad_(True), fit.bias.clone().requires_grad_(True)
    objective(x, y, w, b, fit.l2).backward()
    assert float(w.grad.abs().max()) < 1e-4 and float(b.grad.abs().max()) < 1e-4
