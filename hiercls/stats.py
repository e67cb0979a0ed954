"""Confidence intervals and paired comparisons of prediction sets (``hiercls compare``, ``evaluate --ci``).

* ``metric_ci``: a 95 % **percentile bootstrap** interval for one metric. Resampling is over
  *groups* (slides, patients) when groups are given, so images of one slide are drawn together,
  and over images otherwise. The seed is fixed (default 0), so the same call gives the same
  interval; the number of resamples is part of the result.
* ``paired_comparison``: two prediction sets on the same images. The difference B − A of each
  metric gets a bootstrap interval from *paired* resampling (the same drawn images or groups score
  both sets), and McNemar's exact test runs on the paired correct / incorrect outcomes.

The point estimates are the functions of ``hiercls.metrics`` (``leaf_accuracy``, ``macro_f1``,
``hierarchical_prf``). Re-running those on each of 1000 resamples of 10k images would take
minutes, so the built-in metrics are bootstrapped from per-image counts instead: a resample is a
vector of multiplicities *w* and every metric is a ratio of weighted sums (Σ w·correct / Σ w for
accuracy; tp, fp, fn per leaf for macro-F1; Σ w|T∩P|, Σ w|T|, Σ w|P| for hP/hR/hF), one matrix
product for a whole block of resamples. With all multiplicities 1 these reproduce the
``hiercls.metrics`` values exactly (tested). Any other metric function ``f(true, pred[, probs])``
can be bootstrapped too, by calling it on every resample (slower). Formulas and when each test
is valid: ``docs/statistics.md``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from hiercls.metrics import hierarchical_prf, leaf_accuracy, leaf_label_mask, macro_f1
from hiercls.probabilities import NodeProbabilities
from hiercls.taxonomy import Taxonomy

__all__ = [
    "ConfidenceInterval",
    "BUILTIN_METRICS",
    "HEADLINE_METRICS",
    "COMPARE_METRICS",
    "DEFAULT_RESAMPLES",
    "DEFAULT_SEED",
    "metric_ci",
    "headline_cis",
    "paired_comparison",
    "mcnemar_exact",
    "ci_lines",
    "cluster_codes",
    "resample_weights",
]

DEFAULT_RESAMPLES = 1000
DEFAULT_SEED = 0
DEFAULT_LEVEL = 0.95
METHOD = "percentile bootstrap"
HEADLINE_METRICS = ("accuracy", "macro_f1", "hP", "hR", "hF")
COMPARE_METRICS = ("accuracy", "macro_f1", "hF")
BUILTIN_METRICS = HEADLINE_METRICS
_BLOCK_BYTES = 16 * 2**20  # weights of one block of resamples (float64): bounded memory for any N


@dataclass(frozen=True)
class ConfidenceInterval:
    """A point estimate with its bootstrap interval, and how the interval was made.

    ``low``/``high`` are ``None`` when no resample gave a defined value; ``n_valid`` counts the
    resamples whose metric was defined (e.g. a resample without any leaf-labelled image has no
    accuracy) and the percentiles are taken over those.
    """

    estimate: float | None
    low: float | None
    high: float | None
    level: float
    method: str
    resamples: int
    n_valid: int
    seed: int
    unit: str
    n_units: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- resampling -----------------------------------------------------------------------------


def cluster_codes(groups: Sequence[Any] | None, n: int) -> tuple[np.ndarray, str]:
    """Integer cluster of every row and the unit's name: one cluster per group, or per image.

    Rows whose group is ``None`` form a cluster each (nothing ties them to other rows).
    """
    if groups is None:
        return np.arange(n, dtype=np.int64), "image"
    if len(groups) != n:
        raise ValueError(f"{n} rows but {len(groups)} group values")
    codes: dict[Any, int] = {}
    out = np.empty(n, dtype=np.int64)
    for i, g in enumerate(groups):
        out[i] = codes.setdefault(("row", i) if g is None else ("group", g), len(codes))
    return out, "group"


def _check_resampling(resamples: int, level: float) -> None:
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")


def resample_weights(codes: np.ndarray, resamples: int, seed: int) -> Iterator[np.ndarray]:
    """Blocks of bootstrap multiplicities, shape (block, n_rows): row i counts as often as its cluster was drawn.

    Each resample draws as many clusters as there are, with replacement, uniformly. The blocks
    together hold ``resamples`` rows; the stream depends only on ``seed`` and the clusters.
    """
    n_clusters = int(codes.max()) + 1 if codes.size else 0
    rng = np.random.default_rng(seed)
    block = max(1, min(resamples, _BLOCK_BYTES // (8 * max(codes.size, 1))))
    done = 0
    while done < resamples:
        r = min(block, resamples - done)
        drawn = rng.integers(0, n_clusters, size=(r, n_clusters))
        offsets = (np.arange(r, dtype=np.int64) * n_clusters)[:, None]
        counts = np.bincount((drawn + offsets).ravel(), minlength=r * n_clusters).reshape(r, n_clusters)
        yield counts[:, codes].astype(np.float64)
        done += r


def _percentile_interval(values: np.ndarray, level: float) -> tuple[float | None, float | None, int]:
    valid = values[np.isfinite(values)]
    if valid.size == 0:
        return None, None, 0
    alpha = (1 - level) / 2
    low, high = np.quantile(valid, [alpha, 1 - alpha])
    return float(low), float(high), int(valid.size)


# -- the built-in metrics as ratios of weighted sums -----------------------------------------


def _node_indices(taxonomy: Taxonomy, nodes: Sequence[str]) -> np.ndarray:
    return np.fromiter((taxonomy.index[n] for n in nodes), dtype=np.int64, count=len(nodes))


def _ancestor_sets(taxonomy: Taxonomy) -> np.ndarray:
    """``m[i, j] = 1`` when node j lies on the root-to-node-i path (root excluded): the sets of hP/hR/hF."""
    m = np.zeros((taxonomy.num_nodes, taxonomy.num_nodes), dtype=np.float64)
    for node in taxonomy.nodes:
        for ancestor in taxonomy.path(node)[1:]:
            m[taxonomy.index[node], taxonomy.index[ancestor]] = 1.0
    return m


def _row_statistics(taxonomy: Taxonomy, true_nodes: Sequence[str], pred_nodes: Sequence[str]) -> dict[str, np.ndarray]:
    """Per-image counts whose weighted sums give every built-in metric (columns of one matrix each)."""
    t, p = _node_indices(taxonomy, true_nodes), _node_indices(taxonomy, pred_nodes)
    leaf_rows = leaf_label_mask(taxonomy, true_nodes).astype(np.float64)
    sets = _ancestor_sets(taxonomy)
    leaf_ids = _node_indices(taxonomy, taxonomy.leaves)
    is_true = (t[:, None] == leaf_ids[None, :]) * leaf_rows[:, None]
    is_pred = (p[:, None] == leaf_ids[None, :]) * leaf_rows[:, None]
    return {
        "accuracy": np.stack([leaf_rows * (t == p), leaf_rows], axis=1),
        "hier": np.stack([(sets[t] * sets[p]).sum(axis=1), sets[t].sum(axis=1), sets[p].sum(axis=1)], axis=1),
        "f1": np.concatenate([is_true * is_pred, is_pred * (1 - is_true), is_true * (1 - is_pred)], axis=1),
    }


def _ratio(num: np.ndarray, den: np.ndarray, empty: float = np.nan) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), empty)


def _combine(name: str, sums: dict[str, np.ndarray]) -> np.ndarray:
    """The metric ``name`` of every resample from the weighted column sums (shape (resamples, k))."""
    if name == "accuracy":
        s = sums["accuracy"]
        return _ratio(s[:, 0], s[:, 1])
    if name in ("hP", "hR", "hF"):
        inter, n_true, n_pred = sums["hier"].T
        if name == "hP":
            return _ratio(inter, n_pred, empty=0.0)  # as hierarchical_prf: nothing predicted scores 0
        return _ratio(inter, n_true) if name == "hR" else _ratio(2 * inter, n_pred + n_true)
    if name == "macro_f1":
        tp, fp, fn = np.split(sums["f1"], 3, axis=1)
        present = (tp + fp + fn) > 0  # the classes scikit-learn would list for this resample
        f1 = _ratio(2 * tp, 2 * tp + fp + fn, empty=0.0)
        n_present = present.sum(axis=1)
        return _ratio((f1 * present).sum(axis=1), n_present.astype(np.float64))
    raise ValueError(f"unknown metric {name!r}; built-in: {', '.join(BUILTIN_METRICS)}")


def _builtin_estimates(
    names: Sequence[str], taxonomy: Taxonomy, true_nodes: Sequence[str], pred_nodes: Sequence[str]
) -> dict[str, float | None]:
    """The point estimates, from ``hiercls.metrics`` itself (hP/hR/hF from one call)."""
    unknown = [n for n in names if n not in BUILTIN_METRICS]
    if unknown:
        raise ValueError(f"unknown metric {unknown[0]!r}; built-in: {', '.join(BUILTIN_METRICS)}")
    out: dict[str, float | None] = {}
    if "accuracy" in names:
        out["accuracy"] = leaf_accuracy(taxonomy, true_nodes, pred_nodes)
    if "macro_f1" in names:
        out["macro_f1"] = macro_f1(taxonomy, true_nodes, pred_nodes)
    if {"hP", "hR", "hF"} & set(names):
        out.update({k: v for k, v in hierarchical_prf(taxonomy, true_nodes, pred_nodes).items() if k in names})
    return out


def _weighted_sums(stats: dict[str, np.ndarray], weights: np.ndarray) -> dict[str, np.ndarray]:
    return {key: weights @ value for key, value in stats.items()}


def _bootstrap_builtin(
    names: Sequence[str], row_stats: Sequence[dict[str, np.ndarray]], codes: np.ndarray, resamples: int, seed: int
) -> list[dict[str, np.ndarray]]:
    """``out[k][name]``: the metric of prediction set k on every resample (all sets on the same resamples)."""
    blocks: list[list[dict[str, np.ndarray]]] = [[] for _ in row_stats]
    for weights in resample_weights(codes, resamples, seed):
        for k, stats in enumerate(row_stats):
            sums = _weighted_sums(stats, weights)
            blocks[k].append({name: _combine(name, sums) for name in names})
    return [{name: np.concatenate([b[name] for b in per_set]) for name in names} for per_set in blocks]


# -- input handling -------------------------------------------------------------------------


def _labelled(
    true_nodes: Sequence[str | None], *others: Sequence[Any] | None
) -> tuple[list[str], list[list[Any] | None], np.ndarray]:
    """Drop rows without a label (as ``evaluate_predictions`` does) from the labels and each other column."""
    for other in others:
        if other is not None and len(other) != len(true_nodes):
            raise ValueError(f"{len(true_nodes)} true labels but a column of {len(other)} rows")
    keep = np.array([i for i, t in enumerate(true_nodes) if t is not None], dtype=np.int64)
    if keep.size == 0:
        raise ValueError("no row has a label; confidence intervals need true labels")
    kept = [[other[i] for i in keep] if other is not None else None for other in others]
    return [true_nodes[i] for i in keep], kept, keep


# -- confidence intervals -------------------------------------------------------------------


def metric_ci(
    metric: str | Callable[..., float | None],
    true_nodes: Sequence[str | None],
    pred_nodes: Sequence[str],
    *,
    taxonomy: Taxonomy | None = None,
    probs: NodeProbabilities | None = None,
    groups: Sequence[Any] | None = None,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
    level: float = DEFAULT_LEVEL,
) -> ConfidenceInterval:
    """Percentile-bootstrap interval of one metric; rows without a label are left out.

    ``metric`` is a built-in name (``accuracy``, ``macro_f1``, ``hP``, ``hR``, ``hF``; needs
    ``taxonomy``) or any function ``f(true, pred)``, or ``f(true, pred, probs)`` when ``probs``
    is given, returning a number or ``None`` (e.g. ``functools.partial(metrics.auroc_fn, tax)``).
    ``groups`` (one value per row) makes the resampling unit the group.
    """
    _check_resampling(resamples, level)
    y_true, (y_pred, y_groups), keep = _labelled(true_nodes, pred_nodes, groups)
    codes, unit = cluster_codes(y_groups, len(y_true))
    if isinstance(metric, str):
        if taxonomy is None:
            raise ValueError(f"the built-in metric {metric!r} needs the taxonomy")
        estimate = _builtin_estimates([metric], taxonomy, y_true, y_pred)[metric]
        stats = _row_statistics(taxonomy, y_true, y_pred)
        values = _bootstrap_builtin([metric], [stats], codes, resamples, seed)[0][metric]
    else:
        y_probs = probs[keep] if probs is not None else None
        estimate = _call(metric, y_true, y_pred, y_probs)
        values = _bootstrap_function(metric, y_true, y_pred, y_probs, codes, resamples, seed)
    low, high, n_valid = _percentile_interval(values, level)
    return ConfidenceInterval(
        estimate=None if estimate is None else float(estimate), low=low, high=high, level=level, method=METHOD,
        resamples=resamples, n_valid=n_valid, seed=seed, unit=unit, n_units=int(codes.max()) + 1,
    )


def _call(metric: Callable[..., float | None], true_nodes, pred_nodes, probs) -> float | None:
    value = metric(true_nodes, pred_nodes) if probs is None else metric(true_nodes, pred_nodes, probs)
    return None if value is None else float(value)


def _bootstrap_function(
    metric: Callable[..., float | None], true_nodes: list[str], pred_nodes: list[str],
    probs: NodeProbabilities | None, codes: np.ndarray, resamples: int, seed: int,
) -> np.ndarray:
    """The generic path: the metric function on every resample's rows (same draws as the built-in path)."""
    values = []
    rows = np.arange(len(true_nodes))
    for weights in resample_weights(codes, resamples, seed):
        for w in weights.astype(np.int64):
            idx = np.repeat(rows, w)
            value = _call(metric, [true_nodes[i] for i in idx], [pred_nodes[i] for i in idx],
                          probs[idx] if probs is not None else None)
            values.append(np.nan if value is None else value)
    return np.asarray(values, dtype=np.float64)


