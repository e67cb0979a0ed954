"""An evaluation report: ``report.md`` with the metric tables, PNG figures, and ``report.html``.

The markdown is meant to be read on GitHub or pasted into a lab notebook: where the numbers
come from (provenance), headline numbers with their denominators, accuracy per depth and per
decision, per-node precision / recall / F1 with scikit-learn's macro and weighted average rows,
the confusion matrices as tables (counts and row percentages) and pictures, AUROC, calibration
and selective prediction when measured, the groups' diagnoses with their image votes, and the
misclassified images. ``report.html`` (``hiercls.report_html``) holds the same content with the
pictures embedded. The figures are drawn by ``hiercls.figures``, the numbers behind them by
``hiercls.report_content``.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hiercls.aggregate import group_column_title
from hiercls.figures import plot_confusion_matrix
from hiercls.io import atomic_write_bytes, atomic_write_text
from hiercls.metrics import confusion_matrices, cut_classes, leaf_confusion_matrix
from hiercls.report_content import SECTION_KEYS, build_sections
from hiercls.taxonomy import Taxonomy

__all__ = [
    "write_report",
    "write_reports",
    "plot_confusion_matrix",
    "render_markdown",
    "figure_names",
    "decision_name",
    "selective_choice",
    "calibration_warnings",
]

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


def _cell(value: Any) -> str:
    """A table cell: numbers formatted, ``|`` and line breaks of user strings kept from breaking the table."""
    return _fmt(value).replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: list[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return lines + [""]


def decision_name(taxonomy: Taxonomy, node: str, display: bool = False) -> str:
    """``"Acute: ALL vs AML vs APML"``; with ``display``, the taxonomy's display names."""
    name = taxonomy.display_name if display else str
    return f"{name(node)}: " + " vs ".join(name(c) for c in taxonomy.children(node))


_decision_name = decision_name  # the name this module used before


def display_parts(taxonomy: Taxonomy, node: str) -> tuple[str, str | None]:
    """(display name, the node's name when it differs from that, else None); unknown nodes as given."""
    shown = taxonomy.display_name(node) if node in taxonomy.index else str(node)
    return shown, (str(node) if shown != node else None)


def node_label(taxonomy: Taxonomy, node: str | None) -> str:
    """A node with its display name when that differs: ``"ALL (Acute lymphoblastic leukemia)"``."""
    if node is None:
        return "–"
    shown, name = display_parts(taxonomy, node)
    return shown if name is None else f"{name} ({shown})"


def _denominator_text(item: dict[str, Any] | None) -> str:
    if not isinstance(item, dict):
        return ""
    text = f"{item.get('denominator')} {item.get('of', '')}".strip()
    if item.get("numerator") is not None:
        text = f"{item['numerator']} / {text}"
    if item.get("images") is not None:
        text += f", {item['images']} images"
    return text


HEADLINE_DENOMINATORS = (None, "accuracy", "macro_f1", "hP", "hR", "hF", "auroc", "mistake_severity",
                         "mistake_severity")


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


def provenance_rows(provenance: dict[str, Any] | None) -> list[tuple[str, str]]:
    """``(field, value)`` of what the provenance knows, nested values flattened to text."""
    rows = []
    for key, value in (provenance or {}).items():
        if value is None or value == "" or value == [] or value == {}:
            continue
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items())
        elif isinstance(value, (list, tuple)):
            value = "; ".join(str(v) for v in value)
        rows.append((str(key), str(value)))
    return rows


def _groups_section(groups: dict[str, Any]) -> list[str]:
    scored = ("every image scored with its group's prediction" if groups.get("scoring") == "images"
              else "one row per group scored")
    return ["## Groups", "",
            f"{groups.get('n_groups')} groups, aggregated with `{groups.get('aggregator')}`, {scored}; "
            f"{groups.get('n_mixed_groups', 0)} group(s) hold images with different labels.", ""]


def _votes_text(taxonomy: Taxonomy, votes: dict[str, int]) -> str:
    return ", ".join(f"{taxonomy.display_name(n) if n in taxonomy.index else n} {c}" for n, c in votes.items())


