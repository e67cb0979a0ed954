"""Every PNG of an evaluation report, drawn with matplotlib (Agg) and returned as bytes.

Each function takes plain numbers (a ``ConfusionMatrix``, probabilities and labels, the rows
of ``metrics.json``) and returns the PNG's bytes, or ``None`` when there is nothing to draw
(no images, no probabilities, an empty table): a missing input never raises. The figures use
matplotlib's object API (``Figure``, not ``pyplot``), so no global state is touched, and
constrained layout, so long titles (wrapped) and tick labels are never clipped. Names of
tree nodes are shown with the taxonomy's ``display_name`` when one is given.

``report_figures`` draws all of them for an ``Evaluation``-like object; ``FIGURE_NAMES`` are
the file names the reports (``report.md``, ``report.html``) look for.
"""

from __future__ import annotations

import io
import json
import math
import textwrap
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hiercls.metrics import ConfusionMatrix
from hiercls.taxonomy import Taxonomy

__all__ = [
    "FIGURE_NAMES",
    "confusion_figure_name",
    "plot_confusion_matrix",
    "plot_roc_curves",
    "plot_reliability",
    "plot_coverage_accuracy",
    "plot_training_curves",
    "read_training_records",
    "report_figures",
]

# File names of the single figures; confusion matrices of decisions are ``confusion_at_<node>.png``.
FIGURE_NAMES = {
    "confusion_leaves": "confusion_leaves.png",
    "roc": "roc_leaves.png",
    "reliability": "reliability.png",
    "coverage": "coverage_accuracy.png",
    "training": "training_curves.png",
}
# Characters of a title line per inch of figure width (10-pt text); wider titles wrap.
_CHARS_PER_INCH = 10
# The most metrics.jsonl lines drawn (a run folder is untrusted: bound the work).
MAX_TRAINING_RECORDS = 100_000
TRAINING_FILE_BYTES = 64 * 2**20


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def _wrap(title: str, width_inches: float) -> str:
    width = max(20, int(width_inches * _CHARS_PER_INCH))
    return "\n".join(textwrap.fill(part, width=width) for part in str(title).split("\n"))


def _name(taxonomy: Taxonomy | None, node: str) -> str:
    if taxonomy is None or node not in taxonomy.index:
        return str(node)
    return taxonomy.display_name(node)


def confusion_figure_name(file_part: str) -> str:
    """``confusion_at_<file_part>.png``; ``file_part`` from ``hiercls.report.figure_names``."""
    return f"confusion_at_{file_part}.png"


# -- confusion matrix -----------------------------------------------------------------------


