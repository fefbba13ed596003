"""The training loop: one flat function, plus the data loaders and evaluation it uses."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tlengine._preprocess import Preprocess, load_image
from tlengine._records import Split
from tlengine._stages import train_mode


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


def amp_dtype(device: str) -> Any:
    """The autocast dtype: bf16 on CUDA where supported, else fp16; ``None`` (fp32) on CPU."""
    import torch

    if not device.startswith("cuda"):
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def make_dataset(split: Split, transform: Callable[[Any], Any], task: str) -> Any:
    """A torch ``Dataset`` over ``split`` that loads each image and applies ``transform``."""
    import torch

    target_dtype = torch.long if task == "classification" else torch.float32

    class SplitDataset(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(split)

        def __getitem__(self, index: int) -> tuple[Any, Any]:
            image = transform(load_image(split.images[index]))
            return image, torch.tensor(split.targets[index], dtype=target_dtype)

    return SplitDataset()


def train_transform(preprocess: Preprocess) -> Any:
    """timm's training transform at the model's input size: random resized crop and flip."""
    from timm.data import create_transform

    return create_transform(
        preprocess.input_size,
        is_training=True,
        scale=(0.5, 1.0),
        hflip=0.5,
        color_jitter=None,
        interpolation=preprocess.interpolation,
        mean=preprocess.mean,
        std=preprocess.std,
    )


def eval_transform(preprocess: Preprocess) -> Any:
    """timm's evaluation transform matching ``preprocess`` (what the ONNX model expects)."""
    from timm.data import create_transform

    return create_transform(
        preprocess.input_size,
        is_training=False,
        crop_pct=preprocess.crop_pct,
        interpolation=preprocess.interpolation,
        mean=preprocess.mean,
        std=preprocess.std,
    )


def eval_tensors(split: Split, preprocess: Preprocess, task: str) -> Any:
    """Decode and transform a split once for evaluation; returns a ``TensorDataset``.

    The evaluation transform is deterministic, so every epoch of every trial can
    reuse the same tensors.
    """
    import torch

    transform = eval_transform(preprocess)
    images = torch.stack([transform(load_image(item)) for item in split.images])
    dtype = torch.long if task == "classification" else torch.float32
    return torch.utils.data.TensorDataset(images, torch.tensor(list(split.targets), dtype=dtype))


def loader(dataset: Any, batch_size: int, shuffle: bool, device: str, seed: int = 0) -> Any:
    """A ``DataLoader``; worker processes only on CUDA (on CPU they compete with training)."""
    import os

    import torch

    workers = min(4, os.cpu_count() or 1) if device.startswith("cuda") else 0
    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=shuffle and len(dataset) > batch_size,
        num_workers=workers,
        pin_memory=device.startswith("cuda"),
        persistent_workers=workers > 0,
        generator=generator,
    )


def evaluate(model: Any, val_loader: Any, task: str, device: str) -> tuple[float, Any]:
    """Score ``model`` on ``val_loader``.

    Returns:
        ``(score, outputs)``: accuracy (classification) or RMSE in target units
        (regression), and the raw outputs as one CPU float tensor.
    """
    import torch

    model.eval()
    dtype = amp_dtype(device)
    outputs, targets = [], []
    with torch.inference_mode(), torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype is not None):
        for x, y in val_loader:
            x = x.to(device, non_blocking=True)
            if device.startswith("cuda"):
                x = x.contiguous(memory_format=torch.channels_last)
            outputs.append(model(x).float().cpu())
            targets.append(y)
    out, target = torch.cat(outputs), torch.cat(targets)
    if task == "classification":
        return (out.argmax(dim=-1) == target).float().mean().item(), out
    pred = out.squeeze(-1) * model.target_std.cpu() + model.target_mean.cpu()
    return torch.sqrt(torch.mean((pred - target) ** 2)).item(), out


def fit(
    model: Any,
    optimizer: Any,
    train_loader: Any,
    val_loader: Any,
    *,
    task: str,
    epochs: int,
    device: str,
    on_step: Callable[[], None] = lambda: None,
    on_epoch: Callable[[EpochResult], None] = lambda result: None,
) -> list[EpochResult]:
    """Train ``model`` for ``epochs`` epochs; evaluate after each.

    Cosine learning-rate schedule with a short linear warmup (timm's
    ``CosineLRScheduler``, stepped per update). On CUDA: bf16 autocast (fp16 with a
    gradient scaler where bf16 is unsupported) and channels_last. Frozen BatchNorm
    layers stay in eval mode. ``on_epoch`` may raise to stop (e.g. Optuna pruning).

    Returns:
        One :class:`EpochResult` per finished epoch.
    """
    import time

    import torch
    from timm.scheduler import CosineLRScheduler

    cuda = device.startswith("cuda")
    model.to(device)
    if cuda:
        model.to(memory_format=torch.channels_last)
    dtype = amp_dtype(device)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    steps = max(1, len(train_loader))
    scheduler = CosineLRScheduler(
        optimizer,
        t_initial=epochs * steps,
        warmup_t=min(steps, max(1, epochs * steps // 10)),
        warmup_lr_init=optimizer.param_groups[0]["lr"] * 0.01,
        lr_min=optimizer.param_groups[0]["lr"] * 0.01,
        t_in_epochs=False,
    )
    if task == "classification":
        loss_fn = torch.nn.CrossEntropyLoss()
    else:
        mse = torch.nn.MSELoss()
        mean, std = model.target_mean.to(device), model.target_std.to(device)
        loss_fn = lambda out, y: mse(out.squeeze(-1).float(), (y - mean) / std)  # noqa: E731

    history: list[EpochResult] = []
    updates = 0
    for epoch in range(epochs):
        start = time.perf_counter()
        train_mode(model)
        total_loss, seen = 0.0, 0
        for x, y in train_loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if cuda:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype is not None):
                loss = loss_fn(model(x), y)
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"loss became {loss.item()} in epoch {epoch}")
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            updates += 1
            scheduler.step_update(updates)
            total_loss += loss.item() * len(x)
            seen += len(x)
            on_step()
        score, _ = evaluate(model, val_loader, task, device)
        result = EpochResult(epoch, total_loss / max(1, seen), score, time.perf_counter() - start)
        history.append(result)
        on_epoch(result)
    return history
