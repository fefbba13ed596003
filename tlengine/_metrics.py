"""Validation metrics.

Written with a few tensor operations rather than taken from scikit-learn or
torchmetrics, which the project does not depend on for this alone.
"""

from __future__ import annotations

from typing import Any

#: metric name -> (task, direction)
METRICS: dict[str, tuple[str, str]] = {
    "accuracy": ("classification", "maximize"),
    "macro_f1": ("classification", "maximize"),
    "balanced_accuracy": ("classification", "maximize"),
    "top5": ("classification", "maximize"),
    "rmse": ("regression", "minimize"),
    "mae": ("regression", "minimize"),
    "r2": ("regression", "maximize"),
}
DEFAULT_METRIC = {"classification": "accuracy", "regression": "rmse"}


def maximizes(metric: str) -> bool:
    """Whether a higher ``metric`` is better."""
    return METRICS[metric][1] == "maximize"


def check_metric(metric: str | None, task: str) -> str:
    """The metric to use for ``task`` (its default when ``metric`` is ``None``).

    Raises:
        UserError: Unknown metric, or one for the other task.
    """
    from tlengine._errors import UserError, unknown

    if metric is None:
        return DEFAULT_METRIC[task]
    if metric not in METRICS:
        raise unknown("metric", metric, METRICS, "--metric")
    if METRICS[metric][0] != task:
        options = ", ".join(m for m, (t, _) in METRICS.items() if t == task)
        raise UserError(f"--metric {metric}: a {METRICS[metric][0]} metric, but the task is {task}; use one of {options}")
    return metric


def score(metric: str, outputs: Any, targets: Any) -> float:
    """Compute ``metric`` from model outputs (logits, or predictions in target units) and targets.

    Args:
        metric: A key of :data:`METRICS`.
        outputs: Float tensor (N, C) of logits, or (N,) / (N, 1) regression predictions.
        targets: Long tensor (N,) of classes, or float tensor (N,).
    """
    import torch

    if METRICS[metric][0] == "regression":
        pred, target = outputs.reshape(-1).double(), targets.reshape(-1).double()
        if metric == "rmse":
            return torch.sqrt(torch.mean((pred - target) ** 2)).item()
        if metric == "mae":
            return torch.mean((pred - target).abs()).item()
        total = torch.sum((target - target.mean()) ** 2)
        return (1.0 - torch.sum((target - pred) ** 2) / total).item() if total > 0 else 0.0
    if metric == "top5":
        k = min(5, outputs.shape[-1])
        return (outputs.topk(k, dim=-1).indices == targets[:, None]).any(dim=-1).float().mean().item()
    pred = outputs.argmax(dim=-1)
    if metric == "accuracy":
        return (pred == targets).float().mean().item()
    n = outputs.shape[-1]
    confusion = torch.bincount(targets * n + pred, minlength=n * n).reshape(n, n).double()
    true_positive = confusion.diag()
    support, predicted = confusion.sum(1), confusion.sum(0)
    present = support > 0
    recall = true_positive[present] / support[present]
    if metric == "balanced_accuracy":
        return recall.mean().item()
    precision = torch.where(predicted > 0, true_positive / predicted.clamp_min(1), torch.zeros_like(predicted))
    f1 = torch.where(precision + true_positive / support.clamp_min(1) > 0,
                     2 * precision * (true_positive / support.clamp_min(1)) / (precision + true_positive / support.clamp_min(1)).clamp_min(1e-12),
                     torch.zeros_like(precision))
    return f1[present].mean().item()
