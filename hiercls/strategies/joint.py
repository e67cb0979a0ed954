"""joint: one backbone, one head per internal node, levels kept apart by stop-gradient.

The model proposed by Hamdi et al. Each head's loss is computed only on the images whose
label passes through its node down to one of its children, averaged over those rows,
weighted by its level's weight and summed. Because a child head reads its parent head's
softmax only through ``detach`` (see ``hiercls.models.heads.JointNetwork``), no head's loss
reaches another head's weights; the shared backbone learns from every level.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from hiercls.errors import ConfigError
from hiercls.models import tree_ops
from hiercls.models.heads import ADAPTERS, JointNetwork
from hiercls.strategies.base import (
    BackboneFactory,
    LossFactory,
    LossUnit,
    TrainingUnit,
    decision_loss,
    labelled_rows,
)
from hiercls.taxonomy import Taxonomy

DEFAULT_OPTIONS: dict[str, Any] = {
    "adapter": "shared",
    "feed_parent": True,
    "level_weights": None,
    "dropout": 0.0,
    "head_reduction": "images",
}
HEAD_REDUCTIONS = ("images", "head")


@dataclass(eq=False, kw_only=True)
class JointUnit(LossUnit):
    """The joint model; outputs ``{internal node: logits over its children}``."""

    decisions: tuple[str, ...] = ()
    weights: tuple[float, ...] = ()
    root_index: int = 0
    head_reduction: str = "images"
    tables: tree_ops.DeviceCache | None = None

    def sample_mask(self, label_indices: np.ndarray) -> np.ndarray:
        return labelled_rows(label_indices, self.root_index)

    def head_losses(self, outputs: dict[str, Tensor], label_indices: Tensor) -> dict[str, Tensor]:
        """Each head's loss on its own rows of the batch (attached to the graph, unweighted).

        ``head_reduction="head"``: the mean over the head's rows, so a head with 3 rows of a
        batch weighs as much as the root with all of them. ``"images"`` (default): the sum over
        the head's rows divided by the batch's labelled images, so the total is the mean over
        images of the summed losses along each image's path: for cross-entropy, the negative
        log-likelihood of its label under the product of the heads' conditionals. Every image
        then counts once, as in the flat model, and rare deep decisions do not dominate the
        backbone's gradient.
        """
        device = outputs[self.decisions[0]].device
        labels = label_indices.to(device).long()
        table = self.tables.on(device)["targets"]  # [num_decisions, num_nodes]
        targets = table[:, labels.clamp(min=0)]  # [num_decisions, B]
        losses = self.losses_on(device)
        per_head = {
            node: decision_loss(losses[k], outputs[node], targets[k]) for k, node in enumerate(self.decisions)
        }
        if self.head_reduction == "images":
            labelled = ((labels >= 0) & (labels != self.root_index)).sum().clamp(min=1)
            rows = (targets >= 0).sum(dim=1)  # [num_decisions]
            per_head = {node: per_head[node] * (rows[k] / labelled) for k, node in enumerate(self.decisions)}
        return per_head

    def compute_loss(
        self, outputs: dict[str, Tensor], label_indices: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        per_head = self.head_losses(outputs, label_indices)
        total = sum(w * per_head[node] for node, w in zip(self.decisions, self.weights))
        return total, {node: loss.detach() for node, loss in per_head.items()}

    def conditionals(self, outputs: dict[str, Tensor]) -> Tensor:
        return torch.cat([torch.softmax(outputs[node].float(), dim=1) for node in self.decisions], dim=1)


def _level_weights(value: Any, num_levels: int) -> tuple[float, ...]:
    if value is None:
        return (1.0,) * num_levels
    if (
        not isinstance(value, (list, tuple))
        or len(value) != num_levels
        or not all(isinstance(w, (int, float)) and not isinstance(w, bool) and w >= 0 for w in value)
    ):
        raise ConfigError(
            f"strategy option 'level_weights' must be a list of {num_levels} non-negative numbers "
            f"(one per level of decisions, root's first), got {value!r}"
        )
    return tuple(float(w) for w in value)


def build(
    taxonomy: Taxonomy,
    backbone: BackboneFactory,
    loss: LossFactory,
    counts: np.ndarray,
    options: dict[str, Any],
) -> list[TrainingUnit]:
    """One unit: the ``JointNetwork`` with a loss per internal node."""
    if options["adapter"] not in ADAPTERS:
        raise ConfigError(
            f"strategy option 'adapter' must be one of {', '.join(ADAPTERS)}, got {options['adapter']!r}"
        )
    if not isinstance(options["feed_parent"], bool):
        raise ConfigError(
            f"strategy option 'feed_parent' must be true or false, got {options['feed_parent']!r}"
        )
    if options["head_reduction"] not in HEAD_REDUCTIONS:
        raise ConfigError(
            f"strategy option 'head_reduction' must be one of {', '.join(HEAD_REDUCTIONS)}, "
            f"got {options['head_reduction']!r}"
        )
    level_weights = _level_weights(options["level_weights"], taxonomy.max_depth)
    decisions = tree_ops.decision_nodes(taxonomy)
    network = JointNetwork(
        backbone(),
        taxonomy,
        adapter=options["adapter"],
        feed_parent=options["feed_parent"],
        dropout=options["dropout"],
        decisions=decisions,
    )
    losses = [
        loss(node, taxonomy.children(node), counts[taxonomy.children_indices(node)]) for node in decisions
    ]
    unit = JointUnit(
        name="joint",
        module=network,
        columns=[c for node in decisions for c in taxonomy.children_indices(node)],
        losses=torch.nn.ModuleList(losses),
        decisions=decisions,
        weights=tuple(level_weights[taxonomy.depth(node)] for node in decisions),
        root_index=taxonomy.index[taxonomy.root],
        head_reduction=options["head_reduction"],
        tables=tree_ops.DeviceCache(
            targets=torch.stack([tree_ops.child_target_table(taxonomy, node) for node in decisions])
        ),
    )
    return [unit]
