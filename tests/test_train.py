"""The training loop: epoch-switched loaders (early epochs at a lower resolution), memory format."""

from __future__ import annotations

from typing import Any


def test_phased_loader_switches_resolution_by_epoch_and_shares_its_shuffle() -> None:
    """``fit`` trains and validates epoch 1 on the early loaders and epoch 2 on the full-size ones; both phases
    draw their order from one generator, so the order does not depend on where a phase starts."""
    import torch

    from tlengine._loaders import EpochLoader, PhasedLoader, loader
    from tlengine._train import TrainPlan, fit

    class Recorder(torch.nn.Module):
        task = "classification"

        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 2))
            self.sizes: list[tuple[bool, int]] = []

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.sizes.append((self.training, x.shape[-1]))
            return self.net(x)

    def images(size: int) -> Any:
        x = torch.rand(16, 3, size, size, generator=torch.Generator().manual_seed(size))
        y = torch.arange(16) % 2
        return torch.utils.data.TensorDataset(x, y)

    class Indexed(torch.utils.data.Dataset):
        def __init__(self, data: Any) -> None:
            self.data = data

        def __len__(self) -> int:
            return len(self.data)

        def __getitem__(self, i: int) -> Any:
            return self.data[i]

    small, large = EpochLoader(Indexed(images(12)), 16, 1, 4, "cpu", seed=3), EpochLoader(Indexed(images(24)), 16, 1, 4, "cpu", seed=99)
    train = PhasedLoader([(1, small), (3, large)])
    assert large.generator is small.generator  # one shuffle stream
    val = PhasedLoader([(1, loader(images(12), 8, False, "cpu")), (3, loader(images(24), 8, False, "cpu"))])
    model = Recorder()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    history = fit(model, optimizer, train, val, TrainPlan(3, "classification", "accuracy", num_classes=2), device="cpu")
    assert len(history) == 3
    per_epoch = len(model.sizes) // 3
    epochs = [model.sizes[i * per_epoch:(i + 1) * per_epoch] for i in range(3)]
    assert set(epochs[0]) == {(True, 12), (False, 12)}  # trained and validated at the early size
    assert set(epochs[1]) == set(epochs[2]) == {(True, 24), (False, 24)}


def test_channels_last_changes_speed_not_results() -> None:
    """By default the model and its 4-D inputs are channels_last (on a CPU too); the same training in
    contiguous NCHW gives the same losses, scores and weights to float32 rounding."""
    import timm
    import torch

    from tlengine._model import build_model, feature_width
    from tlengine._loaders import loader
    from tlengine._train import TrainPlan, fit

    generator = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.rand(32, 3, 32, 32, generator=generator), torch.arange(32) % 3)
    runs = {}
    for channels_last in (True, False):
        torch.manual_seed(0)
        backbone = timm.create_model("test_efficientnet", num_classes=0)
        model = build_model(backbone, torch.nn.Linear(feature_width(backbone), 3), "classification")
        # SGD: Adam turns float-rounding-sized gradients (some BatchNorm biases here) into full-size steps
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        train = loader(data, 8, True, "cpu", seed=1)
        history = fit(model, optimizer, train, loader(data, 16, False, "cpu"), TrainPlan(2, "classification", "accuracy", num_classes=3),
                      device="cpu", channels_last=channels_last)
        weight = model.backbone.conv_stem.weight
        assert weight.is_contiguous(memory_format=torch.channels_last) is channels_last
        runs[channels_last] = (history, {k: v.detach().clone() for k, v in model.state_dict().items()})
    (ours, ours_state), (nchw, nchw_state) = runs[True], runs[False]
    for a, b in zip(ours, nchw):
        assert abs(a.train_loss - b.train_loss) <= 1e-5 * abs(b.train_loss)
        assert a.score == b.score
    for key, value in nchw_state.items():
        torch.testing.assert_close(ours_state[key], value, rtol=1e-4, atol=1e-5)
