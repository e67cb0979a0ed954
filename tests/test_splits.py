"""Grouped, stratified splits: no group on both sides, labels spread evenly, clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from hiercls.data import (
    ImageTable,
    group_warning,
    grouped_kfold,
    grouped_train_val_split,
    split_count_table,
)
from hiercls.errors import ConfigError, DataError


def synthetic_table(n_groups: int = 40, seed: int = 0) -> ImageTable:
    """Groups of 2-6 images; each group has one label (like a patient with one diagnosis)."""
    rng = np.random.default_rng(seed)
    labels_pool = ["cat", "dog", "tree", "flower", "animal"]
    probs = [0.35, 0.25, 0.2, 0.15, 0.05]
    paths, labels, groups = [], [], []
    for g in range(n_groups):
        label = labels_pool[rng.choice(len(labels_pool), p=probs)]
        for k in range(int(rng.integers(2, 7))):
            paths.append(Path(f"/data/g{g}_{k}.png"))
            labels.append(label)
            groups.append(f"P{g}")
    return ImageTable(root=Path("/data"), paths=paths, labels=labels, groups=groups)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_kfold_never_splits_a_group(seed):
    table = synthetic_table(seed=seed)
    folds = grouped_kfold(table, n_folds=5, seed=seed)
    assert len(folds) == 5
    seen_val = np.concatenate([val for _, val in folds])
    assert sorted(seen_val.tolist()) == list(range(len(table)))  # each image validated exactly once
    groups = np.array(table.groups)
    for train, val in folds:
        assert len(np.intersect1d(train, val)) == 0
        assert len(train) + len(val) == len(table)
        assert set(groups[train]).isdisjoint(set(groups[val]))


def test_kfold_is_stratified_within_tolerance():
    table = synthetic_table(n_groups=200, seed=7)
    labels = np.array(table.labels)
    overall = {lab: np.mean(labels == lab) for lab in set(table.labels)}
    for _, val in grouped_kfold(table, n_folds=5, seed=0):
        for lab, share in overall.items():
            assert abs(np.mean(labels[val] == lab) - share) < 0.06, lab


def test_kfold_depends_on_seed_and_is_reproducible():
    table = synthetic_table()
    a = grouped_kfold(table, 5, seed=0)
    b = grouped_kfold(table, 5, seed=0)
    c = grouped_kfold(table, 5, seed=1)
    assert all(np.array_equal(x[1], y[1]) for x, y in zip(a, b))
    assert any(not np.array_equal(x[1], y[1]) for x, y in zip(a, c))


def test_too_few_groups_says_how_many():
    table = synthetic_table(n_groups=3)
    with pytest.raises(DataError, match=r"only 3 group\(s\) for 5 folds"):
        grouped_kfold(table, n_folds=5)
    with pytest.raises(ConfigError):
        grouped_kfold(table, n_folds=1)


def test_images_without_group_are_their_own_group():
    table = synthetic_table(n_groups=4)
    table.groups = [None] * len(table)
    folds = grouped_kfold(table, n_folds=5, seed=0)  # 4 groups would be too few; per image it works
    assert sorted(np.concatenate([v for _, v in folds]).tolist()) == list(range(len(table)))
    assert "no groups" in group_warning(table)
    assert group_warning(synthetic_table()) is None


@pytest.mark.parametrize("seed", [0, 5])
def test_train_val_split(seed):
    table = synthetic_table(n_groups=100, seed=seed)
    train, val = grouped_train_val_split(table, val_fraction=0.2, seed=seed)
    groups = np.array(table.groups)
    assert set(groups[train]).isdisjoint(groups[val])
    assert len(train) + len(val) == len(table)
    assert 0.12 < len(val) / len(table) < 0.28
    with pytest.raises(ConfigError):
        grouped_train_val_split(table, val_fraction=1.5)


def test_split_count_table(tiny_taxonomy):
    table = synthetic_table(n_groups=30)
    folds = grouped_kfold(table, n_folds=3, seed=0)
    console = Console(record=True, width=120)
    console.print(split_count_table(table, tiny_taxonomy, folds))
    text = console.export_text()
    assert "fold 3" in text
    root_row = next(line for line in text.splitlines() if "root" in line)
    numbers = [int(x) for x in root_row.replace("│", " ").split() if x.isdigit()]
    assert numbers[0] == len(table) and sum(numbers[1:]) == len(table)
    single = Console(record=True, width=120)
    single.print(split_count_table(table, tiny_taxonomy, [grouped_train_val_split(table)]))
    header = next(line for line in single.export_text().splitlines() if "node" in line)
    assert "train" in header and "val" in header


def test_a_set_too_small_to_stratify_is_split_with_a_warning_not_a_traceback():
    """Three images per label and a 0.2 validation share (5 folds): scikit-learn refuses to stratify."""
    from hiercls.data import DataWarning

    labels = [label for label in ("a", "b", "c") for _ in range(3)]
    table = ImageTable(root=Path("."), paths=[Path(f"{i}.png") for i in range(9)], labels=labels, groups=[None] * 9)
    with pytest.warns(DataWarning, match="not stratified"):
        train, val = grouped_train_val_split(table, 0.2, seed=0)
    assert len(val) >= 1 and len(train) + len(val) == 9 and not set(train) & set(val)
