"""Tree index tables and the torch probability helpers shared by the strategies."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hiercls.models import tree_ops
from hiercls.probabilities import NodeProbabilities
from hiercls.taxonomy import Taxonomy, load_taxonomy

TAXONOMY_DIR = Path(__file__).resolve().parents[1] / "taxonomy"


@pytest.fixture(scope="module")
def leukemia() -> Taxonomy:
    return load_taxonomy(TAXONOMY_DIR / "leukemia.yaml")


@pytest.fixture(scope="module")
def blood_cells() -> Taxonomy:
    return load_taxonomy(TAXONOMY_DIR / "blood-cells.yaml")


def _decisions(tax: Taxonomy) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (leaf columns, leaf->child membership) pairs the flat strategy builds."""
    leaf_pos = {leaf: j for j, leaf in enumerate(tax.leaves)}
    out = []
    for node in tax.internal_nodes:
        under = tax.leaves_under(node)
        membership = torch.tensor(
            [[float(leaf in tax.leaves_under(child)) for child in tax.children(node)] for leaf in under]
        )
        out.append((torch.tensor([leaf_pos[leaf] for leaf in under]), membership))
    return out


def _produced(tax: Taxonomy) -> list[int]:
    return [c for node in tax.internal_nodes for c in tax.children_indices(node)]


def test_child_target_table_points_at_the_child_on_the_path(leukemia):
    table = tree_ops.child_target_table(leukemia, "Acute")
    expect = {"ALL": 0, "AML": 1, "APML": 2, "Acute": -1, "Leukemia": -1, "Normal": -1, "CLL": -1, "root": -1}
    for node, position in expect.items():
        assert table[leukemia.index[node]].item() == position, node
    root_table = tree_ops.child_target_table(leukemia, "root")
    assert root_table[leukemia.index["CML"]].item() == leukemia.children("root").index("Leukemia")
    assert root_table[leukemia.index["root"]].item() == -1


def test_level_target_table_skips_labels_above_the_level(blood_cells):
    table = tree_ops.level_target_table(blood_cells, 2)
    level = blood_cells.levels[2]
    assert table[blood_cells.index["erythroblast"]].item() == -1  # a leaf at depth 1
    assert table[blood_cells.index["granulocyte"]].item() == -1  # a partial label at depth 1
    assert table[blood_cells.index["band_neutrophil"]].item() == level.index("neutrophil")
    assert table[blood_cells.index["immature_granulocyte"]].item() == level.index("immature_granulocyte")
    assert table[blood_cells.index["lymphocyte"]].item() == level.index("lymphocyte")


def test_leaf_membership_rows(leukemia):
    table = tree_ops.leaf_membership(leukemia)
    assert table[leukemia.index["root"]].all()
    acute = [leukemia.leaves[j] for j in torch.nonzero(table[leukemia.index["Acute"]]).flatten().tolist()]
    assert acute == ["ALL", "AML", "APML"]
    assert table[leukemia.index["Normal"]].sum().item() == 1


def test_counts_under_adds_descendants(leukemia):
    counts = np.zeros(leukemia.num_nodes)
    for node, n in {"ALL": 3, "AML": 2, "Acute": 4, "CLL": 1, "Normal": 5}.items():
        counts[leukemia.index[node]] = n
    totals = tree_ops.counts_under(leukemia, counts)
    assert totals[leukemia.index["Acute"]] == 9
    assert totals[leukemia.index["Leukemia"]] == 10
    assert totals[leukemia.index["root"]] == 15
    assert totals[leukemia.index["ALL"]] == 3


def test_column_permutation_requires_every_node_once(leukemia):
    produced = _produced(leukemia)
    perm = tree_ops.column_permutation(leukemia, produced)
    ordered = torch.tensor([leukemia.index["root"], *produced], dtype=torch.float32)[perm]
    assert ordered.tolist() == list(range(leukemia.num_nodes))
    with pytest.raises(ValueError):
        tree_ops.column_permutation(leukemia, produced[:-1])


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "under-bf16-autocast"])
def test_flat_conditionals_match_numpy_reference(blood_cells, autocast):
    """Also under bf16 autocast (validation and predict run there on a GPU): still float32, exact."""
    torch.manual_seed(0)
    logits = torch.randn(7, len(blood_cells.leaves)) * 3
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        pieces = tree_ops.conditionals_from_leaf_logits(logits, _decisions(blood_cells))
    perm = tree_ops.column_permutation(blood_cells, _produced(blood_cells))
    cond = tree_ops.assemble_conditionals(pieces, perm)
    assert cond.dtype == torch.float32
    leaf_probs = torch.softmax(logits, 1).double().numpy()
    reference = NodeProbabilities.from_leaf_probabilities(blood_cells, leaf_probs)
    np.testing.assert_allclose(cond.numpy(), reference.conditional, atol=1e-5)


