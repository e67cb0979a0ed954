"""The plugin manager: built-in plugins plus everything in the entry-point group ``hiercls``.

Built-ins (timm backbones, the standard losses) are registered first; installed plugins
after them, so a plugin's exact name overrides a built-in one. A plugin that fails to
import is skipped with a warning (and shown by ``hiercls plugins``) instead of breaking
every command.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import pluggy

from hiercls import hookspecs
from hiercls.errors import ConfigError

BUILTIN_PLUGINS = (
    "hiercls.builtin.timm_backbones",
    "hiercls.builtin.losses",
    "hiercls.builtin.strategies",
    "hiercls.builtin.aggregators",
)
ENTRY_POINT_GROUP = "hiercls"

__all__ = [
    "BUILTIN_PLUGINS",
    "ENTRY_POINT_GROUP",
    "PluginInfo",
    "Registration",
    "PluginOverrideWarning",
    "aggregator_names",
    "aggregator_registrations",
    "backbone_registrations",
    "check_provenance",
    "check_run_provenance",
    "find_aggregator",
    "find_backbone",
    "find_strategy",
    "find_loss",
    "get_plugin_manager",
    "loss_registrations",
    "plugin_infos",
    "provenance",
    "run_provenance",
    "strategy_names",
    "strategy_registrations",
]


class PluginOverrideWarning(UserWarning):
    """An installed plugin now answers to a name a built-in also serves (e.g. ``resnet18``)."""



@dataclass(frozen=True)
class Registration:
    """One ``register(...)`` call: a name (or prefix), its factory and the plugin that made it."""

    name: str
    factory: Callable[..., Any]
    plugin: str
    prefix: bool = False


@dataclass(frozen=True)
class PluginInfo:
    """A plugin as ``hiercls plugins`` lists it."""

    name: str
    module: str
    distribution: str | None = None
    version: str | None = None
    hooks: tuple[str, ...] = ()
    error: str | None = None


_distributions: dict[str, tuple[str | None, str | None, str]] = {}
_failures: dict[str, PluginInfo] = {}


@lru_cache(maxsize=1)
def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager (built once)."""
    pm = pluggy.PluginManager("hiercls")
    pm.add_hookspecs(hookspecs)
    for module_name in BUILTIN_PLUGINS:
        pm.register(importlib.import_module(module_name), name=module_name)
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if pm.get_plugin(entry_point.name) is not None or pm.is_blocked(entry_point.name):
            continue
        dist = getattr(entry_point, "dist", None)
        dist_name = getattr(dist, "name", None) if dist else None
        dist_version = getattr(dist, "version", None) if dist else None
        try:
            plugin = entry_point.load()
            pm.register(plugin, name=entry_point.name)
        except Exception as exc:  # a broken third-party plugin must not break hiercls
            message = f"{type(exc).__name__}: {exc}"
            _failures[entry_point.name] = PluginInfo(
                entry_point.name, entry_point.value, dist_name, dist_version, (), message
            )
            warnings.warn(
                f"plugin '{entry_point.name}' ({entry_point.value}"
                + (f", distribution {dist_name}" if dist_name else "")
                + f") failed to load and is ignored: {message}. Reinstall or uninstall it.",
                RuntimeWarning,
                stacklevel=2,
            )
            continue
        _distributions[entry_point.name] = (dist_name, dist_version, entry_point.value)
    return pm


def plugin_infos() -> list[PluginInfo]:
    """Every plugin: built-ins first, then installed ones, then those that failed to load."""
    pm = get_plugin_manager()
    infos = []
    for name, plugin in pm.list_name_plugin():
        hooks = tuple(sorted(h.name for h in pm.get_hookcallers(plugin) or ()))
        dist_name, version, module = _distributions.get(name, (None, None, getattr(plugin, "__name__", name)))
        infos.append(PluginInfo(name, module, dist_name, version, hooks))
    builtin_first = sorted(infos, key=lambda i: (i.name not in BUILTIN_PLUGINS, i.name))
    return builtin_first + list(_failures.values())


