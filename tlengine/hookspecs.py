"""Hook specifications: every extension point of tlengine."""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("tlengine")
hookimpl = pluggy.HookimplMarker("tlengine")


@hookspec
def register_backbones(register):
    """Register backbones: call ``register(tlengine.Backbone(...))`` once per backbone."""


@hookspec
def register_heads(register):
    """Register heads: call ``register(tlengine.Head(...))`` once per head."""


@hookspec
def register_datasets(register):
    """Register datasets: call ``register(tlengine.Dataset(...))`` once per dataset."""


@hookspec
def register_optimizers(register):
    """Register optimizers: call ``register(tlengine.Optimizer(...))`` once per optimizer."""
