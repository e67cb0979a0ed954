"""flat: one softmax over the leaves; internal nodes get the sum of their leaves' probabilities.

The paper's flat baseline (7 classes on the leukemia tree). A partial label (an image known
only to lie under an internal node) is trained on the summed probability of that node's
leaves: the loss receives a target mask marking all of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from hiercls.models import tree_ops
from hiercls.models.heads import BackboneClassifier
from hiercls.strategies.base import (
    BackboneFactory,
    LossFactory,
    LossUnit,
    TrainingUnit,
    labelled_rows,
)
from hiercls.taxonomy import Taxonomy

DEFAULT_OPTIONS: dict[str, Any] = {"dropout": 0.0}


@dataclass(eq=False, kw_only=True)
class FlatUnit(LossUnit):
    """The single flat model: logits over ``taxonomy.leaves``."""

    root_index: int = 0
    num_decisions: int = 0
    tables: tree_ops.DeviceCache | None = None

    def sample_mask(self, label_indices: np.ndarray) -> np.ndarray:
        return labelled_rows(label_indices, self.root_index)

    def compute_loss(self, outputs: Tensor, label_indices: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        membership = self.tables.on(outputs.device)["membership"]
        labels = label_indices.to(outputs.device).long()
        valid = (labels >= 0) & (labels != self.root_index)
        target_mask = membership[labels.clamp(min=0)]  # the root's row marks every leaf
        per_sample = self.losses_on(outputs.device)[0](outputs.float(), target_mask)
        loss = tree_ops.masked_mean(per_sample, valid)
        return loss, {"flat": loss.detach()}

    def conditionals(self, outputs: Tensor) -> Tensor:
        tables = self.tables.on(outputs.device)
        decisions = [(tables[f"leaves{k}"], tables[f"children{k}"]) for k in range(self.num_decisions)]
        return torch.cat(tree_ops.conditionals_from_leaf_logits(outputs, decisions), dim=1)


def build(
    taxonomy: Taxonomy,
    backbone: BackboneFactory,
    loss: LossFactory,
    counts: np.ndarray,
    options: dict[str, Any],
) -> list[TrainingUnit]:
    """One unit: backbone + linear layer over the leaves."""
    leaves = taxonomy.leaves
    leaf_pos = {leaf: j for j, leaf in enumerate(leaves)}
    decisions: dict[str, torch.Tensor] = {}
    columns: list[int] = []
    for k, node in enumerate(tree_ops.decision_nodes(taxonomy)):
        under = taxonomy.leaves_under(node)
        local = {leaf: row for row, leaf in enumerate(under)}
        children = taxonomy.children(node)
        membership = torch.zeros((len(under), len(children)))
        for c, child in enumerate(children):
            for leaf in taxonomy.leaves_under(child):
                membership[local[leaf], c] = 1.0
        decisions[f"leaves{k}"] = torch.tensor([leaf_pos[leaf] for leaf in under], dtype=torch.long)
        decisions[f"children{k}"] = membership
        columns.extend(taxonomy.children_indices(node))
    leaf_counts = counts[[taxonomy.index[leaf] for leaf in leaves]]
    unit = FlatUnit(
        name="flat",
        module=BackboneClassifier(backbone(), len(leaves), options["dropout"]),
        columns=columns,
        losses=torch.nn.ModuleList([loss(None, leaves, leaf_counts)]),
        root_index=taxonomy.index[taxonomy.root],
        num_decisions=len(decisions) // 2,
        tables=tree_ops.DeviceCache(membership=tree_ops.leaf_membership(taxonomy), **decisions),
    )
    return [unit]
