"""Flat and hierarchical metrics from node names (and, where needed, ``NodeProbabilities``).

Every function takes true and predicted *node names* of one ``Taxonomy``, so it serves any
tree, any strategy and any decoding (a prediction may stop at an internal node, a label may be
a partial label at an internal node). ``evaluate_predictions`` bundles them into the dict that
``hiercls evaluate`` writes as ``metrics.json``. Definitions and a worked example are in
``docs/metrics.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from hiercls.errors import DataError
from hiercls.probabilities import NodeProbabilities
from hiercls.taxonomy import Taxonomy

__all__ = [
    "hierarchical_prf",
    "accuracy",
    "leaf_accuracy",
    "leaf_label_mask",
    "macro_f1",
    "per_class_prf",
    "auroc",
    "per_level_accuracy",
    "decision_accuracy",
    "depth_accuracy",
    "cut_classes",
    "prf_counts",
    "prf_from_counts",
    "ConfusionMatrix",
    "confusion_matrices",
    "leaf_confusion_matrix",
    "mistake_severity",
    "node_heights",
    "expected_calibration_error",
    "evaluate_predictions",
    "METRIC_KEYS",
]

METRIC_KEYS = (
    "accuracy",
    "macro_f1",
    "hP",
    "hR",
    "hF",
    "auroc",
    "per_level_accuracy",
    "decision_accuracy",
    "depth_accuracy",
    "per_class",
    "mistake_severity",
    "ece",
    "n_images",
    "notes",
)


# -- input checks ---------------------------------------------------------------------------


def _check_nodes(taxonomy: Taxonomy, true_nodes: Sequence[str], pred_nodes: Sequence[str]) -> None:
    if len(true_nodes) != len(pred_nodes):
        raise ValueError(f"{len(true_nodes)} true labels but {len(pred_nodes)} predictions")
    unknown = sorted({str(n) for n in [*true_nodes, *pred_nodes] if n not in taxonomy.index})
    if unknown:
        raise DataError(
            f"node(s) not in taxonomy '{taxonomy.name}': {', '.join(unknown)}; "
            "resolve labels with taxonomy.resolve_labels first"
        )
    if taxonomy.root in true_nodes:
        raise DataError(f"the root '{taxonomy.root}' is not a label; drop unlabelled rows before evaluating")


def _paths(taxonomy: Taxonomy) -> dict[str, tuple[str, ...]]:
    """Root-to-node path of every node, computed once per call (metrics loop over many images)."""
    return {node: taxonomy.path(node) for node in taxonomy.nodes}


def _node_at_depth(paths: dict[str, tuple[str, ...]], node: str, depth: int) -> str | None:
    """The node's ancestor (or itself) at ``depth``; ``None`` when ``node`` is shallower."""
    path = paths[node]
    return path[depth] if depth < len(path) else None


# -- hierarchical precision / recall / F ----------------------------------------------------


def hierarchical_prf(
    taxonomy: Taxonomy,
    true_nodes: Sequence[str],
    pred_nodes: Sequence[str],
    average: Literal["micro", "macro"] = "micro",
) -> dict[str, float]:
    """Hierarchical precision, recall and F1 (Kiritchenko et al. 2006; Hamdi et al. eq. 1).

    Each example's true set is its label with all its ancestors, its predicted set the predicted
    node with all its ancestors, the root excluded from both. ``micro`` sums the intersections
    and set sizes over examples (hP = sum|T∩P| / sum|P|, hR = sum|T∩P| / sum|T|,
    hF = 2 sum|T∩P| / (sum|P| + sum|T|)). ``macro`` averages the per-example hP, hR and hF
    (an empty predicted set, i.e. a prediction stopped at the root, scores 0).
    """
    _check_nodes(taxonomy, true_nodes, pred_nodes)
    if average not in ("micro", "macro"):
        raise ValueError(f"average must be 'micro' or 'macro', not {average!r}")
    if len(true_nodes) == 0:
        raise ValueError("hierarchical_prf needs at least one example")
    sets = {node: frozenset(path[1:]) for node, path in _paths(taxonomy).items()}
    inter = np.zeros(len(true_nodes))
    n_true = np.zeros(len(true_nodes))
    n_pred = np.zeros(len(true_nodes))
    for i, (t, p) in enumerate(zip(true_nodes, pred_nodes)):
        t_set, p_set = sets[t], sets[p]
        inter[i], n_true[i], n_pred[i] = len(t_set & p_set), len(t_set), len(p_set)
    if average == "micro":
        total_i, total_t, total_p = inter.sum(), n_true.sum(), n_pred.sum()
        return {
            "hP": float(total_i / total_p) if total_p else 0.0,
            "hR": float(total_i / total_t),
            "hF": float(2 * total_i / (total_p + total_t)),
        }
    with np.errstate(divide="ignore", invalid="ignore"):
        h_p = np.where(n_pred > 0, inter / np.maximum(n_pred, 1), 0.0)
        h_r = inter / n_true
        h_f = 2 * inter / (n_pred + n_true)
    return {"hP": float(h_p.mean()), "hR": float(h_r.mean()), "hF": float(h_f.mean())}