def _group_votes_lines(taxonomy: Taxonomy, rows: list[dict[str, Any]] | None) -> list[str]:
    if not rows:
        return []
    table = [(r["group"], r["n_images"], node_label(taxonomy, r.get("label")), node_label(taxonomy, r["prediction"]),
              {True: "yes", False: "**no**", None: "–"}[r.get("correct")], _votes_text(taxonomy, r["votes"]))
             for r in rows]
    return ["Each group's diagnosis and its images' votes (predicted node: images).", ""] + _table(
        ["group", "images", "label", "diagnosis", "right", "image votes"], table)


def confusion_table(cm: dict[str, Any]) -> list[str]:
    """A confusion matrix of ``report_content.confusion_dict`` as a markdown table: count (row %)."""
    names = cm["display_names"]
    outside = cm.get("outside") or [0] * len(names)
    header = ["true \\ predicted", *names] + (["predicted elsewhere"] if any(outside) else []) + ["total"]
    rows = []
    for i, name in enumerate(names):
        total = cm["row_totals"][i]
        cells = [f"{c} ({p:.0f}%)" if total else "0" for c, p in zip(cm["counts"][i], cm["row_percent"][i])]
        if any(outside):
            cells.append(f"{outside[i]} ({100 * outside[i] / total:.0f}%)" if total else "0")
        rows.append([name, *cells, total])
    return _table(header, rows)


def _confusion_lines(taxonomy: Taxonomy, matrices: dict[str, Any] | None, figures: Sequence[str]) -> list[str]:
    confusion_figures = [f for f in figures if Path(f).name.startswith("confusion_")]
    if not matrices and not confusion_figures:
        return []
    lines = ["## Confusion matrices", "",
             "Rows are true labels, columns predictions; each cell is a count and its share of the row.", ""]
    if matrices:
        leaves = matrices.get("leaves")
        if leaves and leaves.get("n"):
            lines += [f"### Leaves ({leaves['n']} images labelled at a leaf)", ""] + confusion_table(leaves)
        for node, cm in (matrices.get("decisions") or {}).items():
            if cm.get("n") and node in taxonomy.index:
                lines += [f"### {decision_name(taxonomy, node, display=True)} ({cm['n']} images)", ""]
                lines += confusion_table(cm)
    return lines + [f"![{Path(f).stem}]({f})" for f in confusion_figures] + ([""] if confusion_figures else [])


def _class_lines(taxonomy: Taxonomy, metrics: dict[str, Any]) -> list[str]:
    lines = ["## Per-class precision, recall, F1", "",
             "An image belongs to a node when its label lies at or under it; support is the number of images "
             "that belong to it. The average rows are scikit-learn's `classification_report` over the leaves "
             "(macro: unweighted mean; weighted: by support; an undefined ratio counts as 0).", ""]
    rows = [
        ("\u00a0\u00a0" * (taxonomy.depth(node) - 1) + node_label(taxonomy, node), v["precision"], v["recall"],
         v["f1"], v["support"])
        for node, v in (metrics.get("per_class") or {}).items() if node in taxonomy.index
    ]
    report = metrics.get("class_report")
    if isinstance(report, dict):
        for name in ("macro avg", "weighted avg"):
            avg = report.get(name) or {}
            rows.append((f"**{name}** (leaves)", avg.get("precision"), avg.get("recall"), avg.get("f1"),
                         avg.get("support")))
    return lines + _table(["node", "precision", "recall", "F1", "support"], rows)


def selective_choice(metrics: dict[str, Any]) -> tuple[float | None, float | None]:
    """``(target accuracy, threshold of the row that keeps it)`` from ``metrics["selective_target"]``.

    The target may be a number (the row is then the one of highest coverage whose accuracy
    reaches it), a row of the selective table, or ``{"target": x, "row": {...}}``.
    """
    target = metrics.get("selective_target")
    rows = [r for r in (metrics.get("selective") or []) if isinstance(r, dict)]
    if isinstance(target, dict):
        row = target.get("row") if isinstance(target.get("row"), dict) else target
        goal = target.get("target", target.get("target_accuracy"))
        return (float(goal) if isinstance(goal, (int, float)) else None), row.get("threshold")
    if isinstance(target, (int, float)):
        reaching = [r for r in rows if isinstance(r.get("accuracy"), (int, float)) and r["accuracy"] >= target]
        best = max(reaching, key=lambda r: (r.get("coverage") or 0.0), default=None)
        return float(target), (best or {}).get("threshold")
    return None, None