def plot_confusion_matrix(cm: ConfusionMatrix, title: str, taxonomy: Taxonomy | None = None) -> bytes | None:
    """A PNG of a confusion matrix with the counts in its cells (rows: true, columns: predicted).

    Labels are the taxonomy's display names when ``taxonomy`` is given; the title is wrapped to
    the figure's width, never clipped. ``None`` for a matrix without labels.
    """
    n = len(cm.labels)
    if n == 0:
        return None
    names = [_name(taxonomy, label) for label in cm.labels]
    longest = max(len(name) for name in names)
    size = max(3.5, 0.6 * n + 1.0 + 0.08 * longest)
    figure = _new_figure(size, size + 0.4)
    ax = figure.add_subplot()
    matrix = np.asarray(cm.matrix)
    ax.imshow(matrix, cmap="Blues", vmin=0)
    ax.set_xticks(range(n), names, rotation=45, ha="right")
    ax.set_yticks(range(n), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    suffix = f"\n({cm.n_outside} predicted elsewhere)" if cm.n_outside else ""
    # A figure title (not the axes'): centred on the figure, so constrained layout keeps it whole.
    figure.suptitle(_wrap(title, size) + suffix, fontsize=10)
    peak = matrix.max() if matrix.size else 0
    for i in range(n):
        for j in range(n):
            value = int(matrix[i, j])
            ax.text(j, i, str(value), ha="center", va="center",
                    color="white" if peak and value > peak / 2 else "black")
    return _png(figure)


# -- ROC ------------------------------------------------------------------------------------


def plot_roc_curves(taxonomy: Taxonomy, labels: Sequence[str | None], probs: Any) -> bytes | None:
    """One-vs-rest ROC curve of every leaf from its marginal probability, on rows labelled at a leaf.

    ``probs`` is a ``NodeProbabilities`` (``None``: no figure). A leaf absent from the labels (or
    the only one present) has no curve; ``None`` when no leaf has one.
    """
    from sklearn.metrics import roc_auc_score, roc_curve

    if probs is None or len(labels) == 0 or len(probs) != len(labels):
        return None
    leaves = set(taxonomy.leaves)
    rows = np.array([i for i, t in enumerate(labels) if t in leaves], dtype=np.int64)
    if rows.size == 0:
        return None
    truth = np.asarray([labels[i] for i in rows], dtype=object)
    curves = []
    for leaf in taxonomy.leaves:
        y = truth == leaf
        if y.all() or not y.any():
            continue
        score = probs.column(leaf)[rows]
        fpr, tpr, _ = roc_curve(y, score)
        curves.append((leaf, fpr, tpr, float(roc_auc_score(y, score)), int(y.sum())))
    if not curves:
        return None
    figure = _new_figure(6.5, 5.0)
    ax = figure.add_subplot()
    ax.plot([0, 1], [0, 1], color="0.7", linestyle="--", linewidth=1)
    for leaf, fpr, tpr, area, support in curves:
        ax.plot(fpr, tpr, linewidth=1.5, label=f"{_name(taxonomy, leaf)} (AUC {area:.3f}, n={support})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(_wrap(f"ROC per leaf, one-vs-rest on marginal probabilities ({rows.size} images)", 6.5),
                 fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    return _png(figure)


# -- reliability diagram --------------------------------------------------------------------


def _bins(rows: Iterable[dict[str, Any]] | None) -> list[dict[str, float]]:
    """Bins with a count and finite numbers; anything else is dropped (metrics.json is read from disk)."""
    out = []
    for row in rows or []:
        try:
            item = {k: float(row[k]) for k in ("bin_lo", "bin_hi", "confidence", "accuracy", "count")}
        except (KeyError, TypeError, ValueError):
            continue
        if item["count"] > 0 and all(math.isfinite(v) for v in item.values()):
            out.append(item)
    return out


def plot_reliability(before: Iterable[dict[str, Any]] | None, after: Iterable[dict[str, Any]] | None = None,
                     ece: dict[str, Any] | None = None) -> bytes | None:
    """Reliability diagram: accuracy against confidence per bin, before (and after) calibration.

    ``before`` / ``after`` are the bins of ``metrics["calibration"]["reliability"]``
    (``bin_lo``, ``bin_hi``, ``confidence``, ``accuracy``, ``count``); ``ece`` may hold
    ``{"before": x, "after": y}`` for the legend. ``None`` when no bin holds an image.
    """
    series = [(name, _bins(rows)) for name, rows in (("before calibration", before), ("after calibration", after))]
    series = [(name, rows) for name, rows in series if rows]
    if not series:
        return None
    ece = ece or {}
    figure = _new_figure(5.5, 5.0)
    ax = figure.add_subplot()
    ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1, label="perfect calibration")
    for (name, rows), color, marker in zip(series, ("tab:red", "tab:blue"), ("o", "s")):
        key = "before" if name.startswith("before") else "after"
        value = ece.get(key)
        label = f"{name} (ECE {value:.3f})" if isinstance(value, (int, float)) else name
        x = [r["confidence"] for r in rows]
        y = [r["accuracy"] for r in rows]
        sizes = [12 + 60 * math.sqrt(r["count"] / max(q["count"] for q in rows)) for r in rows]
        ax.plot(x, y, color=color, linewidth=1.2, label=label)
        ax.scatter(x, y, s=sizes, color=color, marker=marker, zorder=3)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("confidence (mean predicted probability in the bin)")
    ax.set_ylabel("accuracy in the bin")
    ax.set_title(_wrap("Reliability diagram (marker area: images in the bin)", 5.5), fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    return _png(figure)


# -- coverage / accuracy --------------------------------------------------------------------


def _finite(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def plot_coverage_accuracy(rows: Iterable[dict[str, Any]] | None, target: float | None = None) -> bytes | None:
    """Accuracy and hF against coverage over the stop thresholds of the threshold decoder.

    ``rows`` are ``metrics["selective"]`` (``threshold``, ``coverage``, ``accuracy``, ``hF``);
    ``target`` (an accuracy) is drawn as a horizontal line. ``None`` for no usable row.
    """
    points = []
    for row in rows or []:
        if not isinstance(row, dict):
            continue
        coverage = _finite(row.get("coverage"))
        if coverage is not None:
            points.append((coverage, _finite(row.get("accuracy")), _finite(row.get("hF")), _finite(row.get("threshold"))))
    if not points:
        return None
    points.sort(key=lambda p: p[0])
    figure = _new_figure(6.0, 4.6)
    ax = figure.add_subplot()
    for k, (name, color) in enumerate((("accuracy on the images decided to a leaf", "tab:blue"),
                                       ("hF on all images", "tab:green"))):
        xy = [(p[0], p[1 + k]) for p in points if p[1 + k] is not None]
        if xy:
            ax.plot(*zip(*xy), marker="o", markersize=3, color=color, label=name)
    if _finite(target) is not None:
        ax.axhline(float(target), color="tab:red", linestyle=":", linewidth=1, label=f"target accuracy {target:g}")
    ax.set_xlim(0, 1.02)
    ax.set_xlabel("coverage (share of images decided to a leaf)")
    ax.set_ylabel("score")
    ax.set_title(_wrap("Selective prediction: coverage against accuracy over stop thresholds", 6.0), fontsize=10)
    ax.legend(fontsize=8, loc="lower left")
    return _png(figure)


# -- training curves ------------------------------------------------------------------------


def read_training_records(run_dir: str | Path | None) -> list[dict[str, Any]]:
    """The epoch records of ``RUN/metrics.jsonl`` (bounded read); ``[]`` when absent or unreadable.

    Lines that are not JSON objects with an ``epoch`` are skipped: the picture is a help, and a
    damaged line must not stop the report.
    """
    from hiercls.errors import DataError
    from hiercls.io import read_user_text

    if run_dir is None:
        return []
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    try:
        text = read_user_text(path, "training metrics", DataError, max_bytes=TRAINING_FILE_BYTES)
    except DataError:
        return []
    records = []
    for line in text.splitlines()[:MAX_TRAINING_RECORDS]:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and _finite(record.get("epoch")) is not None:
            records.append(record)
    return records


def _series(records: list[dict[str, Any]]) -> tuple[dict[str, list], dict[str, list]]:
    """``{name: [(epoch, value)]}`` of the losses and of the validation scores in [0, 1]."""
    losses: dict[str, list] = {}
    scores: dict[str, list] = {}
    for record in records:
        epoch = float(record["epoch"])
        train = record.get("train_loss")
        for unit, value in (train.items() if isinstance(train, dict) else [("", train)]):
            if _finite(value) is not None:
                losses.setdefault(f"train loss {unit}".strip(), []).append((epoch, float(value)))
        if _finite(record.get("val_loss")) is not None:
            losses.setdefault("validation loss", []).append((epoch, float(record["val_loss"])))
        for key in ("val_accuracy", "val_hF", "val_hP", "val_hR"):
            if _finite(record.get(key)) is not None:
                scores.setdefault(key.replace("val_", "validation "), []).append((epoch, float(record[key])))
    return losses, scores


def plot_training_curves(records: list[dict[str, Any]] | str | Path | None) -> bytes | None:
    """Training and validation loss, and validation accuracy / hF, per epoch.

    ``records`` are the lines of a run's ``metrics.jsonl`` (or the run folder, read with
    ``read_training_records``). ``None`` when there is no finite number to draw.
    """
    if records is None or isinstance(records, (str, Path)):
        records = read_training_records(records)
    losses, scores = _series(records)
    if not losses and not scores:
        return None
    figure = _new_figure(10.0 if losses and scores else 5.5, 4.2)
    axes = figure.subplots(1, int(bool(losses)) + int(bool(scores)), squeeze=False)[0]
    from matplotlib.ticker import MaxNLocator

    for ax, (series, ylabel) in zip(axes, [(s, y) for s, y in ((losses, "loss"), (scores, "score")) if s]):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        for name, xy in series.items():
            ax.plot(*zip(*xy), marker="o", markersize=3, label=name)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
        ax.set_title(f"{ylabel} per epoch", fontsize=10)
    return _png(figure)


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


# -- all at once ----------------------------------------------------------------------------


def report_figures(evaluation: Any) -> dict[str, bytes]:
    """Every figure of an ``Evaluation``-like object: file name -> PNG bytes (absent ones left out).

    Uses ``taxonomy``, ``predictions`` (labels, decoded predictions, probs), ``metrics``
    (``calibration`` and ``selective`` when present) and ``run_dir`` (training curves).
    """
    from hiercls.metrics import confusion_matrices, leaf_confusion_matrix
    from hiercls.report import decision_name, figure_names, selective_choice

    taxonomy, preds, metrics = evaluation.taxonomy, evaluation.predictions, evaluation.metrics or {}
    labelled = [i for i, t in enumerate(preds.labels) if t is not None]
    true_nodes = [preds.labels[i] for i in labelled]
    pred_nodes = [preds.predictions[i] for i in labelled]
    out: dict[str, bytes | None] = {}
    if labelled:
        leaf_cm = leaf_confusion_matrix(taxonomy, true_nodes, pred_nodes)
        if leaf_cm.matrix.sum() or leaf_cm.n_outside:
            title = f"leaves ({int(leaf_cm.matrix.sum()) + leaf_cm.n_outside} images labelled at a leaf)"
            out[FIGURE_NAMES["confusion_leaves"]] = plot_confusion_matrix(leaf_cm, title, taxonomy)
        parts = figure_names(taxonomy.internal_nodes)
        for node, cm in confusion_matrices(taxonomy, true_nodes, pred_nodes).items():
            if cm.matrix.sum() or cm.n_outside:
                out[confusion_figure_name(parts[node])] = plot_confusion_matrix(
                    cm, decision_name(taxonomy, node, display=True), taxonomy)
        probs = preds.probs[np.asarray(labelled, dtype=np.int64)] if preds.probs is not None else None
        out[FIGURE_NAMES["roc"]] = plot_roc_curves(taxonomy, true_nodes, probs)
    calibration = _dict(metrics.get("calibration"))
    reliability = _dict(calibration.get("reliability"))
    overall = {k: _dict(calibration.get(f"ece_{k}")).get("overall") for k in ("before", "after")}
    out[FIGURE_NAMES["reliability"]] = plot_reliability(reliability.get("before"), reliability.get("after"), overall)
    out[FIGURE_NAMES["coverage"]] = plot_coverage_accuracy(metrics.get("selective"), selective_choice(metrics)[0])
    out[FIGURE_NAMES["training"]] = plot_training_curves(getattr(evaluation, "run_dir", None))
    return {name: png for name, png in out.items() if png}
