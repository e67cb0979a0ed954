"""Selective prediction with the threshold decoder: coverage, accuracy on decided images, hF."""

from __future__ import annotations

import numpy as np
import pytest

from hiercls.errors import ConfigError, DataError
from hiercls.metrics import hierarchical_prf
from hiercls.probabilities import NodeProbabilities
from hiercls.selective import DEFAULT_THRESHOLDS, selective_table, threshold_for_accuracy
from hiercls.taxonomy import Taxonomy

TREE = {"animal": {"cat": {}, "dog": {}}, "plant": {"tree": {}, "flower": {}}}


@pytest.fixture(scope="module")
def tree() -> Taxonomy:
    return Taxonomy.from_nested(TREE)


def random_probs(tree: Taxonomy, n: int = 300, seed: int = 0) -> tuple[NodeProbabilities, list[str]]:
    rng = np.random.default_rng(seed)
    probs = NodeProbabilities.from_leaf_probabilities(tree, rng.dirichlet(np.ones(len(tree.leaves)) * 0.7, n))
    labels = [tree.leaves[i] for i in rng.integers(0, len(tree.leaves), n)]
    return probs, labels


def test_coverage_is_monotone_and_threshold_zero_covers_everything(tree):
    probs, labels = random_probs(tree)
    rows = selective_table(tree, probs, labels)
    assert [r["threshold"] for r in rows] == sorted(DEFAULT_THRESHOLDS)
    assert rows[0]["threshold"] == 0.0 and rows[0]["coverage"] == 1.0 and rows[0]["n_decided"] == 300
    coverages = [r["coverage"] for r in rows]
    assert all(a >= b for a, b in zip(coverages, coverages[1:]))
    assert coverages[-1] < coverages[0]  # the test data make some images stop
    greedy = probs.decode("greedy")
    assert rows[0]["accuracy"] == pytest.approx(np.mean([p == t for p, t in zip(greedy, labels)]))
    assert rows[0]["hF"] == pytest.approx(hierarchical_prf(tree, labels, greedy)["hF"])
    assert all(r["n"] == 300 for r in rows)


def test_row_counts_follow_the_threshold_decoder(tree):
    # image 0: sure at both levels; image 1: unsure at the root; image 2: unsure between cat and dog
    cond = np.ones((3, tree.num_nodes))
    root, animal, plant = (tree.children_indices(n) for n in ("root", "animal", "plant"))
    cond[:, root] = [[0.9, 0.1], [0.55, 0.45], [0.8, 0.2]]
    cond[:, animal] = [[0.95, 0.05], [0.9, 0.1], [0.4, 0.6]]
    cond[:, plant] = 0.5
    probs = NodeProbabilities.from_conditionals(tree, cond)
    labels = ["cat", "dog", "dog"]
    (low, mid, high) = selective_table(tree, probs, labels, thresholds=[0.7, 0.0, 0.62])
    assert (low["threshold"], mid["threshold"], high["threshold"]) == (0.0, 0.62, 0.7)
    assert low["n_decided"] == 3 and low["accuracy"] == pytest.approx(2 / 3)  # cat right, cat wrong, dog right
    assert mid["n_decided"] == 1 and mid["accuracy"] == 1.0  # image 1 stops at the root, image 2 at animal
    assert high["n_decided"] == 1 and high["coverage"] == pytest.approx(1 / 3)
    # hF on all images: image 1 predicts the root (nothing), image 2 predicts animal (1 of 2 right nodes)
    assert mid["hF"] == pytest.approx(2 * (2 + 0 + 1) / ((2 + 0 + 1) + (2 + 2 + 2)))


def test_no_decided_image_has_no_accuracy(tree):
    probs, labels = random_probs(tree, n=20)
    rows = selective_table(tree, probs, labels, thresholds=[1.0])
    assert rows[0]["n_decided"] == 0 and rows[0]["accuracy"] is None and rows[0]["coverage"] == 0.0


def test_unlabelled_rows_are_left_out_and_partial_labels_not_scored(tree):
    probs, labels = random_probs(tree, n=10)
    rows = selective_table(tree, probs, [None, "animal", *labels[2:]], thresholds=[0.0])
    assert rows[0]["n"] == 9 and rows[0]["n_decided"] == 9
    expected = np.mean([p == t for p, t in zip(probs.decode("greedy")[2:], labels[2:])])
    assert rows[0]["accuracy"] == pytest.approx(expected)


def test_threshold_for_accuracy_picks_the_smallest_threshold_reaching_target():
    rows = [
        {"threshold": 0.0, "coverage": 1.0, "accuracy": 0.70},
        {"threshold": 0.5, "coverage": 0.9, "accuracy": 0.80},
        {"threshold": 0.7, "coverage": 0.6, "accuracy": 0.92},
        {"threshold": 0.9, "coverage": 0.3, "accuracy": 0.90},
        {"threshold": 0.99, "coverage": 0.0, "accuracy": None},
    ]
    assert threshold_for_accuracy(rows, 0.9)["threshold"] == 0.7
    assert threshold_for_accuracy(list(reversed(rows)), 0.8)["threshold"] == 0.5
    assert threshold_for_accuracy(rows, 0.7)["threshold"] == 0.0
    assert threshold_for_accuracy(rows, 0.95) is None
    with pytest.raises(ConfigError):
        threshold_for_accuracy(rows, 1.5)


def test_bad_inputs_are_refused(tree):
    probs, labels = random_probs(tree, n=5)
    with pytest.raises(ConfigError, match="outside"):
        selective_table(tree, probs, labels, thresholds=[0.5, 1.2])
    with pytest.raises(DataError, match="labels but"):
        selective_table(tree, probs, labels[:3])
    with pytest.raises(DataError, match="no image has a label"):
        selective_table(tree, probs, [None] * 5)
    broken = NodeProbabilities(tree, probs.conditional.copy(), probs.marginal.copy())
    broken.conditional[0, 1] = np.nan
    with pytest.raises(DataError, match="non-finite"):
        selective_table(tree, broken, labels)
