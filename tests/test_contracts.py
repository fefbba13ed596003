"""Every built-in backbone, head and optimizer passes the public contract tests."""

from __future__ import annotations

import pytest

from tlengine.testing import BackboneContract, HeadContract, OptimizerContract


@pytest.mark.parametrize("backbone", ["timm:test_efficientnet", "timm:test_vit", "timm:resnet10t", "timm:test_convnext", "timm:mobilenetv3_small_050"])
class TestTimmBackbones(BackboneContract):
    @pytest.fixture(autouse=True)
    def _spec(self, backbone: str) -> None:
        self.backbone = backbone


class TestTimmBareArchitecture(BackboneContract):
    backbone = "resnet10t"


class TestLinearHead(HeadContract):
    head = "linear"


class TestMlpHead(HeadContract):
    head = "mlp"


class TestAdamW(OptimizerContract):
    optimizer = "adamw"


class TestSgd(OptimizerContract):
    optimizer = "sgd"