def headline_cis(
    taxonomy: Taxonomy,
    true_nodes: Sequence[str | None],
    pred_nodes: Sequence[str],
    groups: Sequence[Any] | None = None,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
    level: float = DEFAULT_LEVEL,
) -> dict[str, dict[str, Any]]:
    """Intervals of accuracy, macro-F1, hP, hR and hF, all from the same resamples (``evaluate --ci``)."""
    _check_resampling(resamples, level)
    y_true, (y_pred, y_groups), _ = _labelled(true_nodes, pred_nodes, groups)
    codes, unit = cluster_codes(y_groups, len(y_true))
    stats = _row_statistics(taxonomy, y_true, y_pred)
    values = _bootstrap_builtin(HEADLINE_METRICS, [stats], codes, resamples, seed)[0]
    estimates = _builtin_estimates(HEADLINE_METRICS, taxonomy, y_true, y_pred)
    out: dict[str, dict[str, Any]] = {}
    for name in HEADLINE_METRICS:
        low, high, n_valid = _percentile_interval(values[name], level)
        out[name] = ConfidenceInterval(
            estimates[name], low, high, level, METHOD,
            resamples, n_valid, seed, unit, int(codes.max()) + 1,
        ).as_dict()
    return out


# -- paired comparison ----------------------------------------------------------------------


