"""Grouped, stratified splits: no patient (group) ever on both sides of a split.

Images of one smear or patient look alike; a split that puts them on both sides
measures memory, not diagnosis. Both functions use scikit-learn's
``StratifiedGroupKFold`` (stratified by label node, shuffled with ``seed``). Images without
a group count as their own group, which is only safe when they really are independent:
``group_warning`` says so for callers to print.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Sequence

import numpy as np
from rich.table import Table
from sklearn.model_selection import GroupKFold, StratifiedGroupKFold

from hiercls.data.dataset import DataWarning, ImageTable
from hiercls.errors import ConfigError, DataError
from hiercls.taxonomy import Taxonomy

__all__ = [
    "group_ids",
    "group_warning",
    "grouped_kfold",
    "grouped_train_val_split",
    "check_fold_count",
    "val_fraction_folds",
    "missing_label_warnings",
    "split_count_table",
]

Split = tuple[np.ndarray, np.ndarray]


def group_ids(table: ImageTable) -> np.ndarray:
    """Integer group id per image; an image without a group gets a group of its own."""
    ids: dict[str, int] = {}
    out = np.empty(len(table), dtype=np.int64)
    for i, group in enumerate(table.groups):
        key = f"g:{group}" if group is not None else f"image:{i}"
        out[i] = ids.setdefault(key, len(ids))
    return out


def group_warning(table: ImageTable) -> str | None:
    """A warning to show when no image has a group (per-image splits can leak), else ``None``."""
    if table.has_groups:
        return None
    return (
        "no groups given: images are split one by one, so neighbouring files from the same "
        "patient or smear can land on both sides and inflate validation scores; pass a manifest "
        "'group' column or --group-regex"
    )


def grouped_kfold(table: ImageTable, n_folds: int = 5, seed: int = 0) -> list[Split]:
    """``n_folds`` pairs ``(train_idx, val_idx)``, stratified by label, grouped by ``table.groups``.

    Every image is in exactly one validation fold and no group is split across folds.
    ``DataError`` when there are fewer groups than folds. A label that a fold's training
    or validation part lacks (a class of one image, or of one group) is not an error, but
    a ``DataWarning`` names the label and the folds (see ``missing_label_warnings``).
    """
    folds = _kfold(table, n_folds, seed)
    _warn(missing_label_warnings(table, folds))
    return folds


def missing_label_warnings(table: ImageTable, splits: Sequence[Split]) -> list[str]:
    """One message per label that is absent from the training or validation part of some split.

    A label missing from training cannot be learned in that fold; one missing from
    validation is not measured there. Both happen with classes of fewer images (or groups)
    than folds, which scikit-learn would only hint at in a generic warning.
    """
    counts = Counter(label for label in table.labels if label is not None)
    messages = []
    single = len(splits) == 1
    for label in sorted(counts):
        holes = []
        for part, column in (("training", 0), ("validation", 1)):
            lacking = [k + 1 for k, split in enumerate(splits) if not any(table.labels[i] == label for i in split[column])]
            if lacking:
                where = "split" if single else ("fold " if len(lacking) == 1 else "folds ") + ", ".join(map(str, lacking))
                holes.append(f"the {part} part of {where}")
        if holes:
            messages.append(
                f"{table.source + ': ' if table.source else ''}label '{label}' ({counts[label]} image(s)) is missing "
                f"from {' and '.join(holes)}; add images (or groups) of it, merge it into its parent, or exclude it"
            )
    return messages


def _warn(messages: list[str]) -> None:
    for message in messages:
        warnings.warn(message, DataWarning, stacklevel=3)


def check_fold_count(table: ImageTable, n_folds: int) -> None:
    """``ConfigError`` / ``DataError`` unless ``table`` has at least ``n_folds`` (>= 2) groups.

    Cheap (no split is made), so ``hiercls cv`` can refuse an impossible grid before it prints or writes anything.
    """
    if n_folds < 2:
        raise ConfigError(f"number of folds must be at least 2, got {n_folds}")
    n_groups = len(np.unique(group_ids(table)))
    if n_groups < n_folds:
        where = f"{table.source}: " if table.source else ""
        raise DataError(
            f"{where}only {n_groups} group(s) for {n_folds} folds; every fold needs its own groups: "
            f"use at most {n_groups} folds or provide finer groups"
        )


def _kfold(table: ImageTable, n_folds: int, seed: int) -> list[Split]:
    check_fold_count(table, n_folds)
    groups = group_ids(table)
    strata = np.array([label if label is not None else "" for label in table.labels], dtype=object)
    _, y = np.unique(strata, return_inverse=True)
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    if np.bincount(y).max() < n_folds:
        # scikit-learn refuses to stratify when every class has fewer images than folds (a tiny
        # set): split the groups without stratification, and say so.
        _warn([f"{table.source or 'data'}: every label has fewer images than the {n_folds} folds of the split, "
               "so it is not stratified; add images or use fewer folds (a larger --val-fraction)"])
        splitter = GroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        # Rare classes (fewer images than folds) are expected in a tree; they are split as well as possible.
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        folds = list(splitter.split(np.zeros(len(table)), y, groups))
    return [(np.sort(train).astype(np.int64), np.sort(val).astype(np.int64)) for train, val in folds]


def val_fraction_folds(val_fraction: float) -> int:
    """The ``k`` whose first of ``k`` grouped folds is the validation part for ``val_fraction``.

    The split takes ``1 / k`` of the groups, ``k = max(2, round(1 / val_fraction))``: 0.2 -> 5,
    0.3 -> 3 (a third), 0.4 -> 2 (a half), and every value from 0.4 up also gives a half.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    return max(2, round(1.0 / val_fraction))


