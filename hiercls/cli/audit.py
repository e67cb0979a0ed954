"""``hiercls audit``: find duplicates, unreadable or tiny images, small groups and unknown labels."""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

from rich.console import Console
from rich.table import Table

from hiercls.cli import add_command
from hiercls.console import make_console
from hiercls.data.audit import DEFAULT_NEAR_THRESHOLD, AuditReport, audit
from hiercls.data.dataset import load_images, write_manifest
from hiercls.data.splits import group_warning, grouped_kfold, split_count_table
from hiercls.errors import ConfigError, DataError
from hiercls.taxonomy import load_taxonomy

_MAX_ROWS = 200  # rows printed per findings table; the rest are counted


def register(subparsers) -> None:
    parser = add_command(
        subparsers,
        "audit",
        help="check a dataset: duplicates, unreadable or tiny images, groups, unknown labels",
        description=textwrap.fill(
            "Read every image once and report exact duplicates (same bytes), near duplicates "
            "(perceptual hash within --near-threshold bits), unreadable or truncated files, images "
            "smaller than --min-size, groups with fewer than --min-group-images images or several "
            "labels, labels unknown to the taxonomy, and image counts per node and level. "
            "--write-manifest saves a manifest without what was flagged (one copy of each duplicate kept).",
            width=88,
        ) + "\n\n" + textwrap.fill(
            "Exit status: 0 when nothing was found, 1 when problems were found (unreadable files, "
            "unknown labels, exact or near duplicates, duplicates across folds, tiny images, group "
            "problems, broken links; the manifest is still written), 2 for a usage or input error.",
            width=88,
        ),
        example_lines=(
            "hiercls audit --taxonomy taxonomy/all-subtypes.yaml --data data/all-subtypes",
            "hiercls audit --taxonomy taxonomy/blood-cells.yaml --data data/blood-cells/manifest.csv",
            "hiercls audit --taxonomy tree.yaml --data slides/ --group-regex '^(P\\d+)_' --min-group-images 5",
            "hiercls audit --taxonomy tree.yaml --data data/ --write-manifest data/clean.csv",
            "hiercls audit --taxonomy tree.yaml --data manifest.csv --folds 5   # duplicates across folds",
        ),
    )
    add = parser.add_argument
    add("--taxonomy", required=True, metavar="YAML", help="taxonomy file (labels are checked against it)")
    add("--data", required=True, metavar="PATH",
        help="folder of class sub-folders, folder of images, or CSV manifest")
    add("--min-size", type=int, default=32, metavar="PX",
        help="flag images smaller than PX on either side (default: 32)")
    add("--min-group-images", type=int, default=1, metavar="N",
        help="flag groups with fewer than N images (default: 1, off)")
    add("--group-regex", metavar="REGEX",
        help="group (patient/slide) from the file name: first capture group, else the whole match")
    add("--near-threshold", type=int, default=DEFAULT_NEAR_THRESHOLD, metavar="BITS",
        help=f"near duplicates differ in at most BITS of 64 perceptual-hash bits "
             f"(default: {DEFAULT_NEAR_THRESHOLD}; -1: off)")
    add("--folds", type=int, metavar="K",
        help="also show the images per node in each fold of a grouped K-fold split, and duplicate sets "
             "whose copies fall in different folds")
    add("--seed", type=int, default=0, help="seed of the --folds split (default: 0)")
    add("--write-manifest", type=Path, metavar="OUT.csv",
        help="write a manifest path,label[,group] without the flagged images")
    add("--overwrite", action="store_true", help="allow --write-manifest to replace an existing file")
    add("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.min_size < 0 or args.min_group_images < 1 or args.near_threshold > 64:
        raise ConfigError("--min-size must be >= 0, --min-group-images >= 1 and --near-threshold <= 64")
    out_path: Path | None = args.write_manifest
    if out_path is not None:
        _check_writable(out_path, args.overwrite)
    taxonomy = load_taxonomy(args.taxonomy)
    table = load_images(args.data, taxonomy, group_regex=args.group_regex, require_labels=False, unknown_labels="keep")
    splits = grouped_kfold(table, n_folds=args.folds, seed=args.seed) if args.folds else None
    report = audit(
        table,
        taxonomy,
        splits=splits,
        min_size=args.min_size,
        min_group_images=args.min_group_images,
        near_threshold=args.near_threshold,
        progress=not args.no_progress,
        console=make_console(),  # the bar on stderr, and none in a log; the report goes to stdout
    )
    console = make_console(stderr=False)
    print_report(report, console)
    if splits is not None:
        console.print(split_count_table(table, taxonomy, splits))
    warning = group_warning(table)
    if warning and args.folds:
        console.print(f"[yellow]warning[/]: {warning}")
    if out_path is not None:
        kept = report.clean_indices()
        write_manifest(table.subset(kept), out_path, overwrite=args.overwrite)
        console.print(f"wrote {len(kept)} of {len(table)} images to {out_path}")
    return _exit_status(report, console)


def _exit_status(report: AuditReport, console: Console) -> int:
    """1 when the audit found a problem (named on the last line), 0 when the data is clean."""
    problems = report.problems()
    if not problems:
        console.print("no problems found")
        return 0
    listed = ", ".join(f"{key}: {value}" for key, value in problems.items())
    console.print(f"[bold red]problems found[/] ({listed}); exit status 1")
    return 1


def print_report(report: AuditReport, console: Console) -> None:
    """Print the summary, duplicate sets, flagged files and counts as rich tables."""
    table = report.table
    root = table.root

    def name(i: int) -> str:
        path = table.paths[i]
        try:
            return str(path.relative_to(root))
        except ValueError:
            return str(path)

    summary = Table(title=f"Audit of {table.source or root}", title_justify="left", show_header=False)
    summary.add_column("finding")
    summary.add_column("count", justify="right")
    for key, value in report.summary().items():
        style = "bold red" if value and key not in ("images", "images kept", "unlabelled images") else ""
        summary.add_row(key, f"[{style}]{value}[/]" if style else str(value))
    console.print(summary)

    for title, sets in (
        (f"Exact duplicates (same bytes): {len(report.exact_duplicates)} sets", report.exact_duplicates),
        (f"Near duplicates (perceptual hash within {report.near_threshold} bits): {len(report.near_duplicates)} sets",
         report.near_duplicates),
        (f"Duplicate sets across folds: {len(report.cross_fold_duplicates)}", report.cross_fold_duplicates),
    ):
        if not sets:
            continue
        out = Table(title=title, title_justify="left")
        out.add_column("#", justify="right")
        out.add_column("files")
        out.add_column("labels")
        for k, members in enumerate(sets[:_MAX_ROWS], start=1):
            labels = sorted({str(table.labels[i] or table.raw_labels[i]) for i in members})
            out.add_row(str(k), "\n".join(name(i) for i in members), ", ".join(labels))
        console.print(out)
        _more(console, len(sets))

    flagged = {i: reason for i, reason in report.flagged().items() if "duplicate of" not in reason}
    if flagged:
        out = Table(title=f"Flagged files: {len(flagged)}", title_justify="left")
        out.add_column("file")
        out.add_column("reason")
        for i in sorted(flagged)[:_MAX_ROWS]:
            out.add_row(name(i), flagged[i])
        console.print(out)
        _more(console, len(flagged))

    if report.unknown_labels:
        out = Table(title="Labels unknown to the taxonomy", title_justify="left")
        out.add_column("label")
        out.add_column("images", justify="right")
        for label, count in report.unknown_labels.items():
            out.add_row(label, str(count))
        console.print(out)

    if report.small_groups or report.mixed_groups:
        out = Table(title="Group problems", title_justify="left")
        out.add_column("group")
        out.add_column("problem")
        for group, n in report.small_groups[:_MAX_ROWS]:
            out.add_row(group, f"{n} image(s), fewer than {report.min_group_images}")
        for group, labels in report.mixed_groups[:_MAX_ROWS]:
            out.add_row(group, "several labels: " + ", ".join(labels))
        console.print(out)

    if report.counts_per_node and any(report.counts_per_node.values()):
        out = Table(title="Images per node (node and everything below it)", title_justify="left")
        out.add_column("level", justify="right")
        out.add_column("node")
        out.add_column("images", justify="right")
        out.add_column("labelled here", justify="right")
        for depth, level in enumerate(report.counts_per_level, start=1):
            for node, count in level.items():
                out.add_row(str(depth), node, str(count), str(report.exact_counts.get(node, 0)))
            out.add_row("", f"[dim]level {depth} total[/]", f"[dim]{sum(level.values())}[/]", "", end_section=True)
        console.print(out)


def _more(console: Console, total: int) -> None:
    if total > _MAX_ROWS:
        console.print(f"[dim]... and {total - _MAX_ROWS} more not shown[/]")


def _check_writable(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise DataError(f"{path}: already exists; choose another --write-manifest path or add --overwrite")
    if path.exists() and path.is_dir():
        raise DataError(f"{path}: is a folder; give a .csv file name for --write-manifest")
    if not path.parent.exists():
        raise DataError(
            f"{path.parent}: folder does not exist; create it first or choose another --write-manifest path"
        )
