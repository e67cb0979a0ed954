"""Torch helpers that turn tree structure into index tensors, and model outputs into node probabilities.

Every strategy needs the same few operations, and all of them must run on whole batches
without a Python loop over rows (a loop over the tree's internal nodes is fine: trees are
small, batches are not):

* targets: for a decision (an internal node, a depth, or the flat leaf softmax), which class
  each training label points at -- a lookup table indexed by label node, built once;
* conditionals P(node | parent) from a flat leaf softmax, from per-node softmaxes, or from a
  per-level softmax renormalised within sibling groups;
* marginals P(node) from conditionals (product along the root-to-node path).

Tables are plain CPU tensors; ``DeviceCache`` hands out a copy per device, so the callers
never need to be ``nn.Module`` buffers (the engine may wrap, compile or move modules freely).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from hiercls.taxonomy import Taxonomy

__all__ = [
    "DeviceCache",
    "decision_nodes",
    "only_children",
    "child_target_table",
    "level_target_table",
    "leaf_membership",
    "path_index",
    "sibling_groups",
    "column_permutation",
    "assemble_conditionals",
    "conditionals_from_leaf_logits",
    "marginals_from_conditionals",
    "grouped_log_softmax",
    "target_mask_from_index",
    "masked_mean",
    "counts_under",
]


class DeviceCache:
    """Named CPU tensors, copied once to each device they are asked for on.

    Copies are made outside inference mode even when first asked for under
    ``torch.inference_mode()`` (validation), so they stay usable later with autograd on
    (training, Grad-CAM).
    """

    def __init__(self, **tensors: Tensor):
        self._cpu = {k: v.detach().cpu() for k, v in tensors.items()}
        self._copies: dict[torch.device, dict[str, Tensor]] = {}

    def on(self, device: torch.device | str) -> dict[str, Tensor]:
        device = torch.device(device)
        copies = self._copies.get(device)
        if copies is None:
            with torch.inference_mode(False):
                copies = {k: v.to(device, copy=device.type != "cpu") for k, v in self._cpu.items()}
            self._copies[device] = copies
        return copies

    def cpu(self, name: str) -> Tensor:
        return self._cpu[name]


# -- which decisions exist ---------------------------------------------------------------


def decision_nodes(taxonomy: Taxonomy) -> tuple[str, ...]:
    """Internal nodes with at least two children: the nodes that have a decision to learn."""
    return tuple(n for n in taxonomy.internal_nodes if len(taxonomy.children(n)) >= 2)


def only_children(taxonomy: Taxonomy) -> tuple[str, ...]:
    """Nodes that are their parent's single child: P(node | parent) is 1, nothing to learn."""
    return tuple(
        child
        for node in taxonomy.internal_nodes
        if len(taxonomy.children(node)) == 1
        for child in taxonomy.children(node)
    )


# -- lookup tables: label node index -> class index of a decision ------------------------


def child_target_table(taxonomy: Taxonomy, node: str) -> Tensor:
    """``[num_nodes]`` long: for a label at each node, the position of ``node``'s child on its path.

    -1 when the label is not strictly below ``node`` (above it, beside it, or at it: a label
    *at* ``node`` says nothing about which child is right).
    """
    table = torch.full((taxonomy.num_nodes,), -1, dtype=torch.long)
    for position, child in enumerate(taxonomy.children(node)):
        for member in (child, *taxonomy.descendants(child)):
            table[taxonomy.index[member]] = position
    return table


def level_target_table(taxonomy: Taxonomy, depth: int, nodes: Sequence[str] | None = None) -> Tensor:
    """``[num_nodes]`` long: position in ``nodes`` (default ``taxonomy.levels[depth]``) of each
    label's ancestor at ``depth``.

    -1 for labels shallower than ``depth`` (they say nothing about that level) and for
    labels whose ancestor at ``depth`` is not among ``nodes``.
    """
    table = torch.full((taxonomy.num_nodes,), -1, dtype=torch.long)
    for position, node in enumerate(taxonomy.levels[depth] if nodes is None else nodes):
        for member in (node, *taxonomy.descendants(node)):
            table[taxonomy.index[member]] = position
    return table


def leaf_membership(taxonomy: Taxonomy) -> Tensor:
    """``[num_nodes, num_leaves]`` bool: leaf j lies under (or is) node i. Row of the root: all True."""
    leaf_pos = {leaf: j for j, leaf in enumerate(taxonomy.leaves)}
    table = torch.zeros((taxonomy.num_nodes, len(taxonomy.leaves)), dtype=torch.bool)
    for node in taxonomy.nodes:
        for leaf in taxonomy.leaves_under(node):
            table[taxonomy.index[node], leaf_pos[leaf]] = True
    return table


def path_index(taxonomy: Taxonomy) -> Tensor:
    """``[num_nodes, max_depth + 1]`` long: columns of each node's root-to-node path, padded with the root.

    The root's conditional is 1, so padding with it leaves products along the path unchanged.
    """
    root = taxonomy.index[taxonomy.root]
    table = torch.full((taxonomy.num_nodes, taxonomy.max_depth + 1), root, dtype=torch.long)
    for node in taxonomy.nodes:
        for k, step in enumerate(taxonomy.path(node)):
            table[taxonomy.index[node], k] = taxonomy.index[step]
    return table


