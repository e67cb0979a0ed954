"""Built-in strategies: ``flat``, ``per_node``, ``per_level`` and ``joint`` (docs/strategies.md)."""

from __future__ import annotations

from collections.abc import Callable

from hiercls.hookspecs import hookimpl
from hiercls.strategies import flat, joint, per_level, per_node

BUILTIN_STRATEGIES = ("flat", "per_node", "per_level", "joint")


@hookimpl
def register_strategies(register: Callable[..., None]) -> None:
    for name, module in zip(BUILTIN_STRATEGIES, (flat, per_node, per_level, joint)):
        register(name, module)
