"""What every strategy hands the engine: a ``HierarchicalClassifier`` made of ``TrainingUnit``s.

A *training unit* is one separately optimised model: the single flat or joint model, one
model per internal node (per_node), or one per depth (per_level). The engine trains each
unit on the images its ``sample_mask`` selects, with its own optimizer over
``unit.module.parameters()``, and calls ``unit.compute_loss`` on the module's outputs.
At inference every unit contributes the conditionals P(child | parent) of the decisions it
owns; ``HierarchicalClassifier.node_conditionals`` puts them together into one
``[B, num_nodes]`` tensor, from which ``NodeProbabilities`` follows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from hiercls.errors import ConfigError
from hiercls.models import tree_ops
from hiercls.probabilities import NodeProbabilities
from hiercls.taxonomy import Taxonomy

__all__ = [
    "BackboneFactory",
    "HierarchicalClassifier",
    "LossFactory",
    "LossUnit",
    "TrainingUnit",
    "decision_loss",
    "labelled_rows",
    "validate_options",
]

#: ``factory(node, classes, class_counts) -> loss module`` (node None: not a single node's decision).
LossFactory = Callable[[str | None, Sequence[str], np.ndarray], nn.Module]
#: zero-argument callable returning a fresh backbone (``num_features`` attribute set).
BackboneFactory = Callable[[], nn.Module]


@dataclass(eq=False)
class TrainingUnit:
    """One separately trained model and how to train it.

    ``module`` maps images to outputs (a logits tensor, or a dict of them); the engine may
    replace it by a wrapper that shares its parameters (``torch.compile``, DDP): inference
    through ``HierarchicalClassifier.node_conditionals`` then uses the wrapper too.
    ``columns`` are the node indices (``taxonomy.index``) whose conditionals this unit
    produces, in the order ``conditionals`` returns them.
    """

    name: str
    module: nn.Module
    columns: list[int] = field(default_factory=list)

    def sample_mask(self, label_indices: np.ndarray) -> np.ndarray:
        """Which training images (node index per image, -1 unlabelled) this unit learns from."""
        raise NotImplementedError

    def compute_loss(
        self, outputs: Tensor | dict[str, Tensor], label_indices: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Scalar training loss (mean over the batch's usable rows) and detached per-head losses for logs."""
        raise NotImplementedError

    def conditionals(self, outputs: Tensor | dict[str, Tensor]) -> Tensor:
        """``[B, len(columns)]`` float32 conditionals P(node | parent) for this unit's columns."""
        raise NotImplementedError


@dataclass(eq=False, kw_only=True)
class LossUnit(TrainingUnit):
    """A unit with loss modules of its own, kept off ``module`` (not trained, not checkpointed).

    Loss modules may hold buffers (class weights); they follow the outputs' device lazily.
    """

    losses: nn.ModuleList = field(default_factory=nn.ModuleList)
    _loss_device: torch.device | None = field(default=None, repr=False)

    def losses_on(self, device: torch.device) -> nn.ModuleList:
        """The loss modules, moved to ``device`` the first time it is asked for."""
        if self._loss_device != device:
            with torch.inference_mode(False):
                self.losses.to(device)
            self._loss_device = device
        return self.losses


