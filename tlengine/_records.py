"""Small frozen records: what plugins register, and what datasets return."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

Task = Literal["classification", "regression"]


@dataclass(frozen=True)
class Backbone:
    """A backbone registered through ``register_backbones``.

    Attributes:
        name: The name users pass to ``--backbone`` (``NAME`` or ``NAME:ARCH``).
        factory: ``factory(arch, weights) -> torch.nn.Module``. ``arch`` is the part after
            the colon (``None`` when absent); ``weights`` is ``"auto"``, ``"hub"``,
            ``"none"``, a file path or ``"pkg:DISTRIBUTION"``. The module maps an image
            batch to pooled features of shape ``(batch, width)`` (``width``: the module's
            ``head_hidden_size`` where it has one, else ``num_features``), and offers
            timm's ``group_matcher(coarse=True)`` (its stages) and ``pretrained_cfg``
            (mean, std, interpolation, crop_pct, input_size).
        description: One line for ``tlengine plugins``.
        architectures: Optional callable listing the architectures ``arch`` may name;
            a bare ``--backbone ARCH`` resolves to the backbone that lists it.
        default_arch: The architecture used when ``--backbone NAME`` names none.
    """

    name: str
    factory: Callable[[str | None, str], Any]
    description: str
    architectures: Callable[[], Iterable[str]] | None = None
    default_arch: str | None = None


@dataclass(frozen=True)
class Head:
    """A head registered through ``register_heads``.

    Attributes:
        name: The name users pass to ``--head``.
        factory: ``factory(in_features, num_outputs, task, **params) -> torch.nn.Module``
            mapping ``(batch, in_features)`` to ``(batch, num_outputs)`` logits or
            regression outputs.
        description: One line for ``tlengine plugins``.
        params: Tunable keyword arguments of ``factory`` and their default specs
            (a fixed value, a list, or a ``{low, high}`` range, as in the TOML
            config); each becomes the search dimension ``NAME.PARAM``.
    """

    name: str
    factory: Callable[..., Any]
    description: str
    params: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DatasetOptions:
    """What the user asked of a dataset.

    Attributes:
        task: ``"classification"``, ``"regression"`` or ``None`` (the dataset decides).
        val_fraction: Fraction held out for validation when the data has no split.
        seed: Seed for any random split.
        confine_paths: Refuse image paths (e.g. in a CSV) that lead outside the data's folder.
        image_column: The CSV column holding image paths (``None``: found by name).
        target_column: The CSV column holding labels or numeric targets (``None``: found by name,
            or the only other column).
    """

    task: Task | None = None
    val_fraction: float = 0.2
    seed: int = 0
    confine_paths: bool = False
    image_column: str | None = None
    target_column: str | None = None


@dataclass(frozen=True)
class Split:
    """One split of a dataset.

    Attributes:
        images: Image file paths, PIL images, or uint8 numpy arrays (H, W) or (H, W, C).
        targets: Class indices (classification) or floats (regression), one per image.
    """

    images: Sequence[Any]
    targets: Sequence[Any]

    def __len__(self) -> int:
        return len(self.images)


@dataclass(frozen=True)
class ImageData:
    """What a dataset factory returns.

    Attributes:
        train: The training split.
        val: The validation split.
        task: ``"classification"`` or ``"regression"``.
        classes: Class names, indexed by target (empty for regression).
        name: A short name, used for the default study name.
    """

    train: Split
    val: Split
    task: Task
    classes: tuple[str, ...] = ()
    name: str = "data"


@dataclass(frozen=True)
class Dataset:
    """A dataset registered through ``register_datasets``.

    Attributes:
        name: The name users pass to ``--dataset``.
        factory: ``factory(path, options) -> ImageData``; ``path`` is ``--data`` (or ``None``).
        description: One line for ``tlengine plugins``.
        matches: Optional predicate on ``--data``; ``--dataset auto`` picks the first
            dataset whose predicate accepts the path.
        suggested: Search defaults this dataset suggests (keys ``image_size``, ``epochs``,
            ``trials``), used where the user set none.
    """

    name: str
    factory: Callable[[str | None, DatasetOptions], ImageData]
    description: str
    matches: Callable[[str | None], bool] | None = None
    suggested: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Optimizer:
    """An optimizer registered through ``register_optimizers``.

    Attributes:
        name: The name users pass to ``--optimizer``.
        factory: ``factory(params, lr, weight_decay, **params) -> torch.optim.Optimizer``.
            ``params`` is a module or, as tlengine passes it, a list of parameter
            groups (dicts with ``params``, ``weight_decay`` and an ``lr_scale`` that
            timm's schedulers apply), holding only trainable parameters.
        description: One line for ``tlengine plugins``.
        lr_range: The learning-rate range searched (log scale) for this optimizer.
        default_lr: The learning rate of the opening recipes.
        params: Tunable keyword arguments of ``factory`` and their default specs
            (e.g. ``{"momentum": {"low": 0.8, "high": 0.99}}``); each becomes the
            search dimension ``NAME.PARAM``.
    """

    name: str
    factory: Callable[..., Any]
    description: str
    lr_range: tuple[float, float] = (1e-5, 1e-2)
    default_lr: float = 1e-3
    params: Mapping[str, Any] = field(default_factory=dict)
