"""The plugin manager: built-in plugins plus everything in the entry-point group ``hiercls``."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable

import pluggy

from hiercls import hookspecs
from hiercls.errors import ConfigError

BUILTIN_PLUGINS = ("hiercls.builtin.timm_backbones", "hiercls.builtin.losses")


@dataclass(frozen=True)
class Registration:
    name: str
    factory: Callable[..., Any]
    plugin: str
    prefix: bool = False


@lru_cache(maxsize=1)
def get_plugin_manager() -> pluggy.PluginManager:
    import importlib

    pm = pluggy.PluginManager("hiercls")
    pm.add_hookspecs(hookspecs)
    for module_name in BUILTIN_PLUGINS:
        pm.register(importlib.import_module(module_name), name=module_name)
    pm.load_setuptools_entrypoints("hiercls")
    return pm


def _collect(hook_name: str) -> list[Registration]:
    pm = get_plugin_manager()
    found: list[Registration] = []
    for impl in getattr(pm.hook, hook_name).get_hookimpls():
        plugin_name = pm.get_name(impl.plugin) or repr(impl.plugin)

        def register(name: str, factory: Callable[..., Any], prefix: bool = False, _p=plugin_name):
            found.append(Registration(name, factory, _p, prefix))

        impl.function(register=register)
    return found


def backbone_registrations() -> list[Registration]:
    return _collect("register_backbones")


def loss_registrations() -> list[Registration]:
    return _collect("register_losses")


def find_backbone(name: str) -> Registration:
    """The registration serving ``name``: an exact name wins, then the longest prefix."""
    regs = backbone_registrations()
    exact = [r for r in regs if not r.prefix and r.name == name]
    if exact:
        return exact[-1]
    prefixed = sorted((r for r in regs if r.prefix and name.startswith(r.name)), key=lambda r: -len(r.name))
    if prefixed:
        return prefixed[0]
    raise ConfigError(
        f"unknown backbone '{name}'. Use a timm model name (see `hiercls plugins --backbones`) "
        "or install a plugin that provides it."
    )


def find_loss(name: str) -> Registration:
    regs = {r.name: r for r in loss_registrations()}
    if name not in regs:
        raise ConfigError(f"unknown loss '{name}'; available: {', '.join(sorted(regs))}")
    return regs[name]
