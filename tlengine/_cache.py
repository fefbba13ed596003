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
  Validation uses the evaluation crop. Training uses one augmented view per epoch
  (``views`` of them, reused in turn when fewer than the epochs).

Augmentation is reproducible per image: image ``i`` in epoch ``e`` is augmented from a
seed made of the search's seed, ``e`` and ``i`` (:func:`image_seed`), whichever path
trains it. So the cached view ``e`` is exactly what an uncached trial feeds its frozen
layers in epoch ``e``, and cached and uncached trials train on the same images.

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
DEFAULT_VIEWS: int | None = None  # one per epoch
#: How prefix features are stored (tests set float32 to show that only this rounding separates the paths).
FEATURE_DTYPE = "float16"
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
        self.made_extra: dict[str, int] = {}
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

    def get_or_make(self, kind: str, key: str, shape: tuple[int, ...], dtype: str, fill: Callable[[Any], None],
                    extras: Sequence[tuple[str, tuple[int, ...], str]] = ()) -> Any:
        """The array of ``key``, made with ``fill(array)`` when missing; ``None`` if it cannot fit under the cap.

        ``fill`` writes into a memory-mapped temporary file that is renamed into
        place once full, so readers never see a partial file. ``extras`` are more
        ``(key, shape, dtype)`` files the same pass can fill for free: those missing that
        fit in the cap's free space (never evicting for them) are made too, and ``fill``
        then gets ``(array, {key: array})``.
        """
        import numpy as np

        array = self.get(kind, key)
        if array is not None and array.shape == tuple(shape):
            self.hits[kind] = self.hits.get(kind, 0) + 1
            return array
        self.misses[kind] = self.misses.get(kind, 0) + 1
        nbytes = _nbytes(shape, dtype)
        if nbytes > self.cap_bytes:
            return None
        self.evict(nbytes)
        free = self.cap_bytes - self.size_bytes() - nbytes
        wanted = {}
        for extra, extra_shape, extra_dtype in extras:
            if extra != key and extra not in wanted and not self.path(kind, extra).is_file() and _nbytes(extra_shape, extra_dtype) <= free:
                wanted[extra] = (tuple(extra_shape), extra_dtype)
                free -= _nbytes(extra_shape, extra_dtype)
        files = {k: (self.path(kind, k), self.path(kind, k).with_name(f".{k}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"))
                 for k in [key, *wanted]}
        try:
            outs = {k: np.lib.format.open_memmap(files[k][1], mode="w+", dtype=d, shape=sh)
                    for k, (sh, d) in {key: (tuple(shape), dtype), **wanted}.items()}
            out = outs.pop(key)
            fill(out, outs) if extras else fill(out)  # an extra ``fill`` removes from ``outs`` is not kept
            kept = [key, *outs]
            for array in [out, *outs.values()]:
                array.flush()
            del out, outs
            for k in kept:
                os.replace(files[k][1], files[k][0])
        finally:
            for _, tmp in files.values():
                tmp.unlink(missing_ok=True)
        self.made_extra[kind] = self.made_extra.get(kind, 0) + len(kept) - 1
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


def decode_threads() -> int:
    """Threads for decoding: the CPUs this process may run on, at most 16."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(16, cpus))


def decode_into(out: Any, items: Sequence[Any], crop: Preprocess, threads: int | None = None) -> None:
    """Decode, resize and crop every item into ``out[i]`` (uint8 ``(N, H, W, 3)``), on ``threads`` threads
    (default :func:`decode_threads`).

    Threads, not processes: Pillow releases the GIL while it decodes and resizes, and the
    threads write straight into the memory-mapped output.
    """
    from concurrent.futures import ThreadPoolExecutor

    def one(i: int) -> None:
        out[i] = crop.pixels(items[i])  # pixels() loads the item (tlengine._preprocess.load_image)

    threads = decode_threads() if threads is None else threads
    if threads <= 1 or len(items) < 2:
        for i in range(len(items)):
            one(i)
        return
    with ThreadPoolExecutor(threads, thread_name_prefix="tlengine-decode") as pool:
        for _ in pool.map(one, range(len(items))):  # re-raises the first error
            pass


def _nbytes(shape: Sequence[int], dtype: str) -> int:
    import numpy as np

    return int(np.prod(shape)) * np.dtype(dtype).itemsize + 128


def normalize(batch: Any, preprocess: Preprocess) -> Any:
    """uint8 ``(N, 3, H, W)`` to normalised float32, as timm's ``ToTensor`` then ``Normalize`` compute it."""
    import torch

    mean = torch.tensor(preprocess.mean, device=batch.device).view(1, 3, 1, 1)
    std = torch.tensor(preprocess.std, device=batch.device).view(1, 3, 1, 1)
    return batch.to(torch.float32).div(255).sub(mean).div(std)


