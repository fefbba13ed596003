"""The hook reference documents every hook, and its examples run."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

import tlengine
from tlengine import hookspecs
from tlengine.plugins import get_registry

DOC = Path(__file__).resolve().parents[1] / "docs" / "hooks.md"
HOOKS = [name for name, f in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("register_")]


def sections() -> dict[str, str]:
    parts = re.split(r"^## ", DOC.read_text(), flags=re.M)[1:]
    return {part.split("\n", 1)[0].strip(): part for part in parts}


def test_hookspecs_are_register_hooks_with_one_line_docstrings() -> None:
    assert HOOKS == ["register_backbones", "register_datasets", "register_heads", "register_optimizers"]
    for name in HOOKS:
        function = getattr(hookspecs, name)
        assert list(inspect.signature(function).parameters) == ["register"]
        assert function.__doc__ and "\n" not in function.__doc__.strip()


def test_every_hook_documented() -> None:
    documented = sections()
    for name in HOOKS:
        assert name in documented, f"docs/hooks.md has no section for {name}"
        assert f"{name}(register)" in documented[name]
        assert "@tlengine.hookimpl" in documented[name]


@pytest.mark.parametrize("hook", HOOKS)
def test_example_runs(hook: str, register_plugin) -> None:
    import torch

    code = re.findall(r"```python\n(.*?)```", sections()[hook], flags=re.S)[-1]
    namespace: dict = {}
    exec(compile(code, f"docs/hooks.md#{hook}", "exec"), namespace)
    plugin_class = next(v for v in namespace.values() if isinstance(v, type) and hasattr(v, hook))
    before = getattr(get_registry(), hook.removeprefix("register_"))
    register_plugin(plugin_class(), f"docs-{hook}")
    added = {k: v for k, v in getattr(get_registry(), hook.removeprefix("register_")).items() if k not in before}
    assert len(added) == 1
    record = next(iter(added.values()))
    if hook == "register_backbones":
        model = record.factory(None, "none")
        assert model(torch.rand(2, 3, 32, 32)).shape == (2, model.num_features)
    elif hook == "register_heads":
        assert record.factory(16, 3, "classification")(torch.rand(2, 16)).shape == (2, 3)
    elif hook == "register_datasets":
        data = record.factory("stripes", tlengine.DatasetOptions())
        assert isinstance(data, tlengine.ImageData) and len(data.train) == 40
        assert record.matches("stripes")
    else:
        model = torch.nn.Linear(4, 2)
        optimizer = record.factory(model, record.default_lr, 0.0)
        before_weight = model.weight.clone()
        model(torch.rand(3, 4)).sum().backward()
        optimizer.step()
        assert not torch.equal(before_weight, model.weight)


def test_cli_reference_in_sync() -> None:
    from tlengine._cli import cli_reference

    doc = DOC.parent / "cli.md"
    assert doc.read_text() == cli_reference(), (
        "docs/cli.md is stale: python -c \"from tlengine._cli import cli_reference; print(cli_reference(), end='')\" > docs/cli.md"
    )
