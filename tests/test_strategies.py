"""The four strategies: units, shapes, consistent probabilities, learning, partial labels, options."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from hiercls.builtin.strategies import BUILTIN_STRATEGIES as STRATEGIES
from hiercls.errors import ConfigError
from hiercls.probabilities import NodeProbabilities
from hiercls.strategies import (
    HierarchicalClassifier,
    build_strategy,
    strategy_options,
)
from hiercls.taxonomy import Taxonomy, load_taxonomy

TAXONOMY_DIR = Path(__file__).resolve().parents[1] / "taxonomy"


def tiny_backbone() -> nn.Module:
    """A few hundred parameters: conv -> pooled 8 features."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model.num_features = 8
    return model


@pytest.fixture(scope="module")
def leukemia() -> Taxonomy:
    return load_taxonomy(TAXONOMY_DIR / "leukemia.yaml")


@pytest.fixture(scope="module")
def blood_cells() -> Taxonomy:
    return load_taxonomy(TAXONOMY_DIR / "blood-cells.yaml")


def labels_of(tax: Taxonomy, names: list[str]) -> torch.Tensor:
    return torch.tensor([tax.index[n] for n in names], dtype=torch.long)


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def build(name: str, tax: Taxonomy, **kwargs) -> HierarchicalClassifier:
    torch.manual_seed(0)
    return build_strategy(name, tax, backbone=tiny_backbone, **kwargs)


# -- structure -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, expected",
    [
        ("flat", ["flat"]),
        ("per_node", ["node:root", "node:Leukemia", "node:Acute", "node:Chronic"]),
        ("per_level", ["level:1", "level:2", "level:3"]),
        ("joint", ["joint"]),
    ],
)
def test_training_units_on_the_leukemia_tree(leukemia, name, expected):
    model = build(name, leukemia)
    units = model.training_units()
    assert [u.name for u in units] == expected
    assert model.strategy == name and model.taxonomy is leukemia
    assert model.training_units()[0] is units[0]  # the same objects every call
    # every unit has its own parameters (its own backbone for per_node / per_level)
    ids = [{id(p) for p in u.module.parameters()} for u in units]
    for i in range(len(ids)):
        for j in range(i + 1, len(ids)):
            assert not ids[i] & ids[j]
    assert sum(len(s) for s in ids) == len(list(model.parameters()))


def test_per_node_has_one_unit_per_internal_node_on_blood_cells(blood_cells):
    model = build("per_node", blood_cells)
    assert [u.name for u in model.training_units()] == [f"node:{n}" for n in blood_cells.internal_nodes]


@pytest.mark.parametrize("name", STRATEGIES)
@pytest.mark.parametrize("tree", ["leukemia", "blood_cells"])
def test_conditionals_and_marginals_are_consistent(request, name, tree):
    tax = request.getfixturevalue(tree)
    model = build(name, tax)
    x = images(6)
    cond = model.node_conditionals(x)
    assert cond.shape == (6, tax.num_nodes) and cond.dtype == torch.float32
    assert torch.all(cond[:, tax.index[tax.root]] == 1)
    for node in tax.internal_nodes:
        sums = cond[:, tax.children_indices(node)].sum(1)
        assert torch.allclose(sums, torch.ones(6), atol=1e-5), node
    marginal = model.node_marginals(x)
    assert torch.allclose(marginal[:, 0], torch.ones(6), atol=1e-6)
    for node in tax.internal_nodes:
        gap = marginal[:, tax.index[node]] - marginal[:, tax.children_indices(node)].sum(1)
        assert gap.abs().max() < 1e-5, node
    probs = model.predict_proba(x)
    assert isinstance(probs, NodeProbabilities) and len(probs) == 6
    assert probs.consistency_error() < 1e-5
    np.testing.assert_allclose(probs.conditional, cond.detach().double().numpy(), atol=1e-6)


def test_predict_proba_uses_eval_mode_and_restores_training():
    tax = Taxonomy.from_nested({"a": {"a1": {}, "a2": {}}, "b": {}})
    model = build("joint", tax, options={"dropout": 0.5})
    model.train()
    x = images(4)
    first = model.predict_proba(x, batch_size=3)
    second = model.predict_proba(x)
    np.testing.assert_allclose(first.marginal, second.marginal, atol=1e-6)  # no dropout noise
    assert model.training


def test_output_shapes_of_each_unit(leukemia):
    x = images(3)
    flat = build("flat", leukemia).training_units()[0]
    assert flat.module(x).shape == (3, 7)
    for unit, n in zip(build("per_node", leukemia).training_units(), [3, 2, 3, 2]):
        assert unit.module(x).shape == (3, n)
    for unit, n in zip(build("per_level", leukemia).training_units(), [3, 2, 5]):
        assert unit.module(x).shape == (3, n)
    out = build("joint", leukemia).training_units()[0].module(x)
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "root": (3, 3), "Leukemia": (3, 2), "Acute": (3, 3), "Chronic": (3, 2)
    }


