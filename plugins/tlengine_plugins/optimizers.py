"""Built-in optimizers ``adamw`` and ``sgd``, built by timm's ``create_optimizer_v2``.

timm's factory leaves frozen parameters out and exempts biases and norm weights
from weight decay.
"""

from __future__ import annotations

from typing import Any

from tlengine import Optimizer, hookimpl


@hookimpl
def register_optimizers(register):
    register(Optimizer("adamw", _factory("adamw"), "AdamW (timm)", lr_range=(1e-5, 1e-2), default_lr=1e-3))
    register(
        Optimizer(
            "sgd", _factory("sgd"), "SGD with Nesterov momentum (timm)", lr_range=(1e-4, 1e-1), default_lr=1e-2,
            params={"momentum": 0.9},
        )
    )


def _factory(opt: str) -> Any:
    def create(params: Any, lr: float, weight_decay: float, **kwargs: Any) -> Any:
        from timm.optim import create_optimizer_v2

        return create_optimizer_v2(params, opt=opt, lr=lr, weight_decay=weight_decay, **kwargs)

    create.__doc__ = f"timm's {opt} over the model's trainable parameters."
    return create
