"""Does the training set cover the tree? Leaves without images, decisions without a choice.

A class-folder dataset with images for one leaf of seven trains without complaint: every
decision above the empty leaves learns to answer with the one child it has seen. Before
training, ``check_training_coverage`` counts the training images at or below every node
(a partial label, at an internal node, counts for that node and its ancestors only) and

* warns (``DataWarning``) naming the leaves that have no training image: the model can
  never predict them;
* raises ``DataError`` when a decision (an internal node) has fewer than two children with
  training images below them, since there is nothing to decide between, naming each such
  node with its children's image counts and the fixes. With ``allow_incomplete=True``
  this is a warning instead. A node with a single child in the tree needs that child only.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Sequence

from hiercls.data.dataset import DataWarning
from hiercls.errors import DataError
from hiercls.taxonomy import Taxonomy

__all__ = ["check_training_coverage", "training_counts", "undecidable_nodes"]

_MAX_NAMED = 8  # leaves / decisions named in one message; the rest are counted

_FIX = (
    "add training images below them or exclude those nodes from the taxonomy "
    "(`exclude:` in the config, --exclude NODE)"
)


def training_counts(taxonomy: Taxonomy, train_labels: Sequence[str | None]) -> dict[str, int]:
    """Training images at or below each node (a label counts at its node and every ancestor).

    Labels are node names or aliases; ``None`` (unlabelled) is skipped; an unknown label is
    a ``DataError`` listing every unknown label.
    """
    given = Counter(label for label in train_labels if label is not None)
    counts = dict.fromkeys(taxonomy.nodes, 0)
    for label, n in given.items():
        node = label if label in taxonomy.index else taxonomy.resolve_labels([label], source="training labels")[0]
        for step in taxonomy.path(node):
            counts[step] += n
    return counts


def undecidable_nodes(taxonomy: Taxonomy, counts: dict[str, int]) -> list[str]:
    """Internal nodes, in tree order, with fewer than two children (one for a lone child) with images."""
    found = []
    for node in taxonomy.internal_nodes:
        children = taxonomy.children(node)
        covered = sum(counts[child] > 0 for child in children)
        if covered < min(2, len(children)):
            found.append(node)
    return found


def check_training_coverage(
    taxonomy: Taxonomy, train_labels: Sequence[str | None], allow_incomplete: bool = False
) -> list[str]:
    """Check that the training labels can train every decision of the tree; return the empty leaves.

    Warns with ``DataWarning`` naming the leaves without training images (and how many),
    and returns them in tree order. Raises ``DataError`` naming every decision with fewer
    than two children that have training images below them, with each child's image count
    and the fixes, unless ``allow_incomplete`` is true: then that is a warning too.
    """
    counts = training_counts(taxonomy, train_labels)
    empty_leaves = [leaf for leaf in taxonomy.leaves if counts[leaf] == 0]
    if empty_leaves:
        warnings.warn(_empty_leaves_message(taxonomy, empty_leaves), DataWarning, stacklevel=2)
    undecidable = undecidable_nodes(taxonomy, counts)
    if undecidable:
        problem = _undecidable_message(taxonomy, counts, undecidable)
        if not allow_incomplete:
            raise DataError(f"{problem}; {_FIX}, or pass --allow-incomplete-tree to train anyway")
        warnings.warn(f"{problem}; training anyway (allow_incomplete_tree); to fix it, {_FIX}", DataWarning,
                      stacklevel=2)
    return empty_leaves


def _named(names: Sequence[str]) -> str:
    shown = ", ".join(names[:_MAX_NAMED])
    return shown + (f", and {len(names) - _MAX_NAMED} more" if len(names) > _MAX_NAMED else "")


def _empty_leaves_message(taxonomy: Taxonomy, empty: list[str]) -> str:
    return (
        f"{len(empty)} of {len(taxonomy.leaves)} leaves of {_tree(taxonomy)} have no training images "
        f"({_named(empty)}); the model can never predict them. Add images of them, or exclude them from "
        "the taxonomy (`exclude:` in the config, --exclude NODE)"
    )


def _undecidable_message(taxonomy: Taxonomy, counts: dict[str, int], nodes: list[str]) -> str:
    described = [
        f"{node} ({', '.join(f'{child}: {counts[child]}' for child in taxonomy.children(node))})" for node in nodes
    ]
    return (
        f"{len(nodes)} decision(s) of {_tree(taxonomy)} have fewer than two children with training images, "
        f"so there is nothing to learn there: {_named(described)} [training images at or below each child]"
    )


def _tree(taxonomy: Taxonomy) -> str:
    return f"the tree '{taxonomy.name}'" if taxonomy.name else "the tree"
