"""``hiercls plugins``: what is installed, which backbones, losses, strategies and aggregators it provides."""

from __future__ import annotations

import argparse
import textwrap
import warnings

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from hiercls.cli import add_command
from hiercls.errors import ConfigError


def register(subparsers) -> None:
    parser = add_command(
        subparsers,
        "plugins",
        help="list plugins, backbone providers, losses, strategies and aggregators",
        description=textwrap.fill(
            "List the installed plugins (built-ins, and packages in the 'hiercls' entry-point "
            "group) with the hooks they implement, the backbone names or prefixes each serves "
            "(the longest matching prefix wins; the empty prefix is timm, serving any timm "
            "model name), the losses with their options, the training strategies with their options "
            "and the group aggregators. --list-timm prints the timm model "
            "names that match a wildcard pattern.",
            width=88,
        ),
        example_lines=(
            "hiercls plugins",
            "hiercls plugins --backbones",
            "hiercls plugins --losses",
            "hiercls plugins --strategies",
            "hiercls plugins --list-timm 'convnext*'",
            "hiercls plugins --list-timm '*vit_small*'",
        ),
    )
    parser.add_argument("--backbones", action="store_true", help="only the backbone providers")
    parser.add_argument("--losses", action="store_true", help="only the losses")
    parser.add_argument("--strategies", action="store_true", help="only the training strategies")
    parser.add_argument("--aggregators", action="store_true", help="only the group aggregators")
    parser.add_argument(
        "--list-timm", metavar="PATTERN", help="print timm model names matching PATTERN (wildcards * and ?)"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    console = Console(soft_wrap=True)
    if args.list_timm is not None:
        return _list_timm(console, args.list_timm)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from hiercls.plugins import (
            aggregator_registrations,
            backbone_registrations,
            loss_registrations,
            plugin_infos,
            strategy_registrations,
        )

        show_all = not (args.backbones or args.losses or args.strategies or args.aggregators)
        if show_all:
            console.print(_plugins_table(plugin_infos()))
        if show_all or args.backbones:
            console.print(_backbones_table(backbone_registrations()))
        if show_all or args.losses:
            console.print(_losses_table(loss_registrations()))
        if show_all or args.strategies:
            console.print(_strategies_table(strategy_registrations()))
        if show_all or args.aggregators:
            console.print(_aggregators_table(aggregator_registrations()))
    for warning in caught:
        Console(stderr=True).print(f"[yellow]warning:[/] {escape(str(warning.message))}", highlight=False)
    return 0


def _list_timm(console: Console, pattern: str) -> int:
    import timm

    names = timm.list_models(pattern)
    if not names:
        raise ConfigError(
            f"no timm model matches '{pattern}'; patterns use wildcards, e.g. 'convnext*' or '*vit_small*'"
        )
    for name in names:
        console.print(name, highlight=False)
    return 0


def _plugins_table(infos) -> Table:
    table = Table(title="Plugins", title_justify="left")
    for column in ("plugin", "module", "distribution", "hooks"):
        table.add_column(column, overflow="fold")
    for info in infos:
        dist = f"{info.distribution} {info.version or ''}".strip() if info.distribution else "built-in"
        hooks = ", ".join(info.hooks) if not info.error else f"[red]failed to load: {escape(info.error)}[/]"
        table.add_row(escape(info.name), escape(info.module), escape(dist), hooks)
    return table


def _backbones_table(registrations) -> Table:
    table = Table(title="Backbone providers", title_justify="left")
    table.add_column("name or prefix")
    table.add_column("plugin", overflow="fold")
    for reg in registrations:
        if reg.prefix:
            shown = f"{reg.name}*" if reg.name else "* (any timm model name)"
        else:
            shown = reg.name
        table.add_row(escape(shown), escape(reg.plugin))
    return table


def _losses_table(registrations) -> Table:
    from hiercls.losses import loss_options

    table = Table(title="Losses", title_justify="left")
    table.add_column("loss")
    table.add_column("plugin", overflow="fold")
    table.add_column("options", overflow="fold")
    for reg in registrations:
        options = loss_options(reg.factory)
        shown = "any (**options)" if options is None else (", ".join(_with_defaults(reg.factory, options)) or "-")
        table.add_row(escape(reg.name), escape(reg.plugin), escape(shown))
    return table


def _strategies_table(registrations) -> Table:
    table = Table(title="Strategies", title_justify="left")
    table.add_column("strategy")
    table.add_column("plugin", overflow="fold")
    table.add_column("options", overflow="fold")
    for reg in registrations:
        options = getattr(reg.factory, "DEFAULT_OPTIONS", None)
        shown = ", ".join(f"{k}={v!r}" for k, v in options.items()) if isinstance(options, dict) else "?"
        table.add_row(escape(reg.name), escape(reg.plugin), escape(shown or "-"))
    return table


def _aggregators_table(registrations) -> Table:
    table = Table(title="Group aggregators", title_justify="left")
    table.add_column("aggregator")
    table.add_column("plugin", overflow="fold")
    table.add_column("what it does", overflow="fold")
    for reg in registrations:
        doc = (getattr(reg.factory, "__doc__", None) or "").strip().splitlines()
        table.add_row(escape(reg.name), escape(reg.plugin), escape(doc[0] if doc else ""))
    return table


def _with_defaults(factory, options: tuple[str, ...]) -> list[str]:
    import inspect

    params = inspect.signature(factory).parameters
    out = []
    for name in options:
        default = params[name].default
        out.append(name if default is inspect.Parameter.empty else f"{name}={default!r}")
    return out
