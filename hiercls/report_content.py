"""The numbers behind the report's pictures, as JSON-ready dicts for ``metrics.json``.

``report_sections(evaluation)`` returns, for an ``Evaluation``-like object (``taxonomy``,
``predictions``, ``group_values``, ``metrics``, ``provenance``)::

    {
      "confusion_matrices": {"leaves": CM, "decisions": {node: CM}},
          # CM = {"labels", "display_names", "counts" [true][predicted], "outside" (per row:
          #       predicted none of the labels), "row_totals" (counts + outside), "row_percent"
          #       (of the row total), "n_outside", "n"}
      "class_report": {"rows": {leaf: {precision, recall, f1, support}},
                       "macro avg": {...}, "weighted avg": {...}, "accuracy", "support"},
          # as scikit-learn's classification_report, on the images labelled at a leaf
      "denominators": {metric: {"numerator"?, "denominator", "of"}},
      "group_votes": [{"group", "n_images", "label", "prediction", "correct", "votes"}] | None,
      "misclassified": {"n": int, "shown": int, "rows": [{"path", "label", "prediction",
                        "path_probabilities": [[node, p]]}]},
    }

The pipeline merges this dict into ``metrics.json``; ``hiercls.report.render_markdown`` and
``hiercls.report_html`` read these keys back from the metrics.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from hiercls.metrics import ConfusionMatrix, confusion_matrices, leaf_confusion_matrix, leaf_label_mask
from hiercls.taxonomy import Taxonomy

__all__ = [
    "report_sections",
    "build_sections",
    "confusion_dict",
    "outside_by_row",
    "class_report",
    "denominators",
    "group_votes",
    "misclassified",
    "is_mistake",
    "MAX_MISCLASSIFIED",
    "SECTION_KEYS",
]

# The misclassified images listed in metrics.json and the reports (the first ones in input order).
MAX_MISCLASSIFIED = 60
SECTION_KEYS = ("confusion_matrices", "class_report", "denominators", "group_votes", "misclassified")


def outside_by_row(taxonomy: Taxonomy, cm: ConfusionMatrix, true_nodes: Sequence[str], pred_nodes: Sequence[str],
                   leaves: bool = False) -> list[int]:
    """How many images of each row (true label) of ``cm`` were predicted none of its labels.

    ``leaves``: ``cm`` is the leaf matrix (rows labelled at a leaf); else the matrix of the
    decision at ``cm.node`` (rows labelled under it, compared one level below it).
    """
    position = {label: k for k, label in enumerate(cm.labels)}
    out = [0] * len(cm.labels)
    depth = None if leaves else taxonomy.depth(cm.node) + 1
    for t, p in zip(true_nodes, pred_nodes):
        if leaves:
            if t in position and p not in position:
                out[position[t]] += 1
            continue
        true_path, pred_path = taxonomy.path(t), taxonomy.path(p)
        if cm.node not in true_path[:-1]:
            continue
        predicted = pred_path[depth] if len(pred_path) > depth else None
        if predicted not in position:
            out[position[true_path[depth]]] += 1
    return out


def confusion_dict(cm: ConfusionMatrix, taxonomy: Taxonomy, outside_rows: Sequence[int] | None = None) -> dict[str, Any]:
    """A confusion matrix as numbers (rows: true labels): counts, the row's images predicted
    elsewhere (``outside_rows``, from ``outside_by_row``), row totals and row percentages of them."""
    counts = np.asarray(cm.matrix, dtype=np.int64)
    outside = np.asarray(outside_rows if outside_rows is not None else [0] * len(cm.labels), dtype=np.int64)
    totals = counts.sum(axis=1) + outside
    percent = 100.0 * counts / np.maximum(totals[:, None], 1)
    return {
        "labels": list(cm.labels),
        "display_names": [taxonomy.display_name(label) for label in cm.labels],
        "counts": counts.tolist(),
        "outside": outside.tolist(),
        "row_totals": totals.tolist(),
        "row_percent": np.round(percent, 1).tolist(),
        "n_outside": int(cm.n_outside),
        "n": int(counts.sum()) + int(cm.n_outside),
    }


def class_report(per_class: dict[str, dict[str, Any]], taxonomy: Taxonomy) -> dict[str, Any]:
    """Leaf rows with ``macro avg`` and ``weighted avg`` rows, as scikit-learn's classification_report.

    The classes are the leaves present among the labels or predictions (support > 0 or a
    defined precision); an undefined ratio counts as 0 in the averages (scikit-learn's
    ``zero_division=0``). The weighted average weighs each leaf by its support; the support
    of both average rows is the number of images labelled at a leaf.
    """
    rows = {
        leaf: per_class[leaf] for leaf in taxonomy.leaves
        if leaf in per_class and ((per_class[leaf].get("support") or 0) > 0 or per_class[leaf].get("precision") is not None)
    }
    support = int(sum(r.get("support") or 0 for r in rows.values()))
    out: dict[str, Any] = {"rows": rows, "support": support}
    for name in ("macro avg", "weighted avg"):
        out[name] = {"support": support}
    for key in ("precision", "recall", "f1"):
        values = np.array([r.get(key) or 0.0 for r in rows.values()], dtype=float)
        weights = np.array([r.get("support") or 0 for r in rows.values()], dtype=float)
        out["macro avg"][key] = float(values.mean()) if values.size else None
        out["weighted avg"][key] = float((values * weights).sum() / weights.sum()) if weights.sum() else None
    return out


def is_mistake(taxonomy: Taxonomy, label: str, prediction: str) -> bool:
    """Wrong, except a prediction at or under a partial label (it agrees with all that is known)."""
    if label == prediction:
        return False
    return taxonomy.is_leaf(label) or not taxonomy.is_ancestor(label, prediction)


def denominators(taxonomy: Taxonomy, true_nodes: Sequence[str], pred_nodes: Sequence[str],
                 metrics: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """How many images (or classes, groups) each headline number is computed over."""
    leaf_rows = leaf_label_mask(taxonomy, true_nodes)
    n_leaf = int(leaf_rows.sum())
    correct = sum(1 for t, p, m in zip(true_nodes, pred_nodes, leaf_rows) if m and t == p)
    n_mistakes = sum(1 for t, p in zip(true_nodes, pred_nodes) if is_mistake(taxonomy, t, p))
    auroc = metrics.get("auroc") or {}
    present = {t for t, m in zip(true_nodes, leaf_rows) if m} | {p for p, m in zip(pred_nodes, leaf_rows) if m}
    out: dict[str, dict[str, Any]] = {
        "accuracy": {"numerator": correct, "denominator": n_leaf, "of": "images labelled at a leaf"},
        "macro_f1": {"denominator": len(present & set(taxonomy.leaves)), "of": "leaf classes averaged",
                     "images": n_leaf},
        "hP": {"denominator": len(true_nodes), "of": "labelled images"},
        "hR": {"denominator": len(true_nodes), "of": "labelled images"},
        "hF": {"denominator": len(true_nodes), "of": "labelled images"},
        "mistake_severity": {"denominator": n_mistakes, "of": "mistakes"},
    }
    if isinstance(auroc, dict) and auroc.get("leaves") is not None:
        out["auroc"] = {"denominator": len(auroc["leaves"]), "of": f"leaves with an AUROC (of {len(taxonomy.leaves)})",
                        "images": n_leaf}
    paths = {node: taxonomy.path(node) for node in taxonomy.nodes}
    for d in range(1, taxonomy.max_depth + 1):
        n = sum(1 for t in true_nodes if len(paths[t]) > d or taxonomy.is_leaf(t))
        out[f"depth_accuracy {d}"] = {"denominator": n, "of": f"images whose label is known at depth {d}"}
    for node in taxonomy.internal_nodes:
        n = sum(1 for t in true_nodes if node in paths[t][:-1])
        out[f"decision {node}"] = {"denominator": n, "of": f"images labelled under {node}"}
    groups = metrics.get("groups")
    if isinstance(groups, dict) and groups.get("n_groups") is not None:
        out["groups"] = {"denominator": groups.get("n_groups"), "of": "groups"}
    return out


def group_votes(taxonomy: Taxonomy, group_values: Sequence[str | None], labels: Sequence[str | None],
                pred_nodes: Sequence[str], probs: Any, metrics: dict[str, Any],
                provenance: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Each group's diagnosis (by the aggregator the metrics name) with its images' votes.

    ``votes`` maps each predicted node to how many of the group's images predicted it, most
    first. The group's label is its images' (the most frequent when they disagree).
    """
    from hiercls.aggregate import aggregate_truth, get_aggregator

    keep = [i for i, g in enumerate(group_values) if g is not None]
    if not keep:
        return []
    groups = [group_values[i] for i in keep]
    kept_preds = [pred_nodes[i] for i in keep]
    kept_probs = probs[np.asarray(keep, dtype=np.int64)] if probs is not None else None
    name = str((metrics.get("groups") or {}).get("aggregator") or "mode")
    options = {}
    if name == "mean":
        provenance = provenance or {}
        options = {"decode": provenance.get("decode") or "greedy", "threshold": provenance.get("threshold") or 0.5}
    try:
        group_ids, diagnoses, _ = get_aggregator(name, **options).aggregate(taxonomy, groups, kept_preds, kept_probs)
    except Exception:  # an aggregator that cannot run here (a plugin missing): show the majority vote
        group_ids, diagnoses, _ = get_aggregator("mode").aggregate(taxonomy, groups, kept_preds, kept_probs)
    truth = aggregate_truth(groups, [labels[i] for i in keep])
    votes: dict[str, Counter] = {}
    for g, p in zip(groups, kept_preds):
        votes.setdefault(str(g), Counter())[p] += 1
    rows = []
    for gid, diagnosis, label in zip(group_ids, diagnoses, truth.true_nodes):
        counts = votes.get(str(gid), Counter())
        rows.append({
            "group": str(gid),
            "n_images": int(sum(counts.values())),
            "label": label,
            "prediction": diagnosis,
            "correct": None if label is None else not is_mistake(taxonomy, label, diagnosis),
            "votes": dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))),
        })
    return rows


