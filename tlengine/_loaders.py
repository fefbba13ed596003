"""Batches for training and evaluation: the loader protocol, epoch-aware loaders, and tensor augmentation.

Every loader here follows :class:`Loader`: ``fit`` calls ``set_epoch`` before each epoch
(a loader may serve another augmented view, cached view or resolution per epoch) and
saves and restores the shuffle ``generator`` to resume an epoch in its order.

Augmentation is reproducible per image: image ``i`` in epoch ``e`` is augmented from a
seed made of the search's seed, ``e`` and ``i`` (:func:`image_seed`), whichever path
trains it, so a trial trains on the same images with or without the caches.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from tlengine._preprocess import Preprocess, load_image

if TYPE_CHECKING:
    import torch

    from tlengine._records import Split


@runtime_checkable
class Loader(Protocol):
    """What ``fit`` and ``evaluate`` iterate: ``(inputs, targets)`` batches."""

    generator: torch.Generator | None
    """The shuffle generator (``None`` for an unshuffled loader)."""

    def set_epoch(self, epoch: int) -> None:
        """Serve epoch ``epoch`` next."""

    def __len__(self) -> int:
        """Batches per epoch."""

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The epoch's batches."""


class BatchLoader:
    """A ``DataLoader`` that is a :class:`Loader`: the same batches every epoch (shuffled anew when asked).

    Built by :func:`loader`.
    """

    def __init__(self, inner: torch.utils.data.DataLoader) -> None:
        self.inner = inner

    @property
    def generator(self) -> torch.Generator | None:
        """The shuffle generator of a shuffled loader, else ``None``."""
        import torch

        return self.inner.generator if isinstance(self.inner.sampler, torch.utils.data.RandomSampler) else None

    @generator.setter
    def generator(self, generator: torch.Generator | None) -> None:
        import torch

        if isinstance(self.inner.sampler, torch.utils.data.RandomSampler):
            self.inner.generator = self.inner.sampler.generator = generator

    @property
    def dataset(self) -> Any:
        """The dataset batched."""
        return self.inner.dataset

    def set_epoch(self, epoch: int) -> None:
        """Nothing changes between epochs."""

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.inner)


def loader(dataset: Any, batch_size: int, shuffle: bool, device: str, seed: int = 0, *, sampler: Any = None,
           drop_last: bool | None = None) -> BatchLoader:
    """A :class:`BatchLoader` over a ``DataLoader``; worker processes only on CUDA (on CPU they compete with training).

    A shuffled loader drops a last partial batch (unless it is the only one); ``sampler``
    replaces shuffling (``drop_last`` then says whether to drop it).
    """
    import os

    import torch

    workers = min(4, os.cpu_count() or 1) if device.startswith("cuda") else 0
    generator = torch.Generator().manual_seed(seed)
    return BatchLoader(torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        sampler=sampler,
        drop_last=(shuffle and len(dataset) > batch_size) if drop_last is None else drop_last,
        num_workers=workers,
        pin_memory=device.startswith("cuda"),
        persistent_workers=workers > 0,
        generator=generator,
    ))


class PhasedLoader:
    """One loader per range of epochs (say, the first epochs at a lower resolution), switched by ``set_epoch``.

    Args:
        phases: ``(end, loader)`` pairs: ``loader`` serves the epochs below ``end`` not
            served by an earlier pair; the last serves every later epoch. Training phases
            must yield the same number of batches (the learning-rate schedule counts them)
            and share one shuffle generator, which they are given here, so that a resumed
            trial replays the same order whatever phase it stopped in.
    """

    def __init__(self, phases: Sequence[tuple[int, Loader]]) -> None:
        self.phases = list(phases)
        self.current = self.phases[0][1]
        shared = self.current.generator
        for _, other in self.phases[1:]:
            if shared is not None:
                other.generator = shared

    @property
    def generator(self) -> torch.Generator | None:
        """The shuffle generator all phases share (``None`` for unshuffled loaders)."""
        return self.current.generator

    @generator.setter
    def generator(self, generator: torch.Generator | None) -> None:
        for _, phase in self.phases:
            phase.generator = generator

    def set_epoch(self, epoch: int) -> None:
        """Serve epoch ``epoch`` from its phase's loader."""
        self.current = next((item for end, item in self.phases if epoch < end), self.phases[-1][1])
        self.current.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.current)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.current)