def grouped_train_val_split(table: ImageTable, val_fraction: float = 0.2, seed: int = 0) -> Split:
    """One grouped, stratified ``(train_idx, val_idx)`` split.

    Implemented as the first fold of ``StratifiedGroupKFold(n_splits=val_fraction_folds(val_fraction))``,
    so the validation share is ``1 / n_splits`` (e.g. 0.2 -> 5 folds, 0.3 -> 3 folds, i.e. a third)
    and, with groups, only approximately that. When ``1 / n_splits`` is not ``val_fraction`` a
    ``DataWarning`` says which share the split really has.
    """
    n_splits = val_fraction_folds(val_fraction)
    split = _kfold(table, n_splits, seed)[0]
    messages = missing_label_warnings(table, [split])
    if abs(1.0 / n_splits - val_fraction) > 0.005:
        achieved = len(split[1]) / max(1, len(table))
        messages.insert(0, (
            f"val_fraction {val_fraction:g} is not 1/k: the split takes 1/{n_splits} of the groups, so "
            f"{len(split[1])} of {len(table)} images ({achieved:.2f}) are for validation; give "
            f"{', '.join(f'{1 / k:.2g}' for k in (2, 3, 4, 5, 10))} (1/k) to get what you ask for"
        ))
    _warn(messages)
    return split


def split_count_table(table: ImageTable, taxonomy: Taxonomy, splits: Sequence[Split]) -> Table:
    """A rich table of images per node (node and descendants) in each split.

    One split shows train and val columns; several (k-fold) show the validation count per fold.
    """
    single = len(splits) == 1
    title = "Images per node (train / val)" if single else f"Images per node in each of {len(splits)} validation folds"
    out = Table(title=title, title_justify="left")
    out.add_column("node")
    out.add_column("all", justify="right")
    parts: list[tuple[str, np.ndarray]] = []
    if single:
        parts = [("train", splits[0][0]), ("val", splits[0][1])]
    else:
        parts = [(f"fold {k + 1}", val) for k, (_, val) in enumerate(splits)]
    for name, _ in parts:
        out.add_column(name, justify="right")
    total = table.counts_per_node(taxonomy)
    counts = [table.subset(idx).counts_per_node(taxonomy) for _, idx in parts]
    for node in taxonomy.nodes:
        indent = "  " * taxonomy.depth(node)
        out.add_row(f"{indent}{node}", str(total[node]), *(str(c[node]) for c in counts))
    return out
