"""``val_fraction`` is split as 1/k of the groups: a value that is not 1/k is warned about, and the real share printed."""

from __future__ import annotations

import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest

from hiercls import engine
from hiercls.data import DataWarning, ImageTable
from hiercls.data.splits import grouped_train_val_split, val_fraction_folds


def table(n: int = 40) -> ImageTable:
    paths = [Path(f"img{i}.png") for i in range(n)]
    labels = ["a" if i % 2 else "b" for i in range(n)]
    return ImageTable(root=Path("."), paths=paths, labels=labels, groups=[f"g{i // 2}" for i in range(n)],
                      raw_labels=labels, source="manifest.csv")


def fraction_warnings(val_fraction: float) -> tuple[list[str], tuple]:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        split = grouped_train_val_split(table(), val_fraction, seed=0)
    return [str(w.message) for w in seen if issubclass(w.category, DataWarning) and "val_fraction" in str(w.message)], split


@pytest.mark.parametrize("asked", [0.4, 0.99, 0.3])
def test_a_fraction_that_is_not_1_over_k_warns_with_the_share_achieved(asked: float):
    messages, (_, val) = fraction_warnings(asked)
    k = val_fraction_folds(asked)
    assert len(messages) == 1
    assert f"val_fraction {asked:g} is not 1/k" in messages[0]
    assert f"1/{k} of the groups" in messages[0]
    assert f"{len(val)} of 40 images ({len(val) / 40:.2f})" in messages[0]


@pytest.mark.parametrize("asked", [0.2, 0.5, 0.25])
def test_a_1_over_k_fraction_does_not_warn(asked: float):
    messages, (_, val) = fraction_warnings(asked)
    assert messages == []
    assert len(val) == round(40 * asked)


def test_the_fit_summary_note_gives_the_share_achieved_not_the_one_asked():
    config = SimpleNamespace(seed=0, split_seed=None, folds=None, effective_val_fraction=0.4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        train, val, note = engine._split(config, table())
    assert len(val) == 20 and len(train) == 20
    assert note == "val_fraction 0.50: 1/2 of the groups, 0.4 asked"
    config.effective_val_fraction = 0.2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        _, val, note = engine._split(config, table())
    assert note == f"val_fraction {len(val) / 40:.2f}, 0.2 asked"