# -- flat metrics ---------------------------------------------------------------------------


def accuracy(true_nodes: Sequence[str], pred_nodes: Sequence[str]) -> float:
    """Fraction of exact node matches."""
    if len(true_nodes) != len(pred_nodes):
        raise ValueError(f"{len(true_nodes)} true labels but {len(pred_nodes)} predictions")
    if len(true_nodes) == 0:
        raise ValueError("accuracy needs at least one example")
    return float(np.mean([t == p for t, p in zip(true_nodes, pred_nodes)]))


def leaf_label_mask(taxonomy: Taxonomy, true_nodes: Sequence[str]) -> np.ndarray:
    """``True`` for rows whose label is a leaf (partial labels are left out of leaf metrics)."""
    leaves = set(taxonomy.leaves)
    return np.array([t in leaves for t in true_nodes], dtype=bool)


def leaf_accuracy(taxonomy: Taxonomy, true_nodes: Sequence[str], pred_nodes: Sequence[str]) -> float | None:
    """Exact-match accuracy on the rows labelled at a leaf (``None`` when there are none).

    A prediction that stops at an internal node is wrong here; hierarchical metrics give it
    partial credit.
    """
    _check_nodes(taxonomy, true_nodes, pred_nodes)
    mask = leaf_label_mask(taxonomy, true_nodes)
    if not mask.any():
        return None
    return accuracy([t for t, m in zip(true_nodes, mask) if m], [p for p, m in zip(pred_nodes, mask) if m])


def macro_f1(taxonomy: Taxonomy, true_nodes: Sequence[str], pred_nodes: Sequence[str]) -> float | None:
    """Unweighted mean F1 over the leaf classes, on rows labelled at a leaf.

    The classes are the leaves that occur among those rows' labels or predictions (as
    scikit-learn does by default); a prediction at an internal node counts as a miss for the
    true leaf. ``None`` when no row has a leaf label.
    """
    _check_nodes(taxonomy, true_nodes, pred_nodes)
    mask = leaf_label_mask(taxonomy, true_nodes)
    if not mask.any():
        return None
    y_true = [t for t, m in zip(true_nodes, mask) if m]
    y_pred = [p for p, m in zip(pred_nodes, mask) if m]
    from sklearn.metrics import (
        f1_score,  # imported here: scikit-learn is slow to import
    )

    present = set(y_true) | set(y_pred)
    labels = [leaf for leaf in taxonomy.leaves if leaf in present]
    return float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0))


def prf_counts(
    taxonomy: Taxonomy, true_nodes: Sequence[str], pred_nodes: Sequence[str], members: Sequence[str]
) -> dict[str, int]:
    """True positives, false positives and false negatives of the class made of ``members``.

    An image belongs to the class when its label lies at or under one of ``members``, and is
    predicted as it when its prediction does. An image labelled strictly above a member (and
    not at or under another) says nothing about the class and is left out. One member gives
    the per-node counts of ``per_class_prf``; several give a merged row (Hamdi et al.'s
    "AML+APML").
    """
    _check_nodes(taxonomy, true_nodes, pred_nodes)
    unknown = [m for m in members if m not in taxonomy.index or m == taxonomy.root]
    if unknown or not members:
        raise ValueError(f"members must be non-root nodes of '{taxonomy.name}', got {list(members)!r}")
    return _counts(_paths(taxonomy), true_nodes, pred_nodes, members)