@dataclass(eq=False, kw_only=True)
class TargetTableUnit(LossUnit):
    """A unit with one softmax decision whose target per label comes from a lookup table.

    ``tables["targets"][label]`` is the class index of the label in this decision, or -1 when
    the label says nothing about it (then the image is not used by this unit).
    """

    tables: tree_ops.DeviceCache | None = None

    @property
    def log_name(self) -> str:
        return self.name

    def sample_mask(self, label_indices: np.ndarray) -> np.ndarray:
        labels = np.asarray(label_indices)
        targets = self.tables.cpu("targets").numpy()[np.clip(labels, 0, None)]
        return (labels >= 0) & (targets >= 0)

    def compute_loss(self, outputs: Tensor, label_indices: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        table = self.tables.on(outputs.device)["targets"]
        targets = table[label_indices.to(outputs.device).long().clamp(min=0)]
        loss = decision_loss(self.losses_on(outputs.device)[0], outputs, targets)
        return loss, {self.log_name: loss.detach()}


def decision_loss(loss: nn.Module, logits: Tensor, targets: Tensor) -> Tensor:
    """Mean loss of one softmax decision over the rows with a target (targets -1 are left out).

    Zero, still attached to the graph, when no row of the batch has a target.
    """
    mask, valid = tree_ops.target_mask_from_index(targets, logits.shape[1])
    return tree_ops.masked_mean(loss(logits.float(), mask), valid)


class HierarchicalClassifier(nn.Module):
    """A taxonomy, a strategy name and the training units that together predict every node.

    ``training_units()`` returns the same unit objects on every call. ``forward`` equals
    ``node_conditionals``.
    """

    def __init__(
        self, taxonomy: Taxonomy, strategy: str, units: Sequence[TrainingUnit], options: dict[str, Any]
    ):
        super().__init__()
        self.taxonomy = taxonomy
        self.strategy = strategy
        self.options = dict(options)
        self.units = nn.ModuleList([unit.module for unit in units])
        self._units = list(units)
        # a parent's single child has conditional 1: no unit learns it, a constant column fills it
        self._constant = [taxonomy.index[n] for n in tree_ops.only_children(taxonomy)]
        produced = [column for unit in self._units for column in unit.columns] + self._constant
        self._tree = tree_ops.DeviceCache(
            permutation=tree_ops.column_permutation(taxonomy, produced),
            paths=tree_ops.path_index(taxonomy),
        )

    def training_units(self) -> list[TrainingUnit]:
        """The separately optimised models (flat / joint: 1, per_node: one per internal node,
        per_level: one per depth)."""
        return list(self._units)

    def node_conditionals(self, images: Tensor) -> Tensor:
        """``[B, num_nodes]`` float32 P(node | parent); root 1, each internal node's children sum to 1."""
        pieces = [unit.conditionals(unit.module(images)) for unit in self._units]
        if self._constant:
            pieces.append(pieces[0].new_ones((pieces[0].shape[0], len(self._constant))))
        permutation = self._tree.on(pieces[0].device)["permutation"]
        return tree_ops.assemble_conditionals(pieces, permutation)

    def node_marginals(self, images: Tensor) -> Tensor:
        """``[B, num_nodes]`` float32 P(node): products of conditionals along each node's path."""
        conditional = self.node_conditionals(images)
        return tree_ops.marginals_from_conditionals(conditional, self._tree.on(conditional.device)["paths"])

    def forward(self, images: Tensor) -> Tensor:
        return self.node_conditionals(images)

    @torch.no_grad()
    def predict_proba(self, images: Tensor, batch_size: int | None = None) -> NodeProbabilities:
        """Node probabilities for a batch of normalised images ``[N, 3, H, W]`` (eval mode, no grad)."""
        was_training = self.training
        self.eval()
        try:
            device = next(self.parameters()).device
            chunks = [images] if batch_size is None else list(torch.split(images, batch_size))
            conditional = torch.cat([self.node_conditionals(c.to(device)).float().cpu() for c in chunks])
        finally:
            self.train(was_training)
        return NodeProbabilities.from_conditionals(self.taxonomy, conditional.double().numpy())


def validate_options(
    strategy: str, options: dict[str, Any] | None, defaults: dict[str, Any]
) -> dict[str, Any]:
    """Defaults updated by ``options``; an unknown option is a ``ConfigError`` naming the accepted ones."""
    if options is not None and not isinstance(options, dict):
        raise ConfigError(
            f"strategy options for '{strategy}' must be a mapping of option names to values, "
            f"got {type(options).__name__}"
        )
    options = dict(options or {})
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        accepted = ", ".join(sorted(defaults)) or "none"
        raise ConfigError(
            f"unknown option(s) {', '.join(repr(u) for u in unknown)} for strategy '{strategy}'; "
            f"accepted options: {accepted}"
        )
    resolved = {**defaults, **options}
    if "dropout" in resolved:
        dropout = resolved["dropout"]
        number = isinstance(dropout, (int, float)) and not isinstance(dropout, bool)
        if not number or not 0.0 <= float(dropout) < 1.0:
            raise ConfigError(f"strategy option 'dropout' must be a number in [0, 1), got {dropout!r}")
        resolved["dropout"] = float(dropout)
    return resolved


def labelled_rows(label_indices: np.ndarray, root_index: int = 0) -> np.ndarray:
    """Rows with a usable label: a node index other than the root (and not -1)."""
    labels = np.asarray(label_indices)
    return (labels >= 0) & (labels != root_index)
