"""Losses: built-in ce / weighted_ce / focal, and the hiercls-hxe plugin's hxe / soft_labels."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hiercls.errors import ConfigError
from hiercls.losses import LossContext, class_weights, create_loss, masked_log_prob
from hiercls.taxonomy import Taxonomy

# root -> animal (cat, dog), plant (tree -> (oak, pine), flower); leaves at depths 2 and 3
TREE = Taxonomy.from_nested(
    {"animal": {"cat": {}, "dog": {}}, "plant": {"tree": {"oak": {}, "pine": {}}, "flower": {}}}, name="t"
)
LEAVES = TREE.leaves  # cat, dog, oak, pine, flower


def one_hot(indices, num_classes):
    return F.one_hot(torch.as_tensor(indices), num_classes).bool()


def flat_context(counts=None):
    return LossContext.flat(TREE, counts)


@pytest.fixture
def logits():
    torch.manual_seed(0)
    return torch.randn(6, len(LEAVES)) * 3


TARGETS = [0, 1, 2, 3, 4, 2]


# -- context and factory ---------------------------------------------------------------


def test_context_checks_its_inputs():
    assert flat_context().classes == LEAVES and flat_context().class_counts.tolist() == [1.0] * 5
    assert LossContext.for_node(TREE, "plant").classes == ("tree", "flower")
    with pytest.raises(ConfigError, match="one per class"):
        LossContext.flat(TREE, [1, 2])
    with pytest.raises(ConfigError, match="not an internal node"):
        LossContext(TREE, "cat", ("oak", "pine"))
    with pytest.raises(ConfigError, match="not nodes of taxonomy"):
        LossContext(TREE, None, ("cat", "unicorn"))


def test_unknown_option_names_loss_and_accepted_options():
    with pytest.raises(ConfigError, match=r"loss 'focal' has no option\(s\) gama; accepted options: gamma, alpha"):
        create_loss("focal", flat_context(), gama=2)
    with pytest.raises(ConfigError, match="did you mean focal"):
        create_loss("focall", flat_context())
    with pytest.raises(ConfigError, match="label_smoothing must be in"):
        create_loss("ce", flat_context(), label_smoothing=1.5)


# -- cross-entropy family --------------------------------------------------------------


def test_ce_matches_torch(logits):
    loss = create_loss("ce", flat_context())(logits, one_hot(TARGETS, 5))
    assert loss.shape == (6,)
    torch.testing.assert_close(loss, F.cross_entropy(logits, torch.tensor(TARGETS), reduction="none"))
    smooth = create_loss("ce", flat_context(), label_smoothing=0.1)(logits, one_hot(TARGETS, 5))
    expected = F.cross_entropy(logits, torch.tensor(TARGETS), reduction="none", label_smoothing=0.1)
    torch.testing.assert_close(smooth, expected)


def test_partial_label_uses_summed_probability(logits):
    mask = torch.zeros(6, 5, dtype=torch.bool)
    mask[:, [2, 3, 4]] = True  # "plant": oak, pine or flower
    mask[0] = one_hot([1], 5)[0]
    loss = create_loss("ce", flat_context())(logits, mask)
    probs = logits.softmax(dim=1)
    expected = -torch.log(probs[:, [2, 3, 4]].sum(dim=1))
    expected[0] = -torch.log(probs[0, 1])
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(masked_log_prob(logits, mask), -expected)


def test_rows_without_a_mark_give_zero_and_finite_gradients(logits):
    mask = one_hot(TARGETS, 5)
    mask[1] = False
    for name in ("ce", "weighted_ce", "focal"):
        x = logits.clone().requires_grad_(True)
        loss = create_loss(name, flat_context([5, 1, 2, 3, 4]))(x, mask)
        assert loss[1] == 0
        loss.sum().backward()
        assert torch.isfinite(x.grad).all() and torch.all(x.grad[1] == 0)


def test_weighted_ce_with_uniform_counts_is_ce(logits):
    mask = one_hot(TARGETS, 5)
    weighted = create_loss("weighted_ce", flat_context([7, 7, 7, 7, 7]))(logits, mask)
    torch.testing.assert_close(weighted, create_loss("ce", flat_context())(logits, mask))


def test_weighted_ce_weights_by_inverse_frequency(logits):
    counts = np.array([10.0, 40.0, 20.0, 0.0, 10.0])
    weights = class_weights(counts)
    seen = counts > 0
    assert math.isclose(weights[seen].mean(), 1.0) and weights[3] == 1.0
    assert math.isclose(weights[0] / weights[1], 4.0)
    mask = one_hot(TARGETS, 5)
    loss = create_loss("weighted_ce", flat_context(counts))(logits, mask)
    plain = create_loss("ce", flat_context())(logits, mask)
    torch.testing.assert_close(loss, plain * torch.tensor(weights[TARGETS], dtype=torch.float32))
    sqrt = class_weights(counts, power=0.5)
    assert math.isclose(sqrt[0] / sqrt[1], 2.0)


def test_focal_with_gamma_zero_is_ce_and_focuses_otherwise(logits):
    mask = one_hot(TARGETS, 5)
    ce = create_loss("ce", flat_context())(logits, mask)
    torch.testing.assert_close(create_loss("focal", flat_context(), gamma=0.0)(logits, mask), ce)
    focal = create_loss("focal", flat_context(), gamma=2.0)(logits, mask)
    p = torch.exp(-ce)
    torch.testing.assert_close(focal, (1 - p) ** 2 * ce)
    counts = [1, 2, 4, 8, 16]
    balanced = create_loss("focal", flat_context(counts), gamma=0.0, alpha="balanced")(logits, mask)
    w = torch.tensor(class_weights(np.array(counts, dtype=float)), dtype=torch.float32)
    torch.testing.assert_close(balanced, ce * w[TARGETS])
    with pytest.raises(ConfigError, match="alpha"):
        create_loss("focal", flat_context(), alpha="inverse")


def test_losses_are_stable_in_float32_under_bf16_autocast():
    big = torch.tensor([[1e4, -1e4, 0.0, 0.0, 0.0], [-3e3, 3e3, 0.0, 0.0, 0.0]])
    mask = one_hot([0, 0], 5)
    for name, options in (("ce", {}), ("weighted_ce", {}), ("focal", {"gamma": 0.5}), ("focal", {})):
        x = big.clone().to(torch.bfloat16).requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = create_loss(name, flat_context([1, 2, 3, 4, 5]), **options)(x, mask)
        assert loss.dtype == torch.float32
        assert torch.isfinite(loss).all() and loss[1] > 1000
        loss.sum().backward()
        assert torch.isfinite(x.grad.float()).all()


# -- hiercls-hxe -----------------------------------------------------------------------

hiercls_hxe = pytest.importorskip("hiercls_hxe", reason="install plugins/hiercls-hxe (pip install -e plugins/hiercls-hxe)")


def conditional_logits(leaf_logits: torch.Tensor, node: str) -> torch.Tensor:
    """log P(child) for each child of ``node``: softmax of these is P(child | node)."""
    log_p = torch.log_softmax(leaf_logits, dim=1)
    columns = []
    for child in TREE.children(node):
        idx = [LEAVES.index(leaf) for leaf in TREE.leaves_under(child)]
        columns.append(torch.logsumexp(log_p[:, idx], dim=1))
    return torch.stack(columns, dim=1)


def test_hxe_per_node_is_depth_weighted_ce(logits):
    alpha = 0.7
    context = LossContext.for_node(TREE, "tree")  # children oak, pine at depth 3
    node_logits = logits[:, :2]
    mask = one_hot([0, 1, 1, 0, 0, 1], 2)
    hxe = create_loss("hxe", context, alpha=alpha)(node_logits, mask)
    ce = create_loss("ce", context)(node_logits, mask)
    torch.testing.assert_close(hxe, math.exp(-alpha * 3) * ce)


@pytest.mark.parametrize("measure", ["depth", "height"])
def test_flat_hxe_equals_sum_of_per_node_terms(logits, measure):
    alpha = 0.5
    flat = create_loss("hxe", flat_context(), alpha=alpha, measure=measure)(logits, one_hot(TARGETS, 5))
    expected = torch.zeros(6)
    for node in TREE.internal_nodes:
        children = TREE.children(node)
        rows = [i for i, t in enumerate(TARGETS) if TREE.is_ancestor(node, LEAVES[t], inclusive=False)]
        child_of = [next(j for j, c in enumerate(children) if TREE.is_ancestor(c, LEAVES[TARGETS[i]])) for i in rows]
        term = create_loss("hxe", LossContext.for_node(TREE, node), alpha=alpha, measure=measure)(
            conditional_logits(logits, node)[rows], one_hot(child_of, len(children))
        )
        expected[rows] += term
    torch.testing.assert_close(flat, expected)
    if measure == "height":  # leaf edges weigh exp(0) = 1: cat's loss has an animal term and a leaf term
        cat = -torch.log_softmax(conditional_logits(logits, "animal"), 1)[0, 0]
        root = -torch.log_softmax(conditional_logits(logits, "root"), 1)[0, 0]
        torch.testing.assert_close(flat[0], cat + math.exp(-alpha * 1) * root)


def test_flat_hxe_with_alpha_zero_is_ce_and_handles_partial_labels(logits):
    mask = one_hot(TARGETS, 5)
    torch.testing.assert_close(
        create_loss("hxe", flat_context(), alpha=0.0)(logits, mask), create_loss("ce", flat_context())(logits, mask)
    )
    plant = torch.zeros(6, 5, dtype=torch.bool)
    plant[:, [2, 3, 4]] = True  # labelled "plant": only the root decision counts
    loss = create_loss("hxe", flat_context(), alpha=0.3)(logits, plant)
    root_term = -torch.log_softmax(conditional_logits(logits, "root"), 1)[:, 1]
    torch.testing.assert_close(loss, math.exp(-0.3) * root_term)
    oak_or_flower = torch.zeros(6, 5, dtype=torch.bool)
    oak_or_flower[:, [2, 4]] = True  # not a whole subtree: with alpha 0 the loss is -log P(oak or flower)
    torch.testing.assert_close(
        create_loss("hxe", flat_context(), alpha=0.0)(logits, oak_or_flower),
        create_loss("ce", flat_context())(logits, oak_or_flower),
    )
    x = logits.clone().requires_grad_(True)
    create_loss("hxe", flat_context())(x, plant | oak_or_flower).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_soft_labels_tend_to_ce_and_follow_tree_distance(logits):
    mask = one_hot(TARGETS, 5)
    ce = create_loss("ce", flat_context())(logits, mask)
    sharp = create_loss("soft_labels", flat_context(), beta=1e4)(logits, mask)
    torch.testing.assert_close(sharp, ce)
    soft = create_loss("soft_labels", flat_context(), beta=2.0)
    targets = soft.targets(one_hot([0], 5))[0]  # label cat
    assert torch.isclose(targets.sum(), torch.tensor(1.0))
    assert targets[0] > targets[1] > targets[4] > targets[2]  # cat > dog (2) > flower (3) > oak (4 edges)
    partial = soft.targets(torch.tensor([[False, False, True, True, False]]))[0]  # oak or pine
    assert torch.isclose(partial[2], partial[3]) and partial[2] > partial[4] > partial[0]
    with pytest.raises(ConfigError, match="beta"):
        create_loss("soft_labels", flat_context(), beta=0)


def test_flat_hxe_under_bf16_autocast_matches_fp32_on_a_wide_tree():
    """Counting marks must stay exact under autocast (bf16 counts exactly only to 256)."""
    wide = Taxonomy.from_nested({"many": {f"x{i}": {} for i in range(303)}, "few": {"y": {}, "z": {}}}, name="w")
    context = LossContext.flat(wide, None)
    torch.manual_seed(0)
    logits = torch.randn(3, len(context.classes))
    mask = torch.zeros(3, len(context.classes), dtype=torch.bool)
    mask[0, :303] = True  # labelled "many": only the root decision counts
    mask[1, 303] = True  # a leaf, "y"
    mask[2, :301] = True  # 301 of the 303: a partial label below "many"
    loss = create_loss("hxe", context, alpha=0.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = loss(logits, mask)
    torch.testing.assert_close(mixed, loss(logits, mask))
    log_many = torch.logsumexp(torch.log_softmax(logits, 1)[:, :303], 1)
    torch.testing.assert_close(mixed[0], -math.exp(-0.5) * log_many[0])
    log_marked = torch.logsumexp(torch.log_softmax(logits, 1)[2, :301], 0)
    w1, w2 = math.exp(-0.5), math.exp(-1.0)  # edges into "many" (depth 1) and into its leaves (depth 2)
    torch.testing.assert_close(mixed[2], -w1 * log_many[2] - w2 * (log_marked - log_many[2]))