# -- learning ---------------------------------------------------------------------------

BLOOD_LABELS = [
    "segmented_neutrophil", "band_neutrophil", "eosinophil", "basophil", "promyelocyte", "myelocyte",
    "metamyelocyte", "lymphocyte", "monocyte", "erythroblast", "platelet",
    "neutrophil", "immature_granulocyte",  # partial labels
]


@pytest.mark.parametrize("name", STRATEGIES)
@pytest.mark.parametrize("tree", ["leukemia", "blood_cells"])
def test_every_unit_overfits_a_fixed_batch(request, name, tree):
    tax = request.getfixturevalue(tree)
    names = list(tax.leaves) * 2 if tree == "leukemia" else BLOOD_LABELS
    labels = labels_of(tax, names)
    x = images(len(names), seed=3)
    model = build(name, tax, options={"adapter": "per_level"} if name == "joint" else None)
    for unit in model.training_units():
        rows = torch.from_numpy(unit.sample_mask(labels.numpy()))
        assert rows.any()
        xb, yb = x[rows], labels[rows]
        optimizer = torch.optim.Adam(unit.module.parameters(), lr=0.05)
        losses = []
        for _ in range(25):
            loss, logs = unit.compute_loss(unit.module(xb), yb)
            assert loss.dim() == 0 and all(not v.requires_grad for v in logs.values())
            optimizer.zero_grad()
            loss.backward()
            # every parameter takes part in every step (DDP needs no find_unused_parameters)
            assert all(p.grad is not None for p in unit.module.parameters()), unit.name
            optimizer.step()
            losses.append(loss.item())
        assert losses[-1] < 0.6 * losses[0], (unit.name, losses[0], losses[-1])


# -- which images each unit learns from ------------------------------------------------


def test_sample_masks(leukemia, blood_cells):
    names = ["Acute", "ALL", "Leukemia", "Normal", "CLL", "APML"]
    labels = np.append(labels_of(leukemia, names).numpy(), -1)
    per_node = {u.name: u.sample_mask(labels).tolist() for u in build("per_node", leukemia).training_units()}
    assert per_node["node:Acute"] == [False, True, False, False, False, True, False]
    assert per_node["node:Leukemia"] == [True, True, False, False, True, True, False]
    assert per_node["node:root"] == [True] * 6 + [False]
    assert per_node["node:Chronic"] == [False, False, False, False, True, False, False]
    for name in ("flat", "joint"):
        assert build(name, leukemia).training_units()[0].sample_mask(labels).tolist() == [True] * 6 + [False]
    levels = {u.name: u.sample_mask(labels).tolist() for u in build("per_level", leukemia).training_units()}
    assert levels["level:2"] == [True, True, False, False, True, True, False]
    assert levels["level:3"] == [False, True, False, False, True, True, False]
    # blood cells: leaves at several depths
    names = ["erythroblast", "neutrophil", "band_neutrophil", "eosinophil"]
    labels = labels_of(blood_cells, names).numpy()
    units = build("per_level", blood_cells).training_units()
    levels = {u.name: u.sample_mask(labels).tolist() for u in units}
    assert levels == {
        "level:1": [True, True, True, True],
        "level:2": [False, True, True, True],
        "level:3": [False, False, True, False],
    }


# -- partial labels ---------------------------------------------------------------------


def test_flat_partial_label_loss_is_log_of_summed_leaf_probability(leukemia):
    model = build("flat", leukemia)
    unit = model.training_units()[0]
    x = images(4)
    logits = unit.module(x)
    loss, _ = unit.compute_loss(logits, labels_of(leukemia, ["Acute"] * 4))
    probs = torch.softmax(logits, 1)
    acute = [leukemia.leaves.index(n) for n in ("ALL", "AML", "APML")]
    expected = -torch.log(probs[:, acute].sum(1)).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # an exact label is the usual cross-entropy
    loss, _ = unit.compute_loss(logits, labels_of(leukemia, ["CML"] * 4))
    expected = -torch.log(probs[:, leukemia.leaves.index("CML")]).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def _grad_norms(module: nn.Module) -> float:
    return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)


