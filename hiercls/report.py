"""An evaluation report: ``report.md`` with the metric tables, and PNG confusion matrices.

The markdown is meant to be read on GitHub or pasted into a lab notebook: headline numbers,
per-level accuracy (one row per decision of the tree), per-node precision / recall / F1,
AUROC per node, group-level numbers when there are groups, and the notes that say what was
left out. One confusion matrix is drawn for the leaves and one per internal node.
"""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from hiercls.aggregate import group_column_title  # noqa: E402
from hiercls.io import atomic_write_bytes, atomic_write_text  # noqa: E402
from hiercls.metrics import ConfusionMatrix, confusion_matrices, cut_classes, leaf_confusion_matrix  # noqa: E402
from hiercls.taxonomy import Taxonomy  # noqa: E402

__all__ = ["write_report", "plot_confusion_matrix", "render_markdown", "figure_names"]

# A slug longer than this is cut (and gets a hash): file names stay far below the usual 255-byte limit.
MAX_SLUG = 60


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_.")[:MAX_SLUG] or "node"


def _short_hash(name: str) -> str:
    return hashlib.sha256(name.encode("utf-8")).hexdigest()[:8]


def figure_names(nodes: Sequence[str]) -> dict[str, str]:
    """A unique, ASCII-safe file-name part for every node name.

    The slug keeps letters, digits, ``_``, ``.`` and ``-``. When that loses something (``α``,
    ``x/y``, ``x y``) or two nodes share a slug (compared case-insensitively, as macOS and
    Windows file systems do), a short hash of the full name is appended, so ``x/y`` and ``x y``
    stay apart. Names already safe and unique keep their plain slug (``confusion_at_Acute.png``).
    """
    slugs = {node: _slug(node) for node in nodes}
    taken: dict[str, int] = {}
    for slug in slugs.values():
        taken[slug.lower()] = taken.get(slug.lower(), 0) + 1
    names = {
        node: slug if slug == node and taken[slug.lower()] == 1 else f"{slug}-{_short_hash(node)}"
        for node, slug in slugs.items()
    }
    # A plain slug could still equal another node's "slug-hash" (a node literally named so): hash both.
    seen: dict[str, list[str]] = {}
    for node, name in names.items():
        seen.setdefault(name.lower(), []).append(node)
    for owners in seen.values():
        if len(owners) > 1:
            for node in owners:
                names[node] = f"{slugs[node]}-{hashlib.sha256(node.encode('utf-8')).hexdigest()[:16]}"
    return names


