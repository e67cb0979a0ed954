"""Per-node temperature scaling of a run's probabilities, fitted on its validation images.

Every strategy's output is a ``NodeProbabilities``: P(child | node) for every internal node.
Tempering a softmax's logits by 1/T equals raising its probabilities to the power 1/T and
renormalising, so each node's children are recalibrated from the probabilities alone, with
no model at hand and for every strategy alike:

    p_i(T) = p_i^(1/T) / sum_j p_j^(1/T)          (j over the node's children)

``fit_temperatures`` chooses, for each internal node, the T that minimises the negative
log-likelihood of the true child over the images labelled strictly below that node;
``apply_temperatures`` applies them; ``calibration_metrics`` reports the expected calibration
error before and after (overall and per depth) with reliability-diagram bins. The temperatures
live in ``RUN/calibration.json`` (``write_calibration`` / ``read_calibration``), which
``hiercls.inference.load_run`` reads and ``predict_table`` / ``predict_images`` apply.
docs/metrics.md, "Calibration", has the formulas.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from hiercls.errors import CheckpointError, DataError
from hiercls.probabilities import NodeProbabilities
from hiercls.taxonomy import Taxonomy

__all__ = [
    "CALIBRATION_FILE",
    "MIN_IMAGES",
    "T_BOUNDS",
    "CalibrationFit",
    "fit_calibration",
    "fit_temperatures",
    "apply_temperatures",
    "calibration_metrics",
    "reliability_bins",
    "paths_digest",
    "write_calibration",
    "read_calibration",
    "calibration_overlap",
    "calibration_section",
    "calibrate_run",
]

CALIBRATION_FILE = "calibration.json"
# A node with fewer labelled images below it keeps T = 1: one temperature fitted on a handful of
# images would follow their noise.
MIN_IMAGES = 10
T_BOUNDS = (0.05, 20.0)
# calibration.json holds one number per internal node and a few records: a larger file is not ours.
MAX_CALIBRATION_BYTES = 4 * 2**20
FORMAT_VERSION = 1


# -- fitting ----------------------------------------------------------------------------------


@dataclass
class CalibrationFit:
    """Fitted temperatures (every internal node; T = 1 where none was fitted) and why some were not."""

    temperatures: dict[str, float]
    skipped: dict[str, str] = field(default_factory=dict)  # node -> reason it keeps T = 1
    node_images: dict[str, int] = field(default_factory=dict)  # node -> images labelled below it
    nll_before: dict[str, float] = field(default_factory=dict)
    nll_after: dict[str, float] = field(default_factory=dict)


def _check_finite(probs: NodeProbabilities, what: str = "probabilities") -> None:
    if not (np.isfinite(probs.conditional).all() and np.isfinite(probs.marginal).all()):
        bad = int((~np.isfinite(probs.conditional)).any(axis=1).sum())
        raise DataError(
            f"{what}: {bad} image(s) have non-finite (NaN or inf) node probabilities; the model diverged "
            "or the predictions file is corrupt; calibration needs finite probabilities"
        )


def _true_children(taxonomy: Taxonomy, node: str, labels: Sequence[str | None]) -> tuple[np.ndarray, np.ndarray]:
    """Rows labelled strictly below ``node`` and, for each, the position of its true child."""
    children = taxonomy.children(node)
    position = {child: k for k, child in enumerate(children)}
    rows, targets = [], []
    for i, label in enumerate(labels):
        if label is None or label == node:
            continue
        path = taxonomy.path(label)
        if node in path[:-1]:
            rows.append(i)
            targets.append(position[path[path.index(node) + 1]])
    return np.asarray(rows, dtype=np.int64), np.asarray(targets, dtype=np.int64)


def _log_probs(p: np.ndarray) -> np.ndarray:
    # the smallest positive float for 0: no -inf, so no NaN when tempering (a 0 stays below 1e-15)
    return np.log(np.clip(p, np.finfo(np.float64).tiny, None))


def _tempered(log_p: np.ndarray, temperature: float) -> np.ndarray:
    """log of p^(1/T) / sum_j p_j^(1/T), row-wise (``log_p`` finite)."""
    z = log_p / temperature
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def _nll(log_p: np.ndarray, targets: np.ndarray, temperature: float) -> float:
    picked = _tempered(log_p, temperature)[np.arange(len(targets)), targets]
    return float(-np.mean(np.maximum(picked, math.log(1e-12))))  # a zero-probability truth costs 27.6, not inf


def _fit_one(log_p: np.ndarray, targets: np.ndarray) -> float:
    from scipy.optimize import minimize_scalar

    lo, hi = (math.log(b) for b in T_BOUNDS)
    result = minimize_scalar(lambda log_t: _nll(log_p, targets, math.exp(log_t)), bounds=(lo, hi),
                             method="bounded", options={"xatol": 1e-4})
    temperature = float(math.exp(result.x))
    # the bounded search may stop near 1 without reaching it; never return a worse fit than T = 1
    return temperature if _nll(log_p, targets, temperature) <= _nll(log_p, targets, 1.0) else 1.0


def fit_calibration(taxonomy: Taxonomy, probs: NodeProbabilities, labels: Sequence[str | None],
                    min_images: int = MIN_IMAGES) -> CalibrationFit:
    """Temperatures minimising each internal node's NLL of the true child (see ``fit_temperatures``)."""
    _check_finite(probs)
    if len(labels) != len(probs):
        raise DataError(f"{len(labels)} labels but {len(probs)} probability rows; give one label per image")
    unknown = sorted({str(t) for t in labels if t is not None and t not in taxonomy.index})
    if unknown:
        raise DataError(f"label(s) not in taxonomy '{taxonomy.name}': {', '.join(unknown[:5])}")
    fit = CalibrationFit(temperatures={})
    for node in taxonomy.internal_nodes:
        rows, targets = _true_children(taxonomy, node, labels)
        fit.node_images[node] = int(rows.size)
        fit.temperatures[node] = 1.0
        if len(taxonomy.children(node)) < 2:
            fit.skipped[node] = "one child: nothing to calibrate"
        elif rows.size < min_images:
            fit.skipped[node] = f"{rows.size} image(s) labelled below it, fewer than {min_images}"
        elif np.unique(targets).size < 2:
            fit.skipped[node] = "its images all lie under one child"
        if node in fit.skipped:
            continue
        log_p = _log_probs(probs.conditional[np.ix_(rows, taxonomy.children_indices(node))])
        fit.temperatures[node] = _fit_one(log_p, targets)
        fit.nll_before[node] = _nll(log_p, targets, 1.0)
        fit.nll_after[node] = _nll(log_p, targets, fit.temperatures[node])
    return fit