def _collect(hook_name: str) -> list[Registration]:
    """Call every implementation of a ``register_*`` hook and gather what it registers.

    Order: built-ins first, installed plugins after (later registrations override).
    """
    pm = get_plugin_manager()
    found: list[Registration] = []
    for impl in getattr(pm.hook, hook_name).get_hookimpls():
        plugin_name = pm.get_name(impl.plugin) or repr(impl.plugin)

        def register(name: str, factory: Callable[..., Any], prefix: bool = False, _p: str = plugin_name) -> None:
            found.append(Registration(name, factory, _p, prefix))

        try:
            impl.function(register=register)
        except Exception as exc:  # a plugin bug: skip it, keep the others usable
            warnings.warn(
                f"plugin '{plugin_name}' failed in {hook_name} and is ignored: {type(exc).__name__}: {exc}",
                RuntimeWarning,
                stacklevel=2,
            )
    return found


def backbone_registrations() -> list[Registration]:
    """All backbone names and prefixes registered by built-ins and plugins."""
    return _collect("register_backbones")


def loss_registrations() -> list[Registration]:
    """All losses registered by built-ins and plugins."""
    return _collect("register_losses")


def strategy_registrations() -> list[Registration]:
    """All training strategies registered by built-ins and plugins."""
    return _collect("register_strategies")


def aggregator_registrations() -> list[Registration]:
    """All group aggregators registered by built-ins and plugins."""
    return _collect("register_aggregators")


def strategy_names() -> tuple[str, ...]:
    """The strategy names, built-ins first: the one list behind config checks, CLI choices and cv grids."""
    return tuple(dict.fromkeys(r.name for r in strategy_registrations()))


def aggregator_names() -> tuple[str, ...]:
    """The aggregator names, built-ins first."""
    return tuple(dict.fromkeys(r.name for r in aggregator_registrations()))


def find_strategy(name: str) -> Registration:
    """The registration of strategy ``name`` (a plugin's overrides a built-in's, with a warning)."""
    return _find_named("strategy", name, strategy_registrations(), "strategies")


def find_aggregator(name: str) -> Registration:
    """The registration of group aggregator ``name``."""
    return _find_named("aggregator", name, aggregator_registrations(), "aggregators")


def _find_named(kind: str, name: str, registrations: list[Registration], plural: str) -> Registration:
    named = {r.name: r for r in registrations}  # later registrations (plugins) win
    if name not in named:
        close = difflib.get_close_matches(str(name), list(named), n=3, cutoff=0.5)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(
            f"unknown {kind} '{name}'{hint}; available: {', '.join(named)}. {plural.capitalize()} from "
            "plugins appear once the plugin is installed (see `hiercls plugins`)."
        )
    builtin = any(r.name == name and r.plugin in BUILTIN_PLUGINS for r in registrations)
    _warn_if_overriding(kind, name, named[name], builtin)
    return named[name]


def find_backbone(name: str) -> Registration:
    """The registration serving ``name``: an exact name wins, then the longest prefix."""
    regs = backbone_registrations()
    exact = [r for r in regs if not r.prefix and r.name == name]
    if exact:
        _warn_if_overriding("backbone", name, exact[-1], _timm_has(name))
        return exact[-1]
    prefixed = [r for r in regs if r.prefix and name.startswith(r.name)]
    if prefixed:
        longest = max(len(r.name) for r in prefixed)
        return [r for r in prefixed if len(r.name) == longest][-1]
    raise ConfigError(
        f"unknown backbone '{name}'. Use a timm model name (see `hiercls plugins --list-timm PATTERN`) "
        "or install a plugin that provides it."
    )


def find_loss(name: str) -> Registration:
    """The registration of the loss called ``name`` (a plugin's overrides a built-in)."""
    regs = {r.name: r for r in loss_registrations()}
    if name not in regs:
        close = difflib.get_close_matches(name, list(regs), n=3, cutoff=0.5)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(
            f"unknown loss '{name}'{hint}; available: {', '.join(sorted(regs))}. "
            "Losses from plugins appear once the plugin is installed (see `hiercls plugins`)."
        )
    builtin = any(r.name == name and r.plugin in BUILTIN_PLUGINS for r in loss_registrations())
    _warn_if_overriding("loss", name, regs[name], builtin)
    return regs[name]


