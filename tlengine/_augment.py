"""Views of the images decided from the data: the evaluation crop, and horizontal flips only where they keep the label.

Both checks run before the first trial, on the frozen pooled features of (up to 4,000 of)
the training images and (up to 4,000 of) the validation images, with an exact linear probe
(:mod:`tlengine._probe`), in seconds.

**The crop.** timm evaluates by resizing the shorter side to ``size / crop_pct`` and cutting
out the centre (``crop_pct`` 0.875 for most backbones): right for photos framed loosely,
wrong where the object fills the frame (a 28 px garment loses its edges). A probe is fitted
on each view (timm's centre crop; the whole image resized to the input side) and scored on
the validation images in the same view; the better one is what every trial evaluates on,
the training views start from, and the exported model's preprocessing does.

**Flips.** A flip is harmless for most photos and garments and wrong for digits, text,
left/right classes and rotation angles. The probe fitted on the images as they are is
scored on the validation images as they are and mirrored. Pretrained backbones were trained
with flips, so their features of a mirrored photo are close to the photo's own, and the
probe scores mirrored images as well as the originals unless mirroring changes what they
show. Where the mirrored score is clearly worse (by more than one point of the metric, or
5 % of a regression error, and more than two standard errors of the paired per-image
difference), ``hflip`` is fixed at 0 for every trial and the ``flip`` policy leaves the
space. ``--param hflip=...`` (or ``hflip`` in the config) skips the check.

On scikit-learn's handwritten digits (32 px, lite0 at 64 px) the probe scores 0.903 on the
validation images and 0.706 on them mirrored: flips are left out; on Fashion-MNIST
(``fashion-mnist-2k``) 0.840 and 0.828, within the noise: flips are kept.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


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


@dataclass(frozen=True)
class CropCheck:
    """What the crop check measured and decided.

    Attributes:
        center: The probe's validation score (the study's metric) with timm's centre crop.
        whole: Its score with the whole image resized.
        crop_pct: timm's crop fraction for the backbone.
        chosen: ``"center"`` or ``"whole"``.
        images: Validation images compared.
        seconds: Wall time of the check.
    """

    center: float
    whole: float
    crop_pct: float
    chosen: str
    images: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """For the study record."""
        return {k: round(v, 6) if isinstance(v, float) else v for k, v in dataclasses.asdict(self).items()}

    def line(self, metric: str) -> str:
        """One line saying what was decided and why."""
        chosen = "the whole image, resized" if self.chosen == "whole" else f"timm's centre crop ({self.crop_pct:g} of the side)"
        return (f"evaluation crop: {chosen}: a linear probe scores {metric} {self.center:.4f} on {self.images} validation images "
                f"centre-cropped and {self.whole:.4f} whole; --eval-crop center|whole decides instead")


def crop_check(center: tuple[Any, Any], whole: tuple[Any, Any], train_targets: torch.Tensor, val_targets: torch.Tensor, *,
               crop_pct: float, task: str, metric: str, outputs: int, seed: int = 0) -> CropCheck:
    """Fit an exact probe on the training features of each view, ``(train, val)`` pairs, and score it on that
    view's validation features: the whole image wins where it scores at least as well."""
    import time

    from tlengine._metrics import maximizes, score

    started = time.perf_counter()
    a = score(metric, _probe_outputs(center[0], train_targets, [center[1]], task=task, metric=metric, outputs=outputs, seed=seed)[0],
              val_targets)
    b = score(metric, _probe_outputs(whole[0], train_targets, [whole[1]], task=task, metric=metric, outputs=outputs, seed=seed)[0],
              val_targets)
    better = b >= a if maximizes(metric) else b <= a
    return CropCheck(float(a), float(b), crop_pct, "whole" if better else "center", len(val_targets), time.perf_counter() - started)


def _probe_outputs(train: Any, train_targets: torch.Tensor, vals: list[Any], *, task: str, metric: str, outputs: int,
                   seed: int, class_weights: torch.Tensor | None = None) -> list[torch.Tensor]:
    """An exact probe fitted on ``train`` (weighted by ``class_weights``), its outputs on each of ``vals`` (regression
    in the targets' units)."""
    from tlengine._probe import Rows, fit_linear_probe, probe_outputs

    mean, std = (float(train_targets.float().mean()), float(train_targets.float().std()) or 1.0) if task == "regression" else (0.0, 1.0)
    fit_y = (train_targets - mean) / std if task == "regression" else train_targets
    fit = fit_linear_probe(train, fit_y, task=task, metric=metric, outputs=outputs, class_weights=class_weights, seed=seed)
    out = [probe_outputs(Rows(v), fit.weight, fit.bias, task) for v in vals]
    return [o * std + mean if task == "regression" else o for o in out]


#: Training images the probe is fitted on, and validation images it is scored on, at most.
CHECK_IMAGES = 4000


def flip_check(train: Any, train_targets: torch.Tensor, val: Any, val_flipped: Any, val_targets: torch.Tensor, *, task: str,
               metric: str, outputs: int, seed: int = 0) -> FlipCheck:
    """Fit an exact probe on ``train`` and compare its per-image results on ``val`` and ``val_flipped``.

    Regression targets are standardised for the fit and compared in their own units.
    """
    import time

    from tlengine._metrics import maximizes, score

    started = time.perf_counter()
    plain, mirrored = _probe_outputs(train, train_targets, [val, val_flipped], task=task, metric=metric, outputs=outputs, seed=seed)
    a, b = score(metric, plain, val_targets), score(metric, mirrored, val_targets)
    drop = (a - b) if maximizes(metric) else (b - a)
    if task == "classification":  # per image: right as it is, wrong mirrored (and back)
        paired, margin = (plain.argmax(-1) == val_targets).float() - (mirrored.argmax(-1) == val_targets).float(), 0.01
    else:  # per image: the absolute error mirrored minus as it is, in the targets' units
        paired, margin = (mirrored - val_targets.float()).abs() - (plain - val_targets.float()).abs(), 0.05 * abs(a)
    noise = 2 * float(paired.std()) / math.sqrt(len(paired)) if len(paired) > 1 else math.inf
    keep = not (drop > margin and drop > noise)
    return FlipCheck(float(a), float(b), float(drop), float(noise), keep, len(paired), time.perf_counter() - started)

