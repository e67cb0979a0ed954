"""``hiercls taxonomy show | validate``: look at a label tree, and check it before training."""

from __future__ import annotations

import argparse
import textwrap
import warnings

from rich.console import Console
from rich.markup import escape
from rich.tree import Tree

from hiercls.cli import add_command
from hiercls.data.dataset import load_images
from hiercls.taxonomy import Taxonomy, TaxonomyWarning, load_taxonomy

INTERNAL_MARK = "▾"
LEAF_MARK = "•"


def register(subparsers) -> None:
    parser = add_command(
        subparsers,
        "taxonomy",
        help="show or validate a taxonomy (label tree) file",
        description=textwrap.fill(
            "Draw a label tree, optionally with the number of images under each node, or check "
            "a taxonomy file and report its size and warnings. A bad file exits with status 2 "
            "and a one-line message naming the line to fix.",
            width=88,
        ),
        example_lines=(
            "hiercls taxonomy show taxonomy/leukemia.yaml",
            "hiercls taxonomy show taxonomy/blood-cells.yaml --data data/blood-cells/manifest.csv",
            "hiercls taxonomy validate taxonomy/leukemia.yaml",
        ),
    )
    actions = parser.add_subparsers(title="actions", dest="action", metavar="ACTION")
    actions.required = True

    show = add_command(
        actions,
        "show",
        help="draw the tree (with image counts per node when --data is given)",
        description=textwrap.fill(
            "Draw the tree: display names, node names and aliases (dim), ▾ internal node, • leaf. "
            "With --data, each node shows the images at or below it, and internal nodes also how "
            "many are labelled exactly there (partial labels).",
            width=88,
        ),
        example_lines=(
            "hiercls taxonomy show taxonomy/leukemia.yaml",
            "hiercls taxonomy show taxonomy/all-subtypes.yaml --data data/all-subtypes",
            "hiercls taxonomy show tree.yaml --data manifest.csv --group-regex '^(P\\d+)_'",
        ),
    )
    show.add_argument("file", metavar="FILE", help="taxonomy YAML file")
    show.add_argument("--data", metavar="PATH", help="folder of class sub-folders or CSV manifest to count images from")
    show.add_argument("--group-regex", metavar="REGEX", help="also count groups per node (group from the file name)")
    show.set_defaults(func=run_show)

    validate = add_command(
        actions,
        "validate",
        help="check a taxonomy file: prints 'OK: N nodes, M leaves, depth D' and warnings",
        description="Check a taxonomy file; exit 0 with a summary and warnings, or 2 with the error.",
        example_lines=("hiercls taxonomy validate taxonomy/leukemia.yaml",),
    )
    validate.add_argument("file", metavar="FILE", help="taxonomy YAML file")
    validate.set_defaults(func=run_validate)


def _load_quietly(path: str) -> Taxonomy:
    """Load without emitting Python warnings; the commands print ``taxonomy.warnings`` themselves."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TaxonomyWarning)
        return load_taxonomy(path)


def run_validate(args: argparse.Namespace) -> int:
    taxonomy = _load_quietly(args.file)
    console = Console(highlight=False)
    console.print(
        f"[green]OK[/]: {taxonomy.num_nodes} nodes, {len(taxonomy.leaves)} leaves, depth {taxonomy.max_depth}"
    )
    for message in taxonomy.warnings:
        console.print(f"[yellow]warning[/]: {escape(message)}", soft_wrap=True)
    return 0


def run_show(args: argparse.Namespace) -> int:
    taxonomy = _load_quietly(args.file)
    counts = exact = groups = None
    if args.data:
        table = load_images(args.data, taxonomy, group_regex=args.group_regex)
        counts = table.counts_per_node(taxonomy)
        exact = table.exact_counts(taxonomy)
        if table.has_groups:
            groups = {node: set() for node in taxonomy.nodes}
            for label, group in zip(table.labels, table.groups):
                if label is not None and group is not None:
                    for node in taxonomy.path(label):
                        groups[node].add(group)
    console = Console(highlight=False)
    console.print(build_tree(taxonomy, counts, exact, groups))
    for message in taxonomy.warnings:
        console.print(f"[yellow]warning[/]: {escape(message)}", soft_wrap=True)
    return 0


def build_tree(
    taxonomy: Taxonomy,
    counts: dict[str, int] | None = None,
    exact: dict[str, int] | None = None,
    groups: dict[str, set] | None = None,
) -> Tree:
    """A ``rich.tree.Tree`` of the taxonomy, with image (and group) counts when given."""

    def label(node: str) -> str:
        is_root = node == taxonomy.root
        leaf = not is_root and taxonomy.is_leaf(node)
        mark = LEAF_MARK if leaf else INTERNAL_MARK
        shown = taxonomy.name or node if is_root else taxonomy.display_name(node)
        text = f"{mark} [bold]{escape(shown)}[/]" if not leaf else f"{mark} {escape(shown)}"
        if not is_root and shown != node:
            text += f" [dim]({escape(node)})[/]"
        aliases = () if is_root else taxonomy.aliases(node)
        if aliases:
            text += f" [dim]aliases: {escape(', '.join(aliases))}[/]"
        if counts is not None:
            text += f"  [cyan]{counts[node]} images[/]"
            if not leaf and exact is not None and not is_root:
                text += f" [magenta]({exact[node]} labelled here)[/]"
            if groups is not None:
                text += f" [dim]{len(groups[node])} groups[/]"
        return text

    tree = Tree(label(taxonomy.root), guide_style="dim")

    def grow(branch: Tree, node: str) -> None:
        for child in taxonomy.children(node):
            grow(branch.add(label(child)), child)

    grow(tree, taxonomy.root)
    return tree
