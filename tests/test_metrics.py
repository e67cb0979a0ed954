"""Metrics on hand-checked examples and against scikit-learn."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import f1_score, precision_recall_fscore_support, roc_auc_score

from hiercls.errors import DataError
from hiercls.metrics import (
    METRIC_KEYS,
    accuracy,
    auroc,
    confusion_matrices,
    decision_accuracy,
    evaluate_predictions,
    expected_calibration_error,
    hierarchical_prf,
    leaf_accuracy,
    leaf_confusion_matrix,
    macro_f1,
    mistake_severity,
    node_heights,
    per_class_prf,
    per_level_accuracy,
    prf_counts,
)
from hiercls.probabilities import NodeProbabilities
from hiercls.taxonomy import Taxonomy, load_taxonomy

TAXONOMY_DIR = Path(__file__).resolve().parents[1] / "taxonomy"

# The worked example of docs/metrics.md: (true, predicted).
WORKED = [("ALL", "ALL"), ("ALL", "AML"), ("Normal", "CLL"), ("CML", "Chronic")]


@pytest.fixture(scope="module")
def leukemia() -> Taxonomy:
    return load_taxonomy(TAXONOMY_DIR / "leukemia.yaml")


def _split(pairs):
    return [t for t, _ in pairs], [p for _, p in pairs]


def _random_probs(tax: Taxonomy, n: int, seed: int) -> NodeProbabilities:
    rng = np.random.default_rng(seed)
    return NodeProbabilities.from_leaf_probabilities(tax, rng.dirichlet(np.ones(len(tax.leaves)), size=n))


# -- hierarchical P/R/F ---------------------------------------------------------------------


def test_worked_example_exact_fractions(leukemia):
    true, pred = _split(WORKED)
    result = hierarchical_prf(leukemia, true, pred)
    assert Fraction(result["hP"]).limit_denominator(1000) == Fraction(7, 11)
    assert Fraction(result["hR"]).limit_denominator(1000) == Fraction(7, 10)
    assert Fraction(result["hF"]).limit_denominator(1000) == Fraction(2, 3)
    assert result["hP"] == 7 / 11 and result["hR"] == 7 / 10 and result["hF"] == 2 / 3


def test_worked_example_macro_average(leukemia):
    true, pred = _split(WORKED)
    result = hierarchical_prf(leukemia, true, pred, average="macro")
    # per example hP: 1, 2/3, 0, 1; hR: 1, 2/3, 0, 2/3; hF: 1, 2/3, 0, 4/5
    assert result["hP"] == pytest.approx(float(Fraction(2, 3)))
    assert result["hR"] == pytest.approx(float(Fraction(7, 12)))
    assert result["hF"] == pytest.approx(float(Fraction(37, 60)))


def test_partial_label_and_prediction_at_internal_node(leukemia):
    # A label known only down to "Acute", predicted as the leaf ALL: everything known is right.
    r = hierarchical_prf(leukemia, ["Acute"], ["ALL"])
    assert (r["hP"], r["hR"]) == (pytest.approx(2 / 3), 1.0)
    # A prediction that stops at "Leukemia" for an ALL image: precise but incomplete.
    r = hierarchical_prf(leukemia, ["ALL"], ["Leukemia"])
    assert (r["hP"], r["hR"]) == (1.0, pytest.approx(1 / 3))
    # A prediction stopped at the root predicts nothing: zero precision mass, recall 0.
    r = hierarchical_prf(leukemia, ["ALL"], ["root"])
    assert r == {"hP": 0.0, "hR": 0.0, "hF": 0.0}


def test_unknown_node_is_a_data_error(leukemia):
    with pytest.raises(DataError, match="Lymphoma"):
        hierarchical_prf(leukemia, ["ALL"], ["Lymphoma"])


# -- flat metrics ---------------------------------------------------------------------------


def test_accuracy_and_leaf_accuracy_exclude_partial_labels(leukemia):
    true = ["ALL", "AML", "Acute", "CLL"]
    pred = ["ALL", "ALL", "ALL", "CLL"]
    assert accuracy(true, pred) == 0.5
    assert leaf_accuracy(leukemia, true, pred) == pytest.approx(2 / 3)
    assert leaf_accuracy(leukemia, ["Acute"], ["ALL"]) is None


def test_macro_f1_and_per_class_match_sklearn_on_leaves(leukemia):
    rng = np.random.default_rng(3)
    leaves = list(leukemia.leaves)
    true = [leaves[i] for i in rng.integers(0, len(leaves), 200)]
    pred = [leaves[i] for i in rng.integers(0, len(leaves), 200)]
    assert macro_f1(leukemia, true, pred) == pytest.approx(f1_score(true, pred, average="macro"))
    p, r, f, s = precision_recall_fscore_support(true, pred, labels=leaves, zero_division=0)
    table = per_class_prf(leukemia, true, pred)
    for k, leaf in enumerate(leaves):
        assert table[leaf]["precision"] == pytest.approx(p[k])
        assert table[leaf]["recall"] == pytest.approx(r[k])
        assert table[leaf]["f1"] == pytest.approx(f[k])
        assert table[leaf]["support"] == s[k]


def test_per_class_internal_nodes_and_undefined_values(leukemia):
    true, pred = _split(WORKED)
    table = per_class_prf(leukemia, true, pred)
    # Leukemia: truth under it for 3 images, predicted under it for all 4.
    assert table["Leukemia"] == {"precision": 0.75, "recall": 1.0, "f1": pytest.approx(6 / 7), "support": 3}
    # Reactive is neither true nor predicted anywhere: nothing is defined, nothing is faked.
    assert table["Reactive"] == {"precision": None, "recall": None, "f1": None, "support": 0}
    # A partial label above a node says nothing about that node.
    table = per_class_prf(leukemia, ["Acute"], ["ALL"])
    assert table["ALL"]["support"] == 0 and table["ALL"]["precision"] is None
    assert table["Acute"]["precision"] == 1.0


# -- per-level accuracy and confusion matrices -----------------------------------------------


def test_per_level_accuracy_hand_example(leukemia):
    true, pred = _split(WORKED)
    true.append("APML")
    pred.append("root")  # stopped before the first decision: wrong at every level below
    levels = per_level_accuracy(leukemia, true, pred)
    assert levels == {
        "root": pytest.approx(3 / 5),  # Normal image predicted under Leukemia; root stop wrong
        "Leukemia": pytest.approx(3 / 4),  # 4 leukemia images, the root stop is wrong
        "Acute": pytest.approx(1 / 3),  # ALL->ALL right, ALL->AML wrong, APML->root wrong
        "Chronic": 0.0,  # CML predicted only down to "Chronic": stops above, wrong
    }


def test_per_level_accuracy_none_without_images(leukemia):
    levels = per_level_accuracy(leukemia, ["Normal"], ["Normal"])
    assert levels["root"] == 1.0 and levels["Acute"] is None


def test_confusion_matrices(leukemia):
    true, pred = _split(WORKED)
    cms = confusion_matrices(leukemia, true, pred)
    assert cms["root"].labels == ("Normal", "Reactive", "Leukemia")
    np.testing.assert_array_equal(cms["root"].matrix, [[0, 0, 1], [0, 0, 0], [0, 0, 3]])
    assert cms["Chronic"].matrix.sum() == 0 and cms["Chronic"].n_outside == 1
    leaf = leaf_confusion_matrix(leukemia, true, pred)
    assert leaf.matrix.sum() == 3 and leaf.n_outside == 1


# -- AUROC ----------------------------------------------------------------------------------


def test_auroc_matches_sklearn(leukemia):
    n = 300
    probs = _random_probs(leukemia, n, seed=1)
    rng = np.random.default_rng(2)
    leaves = list(leukemia.leaves)
    true = [leaves[i] for i in rng.integers(0, len(leaves), n)]
    result = auroc(leukemia, true, probs)
    leaf_p = probs.leaf_marginals()
    y = np.array(true)
    for k, leaf in enumerate(leaves):
        assert result["leaves"][leaf] == pytest.approx(roc_auc_score(y == leaf, leaf_p[:, k]))
    order = np.argsort(leaves)  # scikit-learn wants sorted labels
    assert result["leaf_macro"] == pytest.approx(
        roc_auc_score(y, leaf_p[:, order], multi_class="ovr", average="macro", labels=sorted(leaves))
    )
    # Decision at "Acute": images under Acute, OvR over ALL/AML/APML with conditionals.
    rows = np.isin(y, ["ALL", "AML", "APML"])
    children = ["ALL", "AML", "APML"]
    cond = probs.conditional[rows][:, [leukemia.index[c] for c in children]]
    expected = roc_auc_score(y[rows], cond, multi_class="ovr", average="macro", labels=children)
    assert result["nodes"]["Acute"] == pytest.approx(expected)
    # Decision at the root: Normal / Reactive / Leukemia from the top-level conditionals.
    top = np.where(np.isin(y, ["Normal", "Reactive"]), y, "Leukemia")
    expected = np.mean([
        roc_auc_score(top == c, probs.conditional[:, leukemia.index[c]]) for c in ("Normal", "Reactive", "Leukemia")
    ])
    assert result["nodes"]["root"] == pytest.approx(expected)


def test_auroc_skips_absent_classes_and_says_so(leukemia):
    probs = _random_probs(leukemia, 6, seed=4)
    true = ["ALL", "AML", "ALL", "AML", "Normal", "Normal"]
    notes: list[str] = []
    result = auroc(leukemia, true, probs, notes=notes)
    assert set(result["leaves"]) == {"ALL", "AML", "Normal"}
    assert result["nodes"]["Chronic"] is None
    assert any("APML" in n for n in notes)


# -- mistake severity -----------------------------------------------------------------------


def test_mistake_severity(leukemia):
    true, pred = _split(WORKED)
    result = mistake_severity(leukemia, true, pred)
    # mistakes: ALL->AML (distance 2, LCA Acute depth 2), Normal->CLL (4, root 0), CML->Chronic (1, Chronic 2)
    assert result["n_mistakes"] == 3
    assert result["mean_distance"] == pytest.approx(7 / 3)
    assert result["mean_lca_depth"] == pytest.approx(4 / 3)


def test_mistake_severity_partial_label_and_no_mistakes(leukemia):
    assert mistake_severity(leukemia, ["Acute", "ALL"], ["APML", "ALL"]) == {
        "mean_distance": None, "mean_lca_depth": None, "n_mistakes": 0,
        "mean_lca_height": None, "n_leaf_mistakes": 0,
    }
    assert mistake_severity(leukemia, ["Acute"], ["CLL"])["mean_distance"] == 3


def test_node_heights_are_the_longest_path_down_to_a_leaf(leukemia):
    heights = node_heights(leukemia)
    assert heights["root"] == 3 and heights["Leukemia"] == 2 and heights["Acute"] == heights["Chronic"] == 1
    assert all(heights[leaf] == 0 for leaf in leukemia.leaves)


def test_mean_lca_height_bertinetto_examples(leukemia):
    # ALL predicted CLL part at Leukemia (height 2); Normal predicted CML part at the root (height 3)
    assert mistake_severity(leukemia, ["ALL"], ["CLL"])["mean_lca_height"] == 2
    assert mistake_severity(leukemia, ["Normal"], ["CML"])["mean_lca_height"] == 3
    # only leaf-to-leaf mistakes: CML->Chronic (a stop) and Acute->CLL (a partial label) are left out
    result = mistake_severity(leukemia, ["ALL", "Normal", "CML", "Acute", "AML"], ["CLL", "CML", "Chronic", "CLL", "AML"])
    assert result["mean_lca_height"] == pytest.approx(5 / 2)
    assert (result["n_leaf_mistakes"], result["n_mistakes"]) == (2, 4)


# -- decision accuracy (each decision on its own subtree) -----------------------------------


def _conditionals(tax: Taxonomy, rows: list[dict[str, dict[str, float]]]) -> NodeProbabilities:
    """Probabilities from per-row {internal node: {child: P(child | node)}}; unspecified decisions uniform."""
    cond = np.ones((len(rows), tax.num_nodes))
    for i, row in enumerate(rows):
        for node in tax.internal_nodes:
            children = tax.children(node)
            given = row.get(node, {})
            for child in children:
                cond[i, tax.index[child]] = given.get(child, 1.0 / len(children))
    return NodeProbabilities.from_conditionals(tax, cond)


def test_decision_accuracy_scores_each_decision_on_its_own_subtree(leukemia):
    true = ["CLL", "CML", "Acute", "Normal"]
    probs = _conditionals(leukemia, [
        # routed to Normal at the root, but the Leukemia and Chronic decisions are right
        {"root": {"Normal": 0.6, "Reactive": 0.1, "Leukemia": 0.3}, "Leukemia": {"Acute": 0.2, "Chronic": 0.8},
         "Chronic": {"CLL": 0.9, "CML": 0.1}},
        {"root": {"Normal": 0.2, "Reactive": 0.1, "Leukemia": 0.7}, "Leukemia": {"Acute": 0.1, "Chronic": 0.9},
         "Chronic": {"CLL": 0.6, "CML": 0.4}},
        # a partial label at Acute: counts for root and Leukemia, not for Acute
        {"root": {"Normal": 0.1, "Reactive": 0.1, "Leukemia": 0.8}, "Leukemia": {"Acute": 0.3, "Chronic": 0.7},
         "Chronic": {"CLL": 0.7, "CML": 0.3}},
        {"root": {"Normal": 0.5, "Reactive": 0.2, "Leukemia": 0.3}},
    ])
    pred = probs.decode("greedy")
    assert pred == ["Normal", "CLL", "CLL", "Normal"]
    assert decision_accuracy(leukemia, true, probs) == {
        "root": 3 / 4,       # CLL routed to Normal
        "Leukemia": 2 / 3,   # CLL (Chronic, right), CML (right), Acute (Chronic chosen, wrong)
        "Acute": None,       # no image labelled under Acute
        "Chronic": 1 / 2,    # CLL right on its own subtree, CML -> CLL wrong
    }
    # end to end, the routing error above counts as a miss at every decision below it
    assert per_level_accuracy(leukemia, true, pred) == {"root": 3 / 4, "Leukemia": 1 / 3, "Acute": None, "Chronic": 0.0}


def test_decision_accuracy_from_marginals_picks_the_child_with_the_highest_marginal(leukemia):
    order = {leaf: k for k, leaf in enumerate(leukemia.leaves)}
    leaf_probs = np.zeros((1, len(order)))
    for leaf, p in {"Normal": 0.6, "ALL": 0.05, "AML": 0.05, "CLL": 0.2, "CML": 0.1}.items():
        leaf_probs[0, order[leaf]] = p
    probs = NodeProbabilities.from_leaf_probabilities(leukemia, leaf_probs)
    # root: Normal 0.6 > Leukemia 0.4 (wrong); Leukemia: Chronic 0.3 > Acute 0.1; Chronic: CLL 0.2 > CML 0.1
    assert decision_accuracy(leukemia, ["CLL"], probs) == {"root": 0.0, "Leukemia": 1.0, "Acute": None, "Chronic": 1.0}


def test_evaluate_predictions_reports_decision_accuracy_only_with_probabilities(leukemia):
    true, pred = _split(WORKED)
    probs = _random_probs(leukemia, len(true), seed=3)
    metrics = evaluate_predictions(leukemia, true, pred, probs)
    assert metrics["decision_accuracy"] == decision_accuracy(leukemia, true, probs)
    assert evaluate_predictions(leukemia, true, pred)["decision_accuracy"] is None


def test_prf_counts_of_a_merged_class(leukemia):
    true = ["AML", "APML", "ALL", "Acute", "Normal", "APML"]
    pred = ["APML", "AML", "AML", "AML", "APML", "ALL"]
    # AML+APML: AML->APML and APML->AML are hits; ALL->AML and Normal->APML false positives;
    # APML->ALL a miss; the partial label Acute says nothing about AML+APML and is left out
    assert prf_counts(leukemia, true, pred, ["AML", "APML"]) == {"tp": 2, "fp": 2, "fn": 1}
    per_class = per_class_prf(leukemia, true, pred)
    assert per_class["AML"]["support"] == 1 and per_class["APML"]["support"] == 2
    with pytest.raises(ValueError, match="non-root nodes"):
        prf_counts(leukemia, true, pred, ["root"])


# -- calibration ----------------------------------------------------------------------------


def _two_leaf_probs(p_first: np.ndarray) -> tuple[Taxonomy, NodeProbabilities]:
    tax = Taxonomy.from_nested({"a": {}, "b": {}})
    leaf = np.stack([p_first, 1 - p_first], axis=1)
    return tax, NodeProbabilities.from_leaf_probabilities(tax, leaf)


def test_ece_is_zero_when_perfectly_calibrated():
    # 10 images at confidence 0.7 for "a", 7 of them really "a"; 10 at 0.9, 9 right.
    p = np.array([0.7] * 10 + [0.9] * 10)
    tax, probs = _two_leaf_probs(p)
    true = ["a"] * 7 + ["b"] * 3 + ["a"] * 9 + ["b"]
    result = expected_calibration_error(tax, true, probs)
    assert result["per_depth"]["1"] == pytest.approx(0.0, abs=1e-12)


def test_ece_statistically_calibrated_is_small_and_overconfident_is_not():
    rng = np.random.default_rng(0)
    p = rng.uniform(0.5, 1.0, 20000)
    tax, probs = _two_leaf_probs(p)
    true = np.where(rng.uniform(size=p.size) < p, "a", "b").tolist()
    assert expected_calibration_error(tax, true, probs)["per_depth"]["1"] < 0.02
    # Confidence 0.9 everywhere but only half right: ECE = 0.4.
    tax, probs = _two_leaf_probs(np.full(10, 0.9))
    result = expected_calibration_error(tax, ["a"] * 5 + ["b"] * 5, probs)
    assert result["per_depth"]["1"] == pytest.approx(0.4)


def test_ece_per_depth_on_leukemia(leukemia):
    probs = _random_probs(leukemia, 50, seed=5)
    rng = np.random.default_rng(6)
    true = [leukemia.leaves[i] for i in rng.integers(0, 7, 50)]
    result = expected_calibration_error(leukemia, true, probs)
    assert set(result["per_depth"]) == {"1", "2", "3"}
    assert all(0.0 <= v <= 1.0 for v in result["per_depth"].values())


# -- everything at once ---------------------------------------------------------------------


def test_evaluate_predictions_keys_and_notes(leukemia):
    true, pred = _split(WORKED)
    probs = _random_probs(leukemia, len(true) + 1, seed=7)
    metrics = evaluate_predictions(leukemia, [*true, None], [*pred, "ALL"], probs)
    assert set(metrics) == set(METRIC_KEYS)
    assert metrics["n_images"] == 4
    assert metrics["hF"] == 2 / 3
    assert metrics["auroc"] is not None and metrics["ece"] is not None
    assert any("without a label" in n for n in metrics["notes"])


def test_evaluate_predictions_without_probabilities(leukemia):
    true, pred = _split(WORKED)
    metrics = evaluate_predictions(leukemia, true, pred)
    assert metrics["auroc"] is None and metrics["ece"] is None
    assert any("no probability columns" in n for n in metrics["notes"])


def test_evaluate_predictions_needs_labels(leukemia):
    with pytest.raises(DataError, match="no row has a label"):
        evaluate_predictions(leukemia, [None, None], ["ALL", "AML"])


def test_depth_accuracy_cuts_the_tree_at_each_depth(leukemia):
    from hiercls.metrics import depth_accuracy

    true = ["ALL", "CLL", "Normal", "Acute", "Reactive", "Leukemia"]
    pred = ["AML", "ALL", "Normal", "APML", "Leukemia", "Chronic"]
    # depth 1 (Normal | Reactive | Leukemia): all six rows, Reactive -> Leukemia is the one miss;
    # depth 2 (+ Acute | Chronic): the partial label Leukemia cannot say which, 5 rows, 3 right;
    # depth 3 (the leaves): only leaf labels, 4 rows, Normal right
    assert depth_accuracy(leukemia, true, pred) == {"1": 5 / 6, "2": 3 / 5, "3": 1 / 4}


def test_depth_accuracy_at_the_deepest_cut_of_leaf_labels_is_leaf_accuracy(leukemia):
    from hiercls.metrics import depth_accuracy

    rng = np.random.default_rng(0)
    nodes = [n for n in leukemia.nodes if n != leukemia.root]
    true = list(rng.choice(leukemia.leaves, 50))
    pred = list(rng.choice(nodes, 50))
    assert depth_accuracy(leukemia, true, pred)["3"] == pytest.approx(leaf_accuracy(leukemia, true, pred))


def test_ece_counts_a_confident_shallow_leaf_for_a_deep_image_as_a_mistake(leukemia):
    # Two ALL images (depth 3) sent to Normal (a leaf at depth 1) with probability 0.95.
    leaf = np.zeros((2, len(leukemia.leaves)))
    leaf[:, leukemia.leaves.index("Normal")] = 0.95
    leaf[:, leukemia.leaves.index("ALL")] = 0.05
    probs = NodeProbabilities.from_leaf_probabilities(leukemia, leaf)
    result = expected_calibration_error(leukemia, ["ALL", "ALL"], probs)
    for depth in ("1", "2", "3"):  # cut at any depth, Normal is itself: confidence 0.95, wrong
        assert result["per_depth"][depth] == pytest.approx(0.95)
    assert result["n_per_depth"] == {"1": 2, "2": 2, "3": 2}
    # A Normal image counts at every depth (a leaf stands for itself), an image labelled Leukemia only at depth 1
    both = expected_calibration_error(leukemia, ["Normal", "Leukemia"], probs)
    assert both["n_per_depth"] == {"1": 2, "2": 1, "3": 1}
    assert both["per_depth"]["3"] == pytest.approx(0.05)  # the Normal image: right at 0.95