class EpochSampler:
    """A new random order of ``n`` images each epoch, drawn from ``generator`` as ``RandomSampler`` does;
    in epoch ``e`` the indices point into view ``(e - first) % views`` (offset ``n`` per view).

    ``set_epoch`` follows ``DistributedSampler``'s convention; the sampler runs in the main
    process, so loader worker processes need not know the epoch.
    """

    def __init__(self, n: int, views: int, generator: torch.Generator, first: int = 0) -> None:
        self.n, self.views, self.generator, self.first, self.epoch = n, views, generator, first, first

    def set_epoch(self, epoch: int) -> None:
        """Draw the next order's indices from the view of epoch ``epoch``."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        import torch

        offset = ((self.epoch - self.first) % self.views) * self.n
        return iter((torch.randperm(self.n, generator=self.generator) + offset).tolist())


class EpochLoader:
    """A :class:`Loader` over an :class:`EpochSampler`.

    Args:
        dataset: Items indexed ``view * n + i``.
        n: Images per view.
        views: Views in ``dataset``.
        batch_size: Images per batch (the last partial batch dropped when there is more than one).
        device: Where training runs (worker processes only on CUDA).
        seed: Seeds the shuffle order.
        first: The epoch view 0 belongs to.
    """

    def __init__(self, dataset: Any, n: int, views: int, batch_size: int, device: str, seed: int, first: int = 0) -> None:
        import torch

        self.sampler = EpochSampler(n, views, torch.Generator().manual_seed(seed), first)
        self.inner = loader(dataset, batch_size, False, device, sampler=self.sampler, drop_last=n > batch_size)

    @property
    def generator(self) -> torch.Generator:
        """The shuffle generator (``fit`` saves and restores it to resume an epoch's order)."""
        return self.sampler.generator

    @generator.setter
    def generator(self, generator: torch.Generator) -> None:
        self.sampler.generator = generator

    def set_epoch(self, epoch: int) -> None:
        """Called by ``fit`` before each epoch."""
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.inner)


class AugmentLoader(EpochLoader):
    """An :class:`EpochLoader` of decoded uint8 ``(image, index, target)`` whose batches are augmented on
    ``device`` (the GPU when there is one) with epoch ``e``'s seeds (:func:`augment_batch`), then normalised.

    Args:
        dataset: Items ``(uint8 (3, H, W) image, index, target)``.
        batch_size: Images per batch.
        device: Where training runs.
        shuffle_seed: Seeds the shuffle order.
        augment: The augmentation (:func:`tensor_augment`).
        preprocess: Its normalisation.
        augment_seed: The search's seed for :func:`image_seed`.
    """

    def __init__(self, dataset: Any, batch_size: int, device: str, shuffle_seed: int, augment: Any, preprocess: Preprocess,
                 augment_seed: int) -> None:
        super().__init__(dataset, len(dataset), 1, batch_size, device, shuffle_seed)
        self.augment, self.preprocess, self.device, self.seed = augment, preprocess, device, augment_seed

    def __iter__(self) -> Iterator[Any]:
        epoch = self.sampler.epoch
        for x, index, y in self.inner:
            x = augment_batch(x.to(self.device, non_blocking=True), index.tolist(), self.augment, self.seed, epoch)
            yield normalize(x, self.preprocess), y


class NormalizedLoader:
    """An unshuffled :class:`Loader` of ``(uint8 image, index, target)`` items, normalised batch by batch.

    The evaluation loader of every path: a batch of uint8 images is read (from the cache
    file, or decoded) only when it is iterated, so evaluating holds one batch, not the split.

    Args:
        dataset: Items ``(uint8 (3, H, W) image, index, target)``.
        preprocess: The normalisation.
        device: Where the model runs (batches are normalised there).
        batch_size: Images per batch.
    """

    generator = None

    def __init__(self, dataset: Any, preprocess: Preprocess, device: str, batch_size: int = 64) -> None:
        self.inner = loader(dataset, batch_size, False, device)
        self.preprocess, self.device = preprocess, device

    def set_epoch(self, epoch: int) -> None:
        """Nothing changes between epochs."""

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self) -> Iterator[Any]:
        for x, _, y in self.inner:
            yield normalize(x.to(self.device, non_blocking=True), self.preprocess), y


# ---------------------------------------------------------------- augmentation and normalisation


def normalize(batch: torch.Tensor, preprocess: Preprocess) -> torch.Tensor:
    """uint8 ``(N, 3, H, W)`` to normalised float32, as timm's ``ToTensor`` then ``Normalize`` compute it."""
    import torch

    mean = torch.tensor(preprocess.mean, device=batch.device).view(1, 3, 1, 1)
    std = torch.tensor(preprocess.std, device=batch.device).view(1, 3, 1, 1)
    return batch.to(torch.float32).div(255).sub(mean).div(std)


