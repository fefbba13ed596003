"""The trained model: which backbone, a trial's model built from its values, and the output's meaning.

:func:`build_trial_model` is the one way a trial's model is made: by the trial runner
(from the search's base weights), and by export, report and the end of a search (from
the trial's checkpoint).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tlengine._errors import UserError, did_you_mean, unknown

if TYPE_CHECKING:
    import torch

    from tlengine._record import StudyRecord
    from tlengine._records import Backbone
    from tlengine.plugins import Registry


def resolve_backbone(registry: Registry, spec: str) -> tuple[Backbone, str | None]:
    """Resolve ``--backbone``: ``NAME``, ``NAME:ARCH``, or an ``ARCH`` some backbone lists.

    Raises:
        UserError: Nothing matches; close matches are suggested.
    """
    name, _, arch = spec.partition(":")
    if name in registry.backbones:
        record = registry.backbones[name]
        arch = arch or record.default_arch
        if arch and record.architectures is not None:
            known = list(record.architectures())
            if arch not in known:
                raise UserError(
                    f"--backbone: unknown {name} architecture {spec!r}{did_you_mean(arch, known)}; "
                    f"'tlengine plugins' lists the backbones"
                )
        return record, arch or None
    if not arch:
        archs: list[str] = []
        for record in registry.backbones.values():
            listed = list(record.architectures()) if record.architectures is not None else []
            if spec in listed:
                return record, spec
            archs.extend(listed)
        hint = did_you_mean(spec, list(registry.backbones) + archs)
        raise UserError(
            f"--backbone: unknown backbone {spec!r}{hint}; pass a backbone plugin "
            f"({', '.join(sorted(registry.backbones))}), NAME:ARCH, or an architecture one of them lists"
        )
    raise unknown("backbone", name, registry.backbones, "--backbone")


def build_trial_model(registry: Registry, record: StudyRecord, values: Mapping[str, Any], *,
                      backbone_state: Mapping[str, torch.Tensor] | None = None, checkpoint: Path | None = None) -> torch.nn.Module:
    """Build a trial's model: its backbone, frozen at the trial's depth, and the head its values name.

    Args:
        registry: The plugin registry.
        record: The study's record (backbone, task, classes, target statistics).
        values: Every value the trial used (``head``, ``freeze_depth`` and the head's parameters among them;
            ``backbone`` in a search over several).
        backbone_state: The search's base weights for the backbone (a new trial).
        checkpoint: The trial's ``.safetensors`` checkpoint (a finished trial), loaded into the whole model.

    Raises:
        UserError: The plugins that built it are not installed, or the checkpoint is missing.
    """
    from tlengine._stages import freeze_stages

    head_name = values["head"]
    record = record.for_values(values)
    if record.backbone not in registry.backbones or head_name not in registry.heads:
        raise UserError(f"the trial was made with backbone {record.backbone!r} and head {head_name!r}; install their plugins")
    if checkpoint is not None and not checkpoint.is_file():
        raise UserError(f"{checkpoint}: the trial's checkpoint is not on this machine; use it where the trial ran")
    backbone = registry.backbones[record.backbone].factory(record.arch, "none")
    if backbone_state is not None:
        backbone.load_state_dict(backbone_state)
    freeze_stages(backbone, values.get("freeze_depth", 0))
    head_record = registry.heads[head_name]
    head_kwargs = {p: values[f"{head_name}.{p}"] for p in head_record.params if f"{head_name}.{p}" in values}
    head = head_record.factory(feature_width(backbone), record.num_outputs, record.task, **head_kwargs)
    model = build_model(backbone, head, record.task, record.target_mean, record.target_std)
    if checkpoint is not None:
        from safetensors.torch import load_model

        load_model(model, str(checkpoint))
        model.eval()
    return model



def feature_width(backbone: Any) -> int:
    """The width of ``backbone``'s pooled features: what its head takes.

    timm's ``head_hidden_size`` where the module has one, since models with a
    convolution after the pooling (MobileNetV3 and V4, GhostNet) output that many
    features rather than ``num_features`` (the last feature map's channels);
    ``num_features`` otherwise.
    """
    width = getattr(backbone, "head_hidden_size", None)
    return int(width) if width else int(backbone.num_features)


def build_model(backbone: Any, head: Any, task: str, target_mean: float = 0.0, target_std: float = 1.0) -> Any:
    """Join ``backbone`` and ``head`` into one module.

    Its ``forward`` returns logits (classification) or standardised regression
    outputs; :func:`inference_model` wraps it into what is exported.

    Args:
        backbone: Maps images to pooled features.
        head: Maps features to outputs.
        task: ``"classification"`` or ``"regression"``.
        target_mean: Regression targets' training mean (kept as a buffer).
        target_std: Regression targets' training standard deviation (kept as a buffer).
    """
    import torch

    class TransferModel(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = backbone
            self.head = head
            self.task = task
            self.register_buffer("target_mean", torch.tensor(float(target_mean)))
            self.register_buffer("target_std", torch.tensor(float(target_std)))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.backbone(x))

    return TransferModel()


def inference_model(model: Any) -> Any:
    """Wrap a model from :func:`build_model` so it outputs what users read.

    Classification: class probabilities (softmax). Regression: predictions in the
    targets' own units.
    """
    import torch

    class InferenceModel(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.model(x).float()
            if self.model.task == "classification":
                return out.softmax(dim=-1)
            return out * self.model.target_std + self.model.target_mean

    return InferenceModel().eval()
