"""Freeze depth from timm's stage metadata, across model families."""

from __future__ import annotations

import pytest

pytest.importorskip("timm")


@pytest.mark.parametrize(
    "arch,expected",
    [
        ("resnet10t", ["conv1", "layer1", "layer2", "layer3", "layer4"]),
        ("test_efficientnet", ["conv_stem", "blocks.0", "blocks.1", "blocks.2", "blocks.3", "blocks.4"]),
        ("test_vit", ["patch_embed", "blocks.0", "blocks.1", "blocks.2", "blocks.3", "blocks.4", "blocks.5"]),
        ("test_convnext", ["stem", "stages.0", "stages.1", "stages.2", "stages.3"]),
    ],
)
def test_stages_follow_timm_groups(arch: str, expected: list[str]) -> None:
    import timm

    from tlengine._stages import backbone_stages

    model = timm.create_model(arch, num_classes=0)
    stages = backbone_stages(model)
    assert len(stages) >= len(expected)
    for stage, prefix in zip(stages, expected):
        assert any(name.startswith(prefix) for name in stage), (stage, prefix)
        assert all(name.startswith(prefix) or not name.startswith(tuple(expected)) for name in stage), (stage, prefix)


def test_vgg_stages() -> None:
    import timm
    import torch

    from tlengine._stages import backbone_stages

    with torch.device("meta"):
        model = timm.create_model("vgg11", num_classes=0)
    stages = backbone_stages(model)
    assert len(stages) == 9
    assert stages[0] == ["features.0.weight", "features.0.bias"]
    assert stages[-1][0].startswith("pre_logits")


@pytest.mark.parametrize("arch", ["resnet10t", "test_efficientnet", "test_vit", "test_convnext"])
def test_frozen_parameters_and_bn_stats_bit_identical(arch: str) -> None:
    import timm
    import torch

    from tlengine._stages import backbone_stages, freeze_stages, train_mode

    torch.manual_seed(0)
    model = timm.create_model(arch, num_classes=4)
    backbone_stage_count = len(backbone_stages(model))
    depth = backbone_stage_count // 2
    freeze_stages(model, depth)
    frozen = {n for s in backbone_stages(model)[:depth] for n in s}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        train_mode(model)
        loss = torch.nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3]))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = model.state_dict()
    frozen_modules = {n.rsplit(".", 1)[0] for n in frozen}
    checked = 0
    for key in before:
        if key in frozen or key.rsplit(".", 1)[0] in frozen_modules:
            assert torch.equal(before[key], after[key]), key
            checked += 1
    assert checked >= len(frozen)
    changed = [k for k in before if k not in frozen and not torch.equal(before[k], after[k])]
    assert changed, "nothing trainable changed"


def test_frozen_bn_stays_in_eval_mode() -> None:
    import timm
    from torch.nn.modules.batchnorm import _BatchNorm

    from tlengine._stages import freeze_stages, train_mode

    model = timm.create_model("resnet10t", num_classes=0)
    freeze_stages(model, 2)
    train_mode(model)
    assert not model.conv1[1].training and not model.layer1[0].bn1.training
    assert model.layer2[0].bn1.training and model.layer4[0].bn1.training
    assert model.training
    assert any(isinstance(m, _BatchNorm) and not m.training for m in model.modules())


def test_depth_out_of_range() -> None:
    import timm

    from tlengine._stages import freeze_stages

    model = timm.create_model("resnet10t", num_classes=0)
    with pytest.raises(ValueError):
        freeze_stages(model, 6)
    assert freeze_stages(model, 5) == len(list(model.parameters()))