def _counts(
    paths: dict[str, tuple[str, ...]], true_nodes: Sequence[str], pred_nodes: Sequence[str], members: Sequence[str]
) -> dict[str, int]:
    wanted = frozenset(members)
    above = frozenset(a for m in wanted for a in paths[m][:-1]) - wanted
    tp = fp = fn = 0
    for t, p in zip(true_nodes, pred_nodes):
        is_true = not wanted.isdisjoint(paths[t])
        if not is_true and t in above:
            continue
        is_pred = not wanted.isdisjoint(paths[p])
        tp += is_true and is_pred
        fp += is_pred and not is_true
        fn += is_true and not is_pred
    return {"tp": tp, "fp": fp, "fn": fn}


def prf_from_counts(tp: int, fp: int, fn: int) -> dict[str, float | int | None]:
    """Precision, recall, F1 and support from counts; an undefined ratio (0/0) is ``None``."""
    return {
        "precision": tp / (tp + fp) if tp + fp else None,
        "recall": tp / (tp + fn) if tp + fn else None,
        "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None,
        "support": tp + fn,
    }


def per_class_prf(
    taxonomy: Taxonomy, true_nodes: Sequence[str], pred_nodes: Sequence[str]
) -> dict[str, dict[str, float | int | None]]:
    """Precision, recall, F1 and support for every non-root node (Hamdi et al. Table 4).

    An image belongs to a node when its label lies at or under it, and is predicted as the
    node when its prediction lies at or under it; for leaves this is ordinary per-class
    P/R/F1. Images labelled above a node (partial labels) say nothing about it and are left
    out of that node's counts. Undefined ratios (0/0) are ``None``, never a made-up 0.
    """
    _check_nodes(taxonomy, true_nodes, pred_nodes)
    paths = _paths(taxonomy)
    return {
        node: prf_from_counts(**_counts(paths, true_nodes, pred_nodes, [node]))
        for node in taxonomy.nodes
        if node != taxonomy.root
    }


# -- per-level accuracy and confusion matrices ----------------------------------------------


def _decision_rows(paths: dict[str, tuple[str, ...]], node: str, true_nodes: Sequence[str]) -> list[int]:
    """Rows whose label lies strictly under ``node``: the true child of ``node`` is known."""
    return [i for i, t in enumerate(true_nodes) if node in paths[t][:-1]]


def per_level_accuracy(
    taxonomy: Taxonomy, true_nodes: Sequence[str], pred_nodes: Sequence[str]
) -> dict[str, float | None]:
    """Accuracy of each internal node's decision among its children (Hamdi et al. Table 3).

    For an internal node at depth d, the images are those whose label lies strictly under it;
    the true child is the label's ancestor at depth d + 1, the predicted child the predicted
    node's ancestor at depth d + 1. A prediction that stops above depth d + 1, or that went
    down another branch, counts as wrong. ``None`` for a node with no such image.
    """
    _check_nodes(taxonomy, true_nodes, pred_nodes)
    paths = _paths(taxonomy)
    out: dict[str, float | None] = {}
    for node in taxonomy.internal_nodes:
        rows = _decision_rows(paths, node, true_nodes)
        if not rows:
            out[node] = None
            continue
        d = len(paths[node])  # depth of the children
        hits = [_node_at_depth(paths, true_nodes[i], d) == _node_at_depth(paths, pred_nodes[i], d) for i in rows]
        out[node] = float(np.mean(hits))
    return out