def tensor_augment(preprocess: Preprocess, randaugment: int = 0, hflip: float = 0.5) -> Any:
    """The training augmentation on uint8 tensors (torchvision ``transforms.v2``), cached or not.

    Random resized crop (scale 0.5..1, as timm's training transform uses here), horizontal
    flip with probability ``hflip``, RandAugment with 2 operations at ``randaugment`` on
    timm's 0..10 magnitude scale (11 bins; above 10 is clipped, as timm does). torchvision
    rather than timm's ``create_transform`` because timm's RandAugment works on PIL images
    only, while this runs on decoded tensors, on the GPU when there is one, with one seed
    per image (:func:`augment_batch`).
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


def image_seed(seed: int, view: int, index: int) -> int:
    """The seed that augments image ``index`` in epoch (view) ``view`` of a search seeded ``seed``."""
    return int.from_bytes(hashlib.blake2b(f"{seed}/{view}/{index}".encode(), digest_size=8).digest(), "little") >> 1


def augment_batch(images: Any, indices: Sequence[int], augment: Any, seed: int, view: int) -> Any:
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


class EpochSampler:
    """A new random order of ``n`` images each epoch, drawn from ``generator`` as ``RandomSampler`` does;
    in epoch ``e`` the indices point into view ``(e - first) % views`` (offset ``n`` per view).

    ``set_epoch`` follows ``DistributedSampler``'s convention; the sampler runs in the main
    process, so loader worker processes need not know the epoch.
    """

    def __init__(self, n: int, views: int, generator: Any, first: int = 0) -> None:
        self.n, self.views, self.generator, self.first, self.epoch = n, views, generator, first, first

    def set_epoch(self, epoch: int) -> None:
        """Draw the next order's indices from the view of epoch ``epoch``."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Any:
        import torch

        offset = ((self.epoch - self.first) % self.views) * self.n
        return iter((torch.randperm(self.n, generator=self.generator) + offset).tolist())


class EpochLoader:
    """A ``DataLoader`` over an :class:`EpochSampler`, with ``set_epoch`` and the shuffle ``generator``.

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

        from tlengine._train import loader

        self.sampler = EpochSampler(n, views, torch.Generator().manual_seed(seed), first)
        self.inner = loader(dataset, batch_size, False, device, sampler=self.sampler, drop_last=n > batch_size)

    @property
    def generator(self) -> Any:
        """The shuffle generator (``fit`` saves and restores it to resume an epoch's order)."""
        return self.sampler.generator

    @generator.setter
    def generator(self, generator: Any) -> None:
        self.sampler.generator = generator

    def set_epoch(self, epoch: int) -> None:
        """Called by ``fit`` before each epoch."""
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self) -> Any:
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

    def __iter__(self) -> Any:
        epoch = self.sampler.epoch
        for x, index, y in self.inner:
            x = augment_batch(x.to(self.device, non_blocking=True), index.tolist(), self.augment, self.seed, epoch)
            yield normalize(x, self.preprocess), y


def train_square(preprocess: Preprocess) -> Preprocess:
    """The training layout: the centre square at the resize side, on which augmentation runs."""
    side = preprocess.resize
    return Preprocess(side, side, preprocess.interpolation, preprocess.mean, preprocess.std)


def image_train_loader(split: Any, task: str, preprocess: Preprocess, augment: tuple[int, float], batch_size: int, device: str,
                       *, shuffle_seed: int, augment_seed: int, pixels: Any = None) -> AugmentLoader:
    """Augmented training batches of ``split``: from decoded ``pixels`` (the training layout) when given,
    else decoding every image each epoch. Both give the same batches."""
    targets = _target_tensor(split.targets, task)
    dataset = _uint8_dataset(pixels, targets) if pixels is not None else _decoding_dataset(split.images, train_square(preprocess), targets)
    return AugmentLoader(dataset, batch_size, device, shuffle_seed, tensor_augment(preprocess, *augment), preprocess, augment_seed)


