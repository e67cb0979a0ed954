"""Selective prediction: what the threshold decoder's "stop when unsure" buys.

``NodeProbabilities.decode("threshold", t)`` follows the most probable child from the root
and stops at an internal node when that child's conditional probability is below ``t``
("Leukemia > Acute, subtype uncertain"). Raising ``t`` decides fewer images down to a leaf
(coverage falls) and, for a useful model, decides them more accurately. ``selective_table``
measures both over a range of thresholds; ``threshold_for_accuracy`` names the threshold
that reaches a target accuracy while keeping the most coverage. docs/metrics.md,
"Selective prediction", has the definitions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from hiercls.errors import ConfigError, DataError
from hiercls.probabilities import NodeProbabilities
from hiercls.taxonomy import Taxonomy

__all__ = ["DEFAULT_THRESHOLDS", "selective_table", "threshold_for_accuracy"]

DEFAULT_THRESHOLDS: tuple[float, ...] = tuple(round(0.05 * k, 2) for k in range(20)) + (0.99,)


def _check_thresholds(thresholds: Sequence[float]) -> list[float]:
    values = [float(t) for t in thresholds]
    if not values:
        raise ConfigError("give at least one threshold")
    bad = [t for t in values if not (math.isfinite(t) and 0.0 <= t <= 1.0)]
    if bad:
        raise ConfigError(f"threshold {bad[0]} is outside [0, 1]; the threshold decoder compares probabilities")
    return sorted(set(values))


def selective_table(
    taxonomy: Taxonomy,
    probs: NodeProbabilities,
    labels: Sequence[str | None],
    thresholds: Sequence[float] | None = None,
) -> list[dict[str, Any]]:
    """One row per threshold (ascending): ``threshold``, ``coverage``, ``n_decided``, ``n``, ``accuracy``, ``hF``.

    Over the labelled images (``n``): ``n_decided`` reach a leaf, ``coverage`` = n_decided / n;
    ``accuracy`` is the exact-match accuracy of the decided images labelled at a leaf (None when
    there are none); ``hF`` is the hierarchical F1 of every labelled image's decoded node, so a
    prediction stopped at a correct ancestor still earns partial credit.
    """
    from hiercls.metrics import hierarchical_prf

    if len(labels) != len(probs):
        raise DataError(f"{len(labels)} labels but {len(probs)} probability rows; give one label per image")
    if not (np.isfinite(probs.conditional).all()):
        raise DataError("non-finite (NaN or inf) node probabilities; selective prediction needs finite ones")
    keep = np.asarray([i for i, t in enumerate(labels) if t is not None], dtype=np.int64)
    if keep.size == 0:
        raise DataError("no image has a label; selective prediction is measured against true labels")
    y = [labels[i] for i in keep]
    probs = probs[keep]
    leaf_labelled = np.array([taxonomy.is_leaf(t) for t in y])
    rows = []
    for threshold in _check_thresholds(thresholds if thresholds is not None else DEFAULT_THRESHOLDS):
        predicted = probs.decode("threshold", threshold)
        decided = np.array([taxonomy.is_leaf(p) for p in predicted])
        scored = decided & leaf_labelled
        correct = sum(predicted[i] == y[i] for i in np.flatnonzero(scored))
        rows.append({
            "threshold": threshold,
            "coverage": float(decided.mean()),
            "n_decided": int(decided.sum()),
            "n": len(y),
            "accuracy": float(correct / scored.sum()) if scored.any() else None,
            "hF": hierarchical_prf(taxonomy, y, predicted)["hF"],
        })
    return rows


def threshold_for_accuracy(rows: Sequence[dict[str, Any]], target: float) -> dict[str, Any] | None:
    """The row of the smallest threshold whose accuracy on decided images is at least ``target``.

    The smallest such threshold stops the fewest images, so it keeps the most coverage.
    ``None`` when no threshold reaches ``target``.
    """
    if not (math.isfinite(target) and 0.0 <= target <= 1.0):
        raise ConfigError(f"target accuracy {target} is outside [0, 1]")
    reaching = [r for r in rows if r.get("accuracy") is not None and r["accuracy"] >= target]
    return min(reaching, key=lambda r: r["threshold"]) if reaching else None
