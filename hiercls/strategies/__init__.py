"""Training strategies: how a taxonomy becomes trainable models that predict every node.

``build_strategy(name, taxonomy, backbone=...)`` returns a ``HierarchicalClassifier``. The
strategies come from the plugin registry (hook ``register_strategies``); the built-ins are:

* ``flat``: one softmax over the leaves (1 training unit);
* ``per_node``: one model per internal node (the paper's base hierarchical model);
* ``per_level``: one model per depth (HiClass's local classifier per level);
* ``joint``: one backbone, one head per internal node, stop-gradient between levels.

See docs/strategies.md for the semantics, partial labels and options.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from torch import nn

from hiercls.errors import ConfigError
from hiercls.models import tree_ops
from hiercls.strategies.base import (
    HierarchicalClassifier,
    TrainingUnit,
    validate_options,
)
from hiercls.taxonomy import Taxonomy

__all__ = ["build_strategy", "HierarchicalClassifier", "TrainingUnit", "strategy_names", "strategy_options"]


def strategy_names() -> tuple[str, ...]:
    """Every registered strategy name (built-ins first, then plugins')."""
    from hiercls.plugins import strategy_names as registered

    return registered()


def strategy_options(name: str) -> dict[str, Any]:
    """The options a strategy accepts, with their defaults."""
    return dict(_strategy_module(name).DEFAULT_OPTIONS)


def build_strategy(
    name: str,
    taxonomy: Taxonomy,
    *,
    backbone: str | Callable[[], nn.Module],
    pretrained: str | None = None,
    backbone_kwargs: dict | None = None,
    image_size: int | None = None,
    loss: str = "ce",
    loss_options: dict | None = None,
    class_counts: np.ndarray | None = None,
    options: dict | None = None,
) -> HierarchicalClassifier:
    """Build the models of strategy ``name`` for ``taxonomy``.

    ``backbone`` is a registered backbone name (built with ``create_backbone(name, pretrained,
    **backbone_kwargs)``) or a zero-argument callable returning a module with ``num_features``;
    every per_node / per_level unit gets its own instance. ``image_size`` (the run's
    ``img_size``) builds fixed-size models for it and checks a named backbone once with a dry
    forward at that size (see ``create_backbone``). ``class_counts[num_nodes]`` counts
    the training images labelled exactly at each node; each decision's loss sees the counts
    of its classes (images at or below each class). Unknown names and options raise
    ``ConfigError``.
    """
    module = _strategy_module(name)
    if len(taxonomy.leaves) < 2:
        raise ConfigError(f"taxonomy '{taxonomy.name}' has a single leaf: there is nothing to classify")
    resolved = validate_options(name, options, module.DEFAULT_OPTIONS)
    counts = _node_totals(taxonomy, class_counts)
    backbone_factory = _backbone_factory(backbone, pretrained, backbone_kwargs, image_size)
    loss_factory = _loss_factory(taxonomy, loss, loss_options)
    units = module.build(taxonomy, backbone_factory, loss_factory, counts, resolved)
    return HierarchicalClassifier(taxonomy, name, units, resolved)


def _strategy_module(name: str) -> Any:
    """The object registered as strategy ``name`` (``DEFAULT_OPTIONS`` and ``build``)."""
    from hiercls.plugins import find_strategy

    strategy = find_strategy(name).factory
    if not isinstance(getattr(strategy, "DEFAULT_OPTIONS", None), dict) or not callable(getattr(strategy, "build", None)):
        raise ConfigError(
            f"strategy '{name}' (plugin {find_strategy(name).plugin}) has no DEFAULT_OPTIONS dict or no build "
            "function; see the register_strategies hook in hiercls/hookspecs.py"
        )
    return strategy


def _node_totals(taxonomy: Taxonomy, class_counts: np.ndarray | None) -> np.ndarray:
    """Images at or below every node; ones when the counts are unknown (e.g. rebuilding for inference)."""
    if class_counts is None:
        return np.ones(taxonomy.num_nodes, dtype=np.float64)
    counts = np.asarray(class_counts, dtype=np.float64)
    if counts.shape != (taxonomy.num_nodes,):
        raise ValueError(
            f"class_counts must have shape ({taxonomy.num_nodes},) (one per node), got {counts.shape}"
        )
    return tree_ops.counts_under(taxonomy, counts)


def _backbone_factory(
    backbone: str | Callable[[], nn.Module],
    pretrained: str | None,
    backbone_kwargs: dict | None,
    image_size: int | None = None,
) -> Callable[[], nn.Module]:
    if isinstance(backbone, str):
        from hiercls.models.backbone import create_backbone

        kwargs = dict(backbone_kwargs or {})

        def make() -> nn.Module:
            return create_backbone(backbone, pretrained, run_img_size=image_size, **kwargs)

    elif callable(backbone):
        if pretrained is not None or backbone_kwargs:
            raise ConfigError(
                "'pretrained' and 'backbone_kwargs' apply to a backbone name, not to a callable"
            )
        make = backbone
    else:
        raise ConfigError(f"backbone must be a backbone name or a callable, got {type(backbone).__name__}")

    def checked() -> nn.Module:
        module = make()
        features = getattr(module, "num_features", None)
        if not isinstance(module, nn.Module) or not isinstance(features, int) or features <= 0:
            raise ConfigError(
                f"backbone {backbone!r} must build an nn.Module with a positive integer 'num_features' "
                "(the size of its pooled features)"
            )
        return module

    return checked


def _loss_factory(
    taxonomy: Taxonomy, loss: str, loss_options: dict | None
) -> Callable[[str | None, Sequence[str], np.ndarray], nn.Module]:
    from hiercls.losses import LossContext, create_loss

    options = dict(loss_options or {})

    def make(node: str | None, classes: Sequence[str], counts: np.ndarray) -> nn.Module:
        context = LossContext(
            taxonomy=taxonomy,
            node=node,
            classes=tuple(classes),
            class_counts=np.asarray(counts, dtype=np.float64),
        )
        return create_loss(loss, context, **options)

    return make
