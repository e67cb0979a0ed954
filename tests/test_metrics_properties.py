"""Properties of the hierarchical metrics on random trees and random labels (hypothesis)."""

from __future__ import annotations

from itertools import count

import numpy as np
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from hiercls.metrics import hierarchical_prf, per_level_accuracy
from hiercls.taxonomy import Taxonomy

# Tree shapes: a leaf is None, an internal node a list of 1-4 subtrees.
shapes = st.recursive(st.none(), lambda sub: st.lists(sub, min_size=1, max_size=4), max_leaves=12)


def _name(shape, counter) -> dict:
    return {f"n{next(counter)}": _name(child, counter) if child is not None else {} for child in shape}


@st.composite
def trees(draw) -> Taxonomy:
    shape = draw(shapes.filter(lambda s: isinstance(s, list)))
    return Taxonomy.from_nested(_name(shape, count()))


@st.composite
def tree_and_pairs(draw):
    tax = draw(trees())
    nodes = [n for n in tax.nodes if n != tax.root]
    n = draw(st.integers(1, 12))
    true = draw(st.lists(st.sampled_from(nodes), min_size=n, max_size=n))
    pred = draw(st.lists(st.sampled_from([*nodes, tax.root]), min_size=n, max_size=n))
    return tax, true, pred


SETTINGS = settings(max_examples=60, deadline=None)


@SETTINGS
@given(tree_and_pairs())
def test_hf_is_one_exactly_when_all_predictions_are_right(case):
    tax, true, pred = case
    for average in ("micro", "macro"):
        assert hierarchical_prf(tax, true, true, average)["hF"] == 1.0
        if pred != true:
            assert hierarchical_prf(tax, true, pred, average)["hF"] < 1.0


@SETTINGS
@given(tree_and_pairs())
def test_scores_lie_in_unit_interval(case):
    tax, true, pred = case
    for average in ("micro", "macro"):
        for value in hierarchical_prf(tax, true, pred, average).values():
            assert 0.0 <= value <= 1.0
    for value in per_level_accuracy(tax, true, pred).values():
        assert value is None or 0.0 <= value <= 1.0


@SETTINGS
@given(tree_and_pairs(), st.data())
def test_parent_beats_sibling_for_deep_leaves(case, data):
    tax, true, pred = case
    candidates = [
        leaf for leaf in tax.leaves if tax.depth(leaf) >= 2 and len(tax.children(tax.parent(leaf))) >= 2
    ]
    assume(candidates)
    leaf = data.draw(st.sampled_from(candidates))
    parent = tax.parent(leaf)
    sibling = data.draw(st.sampled_from([c for c in tax.children(parent) if c != leaf]))
    # Alone, and alongside other random examples: the less specific right answer scores higher.
    for others_true, others_pred in (([], []), (true, pred)):
        with_parent = hierarchical_prf(tax, [*others_true, leaf], [*others_pred, parent])["hF"]
        with_sibling = hierarchical_prf(tax, [*others_true, leaf], [*others_pred, sibling])["hF"]
        assert with_parent > with_sibling


@SETTINGS
@given(tree_and_pairs())
def test_micro_hf_is_harmonic_mean_of_hp_and_hr(case):
    tax, true, pred = case
    r = hierarchical_prf(tax, true, pred)
    expected = 0.0 if r["hP"] + r["hR"] == 0 else 2 * r["hP"] * r["hR"] / (r["hP"] + r["hR"])
    assert np.isclose(r["hF"], expected)