def sibling_groups(taxonomy: Taxonomy, nodes: Sequence[str]) -> tuple[Tensor, int]:
    """Group id of each node (nodes sharing a parent share an id) and the number of groups."""
    ids: dict[str | None, int] = {}
    groups = [ids.setdefault(taxonomy.parent(n), len(ids)) for n in nodes]
    return torch.tensor(groups, dtype=torch.long), len(ids)


def column_permutation(taxonomy: Taxonomy, produced: Sequence[int]) -> Tensor:
    """Index that reorders ``[root] + produced`` columns into ``taxonomy.nodes`` order.

    ``produced`` lists the node index of every column emitted, each non-root node exactly
    once (e.g. the children of every internal node, node by node).
    """
    order = [taxonomy.index[taxonomy.root], *produced]
    if sorted(order) != list(range(taxonomy.num_nodes)):
        raise ValueError("the produced columns must cover every non-root node exactly once")
    inverse = torch.empty(taxonomy.num_nodes, dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(taxonomy.num_nodes)
    return inverse


def counts_under(taxonomy: Taxonomy, class_counts: np.ndarray) -> np.ndarray:
    """Images labelled at or below each node, from counts of images labelled exactly at each node."""
    counts = np.asarray(class_counts, dtype=np.float64)
    totals = counts.copy()
    for node in reversed(taxonomy.nodes):  # children before parents
        parent = taxonomy.parent(node)
        if parent is not None:
            totals[taxonomy.index[parent]] += totals[taxonomy.index[node]]
    return totals


# -- probabilities ---------------------------------------------------------------------


def assemble_conditionals(pieces: Sequence[Tensor], permutation: Tensor) -> Tensor:
    """Concatenate per-decision conditionals (after a root column of ones) and put columns in tree order."""
    first = pieces[0]
    root = torch.ones((first.shape[0], 1), dtype=first.dtype, device=first.device)
    return torch.cat([root, *pieces], dim=1).index_select(1, permutation.to(first.device))


def conditionals_from_leaf_logits(
    leaf_logits: Tensor, decisions: Sequence[tuple[Tensor, Tensor]]
) -> list[Tensor]:
    """Conditionals P(child | node) of every decision from a flat softmax over the leaves.

    ``decisions`` holds, per internal node, (leaf columns under the node ``[k]``, their
    child-membership matrix ``[k, n_children]`` float). Each node's conditional is the
    softmax restricted to its leaves, summed per child: P(child) / P(node) computed without
    dividing two small numbers, so it stays exact when the node's probability underflows.
    """
    logits = leaf_logits.float()
    out = []
    for leaf_columns, membership in decisions:
        local = torch.softmax(logits.index_select(1, leaf_columns), dim=1)
        # a product and a sum, not a matmul: autocast would run ``@`` in bf16 (children's
        # probabilities then miss summing to 1 by ~1e-3)
        out.append((local.unsqueeze(2) * membership.to(local.dtype)).sum(dim=1))
    return out


def marginals_from_conditionals(conditional: Tensor, paths: Tensor) -> Tensor:
    """P(node) = product of the conditionals along the node's path (``paths`` from ``path_index``)."""
    batch = conditional.shape[0]
    gathered = conditional[:, paths.reshape(-1)].reshape(batch, *paths.shape)
    return gathered.prod(dim=-1)


def grouped_log_softmax(logits: Tensor, groups: Tensor, num_groups: int) -> Tensor:
    """Log-softmax computed separately within each group of columns (``groups[c]`` = group of column c)."""
    logits = logits.float()
    index = groups.to(logits.device).unsqueeze(0).expand_as(logits)
    neg_inf = torch.full((logits.shape[0], num_groups), float("-inf"), device=logits.device)
    group_max = neg_inf.scatter_reduce(1, index, logits.detach(), reduce="amax", include_self=True)
    shifted = logits - group_max.gather(1, index)
    sums = torch.zeros_like(group_max).scatter_add(1, index, shifted.exp())
    return shifted - sums.log().gather(1, index)


# -- losses ----------------------------------------------------------------------------


def target_mask_from_index(targets: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """One-hot bool mask ``[B, C]`` for targets >= 0, and the valid-row mask ``[B]``.

    Rows without a target (-1) get an all-True mask: any loss on the summed probability
    of the marked classes is then exactly 0 there and stays finite; callers also weight
    those rows out (``masked_mean``).
    """
    valid = targets >= 0
    # a comparison, not F.one_hot: one_hot checks the targets' range with a host sync on CPU
    classes = torch.arange(num_classes, device=targets.device)
    one_hot = targets.unsqueeze(1) == classes
    return one_hot | ~valid.unsqueeze(1), valid


def masked_mean(per_sample: Tensor, valid: Tensor) -> Tensor:
    """Mean of ``per_sample`` over the valid rows; 0 (still attached to the graph) when there are none."""
    per_sample = per_sample.float()
    kept = torch.where(valid, per_sample, torch.zeros_like(per_sample))
    return kept.sum() / valid.sum().clamp(min=1).to(kept.dtype)
