"""The search's caches: decode every image once, and store the outputs of a trial's frozen stages.

Two kinds of ``.npy`` file live under the cache folder (``--cache-dir``, else
``$TLENGINE_CACHE``, else ``~/.cache/tlengine``) in a :class:`~tlengine._store.Store`.
They are read in place a batch at a time (:class:`~tlengine._store.NpyFile`), so every trial
and every process on the machine shares one copy through the page cache, and a process
holds one batch of them, however many images there are:

- ``images/KEY.npy``: the images of a split decoded, resized and centre-cropped once,
  uint8 ``(N, H, W, 3)``. Two layouts: the evaluation crop (exactly what timm's eval
  transform and the exported ONNX preprocessing produce before normalisation) and,
  for training, the centre square at the resize side, on which augmentation then runs
  as tensor operations (:mod:`tlengine._loaders`), on the GPU when there is one.
  KEY hashes every file's path, size and modification time (array contents for
  in-memory images), the size, resize side and interpolation, and the Pillow version.
- ``features/KEY.npy``: fp16 outputs of a backbone's first ``k`` frozen stages
  (:mod:`tlengine._split`) for every image of a split, computed once and reused by every
  epoch and every trial with the same backbone, weights (hash of the state dict), ``k``,
  preprocessing and images. Validation uses the evaluation crop. Training uses one
  augmented view per epoch (``views`` of them, reused in turn when fewer than the epochs).

Augmentation is seeded per image and epoch (:func:`tlengine._loaders.image_seed`), so
the cached view ``e`` is exactly what an uncached trial feeds its frozen layers in
epoch ``e``, and cached and uncached trials train on the same images.

This module is the cache policy only; trials never call it themselves: they ask
:class:`tlengine._inputs.TrialInputs` for their inputs, which falls back to plain
decoding whenever a cache cannot serve them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tlengine._errors import UserError
from tlengine._loaders import Augment, EpochLoader, augment_batch, eval_loader, feature_dataset, image_train_loader, loader, normalize, target_tensor, tensor_augment, train_square
from tlengine._preprocess import Preprocess
from tlengine._split import PrefixSplit, Splitter, cached_model
from tlengine._store import Store, decode_into, default_cache_dir, digest, images_digest, state_digest
from tlengine._timing import stage

if TYPE_CHECKING:
    import torch

    from tlengine._loaders import Loader
    from tlengine._records import ImageData

#: Bump when the layout or the numerics of cached files change.
FORMAT = 1
DEFAULT_SIZE_GB = 4.0
DEFAULT_VIEWS: int | None = None  # one per epoch
#: How prefix features are stored (tests set float32 to show that only this rounding separates the paths).
FEATURE_DTYPE = "float16"
_BATCH = 64


@dataclass(frozen=True)
class CacheOptions:
    """What the user asked of the caches.

    Attributes:
        enabled: ``False`` (``--no-cache``): decode images and run every layer each time.
        directory: The cache folder; ``None``: :func:`default_cache_dir`.
        size_gb: Cap on the folder's size, in GB (10^9 bytes).
        views: Cached augmented training views per image for a frozen prefix; epoch ``e`` uses
            view ``e % views``. ``None``: one per epoch, so cached training equals uncached.
    """

    enabled: bool = True
    directory: str | None = None
    size_gb: float = DEFAULT_SIZE_GB
    views: int | None = DEFAULT_VIEWS

    def check(self) -> None:
        """Raise :class:`UserError` for a value out of range."""
        if isinstance(self.size_gb, bool) or not self.size_gb > 0:
            raise UserError(f"--cache-size-gb {self.size_gb:g}: must be a positive number of gigabytes")
        if self.views is not None and (isinstance(self.views, bool) or not isinstance(self.views, int) or self.views < 1):
            raise UserError(f"--cache-views {self.views}: must be a positive integer")



@dataclass(frozen=True)
class Prepared:
    """What one trial trains: the model ``fit`` sees and its loaders.

    Attributes:
        model: The full model, or (on cached features) the trainable suffix and head.
        train_loader: Training batches.
        val_loader: Validation batches.
        features: ``True`` when the loaders yield cached prefix features.
        cut: The graph node the features come from (``None`` on images).
    """

    model: torch.nn.Module
    train_loader: Loader
    val_loader: Loader
    features: bool
    cut: str | None = None


class SearchCaches:
    """The caches of one search: decoded images per preprocessing, prefix features per depth.

    Args:
        options: The user's cache options (enabled).
        data: The dataset (``ImageData``).
        base: The backbone with the base weights.
        backbone_id: ``NAME:ARCH`` of the backbone.
        stages: Parameter names per stage.
        device: The torch device trials train on.
        log: Called with one line per notable event (each said once).

    Raises:
        UserError: The cache folder cannot be created.
    """

    def __init__(self, options: CacheOptions, data: ImageData, base: torch.nn.Module, backbone_id: str, stages: list[list[str]],
                 device: str, log: Callable[[str], None]) -> None:
        options.check()
        self.options = options
        self.store = Store(Path(options.directory) if options.directory else default_cache_dir(), int(options.size_gb * 1e9))
        self.data, self.base, self.backbone_id, self.device = data, base, backbone_id, device
        self.splitter = Splitter(base, stages)
        self._log, self._said = log, set()
        self._digests: dict[str, str] = {}
        self._weights: str | None = None
        self._val_images: dict[Preprocess, Any] = {}
        self._val_features: tuple[Any, Any] | None = None
        self.trials_on_features = 0
        self.trials = 0

    def say_once(self, line: str) -> None:
        """Log ``line`` unless it was said already."""
        if line not in self._said:
            self._said.add(line)
            self._log(line)

    def _split(self, name: str) -> Any:
        return getattr(self.data, name)

    def with_data(self, data: ImageData) -> SearchCaches:
        """The same caches (same store and images) serving ``data``: the same images with other targets."""
        import copy

        other = copy.copy(self)
        other.data = data
        return other

    def _images_digest(self, name: str) -> str:
        if name not in self._digests:
            self._digests[name] = images_digest(self._split(name).images)
        return self._digests[name]

    def pixels(self, name: str, preprocess: Preprocess, layout: str, count: bool = True) -> Any:
        """Decoded uint8 images of split ``name``: ``layout`` ``"eval"`` (the eval crop) or ``"train"``
        (the centre square at the resize side); ``None`` if they do not fit under the cap. ``count``: as in
        :meth:`tlengine._store.Store.get_or_make`."""
        import PIL

        side = preprocess.input_size if layout == "eval" else preprocess.resize
        crop = preprocess if layout == "eval" else train_square(preprocess)
        key = digest("images", FORMAT, self._images_digest(name), layout, side, preprocess.resize, preprocess.interpolation, PIL.__version__)
        items = self._split(name).images

        with stage("decoding"):
            return self.store.get_or_make("images", key, (len(items), side, side, 3), "uint8", lambda out: decode_into(out, items, crop),
                                        count=count)

    def _weights_digest(self) -> str:
        if self._weights is None:
            self._weights = state_digest(self.base.state_dict())
        return self._weights

    def _feature_key(self, split: PrefixSplit, name: str, preprocess: Preprocess, view: int | None, augment: Augment | None,
                     seed: int) -> str:
        import timm
        import torch

        from tlengine._train import amp_dtype

        return digest("features", FORMAT, self.backbone_id, self._weights_digest(), split.depth, split.cut, preprocess.to_dict(),
                      self._images_digest(name), view, None if view is None or augment is None else (augment.key(), seed), str(amp_dtype(self.device)),
                      FEATURE_DTYPE, torch.__version__, timm.__version__)

    def features(self, split: PrefixSplit, name: str, preprocess: Preprocess, view: int | None, augment: Augment | None,
                 seed: int = 0, count: bool = True) -> Any:
        """fp16 prefix outputs of every image of split ``name``: the evaluation crop (``view`` ``None``) or
        augmented view ``view`` (what an uncached epoch ``view`` feeds the prefix); ``None`` when they cannot be cached.
        ``count``: ``False`` leaves the use out of the summary's hits and misses.

        The pass that computes them also stores, where the cap has free space, the outputs
        after fewer frozen stages (they lie on the way): a later trial freezing fewer stages
        finds its features made.
        """
        import numpy as np
        import torch

        from tlengine._train import amp_dtype

        dtype = amp_dtype(self.device)
        n = len(self._split(name))
        key = self._feature_key(split, name, preprocess, view, augment, seed)
        shallower = {}
        for depth in range(1, split.depth):
            other = self.splitter.split(depth, preprocess.input_size)
            if other is not None:
                shallower[self._feature_key(other, name, preprocess, view, augment, seed)] = other
        augmenter = None if view is None or augment is None else tensor_augment(preprocess, augment)
        layout = "eval" if augmenter is None else augment.layout
        # decoded first, so that the room left for the extras counts them
        pixels = None if self.store.path("features", key).is_file() else self.pixels(name, preprocess, layout, count)

        def fill(out: Any, extras: dict[str, Any] | None = None) -> None:
            nonlocal pixels
            extras = {} if extras is None else extras
            if pixels is None:  # deleted after the check above
                pixels = self.pixels(name, preprocess, layout, count)
            if pixels is None:
                raise _Uncached("the decoded images do not fit under the cap")
            base = self.base.to(self.device, memory_format=torch.channels_last)
            targets = [(key, out, split), *((k, a, shallower[k]) for k, a in extras.items())]
            prefix = self.splitter.joint_prefix(base, [t[2] for t in targets]) if extras else split.prefix(base).eval()
            try:
                with torch.inference_mode(), torch.autocast(self.device.split(":")[0], dtype=dtype, enabled=dtype is not None):
                    for start in range(0, n, _BATCH):
                        x = torch.from_numpy(pixels[start:start + _BATCH]).permute(0, 3, 1, 2).to(self.device)
                        if augmenter is not None:
                            x = augment_batch(x, range(start, start + len(x)), augmenter, seed, view)
                        x = normalize(x, preprocess)
                        x = x.contiguous(memory_format=torch.channels_last)  # as fit and evaluate feed the prefix
                        ys = prefix(x) if len(targets) > 1 else (prefix(x),)
                        for (k, array, _), y in zip(targets, ys):
                            if k != key and k not in extras:
                                continue  # out of range before: not kept
                            y = y.float().cpu().numpy()
                            if not np.isfinite(y).all() or np.abs(y).max(initial=0) > np.finfo(array.dtype).max:
                                if k == key:
                                    raise _Uncached(f"prefix outputs exceed the {array.dtype} range")
                                del extras[k]
                                continue
                            array[start:start + len(y)] = y.astype(array.dtype)
            finally:
                self.base.cpu()

        extras = [(k, (n, *other.feature_shape), FEATURE_DTYPE) for k, other in shallower.items()]
        try:
            with stage("features"):
                array = self.store.get_or_make("features", key, (n, *split.feature_shape), FEATURE_DTYPE, fill, extras, count=count)
        except _Uncached as exc:
            self.say_once(f"caches: features after {split.depth} stages: {exc}; such trials run on images")
            return None
        if array is None:
            self.say_once(f"caches: features after {split.depth} stages do not fit under --cache-size-gb {self.options.size_gb:g}; "
                          "such trials run on images")
        return array

    def prepare(self, model: torch.nn.Module, backbone: torch.nn.Module, *, depth: int, preprocess: Preprocess, augment: Augment,
                mixup: bool, batch_size: int, epochs: int, shuffle_seed: int, augment_seed: int, first_epoch: int = 0,
                count: bool = True) -> Prepared | None:
        """The model and loaders for one trial; ``None``: use the plain, uncached path.

        Trials with frozen stages and no mixup/cutmix (which mix images, not features)
        train on cached prefix features; the others on decoded images, augmented as tensors.
        Either way the trial trains on what the uncached path would give it (up to fp16
        features), unless ``--cache-views`` is below the epochs. The loaders serve epochs
        ``first_epoch`` to ``epochs - 1`` (a trial's early epochs at another size get loaders of
        their own); ``count``: ``False`` for a trial's second preparation, left out of the summary.
        """

        self.trials += count
        task = self.data.task
        val_targets = target_tensor(self.data.val.targets, task)
        split = None
        if depth > 0 and not mixup:
            split = self.splitter.split(depth, preprocess.input_size)
            if split is None:
                reason = self.splitter.reasons.get(depth, "")
                self.say_once(f"caches: cannot split {self.backbone_id} after {depth} stages ({reason}); such trials run on images")
        elif depth > 0:
            self.say_once("caches: trials with mixup or cutmix run on images (they mix images, not features)")
        if split is not None:
            val = self.features(split, "val", preprocess, None, None)
            served = max(1, epochs - first_epoch)
            views = []
            if augment.identity:  # every epoch sees the evaluation view: one view, the one an exact probe solves on
                served = 1 if val is not None else 0
            for v in range(min(self.options.views or served, served) if val is not None else 0):
                views.append(self.features(split, "train", preprocess, None if augment.identity else first_epoch + v, augment, augment_seed))
                if views[-1] is None:  # said why; no use computing the other views
                    break
            if val is not None and views and all(v is not None for v in views):
                val_key = (split.depth, split.cut, preprocess)
                if self._val_features is None or self._val_features[0] != val_key:  # read a batch at a time
                    self._val_features = (val_key, loader(feature_dataset([val], val_targets), 64, False, self.device))
                self.trials_on_features += count
                train_targets = target_tensor(self.data.train.targets, task)
                train = EpochLoader(feature_dataset(views, train_targets), len(train_targets), len(views), batch_size, self.device,
                                    shuffle_seed, first_epoch)
                return Prepared(cached_model(split.suffix(backbone), model), train, self._val_features[1], True, split.cut)
        eval_pixels, train_pixels = self.pixels("val", preprocess, "eval"), self.pixels("train", preprocess, augment.layout)
        if eval_pixels is None or train_pixels is None:
            need = images_bytes(len(self.data.val), preprocess.input_size) + images_bytes(len(self.data.train), preprocess.resize)
            size = f"{need / 1e9:.1f} GB" if need >= 1e9 else f"{max(1, round(need / 1e6))} MB"
            self.say_once(f"caches: the decoded images at {preprocess.input_size}px need {size}, over --cache-size-gb "
                          f"{self.options.size_gb:g}; decoding every image every epoch (pass --cache-size-gb "
                          f"{max(1, math.ceil(need * 1.25 / 1e9))} with that much free disk to decode them once)")
            return None
        if preprocess not in self._val_images:
            self._val_images[preprocess] = eval_loader(self.data.val, task, preprocess, self.device, pixels=eval_pixels)
        train = image_train_loader(self.data.train, task, preprocess, augment, batch_size, self.device, shuffle_seed=shuffle_seed,
                                   augment_seed=augment_seed, pixels=train_pixels)
        return Prepared(model, train, self._val_images[preprocess], False)

    def probe_features(self, preprocess: Preprocess, count: bool = True) -> tuple[Any, Any] | None:
        """Pooled features after every stage of the training and validation images at the evaluation crop
        (an exact linear probe's inputs), or ``None`` when the backbone cannot be split there or they do not fit."""
        depth = self.splitter.n_stages
        split = self.splitter.split(depth, preprocess.input_size)
        if split is None or len(split.feature_shape) != 1:
            return None
        self.trials += count
        val = self.features(split, "val", preprocess, None, None, count=count)
        train = self.features(split, "train", preprocess, None, None, count=count) if val is not None else None
        if train is None:
            return None
        self.trials_on_features += count
        return train, val

    def summary(self) -> str:
        """One line: hits and misses, trials on cached features, the folder and its size."""
        hits, misses = self.store.hits, self.store.misses
        parts = [f"{kind} {hits.get(kind, 0)} hit{'s' if hits.get(kind, 0) != 1 else ''}, {misses.get(kind, 0)} computed"
                 for kind in ("images", "features")]
        if self.store.made_extra.get("features"):
            parts[-1] += f" (+{self.store.made_extra['features']} for fewer frozen stages on the way)"
        return (f"caches: {'; '.join(parts)}; {self.trials_on_features} of {self.trials} trials on cached features; "
                f"{self.store.root} ({self.store.size_bytes() / 1e6:.0f} MB)")


def images_bytes(count: int, side: int) -> int:
    """Bytes of ``count`` decoded images of ``side`` x ``side`` pixels in the cache (uint8 RGB)."""
    return count * side * side * 3


class _Uncached(Exception):
    """Features that cannot be cached (decoded images over the cap, outputs beyond fp16)."""