def _timm_has(name: str) -> bool:
    import timm

    return timm.is_model(name)


_warned: set[tuple[str, str, str]] = set()


def _warn_if_overriding(kind: str, name: str, winner: Registration, builtin_serves: bool) -> None:
    """Say loudly (once per process) that a plugin replaced a built-in's ``name``."""
    if winner.plugin in BUILTIN_PLUGINS or not builtin_serves or (kind, name, winner.plugin) in _warned:
        return
    _warned.add((kind, name, winner.plugin))
    where = provenance(winner)
    warnings.warn(
        f"{kind} '{name}' is now served by plugin '{winner.plugin}' ({_package(where)}), not by hiercls's "
        f"built-in {kind} of that name; results differ from runs made without that plugin. Uninstall the "
        "plugin or pick another name if this is not what you want",
        PluginOverrideWarning,
        stacklevel=3,
    )


def provenance(registration: Registration) -> dict[str, str | None]:
    """Which plugin, from which installed package and version, made a registration.

    Recorded in every checkpoint so that a run is never rebuilt, silently, by another
    implementation that answers to the same name (see ``check_provenance``).
    """
    get_plugin_manager()
    if registration.plugin in BUILTIN_PLUGINS:
        import hiercls

        return {"plugin": registration.plugin, "distribution": "hiercls", "version": hiercls.__version__}
    dist, version, _module = _distributions.get(registration.plugin, (None, None, None))
    return {"plugin": registration.plugin, "distribution": dist, "version": version}


def _package(where: dict[str, str | None]) -> str:
    if not where.get("distribution"):
        return "no installed package"
    return f"package {where['distribution']} {where.get('version') or ''}".rstrip()


def check_provenance(kind: str, name: str, recorded: dict[str, str | None] | None, source: str) -> None:
    """Refuse to rebuild a run's ``kind`` ('backbone' or 'loss') with another implementation.

    ``recorded`` is what the run's checkpoint says built it (``None`` for runs that predate
    provenance: nothing to compare). A missing plugin names the package to install; a
    different plugin answering to the name is refused; a different version only warns.
    """
    if not recorded:
        return
    try:
        current = provenance(find_backbone(name) if kind == "backbone" else find_loss(name))
    except ConfigError:
        current = None
    built_by = f"this run's {kind} '{name}' was built by plugin '{recorded.get('plugin')}' ({_package(recorded)})"
    if current is None or (current["plugin"] != recorded.get("plugin") and not _plugin_loaded(recorded)):
        dist = recorded.get("distribution")
        install = f"install it (`pip install {dist}`)" if dist else "install that plugin"
        raise ConfigError(f"{source}: {built_by}, which is not installed here; {install} and try again")
    if current["plugin"] != recorded.get("plugin") or current["distribution"] != recorded.get("distribution"):
        raise ConfigError(
            f"{source}: {built_by}, but plugin '{current['plugin']}' ({_package(current)}) answers to that name "
            "now and would run the weights through other code; uninstall that plugin, or train a new run"
        )
    if current["version"] != recorded.get("version") and current["plugin"] not in BUILTIN_PLUGINS:
        warnings.warn(
            f"{source}: {built_by}; {_package(current)} is installed now, results may differ",
            PluginOverrideWarning,
            stacklevel=2,
        )


def run_provenance(backbone: str, loss: str) -> dict[str, dict[str, str | None]]:
    """What a checkpoint records of the plugins that built its backbone and loss."""
    return {"backbone": provenance(find_backbone(backbone)), "loss": provenance(find_loss(loss))}


def check_run_provenance(metadata: dict[str, Any], backbone: str, loss: str, source: str) -> None:
    """``check_provenance`` for both the backbone and the loss a checkpoint records."""
    recorded = metadata.get("provenance") or {}
    check_provenance("backbone", backbone, recorded.get("backbone"), source)
    check_provenance("loss", loss, recorded.get("loss"), source)


def _plugin_loaded(recorded: dict[str, str | None]) -> bool:
    return get_plugin_manager().get_plugin(recorded.get("plugin") or "") is not None
