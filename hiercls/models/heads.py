"""Classification heads on a feature backbone, and the joint network's stop-gradient wiring.

* ``ClassifierHead``: dropout + linear layer, features -> logits.
* ``BackboneClassifier``: one backbone and one head; the model of a flat, per-node or
  per-level training unit.
* ``JointNetwork``: the joint model of Hamdi et al.: one backbone shared by every level,
  one head per internal node of the tree. A head's gradient can only reach what it owns:
  its own weights, its level's adapter (when adapters are per level) and the shared
  backbone. Where a child head reads its parent head's softmax (``feed_parent``), that input
  is detached, so a deeper level's loss never moves a shallower head.

Every model here exposes ``backbone`` (the feature extractor, for Grad-CAM) and takes
backbones as built modules with an integer ``num_features``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from hiercls.taxonomy import Taxonomy

__all__ = ["ClassifierHead", "BackboneClassifier", "LevelAdapter", "JointNetwork", "ADAPTERS"]

ADAPTERS: tuple[str, ...] = ("shared", "per_level")


class ClassifierHead(nn.Module):
    """Dropout then a linear layer: features ``[B, in_features]`` -> logits ``[B, num_classes]``."""

    def __init__(self, in_features: int, num_classes: int, dropout: float = 0.0):
        super().__init__()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, features: Tensor) -> Tensor:
        return self.fc(self.dropout(features))


class BackboneClassifier(nn.Module):
    """A backbone and one head: images -> logits. The model of every single-decision unit."""

    def __init__(self, backbone: nn.Module, num_classes: int, dropout: float = 0.0):
        super().__init__()
        self.backbone = backbone
        self.head = ClassifierHead(int(backbone.num_features), num_classes, dropout)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.backbone(images))


class LevelAdapter(nn.Sequential):
    """A small Linear + GELU block one level owns on top of the shared backbone features."""

    def __init__(self, num_features: int):
        super().__init__(nn.Linear(num_features, num_features), nn.GELU())


class JointNetwork(nn.Module):
    """One backbone, one head per internal node; ``forward`` returns ``{node: logits over its children}``.

    Parameters
    ----------
    backbone:
        Feature extractor shared by every level (it learns from all the levels' losses).
    taxonomy:
        The tree; heads follow ``taxonomy.internal_nodes`` (parents before children).
    adapter:
        ``"shared"``: every head reads the backbone features directly. ``"per_level"``: each
        depth has its own ``LevelAdapter``, used only by that depth's heads.
    feed_parent:
        A non-root head also receives its parent head's softmax (the probabilities of the
        node and its siblings), detached: information flows down, gradient does not flow up.
    dropout:
        Dropout on every head's input.
    decisions:
        The internal nodes that get a head (default: all of them); a node left out (e.g. one
        with a single child, whose decision is certain) feeds nothing to its children.
    """

    def __init__(
        self,
        backbone: nn.Module,
        taxonomy: Taxonomy,
        adapter: str = "shared",
        feed_parent: bool = True,
        dropout: float = 0.0,
        decisions: Sequence[str] | None = None,
    ):
        super().__init__()
        if adapter not in ADAPTERS:
            raise ValueError(f"adapter must be one of {ADAPTERS}, got {adapter!r}")
        self.backbone = backbone
        self.decisions: tuple[str, ...] = tuple(taxonomy.internal_nodes if decisions is None else decisions)
        self.adapter_mode = adapter
        self.feed_parent = feed_parent
        num_features = int(backbone.num_features)
        position = {node: k for k, node in enumerate(self.decisions)}
        self.depths: tuple[int, ...] = tuple(taxonomy.depth(n) for n in self.decisions)
        self.parent_positions: tuple[int, ...] = tuple(
            position.get(taxonomy.parent(n), -1) for n in self.decisions
        )
        self.num_levels = max(self.depths) + 1
        # one adapter per depth that has heads (a depth without heads keeps a parameter-free
        # placeholder, so no parameter is ever left without a gradient)
        self.adapters = nn.ModuleList(
            [
                LevelAdapter(num_features) if d in self.depths else nn.Identity()
                for d in range(self.num_levels)
            ]
            if adapter == "per_level"
            else []
        )
        heads = []
        for node, parent in zip(self.decisions, self.parent_positions):
            extra = len(taxonomy.children(self.decisions[parent])) if (feed_parent and parent >= 0) else 0
            heads.append(ClassifierHead(num_features + extra, len(taxonomy.children(node)), dropout))
        self.heads = nn.ModuleList(heads)

    def head(self, node: str) -> ClassifierHead:
        """The head deciding among ``node``'s children."""
        return self.heads[self.decisions.index(node)]

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        features = self.backbone(images)
        if self.adapter_mode == "per_level":
            level_features = [
                adapter(features) if d in self.depths else features for d, adapter in enumerate(self.adapters)
            ]
        else:
            level_features = [features] * self.num_levels
        logits: list[Tensor] = []
        for head, depth, parent in zip(self.heads, self.depths, self.parent_positions):
            inputs = level_features[depth]
            if self.feed_parent and parent >= 0:
                parent_probs = torch.softmax(logits[parent].float(), dim=1).to(inputs.dtype)
                inputs = torch.cat([inputs, parent_probs.detach()], dim=1)
            logits.append(head(inputs))
        return dict(zip(self.decisions, logits))