def _selective_lines(metrics: dict[str, Any], figures: Sequence[str]) -> list[str]:
    rows = [r for r in (metrics.get("selective") or []) if isinstance(r, dict)]
    if not rows:
        return []
    target, chosen = selective_choice(metrics)
    lines = ["## Selective prediction", "",
             "The threshold decoder stops at an internal node when no child is sure enough. Coverage: the share "
             "of images decided down to a leaf; accuracy on those; hF on all images.", ""]
    if target is not None:
        lines += [f"Target accuracy {target:g}: " + (f"threshold **{_fmt(chosen)}** keeps it (marked ◀)."
                                                     if chosen is not None else "no threshold reaches it."), ""]
    table = [(r.get("threshold"), r.get("coverage"), r.get("n_decided"), r.get("n"), r.get("accuracy"), r.get("hF"),
              "◀" if chosen is not None and r.get("threshold") == chosen else "") for r in rows]
    lines += _table(["threshold", "coverage", "decided", "images", "accuracy", "hF", ""], table)
    return lines + [f"![{Path(f).stem}]({f})" for f in figures if Path(f).name.startswith("coverage")] + [""]


def calibration_warnings(calibration: dict[str, Any]) -> list[str]:
    """What the calibration payload flags (``warnings`` / ``notes``), e.g. temperatures fitted on scored images."""
    out: list[str] = []
    for key in ("warnings", "warning", "notes"):
        value = calibration.get(key)
        out += [str(v) for v in value] if isinstance(value, list) else ([str(value)] if value else [])
    return out


def _calibration_lines(metrics: dict[str, Any], figures: Sequence[str]) -> list[str]:
    ece, calibration = metrics.get("ece"), metrics.get("calibration")
    if not ece and not isinstance(calibration, dict):
        return []
    lines = ["## Calibration", ""]
    if ece:
        lines += [f"Expected calibration error per depth ({ece['n_bins']} bins).", ""]
        lines += _table(["depth", "ECE", "images"],
                        [[d, v, (ece.get("n_per_depth") or {}).get(d)] for d, v in ece["per_depth"].items()])
    if isinstance(calibration, dict):
        before, after = calibration.get("ece_before"), calibration.get("ece_after")
        before, after = (x if isinstance(x, dict) else {} for x in (before, after))
        lines += ["Temperature scaling per internal node: ECE before and after.", ""]
        lines += _table(["", "ECE before", "ECE after"], [(k, v, after.get(k)) for k, v in before.items()])
        temperatures = calibration.get("temperatures") or {}
        if temperatures:
            lines += _table(["node", "temperature"], list(temperatures.items()))
        lines += [f"**Warning:** {w}" for w in calibration_warnings(calibration)] + [""]
    return lines + [f"![{Path(f).stem}]({f})" for f in figures if Path(f).name.startswith("reliability")] + [""]


def _misclassified_lines(taxonomy: Taxonomy, wrong: dict[str, Any] | None) -> list[str]:
    if not isinstance(wrong, dict) or not wrong.get("n"):
        return []
    shown = f" (the first {wrong['shown']})" if wrong["shown"] < wrong["n"] else ""
    lines = ["## Misclassified images", "", f"{wrong['n']} images are misclassified{shown}; the probabilities "
             "are the marginals along the predicted path.", ""]
    for row in wrong["rows"]:
        along = " > ".join(f"{taxonomy.display_name(n) if n in taxonomy.index else n} {_fmt(p)}"
                           for n, p in row["path_probabilities"])
        lines.append(f"- `{row['path']}`: label {node_label(taxonomy, row['label'])}, predicted {along or '(root)'}")
    return lines + [""]


def _headline_lines(metrics: dict[str, Any]) -> list[str]:
    groups = metrics.get("groups")
    header = ["metric", "images"] + ([group_column_title(groups)] if groups else [])
    image_rows = _headline(metrics)
    group_rows = _headline(groups) if groups else None
    denominators = metrics.get("denominators") or {}
    rows = []
    for k, (name, value) in enumerate(image_rows):
        row = [name, value] + ([group_rows[k][1]] if group_rows else [])
        if denominators:
            row.append(_denominator_text(denominators.get(HEADLINE_DENOMINATORS[k] or "")))
        rows.append(row)
    if groups and groups.get("scoring") != "images":
        rows[0][:3] = ["images / groups", metrics.get("n_images"), groups.get("n_groups")]
    return ["## Headline metrics", ""] + _table(header + (["computed over"] if denominators else []), rows)


