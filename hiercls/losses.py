"""Losses by name: ``create_loss("focal", context, gamma=2.0)``.

Every loss, built-in (``ce``, ``weighted_ce``, ``focal``) or from a plugin (``hxe``,
``soft_labels`` in hiercls-hxe), is a module called as
``loss(logits [B, C], target_mask [B, C] bool) -> per-sample loss [B]``.

``target_mask`` marks the classes consistent with each image's label: one class for an
exact label, several in a flat model when the label is an internal node (a partial
label); then the likelihood is the summed probability of the marked classes. The
:class:`LossContext` tells a loss which decision it serves (an internal node's children,
or a flat softmax), how often each class occurs in training, and the whole taxonomy, so
class weighting and tree-aware losses need nothing else.

The helpers here (:func:`masked_log_prob`, :func:`class_weights`, :func:`target_weight`)
are meant for loss plugins too.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from hiercls.errors import ConfigError
from hiercls.taxonomy import Taxonomy

__all__ = [
    "LossContext",
    "class_weights",
    "create_loss",
    "loss_options",
    "masked_log_prob",
    "target_weight",
]


@dataclass(frozen=True)
class LossContext:
    """The decision a loss is built for.

    ``node`` is the internal node whose children are the classes, or ``None`` for a flat
    softmax (over the leaves, or over another set of disjoint nodes such as one depth of
    the tree). ``classes`` are node names in logit order; ``class_counts[i]`` is the number
    of training images of class ``i`` (all ones when not given).
    """

    taxonomy: Taxonomy
    node: str | None
    classes: tuple[str, ...]
    class_counts: np.ndarray = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        classes = tuple(str(c) for c in self.classes)
        object.__setattr__(self, "classes", classes)
        unknown = [c for c in classes if c not in self.taxonomy.index]
        if unknown:
            raise ConfigError(f"loss classes {unknown} are not nodes of taxonomy '{self.taxonomy.name}'")
        if not classes:
            raise ConfigError("a loss needs at least one class")
        if self.node is not None and self.node not in self.taxonomy.internal_nodes:
            raise ConfigError(f"'{self.node}' is not an internal node of taxonomy '{self.taxonomy.name}'")
        counts = np.ones(len(classes)) if self.class_counts is None else np.asarray(self.class_counts, dtype=float)
        if counts.shape != (len(classes),) or not np.all(np.isfinite(counts)) or np.any(counts < 0):
            raise ConfigError(
                f"class_counts must be {len(classes)} non-negative numbers (one per class), got {counts.tolist()}"
            )
        object.__setattr__(self, "class_counts", counts)

    @classmethod
    def for_node(cls, taxonomy: Taxonomy, node: str, class_counts: Any = None) -> LossContext:
        """The decision among the children of ``node``."""
        return cls(taxonomy, node, taxonomy.children(node), class_counts)

    @classmethod
    def flat(cls, taxonomy: Taxonomy, class_counts: Any = None) -> LossContext:
        """One softmax over all leaves."""
        return cls(taxonomy, None, taxonomy.leaves, class_counts)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def create_loss(name: str, context: LossContext, **options: Any) -> nn.Module:
    """Build the loss registered as ``name`` for ``context``; options are checked by name."""
    from hiercls.plugins import find_loss

    registration = find_loss(name)
    accepted = loss_options(registration.factory)
    if accepted is not None:
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            listed = ", ".join(accepted) if accepted else "none"
            raise ConfigError(
                f"loss '{name}' has no option(s) {', '.join(unknown)}; accepted options: {listed}"
            )
    return registration.factory(context, **options)


def loss_options(factory: Callable[..., Any]) -> tuple[str, ...] | None:
    """Option names a loss factory accepts (after the context), or ``None`` when it takes ``**kwargs``."""
    try:
        params = list(inspect.signature(factory).parameters.values())[1:]
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return tuple(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


def masked_log_prob(logits: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """``log sum_{c marked} softmax(logits)_c`` per row, in float32; 0 for rows with no mark.

    With one mark per row this is the usual log-likelihood of the target class; with
    several it is the log-likelihood of the partial label (the marked set as a whole).
    """
    logits = logits.float()
    mask = target_mask.to(device=logits.device, dtype=torch.bool)
    has_target = mask.any(dim=1)
    # rows without a mark use every class (log-probability 0), which keeps gradients finite
    mask = mask | ~has_target[:, None]
    marked = torch.logsumexp(logits.masked_fill(~mask, float("-inf")), dim=1)
    log_prob = marked - torch.logsumexp(logits, dim=1)
    return torch.where(has_target, log_prob, torch.zeros_like(log_prob))


def class_weights(class_counts: np.ndarray, power: float = 1.0) -> np.ndarray:
    """Inverse-frequency weights ``count ** -power`` normalised to mean 1 over seen classes.

    A class with no training image gets weight 1 (neutral) instead of infinity: it cannot
    be a target in the data the counts come from, and an image of it arriving from another
    split still counts as much as an average image.
    """
    counts = np.asarray(class_counts, dtype=float)
    seen = counts > 0
    weights = np.ones_like(counts)
    if seen.any():
        raw = counts[seen] ** (-float(power))
        weights[seen] = raw / raw.mean()
    return weights


def target_weight(weights: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """Per-row weight: the mean weight of the marked classes (0 for rows with no mark)."""
    mask = target_mask.to(device=weights.device, dtype=weights.dtype)
    return (mask * weights).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
