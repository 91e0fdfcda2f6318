"""Name -> loss class registry behind ``get_loss``."""

from __future__ import annotations

import difflib
from typing import Any, Callable, TypeVar

from csd_ray.losses.base import DistillationLoss
from csd_ray.losses.errors import LossConfigError

_REGISTRY: dict[str, type[DistillationLoss]] = {}
L = TypeVar("L", bound=type[DistillationLoss])


def register_loss(name: str) -> Callable[[L], L]:
    def add(cls: L) -> L:
        if name in _REGISTRY:
            raise ValueError(f"loss '{name}' registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return add


def available_losses() -> list[str]:
    return sorted(_REGISTRY)


def loss_class(name: str) -> type[DistillationLoss]:
    if name not in _REGISTRY:
        close = difflib.get_close_matches(str(name), _REGISTRY, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise LossConfigError(f"unknown loss '{name}'{hint} (available: {', '.join(available_losses())})")
    return _REGISTRY[name]


def get_loss(name: str, **params: Any) -> DistillationLoss:
    """The loss ``name`` with its parameters validated, ready to call as
    ``loss_fn(student_logits [N,V], teacher, mask [N]) -> (loss, metrics)``."""
    return loss_class(name)(**params)
