"""Caches that keep a search from redoing work: decode once, and frozen-prefix features.

Two kinds of ``.npy`` file live under the cache folder (``--cache-dir``, else
``$TLENGINE_CACHE``, else ``~/.cache/tlengine``). They are read as memory maps, so
every trial and every process on the machine shares one copy through the page cache:

- ``images/KEY.npy``: the images of a split decoded, resized and centre-cropped once,
  uint8 ``(N, H, W, 3)``. Two layouts: the evaluation crop (exactly what timm's eval
  transform and the exported ONNX preprocessing produce before normalisation) and,
  for training, the centre square at the resize side, on which augmentation then runs
  as tensor operations (torchvision ``transforms.v2``), on the GPU when there is one.
  KEY hashes every file's path, size and modification time (array contents for
  in-memory images), the size, resize side and interpolation, and the Pillow version.
- ``features/KEY.npy``: fp16 outputs of a backbone's first ``k`` frozen stages for
  every image of a split, computed once and reused by every epoch and every trial with
  the same backbone, weights (hash of the state dict), ``k``, preprocessing and images.
  Validation always uses the evaluation view. Training uses ``views`` views per image:
  view 0 is the evaluation view, views 1.. are augmented with the trial's RandAugment
  and flip, each from its own fixed seed; each epoch draws one view per image.

Writes go to a temporary file renamed into place, so concurrent writers of one key
never leave a torn file (the last rename wins; both wrote the same bytes). Every use
touches a file's modification time; before a write, the least recently used files
are deleted until the folder fits under the cap.

Splitting a model after its ``k``-th stage uses torch.fx through torchvision's
feature-extraction tracer, with timm's own list of modules and functions not to trace
into (the same machinery as timm's ``create_feature_extractor``); BatchNorm layers
stay whole modules so that frozen ones keep their eval mode. A split is used only if
it passes checks on a probe batch: the prefix gives the same output in training and
evaluation mode (no dropout, no batch statistics), and prefix then suffix equals the
eager model in both modes. Otherwise the trial runs uncached (logged once).
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import os
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tlengine._errors import UserError
from tlengine._preprocess import Preprocess

#: Bump when the layout or the numerics of cached files change.
FORMAT = 1
DEFAULT_SIZE_GB = 4.0
DEFAULT_VIEWS = 1
_BATCH = 64


def default_cache_dir() -> Path:
    """``$TLENGINE_CACHE``, else ``~/.cache/tlengine``."""
    env = os.environ.get("TLENGINE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "tlengine"


@dataclass(frozen=True)
class CacheOptions:
    """What the user asked of the caches.

    Attributes:
        enabled: ``False`` (``--no-cache``): decode images and run every layer each time.
        directory: The cache folder; ``None``: :func:`default_cache_dir`.
        size_gb: Cap on the folder's size, in GB (10^9 bytes).
        views: Cached training views per image for a frozen prefix (1: the evaluation view only).
    """

    enabled: bool = True
    directory: str | None = None
    size_gb: float = DEFAULT_SIZE_GB
    views: int = DEFAULT_VIEWS

    def check(self) -> None:
        """Raise :class:`UserError` for a value out of range."""
        if isinstance(self.size_gb, bool) or not self.size_gb > 0:
            raise UserError(f"--cache-size-gb {self.size_gb:g}: must be a positive number of gigabytes")
        if isinstance(self.views, bool) or not isinstance(self.views, int) or self.views < 1:
            raise UserError(f"--cache-views {self.views}: must be a positive integer")


def digest(*parts: Any) -> str:
    """A short hex key for JSON-able ``parts``."""
    text = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def images_digest(images: Sequence[Any]) -> str:
    """Hash of a split's images: path, size and mtime of files; the bytes of in-memory images."""
    import numpy as np
    from PIL import Image

    h = hashlib.sha256()
    for item in images:
        if isinstance(item, np.ndarray):
            h.update(f"array{item.shape}{item.dtype}".encode())
            h.update(hashlib.sha256(np.ascontiguousarray(item).tobytes()).digest())
        elif isinstance(item, Image.Image):
            h.update(f"pil{item.mode}{item.size}".encode())
            h.update(hashlib.sha256(item.tobytes()).digest())
        else:
            path = Path(item)
            stat = path.stat()
            h.update(f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return h.hexdigest()[:32]


def state_digest(state: dict[str, Any]) -> str:
    """Hash of a state dict's names, shapes, dtypes and values."""
    import torch

    h = hashlib.sha256()
    for name, tensor in state.items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


class Store:
    """``.npy`` files under a folder, read as memory maps, capped, least recently used evicted first.

    Args:
        root: The cache folder (created).
        cap_bytes: The most bytes the folder may hold.

    Raises:
        UserError: The folder cannot be created.
    """

    def __init__(self, root: Path, cap_bytes: int) -> None:
        self.root = Path(root)
        self.cap_bytes = int(cap_bytes)
        self.hits: dict[str, int] = {}
        self.misses: dict[str, int] = {}
        self.evicted = 0
        try:
            for kind in ("images", "features"):
                (self.root / kind).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"--cache-dir {root}: cannot create it ({exc.strerror}); choose a writable folder or pass --no-cache") from exc

    def path(self, kind: str, key: str) -> Path:
        """Where the file for ``key`` lives."""
        return self.root / kind / f"{key}.npy"

    def get(self, kind: str, key: str) -> Any:
        """The memory-mapped array of ``key``, or ``None``; marks it as just used."""
        import numpy as np

        path = self.path(kind, key)
        try:
            array = np.load(path, mmap_mode="r")
            os.utime(path)
        except (FileNotFoundError, ValueError, OSError):
            return None
        return array

    def get_or_make(self, kind: str, key: str, shape: tuple[int, ...], dtype: str, fill: Callable[[Any], None]) -> Any:
        """The array of ``key``, made with ``fill(array)`` when missing; ``None`` if it cannot fit under the cap.

        ``fill`` writes into a memory-mapped temporary file that is renamed into
        place once full, so readers never see a partial file.
        """
        import numpy as np

        array = self.get(kind, key)
        if array is not None and array.shape == tuple(shape):
            self.hits[kind] = self.hits.get(kind, 0) + 1
            return array
        self.misses[kind] = self.misses.get(kind, 0) + 1
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize + 128
        if nbytes > self.cap_bytes:
            return None
        self.evict(nbytes)
        path = self.path(kind, key)
        tmp = path.with_name(f".{key}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=tuple(shape))
            fill(out)
            out.flush()
            del out
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return self.get(kind, key)

    def files(self) -> list[tuple[float, int, Path]]:
        """``(mtime, bytes, path)`` of every cached file, oldest first."""
        found = []
        for kind in ("images", "features"):
            for path in (self.root / kind).glob("*.npy"):
                try:
                    stat = path.stat()
                except FileNotFoundError:
                    continue
                found.append((stat.st_mtime, stat.st_size, path))
        return sorted(found)

    def evict(self, incoming: int) -> None:
        """Delete the least recently used files until ``incoming`` more bytes fit under the cap."""
        files = self.files()
        total = sum(size for _, size, _ in files)
        for _, size, path in files:
            if total + incoming <= self.cap_bytes:
                break
            path.unlink(missing_ok=True)
            total -= size
            self.evicted += 1

    def size_bytes(self) -> int:
        """Bytes the cached files take."""
        return sum(size for _, size, _ in self.files())


def normalize(batch: Any, preprocess: Preprocess) -> Any:
    """uint8 ``(N, 3, H, W)`` to normalised float32, as timm's ``ToTensor`` then ``Normalize`` compute it."""
    import torch

    mean = torch.tensor(preprocess.mean, device=batch.device).view(1, 3, 1, 1)
    std = torch.tensor(preprocess.std, device=batch.device).view(1, 3, 1, 1)
    return batch.to(torch.float32).div(255).sub(mean).div(std)


def tensor_augment(preprocess: Preprocess, randaugment: int = 0, hflip: float = 0.5) -> Any:
    """The training augmentation on uint8 tensors (torchvision ``transforms.v2``).

    Mirrors :func:`tlengine._train.train_transform`: random resized crop (scale 0.5..1),
    horizontal flip with probability ``hflip``, RandAugment with 2 operations at
    ``randaugment`` on timm's 0..10 magnitude scale (11 bins; above 10 is clipped, as timm does).
    """
    from torchvision.transforms import InterpolationMode, v2

    interpolation = InterpolationMode(preprocess.interpolation)
    ops = [v2.RandomResizedCrop(preprocess.input_size, scale=(0.5, 1.0), interpolation=interpolation, antialias=True)]
    if hflip > 0:
        ops.append(v2.RandomHorizontalFlip(hflip))
    if randaugment:  # its rotations and shears take nearest or bilinear on tensors
        geometric = interpolation if interpolation == InterpolationMode.NEAREST else InterpolationMode.BILINEAR
        ops.append(v2.RandAugment(num_ops=2, magnitude=min(int(randaugment), 10), num_magnitude_bins=11, interpolation=geometric))
    return v2.Compose(ops)


class AugmentLoader:
    """Batches of decoded uint8 images, augmented one by one on the loader's device and normalised.

    Wraps a ``DataLoader``; its batches arrive on ``device`` (the GPU when there is one).
    """

    def __init__(self, inner: Any, augment: Any, preprocess: Preprocess, device: str) -> None:
        self.inner, self.augment, self.preprocess, self.device = inner, augment, preprocess, device

    def __len__(self) -> int:
        return len(self.inner)

    @property
    def generator(self) -> Any:
        """The shuffle generator (``fit`` saves and restores it to resume an epoch's order)."""
        return self.inner.generator

    def __iter__(self) -> Any:
        import torch

        for x, y in self.inner:
            x = x.to(self.device, non_blocking=True)
            x = torch.stack([self.augment(image) for image in x])
            yield normalize(x, self.preprocess), y


def _target_tensor(targets: Sequence[Any], task: str) -> Any:
    import torch

    return torch.tensor(list(targets), dtype=torch.long if task == "classification" else torch.float32)


def _uint8_dataset(pixels: Any, targets: Any) -> Any:
    """A ``Dataset`` of ``(uint8 (3, H, W) tensor, target)`` read from a memory-mapped ``(N, H, W, 3)`` array."""
    import numpy as np
    import torch

    class Pixels(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(pixels)

        def __getitem__(self, index: int) -> tuple[Any, Any]:
            return torch.from_numpy(np.array(pixels[index])).permute(2, 0, 1), targets[index]

    return Pixels()


def _feature_dataset(views: list[Any], targets: Any) -> Any:
    """A ``Dataset`` of ``(float32 features, target)``; with several views, each item draws one."""
    import numpy as np
    import torch

    class Features(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(views[0])

        def __getitem__(self, index: int) -> tuple[Any, Any]:
            view = 0 if len(views) == 1 else int(torch.randint(len(views), ()))
            return torch.from_numpy(np.asarray(views[view][index], dtype=np.float32)), targets[index]

    return Features()


# ---------------------------------------------------------------- splitting a model after k stages


@dataclass(frozen=True)
class PrefixSplit:
    """A backbone cut after its first ``depth`` stages at graph node ``cut``.

    Attributes:
        depth: Frozen stages in the prefix.
        cut: Name of the torch.fx node whose output is cached.
        feature_shape: Shape of one image's cached output.
        prefix_graphs: ``(train, eval)`` graphs from the image to the cut.
        suffix_graphs: ``(train, eval)`` graphs from the cut to the backbone's output.
    """

    depth: int
    cut: str
    feature_shape: tuple[int, ...]
    prefix_graphs: tuple[Any, Any] = field(compare=False, repr=False)
    suffix_graphs: tuple[Any, Any] = field(compare=False, repr=False)

    def prefix(self, root: Any) -> Any:
        """The prefix as a module sharing ``root``'s submodules."""
        return _graph_module(root, self.prefix_graphs, "FrozenPrefix")

    def suffix(self, root: Any) -> Any:
        """The rest of ``root`` (a backbone with the same architecture) as a module sharing its submodules."""
        return _graph_module(root, self.suffix_graphs, "TrainableSuffix")


def _graph_module(root: Any, graphs: tuple[Any, Any], name: str) -> Any:
    from torchvision.models.feature_extraction import DualGraphModule

    return DualGraphModule(root, copy.deepcopy(graphs[0]), copy.deepcopy(graphs[1]), class_name=name)


def _trace(backbone: Any) -> tuple[Any, Any]:
    """Trace ``backbone`` in training and evaluation mode (torchvision's tracer, timm's leaf lists)."""
    from timm.layers import get_notrace_functions, get_notrace_modules
    from torch.nn.modules.batchnorm import _BatchNorm
    from torchvision.models.feature_extraction import NodePathTracer

    leaves = list(get_notrace_modules()) + sorted({type(m) for m in backbone.modules() if isinstance(m, _BatchNorm)}, key=str)
    # optional forward arguments (a ViT's attn_mask, is_causal) keep their defaults, as the backbone is called
    parameters = list(inspect.signature(backbone.forward).parameters.values())[1:]
    concrete = {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}
    was_training = backbone.training
    graphs = []
    try:
        for mode in (True, False):
            backbone.train(mode)
            tracer = NodePathTracer(leaf_modules=leaves, autowrap_functions=list(get_notrace_functions()))
            graphs.append(tracer.trace(backbone, concrete_args=concrete))
    finally:
        backbone.train(was_training)
    return graphs[0], graphs[1]


def _node_stages(node: Any, root: Any, stage_of: dict[str, int]) -> set[int]:
    if node.op == "call_module":
        module = root.get_submodule(node.target)
        return {stage_of[f"{node.target}.{n}"] for n, _ in module.named_parameters() if f"{node.target}.{n}" in stage_of}
    if node.op == "get_attr" and node.target in stage_of:
        return {stage_of[node.target]}
    return set()


def _cut_graphs(graph: Any, cut: str, frozen: Callable[[Any], bool], root: Any) -> tuple[Any, Any] | None:
    """``(prefix, suffix)`` graphs cut at node ``cut``, or ``None`` when the suffix needs more than the cut's output.

    ``root`` is the traced module (dead-code elimination asks it which calls are pure).
    """
    suffix = copy.deepcopy(graph)
    suffix.owning_module = root
    nodes = {n.name: n for n in suffix.nodes}
    if cut not in nodes:
        return None
    inputs = [n for n in suffix.nodes if n.op == "placeholder"]
    with suffix.inserting_before(next(iter(suffix.nodes))):
        features = suffix.placeholder("features")
    nodes[cut].replace_all_uses_with(features)
    # what still depends on the inputs other than through the cut: the prefix's own work (and its shape
    # asserts), which the prefix runs; the suffix is valid only if its output needs none of it
    tainted = set(inputs)
    for node in suffix.nodes:
        if node.op != "placeholder" and any(a in tainted for a in node.all_input_nodes):
            tainted.add(node)
    if any(n.op == "output" for n in tainted):
        return None
    for node in reversed([n for n in suffix.nodes if n in tainted]):
        suffix.erase_node(node)
    suffix.eliminate_dead_code()
    if any(frozen(n) for n in suffix.nodes):
        return None
    prefix = copy.deepcopy(graph)
    prefix.owning_module = root
    output = next(n for n in prefix.nodes if n.op == "output")
    output.args = ({n.name: n for n in prefix.nodes}[cut],)
    prefix.eliminate_dead_code()
    prefix.lint()
    suffix.lint()
    prefix.owning_module = suffix.owning_module = None
    return prefix, suffix


class Splitter:
    """Finds, once per freeze depth, where a backbone can be cut after its frozen stages.

    Args:
        base: The backbone with the search's base weights.
        stages: Parameter names per stage (:func:`tlengine._stages.backbone_stages`).
    """

    def __init__(self, base: Any, stages: list[list[str]]) -> None:
        self.base = base
        self.stage_of = {name: i for i, names in enumerate(stages) for name in names}
        self.n_stages = len(stages)
        self._graphs: tuple[Any, Any] | None = None
        self._splits: dict[tuple[int, int], PrefixSplit | None] = {}
        self.reasons: dict[int, str] = {}

    def split(self, depth: int, size: int) -> PrefixSplit | None:
        """The split for ``depth`` frozen stages at ``size`` px (checked on a probe batch), or ``None``."""
        if (depth, size) not in self._splits:
            try:
                self._splits[depth, size] = self._find(depth, size)
            except Exception as exc:  # a model torch.fx cannot trace: run it uncached
                self._splits[depth, size] = None
                self.reasons[depth] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
        return self._splits[depth, size]

    def _find(self, depth: int, size: int) -> PrefixSplit | None:
        if depth < 1 or depth > self.n_stages:
            return None
        if self._graphs is None:
            self._graphs = _trace(self.base)
        train_graph, eval_graph = self._graphs
        stages_of = {n.name: _node_stages(n, self.base, self.stage_of) for n in train_graph.nodes}
        frozen = lambda n: any(s < depth for s in _node_stages(n, self.base, self.stage_of))  # noqa: E731
        nodes = list(train_graph.nodes)
        frozen_at = [i for i, n in enumerate(nodes) if any(s < depth for s in stages_of[n.name])]
        trainable_at = [i for i, n in enumerate(nodes) if any(s >= depth for s in stages_of[n.name])]
        if not frozen_at or set(frozen_at) & set(trainable_at):
            self.reasons[depth] = "no node boundary between the frozen and the trainable stages"
            return None
        end = min(trainable_at) if trainable_at else len(nodes) - 1
        candidates = [n.name for n in nodes[max(frozen_at):end] if n.op in ("call_module", "call_function", "call_method")]
        for cut in reversed(candidates):  # the latest cut caches the most work (pooled features for a linear probe)
            train_cut, eval_cut = _cut_graphs(train_graph, cut, frozen, self.base), _cut_graphs(eval_graph, cut, frozen, self.base)
            if train_cut is None or eval_cut is None:
                continue
            split = PrefixSplit(depth, cut, (), (train_cut[0], eval_cut[0]), (train_cut[1], eval_cut[1]))
            shape = self._check(split, size)
            if shape is not None:
                return PrefixSplit(depth, cut, shape, split.prefix_graphs, split.suffix_graphs)
        self.reasons[depth] = "no cut after the frozen stages passed the checks (dropout or batch statistics in the prefix?)"
        return None

    def _check(self, split: PrefixSplit, size: int) -> tuple[int, ...] | None:
        """Feature shape if the split is exact on a probe batch: the prefix is deterministic and the same
        in training and evaluation mode, and prefix then suffix equals the eager backbone in both modes."""
        import torch

        from tlengine._stages import freeze_stages, train_mode

        x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
        eager, cut = copy.deepcopy(self.base), copy.deepcopy(self.base)
        for m in (eager, cut):
            freeze_stages(m, split.depth)
        prefix, suffix = split.prefix(cut), split.suffix(cut)
        close = lambda a, b: isinstance(a, torch.Tensor) and a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-5)  # noqa: E731
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            prefix.eval()
            features = prefix(x)
            if not isinstance(features, torch.Tensor) or not features.is_floating_point():
                return None
            train_mode(prefix)
            if not (close(prefix(x), features) and close(prefix(x), features)):
                return None
            for mode in ("eval", "train"):
                for m in (eager, suffix):
                    m.eval() if mode == "eval" else train_mode(m)
                torch.manual_seed(1)
                expected = eager(x)
                torch.manual_seed(1)
                if not close(suffix(features), expected):
                    return None
        return tuple(features.shape[1:])


def cached_model(suffix: Any, model: Any) -> Any:
    """What ``fit`` trains on cached features: ``suffix`` then ``model.head``.

    Exposes ``task``, ``target_mean`` and ``target_std`` as ``model`` does; its
    parameters are the trainable parameters of ``model`` (shared, not copied), so an
    optimizer built on ``model`` trains it, and ``model`` holds the result.
    ``state_dict`` and ``load_state_dict`` are the full model's, so a checkpoint
    taken during training is a checkpoint of ``model``.
    """
    import torch

    class TrainableSuffix(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.suffix = suffix
            self.head = model.head
            self.task = model.task
            self.register_buffer("target_mean", model.target_mean.detach().clone())
            self.register_buffer("target_std", model.target_std.detach().clone())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.suffix(x))

        def state_dict(self, *args: Any, **kwargs: Any) -> Any:
            return model.state_dict(*args, **kwargs)

        def load_state_dict(self, *args: Any, **kwargs: Any) -> Any:
            return model.load_state_dict(*args, **kwargs)

    return TrainableSuffix()


# ---------------------------------------------------------------- the search's caches


@dataclass(frozen=True)
class Prepared:
    """What one trial trains: the model ``fit`` sees and its loaders.

    Attributes:
        model: The full model, or (on cached features) the trainable suffix and head.
        train_loader: Training batches.
        val_loader: Validation batches.
        features: ``True`` when the loaders yield cached prefix features.
    """

    model: Any
    train_loader: Any
    val_loader: Any
    features: bool


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

    def __init__(self, options: CacheOptions, data: Any, base: Any, backbone_id: str, stages: list[list[str]],
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

    def _images_digest(self, name: str) -> str:
        if name not in self._digests:
            self._digests[name] = images_digest(self._split(name).images)
        return self._digests[name]

    def pixels(self, name: str, preprocess: Preprocess, layout: str) -> Any:
        """Decoded uint8 images of split ``name``: ``layout`` ``"eval"`` (the eval crop) or ``"train"``
        (the centre square at the resize side); ``None`` if they do not fit under the cap."""
        import PIL

        from tlengine._preprocess import load_image

        side = preprocess.input_size if layout == "eval" else preprocess.resize
        crop = preprocess if layout == "eval" else Preprocess(side, side, preprocess.interpolation, preprocess.mean, preprocess.std)
        key = digest("images", FORMAT, self._images_digest(name), layout, side, preprocess.resize, preprocess.interpolation, PIL.__version__)
        items = self._split(name).images

        def fill(out: Any) -> None:
            for i, item in enumerate(items):
                out[i] = crop.pixels(load_image(item))

        return self.store.get_or_make("images", key, (len(items), side, side, 3), "uint8", fill)

    def _weights_digest(self) -> str:
        if self._weights is None:
            self._weights = state_digest(self.base.state_dict())
        return self._weights

    def features(self, split: PrefixSplit, name: str, preprocess: Preprocess, view: int, augment: tuple[int, float]) -> Any:
        """fp16 prefix outputs of every image of split ``name`` in view ``view``; ``None`` when they cannot be cached."""
        import numpy as np
        import timm
        import torch

        from tlengine._train import amp_dtype

        dtype = amp_dtype(self.device)
        key = digest("features", FORMAT, self.backbone_id, self._weights_digest(), split.depth, split.cut, preprocess.to_dict(),
                     self._images_digest(name), view, augment if view else None, str(dtype), torch.__version__, timm.__version__)
        augmenter = tensor_augment(preprocess, *augment) if view else None

        def fill(out: Any) -> None:
            pixels = self.pixels(name, preprocess, "eval" if view == 0 else "train")
            if pixels is None:
                raise _Uncached("the decoded images do not fit under the cap")
            cuda = self.device.startswith("cuda")
            prefix = split.prefix(self.base.to(self.device)).eval()
            try:
                with torch.inference_mode(), torch.random.fork_rng(devices=[]), torch.autocast(
                        self.device.split(":")[0], dtype=dtype, enabled=dtype is not None):
                    torch.manual_seed(view)
                    for start in range(0, len(pixels), _BATCH):
                        x = torch.from_numpy(np.array(pixels[start:start + _BATCH])).permute(0, 3, 1, 2).to(self.device)
                        if augmenter is not None:
                            x = torch.stack([augmenter(image) for image in x])
                        x = normalize(x, preprocess)
                        if cuda:
                            x = x.contiguous(memory_format=torch.channels_last)
                        y = prefix(x).float().cpu().numpy()
                        if not np.isfinite(y).all() or np.abs(y).max(initial=0) > 65504:
                            raise _Uncached("prefix outputs exceed the fp16 range")
                        out[start:start + len(y)] = y.astype(np.float16)
            finally:
                self.base.cpu()

        try:
            return self.store.get_or_make("features", key, (len(self._split(name)), *split.feature_shape), "float16", fill)
        except _Uncached as exc:
            self.say_once(f"caches: features after {split.depth} stages: {exc}; such trials run on images")
            return None

    def prepare(self, model: Any, backbone: Any, *, depth: int, preprocess: Preprocess, augment: tuple[int, float],
                mixup: bool, batch_size: int, seed: int) -> Prepared | None:
        """The model and loaders for one trial; ``None``: use the plain, uncached path.

        Trials with frozen stages and no mixup/cutmix (which mix images, not features)
        train on cached prefix features; the others on decoded images, augmented as tensors.
        """
        from tlengine._train import loader

        self.trials += 1
        task = self.data.task
        val_targets = _target_tensor(self.data.val.targets, task)
        train_targets = _target_tensor(self.data.train.targets, task)
        split = None
        if depth > 0 and not mixup:
            split = self.splitter.split(depth, preprocess.input_size)
            if split is None:
                reason = self.splitter.reasons.get(depth, "")
                self.say_once(f"caches: cannot split {self.backbone_id} after {depth} stages ({reason}); such trials run on images")
        elif depth > 0:
            self.say_once("caches: trials with mixup or cutmix run on images (they mix images, not features)")
        if split is not None:
            val = self.features(split, "val", preprocess, 0, augment)
            views = [self.features(split, "train", preprocess, v, augment) for v in range(self.options.views)]
            if val is not None and all(v is not None for v in views):
                import numpy as np
                import torch

                val_key = (split.depth, split.cut, preprocess)
                if self._val_features is None or self._val_features[0] != val_key:  # keep one: features can be large
                    dataset = torch.utils.data.TensorDataset(torch.from_numpy(np.asarray(val, dtype=np.float32)), val_targets)
                    self._val_features = (val_key, loader(dataset, 64, False, self.device))
                self.trials_on_features += 1
                return Prepared(cached_model(split.suffix(backbone), model),
                                loader(_feature_dataset(views, train_targets), batch_size, True, self.device, seed=seed),
                                self._val_features[1], True)
            self.say_once(f"caches: features after {depth} stages do not fit under --cache-size-gb {self.options.size_gb:g}; "
                          "such trials run on images")
        eval_pixels, train_pixels = self.pixels("val", preprocess, "eval"), self.pixels("train", preprocess, "train")
        if eval_pixels is None or train_pixels is None:
            self.say_once(f"caches: the decoded images do not fit under --cache-size-gb {self.options.size_gb:g}; decoding every epoch")
            return None
        if preprocess not in self._val_images:
            import torch

            images = normalize(torch.from_numpy(eval_pixels.copy()).permute(0, 3, 1, 2), preprocess)
            self._val_images[preprocess] = loader(torch.utils.data.TensorDataset(images, val_targets), 64, False, self.device)
        inner = loader(_uint8_dataset(train_pixels, train_targets), batch_size, True, self.device, seed=seed)
        return Prepared(model, AugmentLoader(inner, tensor_augment(preprocess, *augment), preprocess, self.device),
                        self._val_images[preprocess], False)

    def summary(self) -> str:
        """One line: hits and misses, trials on cached features, the folder and its size."""
        hits, misses = self.store.hits, self.store.misses
        parts = [f"{kind} {hits.get(kind, 0)} hit{'s' if hits.get(kind, 0) != 1 else ''}, {misses.get(kind, 0)} computed"
                 for kind in ("images", "features")]
        return (f"caches: {'; '.join(parts)}; {self.trials_on_features} of {self.trials} trials on cached features; "
                f"{self.store.root} ({self.store.size_bytes() / 1e6:.0f} MB)")


class _Uncached(Exception):
    """Features that cannot be cached (decoded images over the cap, outputs beyond fp16)."""