def decision_accuracy(
    taxonomy: Taxonomy, true_nodes: Sequence[str], probs: NodeProbabilities
) -> dict[str, float | None]:
    """Accuracy of each internal node's decision on its own subtree (Hamdi et al. Table 3).

    Each decision is scored as a dedicated classifier would be: among the images whose label
    lies strictly under node N, is the most probable child under P(child | N, image) the
    label's ancestor among N's children? What happened higher up does not matter, unlike
    ``per_level_accuracy`` (the end-to-end view). The conditionals come from ``probs``; for
    probabilities built from marginals only (a flat model, a predictions CSV, a group's mean)
    they are the children's marginals divided by N's, so the choice is the child with the
    highest marginal. An image labelled at an internal node M counts for the decisions above
    M only. ``None`` for a node with no such image.
    """
    if len(true_nodes) != len(probs):
        raise ValueError(f"{len(true_nodes)} true labels but {len(probs)} probability rows")
    _check_nodes(taxonomy, true_nodes, list(true_nodes))
    paths = _paths(taxonomy)
    out: dict[str, float | None] = {}
    for node in taxonomy.internal_nodes:
        rows = np.asarray(_decision_rows(paths, node, true_nodes), dtype=np.int64)
        if rows.size == 0:
            out[node] = None
            continue
        children = taxonomy.children(node)
        chosen = probs.conditional[np.ix_(rows, taxonomy.children_indices(node))].argmax(axis=1)
        d = len(paths[node])  # depth of the children
        hits = [children[c] == paths[true_nodes[i]][d] for i, c in zip(rows, chosen)]
        out[node] = float(np.mean(hits))
    return out


def _cut(paths: dict[str, tuple[str, ...]], node: str, depth: int) -> str:
    """``node`` seen in the tree cut at ``depth``: its ancestor there, or itself if shallower."""
    return _node_at_depth(paths, node, depth) or node


def depth_accuracy(
    taxonomy: Taxonomy, true_nodes: Sequence[str], pred_nodes: Sequence[str]
) -> dict[str, float | None]:
    """Accuracy in the tree cut at each depth d = 1 .. max depth (keys ``"1"``, ``"2"``, ...).

    Cut at depth d, every node stands for its ancestor at depth d, a leaf above d for itself:
    the classes a flat classifier of that granularity would have (blood-cells cut at depth 2:
    the 8 classes of the PBC dataset's folders). Images count when their label says which
    class of the cut they are (a label at depth >= d, or a leaf); a prediction that stops
    above depth d at an internal node is wrong. ``None`` for a depth with no such image.
    """
    _check_nodes(taxonomy, true_nodes, pred_nodes)
    paths = _paths(taxonomy)
    out: dict[str, float | None] = {}
    for d in range(1, taxonomy.max_depth + 1):
        rows = [i for i, t in enumerate(true_nodes) if len(paths[t]) > d or taxonomy.is_leaf(t)]
        hits = [_cut(paths, true_nodes[i], d) == _cut(paths, pred_nodes[i], d) for i in rows]
        out[str(d)] = float(np.mean(hits)) if rows else None
    return out


def cut_classes(taxonomy: Taxonomy, depth: int) -> int:
    """How many classes the tree has when cut at ``depth`` (the nodes there and the leaves above)."""
    return sum(
        1 for node in taxonomy.nodes
        if taxonomy.depth(node) == depth or (taxonomy.is_leaf(node) and 0 < taxonomy.depth(node) < depth)
    )


@dataclass
class ConfusionMatrix:
    """Counts ``matrix[true, predicted]`` over ``labels``.

    ``n_outside`` counts the images that belong here (by their label) but whose prediction
    is none of ``labels`` (it stopped higher up or went down another branch).
    """

    node: str
    labels: tuple[str, ...]
    matrix: np.ndarray
    n_outside: int


def confusion_matrices(
    taxonomy: Taxonomy, true_nodes: Sequence[str], pred_nodes: Sequence[str]
) -> dict[str, ConfusionMatrix]:
    """One children x children confusion matrix per internal node, on the images of ``per_level_accuracy``."""
    _check_nodes(taxonomy, true_nodes, pred_nodes)
    paths = _paths(taxonomy)
    out: dict[str, ConfusionMatrix] = {}
    for node in taxonomy.internal_nodes:
        children = taxonomy.children(node)
        position = {c: k for k, c in enumerate(children)}
        matrix = np.zeros((len(children), len(children)), dtype=np.int64)
        outside = 0
        d = len(paths[node])
        for i in _decision_rows(paths, node, true_nodes):
            t = _node_at_depth(paths, true_nodes[i], d)
            p = _node_at_depth(paths, pred_nodes[i], d)
            if p in position:
                matrix[position[t], position[p]] += 1
            else:
                outside += 1
        out[node] = ConfusionMatrix(node, children, matrix, outside)
    return out


