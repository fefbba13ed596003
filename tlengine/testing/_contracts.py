"""The contract test classes behind :mod:`tlengine.testing`."""

from __future__ import annotations

from typing import Any

import pytest

from tlengine._model import feature_width
from tlengine._records import DatasetOptions, ImageData
from tlengine.plugins import get_registry


def _tiny_images(n: int, size: int) -> Any:
    import torch

    return torch.rand(n, 3, size, size)


class BackboneContract:
    """What every backbone must do.

    Attributes:
        backbone: The ``--backbone`` spec to test (``NAME`` or ``NAME:ARCH``).
        image_size: Input side used by the tests; keep it small.
    """

    backbone: str = ""
    image_size: int = 32

    @pytest.fixture
    def model(self) -> Any:
        from tlengine._model import resolve_backbone

        record, arch = resolve_backbone(get_registry(), self.backbone)
        return record.factory(arch, "none")

    def test_features(self, model: Any) -> None:
        import torch

        model.eval()
        with torch.no_grad():
            out = model(_tiny_images(2, self.image_size))
        assert out.shape == (2, feature_width(model))

    def test_stages_cover_every_parameter_once(self, model: Any) -> None:
        from tlengine._stages import backbone_stages

        stages = backbone_stages(model)
        names = [n for stage in stages for n in stage]
        assert len(stages) >= 1
        assert sorted(names) == sorted(n for n, _ in model.named_parameters())

    def test_data_config(self, model: Any) -> None:
        from timm.data import resolve_data_config

        config = resolve_data_config(model=model)
        assert len(config["mean"]) == 3 and len(config["std"]) == 3
        assert config["interpolation"]

    def test_full_depth_is_linear_probe(self, model: Any) -> None:
        from tlengine._stages import backbone_stages, freeze_stages

        freeze_stages(model, len(backbone_stages(model)))
        assert not any(p.requires_grad for p in model.parameters())
        freeze_stages(model, 0)
        assert all(p.requires_grad for p in model.parameters())

    def test_frozen_stages_unchanged_by_training(self, model: Any) -> None:
        import torch

        from tlengine._stages import backbone_stages, freeze_stages, train_mode

        stages = backbone_stages(model)
        depth = max(1, len(stages) - 1)
        freeze_stages(model, depth)
        frozen = {n for stage in stages[:depth] for n in stage}
        before = {k: v.clone() for k, v in model.state_dict().items()}
        head = torch.nn.Linear(feature_width(model), 3)
        params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
        optimizer = torch.optim.SGD(params, lr=0.5)
        net = torch.nn.Sequential(model, head)
        for _ in range(2):
            train_mode(net)
            loss = torch.nn.functional.cross_entropy(net(_tiny_images(4, self.image_size)), torch.tensor([0, 1, 2, 0]))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        after = model.state_dict()
        frozen_modules = {n.rsplit(".", 1)[0] for n in frozen}
        for key, value in before.items():
            module = key.rsplit(".", 1)[0]
            if key in frozen or module in frozen_modules:
                assert torch.equal(value, after[key]), f"frozen {key} changed"
        if len(stages) > depth:
            assert any(not torch.equal(before[n], after[n]) for n in stages[depth]), "trainable stage did not change"


class HeadContract:
    """What every head must do.

    Attributes:
        head: The ``--head`` name to test.
    """

    head: str = ""

    @pytest.fixture
    def record(self) -> Any:
        return get_registry().heads[self.head]

    @pytest.mark.parametrize("task,outputs", [("classification", 5), ("regression", 1)])
    def test_shape_and_gradient(self, record: Any, task: str, outputs: int) -> None:
        import torch

        head = record.factory(16, outputs, task)
        x = torch.randn(4, 16, requires_grad=True)
        assert all(name.isidentifier() for name in record.params)
        out = head(x)
        assert out.shape == (4, outputs)
        out.sum().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all()
        assert all(p.grad is not None for p in head.parameters())


class DatasetContract:
    """What every dataset must do.

    Override the ``data_path`` fixture to point at data the dataset reads
    (``None`` for datasets that need no path).

    Attributes:
        dataset: The ``--dataset`` name to test.
        task: The task to ask for.
    """

    dataset: str = ""
    task: str | None = None

    @pytest.fixture
    def data_path(self) -> str | None:
        return None

    @pytest.fixture
    def data(self, data_path: str | None) -> ImageData:
        record = get_registry().datasets[self.dataset]
        return record.factory(data_path, DatasetOptions(task=self.task, val_fraction=0.25, seed=0))

    def test_returns_image_data(self, data: ImageData) -> None:
        assert isinstance(data, ImageData)
        assert len(data.train) > 0 and len(data.val) > 0
        assert len(data.train.images) == len(data.train.targets)
        assert len(data.val.images) == len(data.val.targets)
        assert data.task in ("classification", "regression")

    def test_targets_are_valid(self, data: ImageData) -> None:
        targets = list(data.train.targets) + list(data.val.targets)
        if data.task == "classification":
            assert len(data.classes) >= 2
            assert all(isinstance(t, int) and 0 <= t < len(data.classes) for t in targets)
        else:
            assert all(isinstance(t, float) for t in targets)

    def test_images_load_as_rgb(self, data: ImageData) -> None:
        from tlengine._preprocess import load_image

        for item in list(data.train.images[:3]) + list(data.val.images[:3]):
            image = load_image(item)
            assert image.mode == "RGB" and min(image.size) > 0

    def test_deterministic(self, data: ImageData, data_path: str | None) -> None:
        again = get_registry().datasets[self.dataset].factory(data_path, DatasetOptions(task=self.task, val_fraction=0.25, seed=0))
        assert list(again.train.targets) == list(data.train.targets)
        assert list(again.val.targets) == list(data.val.targets)


class OptimizerContract:
    """What every optimizer must do.

    Attributes:
        optimizer: The ``--optimizer`` name to test.
    """

    optimizer: str = ""

    @pytest.fixture
    def record(self) -> Any:
        return get_registry().optimizers[self.optimizer]

    def test_lr_range(self, record: Any) -> None:
        low, high = record.lr_range
        assert 0 < low < high
        assert low <= record.default_lr <= high

    def test_declared_params_accepted(self, record: Any) -> None:
        """Every tunable parameter the plugin declares is a keyword its factory takes, at its default spec."""
        import torch

        from tlengine._space import parse_dimension

        model = torch.nn.Linear(4, 2)
        for name, spec in record.params.items():
            dim = parse_dimension(name, spec, isinstance(spec, int), "default", "params")
            value = dim.value if dim.kind == "fixed" else dim.choices[0] if dim.kind == "categorical" else dim.low
            optimizer = record.factory(model.parameters(), record.default_lr, 0.0, **{name: value})
            assert isinstance(optimizer, torch.optim.Optimizer)

    def test_steps_only_trainable_parameters(self, record: Any) -> None:
        import torch

        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
        model[0].requires_grad_(False)
        frozen = model[0].weight.clone()
        trainable = model[1].weight.clone()
        groups = [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": 0.01, "lr_scale": 1.0}]
        optimizer = record.factory(groups, record.default_lr, 0.01)
        assert isinstance(optimizer, torch.optim.Optimizer)
        assert all(g["lr"] == pytest.approx(record.default_lr) for g in optimizer.param_groups)
        model(torch.randn(4, 8)).pow(2).sum().backward()
        optimizer.step()
        assert torch.equal(model[0].weight, frozen)
        assert not torch.equal(model[1].weight, trainable)
