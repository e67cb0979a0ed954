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
from hiercls.strategies.base import (
    BackboneFactory,
    LossFactory,
    TargetTableUnit,
    TrainingUnit,
)
from hiercls.taxonomy import Taxonomy

DEFAULT_OPTIONS: dict[str, Any] = {"dropout": 0.0}


@dataclass(eq=False, kw_only=True)
class NodeUnit(TargetTableUnit):
    """The model of one internal node: logits over its children."""

    node: str = ""

    @property
    def log_name(self) -> str:
        return self.node

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
