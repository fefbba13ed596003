"""Augmentation decided from the data: horizontal flips only where they keep the label.

A flip is harmless for most photos and garments and wrong for digits, text, left/right
classes and rotation angles. Before the first trial, an exact linear probe
(:mod:`tlengine._probe`) is fitted on the frozen pooled features of (up to 4,000 of) the
training images and scored on (up to 4,000 of) the validation images as they are and
mirrored. Pretrained backbones were trained with flips, so their features of a mirrored
photo are close to the photo's own, and the probe scores mirrored images as well as the
originals unless mirroring changes what they show. Where the mirrored score is clearly
worse (by more than one point of the metric, or 5 % of a regression error, and more than
two standard errors of the paired per-image difference), ``hflip`` is fixed at 0 for
every trial. ``--param hflip=...`` (or ``hflip`` in the config) skips the check.

On scikit-learn's handwritten digits (32 px, lite0 at 64 px) the probe scores 0.903 on the
validation images and 0.706 on them mirrored: flips are left out; on Fashion-MNIST
(``fashion-mnist-2k``) 0.840 and 0.828, within the noise: flips are kept.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from tlengine._inputs import InputSource
    from tlengine._record import StudyRecord
    from tlengine._setup import SearchSetup


@dataclass(frozen=True)
class FlipCheck:
    """What the flip check measured and decided.

    Attributes:
        score: The probe's validation score (the study's metric) on the images as they are.
        flipped: Its score on the same images mirrored.
        drop: How much worse the mirrored images score, in the metric's own direction (positive = worse).
        noise: Two standard errors of the paired per-image difference, in the same units.
        keep: Whether flips stay in the search.
        images: Validation images compared.
        seconds: Wall time of the check.
    """

    score: float
    flipped: float
    drop: float
    noise: float
    keep: bool
    images: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """For the study record."""
        return {k: round(v, 6) if isinstance(v, float) else v for k, v in dataclasses.asdict(self).items()}

    def line(self, metric: str) -> str:
        """One line saying what was decided and why."""
        units, unit = (1.0, "") if metric in ("rmse", "mae") else (100.0, " points")
        figures = (f"a linear probe scores {metric} {self.score:.4f} on {self.images} validation images and {self.flipped:.4f} on them "
                   f"mirrored ({-self.drop * units:+.1f}{unit}; noise {self.noise * units:.1f}{unit})")
        if self.keep:
            return f"augmentation: horizontal flips kept: {figures}"
        return f"augmentation: horizontal flips left out (they change what the images show): {figures}; --param hflip=0.5 puts them back"


#: Training images the probe is fitted on, and validation images it is scored on, at most.
CHECK_IMAGES = 4000


def flip_check(train: Any, train_targets: torch.Tensor, val: Any, val_flipped: Any, val_targets: torch.Tensor, *, task: str,
               metric: str, outputs: int, seed: int = 0) -> FlipCheck:
    """Fit an exact probe on ``train`` and compare its per-image results on ``val`` and ``val_flipped``.

    Regression targets are standardised for the fit and compared in their own units.
    """
    import time

    import torch

    from tlengine._metrics import maximizes, score
    from tlengine._probe import Rows, fit_linear_probe, probe_outputs

    started = time.perf_counter()
    mean, std = (float(train_targets.float().mean()), float(train_targets.float().std()) or 1.0) if task == "regression" else (0.0, 1.0)
    fit_y = (train_targets - mean) / std if task == "regression" else train_targets
    fit = fit_linear_probe(train, fit_y, task=task, metric=metric, outputs=outputs, seed=seed)

    def outputs_of(features: Any) -> torch.Tensor:
        out = probe_outputs(Rows(features), fit.weight, fit.bias, task)
        return out * std + mean if task == "regression" else out

    plain, mirrored = outputs_of(val), outputs_of(val_flipped)
    a, b = score(metric, plain, val_targets), score(metric, mirrored, val_targets)
    drop = (a - b) if maximizes(metric) else (b - a)
    if task == "classification":  # per image: right as it is, wrong mirrored (and back)
        paired, margin = (plain.argmax(-1) == val_targets).float() - (mirrored.argmax(-1) == val_targets).float(), 0.01
    else:  # per image: the absolute error mirrored minus as it is, in the targets' units
        paired, margin = (mirrored - val_targets.float()).abs() - (plain - val_targets.float()).abs(), 0.05 * abs(a)
    noise = 2 * float(paired.std()) / math.sqrt(len(paired)) if len(paired) > 1 else math.inf
    keep = not (drop > margin and drop > noise)
    return FlipCheck(float(a), float(b), float(drop), float(noise), keep, len(paired), time.perf_counter() - started)


def decide_flips(setup: SearchSetup, source: InputSource, log: Callable[[str], None]) -> SearchSetup:
    """``setup`` with ``hflip`` fixed at 0 when :func:`flip_check` finds flips change the images' labels;
    unchanged when ``hflip`` was set by the user or is not 0.5 by default. Says what it decided in one line."""
    from tlengine._loaders import evenly_spaced

    space = setup.space
    if not _decided_here(setup):
        return setup
    size_dim = space["image_size"]
    size = size_dim.value if not size_dim.searched else (size_dim.choices[0] if size_dim.kind == "categorical" else size_dim.high)
    record = setup.record
    base = setup.base
    probe = source.probe_features(base, size, count=False)
    train_picks = evenly_spaced(len(probe.train_targets), CHECK_IMAGES)
    val_picks = evenly_spaced(len(probe.val_targets), CHECK_IMAGES)
    flipped = source.val_features(base, size, flip=True, indices=val_picks)
    check = flip_check(_rows(probe.train, train_picks), probe.train_targets[train_picks], _rows(probe.val, val_picks), flipped,
                       probe.val_targets[val_picks], task=record.task, metric=record.metric, outputs=record.num_outputs,
                       seed=setup.config.seed)
    log(f"{setup.label}{check.line(record.metric)}")
    return _with_flips(setup, space["hflip"].value if check.keep else 0.0, check.to_dict())


def adopt_flips(setup: SearchSetup, saved: StudyRecord) -> SearchSetup:
    """``setup`` with the flip decision of the study it resumes (``saved``), so that a resumed search keeps
    what its first run decided without checking again; unchanged where the user set ``hflip``."""
    if not _decided_here(setup) or saved.flips is None or "hflip" not in saved.space:
        return setup
    return _with_flips(setup, saved.space["hflip"].get("value", setup.space["hflip"].value), saved.flips)


def _decided_here(setup: SearchSetup) -> bool:
    """Whether the flips are tlengine's to decide: ``hflip`` is the default, fixed and not 0."""
    dim = setup.space["hflip"]
    return dim.source == "default" and not dim.searched and bool(dim.value)


def _with_flips(setup: SearchSetup, hflip: float, flips: dict[str, Any]) -> SearchSetup:
    """``setup`` with ``hflip`` fixed at ``hflip`` in its space and record, and the check's figures in its record."""
    decided = dataclasses.replace(setup.space["hflip"], value=hflip)
    record = dataclasses.replace(setup.record, space={**setup.record.space, "hflip": decided.to_dict()}, flips=flips)
    return dataclasses.replace(setup, space={**setup.space, "hflip": decided}, record=record)


def _rows(features: Any, picks: list[int]) -> torch.Tensor:
    """Rows ``picks`` (increasing) of a feature tensor or cache file, as float32 (read a block at a time)."""
    import torch

    from tlengine._probe import Rows

    return torch.cat([x for _, x in Rows(features, picks).chunks()])
