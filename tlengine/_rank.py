"""Ranking candidate backbones before the search, by how well their frozen features transfer.

Each candidate's pooled features of the training images (after every stage, at the
evaluation crop, through the search's caches, so that its trials reuse them) are scored
with one of two estimates:

- ``logme`` (You et al., ICML 2021, "LogME: Practical Assessment of Pre-trained Models
  for Transfer Learning"): the log marginal evidence per image of a Bayesian linear
  model from the features to the targets (one-hot classes, averaged; or the
  standardised regression target), with its two precisions fitted by fixed-point
  iteration in the features' eigenbasis. Closed form but for that iteration; no
  validation split needed.
- ``probe``: the exact linear probe's validation score (:mod:`tlengine._probe`, the same
  solver as a linear-probe trial), in the study's metric.

LogME has no implementation in the libraries this project uses (timm, Optuna,
torchvision); it is written here from the paper's algorithm, in a few lines of torch
linear algebra, reading cache files a chunk at a time (:class:`~tlengine._probe.Rows`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

#: Ranking methods (``[search] rank``).
RANKERS = ("probe", "logme")
#: Candidates scoring below the best by more than this are left out of the search: LogME evidence per image
#: (nats), or the probe's metric (points of accuracy-like metrics, or a fraction of the best for errors).
MARGINS = {"logme": 0.1, "probe": 0.05}


@dataclass(frozen=True)
class Ranked:
    """One candidate's transferability.

    Attributes:
        backbone: ``NAME:ARCH``, as ``--backbone`` takes it.
        score: The estimate (higher is better for LogME and accuracy-like metrics).
        seconds: Time it took, the features included.
        features: ``"cached"`` or ``"computed"``.
        kept: Whether the candidate stays in the search.
    """

    backbone: str
    score: float
    seconds: float
    features: str
    kept: bool = True


@dataclass(frozen=True)
class Ranking:
    """The candidates, best first, and how they were ranked.

    Attributes:
        method: ``logme`` or ``probe``.
        metric: What the score is (``logme``, or the study's metric).
        higher_is_better: Whether a higher score is better.
        margin: Candidates further than this below the best are left out (see :data:`MARGINS`).
        candidates: Every candidate, best first.
        forced: ``--param backbone`` keeps every candidate, whatever its score.
    """

    method: str
    metric: str
    higher_is_better: bool
    margin: float
    candidates: tuple[Ranked, ...]
    forced: bool = False

    @property
    def best(self) -> str:
        """The top-ranked candidate."""
        return self.candidates[0].backbone

    @property
    def kept(self) -> tuple[str, ...]:
        """The candidates the search keeps, best first."""
        return tuple(c.backbone for c in self.candidates if c.kept)

    @property
    def seconds(self) -> float:
        """The ranking's total time."""
        return sum(c.seconds for c in self.candidates)

    def lines(self) -> list[str]:
        """What the search prints: a heading and one line per candidate."""
        left = [c.backbone for c in self.candidates if not c.kept]
        head = f"backbones ranked by {self._what()} of their frozen features in {self.seconds:.1f} s"
        if left:
            head += f"; left out {len(left)} more than {self._margin()} below the best (--param backbone=[...] keeps them)"
        elif self.forced:
            head += "; --param backbone keeps every one"
        width = max(len(c.backbone) for c in self.candidates)
        rows = [f"  {i}. {c.backbone:<{width}}  {self.metric} {c.score:.4f}  {c.seconds:5.1f} s"
                + ("" if c.kept else "  (left out)") for i, c in enumerate(self.candidates, 1)]
        return [head, *rows]

    def _what(self) -> str:
        return "LogME (You et al., 2021)" if self.method == "logme" else f"the exact linear probe's validation {self.metric}"

    def _margin(self) -> str:
        if self.method == "probe" and not self.higher_is_better:
            return f"{self.margin:.0%}"
        return f"{self.margin:g}"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict, to store in the study."""
        return {"method": self.method, "metric": self.metric, "higher_is_better": self.higher_is_better, "margin": self.margin,
                "forced": self.forced, "candidates": [vars(c).copy() for c in self.candidates]}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Ranking:
        """Read :meth:`to_dict`'s dict back."""
        return cls(raw["method"], raw["metric"], raw["higher_is_better"], raw["margin"],
                   tuple(Ranked(**c) for c in raw["candidates"]), raw.get("forced", False))


def logme(features: Any, targets: torch.Tensor, *, task: str, outputs: int, max_iterations: int = 100) -> float:
    """LogME: the mean over target columns of the log evidence per image of ``targets`` given ``features``.

    Args:
        features: ``(N, D)`` features (a tensor, an array or a cache file; read a chunk at a time).
        targets: Class indices (classification) or values (regression, standardised here).
        task: ``classification`` (one one-hot column per class) or ``regression``.
        outputs: The number of classes (classification).
        max_iterations: Fixed-point iterations per column at most (they converge in a handful).
    """
    import torch

    from tlengine._probe import Rows

    rows = Rows(features)
    n, d = rows.shape
    if task == "classification":
        y = torch.nn.functional.one_hot(targets.long(), outputs).double()
    else:
        y = targets.double().reshape(n, -1)
        y = (y - y.mean(0)) / y.std(0).clamp_min(1e-12)
    gram = torch.zeros(d, d, dtype=torch.float64)
    fty = torch.zeros(d, y.shape[1], dtype=torch.float64)
    for start, chunk in rows.chunks():
        block = chunk.double()
        gram += block.T @ block
        fty += block.T @ y[start : start + len(block)]
    sigma, vectors = torch.linalg.eigh(gram)  # F^T F = V diag(sigma) V^T; sigma_i = s_i^2 of F's SVD
    keep = sigma > sigma.max().clamp_min(1e-30) * 1e-10
    sigma, vectors = sigma[keep], vectors[:, keep]
    z = (vectors.T @ fty) / sigma.sqrt()[:, None]  # U^T y, from F^T y = V S U^T y
    evidence = [_evidence(sigma, z[:, j], float((y[:, j] ** 2).sum()), n, d, max_iterations) for j in range(y.shape[1])]
    return float(sum(evidence) / len(evidence))


def _evidence(sigma: torch.Tensor, z: torch.Tensor, y2: float, n: int, d: int, max_iterations: int) -> float:
    """One target column's log evidence per image (the paper's Algorithm 2, in the features' eigenbasis)."""
    alpha, beta = 1.0, 1.0
    z2 = z**2
    outside = max(y2 - float(z2.sum()), 0.0)  # the part of y outside the features' span
    for _ in range(max_iterations):
        denom = alpha + beta * sigma
        gamma = float((beta * sigma / denom).sum())
        m2 = float((beta**2 * sigma * z2 / denom**2).sum())
        res2 = float((alpha**2 * z2 / denom**2).sum()) + outside
        new_alpha, new_beta = gamma / max(m2, 1e-30), (n - gamma) / max(res2, 1e-30)
        done = abs(new_alpha / new_beta - alpha / beta) / (alpha / beta) < 1e-5
        alpha, beta = new_alpha, new_beta
        if done:
            break
    denom = alpha + beta * sigma
    m2 = float((beta**2 * sigma * z2 / denom**2).sum())
    res2 = float((alpha**2 * z2 / denom**2).sum()) + outside
    log_det = float(denom.log().sum()) + (d - len(sigma)) * math.log(alpha)
    total = (n / 2 * math.log(beta) + d / 2 * math.log(alpha) - n / 2 * math.log(2 * math.pi)
             - beta / 2 * res2 - alpha / 2 * m2 - log_det / 2)
    return total / n


def rank_backbones(
    candidates: Sequence[str],
    score: Callable[[str], tuple[float, str]],
    *,
    method: str,
    metric: str,
    higher_is_better: bool,
    forced: bool = False,
) -> Ranking:
    """Score each candidate with ``score`` (its estimate and where its features came from), rank them
    best first, and leave out those further than :data:`MARGINS` below the best unless ``forced``."""
    scored = []
    for backbone in candidates:
        started = time.perf_counter()
        value, source = score(backbone)
        scored.append(Ranked(backbone, value, round(time.perf_counter() - started, 3), source))
    order = sorted(scored, key=lambda c: -c.score if higher_is_better else c.score)
    margin = MARGINS[method]
    best = order[0].score

    def near(value: float) -> bool:
        if method == "probe" and not higher_is_better:  # errors: a fraction of the best one
            return value <= best * (1 + margin)
        return (best - value if higher_is_better else value - best) <= margin

    ranked = tuple(Ranked(c.backbone, c.score, c.seconds, c.features, forced or near(c.score)) for c in order)
    return Ranking(method, metric, higher_is_better, margin, ranked, forced)