def fit_temperatures(taxonomy: Taxonomy, probs: NodeProbabilities, labels: Sequence[str | None]) -> dict[str, float]:
    """Internal node -> temperature T in ``T_BOUNDS`` minimising the NLL of the true child.

    Only images labelled strictly below a node count for it (a partial label at an internal
    node counts for that node's ancestors). A node with one child, fewer than ``MIN_IMAGES``
    such images, or all of them under one child keeps T = 1 (``fit_calibration`` says which).
    """
    return fit_calibration(taxonomy, probs, labels).temperatures


def _check_temperatures(taxonomy: Taxonomy, temperatures: dict[str, Any], source: str) -> dict[str, float]:
    """Known internal nodes with finite positive temperatures, or one clear error naming the first bad one."""
    if not isinstance(temperatures, dict):
        raise CheckpointError(f"{source}: temperatures must be a mapping of node: T, not {type(temperatures).__name__}")
    checked = {}
    for node, value in temperatures.items():
        if node not in taxonomy.index:
            raise CheckpointError(f"{source}: node '{node}' is not in the run's taxonomy '{taxonomy.name}'; "
                                  "the file belongs to another run; run `hiercls calibrate` again")
        if taxonomy.is_leaf(node):
            raise CheckpointError(f"{source}: '{node}' is a leaf; temperatures belong to internal nodes")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise CheckpointError(f"{source}: temperature of '{node}' is {value!r}; it must be a finite number > 0 "
                                  "(run `hiercls calibrate` again)")
        checked[node] = float(value)
    return checked


def apply_temperatures(probs: NodeProbabilities, temperatures: dict[str, float]) -> NodeProbabilities:
    """``probs`` with each listed node's children tempered: p_i^(1/T) / sum_j p_j^(1/T).

    Nodes not listed (and T = 1) are left as they are; the argmax child of every node is
    unchanged, so greedy and best-child decisions never move, only their probabilities.
    """
    taxonomy = probs.taxonomy
    temperatures = _check_temperatures(taxonomy, temperatures, "temperatures")
    _check_finite(probs)
    conditional = probs.conditional.copy()
    for node, temperature in temperatures.items():
        if temperature == 1.0 or len(taxonomy.children(node)) < 2:
            continue
        children = taxonomy.children_indices(node)
        conditional[:, children] = np.exp(_tempered(_log_probs(conditional[:, children]), temperature))
    return NodeProbabilities.from_conditionals(taxonomy, conditional)


