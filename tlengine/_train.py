"""The training loop: one flat function, and the evaluation it runs after every epoch.

It trains on any :class:`~tlengine._loaders.Loader`; which one (cached features, decoded
images, plain decoding) is the business of :mod:`tlengine._inputs`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tlengine._stages import train_mode

if TYPE_CHECKING:
    import torch

    from tlengine._loaders import Loader


@dataclass(frozen=True)
class EpochResult:
    """What one epoch produced.

    Attributes:
        epoch: Zero-based epoch index.
        train_loss: Mean training loss.
        score: Validation metric (accuracy, or RMSE for regression).
        seconds: Wall time of the epoch, evaluation included.
    """

    epoch: int
    train_loss: float
    score: float
    seconds: float


@dataclass(frozen=True)
class TrainPlan:
    """How one trial trains.

    Attributes:
        epochs: Epochs to train.
        task: ``"classification"`` or ``"regression"``.
        metric: The validation metric (see :mod:`tlengine._metrics`).
        label_smoothing: Label smoothing of the cross-entropy loss.
        warmup: Fraction of the steps in linear warmup before the cosine decay.
        mixup: timm Mixup alpha (0 = off).
        cutmix: timm CutMix alpha (0 = off).
        num_classes: Number of classes (classification).
        class_weights: Per-class loss weights, or ``None``.
        distill: ``loss(outputs, targets, epoch)`` in place of the task's own (a distillation trial, whose
            targets are image indices: :class:`tlengine._distill.DistillLoss`), or ``None``.
    """

    epochs: int
    task: str
    metric: str
    label_smoothing: float = 0.0
    warmup: float = 0.1
    mixup: float = 0.0
    cutmix: float = 0.0
    num_classes: int = 0
    class_weights: tuple[float, ...] | None = None
    distill: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor] | None = None


def param_groups(model: torch.nn.Module, weight_decay: float, layer_decay: float) -> list[dict[str, Any]]:
    """Optimizer parameter groups with timm's layer-wise learning-rate decay.

    The backbone's groups come from timm's ``param_groups_layer_decay`` (layers from
    its ``group_matcher``, the last layer at scale 1); the head gets scale 1.
    Frozen parameters are left out; biases and norms get no weight decay.
    """
    from timm.optim import param_groups_layer_decay

    backbone = model.backbone
    no_decay = backbone.no_weight_decay() if hasattr(backbone, "no_weight_decay") else ()
    groups = param_groups_layer_decay(backbone, weight_decay=weight_decay, no_weight_decay_list=no_decay, layer_decay=layer_decay)
    head = [p for p in model.head.parameters() if p.requires_grad]
    groups.append({"params": [p for p in head if p.ndim > 1], "weight_decay": weight_decay, "lr_scale": 1.0})
    groups.append({"params": [p for p in head if p.ndim <= 1], "weight_decay": 0.0, "lr_scale": 1.0})
    return [g for g in groups if g["params"]]


def resolve_device(device: str) -> str:
    """Turn ``auto|cpu|cuda[:N]`` into a concrete torch device string.

    Raises:
        UserError: ``cuda`` was asked for but is not available.
    """
    import torch

    from tlengine._errors import UserError

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available on this machine; use --device cpu or auto")
    if device != "cpu" and not device.startswith("cuda"):
        raise UserError(f"--device {device}: expected auto, cpu or cuda")
    return device


def amp_dtype(device: str) -> torch.dtype | None:
    """The autocast dtype: bf16 on CUDA where supported, else fp16; ``None`` (fp32) on CPU."""
    import torch

    if not device.startswith("cuda"):
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def evaluate(model: torch.nn.Module, val_loader: Loader, metric: str, device: str, *, channels_last: bool = True) -> tuple[float, torch.Tensor]:
    """Score ``model`` on ``val_loader`` with ``metric``.

    Args:
        channels_last: Feed 4-D inputs in channels_last memory format (see :func:`fit`).

    Returns:
        ``(score, outputs)``: the metric, and the outputs (logits, or regression
        predictions in target units) as one CPU float tensor.
    """
    from tlengine._metrics import score

    import torch

    model.eval()
    dtype = amp_dtype(device)
    outputs, targets = [], []
    chunk = None  # halved on out-of-memory, like training's micro-batch
    with torch.inference_mode(), torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype is not None):
        for x, y in val_loader:
            x = x.to(device, non_blocking=True)
            if channels_last and x.ndim == 4:  # cached features may be pooled (2-D) or tokens (3-D)
                x = x.contiguous(memory_format=torch.channels_last)
            while True:
                try:
                    outputs.append(torch.cat([model(part).float().cpu() for part in x.split(chunk or len(x))]))
                    break
                except RuntimeError as exc:
                    chunk = (chunk or len(x)) // 2
                    if not _is_oom(exc) or chunk < 1:
                        raise
                    if device.startswith("cuda"):
                        torch.cuda.empty_cache()
            targets.append(y)
    out, target = torch.cat(outputs), torch.cat(targets)
    if model.task == "regression":
        out = out.squeeze(-1) * model.target_std.cpu() + model.target_mean.cpu()
    return score(metric, out, target), out


#: Below this micro-batch, a trial that runs out of memory is pruned instead of retried.
MIN_MICRO_BATCH = 2


class TrialInterrupted(Exception):
    """The user pressed Ctrl-C; the training state was handed to ``save`` first."""


class OutOfMemory(RuntimeError):
    """Out of memory even at :data:`MIN_MICRO_BATCH`."""


@dataclass(frozen=True)
class TrainingState:
    """Everything besides the weights that a trial needs to continue where it stopped.

    Attributes:
        epoch: The epoch to continue with (epochs before it are finished).
        step: Batches of ``epoch`` already trained (0 at an epoch end).
        updates: Optimizer updates so far (the LR schedule's position).
        micro_batch: The micro-batch after out-of-memory backoff, or ``None`` (whole batches).
        history: The finished epochs.
        optimizer: The optimizer's ``state_dict()``.
        scaler: The fp16 gradient scaler's ``state_dict()`` (empty when unused).
        rng: Random number generator states (see :func:`rng_state`).
    """

    epoch: int
    step: int
    updates: int
    micro_batch: int | None
    history: tuple[EpochResult, ...]
    optimizer: dict[str, Any]
    scaler: dict[str, Any]
    rng: dict[str, Any]


def rng_state(loader_generator: torch.Generator | None = None) -> dict[str, Any]:
    """The states of Python's, numpy's and torch's generators (CPU and CUDA), and the loader's shuffle generator."""
    import random

    import numpy as np
    import torch

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "loader": loader_generator.get_state() if loader_generator is not None else None,
    }


def set_rng_state(state: dict[str, Any], loader_generator: torch.Generator | None = None) -> None:
    """Restore what :func:`rng_state` captured."""
    import random

    import numpy as np
    import torch

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if loader_generator is not None and state.get("loader") is not None:
        loader_generator.set_state(state["loader"])


def _is_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def fit(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    train_loader: Loader,
    val_loader: Loader,
    plan: TrainPlan,
    *,
    device: str,
    resume: TrainingState | None = None,
    save: Callable[[TrainingState], None] | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    on_step: Callable[[], None] = lambda: None,
    on_epoch: Callable[[EpochResult], None] = lambda result: None,
    on_epoch_start: Callable[[int], None] = lambda epoch: None,
    on_backoff: Callable[[int], None] = lambda micro_batch: None,
    channels_last: bool = True,
) -> list[EpochResult]:
    """Train ``model`` for ``plan.epochs`` epochs; evaluate after each.

    Cosine learning-rate schedule after a linear warmup (timm's
    ``CosineLRScheduler``, stepped per update, honouring each group's ``lr_scale``).
    Label smoothing, or timm's Mixup/CutMix with soft-target cross-entropy, for
    classification; MSE on standardised targets for regression. On CUDA: bf16
    autocast (fp16 with a gradient scaler where bf16 is unsupported). The model
    and 4-D inputs are channels_last on every device unless ``channels_last`` is
    false: on a CPU too, PyTorch's oneDNN convolutions train convolutional
    networks faster in that layout (``benchmarks/memory_format.py``: 1.5-1.6x for
    EfficientNet-Lite0 and MobileNetV3, 1.1-1.2x for ResNets, no change for
    ConvNeXt and ViTs). Frozen BatchNorm layers stay in eval mode.
    ``on_epoch_start`` may change what is frozen; ``on_epoch`` may raise to stop
    (Optuna pruning).

    Nothing is lost: after every epoch (and when ``should_stop`` turns true
    mid-epoch, before raising :class:`TrialInterrupted`) the training state goes
    to ``save``; ``resume`` continues from such a state, bit for bit at an epoch
    end. Out of memory halves the micro-batch and accumulates gradients so the
    effective batch stays the same (``on_backoff`` hears the new micro-batch);
    below :data:`MIN_MICRO_BATCH` it raises :class:`OutOfMemory`.

    One flat function on purpose, as nanoGPT's ``train.py`` is one flat loop: an update
    (micro-batches, backoff, scaler, schedule, checkpoint, stop) reads top to bottom, in
    the order it happens, rather than across helpers.

    Returns:
        One :class:`EpochResult` per finished epoch (those before ``resume`` included).
    """
    import time

    import torch
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy
    from timm.scheduler import CosineLRScheduler

    cuda = device.startswith("cuda")
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    dtype = amp_dtype(device)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    steps = max(1, len(train_loader))
    base_lr = max(g["lr"] for g in optimizer.param_groups)
    scheduler = CosineLRScheduler(
        optimizer,
        t_initial=plan.epochs * steps,
        warmup_t=max(1, round(plan.warmup * plan.epochs * steps)),
        warmup_lr_init=base_lr * 0.01,
        lr_min=base_lr * 0.01,
        t_in_epochs=False,
    )
    mixup = None
    if plan.task == "classification" and (plan.mixup > 0 or plan.cutmix > 0):
        mixup = Mixup(mixup_alpha=plan.mixup, cutmix_alpha=plan.cutmix, label_smoothing=plan.label_smoothing, num_classes=plan.num_classes)
    if mixup is not None:
        loss_fn = SoftTargetCrossEntropy()
    elif plan.task == "classification":
        weight = torch.tensor(plan.class_weights, device=device) if plan.class_weights else None
        loss_fn = torch.nn.CrossEntropyLoss(weight=weight, label_smoothing=plan.label_smoothing)
    else:
        mse = torch.nn.MSELoss()
        mean, std = model.target_mean.to(device), model.target_std.to(device)
        loss_fn = lambda out, y: mse(out.squeeze(-1).float(), (y - mean) / std)  # noqa: E731
    if plan.distill is not None:  # reads the loop's epoch when called: the teacher's outputs on that epoch's views
        loss_fn = lambda out, y: plan.distill(out, y, epoch)  # noqa: E731

    generator = train_loader.generator
    history: list[EpochResult] = list(resume.history) if resume else []
    updates, micro = (resume.updates, resume.micro_batch) if resume else (0, None)
    first_epoch, skip = (resume.epoch, resume.step) if resume else (0, 0)
    if resume is not None:
        optimizer.load_state_dict(resume.optimizer)
        if resume.scaler:
            scaler.load_state_dict(resume.scaler)
        set_rng_state(resume.rng, generator)
    scheduler.step_update(updates)  # apply warmup and every group's lr_scale before the first step

    def state(epoch: int, step: int, rng: dict[str, Any]) -> TrainingState:
        return TrainingState(epoch, step, updates, micro, tuple(history), optimizer.state_dict(), scaler.state_dict(), rng)

    for epoch in range(first_epoch, plan.epochs):
        start = time.perf_counter()
        on_epoch_start(epoch)
        for epoch_loader in (train_loader, val_loader):  # the epoch's augmentation, cached view or resolution
            epoch_loader.set_epoch(epoch)
        train_mode(model)
        epoch_rng = rng_state(generator)  # replays this epoch's batch order on a mid-epoch resume
        total_loss, seen = 0.0, 0
        for step, (x, y) in enumerate(train_loader):
            if step < skip:  # trained before the interruption this run resumes from
                continue
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if mixup is not None and len(x) % 2 == 0:
                x, y = mixup(x, y)
            elif mixup is not None:
                y = torch.nn.functional.one_hot(y, plan.num_classes).float()
            if channels_last and x.ndim == 4:  # cached features may be pooled (2-D) or tokens (3-D)
                x = x.contiguous(memory_format=torch.channels_last)
            while True:  # one update; gradient accumulation over micro-batches after an out-of-memory error
                try:
                    loss = 0.0
                    for xs, ys in zip(x.split(micro or len(x)), y.split(micro or len(x))):
                        with torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype is not None):
                            part = loss_fn(model(xs), ys) * (len(xs) / len(x))
                        scaler.scale(part).backward()
                        loss += part.item()
                    break
                except RuntimeError as exc:
                    if not _is_oom(exc):
                        raise
                    optimizer.zero_grad(set_to_none=True)
                    if cuda:
                        torch.cuda.empty_cache()
                    micro = (micro or len(x)) // 2
                    if micro < MIN_MICRO_BATCH:
                        raise OutOfMemory(f"out of memory even at micro-batch {micro * 2} (epoch {epoch + 1})") from exc
                    on_backoff(micro)
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss became {loss} in epoch {epoch + 1}")
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            updates += 1
            scheduler.step_update(updates)
            total_loss += loss * len(x)
            seen += len(x)
            on_step()
            if should_stop():
                if save is not None:
                    save(state(epoch, step + 1, {**rng_state(generator), "loader": epoch_rng["loader"]}))
                raise TrialInterrupted(f"interrupted in epoch {epoch + 1} after {step + 1} batches")
        skip = 0
        score, _ = evaluate(model, val_loader, plan.metric, device, channels_last=channels_last)
        result = EpochResult(epoch, total_loss / max(1, seen), score, time.perf_counter() - start)
        history.append(result)
        if save is not None:
            save(state(epoch + 1, 0, rng_state(generator)))
        on_epoch(result)
    return history
