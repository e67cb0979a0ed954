"""Built-in losses: ``ce``, ``weighted_ce`` and ``focal``.

All take ``(logits [B, C], target_mask [B, C] bool)`` and return the per-sample loss
``[B]`` in float32 (logits are cast up, so bf16 autocast cannot lose the small
probabilities). With several marks in a row the target is the marked set as a whole.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from hiercls.errors import ConfigError
from hiercls.hookspecs import hookimpl
from hiercls.losses import LossContext, class_weights, masked_log_prob, target_weight


@hookimpl
def register_losses(register: Callable[..., None]) -> None:
    register("ce", ce)
    register("weighted_ce", weighted_ce)
    register("focal", focal)


class CrossEntropy(nn.Module):
    """Cross-entropy with optional label smoothing and optional per-class weights.

    Label smoothing mixes the target with the uniform distribution over the classes:
    ``(1 - s) * -log P(marked) + s * mean_c -log p_c``.
    """

    def __init__(self, num_classes: int, label_smoothing: float = 0.0, weights: np.ndarray | None = None):
        super().__init__()
        self.num_classes = num_classes
        self.label_smoothing = float(label_smoothing)
        w = torch.ones(num_classes) if weights is None else torch.as_tensor(weights, dtype=torch.float32)
        self.register_buffer("weights", w, persistent=False)
        self.weighted = weights is not None

    def forward(self, logits: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        has_target = target_mask.any(dim=1)
        loss = -masked_log_prob(logits, target_mask)
        if self.label_smoothing:
            uniform = -torch.log_softmax(logits, dim=1).mean(dim=1)
            loss = (1 - self.label_smoothing) * loss + self.label_smoothing * uniform
        if self.weighted:
            loss = loss * target_weight(self.weights, target_mask)
        return torch.where(has_target, loss, torch.zeros_like(loss))

    def extra_repr(self) -> str:
        return f"classes={self.num_classes}, label_smoothing={self.label_smoothing}, weighted={self.weighted}"


class FocalLoss(nn.Module):
    """Focal loss (Lin et al. 2017) for a softmax: ``-alpha_t (1 - p_t) ** gamma * log p_t``.

    ``p_t`` is the probability of the marked classes; ``alpha_t`` the mean alpha of the
    marked classes. With ``gamma=0`` and no alpha it equals cross-entropy.
    """

    def __init__(self, num_classes: int, gamma: float = 2.0, alpha: np.ndarray | None = None):
        super().__init__()
        self.gamma = float(gamma)
        a = torch.ones(num_classes) if alpha is None else torch.as_tensor(alpha, dtype=torch.float32)
        self.register_buffer("alpha", a, persistent=False)

    def forward(self, logits: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
        log_p = masked_log_prob(logits, target_mask)
        # 1 - p_t, kept away from 0 so (1 - p_t) ** gamma has a finite gradient for gamma < 1
        modulator = (-torch.expm1(log_p)).clamp(min=1e-12) ** self.gamma if self.gamma else 1.0
        loss = -modulator * log_p * target_weight(self.alpha, target_mask)
        return torch.where(target_mask.any(dim=1), loss, torch.zeros_like(loss))

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}"


def ce(context: LossContext, label_smoothing: float = 0.0) -> nn.Module:
    """Cross-entropy; ``label_smoothing`` in [0, 1)."""
    return CrossEntropy(context.num_classes, _fraction("ce", "label_smoothing", label_smoothing))


def weighted_ce(context: LossContext, power: float = 1.0, label_smoothing: float = 0.0) -> nn.Module:
    """Cross-entropy weighted per class by inverse training frequency ``count ** -power``.

    Weights are normalised to mean 1 over classes with images (so the loss scale matches
    ``ce``); classes without training images get weight 1. ``power=0.5`` is the milder
    "inverse square root" weighting; ``power=0`` is plain ``ce``. The weight of a row with
    several marked classes is the mean weight of those classes. The batch mean of the
    per-sample losses is not divided by the summed weights.
    """
    power = _number("weighted_ce", "power", power, minimum=0.0)
    weights = class_weights(context.class_counts, power)
    return CrossEntropy(context.num_classes, _fraction("weighted_ce", "label_smoothing", label_smoothing), weights)


def focal(context: LossContext, gamma: float = 2.0, alpha: float | str | Sequence[float] | None = None) -> nn.Module:
    """Focal loss; ``gamma >= 0``; ``alpha``: none, one number for every class, ``"balanced"``
    (inverse class frequency normalised to mean 1, as ``weighted_ce``) or one number per class."""
    gamma = _number("focal", "gamma", gamma, minimum=0.0)
    if alpha is None:
        weights = None
    elif isinstance(alpha, str):
        if alpha != "balanced":
            raise ConfigError(f"loss 'focal': alpha must be a number, a list or 'balanced', got '{alpha}'")
        weights = class_weights(context.class_counts, 1.0)
    elif isinstance(alpha, (int, float)) and not isinstance(alpha, bool):
        weights = np.full(context.num_classes, _number("focal", "alpha", alpha, minimum=0.0))
    else:
        try:
            weights = np.asarray(alpha, dtype=float)
        except (TypeError, ValueError):
            weights = None
        if weights is None or weights.shape != (context.num_classes,) or np.any(weights < 0):
            raise ConfigError(
                f"loss 'focal': alpha as a list needs {context.num_classes} non-negative numbers "
                f"(classes {', '.join(context.classes)}), got {alpha!r}"
            )
    return FocalLoss(context.num_classes, gamma, weights)


def _number(loss: str, option: str, value: object, minimum: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) or value < minimum:
        raise ConfigError(f"loss '{loss}': {option} must be a number >= {minimum:g}, got {value!r}")
    return float(value)


def _fraction(loss: str, option: str, value: object) -> float:
    number = _number(loss, option, value, minimum=0.0)
    if number >= 1:
        raise ConfigError(f"loss '{loss}': {option} must be in [0, 1), got {value!r}")
    return number
