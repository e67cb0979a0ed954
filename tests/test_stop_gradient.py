"""The joint model's stop-gradient.

A head's loss moves only its own head, its level's adapter and the shared backbone.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from hiercls.strategies import build_strategy
from hiercls.taxonomy import load_taxonomy

TAXONOMY_DIR = Path(__file__).resolve().parents[1] / "taxonomy"


def tiny_backbone() -> nn.Module:
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model.num_features = 8
    return model


@pytest.fixture(scope="module")
def leukemia():
    return load_taxonomy(TAXONOMY_DIR / "leukemia.yaml")


def _joint(tax, **options):
    torch.manual_seed(0)
    unit = build_strategy("joint", tax, backbone=tiny_backbone, options=options).training_units()[0]
    return unit, unit.module


def _grad_sum(loss: torch.Tensor, params: list[nn.Parameter]) -> float:
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return sum(0.0 if g is None else float(g.abs().sum()) for g in grads)


@pytest.mark.parametrize("adapter", ["shared", "per_level"])
@pytest.mark.parametrize("feed_parent", [True, False])
def test_each_head_loss_reaches_only_its_own_head_adapter_and_the_backbone(leukemia, adapter, feed_parent):
    unit, network = _joint(leukemia, adapter=adapter, feed_parent=feed_parent)
    labels = torch.tensor([leukemia.index[n] for n in leukemia.leaves * 2])
    x = torch.randn(len(labels), 3, 16, 16, generator=torch.Generator().manual_seed(1))
    head_losses = unit.head_losses(network(x), labels)
    assert set(head_losses) == set(leukemia.internal_nodes)
    backbone = list(network.backbone.parameters())
    for node, loss in head_losses.items():
        assert loss.item() > 0
        for other in leukemia.internal_nodes:
            reached = _grad_sum(loss, list(network.head(other).parameters()))
            if other == node:
                assert reached > 0, f"{node}'s loss does not train its own head"
            else:
                assert reached == 0.0, f"{node}'s loss leaks into the {other} head"
        for depth, level_adapter in enumerate(network.adapters):
            reached = _grad_sum(loss, list(level_adapter.parameters()))
            if depth == leukemia.depth(node):
                assert reached > 0, f"{node}'s loss does not train its level adapter"
            else:
                assert reached == 0.0, f"{node}'s loss leaks into the depth-{depth} adapter"
        assert _grad_sum(loss, backbone) > 0, f"{node}'s loss does not reach the shared backbone"


def test_children_do_read_their_parent_head(leukemia):
    """The zero gradients above come from detach, not from a missing connection."""
    unit, network = _joint(leukemia, adapter="per_level", feed_parent=True)
    x = torch.randn(4, 3, 16, 16)
    before = network(x)
    with torch.no_grad():
        network.head("Leukemia").fc.bias.add_(5.0 * torch.tensor([1.0, -1.0]))
    after = network(x)
    assert not torch.allclose(before["Acute"], after["Acute"])  # the child sees its parent's softmax
    assert not torch.allclose(before["Chronic"], after["Chronic"])
    torch.testing.assert_close(before["root"], after["root"])  # the parent's parent does not
    in_features = network.head("Acute").fc.in_features
    assert in_features == 8 + len(leukemia.children("Leukemia"))


def test_adapters_exist_only_when_asked(leukemia):
    _, shared = _joint(leukemia, adapter="shared")
    _, per_level = _joint(leukemia, adapter="per_level")
    assert len(shared.adapters) == 0
    assert len(per_level.adapters) == leukemia.max_depth