def mcnemar_exact(correct_a: Sequence[bool] | np.ndarray, correct_b: Sequence[bool] | np.ndarray) -> dict[str, Any]:
    """McNemar's exact test on paired outcomes: a two-sided binomial test of b against b + c at 1/2.

    ``b`` counts pairs where A is right and B wrong, ``c`` where A is wrong and B right; only
    these discordant pairs carry information. ``p_value`` is 1 when there is none.
    """
    from scipy.stats import binomtest  # imported here: scipy is slow to import

    a = np.asarray(correct_a, dtype=bool)
    b_ = np.asarray(correct_b, dtype=bool)
    if a.shape != b_.shape:
        raise ValueError(f"{a.size} outcomes for A but {b_.size} for B")
    b = int((a & ~b_).sum())
    c = int((~a & b_).sum())
    p_value = 1.0 if b + c == 0 else float(binomtest(b, b + c, 0.5, alternative="two-sided").pvalue)
    return {"b": b, "c": c, "n_pairs": int(a.size), "p_value": p_value, "test": "McNemar exact (binomial)"}


def paired_comparison(
    taxonomy: Taxonomy,
    true_nodes: Sequence[str | None],
    pred_a: Sequence[str],
    pred_b: Sequence[str],
    groups: Sequence[Any] | None = None,
    metrics: Sequence[str] = COMPARE_METRICS,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
    level: float = DEFAULT_LEVEL,
    unit: str | None = None,
) -> dict[str, Any]:
    """A vs B on the same rows: each metric for A and B, B − A with a paired bootstrap CI, and McNemar.

    Rows are already paired (row i of A and of B is the same image). Rows pooled from several
    folds or seeds are simply concatenated; pass the image (or its group) as ``groups`` so that
    copies of one image from several seeds are resampled together. McNemar counts every row as
    an independent pair (see ``docs/statistics.md`` for when that holds).
    """
    _check_resampling(resamples, level)
    y_true, (y_a, y_b, y_groups), _ = _labelled(true_nodes, pred_a, pred_b, groups)
    codes, default_unit = cluster_codes(y_groups, len(y_true))
    unit = unit or default_unit  # e.g. "image" when the clusters are images repeated over seeds
    stats = [_row_statistics(taxonomy, y_true, y_a), _row_statistics(taxonomy, y_true, y_b)]
    boot_a, boot_b = _bootstrap_builtin(metrics, stats, codes, resamples, seed)
    est_a, est_b = (_builtin_estimates(metrics, taxonomy, y_true, y) for y in (y_a, y_b))
    rows: dict[str, dict[str, Any]] = {}
    for name in metrics:
        a, b = est_a[name], est_b[name]
        low, high, n_valid = _percentile_interval(boot_b[name] - boot_a[name], level)
        rows[name] = {
            "A": a, "B": b, "difference": None if a is None or b is None else b - a,
            "low": low, "high": high, "n_valid": n_valid,
        }
    leaf_rows = leaf_label_mask(taxonomy, y_true)
    correct_a = np.array([t == p for t, p in zip(y_true, y_a)])[leaf_rows]
    correct_b = np.array([t == p for t, p in zip(y_true, y_b)])[leaf_rows]
    return {
        "metrics": rows,
        "mcnemar": mcnemar_exact(correct_a, correct_b),
        "bootstrap": {
            "method": f"paired {METHOD}", "level": level, "resamples": resamples, "seed": seed,
            "unit": unit, "n_units": int(codes.max()) + 1,
        },
        "n_images": len(y_true),
    }


def ci_lines(cis: dict[str, dict[str, Any]]) -> list[str]:
    """One line per metric for a terminal: ``accuracy 0.8123  95% CI [0.79, 0.83]``, then how they were made."""
    lines = []
    for name, ci in cis.items():
        interval = "–" if ci["low"] is None else f"[{ci['low']:.4f}, {ci['high']:.4f}]"
        estimate = "–" if ci["estimate"] is None else f"{ci['estimate']:.4f}"
        lines.append(f"{name:<9} {estimate}  {ci['level']:.0%} CI {interval}")
    if cis:
        first = next(iter(cis.values()))
        lines.append(f"({first['method']}: {first['resamples']} resamples of {first['n_units']} "
                     f"{first['unit']}s, seed {first['seed']})")
    return lines
