"""The plugin manager: discovers plugins through entry points of group ``tlengine``.

Built-in plugins are entry points of the ``tlengine`` distribution itself and load
exactly like third-party ones. Set ``TLENGINE_PLUGINS=a,b`` to load only the named
third-party plugins (entry-point or distribution names); built-ins always load, and
an empty value loads no third-party plugin at all.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import pluggy

from tlengine import hookspecs
from tlengine._errors import UserError
from tlengine._records import Backbone, Dataset, Head, Optimizer

ENTRY_POINT_GROUP = "tlengine"
ALLOW_ENV = "TLENGINE_PLUGINS"
BUILTIN_DISTRIBUTION = "tlengine"

pm = pluggy.PluginManager("tlengine")
pm.add_hookspecs(hookspecs)

#: The record type each hook registers, by hook name.
HOOK_RECORDS: dict[str, type] = {
    "register_backbones": Backbone,
    "register_heads": Head,
    "register_datasets": Dataset,
    "register_optimizers": Optimizer,
}

_loaded = False


@dataclass(frozen=True)
class PluginFailure:
    """A plugin whose entry point could not be loaded.

    Attributes:
        name: The entry-point name.
        package: The distribution that declares it.
        error: The exception, as one line.
    """

    name: str
    package: str
    error: str


@dataclass(frozen=True)
class PluginInfo:
    """One loaded plugin, for ``tlengine plugins``.

    Attributes:
        name: The name it is registered under in the plugin manager.
        package: The distribution it came from (``None`` for one registered in code).
        version: That distribution's version.
        hooks: The hooks it implements.
        registers: The names it registers, by hook.
    """

    name: str
    package: str | None
    version: str | None
    hooks: tuple[str, ...]
    registers: dict[str, tuple[str, ...]]


failures: list[PluginFailure] = []
_dists: dict[str, tuple[str, str]] = {}


def _normalise(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def _allowed(ep: metadata.EntryPoint, dist_name: str) -> bool:
    if _normalise(dist_name) == BUILTIN_DISTRIBUTION:
        return True
    allow = os.environ.get(ALLOW_ENV)
    if allow is None:
        return True
    wanted = {_normalise(n) for n in allow.split(",") if n.strip()}
    return _normalise(ep.name) in wanted or _normalise(dist_name) in wanted


def load_plugins() -> None:
    """Load every allowed entry-point plugin, once.

    A plugin that fails to import is recorded in :data:`failures` (with its package
    name) instead of raising, so the CLI keeps working without it.
    """
    global _loaded
    if _loaded:
        return
    _loaded = True
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = getattr(ep, "dist", None)
        dist_name = dist.metadata["Name"] if dist is not None else "unknown"
        dist_version = dist.version if dist is not None else "?"
        if not _allowed(ep, dist_name) or pm.has_plugin(ep.name):
            continue
        try:
            module = ep.load()
            pm.register(module, name=ep.name)
        except Exception as exc:  # any import-time failure of foreign code
            failures.append(PluginFailure(ep.name, dist_name, f"{type(exc).__name__}: {exc}"))
            continue
        _dists[ep.name] = (dist_name, dist_version)
    pm.check_pending()


@dataclass(frozen=True)
class Registry:
    """Everything the loaded plugins registered, by name.

    Attributes:
        backbones: Backbone records by name.
        heads: Head records by name.
        datasets: Dataset records by name.
        optimizers: Optimizer records by name.
        owners: ``(hook, name) -> plugin name`` for every registration.
    """

    backbones: dict[str, Backbone]
    heads: dict[str, Head]
    datasets: dict[str, Dataset]
    optimizers: dict[str, Optimizer]
    owners: dict[tuple[str, str], str]


def _collect(hook_name: str, owners: dict[tuple[str, str], str]) -> dict[str, Any]:
    record_type = HOOK_RECORDS[hook_name]
    found: dict[str, Any] = {}
    caller = getattr(pm.hook, hook_name)
    # Called one implementation at a time so every registration knows its plugin.
    for impl in caller.get_hookimpls():  # in registration order

        def register(record: Any, _plugin: str = impl.plugin_name) -> None:
            if not isinstance(record, record_type):
                raise UserError(
                    f"plugin {_plugin!r}: {hook_name} registered a {type(record).__name__}, "
                    f"expected tlengine.{record_type.__name__}"
                )
            other = owners.get((hook_name, record.name))
            if other is not None:
                raise UserError(
                    f"plugins {other!r} and {_plugin!r} both register the "
                    f"{record_type.__name__.lower()} {record.name!r}; uninstall one of them "
                    f"or leave one out with {ALLOW_ENV}"
                )
            owners[(hook_name, record.name)] = _plugin
            found[record.name] = record

        impl.function(register=register)
    return found


def get_registry() -> Registry:
    """Load the plugins (once) and collect what they register.

    Collected anew on each call, so plugins registered or unregistered in code
    (``pm.register``) take effect at once.

    Raises:
        UserError: Two plugins register the same name, or a plugin registers a wrong type.
    """
    load_plugins()
    owners: dict[tuple[str, str], str] = {}
    return Registry(
        backbones=_collect("register_backbones", owners),
        heads=_collect("register_heads", owners),
        datasets=_collect("register_datasets", owners),
        optimizers=_collect("register_optimizers", owners),
        owners=owners,
    )


def get_plugins() -> list[PluginInfo]:
    """Describe every loaded plugin: its package, hooks and registered names."""
    registry = get_registry()
    infos = []
    for name, plugin in sorted(pm.list_name_plugin(), key=lambda item: item[0]):
        if plugin is None:
            continue
        hooks = tuple(sorted(h.name for h in pm.get_hookcallers(plugin) or ()))
        registers = {
            hook: tuple(sorted(n for (h, n), owner in registry.owners.items() if h == hook and owner == name))
            for hook in hooks
        }
        package, version = _dists.get(name, (None, None))
        infos.append(PluginInfo(name, package, version, hooks, registers))
    return infos
