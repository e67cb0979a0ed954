"""``hiercls cv``: grouped K-fold cross-validation over strategies x backbones, with the paper's tables.

Every command module is imported to build ``hiercls --help``, so torch and friends are imported
inside ``run``, not here.
"""

from __future__ import annotations

import argparse
import textwrap

from hiercls.cli import add_command
from hiercls.console import log_interval, make_console


def register(subparsers) -> None:
    p = add_command(
        subparsers,
        "cv",
        help="grouped K-fold cross-validation of several strategies and backbones",
        description=textwrap.fill(
            "Train and score every (strategy, backbone, fold) cell of a cross-validation grid described "
            "by a YAML file: each cell is a `hiercls fit` run on the other folds, scored on its held-out "
            "fold with its last checkpoint (image level, and per group when the data have groups). "
            "OUT/tables.md and OUT/tables.json (ACC / macro-F1 / AUROC per fold, per-decision accuracy, "
            "per-class P/R/F1) are rewritten after every finished cell. Running the same command again "
            "skips finished cells and resumes the unfinished one. Options given here override the file's. "
            "See docs/cv.md.",
            width=88,
        ),
        example_lines=(
            "hiercls cv --config examples/blood-cells/cv-sample.yaml",
            "hiercls cv --config examples/leukemia/cv.yaml --out runs/cv-leukemia",
            "hiercls cv --config examples/leukemia/cv.yaml --exclude Reactive --out runs/cv-no-reactive",
            "hiercls cv --config C.yaml --strategies flat,joint --backbones resnet18 --folds 3 --epochs 2 --device cpu",
        ),
    )
    S = argparse.SUPPRESS  # flags left out keep the config file's value
    p.add_argument("--config", required=True, metavar="C.yaml", help="cv config file (paths relative to it)")
    p.add_argument("--out", metavar="DIR", default=S, help="folder for the cells and tables (overrides out:)")
    p.add_argument("--folds", type=int, metavar="N", default=S, help="number of grouped folds (overrides folds:)")
    p.add_argument("--epochs", type=int, metavar="N", default=S, help="epochs of every run (overrides fit.epochs)")
    p.add_argument("--device", metavar="auto|cpu|cuda|cuda:N", default=S, help="overrides fit.device")
    p.add_argument("--strategies", metavar="a,b", default=S,
                   help="comma-separated subset of flat, per_node, per_level, joint (overrides strategies:)")
    p.add_argument("--backbones", metavar="x,y", default=S, help="comma-separated backbone names (overrides backbones:)")
    p.add_argument("--exclude", nargs="+", metavar="NODE", default=S,
                   help="drop these nodes and their images from training and evaluation (overrides exclude:)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars, nor progress lines in a log")
    p.set_defaults(func=run)


def _split_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def overrides_from_args(args: argparse.Namespace) -> dict:
    """The cv options given on the command line, shaped like the config file."""
    given: dict = {}
    for name in ("out", "folds", "exclude"):
        if hasattr(args, name):
            given[name] = getattr(args, name)
    for name in ("strategies", "backbones"):
        if hasattr(args, name):
            given[name] = _split_list(getattr(args, name))
    fit = {name: getattr(args, name) for name in ("epochs", "device") if hasattr(args, name)}
    if fit:
        given["fit"] = fit
    return given


def run(args: argparse.Namespace) -> int:
    from hiercls.cv import load_cv_config, run_cv

    console = make_console()
    log_interval()  # a bad HIERCLS_LOG_INTERVAL is refused before anything starts
    config = load_cv_config(args.config, overrides_from_args(args))
    result = run_cv(config, console, progress=args.progress)
    total = len(result.cells)
    if result.interrupted:
        console.print(f"{result.finished} of {total} cells finished; partial tables in {result.tables_md}")
        return 130
    console.print(
        f"[bold green]done[/]: {total} cells ({result.trained} trained now, {result.finished - result.trained} "
        f"finished earlier); tables in {result.tables_md} and {result.tables_json}"
    )
    return 0