# -- measuring ----------------------------------------------------------------------------------


def reliability_bins(confidence: np.ndarray, correct: np.ndarray, n_bins: int = 15) -> list[dict[str, Any]]:
    """Equal-width confidence bins (as ``hiercls.metrics.expected_calibration_error`` bins them):
    ``bin_lo``, ``bin_hi``, mean ``confidence``, ``accuracy`` and ``count`` (None when empty)."""
    confidence, correct = np.asarray(confidence, dtype=np.float64), np.asarray(correct, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    bins = []
    for b in range(n_bins):
        inside = which == b
        count = int(inside.sum())
        bins.append({
            "bin_lo": float(edges[b]), "bin_hi": float(edges[b + 1]),
            "confidence": float(confidence[inside].mean()) if count else None,
            "accuracy": float(correct[inside].mean()) if count else None,
            "count": count,
        })
    return bins


def _ece_from_bins(bins: list[dict[str, Any]]) -> float | None:
    total = sum(b["count"] for b in bins)
    if not total:
        return None
    return float(sum(b["count"] / total * abs(b["accuracy"] - b["confidence"]) for b in bins if b["count"]))


def _leaf_confidence(taxonomy: Taxonomy, labels: list[str], probs: NodeProbabilities) -> tuple[np.ndarray, np.ndarray]:
    """Greedy leaf prediction's marginal probability and whether it is the label (leaf-labelled rows)."""
    predicted = probs.decode_indices("greedy")
    rows = [i for i, t in enumerate(labels) if taxonomy.is_leaf(t)]
    confidence = probs.marginal[rows, predicted[rows]] if rows else np.zeros(0)
    correct = np.array([taxonomy.nodes[predicted[i]] == labels[i] for i in rows], dtype=np.float64)
    return confidence, correct


def _ece_summary(taxonomy: Taxonomy, labels: list[str], probs: NodeProbabilities, n_bins: int):
    from hiercls.metrics import expected_calibration_error

    _check_finite(probs)
    confidence, correct = _leaf_confidence(taxonomy, labels, probs)
    bins = reliability_bins(confidence, correct, n_bins)
    per_depth = expected_calibration_error(taxonomy, labels, probs, n_bins=n_bins)["per_depth"]
    ece = {"overall": _ece_from_bins(bins), **{f"depth {d}": v for d, v in per_depth.items()}}
    return ece, bins


def calibration_metrics(
    taxonomy: Taxonomy,
    labels: Sequence[str | None],
    probs_before: NodeProbabilities,
    probs_after: NodeProbabilities | None = None,
    n_bins: int = 15,
    *,
    temperatures: dict[str, float] | None = None,
) -> dict[str, Any]:
    """ECE before (and after) calibration, overall and per depth, with reliability-diagram bins.

    ``overall`` is the ECE of the greedy leaf prediction (confidence: its marginal probability;
    correct: it is the label) over images labelled at a leaf; ``depth d`` is
    ``hiercls.metrics.expected_calibration_error`` at depth d. Unlabelled rows are left out.
    """
    if len(labels) != len(probs_before) or (probs_after is not None and len(probs_after) != len(labels)):
        raise DataError(f"{len(labels)} labels but {len(probs_before)} probability rows; give one label per image")
    keep = np.asarray([i for i, t in enumerate(labels) if t is not None], dtype=np.int64)
    if keep.size == 0:
        raise DataError("no image has a label; calibration is measured against true labels")
    y = [labels[i] for i in keep]
    ece_before, bins_before = _ece_summary(taxonomy, y, probs_before[keep], n_bins)
    ece_after, bins_after = (None, None)
    if probs_after is not None:
        ece_after, bins_after = _ece_summary(taxonomy, y, probs_after[keep], n_bins)
    return {
        "ece_before": ece_before,
        "ece_after": ece_after,
        "temperatures": dict(temperatures) if temperatures is not None else None,
        "reliability": {"before": bins_before, "after": bins_after},
        "n_images": int(keep.size),
        "n_bins": n_bins,
    }


# -- RUN/calibration.json -------------------------------------------------------------------------


def paths_digest(paths: Sequence[object]) -> str:
    """SHA-256 of the sorted resolved image paths: which images the temperatures were fitted on."""
    resolved = sorted(str(Path(str(p)).resolve()) for p in paths)
    return hashlib.sha256("\n".join(resolved).encode("utf-8")).hexdigest()


def _run_taxonomy(run_dir: Path) -> Taxonomy:
    import yaml

    from hiercls.io import RUN_FILE_BYTES, YamlTooLarge, load_yaml, read_user_text, yaml_error_message

    path = run_dir / "taxonomy.yaml"
    text = read_user_text(path, "run taxonomy", CheckpointError, max_bytes=RUN_FILE_BYTES)
    try:
        data = load_yaml(text)
    except (yaml.YAMLError, YamlTooLarge) as exc:  # a damaged or hand-edited run file: one line, no traceback
        raise CheckpointError(yaml_error_message(path, exc)) from None
    return Taxonomy.from_dict(data, source=str(path))


def _validate_payload(payload: Any, taxonomy: Taxonomy, source: str) -> dict[str, Any]:
    if not isinstance(payload, dict):
        raise CheckpointError(f"{source}: not a calibration file (expected a JSON object); run `hiercls calibrate` again")
    payload = dict(payload)
    payload["temperatures"] = _check_temperatures(taxonomy, payload.get("temperatures"), source)
    if payload.get("checkpoint") not in ("best", "last"):
        raise CheckpointError(f"{source}: checkpoint must be 'best' or 'last', got {payload.get('checkpoint')!r}")
    n_images = payload.get("n_images")
    if isinstance(n_images, bool) or not isinstance(n_images, int) or n_images < 0:
        raise CheckpointError(f"{source}: n_images must be a count of images, got {n_images!r}")
    return payload


def write_calibration(run_dir: str | Path, payload: dict[str, Any], taxonomy: Taxonomy | None = None) -> Path:
    """Validate ``payload`` against the run's tree and write it to ``RUN/calibration.json`` atomically."""
    from hiercls.io import atomic_write_json, json_ready

    run_dir = Path(run_dir)
    taxonomy = taxonomy or _run_taxonomy(run_dir)
    target = run_dir / CALIBRATION_FILE
    payload = _validate_payload(payload, taxonomy, str(target))
    payload.setdefault("format", FORMAT_VERSION)
    payload.setdefault("date", datetime.now(timezone.utc).isoformat(timespec="seconds"))
    return atomic_write_json(target, json_ready(payload))


def read_calibration(run_dir: str | Path, taxonomy: Taxonomy | None = None) -> dict[str, Any] | None:
    """``RUN/calibration.json`` checked against the run's tree (finite T > 0 on its internal nodes);
    ``None`` when the run has no calibration. A damaged or foreign file raises ``CheckpointError``."""
    from hiercls.io import read_user_text

    path = Path(run_dir) / CALIBRATION_FILE
    if not path.exists():
        return None
    text = read_user_text(path, "calibration file", CheckpointError, max_bytes=MAX_CALIBRATION_BYTES)
    try:
        # NaN / Infinity are not JSON; Python's reader takes them, so refuse them here
        payload = json.loads(text, parse_constant=lambda name: _refuse_constant(path, name))
    except ValueError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc}); run `hiercls calibrate` again") from None
    return _validate_payload(payload, taxonomy or _run_taxonomy(Path(run_dir)), str(path))


