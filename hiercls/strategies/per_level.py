"""per_level: one model per depth (HiClass's "local classifier per level").

The model of depth d classifies among *all* nodes at depth d + 1 with one softmax, and
learns from every image whose label reaches that depth (target: the label's ancestor at
depth d + 1). At inference its logits are renormalised within each sibling group (a
log-softmax per group of nodes sharing a parent), which gives P(child | parent) for every
node at depth d + 1 and keeps the merged output consistent with the tree.
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
class LevelUnit(TargetTableUnit):
    """The model of one depth: logits over every node one level below it."""

    level: int = 1
    num_groups: int = 1

    def conditionals(self, outputs: Tensor) -> Tensor:
        groups = self.tables.on(outputs.device)["groups"]
        return tree_ops.grouped_log_softmax(outputs, groups, self.num_groups).exp()


def build(
    taxonomy: Taxonomy,
    backbone: BackboneFactory,
    loss: LossFactory,
    counts: np.ndarray,
    options: dict[str, Any],
) -> list[TrainingUnit]:
    """One unit per depth 0 .. max_depth - 1, each with its own backbone.

    A node that is its parent's only child is certain given its parent and is left out of
    its level's classes (a level made only of such nodes gets no unit).
    """
    units: list[TrainingUnit] = []
    certain = set(tree_ops.only_children(taxonomy))
    for level in range(1, taxonomy.max_depth + 1):
        nodes = tuple(n for n in taxonomy.levels[level] if n not in certain)
        if not nodes:
            continue
        columns = [taxonomy.index[n] for n in nodes]
        groups, num_groups = tree_ops.sibling_groups(taxonomy, nodes)
        units.append(
            LevelUnit(
                name=f"level:{level}",
                module=BackboneClassifier(backbone(), len(nodes), options["dropout"]),
                columns=columns,
                losses=torch.nn.ModuleList([loss(None, nodes, counts[columns])]),
                level=level,
                num_groups=num_groups,
                tables=tree_ops.DeviceCache(
                    targets=tree_ops.level_target_table(taxonomy, level, nodes), groups=groups
                ),
            )
        )
    return units
