"""The one data interface of a search: a trial asks for its inputs and gets them, whatever the caches do.

A trial says what it trains (:class:`InputRequest`: frozen stages, image size,
augmentation, batch size, epochs) and :meth:`InputSource.inputs` gives back the model
``fit`` trains and its loaders (:class:`TrialInputs`). Behind that one call, in order:
cached prefix features (the trial then trains its trainable suffix and head), decoded
images from the cache, or decoding every image each epoch; and, with ``--early-size``,
the first epochs at a lower resolution. The caches never change what a trial trains
(see :mod:`tlengine._cache`), so the runner never knows whether they are on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tlengine._loaders import PhasedLoader, eval_loader, image_train_loader
from tlengine._preprocess import Preprocess

if TYPE_CHECKING:
    import torch

    from tlengine._cache import Prepared, SearchCaches
    from tlengine._loaders import Augment, Loader
    from tlengine._records import ImageData


@dataclass(frozen=True)
class InputRequest:
    """What one trial trains on.

    Attributes:
        depth: Leading backbone stages kept frozen.
        image_size: Input side in pixels.
        augment: The training augmentation.
        mixup: Whether mixup or cutmix mixes the training images.
        batch_size: Images per training batch.
        epochs: Epochs the trial trains.
        shuffle_seed: Seeds the trial's shuffle order.
    """

    depth: int
    image_size: int
    augment: Augment
    mixup: bool
    batch_size: int
    epochs: int
    shuffle_seed: int


@dataclass(frozen=True)
class TrialInputs:
    """What :meth:`InputSource.inputs` gives a trial.

    Attributes:
        model: What ``fit`` trains: the trial's model, or (on cached features) its trainable
            suffix and head, sharing the model's modules (a checkpoint of it is one of the model).
        train_loader: Training batches, one epoch per ``set_epoch``.
        val_loader: Validation batches.
        on_features: Whether the loaders yield cached prefix features.
        early: ``{"image_size", "epochs"}`` when the first epochs run at a lower resolution, else ``None``.
        notes: What a person should know about these inputs (one line each).
    """

    model: torch.nn.Module
    train_loader: Loader
    val_loader: Loader
    on_features: bool = False
    early: Mapping[str, int] | None = None
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class ProbeFeatures:
    """What an exact linear probe solves on: pooled features after every stage, at the evaluation crop.

    Attributes:
        train: Training images' features ``(N, D)`` (a cache file, or a tensor computed for this trial).
        train_targets: Their targets (class indices, or regression targets in their own units).
        val: Validation images' features ``(M, D)``.
        val_targets: Their targets.
        source: ``"cached"`` or ``"computed"``.
    """

    train: Any
    train_targets: torch.Tensor
    val: Any
    val_targets: torch.Tensor
    source: str


class InputSource:
    """The inputs of every trial of one search.

    Args:
        data: The search's data.
        data_config: timm's ``mean``, ``std``, ``interpolation`` and ``crop_pct`` of the backbone.
        device: Where trials train.
        augment_seed: The search's seed: image ``i`` in epoch ``e`` is augmented alike in every trial.
        caches: The search's caches, or ``None`` (``--no-cache``).
        early_size: ``--early-size``: the first ``early_epochs`` epochs of trials larger than it at this side.
        early_epochs: ``--early-epochs``.
    """

    def __init__(self, data: ImageData, data_config: Mapping[str, Any], device: str, augment_seed: int,
                 caches: SearchCaches | None = None, early_size: int | None = None, early_epochs: int = 1) -> None:
        self.data, self.data_config, self.device, self.augment_seed = data, data_config, device, augment_seed
        self.caches, self.early_size, self.early_epochs = caches, early_size, early_epochs
        self._val: dict[Preprocess, Loader] = {}

    def preprocess(self, image_size: int) -> Preprocess:
        """The preprocessing at ``image_size`` (what the exported model expects)."""
        return Preprocess.from_data_config(self.data_config, image_size)

    def inputs(self, model: torch.nn.Module, backbone: torch.nn.Module, request: InputRequest, *, count: bool = True) -> TrialInputs:
        """The model ``fit`` trains and its loaders, for a trial of ``model`` (whose backbone is ``backbone``);
        ``count``: ``False`` for a use that is not a trial's (left out of the caches' summary)."""
        size = request.image_size
        early = self.early_size if self.early_size is not None and self.early_size < size else None
        main = self._prepare(model, backbone, request, size, first_epoch=self.early_epochs if early else 0, count=count)
        if early is None:
            return TrialInputs(main.model, main.train_loader, main.val_loader, main.features)
        # the first epochs at a lower resolution, with the same model (or the same cached suffix)
        first = self._prepare(model, backbone, dataclasses.replace(request, depth=request.depth if main.features else 0,
                                                                   epochs=self.early_epochs), early, count=False)
        if main.features and not (first.features and first.cut == main.cut):
            main = self._prepare(model, backbone, request, size, count=False)
            note = f"no cached features at {early}px to match those at {size}px; all its epochs at {size}px"
            return TrialInputs(main.model, main.train_loader, main.val_loader, main.features, notes=(note,))
        train = PhasedLoader([(self.early_epochs, first.train_loader), (request.epochs, main.train_loader)])
        val = PhasedLoader([(self.early_epochs, first.val_loader), (request.epochs, main.val_loader)])
        return TrialInputs(main.model, train, val, main.features, early={"image_size": early, "epochs": self.early_epochs})

    def probe_features(self, backbone: torch.nn.Module, image_size: int, *, count: bool = True) -> ProbeFeatures:
        """The pooled features of every training and validation image after all of ``backbone``'s stages
        (frozen, at the evaluation crop, no augmentation), for an exact linear probe: from the cache when
        it holds them or can, else computed here, a batch at a time. ``count``: ``False`` for a use that is
        not a trial's (left out of the caches' summary)."""
        from tlengine._loaders import target_tensor

        preprocess = self.preprocess(image_size)
        train_y, val_y = target_tensor(self.data.train.targets, self.data.task), target_tensor(self.data.val.targets, self.data.task)
        cached = self.caches.probe_features(preprocess, count=count) if self.caches is not None else None
        if cached is not None:
            return ProbeFeatures(cached[0], train_y, cached[1], val_y, "cached")
        return ProbeFeatures(self._pooled(backbone, self.data.train, preprocess), train_y, self._pooled(backbone, self.data.val, preprocess),
                             val_y, "computed")

    def pooled(self, backbone: torch.nn.Module, split: str, preprocess: Preprocess, indices: Sequence[int] | None = None, *,
               flip: bool = False) -> torch.Tensor:
        """Pooled features of split ``split``'s images (those at ``indices``, else all) through the whole frozen
        ``backbone`` at ``preprocess``, mirrored when ``flip``; computed here, never cached (for the checks
        made before the first trial on a few thousand images)."""
        from tlengine._records import Split

        part = self.data.train if split == "train" else self.data.val
        subset = part if indices is None else Split([part.images[i] for i in indices], [part.targets[i] for i in indices])
        return self._pooled(backbone, subset, preprocess, flip)

    def with_data_config(self, data_config: Mapping[str, Any], *, early: bool = True) -> InputSource:
        """The same source (same caches) with another preprocessing (a crop the search decided on),
        and without ``--early-size`` unless ``early``."""
        return InputSource(self.data, data_config, self.device, self.augment_seed, self.caches,
                           self.early_size if early else None, self.early_epochs)

    def for_distillation(self) -> InputSource:
        """The same source (same caches and images) whose training targets are the images' indices: a distillation
        loss looks up the teacher's outputs and the true targets by them (:mod:`tlengine._distill`)."""
        from tlengine._records import Split

        train = Split(self.data.train.images, list(range(len(self.data.train))))
        data = dataclasses.replace(self.data, train=train)
        caches = None if self.caches is None else self.caches.with_data(data)
        return InputSource(data, self.data_config, self.device, self.augment_seed, caches, self.early_size, self.early_epochs)

    def images_digest(self) -> str:
        """A hash of the training images (paths, sizes and times of files)."""
        from tlengine._store import images_digest

        return images_digest(self.data.train.images)

    def view_batches(self, preprocess: Preprocess, augment: Augment, view: int, batch_size: int = 64) -> Any:
        """``(normalised images, indices)`` of every training image, in order, as epoch ``view`` of a trial at
        ``preprocess`` with ``augment`` sees them (the same seeds, crops and pixels, cached or decoded)."""
        import numpy as np
        import torch

        from tlengine._loaders import augment_batch, normalize, tensor_augment, train_square

        pixels = self.caches.pixels("train", preprocess, augment.layout) if self.caches is not None else None
        crop = preprocess if augment.layout == "eval" else train_square(preprocess)
        augmenter, images, n = tensor_augment(preprocess, augment), self.data.train.images, len(self.data.train)
        for start in range(0, n, batch_size):
            stop = min(n, start + batch_size)
            if pixels is not None:
                x = torch.from_numpy(np.asarray(pixels[start:stop])).permute(0, 3, 1, 2)
            else:
                x = torch.stack([torch.from_numpy(crop.pixels(images[i]).copy()).permute(2, 0, 1) for i in range(start, stop)])
            x = augment_batch(x.to(self.device), range(start, stop), augmenter, self.augment_seed, view)
            yield normalize(x, preprocess), torch.arange(start, stop)

    def _pooled(self, backbone: torch.nn.Module, split: Any, preprocess: Preprocess, flip: bool = False) -> torch.Tensor:
        import torch

        backbone.eval().to(self.device)
        batches = []
        try:
            with torch.inference_mode():
                for x, _ in eval_loader(split, self.data.task, preprocess, self.device):
                    batches.append(backbone(x.flip(-1) if flip else x).float().cpu())  # the centre crop is symmetric
        finally:
            backbone.cpu()
        return torch.cat(batches)

    def summary(self) -> str | None:
        """One line on what the caches did, or ``None`` when they are off or served no trial."""
        return self.caches.summary() if self.caches is not None and self.caches.trials else None

    def _prepare(self, model: torch.nn.Module, backbone: torch.nn.Module, request: InputRequest, size: int, *,
                 first_epoch: int = 0, count: bool = True) -> Prepared:
        """The caches' model and loaders for epochs ``first_epoch`` on at ``size`` px, else the plain path's."""
        from tlengine._cache import Prepared

        preprocess = self.preprocess(size)
        if self.caches is not None:
            prepared = self.caches.prepare(
                model, backbone, depth=request.depth, preprocess=preprocess, augment=request.augment, mixup=request.mixup,
                batch_size=request.batch_size, epochs=request.epochs, shuffle_seed=request.shuffle_seed,
                augment_seed=self.augment_seed, first_epoch=first_epoch, count=count,
            )
            if prepared is not None:
                return prepared
        if preprocess not in self._val:  # decoded a batch at a time as it is read
            self._val[preprocess] = eval_loader(self.data.val, self.data.task, preprocess, self.device)
        train = image_train_loader(self.data.train, self.data.task, preprocess, request.augment, request.batch_size, self.device,
                                   shuffle_seed=request.shuffle_seed, augment_seed=self.augment_seed)
        return Prepared(model, train, self._val[preprocess], False)


def input_source(data: ImageData, data_config: Mapping[str, Any], device: str, *, seed: int, cache: Any, base: torch.nn.Module,
                 backbone_id: str, stages: list[list[str]], log: Callable[[str], None], early_size: int | None = None,
                 early_epochs: int = 1) -> InputSource:
    """The :class:`InputSource` of a search, with its caches when ``cache`` (a :class:`~tlengine._cache.CacheOptions`) is enabled.

    Raises:
        UserError: The cache folder cannot be created.
    """
    caches = None
    if cache.enabled:
        from tlengine._cache import SearchCaches

        caches = SearchCaches(cache, data, base, backbone_id, stages, device, log)
    return InputSource(data, data_config, device, seed, caches, early_size, early_epochs)