def leaf_confusion_matrix(taxonomy: Taxonomy, true_nodes: Sequence[str], pred_nodes: Sequence[str]) -> ConfusionMatrix:
    """Leaves x leaves on rows labelled at a leaf; predictions at internal nodes go to ``n_outside``."""
    _check_nodes(taxonomy, true_nodes, pred_nodes)
    leaves = taxonomy.leaves
    position = {leaf: k for k, leaf in enumerate(leaves)}
    matrix = np.zeros((len(leaves), len(leaves)), dtype=np.int64)
    outside = 0
    for t, p in zip(true_nodes, pred_nodes):
        if t not in position:
            continue
        if p in position:
            matrix[position[t], position[p]] += 1
        else:
            outside += 1
    return ConfusionMatrix(taxonomy.root, leaves, matrix, outside)


# -- AUROC ----------------------------------------------------------------------------------


def _binary_auroc(y: np.ndarray, score: np.ndarray) -> float | None:
    from sklearn.metrics import (
        roc_auc_score,  # imported here: scikit-learn is slow to import
    )

    if y.size == 0 or y.all() or not y.any():
        return None
    return float(roc_auc_score(y, score))


def auroc(
    taxonomy: Taxonomy, true_nodes: Sequence[str], probs: NodeProbabilities, notes: list[str] | None = None
) -> dict[str, Any]:
    """One-vs-rest AUROC on the leaves and on every internal node's decision (Hamdi et al. Table 2).

    * ``leaves``: per leaf, AUROC of its marginal probability on the rows labelled at a leaf;
      ``leaf_macro`` is their unweighted mean.
    * ``nodes``: per internal node, among the images whose label lies strictly under it, the
      mean over its children of the one-vs-rest AUROC of the child's *conditional* probability;
      ``node_children`` holds the per-child values.

    Classes absent from the labels (or the only class present) have no AUROC; they are left out
    and, when ``notes`` is given, named there.
    """
    if len(true_nodes) != len(probs):
        raise ValueError(f"{len(true_nodes)} true labels but {len(probs)} probability rows")
    _check_nodes(taxonomy, true_nodes, list(true_nodes))
    notes = notes if notes is not None else []
    true_arr = np.asarray(true_nodes, dtype=object)

    mask = leaf_label_mask(taxonomy, true_nodes)
    leaves: dict[str, float] = {}
    skipped: list[str] = []
    for leaf in taxonomy.leaves:
        value = _binary_auroc(true_arr[mask] == leaf, probs.column(leaf)[mask])
        if value is None:
            skipped.append(leaf)
        else:
            leaves[leaf] = value
    if skipped and mask.any():
        notes.append(f"leaf AUROC left out for {', '.join(skipped)}: absent from the labels (or the only class)")

    paths = _paths(taxonomy)
    nodes: dict[str, float | None] = {}
    node_children: dict[str, dict[str, float]] = {}
    for node in taxonomy.internal_nodes:
        if len(taxonomy.children(node)) < 2:
            continue  # a single child is certain given its parent: no decision to score
        rows = np.array(_decision_rows(paths, node, true_nodes), dtype=np.int64)
        per_child: dict[str, float] = {}
        missing: list[str] = []
        for child in taxonomy.children(node):
            y = np.array([child in paths[t] for t in true_arr[rows]], dtype=bool)
            value = _binary_auroc(y, probs.conditional[rows, taxonomy.index[child]])
            if value is None:
                missing.append(child)
            else:
                per_child[child] = value
        node_children[node] = per_child
        nodes[node] = float(np.mean(list(per_child.values()))) if per_child else None
        if missing and rows.size:
            notes.append(f"AUROC at '{node}' left out for {', '.join(missing)}: absent from the labels under it")
    return {
        "leaf_macro": float(np.mean(list(leaves.values()))) if leaves else None,
        "leaves": leaves,
        "nodes": nodes,
        "node_children": node_children,
    }


# -- mistake severity -----------------------------------------------------------------------


def _is_mistake(taxonomy: Taxonomy, t: str, p: str) -> bool:
    if t == p:
        return False
    # A partial label is matched by any prediction under it: it agrees with all that is known.
    return not (not taxonomy.is_leaf(t) and taxonomy.is_ancestor(t, p))


