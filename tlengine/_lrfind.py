"""A learning-rate range test: the range the search samples ``lr`` from, measured on the data.

Smith's range test (Smith, 2017, "Cyclical Learning Rates for Training Neural Networks";
what fastai's ``lr_find`` does): a full fine-tune of the pretrained model trains for a few
dozen batches while its learning rate grows geometrically from :data:`START` to
:data:`END`; the smoothed training loss falls, flattens, then rises steeply. The rate at
the lowest smoothed loss, divided by ten, is the suggested peak rate (the full fine-tune
recipe's), and ``lr`` is searched one decade either side of it, inside the optimizer's range.
Without it the fixed range 1e-5..1e-2 spent early trials at rates far too low to learn in a
few epochs.

Written here, not taken from a library: neither timm nor Optuna has a range test, and
fastai's or ``torch-lr-finder``'s would bring a data path and a training loop of their
own to a test that is one short loop over the search's own loader and optimizer.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from tlengine._loaders import Loader

#: The sweep: from this rate...
START = 1e-6
#: ...to this one, geometrically...
END = 1.0
#: ...over this many updates (fewer when the loss blows up first).
STEPS = 60
#: Smoothing of the loss (exponential moving average, bias-corrected).
BETA = 0.8
#: The sweep stops when the smoothed loss exceeds this multiple of its lowest value.
BLOWUP = 4.0


@dataclass(frozen=True)
class LRTest:
    """What the range test measured and suggests.

    Attributes:
        suggested: The suggested peak learning rate (the lowest smoothed loss's rate / 10).
        low: The low end of the searched range.
        high: The high end.
        lrs: The rates tried, one per update.
        losses: The smoothed loss after each.
        seconds: Wall time of the test.
    """

    suggested: float
    low: float
    high: float
    lrs: tuple[float, ...]
    losses: tuple[float, ...]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """For the study record (the curve rounded)."""
        return {"suggested": self.suggested, "low": self.low, "high": self.high, "seconds": round(self.seconds, 3),
                "lrs": [float(f"{v:.4g}") for v in self.lrs], "losses": [round(v, 5) for v in self.losses]}

    def line(self) -> str:
        """One line: what was measured and what the search will sample."""
        return (f"learning rates: a range test of {len(self.lrs)} batches ({self.seconds:.1f} s) suggests {self.suggested:.1e}; "
                f"lr is searched in {self.low:.1e}..{self.high:.1e}")


def suggest(lrs: list[float], losses: list[float], bounds: tuple[float, float]) -> tuple[float, float, float]:
    """``(suggested, low, high)`` from a sweep's smoothed losses, inside ``bounds`` (the optimizer's range).

    The rate at the lowest loss, over ten; the range a decade either side of it, shifted (not
    shrunk) to lie inside ``bounds`` where it can.
    """
    best = min(range(len(losses)), key=losses.__getitem__)
    suggested = min(max(lrs[best] / 10, bounds[0]), bounds[1])
    low, high = suggested / 10, suggested * 10
    if low < bounds[0]:
        low, high = bounds[0], min(bounds[1], bounds[0] * 100)
    if high > bounds[1]:
        low, high = max(bounds[0], bounds[1] / 100), bounds[1]
    return suggested, low, high


def lr_range_test(model: torch.nn.Module, make_optimizer: Callable[[float], torch.optim.Optimizer], loader: Loader, *,
                  loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], device: str,
                  bounds: tuple[float, float], steps: int = STEPS) -> LRTest:
    """Run the range test on ``model`` (changed by it: pass a copy made for the test).

    Args:
        model: A freshly built full fine-tune model.
        make_optimizer: Builds the optimizer at a given rate (every group's ``lr_scale`` honoured).
        loader: Training batches (cycled when it has fewer than ``steps``).
        loss_fn: The training loss of model outputs and targets.
        device: Where it trains.
        bounds: The optimizer's own range; the suggestion stays inside it.
        steps: Updates in the sweep.
    """
    import torch

    from tlengine._stages import train_mode
    from tlengine._train import amp_dtype

    started = time.perf_counter()
    model.to(device).to(memory_format=torch.channels_last)
    train_mode(model)
    optimizer = make_optimizer(START)
    scales = [g.get("lr_scale", 1.0) for g in optimizer.param_groups]
    dtype = amp_dtype(device)
    factor = (END / START) ** (1 / max(1, steps - 1))
    lrs: list[float] = []
    losses: list[float] = []
    average, lowest = 0.0, math.inf
    epoch = 0
    while len(lrs) < steps and len(loader):
        loader.set_epoch(epoch)
        for x, y in loader:
            lr = START * factor ** len(lrs)
            for group, scale in zip(optimizer.param_groups, scales):
                group["lr"] = lr * scale
            x, y = x.to(device), y.to(device)
            if x.ndim == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype is not None):
                loss = loss_fn(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            value = loss.item()
            if not math.isfinite(value):
                break
            average = BETA * average + (1 - BETA) * value
            smoothed = average / (1 - BETA ** (len(lrs) + 1))
            lrs.append(lr)
            losses.append(smoothed)
            lowest = min(lowest, smoothed)
            if smoothed > BLOWUP * lowest or len(lrs) >= steps:
                break
        else:
            epoch += 1
            continue
        break
    model.cpu()
    if not lrs:  # the loss was not finite at the first rate: nothing measured, the optimizer's own range stands
        return LRTest(bounds[0], bounds[0], bounds[1], (), (), time.perf_counter() - started)
    suggested, low, high = suggest(lrs, losses, bounds)
    return LRTest(suggested, low, high, tuple(lrs), tuple(losses), time.perf_counter() - started)


def training_loss(task: str, model: torch.nn.Module, device: str, class_weights: Any = None) -> Callable[[Any, Any], Any]:
    """The loss a trial trains with (no label smoothing or mixup): cross-entropy, or MSE on standardised targets."""
    import torch

    if task == "classification":
        weight = torch.as_tensor(class_weights, dtype=torch.float32, device=device) if class_weights else None
        return torch.nn.CrossEntropyLoss(weight=weight)
    mse = torch.nn.MSELoss()
    mean, std = model.target_mean.to(device), model.target_std.to(device)
    return lambda out, y: mse(out.squeeze(-1).float(), (y - mean) / std)