def _target_tensor(targets: Sequence[Any], task: str) -> Any:
    import torch

    return torch.tensor(list(targets), dtype=torch.long if task == "classification" else torch.float32)


def _uint8_dataset(pixels: Any, targets: Any) -> Any:
    """A ``Dataset`` of ``(uint8 (3, H, W) tensor, index, target)`` read from a memory-mapped ``(N, H, W, 3)`` array."""
    import numpy as np
    import torch

    class Pixels(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(pixels)

        def __getitem__(self, index: int) -> tuple[Any, Any, Any]:
            return torch.from_numpy(np.array(pixels[index])).permute(2, 0, 1), index, targets[index]

    return Pixels()


def _decoding_dataset(items: Sequence[Any], square: Preprocess, targets: Any) -> Any:
    """Like :func:`_uint8_dataset`, decoding and cropping each image when it is read (no cache)."""
    import torch

    class Decoding(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(items)

        def __getitem__(self, index: int) -> tuple[Any, Any, Any]:
            return torch.from_numpy(square.pixels(items[index]).copy()).permute(2, 0, 1), index, targets[index]

    return Decoding()


def _feature_dataset(views: list[Any], targets: Any) -> Any:
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

    def joint_prefix(self, root: Any, splits: Sequence[PrefixSplit]) -> Any:
        """One evaluation-mode module returning the cut outputs of every split in ``splits`` (a tuple, in
        order) from one pass: the same nodes of the same traced graph, so the same values each prefix gives."""
        import torch

        graph = copy.deepcopy(self._graphs[1])
        nodes = {n.name: n for n in graph.nodes}
        output = next(n for n in graph.nodes if n.op == "output")
        output.args = (tuple(nodes[split.cut] for split in splits),)
        graph.owning_module = root
        graph.eliminate_dead_code()
        graph.owning_module = None
        return torch.fx.GraphModule(root, graph, class_name="FrozenPrefixes").eval()

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
        cut: The graph node the features come from (``None`` on images).
    """

    model: Any
    train_loader: Any
    val_loader: Any
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

        side = preprocess.input_size if layout == "eval" else preprocess.resize
        crop = preprocess if layout == "eval" else train_square(preprocess)
        key = digest("images", FORMAT, self._images_digest(name), layout, side, preprocess.resize, preprocess.interpolation, PIL.__version__)
        items = self._split(name).images

        return self.store.get_or_make("images", key, (len(items), side, side, 3), "uint8", lambda out: decode_into(out, items, crop))

    def _weights_digest(self) -> str:
        if self._weights is None:
            self._weights = state_digest(self.base.state_dict())
        return self._weights

    def _feature_key(self, split: PrefixSplit, name: str, preprocess: Preprocess, view: int | None, augment: tuple[int, float],
                     seed: int) -> str:
        import timm
        import torch

        from tlengine._train import amp_dtype

        return digest("features", FORMAT, self.backbone_id, self._weights_digest(), split.depth, split.cut, preprocess.to_dict(),
                      self._images_digest(name), view, None if view is None else (augment, seed), str(amp_dtype(self.device)),
                      FEATURE_DTYPE, torch.__version__, timm.__version__)

    def features(self, split: PrefixSplit, name: str, preprocess: Preprocess, view: int | None, augment: tuple[int, float],
                 seed: int = 0) -> Any:
        """fp16 prefix outputs of every image of split ``name``: the evaluation crop (``view`` ``None``) or
        augmented view ``view`` (what an uncached epoch ``view`` feeds the prefix); ``None`` when they cannot be cached.

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
        augmenter = None if view is None else tensor_augment(preprocess, *augment)
        # decoded first, so that the room left for the extras counts them
        pixels = None if self.store.path("features", key).is_file() else self.pixels(name, preprocess, "eval" if view is None else "train")

        def fill(out: Any, extras: dict[str, Any] | None = None) -> None:
            nonlocal pixels
            extras = {} if extras is None else extras
            if pixels is None:  # deleted after the check above
                pixels = self.pixels(name, preprocess, "eval" if view is None else "train")
            if pixels is None:
                raise _Uncached("the decoded images do not fit under the cap")
            base = self.base.to(self.device, memory_format=torch.channels_last)
            targets = [(key, out, split), *((k, a, shallower[k]) for k, a in extras.items())]
            prefix = self.splitter.joint_prefix(base, [t[2] for t in targets]) if extras else split.prefix(base).eval()
            try:
                with torch.inference_mode(), torch.autocast(self.device.split(":")[0], dtype=dtype, enabled=dtype is not None):
                    for start in range(0, n, _BATCH):
                        x = torch.from_numpy(np.array(pixels[start:start + _BATCH])).permute(0, 3, 1, 2).to(self.device)
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
            array = self.store.get_or_make("features", key, (n, *split.feature_shape), FEATURE_DTYPE, fill, extras)
        except _Uncached as exc:
            self.say_once(f"caches: features after {split.depth} stages: {exc}; such trials run on images")
            return None
        if array is None:
            self.say_once(f"caches: features after {split.depth} stages do not fit under --cache-size-gb {self.options.size_gb:g}; "
                          "such trials run on images")
        return array

    def prepare(self, model: Any, backbone: Any, *, depth: int, preprocess: Preprocess, augment: tuple[int, float],
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
        from tlengine._train import loader

        self.trials += count
        task = self.data.task
        val_targets = _target_tensor(self.data.val.targets, task)
        split = None
        if depth > 0 and not mixup:
            split = self.splitter.split(depth, preprocess.input_size)
            if split is None:
                reason = self.splitter.reasons.get(depth, "")
                self.say_once(f"caches: cannot split {self.backbone_id} after {depth} stages ({reason}); such trials run on images")
        elif depth > 0:
            self.say_once("caches: trials with mixup or cutmix run on images (they mix images, not features)")
        if split is not None:
            val = self.features(split, "val", preprocess, None, augment)
            served = max(1, epochs - first_epoch)
            views = []
            for v in range(min(self.options.views or served, served) if val is not None else 0):
                views.append(self.features(split, "train", preprocess, first_epoch + v, augment, augment_seed))
                if views[-1] is None:  # said why; no use computing the other views
                    break
            if val is not None and views and all(v is not None for v in views):
                import numpy as np
                import torch

                val_key = (split.depth, split.cut, preprocess)
                if self._val_features is None or self._val_features[0] != val_key:  # keep one: features can be large
                    dataset = torch.utils.data.TensorDataset(torch.from_numpy(np.array(val, dtype=np.float32)), val_targets)
                    self._val_features = (val_key, loader(dataset, 64, False, self.device))
                self.trials_on_features += count
                train_targets = _target_tensor(self.data.train.targets, task)
                train = EpochLoader(_feature_dataset(views, train_targets), len(train_targets), len(views), batch_size, self.device,
                                    shuffle_seed, first_epoch)
                return Prepared(cached_model(split.suffix(backbone), model), train, self._val_features[1], True, split.cut)
        eval_pixels, train_pixels = self.pixels("val", preprocess, "eval"), self.pixels("train", preprocess, "train")
        if eval_pixels is None or train_pixels is None:
            self.say_once(f"caches: the decoded images do not fit under --cache-size-gb {self.options.size_gb:g}; decoding every epoch")
            return None
        if preprocess not in self._val_images:
            import torch

            images = normalize(torch.from_numpy(eval_pixels.copy()).permute(0, 3, 1, 2), preprocess)
            self._val_images[preprocess] = loader(torch.utils.data.TensorDataset(images, val_targets), 64, False, self.device)
        train = image_train_loader(self.data.train, task, preprocess, augment, batch_size, self.device, shuffle_seed=shuffle_seed,
                                   augment_seed=augment_seed, pixels=train_pixels)
        return Prepared(model, train, self._val_images[preprocess], False)

    def summary(self) -> str:
        """One line: hits and misses, trials on cached features, the folder and its size."""
        hits, misses = self.store.hits, self.store.misses
        parts = [f"{kind} {hits.get(kind, 0)} hit{'s' if hits.get(kind, 0) != 1 else ''}, {misses.get(kind, 0)} computed"
                 for kind in ("images", "features")]
        if self.store.made_extra.get("features"):
            parts[-1] += f" (+{self.store.made_extra['features']} for fewer frozen stages on the way)"
        return (f"caches: {'; '.join(parts)}; {self.trials_on_features} of {self.trials} trials on cached features; "
                f"{self.store.root} ({self.store.size_bytes() / 1e6:.0f} MB)")


class _Uncached(Exception):
    """Features that cannot be cached (decoded images over the cap, outputs beyond fp16)."""