def test_flat_conditionals_stay_exact_when_a_subtree_underflows(leukemia):
    """Leukemia's leaves far below Normal: P(Leukemia) underflows, P(Acute | Leukemia) must not."""
    logits = torch.full((1, len(leukemia.leaves)), -2000.0)
    logits[0, leukemia.leaves.index("Normal")] = 0.0
    logits[0, leukemia.leaves.index("ALL")] = -1000.0 + np.log(3.0)  # Acute 3x as likely as Chronic
    logits[0, leukemia.leaves.index("CLL")] = -1000.0
    pieces = tree_ops.conditionals_from_leaf_logits(logits, _decisions(leukemia))
    cond = tree_ops.assemble_conditionals(pieces, tree_ops.column_permutation(leukemia, _produced(leukemia)))
    assert torch.isfinite(cond).all()
    assert cond[0, leukemia.index["Acute"]].item() == pytest.approx(0.75, abs=1e-5)
    assert cond[0, leukemia.index["Normal"]].item() == pytest.approx(1.0, abs=1e-6)


def test_grouped_log_softmax_equals_per_group_log_softmax():
    torch.manual_seed(1)
    groups = torch.tensor([0, 0, 1, 2, 1, 1, 2])
    logits = torch.randn(5, 7) * 10
    out = tree_ops.grouped_log_softmax(logits, groups, 3)
    for g in range(3):
        cols = torch.nonzero(groups == g).flatten()
        torch.testing.assert_close(out[:, cols], torch.log_softmax(logits[:, cols], dim=1))


def test_grouped_log_softmax_has_gradient():
    logits = torch.randn(3, 4, requires_grad=True)
    tree_ops.grouped_log_softmax(logits, torch.tensor([0, 0, 1, 1]), 2)[:, 0].sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    assert torch.isfinite(logits.grad).all()


def test_marginals_match_numpy_reference(leukemia):
    torch.manual_seed(2)
    pieces = [torch.softmax(torch.randn(6, len(leukemia.children(n))), 1) for n in leukemia.internal_nodes]
    cond = tree_ops.assemble_conditionals(pieces, tree_ops.column_permutation(leukemia, _produced(leukemia)))
    marginal = tree_ops.marginals_from_conditionals(cond, tree_ops.path_index(leukemia))
    reference = NodeProbabilities.from_conditionals(leukemia, cond.double().numpy())
    np.testing.assert_allclose(marginal.numpy(), reference.marginal, atol=1e-6)


def test_target_mask_and_masked_mean():
    mask, valid = tree_ops.target_mask_from_index(torch.tensor([2, -1, 0]), 3)
    assert mask.tolist() == [[False, False, True], [True, True, True], [True, False, False]]
    assert valid.tolist() == [True, False, True]
    values = torch.tensor([1.0, 100.0, 3.0], requires_grad=True)
    assert tree_ops.masked_mean(values, valid).item() == pytest.approx(2.0)
    empty = tree_ops.masked_mean(values, torch.zeros(3, dtype=torch.bool))
    assert empty.item() == 0.0 and empty.requires_grad
    empty.backward()
    assert values.grad.abs().sum().item() == 0.0


def test_device_cache_copies_once_per_device():
    cache = tree_ops.DeviceCache(a=torch.arange(3))
    first = cache.on("cpu")["a"]
    assert cache.on(torch.device("cpu"))["a"] is first
    assert cache.cpu("a").tolist() == [0, 1, 2]


def test_device_cache_copies_made_under_inference_mode_work_with_autograd():
    """Validation (inference mode) may be the first user of a device; training comes after."""
    cache = tree_ops.DeviceCache(index=torch.tensor([1, 0]))
    with torch.inference_mode():
        copy = cache.on("meta")["index"]  # any device other than the CPU makes a copy
    assert copy.device.type == "meta"
    assert not copy.is_inference()


@st.composite
def nested_trees(draw, depth: int = 0):
    """Random nested dicts with unique names; every internal node has 2-3 children."""
    counter = [0]

    def build(level: int) -> dict:
        tree = {}
        for _ in range(draw(st.integers(2, 3))):
            counter[0] += 1
            name = f"n{counter[0]}"
            grow = level < 2 and draw(st.booleans())
            tree[name] = build(level + 1) if grow else {}
        return tree

    return build(depth)


@settings(max_examples=25, deadline=None)
@given(tree=nested_trees(), seed=st.integers(0, 10_000))
def test_random_trees_give_consistent_probabilities(tree, seed):
    tax = Taxonomy.from_nested(tree)
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(4, len(tax.leaves), generator=gen) * 4
    perm = tree_ops.column_permutation(tax, _produced(tax))
    pieces = tree_ops.conditionals_from_leaf_logits(logits, _decisions(tax))
    cond = tree_ops.assemble_conditionals(pieces, perm)
    marginal = tree_ops.marginals_from_conditionals(cond, tree_ops.path_index(tax))
    probs = NodeProbabilities(tax, cond.double().numpy(), marginal.double().numpy())
    assert probs.consistency_error() < 1e-5
    leaf_probs = torch.softmax(logits, 1)
    np.testing.assert_allclose(probs.leaf_marginals(), leaf_probs.numpy(), atol=1e-5)
    # a per-level softmax renormalised per sibling group is consistent too
    for depth in range(1, tax.max_depth + 1):
        nodes = tax.levels[depth]
        groups, n_groups = tree_ops.sibling_groups(tax, nodes)
        logits = torch.randn(4, len(nodes), generator=gen)
        level = tree_ops.grouped_log_softmax(logits, groups, n_groups).exp()
        for g in range(n_groups):
            assert torch.allclose(level[:, groups == g].sum(1), torch.ones(4), atol=1e-5)
