"""Splitting a backbone after its frozen stages: a prefix whose outputs can be cached and a trainable suffix.

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
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

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
