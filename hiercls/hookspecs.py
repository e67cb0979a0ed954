"""Plugin hook specifications (pluggy), in the shape of the ``llm`` and ``pytest`` tools.

A plugin is a module or package with functions marked ``@hiercls.hookimpl``; installed
packages expose theirs through the entry-point group ``hiercls``::

    [project.entry-points.hiercls]
    torchvision = "hiercls_torchvision"

Built-in backbones (timm), losses, strategies and aggregators are registered through the very
same hooks.
"""

from __future__ import annotations

from collections.abc import Callable

import pluggy

hookspec = pluggy.HookspecMarker("hiercls")
hookimpl = pluggy.HookimplMarker("hiercls")


@hookspec
def register_backbones(register: Callable) -> None:
    """Register backbone factories.

    Call ``register(name, factory, prefix=False)`` once per model name, or once for a
    whole family with ``prefix=True`` (then every name starting with ``name`` is routed to
    the factory; e.g. ``register("tv/", factory, prefix=True)`` serves ``tv/googlenet``).

    ``factory(name, pretrained=None, **kwargs)`` must return a ``torch.nn.Module`` whose
    ``forward(images [B, 3, H, W])`` returns pooled features ``[B, num_features]`` and which
    has an integer attribute ``num_features``. ``pretrained`` is ``None`` (random init) or
    the path of a local weights file. A factory may also set ``gradcam_layer`` (the module
    Grad-CAM hooks), ``is_token_model`` and ``num_prefix_tokens`` (ViT-like models whose
    activations are tokens); ``hiercls.models.backbone.set_backbone_attributes`` helps.
    """


@hookspec
def register_losses(register: Callable) -> None:
    """Register loss factories.

    Call ``register(name, factory)``. ``factory(context: hiercls.losses.LossContext,
    **options)`` returns a ``torch.nn.Module`` called as ``module(logits [B, C],
    target_mask [B, C] bool) -> per-sample loss [B]``. ``target_mask`` marks the classes
    consistent with each label (one per row for an exact label; several in a flat model
    for a label given only at an internal node). The context names the decision (an
    internal node, or ``None`` for a flat softmax over leaves), its classes, the training
    counts per class and the taxonomy, so class weights and tree-aware losses are possible.
    """


@hookspec
def register_strategies(register: Callable) -> None:
    """Register training strategies.

    Call ``register(name, strategy)``. ``strategy`` is an object (a module or a class) with
    ``DEFAULT_OPTIONS: dict`` (every option it accepts, with its default) and
    ``build(taxonomy, backbone_factory, loss_factory, node_counts, options) -> list[TrainingUnit]``
    (see ``hiercls.strategies.base``): ``backbone_factory()`` returns a fresh backbone,
    ``loss_factory(node, classes, counts)`` the loss of one decision, ``node_counts[num_nodes]``
    the training images at or below every node, ``options`` the validated options. The
    built-ins (flat, per_node, per_level, joint) are registered through this same hook.
    """


@hookspec
def register_aggregators(register: Callable) -> None:
    """Register group aggregators (how a slide's or patient's images make one prediction).

    Call ``register(name, cls)`` with a ``hiercls.aggregate.GroupAggregator`` subclass; it
    becomes ``--aggregator name`` in ``hiercls evaluate`` and ``aggregator: name`` in cv
    configs. The built-ins ``mode`` and ``mean`` are registered through this same hook.
    """