#: The augmentation policies of the ``augment`` dimension, lightest first.
POLICIES = ("none", "flip", "crop", "randaugment")


@dataclass(frozen=True)
class Augment:
    """The training augmentation of one trial.

    Attributes:
        crop_scale: The smallest area fraction of the random resized crop (its range is
            ``crop_scale..1``); ``None``: no random crop, the training image is the evaluation view.
        hflip: Probability of a horizontal flip.
        randaugment: RandAugment magnitude on timm's 0..10 scale; 0 = off.
    """

    crop_scale: float | None = 0.5
    hflip: float = 0.5
    randaugment: int = 0

    @classmethod
    def of(cls, values: Mapping[str, Any]) -> Augment:
        """The augmentation of a trial's ``values``: its ``augment`` policy with the policy's own parameters.

        ``none``: the evaluation view as it is; ``flip``: mirrored with probability ``hflip``;
        ``crop``: a random resized crop of ``crop_scale..1`` of the area, and flips;
        ``randaugment``: that, then RandAugment at magnitude ``randaugment``.
        """
        policy = values.get("augment", "randaugment" if values.get("randaugment") else "crop")
        cropped = policy in ("crop", "randaugment")
        return cls(crop_scale=float(values.get("crop_scale", 0.5)) if cropped else None,
                   hflip=float(values.get("hflip", 0.5)) if policy != "none" else 0.0,
                   randaugment=int(values.get("randaugment", 0)) if policy == "randaugment" else 0)

    @property
    def identity(self) -> bool:
        """Whether every epoch sees the evaluation view unchanged (the frozen stages' outputs are then one view)."""
        return self.crop_scale is None and not self.hflip and not self.randaugment

    @property
    def layout(self) -> str:
        """The decoded images it starts from: ``"eval"`` (the evaluation view) or ``"train"`` (the square it crops)."""
        return "eval" if self.crop_scale is None else "train"

    def key(self) -> tuple[Any, ...]:
        """What a cache key of its views needs."""
        return (self.crop_scale, self.hflip, self.randaugment)


def tensor_augment(preprocess: Preprocess, augment: Augment) -> Any:
    """The training augmentation on uint8 tensors (torchvision ``transforms.v2``), cached or not.

    A random resized crop of ``crop_scale..1`` of the area of the training square
    (:func:`train_square`) unless the policy has none, a horizontal flip with probability
    ``hflip``, RandAugment with 2 operations at ``randaugment`` on timm's 0..10 magnitude
    scale (11 bins; above 10 is clipped, as timm does). torchvision rather than timm's
    ``create_transform`` because timm's RandAugment works on PIL images only, while this
    runs on decoded tensors, on the GPU when there is one, with one seed per image
    (:func:`augment_batch`).
    """
    from torchvision.transforms import InterpolationMode, v2

    interpolation = InterpolationMode(preprocess.interpolation)
    ops: list[Any] = []
    if augment.crop_scale is not None:
        ops.append(v2.RandomResizedCrop(preprocess.input_size, scale=(augment.crop_scale, 1.0), interpolation=interpolation, antialias=True))
    if augment.hflip > 0:
        ops.append(v2.RandomHorizontalFlip(augment.hflip))
    if augment.randaugment:  # its rotations and shears take nearest or bilinear on tensors
        geometric = interpolation if interpolation == InterpolationMode.NEAREST else InterpolationMode.BILINEAR
        ops.append(v2.RandAugment(num_ops=2, magnitude=min(int(augment.randaugment), 10), num_magnitude_bins=11, interpolation=geometric))
    return v2.Compose(ops) if ops else v2.Identity()


def image_seed(seed: int, view: int, index: int) -> int:
    """The seed that augments image ``index`` in epoch (view) ``view`` of a search seeded ``seed``."""
    return int.from_bytes(hashlib.blake2b(f"{seed}/{view}/{index}".encode(), digest_size=8).digest(), "little") >> 1


def augment_batch(images: torch.Tensor, indices: Sequence[int], augment: Any, seed: int, view: int) -> torch.Tensor:
    """Augment uint8 ``(N, 3, H, W)`` images one by one, each from :func:`image_seed`; the global RNG is left as it was.

    torchvision's transforms draw their parameters from torch's global CPU generator,
    so each image reseeds it inside ``fork_rng``: the result depends on the image and
    the epoch only, not on batch composition, order or the trial.
    """
    import torch

    out = []
    with torch.random.fork_rng(devices=[]):
        for image, index in zip(images, indices):
            # the CPU generator only: torch.manual_seed also visits every accelerator backend, 100x slower
            torch.default_generator.manual_seed(image_seed(seed, view, int(index)))
            out.append(augment(image))
    return torch.stack(out)


