"""The search space: its dimensions and defaults, the TOML config, and CLI overrides.

A dimension's spec is written as in the TOML config:

- a scalar (``0.05``, ``"mlp"``, ``3``): the value is fixed;
- a list (``["linear", "mlp"]``): Optuna chooses among the values;
- a table (``{low = 1e-5, high = 1e-2, log = true}``, optional ``step``): a range,
  of integers when the dimension is an integer one;
- ``"search"``: the dimension's default range (``freeze_depth``: every depth;
  ``lr``: the optimizer's range; ``head``/``optimizer``: every registered one).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tlengine._errors import UserError, did_you_mean
from tlengine._loaders import POLICIES

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

#: Built-in dimensions: (default spec, integer?, one-line meaning). Documented in docs/search-space.md.
DIMENSIONS: dict[str, tuple[Any, bool, str]] = {
    "freeze_depth": ("search", True, "leading backbone stages kept frozen: 0 = full fine-tune, all = linear probe"),
    "lr": ("search", False, "peak learning rate of the head (log scale; default range from the optimizer)"),
    "layer_decay": ({"low": 0.5, "high": 1.0}, False, "timm layer-wise LR decay: earlier layers get lr * decay^distance"),
    "label_smoothing": ({"low": 0.0, "high": 0.2}, False, "label smoothing of the classification loss"),
    "weight_decay": (0.01, False, "weight decay (not on biases and norms)"),
    "batch_size": (32, True, "training batch size"),
    "image_size": ("auto", True, "input side in pixels (default: [search] image_size, the dataset's suggestion, or the backbone's)"),
    "head": ("linear", False, "head plugin"),
    "optimizer": ("adamw", False, "optimizer plugin"),
    "warmup": (0.1, False, "fraction of the training steps spent in linear warmup before the cosine decay"),
    "head_epochs": (0, True, "epochs that train only the head before the chosen stages are unfrozen"),
    "augment": ("search", False, "training augmentation policy: none, flip, crop (random resized crop + flip), randaugment (crop + flip + RandAugment)"),
    "crop_scale": ({"low": 0.25, "high": 1.0}, False, "smallest area fraction of the random resized crop (policies crop and randaugment)"),
    "randaugment": (9, True, "RandAugment magnitude on timm's 0..10 scale (2 operations) of the randaugment policy; 0 = no such policy"),
    "hflip": (0.5, False, "probability of a random horizontal flip (0 where flipping changes the label; 0 = no flip policy)"),
    "mixup": (0.0, False, "mixup alpha (timm Mixup), 0 = off; classification only"),
    "cutmix": (0.0, False, "cutmix alpha (timm Mixup), 0 = off; classification only"),
    "head_init": ("random", False, "how a fine-tuned trial's linear head starts: random = timm's init, probe = the exact linear probe's solution (LP-FT)"),
    "probe": ("exact", False, "a linear probe (every stage frozen, linear head): exact = solved on the frozen features, sgd = trained by epochs"),
}
#: Names people use for these dimensions elsewhere, for "did you mean" hints.
ALIASES = {"learning_rate": "lr", "wd": "weight_decay", "freeze": "freeze_depth", "smoothing": "label_smoothing",
           "bs": "batch_size", "lr_decay": "layer_decay", "layer_lr_decay": "layer_decay", "rand_augment": "randaugment",
           "mixup_alpha": "mixup", "cutmix_alpha": "cutmix", "warmup_epochs": "warmup"}
SEARCH_KEYS = {"trials", "epochs", "image_size", "timeout", "sampler", "pruner", "metric", "objectives", "class_weights", "eval_crop", "rank"}


@dataclass(frozen=True)
class Dimension:
    """One dimension of the search space.

    Attributes:
        name: The parameter's name in the study (``lr``, ``sgd.momentum``, ...).
        kind: ``"fixed"``, ``"int"``, ``"float"`` or ``"categorical"``.
        value: The fixed value (kind ``"fixed"``).
        low: Range start (int and float kinds).
        high: Range end.
        log: Sample on a log scale.
        step: Discretisation step, or ``None``.
        choices: The values of a categorical dimension.
        source: ``"default"``, ``"config"`` or ``"cli"``: where the spec came from.
    """

    name: str
    kind: str
    value: Any = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()
    source: str = "default"

    @property
    def searched(self) -> bool:
        """Whether Optuna chooses this dimension's value."""
        return self.kind != "fixed"

    def suggest(self, trial: Any) -> Any:
        """The value for ``trial``: fixed, or suggested through Optuna."""
        if self.kind == "fixed":
            return self.value
        if self.kind == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, step=self.step, log=self.log)

    def grid(self) -> list[Any]:
        """Every value, for the grid sampler.

        Raises:
            UserError: A continuous range without a step.
        """
        if self.kind == "categorical":
            return list(self.choices)
        if self.kind == "int":
            return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))
        if self.step is None:
            raise UserError(f"--sampler grid: dimension {self.name} is a continuous range; fix it, list its values or give it a step")
        count = int(round((self.high - self.low) / self.step))
        return [round(self.low + i * self.step, 12) for i in range(count + 1)]

    def contains(self, value: Any) -> bool:
        """Whether ``value`` lies in this dimension (for enqueued recipes)."""
        if self.kind == "fixed":
            return value == self.value
        if self.kind == "categorical":
            return value in self.choices
        return self.low <= value <= self.high

    def describe(self) -> str:
        """A short text: ``0.05``, ``[linear, mlp]``, ``1e-05..0.01 log``."""
        if self.kind == "fixed":
            return repr(self.value) if isinstance(self.value, str) else f"{self.value:g}" if isinstance(self.value, float) else str(self.value)
        if self.kind == "categorical":
            return "[" + ", ".join(str(c) for c in self.choices) + "]"
        return f"{self.low:g}..{self.high:g}" + (" log" if self.log else "") + (f" step {self.step:g}" if self.step else "")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (without ``source``), to store in the study."""
        return {"kind": self.kind, "value": self.value, "low": self.low, "high": self.high, "log": self.log,
                "step": self.step, "choices": list(self.choices)}


def parse_dimension(name: str, spec: Any, integer: bool, source: str, where: str) -> Dimension:
    """Turn a TOML-style spec into a :class:`Dimension`.

    Raises:
        UserError: The spec is malformed; the message names ``where`` it came from.
    """
    if isinstance(spec, (bool, int, float, str)) and not (isinstance(spec, str) and spec == "search"):
        if isinstance(spec, float) and not math.isfinite(spec):
            raise UserError(f"{where}: {name} = {spec} is not a finite number")
        if integer and isinstance(spec, float) and spec != int(spec):
            raise UserError(f"{where}: {name} must be a whole number, not {spec}")
        return Dimension(name, "fixed", value=int(spec) if integer and not isinstance(spec, (bool, str)) else spec, source=source)
    if isinstance(spec, list):
        if not spec or not all(isinstance(v, (bool, int, float, str)) for v in spec):
            raise UserError(f"{where}: {name} must list one or more plain values, got {spec!r}")
        if len(set(map(repr, spec))) != len(spec):
            raise UserError(f"{where}: {name} lists a value twice")
        return Dimension(name, "categorical", choices=tuple(spec), source=source)
    if isinstance(spec, Mapping):
        unknown_keys = set(spec) - {"low", "high", "log", "step"}
        if unknown_keys or "low" not in spec or "high" not in spec:
            raise UserError(f"{where}: {name} range needs low and high (and optionally log, step), got keys {sorted(spec)}")
        low, high, log, step = spec["low"], spec["high"], spec.get("log", False), spec.get("step")
        numbers = [v for v in (low, high, step) if v is not None]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in numbers) or not isinstance(log, bool):
            raise UserError(f"{where}: {name} range needs numbers for low, high, step and true/false for log")
        if not low < high:
            raise UserError(f"{where}: {name} range needs low < high, got {low} and {high}")
        if log and low <= 0:
            raise UserError(f"{where}: {name} log range needs low > 0")
        if step is not None and (step <= 0 or log):
            raise UserError(f"{where}: {name} step must be positive and cannot be combined with log")
        kind = "int" if integer else "float"
        if integer and not all(float(v).is_integer() for v in numbers):
            raise UserError(f"{where}: {name} is a whole-number dimension; low, high and step must be whole numbers")
        return Dimension(name, kind, low=low, high=high, log=log, step=step, source=source)
    raise UserError(f"{where}: {name} must be a value, a list of values or a {{low, high}} table, not {spec!r}")


def read_config(path: str | None) -> dict[str, Any]:
    """Read ``--config`` (TOML): tables ``[search]`` and ``[space]``.

    Raises:
        UserError: Missing file, malformed TOML, or unknown tables/keys in ``[search]``.
    """
    if path is None:
        return {"search": {}, "space": {}}
    file = Path(path)
    if not file.is_file():
        raise UserError(f"--config {path}: no such file")
    try:
        config = tomllib.loads(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"--config {path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"--config {path}: not valid TOML ({exc})") from None
    extra = set(config) - {"search", "space"}
    if extra:
        key = sorted(extra)[0]
        raise UserError(f"--config {path}: unknown table or key {key!r}{did_you_mean(key, ['search', 'space'])}; expected [search] and [space]")
    search, space = config.get("search", {}), config.get("space", {})
    if not isinstance(search, dict) or not isinstance(space, dict):
        raise UserError(f"--config {path}: [search] and [space] must be tables")
    for key in search:
        if key not in SEARCH_KEYS:
            raise UserError(f"--config {path}: unknown key {key!r} in [search]{did_you_mean(key, SEARCH_KEYS)}; known: {', '.join(sorted(SEARCH_KEYS))}")
    return {"search": search, "space": space}


def parse_override(text: str) -> tuple[str, Any]:
    """Parse ``--param NAME=VALUE`` with VALUE in TOML syntax (``lr={low=1e-4,high=1e-2,log=true}``).

    Raises:
        UserError: No ``=`` or a VALUE that is not TOML.
    """
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise UserError(f"--param {text}: expected NAME=VALUE, e.g. --param lr=3e-4 or --param 'head=[\"linear\",\"mlp\"]'")
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value  # a bare word: a string value
    return name.strip(), parsed


def build_space(
    config_space: Mapping[str, Any],
    overrides: Mapping[str, Any],
    plugin_params: Mapping[str, Mapping[str, Any]],
    *,
    n_stages: int,
    lr_ranges: Mapping[str, tuple[float, float]],
    heads: list[str],
    task: str,
    where: str,
    image_size: int = 224,
    extra: Mapping[str, tuple[Any, bool, str]] | None = None,
) -> dict[str, Dimension]:
    """Assemble the search space: built-in defaults, then the config, then the CLI.

    Args:
        config_space: The ``[space]`` table (may nest plugin tables, e.g. ``[space.sgd]``).
        overrides: ``(spec, option)`` from ``--param`` and dedicated flags (``--head``, ...), by name.
        plugin_params: Tunable parameters declared by head and optimizer plugins, by plugin name.
        n_stages: The backbone's stage count (range of ``freeze_depth``).
        lr_ranges: Each registered optimizer's learning-rate range, by name.
        heads: Registered head names.
        task: ``classification`` or ``regression`` (regression fixes the classification-only dimensions at 0).
        where: ``--config PATH`` for messages.
        image_size: The default input size (fixed unless the config or CLI searches it).
        extra: More dimensions, or other defaults of built-in ones, as in :data:`DIMENSIONS` (a distillation
            study's ``distill_alpha`` and ``distill_temperature``, and its ``probe``).

    Raises:
        UserError: Unknown keys (with close matches) or malformed specs.
    """
    dimensions = {**DIMENSIONS, **(extra or {})}
    flat: dict[str, tuple[Any, str]] = {name: (spec, "default") for name, (spec, _, _) in dimensions.items()}
    flat["image_size"] = (image_size, "default")
    for plugin, params in plugin_params.items():
        for param, spec in params.items():
            flat[f"{plugin}.{param}"] = (spec, "default")
    known = sorted(flat)
    for name, spec in config_space.items():
        if isinstance(spec, Mapping) and name in plugin_params:
            for param, inner in spec.items():
                key = f"{name}.{param}"
                if key not in flat:
                    raise UserError(f"{where}: unknown parameter {param!r} of {name} in [space.{name}]{did_you_mean(key, known)}")
                flat[key] = (inner, "config")
            continue
        if name not in flat:
            raise UserError(f"{where}: unknown key {name!r} in [space]{_hint(name, known)}; see docs/search-space.md")
        flat[name] = (spec, "config")
    options: dict[str, str] = {}
    for name, (spec, option) in overrides.items():
        if name not in flat:
            raise UserError(f"{option}: unknown parameter {name!r}{_hint(name, known)}; see docs/search-space.md")
        flat[name] = (spec, "cli")
        options[name] = option
    if task == "regression":
        _classification_only_at_zero(flat, where, overrides)
    space: dict[str, Dimension] = {}
    # lr after optimizer, the policy after the dimensions that can rule policies out
    for name, (spec, source) in sorted(flat.items(), key=lambda item: (item[0] == "lr", item[0] == "augment")):
        integer = dimensions[name][1] if name in dimensions else _is_integer_spec(spec)
        origin = where if source == "config" else options.get(name, "--param") if source == "cli" else "default"
        if spec == "search":
            space[name] = _default_range(name, source, origin, space, n_stages, lr_ranges, heads)
        else:
            space[name] = parse_dimension(name, spec, integer, source, origin)
    _check_values(space, n_stages, heads, list(lr_ranges), where, options)
    return dict(sorted(space.items(), key=lambda item: list(flat).index(item[0])))


def _classification_only_at_zero(flat: dict[str, tuple[Any, str]], where: str, overrides: Mapping[str, Any]) -> None:
    """For regression: the classification-only dimensions at 0 by default, and refused where the user set them."""
    for name in ("label_smoothing", "mixup", "cutmix"):
        spec, source = flat[name]
        if source == "default":
            flat[name] = (0.0, "default")
        elif spec not in (0, 0.0):
            origin = where if source == "config" else dict(overrides).get(name, (None, "--param"))[1]
            raise UserError(f"{origin}: {name} applies to classification only; remove it for regression")


def _default_range(name: str, source: str, origin: str, space: Mapping[str, Dimension], n_stages: int,
                   lr_ranges: Mapping[str, tuple[float, float]], heads: list[str]) -> Dimension:
    """What ``"search"`` means for ``name``: every depth, the chosen optimizers' learning-rate range, or every plugin.

    Raises:
        UserError: ``name`` has no default range.
    """
    if name == "freeze_depth":
        return Dimension(name, "int", low=0, high=n_stages, source=source)
    if name == "lr":
        chosen = space["optimizer"]
        names = [chosen.value] if chosen.kind == "fixed" else list(chosen.choices)
        ranges = [lr_ranges[n] for n in names if n in lr_ranges] or list(lr_ranges.values())
        return Dimension(name, "float", low=min(r[0] for r in ranges), high=max(r[1] for r in ranges), log=True, source=source)
    if name in ("head", "optimizer"):
        return Dimension(name, "categorical", choices=tuple(heads if name == "head" else lr_ranges), source=source)
    if name == "augment":
        return policy_dimension(space, source)
    raise UserError(f"{origin}: {name} has no default range; give it a {{low, high}} table or a list")


def policy_dimension(space: Mapping[str, Dimension], source: str = "default") -> Dimension:
    """The ``augment`` dimension's default: every policy except those its parameters rule out
    (``hflip`` fixed at 0: no ``flip``; ``randaugment`` fixed at 0: no ``randaugment``)."""
    def off(name: str) -> bool:
        return space[name].kind == "fixed" and not space[name].value

    choices = tuple(p for p in POLICIES if not (p == "flip" and off("hflip") or p == "randaugment" and off("randaugment")))
    return Dimension("augment", "categorical", choices=choices, source=source)


def depth_dimension(dim: Dimension, spec: str, stages: int) -> Dimension:
    """``freeze_depth`` for a trial on backbone ``spec`` of ``stages`` stages, in a search over several backbones:
    its own Optuna parameter (``freeze_depth[SPEC]``, sampled after the backbone, define-by-run), every depth of
    that backbone by default, a range or list the user gave cut at its stage count."""
    import dataclasses

    name = f"freeze_depth[{spec}]"
    if dim.kind == "fixed":
        return dataclasses.replace(dim, name=name)
    if dim.kind == "categorical":
        return dataclasses.replace(dim, name=name, choices=tuple(c for c in dim.choices if c <= stages) or (stages,))
    high = stages if dim.source == "default" else min(int(dim.high), stages)
    low = min(int(dim.low), high)
    return dataclasses.replace(dim, name=name, low=low, high=high) if low < high else Dimension(name, "fixed", value=high, source=dim.source)


def light_policy(space: Mapping[str, Dimension]) -> str:
    """The policy that cannot hurt: ``flip`` where flips may be on, else ``none``."""
    flips = space["hflip"].searched or bool(space["hflip"].value)
    return "flip" if flips and (not space["augment"].searched or space["augment"].contains("flip")) else "none"


def for_grid(space: Mapping[str, Dimension]) -> dict[str, Dimension]:
    """``space`` for ``--sampler grid``: the default policy fixed at the light one, so that the grid sweeps what
    the user asked for (a policy searched by default would multiply it by four and bring a continuous
    ``crop_scale``), and the dimensions that policy does not use fixed where they are default ranges."""
    out = dict(space)
    if out["augment"].source == "default" and out["augment"].searched:
        out["augment"] = Dimension("augment", "fixed", value=light_policy(out), source="default")
    policy = {"augment": out["augment"].value} if out["augment"].kind == "fixed" else {}
    if policy and not active(policy, "crop_scale") and out["crop_scale"].searched and out["crop_scale"].source == "default":
        out["crop_scale"] = Dimension("crop_scale", "fixed", value=0.5, source="default")
    return out


def active(values: Mapping[str, Any], name: str) -> bool:
    """Whether dimension ``name`` is used by a trial whose policy is ``values["augment"]`` (the others are not sampled)."""
    policy = values.get("augment")
    if name == "crop_scale":
        return policy in ("crop", "randaugment")
    if name == "hflip":
        return policy != "none"
    if name == "randaugment":
        return policy == "randaugment"
    return True


def _hint(name: str, known: list[str]) -> str:
    if name in ALIASES:
        return f" (did you mean {ALIASES[name]!r}?)"
    return did_you_mean(name, known)


def _is_integer_spec(spec: Any) -> bool:
    values = [spec] if not isinstance(spec, (list, Mapping)) else list(spec) if isinstance(spec, list) else [spec.get("low"), spec.get("high")]
    return all(isinstance(v, int) and not isinstance(v, bool) for v in values)


def _check_values(
    space: dict[str, Dimension], n_stages: int, heads: list[str], optimizers: list[str], where: str, options: Mapping[str, str]
) -> None:
    def values(dim: Dimension) -> list[Any]:
        return [dim.value] if dim.kind == "fixed" else list(dim.choices) if dim.kind == "categorical" else [dim.low, dim.high]

    checks = {
        "freeze_depth": (lambda v: isinstance(v, int) and 0 <= v <= n_stages, f"between 0 and {n_stages} (the backbone's stages)"),
        "lr": (lambda v: isinstance(v, (int, float)) and v > 0, "positive"),
        "layer_decay": (lambda v: isinstance(v, (int, float)) and 0 < v <= 1, "in (0, 1]"),
        "label_smoothing": (lambda v: isinstance(v, (int, float)) and 0 <= v < 1, "in [0, 1)"),
        "weight_decay": (lambda v: isinstance(v, (int, float)) and v >= 0, "zero or positive"),
        "batch_size": (lambda v: isinstance(v, int) and v >= 1, "a positive integer"),
        "image_size": (lambda v: isinstance(v, int) and 8 <= v <= 4096, "a side in pixels, 8..4096"),
        "warmup": (lambda v: isinstance(v, (int, float)) and 0 <= v < 1, "a fraction in [0, 1)"),
        "head_epochs": (lambda v: isinstance(v, int) and v >= 0, "zero or a positive integer"),
        "randaugment": (lambda v: isinstance(v, int) and 0 <= v <= 30, "an integer magnitude 0..30"),
        "hflip": (lambda v: isinstance(v, (int, float)) and 0 <= v <= 1, "a probability in [0, 1]"),
        "mixup": (lambda v: isinstance(v, (int, float)) and v >= 0, "zero or positive"),
        "cutmix": (lambda v: isinstance(v, (int, float)) and v >= 0, "zero or positive"),
        "probe": (lambda v: v in ("exact", "sgd"), "exact or sgd"),
        "head_init": (lambda v: v in ("probe", "random"), "probe or random"),
        "augment": (lambda v: v in POLICIES, f"a policy: {', '.join(POLICIES)}"),
        "crop_scale": (lambda v: isinstance(v, (int, float)) and 0.05 <= v <= 1, "an area fraction in [0.05, 1]"),
        "head": (lambda v: v in heads, f"a registered head ({', '.join(heads)})"),
        "optimizer": (lambda v: v in optimizers, f"a registered optimizer ({', '.join(optimizers)})"),
    }
    for name, (ok, expected) in checks.items():
        dim = space[name]
        for value in values(dim):
            if isinstance(value, bool) or not ok(value):
                option = options.get(name, "--param") if dim.source == "cli" else where if dim.source == "config" else "default"
                hint = did_you_mean(str(value), heads if name == "head" else optimizers) if name in ("head", "optimizer") else ""
                raise UserError(f"{option}: {name} = {value!r} must be {expected}{hint}")


def opening_recipes(space: dict[str, Any], n_stages: int, default_lr: float) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """The recipes a user would try by hand, as (name, enqueued params, overrides of default-fixed values).

    Linear probe; fine-tuning the top half (the leading half of the stages frozen) at three
    times the rate, since fewer trainable layers take a higher one; and full fine-tuning. The
    top half goes before the full fine-tune: it costs less per epoch (no gradients through the
    frozen half) and scored at least as well on two of ``benchmarks/peers.py``'s three datasets.
    All with a light augmentation policy that cannot hurt: flips where they keep the label,
    else none. The top half replaced "head first, then unfreeze" (one head epoch, then all
    stages with layer decay 0.7), which scored below full fine-tuning on every dataset of
    ``benchmarks/peers.py`` (fashion-mnist-2k 0.848 vs 0.904, digits 0.533 vs 0.957,
    rotation RMSE 24.3 vs 14.2); ``head_epochs`` remains for a user to set or search.
    """
    light = {"augment": light_policy(space)}
    recipes = [
        ("linear probe", {"freeze_depth": n_stages, "lr": default_lr * 10, "layer_decay": 1.0, "label_smoothing": 0.0, "head_epochs": 0}),
        ("top half", {"freeze_depth": n_stages // 2, "lr": default_lr * 3, "layer_decay": 1.0, "label_smoothing": 0.0,
                      "head_epochs": 0}),
        ("full fine-tune", {"freeze_depth": 0, "lr": default_lr, "layer_decay": 1.0, "label_smoothing": 0.0, "head_epochs": 0}),
    ]
    out = []
    for name, values in recipes:
        params, overrides = {}, {}
        for key, value in {**values, **light}.items():
            dim = space[key]
            if dim.searched:
                if dim.kind in ("int", "float"):
                    value = min(dim.high, max(dim.low, value))
                if dim.contains(value):
                    params[key] = value
            elif dim.source == "default":
                overrides[key] = value
        out.append((name, params, overrides))
    return out