def node_heights(taxonomy: Taxonomy) -> dict[str, int]:
    """Height of every node: the number of edges on the longest path from it down to a leaf."""
    heights: dict[str, int] = {}
    for node in reversed(taxonomy.nodes):  # reverse pre-order: children before their parent
        children = taxonomy.children(node)
        heights[node] = 1 + max(heights[c] for c in children) if children else 0
    return heights


def mistake_severity(
    taxonomy: Taxonomy, true_nodes: Sequence[str], pred_nodes: Sequence[str]
) -> dict[str, float | int | None]:
    """How bad the mistakes are (Bertinetto et al. 2020, "Making better mistakes").

    Over the wrong predictions: ``mean_distance`` is the mean tree distance (edges) between
    prediction and label; ``mean_lca_depth`` the mean depth of their lowest common ancestor
    (0 = they part at the root: the worst kind of mistake). A prediction under a partial label
    is not a mistake. Over the leaf-to-leaf mistakes only (label and prediction both leaves,
    ``n_leaf_mistakes`` of them): ``mean_lca_height``, Bertinetto et al.'s mistake severity,
    the mean height of the lowest common ancestor (the longest path from it down to a leaf;
    higher = worse). Means are ``None`` when there is nothing to average.
    """
    _check_nodes(taxonomy, true_nodes, pred_nodes)
    wrong = [(t, p) for t, p in zip(true_nodes, pred_nodes) if _is_mistake(taxonomy, t, p)]
    leaf_wrong = [(t, p) for t, p in wrong if taxonomy.is_leaf(t) and taxonomy.is_leaf(p)]
    heights = node_heights(taxonomy)
    lca_heights = [heights[taxonomy.lowest_common_ancestor(t, p)] for t, p in leaf_wrong]
    out: dict[str, float | int | None] = {
        "mean_distance": None,
        "mean_lca_depth": None,
        "n_mistakes": len(wrong),
        "mean_lca_height": float(np.mean(lca_heights)) if lca_heights else None,
        "n_leaf_mistakes": len(leaf_wrong),
    }
    if not wrong:
        return out
    paths, index, dist = _paths(taxonomy), taxonomy.index, taxonomy.distance_matrix
    distances = np.array([dist[index[t], index[p]] for t, p in wrong])
    depth_sums = np.array([len(paths[t]) + len(paths[p]) - 2 for t, p in wrong])
    lca_depths = (depth_sums - distances) / 2  # depth(t) + depth(p) = distance + 2 * depth(lca)
    out["mean_distance"] = float(np.mean(distances))
    out["mean_lca_depth"] = float(np.mean(lca_depths))
    return out


# -- calibration ----------------------------------------------------------------------------


def _greedy_completion(taxonomy: Taxonomy, probs: NodeProbabilities, row: int, node: str) -> str:
    """Follow the most probable child from ``node`` down to a leaf."""
    while not taxonomy.is_leaf(node):
        children = taxonomy.children(node)
        node = children[int(np.argmax(probs.conditional[row, taxonomy.children_indices(node)]))]
    return node


def _ece(confidence: np.ndarray, correct: np.ndarray, n_bins: int) -> float:
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    total = 0.0
    for b in range(n_bins):
        in_bin = bins == b
        if in_bin.any():
            total += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(total)


def expected_calibration_error(
    taxonomy: Taxonomy,
    true_nodes: Sequence[str],
    probs: NodeProbabilities,
    pred_nodes: Sequence[str] | None = None,
    n_bins: int = 15,
) -> dict[str, Any]:
    """Expected calibration error per depth (Guo et al. 2017), with ``n_bins`` equal-width bins.

    At depth d the tree is cut as in :func:`depth_accuracy`: every node stands for its ancestor
    at depth d, a leaf above d for itself. The prediction (one that stopped at an internal node
    is completed greedily from the conditionals) is cut at d; its confidence is the marginal
    probability of that cut node, and it is correct when it is the label cut at d. So a deep
    image sent confidently to a wrong shallow leaf counts as a confident mistake. Images count
    when their label says which class of the cut they are (a label at depth >= d, or a leaf):
    the images of "accuracy, tree cut at depth d". ``n_per_depth`` gives their number.
    ``pred_nodes`` defaults to greedy decoding.
    """
    if pred_nodes is None:
        pred_nodes = probs.decode("greedy")
    _check_nodes(taxonomy, true_nodes, pred_nodes)
    if len(true_nodes) != len(probs):
        raise ValueError(f"{len(true_nodes)} true labels but {len(probs)} probability rows")
    paths = _paths(taxonomy)
    completed = [
        p if taxonomy.is_leaf(p) else _greedy_completion(taxonomy, probs, i, p) for i, p in enumerate(pred_nodes)
    ]
    per_depth: dict[str, float | None] = {}
    n_per_depth: dict[str, int] = {}
    for d in range(1, taxonomy.max_depth + 1):
        rows = [i for i, t in enumerate(true_nodes) if len(paths[t]) > d or taxonomy.is_leaf(t)]
        predicted = [_cut(paths, completed[i], d) for i in rows]
        conf = np.array([probs.marginal[i, taxonomy.index[node]] for i, node in zip(rows, predicted)], dtype=float)
        correct = np.array([_cut(paths, true_nodes[i], d) == node for i, node in zip(rows, predicted)], dtype=float)
        per_depth[str(d)] = _ece(conf, correct, n_bins) if rows else None
        n_per_depth[str(d)] = len(rows)
    return {"per_depth": per_depth, "n_per_depth": n_per_depth, "n_bins": n_bins}


