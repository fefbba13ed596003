"""The trained model: a backbone, a head, and the output's meaning."""

from __future__ import annotations

from typing import Any


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