def _refuse_constant(path: Path, name: str):
    raise CheckpointError(f"{path}: holds {name}, not a number; run `hiercls calibrate` again")


def calibration_overlap(run_dir: str | Path, paths: Sequence[object]) -> int:
    """How many of ``paths`` the run's temperatures were fitted on (0 when the run has none).

    Temperatures are fitted on the run's validation split (RUN/split.json); a score on those
    images is optimistic about the calibration.
    """
    payload = read_calibration(run_dir)
    if payload is None or payload.get("split") != "val":
        return 0
    from hiercls.inference import read_run_split

    fitted_on = read_run_split(run_dir)["val"]
    return sum(str(Path(str(p)).resolve()) in fitted_on for p in paths)


def calibration_section(
    taxonomy: Taxonomy,
    labels: Sequence[str | None],
    raw_probs: NodeProbabilities,
    calibration: dict[str, Any] | None,
    n_fitted_on_scored: int = 0,
    n_bins: int = 15,
) -> dict[str, Any]:
    """``metrics["calibration"]`` of an evaluation: ECE of the raw probabilities and, for a calibrated
    run (``LoadedRun.calibration``), after its temperatures, with where they were fitted.

    ``raw_probs`` are the uncalibrated predictions (``predict_table(..., calibrated=False)``);
    ``n_fitted_on_scored`` is ``calibration_overlap(run_dir, paths)``: a note says when the
    temperatures were fitted on some of the scored images (an optimistic "after").
    """
    temperatures = calibration["temperatures"] if calibration else None
    after = apply_temperatures(raw_probs, temperatures) if temperatures else None
    section = calibration_metrics(taxonomy, labels, raw_probs, after, n_bins, temperatures=temperatures)
    section["fitted_on"] = None if not calibration else {
        key: calibration.get(key) for key in ("checkpoint", "epoch", "split", "n_images", "paths_sha256", "date")
    }
    section["n_fitted_on_scored"] = int(n_fitted_on_scored)
    section["notes"] = [] if not n_fitted_on_scored else [
        f"the temperatures were fitted on {n_fitted_on_scored} of the scored images (the run's validation "
        "split): ece_after is optimistic there"
    ]
    return section