# -- everything at once ---------------------------------------------------------------------


def evaluate_predictions(
    taxonomy: Taxonomy,
    true_nodes: Sequence[str | None],
    pred_nodes: Sequence[str],
    probs: NodeProbabilities | None = None,
) -> dict[str, Any]:
    """All metrics in one JSON-ready dict with the keys of ``METRIC_KEYS``.

    Rows without a label (``None``) are left out and counted in ``notes``. Without
    probabilities ``auroc`` and ``ece`` are ``None`` (and a note says so): they are never
    estimated from hard predictions.
    """
    if len(true_nodes) != len(pred_nodes):
        raise ValueError(f"{len(true_nodes)} true labels but {len(pred_nodes)} predictions")
    if probs is not None and len(probs) != len(pred_nodes):
        raise ValueError(f"{len(pred_nodes)} predictions but {len(probs)} probability rows")
    notes: list[str] = []
    keep = [i for i, t in enumerate(true_nodes) if t is not None]
    if len(keep) < len(true_nodes):
        notes.append(f"{len(true_nodes) - len(keep)} row(s) without a label left out")
    if not keep:
        raise DataError("no row has a label; evaluation needs true labels")
    y_true = [true_nodes[i] for i in keep]
    y_pred = [pred_nodes[i] for i in keep]
    probs = probs[np.asarray(keep, dtype=np.int64)] if probs is not None else None

    n_partial = int((~leaf_label_mask(taxonomy, y_true)).sum())
    if n_partial:
        notes.append(
            f"{n_partial} row(s) with a partial label (an internal node) left out of accuracy, "
            "macro_f1 and leaf AUROC; they count in the hierarchical metrics"
        )
    n_stopped = sum(1 for p in y_pred if not taxonomy.is_leaf(p))
    if n_stopped:
        notes.append(f"{n_stopped} prediction(s) stop at an internal node")

    hprf = hierarchical_prf(taxonomy, y_true, y_pred)
    metrics: dict[str, Any] = {
        "accuracy": leaf_accuracy(taxonomy, y_true, y_pred),
        "macro_f1": macro_f1(taxonomy, y_true, y_pred),
        "hP": hprf["hP"],
        "hR": hprf["hR"],
        "hF": hprf["hF"],
        "auroc": None,
        "per_level_accuracy": per_level_accuracy(taxonomy, y_true, y_pred),
        "decision_accuracy": None,
        "depth_accuracy": depth_accuracy(taxonomy, y_true, y_pred),
        "per_class": per_class_prf(taxonomy, y_true, y_pred),
        "mistake_severity": mistake_severity(taxonomy, y_true, y_pred),
        "ece": None,
        "n_images": len(y_true),
        "notes": notes,
    }
    if probs is None:
        notes.append("no probability columns: auroc, ece and decision_accuracy left out")
    else:
        metrics["auroc"] = auroc(taxonomy, y_true, probs, notes=notes)
        metrics["decision_accuracy"] = decision_accuracy(taxonomy, y_true, probs)
        metrics["ece"] = expected_calibration_error(taxonomy, y_true, probs, y_pred)
    return metrics
