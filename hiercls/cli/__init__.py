"""The ``hiercls`` command line.

Each command lives in its own module of this package and exposes
``register(subparsers)``, which adds its parser and sets ``func`` to the function that
runs it. Modules are discovered, so adding a command never edits this file.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import pkgutil
import sys
import warnings

from rich.console import Console
from rich.markup import escape

from hiercls import __version__
from hiercls.errors import HierclsError, PeerFailedError

# Order of commands in `hiercls --help`; any other command module follows alphabetically.
COMMAND_ORDER = ("fit", "predict", "evaluate", "calibrate", "compare", "cv", "explain", "audit", "taxonomy", "plugins")

err_console = Console(stderr=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hiercls",
        description="Hierarchical image classification on any label tree and any timm backbone.",
        epilog="Run `hiercls COMMAND --help` for a command's options and examples.",
    )
    parser.add_argument("--version", action="version", version=f"hiercls {__version__}")
    subparsers = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND")
    names = [m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")]
    ordered = [n for n in COMMAND_ORDER if n in names] + sorted(n for n in names if n not in COMMAND_ORDER)
    for name in ordered:
        module = importlib.import_module(f"{__name__}.{name}")
        if hasattr(module, "register"):
            module.register(subparsers)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """hiercls's own warnings (data, taxonomy) as one line a user can read; others as usual."""
    if category.__module__.startswith("hiercls"):
        err_console.print(f"[yellow]warning:[/] {escape(str(message))}", highlight=False, soft_wrap=True)
    else:
        _default_showwarning(message, category, filename, lineno, file, line)


_default_showwarning = warnings.showwarning


def main(argv: list[str] | None = None) -> int:
    warnings.showwarning = _show_warning
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if args.command is None else 2
    try:
        return int(args.func(args) or 0)
    except PeerFailedError:
        return 2  # under torchrun: rank 0 printed the reason
    except HierclsError as exc:
        # escaped: a message may hold [brackets] that rich would otherwise take for markup and drop
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return 2
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = f"{escape(str(exc.filename))}: " if exc.filename else ""
        err_console.print(f"[bold red]error:[/] {where}the disk is full; free some space and run the command "
                          "again (`hiercls fit` continues with --resume)", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/]")
        return 130


def examples(*lines: str) -> str:
    """An ``epilog`` with usage examples, for ``argparse`` with RawDescriptionHelpFormatter."""
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


def add_command(subparsers, name: str, help: str, description: str, example_lines: tuple[str, ...]):
    """Add a sub-command parser with the common look (description + examples)."""
    return subparsers.add_parser(
        name,
        help=help,
        description=description,
        epilog=examples(*example_lines),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


if __name__ == "__main__":
    sys.exit(main())