# -- calibrating a run ----------------------------------------------------------------------------


def _validation_table(loaded, run_dir: Path):
    """The run's validation images (RUN/split.json), read from the run's data as ``evaluate --split val`` does."""
    from hiercls.data import load_images, run_exclusions
    from hiercls.errors import ConfigError
    from hiercls.evaluation import run_split_subset
    from hiercls.inference import read_run_split

    val = read_run_split(run_dir)["val"]
    if not val:
        raise ConfigError(
            f"{run_dir}: the run has no validation split (val_fraction 0), and temperatures are fitted on "
            "validation images; train with a validation split (--val-fraction or --fold) to calibrate"
        )
    config = loaded.config
    table = load_images(config.data, loaded.taxonomy, group_regex=config.group_regex, require_labels=False,
                        excluded=run_exclusions(config.taxonomy, config.exclude, loaded.taxonomy), excluded_rows="drop")
    return run_split_subset(table, run_dir, "val")


def calibrate_run(
    run_dir: str | Path,
    checkpoint: str = "best",
    *,
    device: str = "auto",
    batch_size: int | None = None,
    progress: bool = True,
    console=None,
    images: np.ndarray | None = None,
    labels: Sequence[str | None] | None = None,
    paths: Sequence[object] | None = None,
) -> dict[str, Any]:
    """Predict the run's validation images, fit per-node temperatures and write ``RUN/calibration.json``.

    ``images`` / ``labels`` / ``paths`` hand the validation images over already decoded (at the
    end of ``fit``); otherwise they are read from the run's data and split. Returns the payload.
    """
    import hiercls
    from hiercls.inference import load_run, predict_images, predict_table

    loaded = load_run(run_dir, checkpoint, calibrated=False)
    run_dir = Path(loaded.run_dir)
    if images is None:
        table = _validation_table(loaded, run_dir)
        labels, paths = list(table.labels), [str(p) for p in table.paths]
        probs = predict_table(loaded, table, batch_size=batch_size, device=device, progress=progress,
                              console=console, calibrated=False)
    else:
        if labels is None or paths is None or not (len(images) == len(labels) == len(paths)):
            raise DataError("calibrate_run: give images, labels and paths of the same length")
        probs = predict_images(loaded, images, batch_size=batch_size, device=device, progress=progress,
                               console=console, calibrated=False)
    fit = fit_calibration(loaded.taxonomy, probs, labels)
    after = apply_temperatures(probs, fit.temperatures)
    measured = calibration_metrics(loaded.taxonomy, labels, probs, after, temperatures=fit.temperatures)
    payload = {
        "format": FORMAT_VERSION,
        "temperatures": fit.temperatures,
        "skipped": fit.skipped,
        "node_images": fit.node_images,
        "nll_before": fit.nll_before,
        "nll_after": fit.nll_after,
        "checkpoint": checkpoint,
        "checkpoint_id": loaded.metadata.get("checkpoint_id"),
        "epoch": loaded.metadata.get("epoch"),
        "split": "val",
        "n_images": len(labels),
        "paths_sha256": paths_digest(paths),
        "ece_before": measured["ece_before"],
        "ece_after": measured["ece_after"],
        "reliability": measured["reliability"],
        "n_bins": measured["n_bins"],
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "hiercls_version": hiercls.__version__,
    }
    write_calibration(run_dir, payload, loaded.taxonomy)
    return payload