def test_joint_partial_label_trains_only_the_heads_above(leukemia):
    model = build("joint", leukemia, options={"adapter": "per_level"})
    unit = model.training_units()[0]
    network = unit.module
    loss, logs = unit.compute_loss(network(images(5)), labels_of(leukemia, ["Acute"] * 5))
    loss.backward()
    assert _grad_norms(network.head("root")) > 0
    assert _grad_norms(network.head("Leukemia")) > 0
    assert _grad_norms(network.head("Acute")) == 0  # the ALL / AML / APML decision learns nothing
    assert _grad_norms(network.head("Chronic")) == 0
    assert _grad_norms(network.adapters[2]) == 0  # Acute's level adapter
    assert _grad_norms(network.backbone) > 0
    assert logs["Acute"].item() == 0.0 and logs["root"].item() > 0


def test_per_node_partial_label_is_skipped_below_the_label(leukemia):
    units = {u.name: u for u in build("per_node", leukemia).training_units()}
    labels = labels_of(leukemia, ["Acute"] * 3)
    assert not units["node:Acute"].sample_mask(labels.numpy()).any()
    assert units["node:Leukemia"].sample_mask(labels.numpy()).all()
    acute = units["node:Acute"]
    loss, _ = acute.compute_loss(acute.module(images(3)), labels)  # even if the engine sends them
    loss.backward()
    assert loss.item() == 0.0 and _grad_norms(acute.module) == 0


def test_per_level_partial_label_trains_upper_levels_only(blood_cells):
    units = {u.name: u for u in build("per_level", blood_cells).training_units()}
    labels = labels_of(blood_cells, ["neutrophil"] * 3)
    losses = {}
    for name, unit in units.items():
        loss, _ = unit.compute_loss(unit.module(images(3)), labels)
        losses[name] = loss.item()
    assert losses["level:1"] > 0 and losses["level:2"] > 0 and losses["level:3"] == 0


# -- loss weighting and class counts ----------------------------------------------------


def test_joint_loss_is_the_weighted_sum_of_head_losses(leukemia):
    names = ["ALL", "CLL", "Normal", "Acute", "APML"]
    weights = [1.0, 0.5, 2.0]
    unit = build("joint", leukemia, options={"level_weights": weights}).training_units()[0]
    outputs = unit.module(images(5))
    total, logs = unit.compute_loss(outputs, labels_of(leukemia, names))
    expected = sum(weights[leukemia.depth(node)] * value for node, value in logs.items())
    assert total.item() == pytest.approx(float(expected), rel=1e-6)
    assert set(logs) == set(leukemia.internal_nodes)
    # Acute head: only ALL and APML rows (the partial label 'Acute' is skipped there); by default
    # its loss is summed over those rows and divided by the 5 labelled images of the batch.
    logits = outputs["Acute"]
    manual = torch.nn.functional.cross_entropy(logits[[0, 4]], torch.tensor([0, 2]), reduction="sum") / 5
    assert logs["Acute"].item() == pytest.approx(manual.item(), rel=1e-5)
    # head_reduction="head": the mean over the head's own rows instead.
    unit = build("joint", leukemia, options={"head_reduction": "head"}).training_units()[0]
    outputs = unit.module(images(5))
    _, logs = unit.compute_loss(outputs, labels_of(leukemia, names))
    manual = torch.nn.functional.cross_entropy(outputs["Acute"][[0, 4]], torch.tensor([0, 2]))
    assert logs["Acute"].item() == pytest.approx(manual.item(), rel=1e-5)


def test_joint_loss_with_images_reduction_is_the_label_log_likelihood(leukemia):
    """Cross-entropy heads, default reduction: total = mean over images of -log P(label)."""
    names = ["ALL", "CLL", "Normal", "Acute", "APML", "Reactive"]
    model = build("joint", leukemia)
    unit = model.training_units()[0]
    x = images(len(names))
    total, _ = unit.compute_loss(unit.module(x), labels_of(leukemia, names))
    with torch.no_grad():
        marginals = model.node_marginals(x)
    idx = torch.as_tensor([leukemia.index[n] for n in names])
    expected = -torch.log(marginals[torch.arange(len(names)), idx]).mean()
    assert total.item() == pytest.approx(expected.item(), rel=1e-4)


def test_each_decision_receives_its_class_counts(leukemia, monkeypatch):
    import hiercls.losses

    seen = {}
    real = hiercls.losses.create_loss

    def spy(name, context, **options):
        seen[(context.node, tuple(context.classes))] = np.asarray(context.class_counts).tolist()
        return real(name, context, **options)

    monkeypatch.setattr(hiercls.losses, "create_loss", spy)
    counts = np.zeros(leukemia.num_nodes)
    for node, n in {"Normal": 10, "Reactive": 4, "ALL": 3, "AML": 2, "Acute": 5, "CLL": 1, "CML": 6}.items():
        counts[leukemia.index[node]] = n
    build("joint", leukemia, class_counts=counts)
    assert seen[("root", ("Normal", "Reactive", "Leukemia"))] == [10, 4, 17]
    assert seen[("Leukemia", ("Acute", "Chronic"))] == [10, 7]
    assert seen[("Acute", ("ALL", "AML", "APML"))] == [3, 2, 0]
    seen.clear()
    build("flat", leukemia, class_counts=counts)
    assert seen[(None, leukemia.leaves)] == [10, 4, 3, 2, 0, 1, 6]
    seen.clear()
    build("per_level", leukemia, class_counts=counts)
    assert seen[(None, ("Acute", "Chronic"))] == [10, 7]