def _table(header: Sequence[str], rows: list[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return lines + [""]


def _decision_name(taxonomy: Taxonomy, node: str) -> str:
    return f"{node}: " + " vs ".join(taxonomy.children(node))


def _headline(metrics: dict[str, Any]) -> list[Sequence[Any]]:
    auroc = metrics.get("auroc") or {}
    severity = metrics.get("mistake_severity") or {}
    return [
        ("images", metrics.get("n_images")),
        ("accuracy (leaf labels)", metrics.get("accuracy")),
        ("macro-F1 (leaves)", metrics.get("macro_f1")),
        ("hP", metrics.get("hP")),
        ("hR", metrics.get("hR")),
        ("hF", metrics.get("hF")),
        ("AUROC (leaves, macro)", auroc.get("leaf_macro")),
        ("mistake severity (mean tree distance)", severity.get("mean_distance")),
        ("mean LCA depth of mistakes", severity.get("mean_lca_depth")),
    ]


def _model_line(metrics: dict[str, Any]) -> list[str]:
    """Which run and checkpoint made the predictions (when evaluated from a run)."""
    if not metrics.get("run"):
        return []
    split = f", on the run's `{metrics['split']}` images" if metrics.get("split") else ""
    checkpoint = f"**{metrics.get('checkpoint')}** checkpoint (epoch {metrics.get('epoch')})"
    return [f"Run: `{metrics['run']}`, {checkpoint}{split}", ""]


def _groups_section(groups: dict[str, Any]) -> list[str]:
    scored = ("every image scored with its group's prediction" if groups.get("scoring") == "images"
              else "one row per group scored")
    return ["## Groups", "",
            f"{groups.get('n_groups')} groups, aggregated with `{groups.get('aggregator')}`, {scored}; "
            f"{groups.get('n_mixed_groups', 0)} group(s) hold images with different labels.", ""]


def render_markdown(
    metrics: dict[str, Any],
    taxonomy: Taxonomy,
    title: str = "Evaluation report",
    figures: Sequence[str] = (),
    decision_counts: dict[str, int] | None = None,
) -> str:
    """The report's markdown text for a ``metrics`` dict of ``evaluate_predictions`` (+ ``groups``)."""
    lines = [f"# {title}", "", f"Taxonomy: `{taxonomy.name}` ({taxonomy.num_nodes} nodes, "
             f"{len(taxonomy.leaves)} leaves, depth {taxonomy.max_depth})", ""] + _model_line(metrics)
    groups = metrics.get("groups")
    header = ["metric", "images"] + ([group_column_title(groups)] if groups else [])
    group_accuracy = "group accuracy" if not groups or header[-1] == "groups" else f"accuracy ({header[-1]})"
    image_rows = _headline(metrics)
    group_rows = _headline(groups) if groups else None
    rows = [
        (name, value, group_rows[k][1]) if group_rows else (name, value)
        for k, (name, value) in enumerate(image_rows)
    ]
    if groups and groups.get("scoring") != "images":
        rows[0] = ("images / groups", metrics.get("n_images"), groups.get("n_groups"))
    lines += ["## Headline metrics", ""] + _table(header, rows)

    depth_rows = []
    for depth, value in (metrics.get("depth_accuracy") or {}).items():
        row = [depth, cut_classes(taxonomy, int(depth)), value]
        if groups:
            row.append((groups.get("depth_accuracy") or {}).get(depth))
        depth_rows.append(row)
    if depth_rows:
        lines += ["## Accuracy at each depth", "",
                  "The tree cut at depth d: each node counts as its ancestor at that depth (a leaf above it "
                  "as itself), the classes a flat classifier of that granularity would have.", ""]
        lines += _table(["depth", "classes", "accuracy"] + ([group_accuracy] if groups else []), depth_rows)

    lines += ["## Per-level accuracy", "",
              "Each decision among the images labelled below it: on its own subtree (`decision_accuracy`, the "
              "most probable child whatever happened above; the paper's Table 3) and end to end (read off "
              "the final prediction, so a routing error higher up counts as a miss).", ""]
    level_rows = []
    own = metrics.get("decision_accuracy") or {}
    for node, value in (metrics.get("per_level_accuracy") or {}).items():
        row = [_decision_name(taxonomy, node), (decision_counts or {}).get(node, "–"), own.get(node), value]
        if groups:
            row.append((groups.get("per_level_accuracy") or {}).get(node))
        level_rows.append(row)
    lines += _table(["decision", "images", "own subtree", "end to end"]
                    + ([f"end to end, {group_accuracy}"] if groups else []), level_rows)

    lines += ["## Per-class precision, recall, F1", "",
              "An image belongs to a node when its label lies at or under it.", ""]
    class_rows = [
        ("\u00a0\u00a0" * (taxonomy.depth(node) - 1) + node, v["precision"], v["recall"], v["f1"], v["support"])
        for node, v in (metrics.get("per_class") or {}).items()
    ]
    lines += _table(["node", "precision", "recall", "F1", "support"], class_rows)

    auroc = metrics.get("auroc")
    if auroc:
        lines += ["## AUROC", "", "One-vs-rest per leaf (marginals) and per decision (conditionals).", ""]
        lines += _table(["leaf", "AUROC"], list(auroc["leaves"].items()))
        lines += _table(["decision", "AUROC (mean over children)"],
                        [(_decision_name(taxonomy, n), v) for n, v in auroc["nodes"].items()])

    ece = metrics.get("ece")
    if ece:
        lines += ["## Calibration", "", f"Expected calibration error per depth ({ece['n_bins']} bins).", ""]
        lines += _table(["depth", "ECE"], list(ece["per_depth"].items()))

    if groups:
        lines += _groups_section(groups)

    if figures:
        lines += ["## Confusion matrices", ""] + [f"![{Path(f).stem}]({f})" for f in figures] + [""]

    notes = list(metrics.get("notes") or []) + [f"groups: {n}" for n in (groups or {}).get("notes", [])]
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)


def plot_confusion_matrix(cm: ConfusionMatrix, title: str) -> bytes:
    """A PNG (bytes) of a confusion matrix with counts in the cells."""
    n = len(cm.labels)
    size = max(3.0, 0.6 * n + 2.0)
    fig, ax = plt.subplots(figsize=(size, size))
    try:
        ax.imshow(cm.matrix, cmap="Blues")
        ax.set_xticks(range(n), cm.labels, rotation=45, ha="right")
        ax.set_yticks(range(n), cm.labels)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        suffix = f"\n({cm.n_outside} predicted elsewhere)" if cm.n_outside else ""
        ax.set_title(title + suffix)
        peak = cm.matrix.max() if cm.matrix.size else 0
        for i in range(n):
            for j in range(n):
                value = int(cm.matrix[i, j])
                ax.text(j, i, str(value), ha="center", va="center",
                        color="white" if peak and value > peak / 2 else "black")
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=100)
    finally:
        plt.close(fig)
    return buffer.getvalue()


def write_report(
    out_dir: str | Path,
    metrics: dict[str, Any],
    taxonomy: Taxonomy,
    true_nodes: Sequence[str],
    pred_nodes: Sequence[str],
    title: str = "Evaluation report",
) -> Path:
    """Write ``report.md`` and the confusion-matrix PNGs into ``out_dir`` (atomically); return the report path.

    ``true_nodes`` / ``pred_nodes`` are the labelled images the metrics were computed on.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = []
    leaf_cm = leaf_confusion_matrix(taxonomy, true_nodes, pred_nodes)
    if leaf_cm.matrix.sum() or leaf_cm.n_outside:
        atomic_write_bytes(out_dir / "confusion_leaves.png", plot_confusion_matrix(leaf_cm, "leaves"))
        figures.append("confusion_leaves.png")
    decision_counts = {}
    file_parts = figure_names(taxonomy.internal_nodes)
    for node, cm in confusion_matrices(taxonomy, true_nodes, pred_nodes).items():
        decision_counts[node] = int(cm.matrix.sum()) + cm.n_outside
        if not decision_counts[node]:
            continue
        name = f"confusion_at_{file_parts[node]}.png"
        atomic_write_bytes(out_dir / name, plot_confusion_matrix(cm, _decision_name(taxonomy, node)))
        figures.append(name)
    text = render_markdown(metrics, taxonomy, title, figures, decision_counts)
    return atomic_write_text(out_dir / "report.md", text)