def _depth_lines(taxonomy: Taxonomy, metrics: dict[str, Any], group_accuracy: str) -> list[str]:
    groups, denominators = metrics.get("groups"), metrics.get("denominators") or {}
    depth_rows = []
    for depth, value in (metrics.get("depth_accuracy") or {}).items():
        row = [depth, cut_classes(taxonomy, int(depth)), (denominators.get(f"depth_accuracy {depth}") or {})
               .get("denominator", "–"), value]
        if groups:
            row.append((groups.get("depth_accuracy") or {}).get(depth))
        depth_rows.append(row)
    if not depth_rows:
        return []
    return ["## Accuracy at each depth", "",
            "The tree cut at depth d: each node counts as its ancestor at that depth (a leaf above it "
            "as itself), the classes a flat classifier of that granularity would have.", ""] + _table(
        ["depth", "classes", "images", "accuracy"] + ([group_accuracy] if groups else []), depth_rows)


def _level_lines(taxonomy: Taxonomy, metrics: dict[str, Any], group_accuracy: str,
                 decision_counts: dict[str, int] | None) -> list[str]:
    groups, denominators = metrics.get("groups"), metrics.get("denominators") or {}
    lines = ["## Per-level accuracy", "",
             "Each decision among the images labelled below it: on its own subtree (`decision_accuracy`, the "
             "most probable child whatever happened above; the paper's Table 3) and end to end (read off "
             "the final prediction, so a routing error higher up counts as a miss).", ""]
    level_rows = []
    own = metrics.get("decision_accuracy") or {}
    for node, value in (metrics.get("per_level_accuracy") or {}).items():
        if node not in taxonomy.index:
            continue
        count = (decision_counts or {}).get(node, (denominators.get(f"decision {node}") or {}).get("denominator"))
        row = [decision_name(taxonomy, node), count, own.get(node), value]
        if groups:
            row.append((groups.get("per_level_accuracy") or {}).get(node))
        level_rows.append(row)
    return lines + _table(["decision", "images", "own subtree", "end to end"]
                          + ([f"end to end, {group_accuracy}"] if groups else []), level_rows)


def _provenance_lines(metrics: dict[str, Any], provenance: dict[str, Any] | None) -> list[str]:
    rows = provenance_rows(provenance if provenance is not None else metrics.get("provenance"))
    return (["## Provenance", ""] + _table(["", "value"], rows)) if rows else []


def render_markdown(
    metrics: dict[str, Any],
    taxonomy: Taxonomy,
    title: str = "Evaluation report",
    figures: Sequence[str] = (),
    decision_counts: dict[str, int] | None = None,
    provenance: dict[str, Any] | None = None,
) -> str:
    """The report's markdown for a ``metrics`` dict of ``evaluate_predictions`` (+ ``groups``).

    Reads the optional keys too: the sections of ``hiercls.report_content.report_sections``
    (confusion tables, macro / weighted rows, denominators, group votes, misclassified images),
    ``provenance`` (or the argument), ``calibration``, ``selective`` and ``selective_target``.
    ``figures`` are file names next to the report, each shown in its section.
    """
    lines = [f"# {title}", "", f"Taxonomy: `{taxonomy.name}` ({taxonomy.num_nodes} nodes, "
             f"{len(taxonomy.leaves)} leaves, depth {taxonomy.max_depth})", ""] + _model_line(metrics)
    lines += _provenance_lines(metrics, provenance)
    groups = metrics.get("groups")
    group_title = group_column_title(groups) if groups else ""
    group_accuracy = "group accuracy" if not groups or group_title == "groups" else f"accuracy ({group_title})"
    lines += _headline_lines(metrics)
    lines += _depth_lines(taxonomy, metrics, group_accuracy)
    lines += _level_lines(taxonomy, metrics, group_accuracy, decision_counts)
    lines += _class_lines(taxonomy, metrics)
    lines += _confusion_lines(taxonomy, metrics.get("confusion_matrices"), figures)

    auroc = metrics.get("auroc")
    if auroc:
        lines += ["## AUROC", "", "One-vs-rest per leaf (marginals) and per decision (conditionals).", ""]
        lines += _table(["leaf", "AUROC"], [(node_label(taxonomy, k), v) for k, v in auroc["leaves"].items()])
        lines += _table(["decision", "AUROC (mean over children)"],
                        [(decision_name(taxonomy, n), v) for n, v in auroc["nodes"].items() if n in taxonomy.index])
        lines += [f"![{Path(f).stem}]({f})" for f in figures if Path(f).name.startswith("roc")] + [""]

    lines += _calibration_lines(metrics, figures)
    lines += _selective_lines(metrics, figures)
    training = [f for f in figures if Path(f).name.startswith("training")]
    if training:
        lines += ["## Training", "", "Losses and validation scores per epoch (the run's metrics.jsonl).", ""]
        lines += [f"![{Path(f).stem}]({f})" for f in training] + [""]
    if groups:
        lines += _groups_section(groups) + _group_votes_lines(taxonomy, metrics.get("group_votes"))
    lines += _misclassified_lines(taxonomy, metrics.get("misclassified"))

    notes = list(metrics.get("notes") or []) + [f"groups: {n}" for n in (groups or {}).get("notes", [])]
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)