# -- checkpoints ------------------------------------------------------------------------


@pytest.mark.parametrize("name", STRATEGIES)
def test_state_dict_round_trips_through_safetensors(leukemia, tmp_path, name):
    from safetensors.torch import load_file, save_file

    model = build(name, leukemia)
    save_file(model.state_dict(), tmp_path / "w.safetensors")
    torch.manual_seed(123)
    other = build_strategy(name, leukemia, backbone=tiny_backbone)
    x = images(2)
    assert not torch.allclose(other.node_conditionals(x), model.node_conditionals(x))
    other.load_state_dict(load_file(tmp_path / "w.safetensors"))
    torch.testing.assert_close(other.node_conditionals(x), model.node_conditionals(x))


def test_timm_backbone_by_name(leukemia):
    model = build_strategy("joint", leukemia, backbone="resnet18", backbone_kwargs={})
    x = torch.randn(2, 3, 32, 32)
    cond = model.node_conditionals(x)
    assert cond.shape == (2, leukemia.num_nodes)
    assert model.predict_proba(x).consistency_error() < 1e-5


# -- user mistakes ----------------------------------------------------------------------


def test_unknown_strategy(leukemia):
    with pytest.raises(ConfigError, match="unknown strategy 'per_tree'.*flat, per_node, per_level, joint"):
        build_strategy("per_tree", leukemia, backbone=tiny_backbone)


@pytest.mark.parametrize("name", STRATEGIES)
def test_unknown_option_names_it_and_the_accepted_ones(leukemia, name):
    with pytest.raises(ConfigError, match="'adaptor'.*accepted options: .*dropout") as info:
        build_strategy(name, leukemia, backbone=tiny_backbone, options={"adaptor": "shared"})
    assert name in str(info.value)
    assert set(strategy_options(name)) >= {"dropout"}


@pytest.mark.parametrize(
    "options, match",
    [
        ({"adapter": "per_node"}, "adapter"),
        ({"feed_parent": "yes"}, "feed_parent"),
        ({"level_weights": [1.0, 1.0]}, "level_weights.*3"),
        ({"level_weights": [1.0, -1.0, 1.0]}, "level_weights"),
        ({"dropout": 1.5}, "dropout"),
    ],
)
def test_invalid_joint_option_values(leukemia, options, match):
    with pytest.raises(ConfigError, match=match):
        build_strategy("joint", leukemia, backbone=tiny_backbone, options=options)


def test_backbone_without_num_features(leukemia):
    with pytest.raises(ConfigError, match="num_features"):
        build_strategy("flat", leukemia, backbone=lambda: nn.Flatten())


@pytest.mark.parametrize("name", STRATEGIES)
def test_a_single_child_is_certain_and_gets_no_model(leukemia, name):
    """Excluding Chronic leaves Leukemia with one child: P(Acute | Leukemia) = 1, no unit or head for it."""
    tax = leukemia.exclude(["Chronic"])
    model = build(name, tax, options={"adapter": "per_level"} if name == "joint" else None)
    units = model.training_units()
    if name == "per_node":
        assert [u.name for u in units] == ["node:root", "node:Acute"]
    if name == "per_level":
        assert [u.name for u in units] == ["level:1", "level:3"]
    if name == "joint":
        assert set(units[0].module(images(1))) == {"root", "Acute"}
    x = images(4)
    cond = model.node_conditionals(x)
    assert torch.all(cond[:, tax.index["Acute"]] == 1)
    assert model.predict_proba(x).consistency_error() < 1e-5
    labels = labels_of(tax, ["ALL", "Normal", "Acute", "AML"])
    for unit in units:
        loss, _ = unit.compute_loss(unit.module(x), labels)
        loss.backward()
        assert torch.isfinite(loss)
        assert all(p.grad is not None for p in unit.module.parameters()), unit.name


def test_a_single_leaf_tree_is_refused():
    tax = Taxonomy.from_dict({"name": "one", "children": [{"name": "a", "children": ["b"]}]})
    with pytest.raises(ConfigError, match="single leaf"):
        build_strategy("flat", tax, backbone=tiny_backbone)
