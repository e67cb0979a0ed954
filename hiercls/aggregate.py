"""Group aggregation: from image predictions to one prediction per group (slide, patient).

A diagnosis is made per slide, not per field of view. Hamdi et al. take the most frequent
predicted label of a slide's images (``mode``); averaging the node probabilities of the images
and decoding the mean (``mean``) uses the model's confidence as well. Both are
``GroupAggregator`` subclasses registered through the plugin hook ``register_aggregators``,
where a plugin adds its own (see ``docs/aggregation.md``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from hiercls.errors import ConfigError, DataError
from hiercls.probabilities import NodeProbabilities
from hiercls.taxonomy import Taxonomy

__all__ = [
    "GroupAggregator",
    "ModeAggregator",
    "MeanAggregator",
    "aggregator_names",
    "get_aggregator",
    "group_rows",
    "GroupTruth",
    "aggregate_truth",
    "evaluate_groups",
    "GROUP_SCORINGS",
    "group_column_title",
]

# How group predictions are scored: one row per group, or every image with its group's prediction.
GROUP_SCORINGS = ("groups", "images")

AggregateResult = tuple[list[str], list[str], NodeProbabilities | None]


def group_rows(groups: Sequence[str | None]) -> tuple[list[str], list[np.ndarray]]:
    """Group ids in order of first appearance, and the row indices of each.

    Every row needs a group; rows without one must be dropped (or given their own) first.
    """
    missing = [i for i, g in enumerate(groups) if g is None or g == ""]
    if missing:
        raise DataError(
            f"{len(missing)} row(s) have no group (first: row {missing[0]}); "
            "give every image a group or drop those rows before aggregating"
        )
    rows: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        rows.setdefault(str(g), []).append(i)
    return list(rows), [np.asarray(r, dtype=np.int64) for r in rows.values()]


def _mean_probabilities(taxonomy: Taxonomy, probs: NodeProbabilities, rows: list[np.ndarray]) -> NodeProbabilities:
    marginal = np.stack([probs.marginal[r].mean(axis=0) for r in rows]) if rows else np.zeros((0, taxonomy.num_nodes))
    return NodeProbabilities.from_marginals(taxonomy, marginal)


class GroupAggregator:
    """Turns image predictions into one prediction per group.

    Subclasses implement ``aggregate`` and set ``name``. Groups come back in order of first
    appearance in ``groups``; ``group_probs`` is ``None`` when the aggregator has no
    probabilities to report.
    """

    name: ClassVar[str] = ""

    def aggregate(
        self,
        taxonomy: Taxonomy,
        groups: Sequence[str | None],
        pred_nodes: Sequence[str],
        probs: NodeProbabilities | None,
    ) -> AggregateResult:
        raise NotImplementedError

    @staticmethod
    def _check(groups: Sequence[str | None], pred_nodes: Sequence[str], probs: NodeProbabilities | None) -> None:
        if len(groups) != len(pred_nodes):
            raise ValueError(f"{len(groups)} groups but {len(pred_nodes)} predictions")
        if probs is not None and len(probs) != len(pred_nodes):
            raise ValueError(f"{len(pred_nodes)} predictions but {len(probs)} probability rows")


class ModeAggregator(GroupAggregator):
    """Majority vote of the images' predicted nodes (Hamdi et al.'s slide-level rule).

    Ties are broken deterministically: among the most frequent nodes, the one with the
    highest summed marginal probability over the group's images wins (when probabilities are
    given); remaining ties go to the node predicted first in the group's row order. When
    probabilities are given, the group's mean probabilities are returned with the vote, so
    ranking metrics (AUROC) can be computed per group.
    """

    name = "mode"

    def aggregate(self, taxonomy, groups, pred_nodes, probs):
        self._check(groups, pred_nodes, probs)
        group_ids, rows = group_rows(groups)
        winners = []
        for r in rows:
            first: dict[str, int] = {}
            counts: dict[str, int] = {}
            for order, i in enumerate(r):
                node = pred_nodes[i]
                first.setdefault(node, order)
                counts[node] = counts.get(node, 0) + 1

            def key(node: str, r=r) -> tuple[int, float, int]:
                mass = float(probs.marginal[r, taxonomy.index[node]].sum()) if probs is not None else 0.0
                return (counts[node], mass, -first[node])

            winners.append(max(counts, key=key))
        group_probs = _mean_probabilities(taxonomy, probs, rows) if probs is not None else None
        return group_ids, winners, group_probs


class MeanAggregator(GroupAggregator):
    """Average the images' marginal probabilities per group, then decode the mean.

    Decoding is greedy by default (``decode="threshold"`` stops at a node whose best child is
    below ``threshold``). Needs probabilities.
    """

    name = "mean"

    def __init__(self, decode: str = "greedy", threshold: float = 0.5):
        self.decode = decode
        self.threshold = threshold

    def aggregate(self, taxonomy, groups, pred_nodes, probs):
        self._check(groups, pred_nodes, probs)
        if probs is None:
            raise ConfigError(
                "the 'mean' aggregator needs node probabilities (p: columns in the predictions CSV); "
                "use --aggregator mode for predictions without them"
            )
        group_ids, rows = group_rows(groups)
        group_probs = _mean_probabilities(taxonomy, probs, rows)
        return group_ids, group_probs.decode(self.decode, self.threshold), group_probs


def aggregator_names() -> tuple[str, ...]:
    """Every registered aggregator name (built-ins ``mode`` and ``mean`` first, then plugins')."""
    from hiercls.plugins import aggregator_names as registered

    return registered()


def get_aggregator(name: str, **options) -> GroupAggregator:
    """An aggregator instance by name, from the plugin registry (hook ``register_aggregators``);
    ``ConfigError`` listing the choices when unknown."""
    from hiercls.plugins import find_aggregator

    registration = find_aggregator(name)
    cls = registration.factory
    if not (isinstance(cls, type) and issubclass(cls, GroupAggregator)):
        raise ConfigError(
            f"aggregator '{name}' from plugin {registration.plugin} is not a GroupAggregator subclass"
        )
    return cls(**options)


@dataclass
class GroupTruth:
    """One true label per group, and which groups had images with different labels."""

    group_ids: list[str]
    true_nodes: list[str | None]
    mixed_groups: list[str]

    @property
    def n_mixed(self) -> int:
        return len(self.mixed_groups)


def aggregate_truth(groups: Sequence[str | None], true_nodes: Sequence[str | None]) -> GroupTruth:
    """The label of each group: the one its images agree on, else the most frequent.

    Ties among the most frequent labels go to the one seen first. Unlabelled images (``None``)
    are ignored; a group with no labelled image gets ``None``. Groups come in order of first
    appearance, the same order as ``GroupAggregator.aggregate``.
    """
    if len(groups) != len(true_nodes):
        raise ValueError(f"{len(groups)} groups but {len(true_nodes)} labels")
    group_ids, rows = group_rows(groups)
    labels: list[str | None] = []
    mixed: list[str] = []
    for gid, r in zip(group_ids, rows):
        counts: dict[str, int] = {}
        for i in r:
            if true_nodes[i] is not None:
                counts[true_nodes[i]] = counts.get(true_nodes[i], 0) + 1
        if len(counts) > 1:
            mixed.append(gid)
        # dicts keep insertion order and max() returns the first maximum: first seen wins.
        labels.append(max(counts, key=counts.__getitem__) if counts else None)
    return GroupTruth(group_ids, labels, mixed)


def evaluate_groups(
    taxonomy: Taxonomy,
    groups: Sequence[str | None],
    true_nodes: Sequence[str | None],
    pred_nodes: Sequence[str],
    probs: NodeProbabilities | None,
    aggregator: GroupAggregator,
    aggregator_name: str = "",
    scoring: str = "groups",
) -> dict:
    """One prediction per group (slide, patient) by ``aggregator``, scored like images are.

    ``scoring="groups"`` scores one row per group, its truth being its images' label (or the
    most frequent one when they disagree: counted as mixed groups). ``scoring="images"`` gives
    every image its group's prediction (and mean probabilities, when the aggregator returns
    them) and scores the images against their own labels: the per-slide vote counted in
    images, as Hamdi et al. report it. Images without a group are left out (with a note).
    """
    from hiercls.metrics import evaluate_predictions

    if scoring not in GROUP_SCORINGS:
        raise ConfigError(f"unknown group scoring '{scoring}'; choose one of {', '.join(GROUP_SCORINGS)}")
    keep = [i for i, g in enumerate(groups) if g is not None]
    notes = [f"{len(groups) - len(keep)} image(s) without a group left out"] if len(keep) < len(groups) else []
    if not keep:
        raise DataError("no image has a group; group metrics need a group per image")
    kept_groups = [groups[i] for i in keep]
    kept_truth = [true_nodes[i] for i in keep]
    kept_probs = probs[np.asarray(keep, dtype=np.int64)] if probs is not None else None
    group_ids, group_preds, group_probs = aggregator.aggregate(
        taxonomy, kept_groups, [pred_nodes[i] for i in keep], kept_probs
    )
    truth = aggregate_truth(kept_groups, kept_truth)
    if all(t is None for t in truth.true_nodes):
        raise DataError("no group has a labelled image; group metrics need labels")
    if scoring == "images":
        metrics = _score_images_with_group_votes(taxonomy, kept_groups, kept_truth, group_ids, group_preds, group_probs)
        unit = "image(s)"
    else:
        metrics = evaluate_predictions(taxonomy, truth.true_nodes, group_preds, group_probs)
        unit = "group(s)"
    metrics["notes"] = notes + [n.replace("row(s)", unit) for n in metrics["notes"]]
    if group_probs is not None and not isinstance(aggregator, MeanAggregator):
        # Table 3 needs each decision's probabilities, which a vote does not give: say so, as the two
        # columns can then differ in either direction
        metrics["notes"].append(
            "decision accuracies: 'own subtree' from each group's mean probabilities, 'end to end' from "
            f"the group's {aggregator_name or type(aggregator).__name__} prediction"
        )
    if truth.n_mixed:
        metrics["notes"].append(
            f"{truth.n_mixed} group(s) hold images with different labels; "
            + ("each image keeps its own label" if scoring == "images" else "their label is the most frequent one")
        )
    metrics.update(
        n_groups=len(group_ids),
        n_mixed_groups=truth.n_mixed,
        mixed_groups=truth.mixed_groups,
        aggregator=aggregator_name or type(aggregator).__name__,
        scoring=scoring,
    )
    return metrics


def group_column_title(group_metrics: dict) -> str:
    """Title of the group-level column in tables: ``groups``, or ``images, group vote``."""
    return "images, group vote" if group_metrics.get("scoring") == "images" else "groups"


def _score_images_with_group_votes(
    taxonomy: Taxonomy,
    groups: Sequence[str],
    true_nodes: Sequence[str | None],
    group_ids: list[str],
    group_preds: list[str],
    group_probs: NodeProbabilities | None,
) -> dict:
    """Every image scored with its group's prediction (and probabilities) against its own label."""
    from hiercls.metrics import evaluate_predictions

    position = {str(g): k for k, g in enumerate(group_ids)}
    missing = sorted({str(g) for g in groups} - set(position))
    if missing:
        raise ConfigError(
            f"the aggregator returned no prediction for group(s) {', '.join(missing[:3])}; "
            "an aggregator must return every group id it is given"
        )
    rows = np.asarray([position[str(g)] for g in groups], dtype=np.int64)
    image_preds = [group_preds[k] for k in rows]
    image_probs = group_probs[rows] if group_probs is not None else None
    return evaluate_predictions(taxonomy, true_nodes, image_preds, image_probs)
