"""per_node: one model per internal node, merged by multiplying conditionals down the tree.

The paper's "base hierarchical model" (HiClass: local classifier per parent node). The model
of node X chooses among X's children and learns only from images whose label lies strictly
below X; an image labelled exactly at X (a partial label) says nothing about X's children.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from hiercls.models import tree_ops
from hiercls.models.heads import BackboneClassifier
from hiercls.strategies.base import BackboneFactory, LossFactory, LossUnit, TrainingUnit, decision_loss
from hiercls.taxonomy import Taxonomy

DEFAULT_OPTIONS: dict[str, Any] = {"dropout": 0.0}


@dataclass(eq=False, kw_only=True)
class NodeUnit(LossUnit):
    """The model of one internal node: logits over its children."""

    node: str = ""
    tables: tree_ops.DeviceCache | None = None

    def sample_mask(self, label_indices: np.ndarray) -> np.ndarray:
        labels = np.asarray(label_indices)
        targets = self.tables.cpu("targets").numpy()[np.clip(labels, 0, None)]
        return (labels >= 0) & (targets >= 0)

    def compute_loss(self, outputs: Tensor, label_indices: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        table = self.tables.on(outputs.device)["targets"]
        targets = table[label_indices.to(outputs.device).long().clamp(min=0)]
        loss = decision_loss(self.losses_on(outputs.device)[0], outputs, targets)
        return loss, {self.node: loss.detach()}

    def conditionals(self, outputs: Tensor) -> Tensor:
        return torch.softmax(outputs.float(), dim=1)


def build(
    taxonomy: Taxonomy,
    backbone: BackboneFactory,
    loss: LossFactory,
    counts: np.ndarray,
    options: dict[str, Any],
) -> list[TrainingUnit]:
    """One unit per internal node with two or more children, each with its own backbone."""
    units: list[TrainingUnit] = []
    for node in tree_ops.decision_nodes(taxonomy):
        children = taxonomy.children(node)
        columns = taxonomy.children_indices(node)
        units.append(
            NodeUnit(
                name=f"node:{node}",
                module=BackboneClassifier(backbone(), len(children), options["dropout"]),
                columns=columns,
                losses=torch.nn.ModuleList([loss(node, children, counts[columns])]),
                node=node,
                tables=tree_ops.DeviceCache(targets=tree_ops.child_target_table(taxonomy, node)),
            )
        )
    return units
