"""The predictions CSV: one row per image, its label, group, decoded prediction and node probabilities.

Columns, in this order::

    path, label, group, prediction, p:<node> ...

``label`` and ``group`` are empty when unknown; there is one ``p:<node>`` column per non-root
node of the taxonomy (in ``taxonomy.nodes`` order) holding the *marginal* probability
P(node | image). The root's probability is always 1 and is not written. The file is what
``hiercls predict`` writes and what ``hiercls evaluate --predictions`` reads, so evaluation can
be rerun (other decoding, other grouping) without the model.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hiercls.errors import DataError
from hiercls.io import atomic_write_text, read_user_text
from hiercls.probabilities import NodeProbabilities
from hiercls.taxonomy import Taxonomy

__all__ = [
    "PredictionSet",
    "write_predictions_csv",
    "read_predictions_csv",
    "PROB_PREFIX",
    "BASE_COLUMNS",
    "CONSISTENCY_TOLERANCE",
]

PROB_PREFIX = "p:"
BASE_COLUMNS = ("path", "label", "group", "prediction")
REQUIRED_COLUMNS = ("path", "prediction")
CONSISTENCY_TOLERANCE = 1e-3


@dataclass
class PredictionSet:
    """The content of a predictions CSV, with labels and predictions resolved to node names.

    ``probs`` is ``None`` when the file has no ``p:`` columns (e.g. predictions made by
    another tool). ``extra`` holds any other column verbatim (e.g. a ``patient`` column that
    can be used for grouping).
    """

    paths: list[str]
    labels: list[str | None]
    groups: list[str | None]
    predictions: list[str]
    probs: NodeProbabilities | None
    extra: dict[str, list[str]] = field(default_factory=dict)
    source: str = ""

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, indices: Sequence[int] | np.ndarray) -> PredictionSet:
        """The rows at ``indices`` (in that order)."""
        idx = [int(i) for i in np.asarray(indices, dtype=np.int64).reshape(-1)]
        return PredictionSet(
            paths=[self.paths[i] for i in idx],
            labels=[self.labels[i] for i in idx],
            groups=[self.groups[i] for i in idx],
            predictions=[self.predictions[i] for i in idx],
            probs=self.probs[np.asarray(idx, dtype=np.int64)] if self.probs is not None else None,
            extra={k: [v[i] for i in idx] for k, v in self.extra.items()},
            source=self.source,
        )


def _cell(value: object) -> str:
    return "" if value is None else str(value)


def write_predictions_csv(
    path: str | Path,
    probs: NodeProbabilities | None,
    paths: Sequence[object],
    labels: Sequence[str | None] | None,
    groups: Sequence[str | None] | None,
    predictions: Sequence[str],
) -> Path:
    """Write the predictions CSV atomically (temporary file + ``os.replace``).

    ``labels`` / ``groups`` may be ``None`` (or hold ``None``) where unknown; those cells stay
    empty. Probabilities are written with 6 significant digits. ``probs`` may be ``None`` to
    write a file without ``p:`` columns. Returns the path written.
    """
    n = len(paths)
    labels = list(labels) if labels is not None else [None] * n
    groups = list(groups) if groups is not None else [None] * n
    predictions = list(predictions)
    lengths = {"labels": len(labels), "groups": len(groups), "predictions": len(predictions)}
    if probs is not None:
        lengths["probs"] = len(probs)
    wrong = {k: v for k, v in lengths.items() if v != n}
    if wrong:
        raise ValueError(f"write_predictions_csv: {n} paths but {wrong}")

    prob_nodes: list[str] = []
    marginal = None
    if probs is not None:
        tax = probs.taxonomy
        prob_nodes = [node for node in tax.nodes if node != tax.root]
        marginal = probs.marginal[:, [tax.index[node] for node in prob_nodes]]

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([*BASE_COLUMNS, *(PROB_PREFIX + node for node in prob_nodes)])
    for i in range(n):
        row = [_cell(paths[i]), _cell(labels[i]), _cell(groups[i]), _cell(predictions[i])]
        if marginal is not None:
            row.extend(f"{float(x):.6g}" for x in marginal[i])
        writer.writerow(row)
    return atomic_write_text(path, buffer.getvalue())


def read_predictions_csv(path: str | Path, taxonomy: Taxonomy) -> PredictionSet:
    """Read and validate a predictions CSV against ``taxonomy``.

    Raises ``DataError`` naming the file (and line) when required columns are missing, when the
    ``p:`` columns do not match the taxonomy's nodes, when labels or predictions are not in the
    taxonomy, when a probability is not a number in [0, 1], or when a row's probabilities are
    inconsistent with the tree (a parent differs from the sum of its children, or the top level
    does not sum to 1, by more than 1e-3).
    """
    path = Path(path)
    text = read_user_text(path, "predictions file", DataError, encoding="utf-8-sig")

    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if not header or not any(h.strip() for h in header):
        raise DataError(f"{path}: the file is empty; expected a header {','.join(BASE_COLUMNS)},p:<node>...")
    header = [h.strip() for h in header]
    duplicates = sorted({h for h in header if header.count(h) > 1})
    if duplicates:
        raise DataError(f"{path}: duplicate column(s) {', '.join(duplicates)}; keep one of each")
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise DataError(
            f"{path}: missing required column(s) {', '.join(missing)} "
            f"(found: {', '.join(header)}); a predictions CSV needs {','.join(BASE_COLUMNS)},p:<node>..."
        )

    prob_columns = [h for h in header if h.startswith(PROB_PREFIX)]
    prob_nodes = [h[len(PROB_PREFIX):] for h in prob_columns]
    if prob_columns:
        _check_prob_columns(path, taxonomy, prob_nodes)

    col = {name: i for i, name in enumerate(header)}
    raw: dict[str, list[str]] = {name: [] for name in header}
    line_numbers: list[int] = []
    for row in reader:
        if not any(cell.strip() for cell in row):
            continue  # blank line
        if len(row) != len(header):
            raise DataError(
                f"{path}:{reader.line_num}: {len(row)} fields but the header has {len(header)}; "
                "check for unquoted commas"
            )
        line_numbers.append(reader.line_num)
        for name, i in col.items():
            raw[name].append(row[i].strip())

    paths = raw["path"]
    labels = _resolve_optional(raw.get("label"), len(paths), taxonomy, f"{path} (column label)")
    groups: list[str | None] = [g or None for g in raw.get("group", [""] * len(paths))]
    predictions = _resolve_predictions(raw["prediction"], taxonomy, path, line_numbers)

    probs = None
    if prob_columns:
        probs = _read_probabilities(path, taxonomy, raw, prob_nodes, line_numbers)

    extra = {name: values for name, values in raw.items() if name not in BASE_COLUMNS and name not in prob_columns}
    return PredictionSet(paths, labels, groups, predictions, probs, extra, source=str(path))


def _check_prob_columns(path: Path, taxonomy: Taxonomy, prob_nodes: list[str]) -> None:
    expected = [n for n in taxonomy.nodes if n != taxonomy.root]
    extra = [n for n in prob_nodes if n not in taxonomy.index or n == taxonomy.root]
    absent = [n for n in expected if n not in prob_nodes]
    if extra or absent:
        parts = []
        if extra:
            parts.append(f"columns for nodes not in taxonomy '{taxonomy.name}': {', '.join('p:' + n for n in extra)}")
        if absent:
            parts.append(f"no column for node(s) {', '.join('p:' + n for n in absent)}")
        raise DataError(
            f"{path}: probability columns do not match the taxonomy ({'; '.join(parts)}). "
            "Was this made with another taxonomy? Pass the taxonomy the predictions were made with."
        )


def _resolve_optional(values: list[str] | None, n: int, taxonomy: Taxonomy, source: str) -> list[str | None]:
    if values is None:
        return [None] * n
    known = [(i, v) for i, v in enumerate(values) if v]
    resolved = taxonomy.resolve_labels([v for _, v in known], source=source)
    out: list[str | None] = [None] * n
    for (i, _), node in zip(known, resolved):
        out[i] = node
    return out


def _resolve_predictions(values: list[str], taxonomy: Taxonomy, path: Path, lines: list[int]) -> list[str]:
    for value, line in zip(values, lines):
        if not value:
            raise DataError(f"{path}:{line}: empty prediction; every row needs a predicted node")
    # A prediction may stop at the root ("not even the first decision is sure"): keep it.
    others = [v for v in values if v != taxonomy.root]
    resolved = iter(taxonomy.resolve_labels(others, source=f"{path} (column prediction)"))
    return [taxonomy.root if v == taxonomy.root else next(resolved) for v in values]


def _read_probabilities(
    path: Path, taxonomy: Taxonomy, raw: dict[str, list[str]], prob_nodes: list[str], lines: list[int]
) -> NodeProbabilities:
    n = len(lines)
    marginal = np.zeros((n, taxonomy.num_nodes), dtype=np.float64)
    marginal[:, taxonomy.index[taxonomy.root]] = 1.0
    for node in prob_nodes:
        j = taxonomy.index[node]
        for i, cell in enumerate(raw[PROB_PREFIX + node]):
            try:
                value = float(cell)
            except ValueError:
                value = math.nan
            if not math.isfinite(value) or value < -CONSISTENCY_TOLERANCE or value > 1 + CONSISTENCY_TOLERANCE:
                raise DataError(
                    f"{path}:{lines[i]}: column p:{node} holds {cell!r}, not a probability in [0, 1]"
                )
            marginal[i, j] = value

    gaps = np.stack(
        [np.abs(marginal[:, taxonomy.index[node]] - marginal[:, taxonomy.children_indices(node)].sum(axis=1))
         for node in taxonomy.internal_nodes],
        axis=1,
    )
    bad_rows = np.where((gaps > CONSISTENCY_TOLERANCE).any(axis=1))[0]
    if bad_rows.size:
        i = int(bad_rows[0])
        problems = []
        for k in np.where(gaps[i] > CONSISTENCY_TOLERANCE)[0]:
            node = taxonomy.internal_nodes[k]
            children_sum = marginal[i, taxonomy.children_indices(node)].sum()
            if node == taxonomy.root:
                problems.append(f"the top-level probabilities sum to {children_sum:.6g}, not 1")
            else:
                value = marginal[i, taxonomy.index[node]]
                problems.append(f"p:{node} = {value:.6g} but its children sum to {children_sum:.6g}")
        more = f" ({bad_rows.size} rows like this)" if bad_rows.size > 1 else ""
        raise DataError(
            f"{path}:{lines[i]}: inconsistent probabilities: {'; '.join(problems)}{more}. "
            "p: columns must be marginal probabilities (a parent equals the sum of its children)"
        )
    return NodeProbabilities.from_marginals(taxonomy, np.clip(marginal, 0.0, 1.0))
