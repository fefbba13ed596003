"""Freeze depth over a backbone's stages, taken from timm's own metadata.

The stages of a backbone are the coarse parameter groups of its
``group_matcher(coarse=True)`` (for a resnet: stem, layer1..layer4; for an
efficientnet: stem, blocks.0..blocks.6 with the final conv). Freeze depth ``k``
freezes the first ``k`` stages: ``0`` is full fine-tuning, ``len(stages)`` a linear probe.
"""

from __future__ import annotations

from typing import Any


def backbone_stages(backbone: Any) -> list[list[str]]:
    """Return the parameter names of each stage of ``backbone``, first stage first.

    Uses timm's ``group_parameters`` over ``backbone.group_matcher(coarse=True)``;
    a module without a group matcher is one single stage.

    Args:
        backbone: A timm model (or any module offering ``group_matcher``).
    """
    names = [n for n, _ in backbone.named_parameters()]
    matcher = getattr(backbone, "group_matcher", None)
    if matcher is None:
        return [names] if names else []
    from timm.models import group_parameters

    groups = group_parameters(backbone, matcher(coarse=True))
    return [list(groups[k]) for k in sorted(groups) if groups[k]]


def freeze_stages(backbone: Any, depth: int) -> int:
    """Freeze the first ``depth`` stages of ``backbone``; return the number of frozen tensors.

    Args:
        backbone: The backbone module.
        depth: How many leading stages to freeze, ``0..len(backbone_stages(backbone))``.

    Raises:
        ValueError: ``depth`` is outside that range.
    """
    stages = backbone_stages(backbone)
    if not 0 <= depth <= len(stages):
        raise ValueError(f"freeze depth {depth} outside 0..{len(stages)}")
    frozen = {name for stage in stages[:depth] for name in stage}
    for name, param in backbone.named_parameters():
        param.requires_grad_(name not in frozen)
    return len(frozen)


def train_mode(model: Any) -> None:
    """Put ``model`` in training mode, keeping frozen BatchNorm layers in eval mode.

    A BatchNorm layer counts as frozen when none of its parameters requires a
    gradient; in eval mode its running statistics stay exactly as loaded.
    """
    from torch.nn.modules.batchnorm import _BatchNorm

    model.train()
    for module in model.modules():
        if isinstance(module, _BatchNorm):
            params = list(module.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                module.eval()