def train_square(preprocess: Preprocess) -> Preprocess:
    """The training layout: the centre square at the resize side, on which augmentation runs."""
    side = preprocess.resize
    return Preprocess(side, side, preprocess.interpolation, preprocess.mean, preprocess.std)


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


# ---------------------------------------------------------------- datasets and the plain (uncached) loaders


def target_tensor(targets: Sequence[Any], task: str) -> torch.Tensor:
    """Targets as a tensor: long class indices, or float32 regression targets."""
    import torch

    return torch.tensor(list(targets), dtype=torch.long if task == "classification" else torch.float32)


def evenly_spaced(n: int, count: int) -> list[int]:
    """``count`` indices spread evenly over ``range(n)``, first and last included (all of them when ``n <= count``)."""
    if n <= count:
        return list(range(n))
    return sorted({round(i * (n - 1) / (count - 1)) for i in range(count)})


def eval_tensors(split: Split, preprocess: Preprocess, task: str) -> torch.utils.data.TensorDataset:
    """A whole split through timm's evaluation transform, as one ``TensorDataset``.

    The reference the streamed :func:`eval_loader` is checked against (and a convenience
    for small sets): searches never use it, since it holds the whole split in memory.
    """
    import torch

    transform = eval_transform(preprocess)
    images = torch.stack([transform(load_image(item)) for item in split.images])
    return torch.utils.data.TensorDataset(images, target_tensor(split.targets, task))


def eval_loader(split: Split, task: str, preprocess: Preprocess, device: str, *, pixels: Any = None,
                batch_size: int = 64) -> NormalizedLoader:
    """Evaluation batches of ``split`` at the evaluation crop: read from decoded ``pixels`` (the eval layout)
    when given, else decoded when each batch is read. Both equal :func:`eval_tensors` up to float rounding."""
    targets = target_tensor(split.targets, task)
    dataset = uint8_dataset(pixels, targets) if pixels is not None else decoding_dataset(split.images, preprocess, targets)
    return NormalizedLoader(dataset, preprocess, device, batch_size)


def uint8_dataset(pixels: Any, targets: torch.Tensor) -> torch.utils.data.Dataset:
    """A ``Dataset`` of ``(uint8 (3, H, W) tensor, index, target)`` read from a cached ``(N, H, W, 3)`` file."""
    import numpy as np
    import torch

    class Pixels(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(pixels)

        def __getitem__(self, index: int) -> tuple[Any, Any, Any]:
            return torch.from_numpy(np.asarray(pixels[index])).permute(2, 0, 1), index, targets[index]

    return Pixels()


def decoding_dataset(items: Sequence[Any], crop: Preprocess, targets: torch.Tensor) -> torch.utils.data.Dataset:
    """Like :func:`uint8_dataset`, decoding each image and cropping it as ``crop`` says when it is read (no cache)."""
    import torch

    class Decoding(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(items)

        def __getitem__(self, index: int) -> tuple[Any, Any, Any]:
            return torch.from_numpy(crop.pixels(items[index]).copy()).permute(2, 0, 1), index, targets[index]

    return Decoding()


def feature_dataset(views: Sequence[Any], targets: torch.Tensor) -> torch.utils.data.Dataset:
    """A ``Dataset`` of ``(float32 features, target)``; item ``v * n + i`` is image ``i`` in view ``v``."""
    import numpy as np
    import torch

    n = len(views[0])

    class Features(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return n * len(views)

        def __getitem__(self, index: int) -> tuple[Any, Any]:
            view, i = divmod(index, n)
            return torch.from_numpy(np.array(views[view][i], dtype=np.float32)), targets[i]

    return Features()


def image_train_loader(split: Split, task: str, preprocess: Preprocess, augment: Augment, batch_size: int, device: str,
                       *, shuffle_seed: int, augment_seed: int, pixels: Any = None) -> AugmentLoader:
    """Augmented training batches of ``split``: from decoded ``pixels`` (in ``augment.layout``) when given,
    else decoding every image each epoch. Both give the same batches."""
    targets = target_tensor(split.targets, task)
    crop = preprocess if augment.layout == "eval" else train_square(preprocess)
    dataset = uint8_dataset(pixels, targets) if pixels is not None else decoding_dataset(split.images, crop, targets)
    return AugmentLoader(dataset, batch_size, device, shuffle_seed, tensor_augment(preprocess, augment), preprocess, augment_seed)
