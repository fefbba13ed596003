"""Built-in heads: ``linear`` and ``mlp``."""

from __future__ import annotations

from typing import Any

from tlengine import Head, hookimpl


@hookimpl
def register_heads(register):
    register(Head("linear", linear, "one linear layer: softmax classification or linear regression"))
    register(Head("mlp", mlp, "Dense-1024 + ReLU + dropout, then a linear layer", params={"hidden": 1024, "dropout": 0.2}))


def linear(in_features: int, num_outputs: int, task: str) -> Any:
    """A single linear layer."""
    import torch

    return torch.nn.Linear(in_features, num_outputs)


def mlp(in_features: int, num_outputs: int, task: str, hidden: int = 1024, dropout: float = 0.2) -> Any:
    """The classic transfer-learning head: Dense(1024) + ReLU + dropout + Dense(outputs)."""
    import torch

    return torch.nn.Sequential(
        torch.nn.Linear(in_features, hidden),
        torch.nn.ReLU(inplace=True),
        torch.nn.Dropout(dropout),
        torch.nn.Linear(hidden, num_outputs),
    )