def write_report(
    out_dir: str | Path,
    metrics: dict[str, Any],
    taxonomy: Taxonomy,
    true_nodes: Sequence[str],
    pred_nodes: Sequence[str],
    title: str = "Evaluation report",
) -> Path:
    """Write ``report.md`` and the confusion-matrix PNGs into ``out_dir`` (atomically); return the report path.

    ``true_nodes`` / ``pred_nodes`` are the labelled images the metrics were computed on. The
    confusion tables, average rows and denominators are computed here when ``metrics`` lacks them.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = []
    leaf_cm = leaf_confusion_matrix(taxonomy, true_nodes, pred_nodes)
    if leaf_cm.matrix.sum() or leaf_cm.n_outside:
        atomic_write_bytes(out_dir / "confusion_leaves.png", plot_confusion_matrix(leaf_cm, "leaves", taxonomy))
        figures.append("confusion_leaves.png")
    decision_counts = {}
    file_parts = figure_names(taxonomy.internal_nodes)
    for node, cm in confusion_matrices(taxonomy, true_nodes, pred_nodes).items():
        decision_counts[node] = int(cm.matrix.sum()) + cm.n_outside
        if not decision_counts[node]:
            continue
        name = f"confusion_at_{file_parts[node]}.png"
        atomic_write_bytes(out_dir / name, plot_confusion_matrix(cm, decision_name(taxonomy, node, True), taxonomy))
        figures.append(name)
    sections = build_sections(taxonomy, list(true_nodes), list(pred_nodes), metrics)
    sections.pop("misclassified")  # without the image paths, a list of rows says nothing
    shown = {**{k: v for k, v in sections.items() if v is not None}, **{k: metrics[k] for k in SECTION_KEYS
                                                                         if metrics.get(k) is not None}}
    text = render_markdown({**metrics, **shown}, taxonomy, title, figures, decision_counts)
    return atomic_write_text(out_dir / "report.md", text)


def write_reports(
    evaluation: Any,
    out_dir: str | Path,
    *,
    title: str = "Evaluation report",
    explain_panels: dict[str, bytes] | None = None,
    html: bool = True,
) -> dict[str, Path]:
    """Every figure (PNG), ``report.md`` and ``report.html`` of an ``Evaluation``; returns name -> path.

    The report sections (``report_content.report_sections``) are computed here when
    ``evaluation.metrics`` lacks them; ``metrics.json`` is the pipeline's to write.
    """
    from hiercls.figures import report_figures
    from hiercls.report_content import report_sections
    from hiercls.report_html import write_html_report

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = dict(evaluation.metrics or {})
    if any(metrics.get(k) is None for k in SECTION_KEYS):
        metrics = {**report_sections(evaluation), **{k: v for k, v in metrics.items() if v is not None}}
    written: dict[str, Path] = {}
    figures = report_figures(evaluation)
    for name, png in figures.items():
        written[name] = atomic_write_bytes(out_dir / name, png)
    text = render_markdown(metrics, evaluation.taxonomy, title, list(figures), provenance=evaluation.provenance)
    written["report.md"] = atomic_write_text(out_dir / "report.md", text)
    if html:
        view = _with_metrics(evaluation, metrics)
        written["report.html"] = write_html_report(view, out_dir, title=title, figures=figures,
                                                   explain_panels=explain_panels)
    return written


def _with_metrics(evaluation: Any, metrics: dict[str, Any]) -> Any:
    """The evaluation seen with ``metrics`` (a shallow copy; the caller's object is left alone)."""
    import copy

    view = copy.copy(evaluation)
    view.metrics = metrics
    return view