def misclassified(taxonomy: Taxonomy, paths: Sequence[str], labels: Sequence[str | None],
                  pred_nodes: Sequence[str], probs: Any, limit: int = MAX_MISCLASSIFIED) -> dict[str, Any]:
    """The wrongly predicted images (first ``limit`` in input order) with the probabilities along
    the predicted path (marginal P(node | image) of each node from the root's child down)."""
    wrong = [i for i, (t, p) in enumerate(zip(labels, pred_nodes)) if t is not None and is_mistake(taxonomy, t, p)]
    rows = []
    for i in wrong[:limit]:
        path_nodes = taxonomy.path(pred_nodes[i])[1:]
        along = [[node, float(probs.marginal[i, taxonomy.index[node]])] for node in path_nodes] if probs is not None \
            else [[node, None] for node in path_nodes]
        label_p = float(probs.marginal[i, taxonomy.index[labels[i]]]) if probs is not None else None
        rows.append({"row": i, "path": str(paths[i]), "label": labels[i], "prediction": pred_nodes[i],
                     "path_probabilities": along, "label_probability": label_p})
    return {"n": len(wrong), "shown": len(rows), "rows": rows}


def build_sections(taxonomy: Taxonomy, labels: Sequence[str | None], pred_nodes: Sequence[str],
                   metrics: dict[str, Any], *, probs: Any = None, paths: Sequence[str] | None = None,
                   group_values: Sequence[str | None] | None = None,
                   provenance: dict[str, Any] | None = None) -> dict[str, Any]:
    """``report_sections`` from plain lists (rows without a label are left out where scored)."""
    labelled = [i for i, t in enumerate(labels) if t is not None]
    true_nodes = [labels[i] for i in labelled]
    scored = [pred_nodes[i] for i in labelled]
    out: dict[str, Any] = {key: None for key in SECTION_KEYS}
    if true_nodes:
        leaf_cm = leaf_confusion_matrix(taxonomy, true_nodes, scored)
        out["confusion_matrices"] = {
            "leaves": confusion_dict(leaf_cm, taxonomy, outside_by_row(taxonomy, leaf_cm, true_nodes, scored, True)),
            "decisions": {node: confusion_dict(cm, taxonomy, outside_by_row(taxonomy, cm, true_nodes, scored))
                          for node, cm in confusion_matrices(taxonomy, true_nodes, scored).items()},
        }
        if isinstance(metrics.get("per_class"), dict):
            out["class_report"] = class_report(metrics["per_class"], taxonomy)
        out["denominators"] = denominators(taxonomy, true_nodes, scored, metrics)
    if group_values is not None:
        out["group_votes"] = group_votes(taxonomy, group_values, labels, pred_nodes, probs, metrics, provenance)
    paths = list(paths) if paths is not None else [""] * len(labels)
    out["misclassified"] = misclassified(taxonomy, paths, labels, pred_nodes, probs)
    return out


def report_sections(evaluation: Any) -> dict[str, Any]:
    """The report's numbers of an ``Evaluation`` (see the module docstring), to merge into metrics.json.

    Call it after ``evaluation.metrics`` holds the scores: ``metrics.update(report_sections(ev))``.
    """
    preds = evaluation.predictions
    return build_sections(
        evaluation.taxonomy, preds.labels, preds.predictions, evaluation.metrics or {},
        probs=preds.probs, paths=preds.paths, group_values=getattr(evaluation, "group_values", None),
        provenance=getattr(evaluation, "provenance", None),
    )
