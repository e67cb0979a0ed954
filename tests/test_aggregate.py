"""Group aggregation: mode with its tie-breaking, mean of probabilities, group truth, the registry."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hiercls.aggregate import (
    GroupAggregator,
    MeanAggregator,
    ModeAggregator,
    aggregate_truth,
    aggregator_names,
    evaluate_groups,
    get_aggregator,
)
from hiercls.errors import ConfigError, DataError
from hiercls.probabilities import NodeProbabilities
from hiercls.taxonomy import load_taxonomy

TAXONOMY = Path(__file__).resolve().parents[1] / "taxonomy" / "leukemia.yaml"


@pytest.fixture(scope="module")
def tax():
    return load_taxonomy(TAXONOMY)


def _leaf_probs(tax, rows: list[dict[str, float]]) -> NodeProbabilities:
    leaf = np.zeros((len(rows), len(tax.leaves)))
    for i, row in enumerate(rows):
        for name, p in row.items():
            leaf[i, tax.leaves.index(name)] = p
    return NodeProbabilities.from_leaf_probabilities(tax, leaf)


def test_mode_majority_vote_in_first_appearance_order(tax):
    groups = ["s2", "s1", "s2", "s2", "s1"]
    preds = ["ALL", "CLL", "AML", "ALL", "CLL"]
    ids, group_preds, group_probs = ModeAggregator().aggregate(tax, groups, preds, None)
    assert ids == ["s2", "s1"]
    assert group_preds == ["ALL", "CLL"]
    assert group_probs is None


def test_mode_tie_broken_by_summed_probability(tax):
    groups = ["s"] * 4
    preds = ["ALL", "AML", "ALL", "AML"]
    probs = _leaf_probs(tax, [{"ALL": 0.6, "AML": 0.4}, {"ALL": 0.1, "AML": 0.9},
                              {"ALL": 0.5, "AML": 0.5}, {"ALL": 0.4, "AML": 0.6}])
    # ALL: 0.6 + 0.1 + 0.5 + 0.4 = 1.6; AML: 2.4 -> AML wins although ALL was predicted first.
    _, group_preds, group_probs = ModeAggregator().aggregate(tax, groups, preds, probs)
    assert group_preds == ["AML"]
    np.testing.assert_allclose(group_probs.column("AML"), [0.6])
    assert group_probs.consistency_error() < 1e-12


def test_mode_tie_without_probabilities_goes_to_first_predicted(tax):
    _, group_preds, _ = ModeAggregator().aggregate(tax, ["s"] * 4, ["CML", "Normal", "Normal", "CML"], None)
    assert group_preds == ["CML"]
    _, group_preds, _ = ModeAggregator().aggregate(tax, ["s"] * 4, ["Normal", "CML", "CML", "Normal"], None)
    assert group_preds == ["Normal"]


def test_mean_aggregator_decodes_the_mean(tax):
    groups = ["a", "a", "b"]
    probs = _leaf_probs(tax, [{"ALL": 0.9, "Normal": 0.1}, {"Normal": 0.2, "AML": 0.8}, {"CML": 1.0}])
    preds = probs.decode("greedy")
    assert preds[:2] == ["ALL", "AML"]
    ids, group_preds, group_probs = MeanAggregator().aggregate(tax, groups, preds, probs)
    # Mean for "a": Leukemia 0.85 > Normal 0.15; Acute 0.85; ALL 0.45 > AML 0.4.
    assert ids == ["a", "b"] and group_preds == ["ALL", "CML"]
    np.testing.assert_allclose(group_probs.column("Leukemia"), [0.85, 1.0])
    # Threshold decoding stops at Acute, whose best child has 0.45 / 0.85 < 0.8.
    _, group_preds, _ = MeanAggregator(decode="threshold", threshold=0.8).aggregate(tax, groups, preds, probs)
    assert group_preds == ["Acute", "CML"]


def test_mean_needs_probabilities(tax):
    with pytest.raises(ConfigError, match="p: columns"):
        MeanAggregator().aggregate(tax, ["a"], ["ALL"], None)


def test_rows_without_group_are_refused(tax):
    with pytest.raises(DataError, match="no group"):
        ModeAggregator().aggregate(tax, ["a", None], ["ALL", "AML"], None)


def test_registry(tax):
    from hiercls.hookspecs import hookimpl
    from hiercls.plugins import get_plugin_manager

    assert isinstance(get_aggregator("mode"), ModeAggregator)
    assert get_aggregator("mean", decode="best_leaf").decode == "best_leaf"
    with pytest.raises(ConfigError, match="unknown aggregator 'median'.*available: mode, mean"):
        get_aggregator("median")

    class FirstImage(GroupAggregator):
        name = "first"

        def aggregate(self, taxonomy, groups, pred_nodes, probs):
            seen: dict[str, str] = {}
            for g, p in zip(groups, pred_nodes):
                seen.setdefault(g, p)
            return list(seen), list(seen.values()), None

    class FirstImagePlugin:
        @staticmethod
        @hookimpl
        def register_aggregators(register):
            register("first", FirstImage)
            register("bad", object)

    pm = get_plugin_manager()
    pm.register(FirstImagePlugin, name="first-image-test-plugin")
    try:
        assert "first" in aggregator_names()
        assert get_aggregator("first").aggregate(tax, ["x", "x"], ["AML", "ALL"], None)[1] == ["AML"]
        with pytest.raises(ConfigError, match="not a GroupAggregator subclass"):
            get_aggregator("bad")
    finally:
        pm.unregister(FirstImagePlugin)
    assert "first" not in aggregator_names()


def test_aggregate_truth_agreeing_mixed_and_unlabelled():
    groups = ["s1", "s1", "s2", "s2", "s2", "s3", "s4", "s4"]
    labels = ["ALL", "ALL", "CLL", "CML", "CML", None, "AML", "ALL"]
    truth = aggregate_truth(groups, labels)
    assert truth.group_ids == ["s1", "s2", "s3", "s4"]
    # s4 is a tie (AML, ALL): the label seen first wins.
    assert truth.true_nodes == ["ALL", "CML", None, "AML"]
    assert truth.mixed_groups == ["s2", "s4"] and truth.n_mixed == 2


# The paper's per-fold count: g1 = 4 images labelled ALL voted ALL, g2 = 2 images labelled CLL voted CML.
VOTE_GROUPS = ["g1", "g1", "g1", "g1", "g2", "g2"]
VOTE_LABELS = ["ALL", "ALL", "ALL", "ALL", "CLL", "CLL"]
VOTE_PREDS = ["ALL", "ALL", "AML", "ALL", "CML", "CML"]


def test_vote_then_score_images_counts_images(tax):
    mode = get_aggregator("mode")
    images = evaluate_groups(tax, VOTE_GROUPS, VOTE_LABELS, VOTE_PREDS, None, mode, "mode", scoring="images")
    groups = evaluate_groups(tax, VOTE_GROUPS, VOTE_LABELS, VOTE_PREDS, None, mode, "mode", scoring="groups")
    assert images["accuracy"] == pytest.approx(4 / 6) and images["n_images"] == 6
    assert groups["accuracy"] == pytest.approx(1 / 2) and groups["n_images"] == 2
    assert images["n_groups"] == groups["n_groups"] == 2
    assert (images["scoring"], groups["scoring"]) == ("images", "groups")
    # The vote changed the AML image of g1 to ALL: plain image scoring would say 3 / 6.
    assert images["per_class"]["ALL"]["support"] == 4 and images["per_class"]["AML"]["precision"] is None


def test_vote_then_score_images_spreads_group_probabilities(tax):
    rows = [{"ALL": 0.9, "AML": 0.1}] * 3 + [{"AML": 0.8, "ALL": 0.2}] + [{"CML": 0.7, "CLL": 0.3}] * 2
    probs = _leaf_probs(tax, rows)
    groups = ["g1", "g1", "g1", "g1", "g2", "g2"]
    labels = ["ALL", "ALL", "ALL", "AML", "CLL", None]
    mean = MeanAggregator()
    metrics = evaluate_groups(tax, groups, labels, probs.decode(), probs, mean, "mean", scoring="images")
    # 5 labelled images, each with its group's decoded mean: g1 -> ALL (3 of 4 right), g2 -> CML (0 of 1).
    assert metrics["n_images"] == 5 and metrics["accuracy"] == pytest.approx(3 / 5)
    assert any("1 image(s) without a label" in n for n in metrics["notes"])
    assert metrics["auroc"] is not None and metrics["n_mixed_groups"] == 1


def test_group_scoring_name_is_checked(tax):
    with pytest.raises(ConfigError, match="group scoring 'slides'"):
        evaluate_groups(tax, VOTE_GROUPS, VOTE_LABELS, VOTE_PREDS, None, ModeAggregator(), scoring="slides")


def test_group_decision_columns_say_where_they_come_from_when_the_vote_beats_the_mean(tax):
    # Two images lean to CML, one is sure of CLL: the vote says CML (right), the mean says CLL.
    rows = [{"CML": 0.55, "CLL": 0.45}, {"CML": 0.55, "CLL": 0.45}, {"CLL": 0.99, "CML": 0.01}]
    probs = _leaf_probs(tax, rows)
    groups, labels = ["g"] * 3, ["CML"] * 3
    voted = evaluate_groups(tax, groups, labels, probs.decode(), probs, ModeAggregator(), "mode")
    assert voted["decision_accuracy"]["Chronic"] == 0.0  # own subtree: the group's mean probabilities
    assert voted["per_level_accuracy"]["Chronic"] == 1.0  # end to end: the vote
    assert any("'own subtree' from each group's mean probabilities" in n and "mode prediction" in n
               for n in voted["notes"])
    averaged = evaluate_groups(tax, groups, labels, probs.decode(), probs, MeanAggregator(), "mean")
    assert not any("own subtree" in n for n in averaged["notes"])
