"""Plugin discovery: entry points, allow-list, broken plugins, duplicates, ``tlengine plugins``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_cli

import tlengine
from tlengine.plugins import get_registry


def fake_distribution(site: Path, dist: str, module: str, body: str, entry_name: str | None = None) -> Path:
    """Install a one-module distribution with a ``tlengine`` entry point into ``site``, as pip lays it out."""
    (site / f"{module}.py").write_text(body)
    info = site / f"{dist.replace('-', '_')}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[tlengine]\n{entry_name or module} = {module}\n")
    (info / "RECORD").write_text("")
    return site


def test_builtins_registered_through_entry_points() -> None:
    registry = get_registry()
    assert {"timm"} <= set(registry.backbones)
    assert {"linear", "mlp"} <= set(registry.heads)
    assert {"imagefolder", "csv", "demo"} <= set(registry.datasets)
    assert {"adamw", "sgd"} <= set(registry.optimizers)
    assert registry.owners[("register_backbones", "timm")] == "timm"


def test_temporary_plugin_registers_and_unregisters(register_plugin) -> None:
    class Extra:
        @tlengine.hookimpl
        def register_heads(self, register):
            register(tlengine.Head("twin", lambda i, o, t: None, "test head"))

    register_plugin(Extra(), "extra")
    assert get_registry().owners[("register_heads", "twin")] == "extra"


def test_temporary_plugin_gone_after_fixture() -> None:
    assert "twin" not in get_registry().heads


def test_duplicate_name_names_both_plugins(register_plugin) -> None:
    class Clash:
        @tlengine.hookimpl
        def register_heads(self, register):
            register(tlengine.Head("linear", lambda i, o, t: None, "clash"))

    register_plugin(Clash(), "clash-plugin")
    with pytest.raises(tlengine.UserError, match=r"plugins 'heads' and 'clash-plugin' both register the head 'linear'"):
        get_registry()


def test_wrong_record_type_is_reported(register_plugin) -> None:
    class Wrong:
        @tlengine.hookimpl
        def register_heads(self, register):
            register("linear")

    register_plugin(Wrong(), "wrong")
    with pytest.raises(tlengine.UserError, match="expected tlengine.Head"):
        get_registry()


def test_broken_plugin_reported_by_package_cli_keeps_working(tmp_path: Path) -> None:
    site = fake_distribution(tmp_path, "tlengine-broken", "tlengine_broken", "raise ImportError('needs libfoo')\n")
    result = run_cli("plugins", "--json", env={"PYTHONPATH": str(site)})
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["failures"] == [{"name": "tlengine_broken", "package": "tlengine-broken", "error": "ImportError: needs libfoo"}]
    assert "timm" in [p["name"] for p in data["plugins"]]
    text = run_cli("plugins", env={"PYTHONPATH": str(site)})
    assert text.returncode == 0
    assert "warning: plugin 'tlengine_broken' from package 'tlengine-broken' failed to load" in text.stderr


def test_allow_list(tmp_path: Path) -> None:
    body = (
        "import tlengine\n"
        "@tlengine.hookimpl\n"
        "def register_heads(register):\n"
        "    register(tlengine.Head('thirdparty', lambda i, o, t: None, 'x'))\n"
    )
    site = fake_distribution(tmp_path, "tlengine-extra", "tlengine_extra", body)
    listed = lambda env: {p["name"] for p in json.loads(run_cli("plugins", "--json", env=env).stdout)["plugins"]}  # noqa: E731
    assert "tlengine_extra" in listed({"PYTHONPATH": str(site)})
    assert "tlengine_extra" not in listed({"PYTHONPATH": str(site), "TLENGINE_PLUGINS": ""})
    assert "tlengine_extra" in listed({"PYTHONPATH": str(site), "TLENGINE_PLUGINS": "tlengine-extra"})
    # built-ins always load
    assert {"timm", "heads", "datasets", "optimizers"} <= listed({"PYTHONPATH": str(site), "TLENGINE_PLUGINS": ""})


def test_plugins_command_lists_hooks_and_names() -> None:
    result = run_cli("plugins", "--json")
    assert result.returncode == 0
    plugins = {p["name"]: p for p in json.loads(result.stdout)["plugins"]}
    assert plugins["heads"]["package"] == "tlengine"
    assert plugins["heads"]["hooks"] == ["register_heads"]
    assert plugins["heads"]["registers"] == {"register_heads": ["linear", "mlp"]}
    assert plugins["datasets"]["registers"]["register_datasets"] == ["csv", "demo", "imagefolder"]
