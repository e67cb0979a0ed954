"""One evaluation pipeline: from predictions (a CSV, a trained run, an estimator) to metrics and a report.

``hiercls evaluate``, ``hiercls cv`` (scoring a cell) and ``HierarchicalImageClassifier.score``
all go through :func:`evaluate_prediction_set`; :func:`evaluate_run` predicts with a run folder
first, and :func:`write_evaluation` writes what ``hiercls evaluate`` writes (``metrics.json``,
``report.md``, confusion-matrix PNGs and, for a run, ``predictions.csv``).

Heavy imports (torch, matplotlib) happen inside the functions that need them, so importing this
module stays cheap for the command line.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata as package_metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hiercls.errors import ConfigError, DataError
from hiercls.io import json_ready
from hiercls.predictions import PredictionSet
from hiercls.taxonomy import Taxonomy, load_taxonomy

if TYPE_CHECKING:
    from rich.console import Console

    from hiercls.data import ImageTable
    from hiercls.inference import LoadedRun

__all__ = [
    "Evaluation",
    "evaluate_run",
    "evaluate_prediction_set",
    "write_evaluation",
    "run_provenance",
    "default_checkpoint",
    "misclassified_panels",
]


@dataclass
class Evaluation:
    """Everything one evaluation produced: the inputs it scored and the metrics it wrote.

    ``predictions`` holds the decoded predictions that were scored (after ``decode``, when one
    was asked); ``metrics`` is exactly what ``metrics.json`` holds (JSON-ready), including
    ``metrics["provenance"]``, also kept in ``provenance``.
    """

    taxonomy: Taxonomy
    predictions: PredictionSet
    group_values: list[str | None] | None
    metrics: dict[str, Any]
    provenance: dict[str, Any]
    run_dir: Path | None = None
    # the model that made the predictions, kept so Grad-CAM panels need not load the run again
    loaded_run: LoadedRun | None = field(default=None, repr=False, compare=False)


# -- provenance -----------------------------------------------------------------------------


def _version(package: str) -> str | None:
    """Installed version of ``package``, read from its metadata (no import of torch or timm)."""
    try:
        return package_metadata.version(package)
    except package_metadata.PackageNotFoundError:
        return None


def _base_provenance(taxonomy: Taxonomy, predictions: PredictionSet) -> dict[str, Any]:
    from hiercls import __version__

    return {
        "predictions": predictions.source or None,
        "taxonomy": taxonomy.source,
        "taxonomy_fingerprint": taxonomy.fingerprint,
        "hiercls_version": __version__,
        "torch_version": _version("torch"),
        "timm_version": _version("timm"),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def run_provenance(loaded: LoadedRun, checkpoint: str, split: str | None = None, data: Any = None) -> dict[str, Any]:
    """What a run contributes to provenance: which model, trained how, scored on which images."""
    config = loaded.config
    return {
        "run": str(loaded.run_dir),
        "checkpoint": checkpoint,
        "epoch": loaded.metadata.get("epoch"),
        "split": split,
        "strategy": config.strategy,
        "backbone": config.backbone,
        "img_size": config.img_size,
        "loss": config.loss,
        "data": str(data if data is not None else config.data),
        "taxonomy": str(config.taxonomy),
        "taxonomy_fingerprint": loaded.taxonomy.fingerprint,
    }


def _provenance(taxonomy: Taxonomy, predictions: PredictionSet, given: dict[str, Any] | None) -> dict[str, Any]:
    """The base fields overlaid with the caller's; fields that are unknown (``None``) are left out."""
    merged = {**_base_provenance(taxonomy, predictions), **(given or {})}
    return {key: value for key, value in merged.items() if value is not None}


# -- scoring a set of predictions ------------------------------------------------------------


def _check_rows(predictions: PredictionSet) -> None:
    if len(predictions) == 0:
        raise DataError(f"{predictions.source}: no rows to evaluate")
    if all(label is None for label in predictions.labels):
        raise DataError(
            f"{predictions.source}: no row has a label; evaluation compares predictions with true labels "
            "(fill the label column, or give labelled data)"
        )


def _decoded(predictions: PredictionSet, decode: str | None, threshold: float | None) -> list[str]:
    """The predictions to score: as given, or decoded again from the probabilities."""
    if not decode:
        return list(predictions.predictions)
    if predictions.probs is None:
        raise ConfigError(f"--decode {decode} needs probabilities, but {predictions.source} has no p: columns")
    return predictions.probs.decode(decode, 0.5 if threshold is None else threshold)


def group_values(predictions: PredictionSet, column: str, from_run: bool = False) -> list[str | None]:
    """The group of every row, from the ``group`` column or another column of the CSV."""
    if column == "group":
        values = predictions.groups
    elif column in predictions.extra:
        values = [v or None for v in predictions.extra[column]]
    else:
        available = ", ".join(["group", *predictions.extra])
        raise ConfigError(
            f"--group-by {column}: {predictions.source} has no column '{column}' (available: {available})"
        )
    if all(v is None for v in values):
        hint = " (or give --group-regex)" if from_run else ""
        raise DataError(
            f"--group-by {column}: no row of {predictions.source} has a {column} value; fill the column{hint} "
            "or leave --group-by out"
        )
    return list(values)


def group_metrics(
    taxonomy: Taxonomy,
    predictions: PredictionSet,
    groups: list[str | None],
    *,
    aggregator: str = "mode",
    group_scoring: str = "groups",
    decode: str | None = None,
    threshold: float | None = None,
) -> dict[str, Any]:
    """Aggregate per group (rows without a group value are left out) and score the groups.

    ``predictions.predictions`` are the decoded predictions that the groups vote with.
    """
    from hiercls.aggregate import evaluate_groups, get_aggregator

    # the mean aggregator decodes the groups' mean probabilities as the images were decoded
    options = {"decode": decode or "greedy", "threshold": 0.5 if threshold is None else threshold}
    chosen = get_aggregator(aggregator, **(options if aggregator == "mean" else {}))
    return evaluate_groups(
        taxonomy, groups, predictions.labels, predictions.predictions, predictions.probs, chosen, aggregator,
        scoring=group_scoring,
    )


def evaluate_prediction_set(
    taxonomy: Taxonomy,
    predictions: PredictionSet,
    *,
    decode: str | None = None,
    threshold: float | None = None,
    group_by: str | None = None,
    aggregator: str = "mode",
    group_scoring: str = "groups",
    ci: bool = False,
    provenance: dict[str, Any] | None = None,
    from_run: bool = False,
    target_accuracy: float | None = None,
    calibration: dict[str, Any] | None = None,
) -> Evaluation:
    """Score predictions against their labels: image metrics, group metrics, confidence intervals,
    calibration (ECE) and selective prediction (the threshold decoder's coverage and accuracy).

    Parameters
    ----------
    taxonomy : Taxonomy
        The tree the predictions were made with.
    predictions : PredictionSet
        Paths, labels (``None`` where unknown), groups, decoded predictions and (optionally)
        the node probabilities, e.g. from ``hiercls.predictions.read_predictions_csv``.
    decode, threshold
        Decode the predictions again from the probabilities (``greedy``, ``best_leaf`` or
        ``threshold`` with its stop threshold); default: score the given predictions.
    group_by : str, optional
        Also score per group of this column (``group`` or an extra column of the CSV).
    aggregator, group_scoring
        How a group's images make one prediction, and whether groups or images are scored.
    ci : bool
        Add 95% bootstrap confidence intervals (over groups with ``group_by``) under ``ci``.
    provenance : dict, optional
        Fields recorded under ``metrics["provenance"]`` over the ones known here (versions,
        date, taxonomy, predictions source).
    target_accuracy : float, optional
        Name the smallest stop threshold whose accuracy on the images decided to a leaf reaches
        it (``metrics["selective_target"]``).
    calibration : dict, optional
        ``metrics["calibration"]`` as made by ``hiercls.calibration.calibration_section`` (a
        calibrated run's ECE before and after); default: the ECE of the given probabilities.

    Returns
    -------
    Evaluation
    """
    from hiercls.aggregate import get_aggregator
    from hiercls.metrics import evaluate_predictions

    get_aggregator(aggregator)  # an unknown name fails before any work
    _check_rows(predictions)
    scored = dataclasses.replace(predictions, predictions=_decoded(predictions, decode, threshold))
    groups = group_values(scored, group_by, from_run=from_run) if group_by else None
    metrics = evaluate_predictions(taxonomy, scored.labels, scored.predictions, scored.probs)
    if groups is not None:
        try:
            metrics["groups"] = group_metrics(taxonomy, scored, groups, aggregator=aggregator,
                                              group_scoring=group_scoring, decode=decode, threshold=threshold)
        except DataError as exc:
            raise DataError(f"--group-by {group_by}: {exc}") from None
        metrics["groups"]["group_by"] = group_by
    if ci:
        from hiercls.stats import headline_cis

        metrics["ci"] = headline_cis(taxonomy, scored.labels, scored.predictions, groups=groups)
    metrics.update(_probability_sections(taxonomy, scored, target_accuracy, calibration))
    record = _provenance(taxonomy, scored, provenance)
    metrics["provenance"] = record
    evaluation = Evaluation(taxonomy, scored, groups, json_ready(metrics), json_ready(record))
    return _with_report_sections(evaluation)


def _with_report_sections(evaluation: Evaluation) -> Evaluation:
    """Add the report's numbers (confusion matrices with counts, per-class table with macro / weighted
    rows, denominators, group votes, the misclassified images) so that metrics.json carries them."""
    from hiercls.report_content import report_sections

    evaluation.metrics.update(json_ready(report_sections(evaluation)))
    return evaluation


def _probability_sections(taxonomy: Taxonomy, predictions: PredictionSet, target_accuracy: float | None,
                          calibration: dict[str, Any] | None) -> dict[str, Any]:
    """``calibration``, ``selective`` (and ``selective_target``): what only probabilities can tell."""
    from hiercls.calibration import calibration_section
    from hiercls.selective import selective_table, threshold_for_accuracy

    if predictions.probs is None:
        if target_accuracy is not None:
            raise ConfigError(f"--target-accuracy needs probabilities, but {predictions.source} has no p: columns")
        return {}
    if calibration is None:
        calibration = calibration_section(taxonomy, predictions.labels, predictions.probs, None)
    sections: dict[str, Any] = {"calibration": calibration,
                                "selective": selective_table(taxonomy, predictions.probs, predictions.labels)}
    if target_accuracy is not None:
        row = threshold_for_accuracy(sections["selective"], target_accuracy)
        sections["selective_target"] = {"target": target_accuracy, "threshold": row["threshold"] if row else None,
                                        "row": row}
    return sections


# -- predicting with a run first ---------------------------------------------------------------


def default_checkpoint(split: str | None) -> str:
    """``last`` on the run's own split: ``best`` was chosen on the val images, its score there is optimistic."""
    return "last" if split else "best"


def run_split_subset(table: ImageTable, run_dir: Path, split: str) -> ImageTable:
    """The images of ``table`` that the run used for ``split`` (from RUN/split.json)."""
    from hiercls.inference import read_run_split

    wanted = read_run_split(run_dir)[split]
    keep = [i for i, p in enumerate(table.paths) if str(Path(p).resolve()) in wanted]
    if not keep:
        raise DataError(
            f"none of the images of {table.source or table.root} are in the '{split}' split of {run_dir}; "
            "did the data move? Give --data explicitly"
        )
    return table.subset(keep)


def _check_run_arguments(data: Any, split: str | None, threshold: float | None) -> None:
    if not data and not split:
        raise ConfigError("--run needs --data (the labelled images to evaluate on) or --split val")
    if split not in (None, "val", "train"):
        raise ConfigError(f"--split must be 'val' or 'train', got '{split}'")
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise ConfigError(f"--threshold must lie in [0, 1], got {threshold}")


def _check_taxonomy(expected: str | Path | Taxonomy | None, loaded: LoadedRun, run_dir: Any) -> None:
    """Refuse a tree other than the one the run was trained on (when the caller names one)."""
    if expected is None:
        return
    given = expected if isinstance(expected, Taxonomy) else load_taxonomy(expected)
    if given.fingerprint != loaded.taxonomy.fingerprint:
        raise ConfigError(
            f"--taxonomy {given.source} is not the tree run {run_dir} was trained on; leave --taxonomy out"
        )


def _images_to_score(loaded: LoadedRun, run_dir: Any, data: Any, split: str | None, group_regex: str | None,
                     checkpoint: str) -> tuple[ImageTable, list[str]]:
    """The images to predict (the run's split of them with ``split``) and warnings about optimistic scores."""
    from hiercls.data import load_images, run_exclusions
    from hiercls.inference import run_image_warnings

    source = data or loaded.config.data
    regex = group_regex or (loaded.config.group_regex if not data else None)
    excluded = run_exclusions(loaded.config.taxonomy, loaded.config.exclude, loaded.taxonomy)
    table = load_images(source, loaded.taxonomy, group_regex=regex, require_labels=False, excluded=excluded,
                        excluded_rows="drop")  # images of excluded nodes cannot be scored
    if split:
        return run_split_subset(table, Path(run_dir), split), []
    return table, run_image_warnings(run_dir, table.paths, checkpoint)


def _check_table(table: ImageTable, data: Any, group_by: str | None) -> None:
    if group_by == "group" and not any(table.groups):
        raise DataError(
            f"--group-by group: no image of {data} has a group; give --group-regex or a manifest "
            "with a group column, or leave --group-by out"
        )
    if all(label is None for label in table.labels):
        from hiercls.data.dataset import missing_label_column

        raise DataError(missing_label_column(table) or f"{data}: no image has a label; evaluation needs labelled images")


def evaluate_run(
    run_dir: str | Path,
    *,
    data: str | Path | None = None,
    split: str | None = None,
    checkpoint: str | None = None,
    decode: str | None = None,
    threshold: float | None = None,
    group_by: str | None = None,
    group_regex: str | None = None,
    aggregator: str = "mode",
    group_scoring: str = "groups",
    ci: bool = False,
    batch_size: int | None = None,
    device: str = "auto",
    progress: bool = False,
    console: Console | None = None,
    taxonomy: str | Path | Taxonomy | None = None,
    calibrated: bool = True,
    target_accuracy: float | None = None,
) -> Evaluation:
    """Predict with a trained run, then score the predictions (:func:`evaluate_prediction_set`).

    Parameters
    ----------
    run_dir : str or Path
        A run folder (``hiercls fit --out``, or ``HierarchicalImageClassifier.save``).
    data : str or Path, optional
        Labelled images: class folders or a CSV manifest. Default with ``split``: the run's data.
    split : {"val", "train"}, optional
        Score the run's own validation (or training) images, as listed in ``RUN/split.json``.
    checkpoint : {"best", "last"}, optional
        Default ``last`` with ``split`` (``best`` was chosen on the validation images), else ``best``.
    decode, threshold, group_by, aggregator, group_scoring, ci
        As :func:`evaluate_prediction_set`; without ``decode`` the run's own decoding rule is used.
    group_regex : str, optional
        The group of each image from its file name (default with ``split``: the run's).
    batch_size, device, progress, console
        How to predict; ``console`` (a ``rich.console.Console``) receives progress bars, and when
        given, warnings about images the run has seen are printed on stderr.
    taxonomy : str, Path or Taxonomy, optional
        Refuse the run when it was trained on another tree.
    calibrated : bool
        Apply the run's temperatures (``RUN/calibration.json``, ``hiercls calibrate``) when it has
        them; ``metrics["calibration"]`` gives the ECE before and after either way, and notes when
        the temperatures were fitted on some of the scored images.
    target_accuracy : float, optional
        As :func:`evaluate_prediction_set`.

    Returns
    -------
    Evaluation
        With ``run_dir`` set and ``provenance`` naming the run, checkpoint, epoch and config.
    """
    from hiercls.aggregate import get_aggregator
    from hiercls.inference import decode as run_decode
    from hiercls.inference import load_run, predict_table

    _check_run_arguments(data, split, threshold)
    get_aggregator(aggregator)  # an unknown name fails before any work
    which = checkpoint or default_checkpoint(split)
    loaded = load_run(run_dir, which=which)
    _check_taxonomy(taxonomy, loaded, run_dir)
    table, warnings = _images_to_score(loaded, run_dir, data, split, group_regex, which)
    if console is not None:
        from rich.console import Console

        for line in warnings:
            Console(stderr=True).print(f"[yellow]warning:[/] {line}", highlight=False)
    _check_table(table, data, group_by)
    raw = predict_table(loaded, table, batch_size=batch_size, device=device, console=console, progress=progress,
                        calibrated=False)
    probs, calibration, notes = _calibrated(loaded, run_dir, table, raw, calibrated)
    decoded = run_decode(probs, loaded.config)  # the run's rule; evaluate_prediction_set applies ``decode``
    source = data or loaded.config.data
    predictions = PredictionSet([str(p) for p in table.paths], list(table.labels), list(table.groups), decoded, probs,
                                source=str(source))
    evaluation = evaluate_prediction_set(
        loaded.taxonomy, predictions, group_by=group_by, aggregator=aggregator, group_scoring=group_scoring,
        decode=decode, threshold=threshold, ci=ci,
        provenance={**run_provenance(loaded, which, split, source), "predictions": None}, from_run=True,
        target_accuracy=target_accuracy, calibration=calibration,
    )
    return dataclasses.replace(_with_run_fields(evaluation, loaded.run_dir, warnings + notes), loaded_run=loaded)


def _calibrated(loaded: LoadedRun, run_dir: Any, table: ImageTable, raw: Any, calibrated: bool):
    """The probabilities to score (the run's temperatures applied when asked), the calibration
    section of the metrics, and a note when the temperatures were fitted on scored images."""
    from hiercls.calibration import apply_temperatures, calibration_overlap, calibration_section

    payload = loaded.calibration if calibrated else None
    overlap = calibration_overlap(run_dir, table.paths) if payload else 0
    section = calibration_section(loaded.taxonomy, list(table.labels), raw, payload, overlap)
    probs = apply_temperatures(raw, payload["temperatures"]) if payload else raw
    return probs, section, list(section["notes"])


def _with_run_fields(evaluation: Evaluation, run_dir: Path, warnings: list[str]) -> Evaluation:
    """The run's warnings among the notes, and the top-level run/checkpoint/epoch/split keys of metrics.json."""
    metrics = dict(evaluation.metrics)
    provenance = metrics.pop("provenance")
    metrics["notes"] = list(metrics["notes"]) + warnings
    for key in ("run", "checkpoint", "epoch", "split"):
        metrics[key] = provenance.get(key)
    metrics["provenance"] = provenance
    return dataclasses.replace(evaluation, metrics=metrics, run_dir=Path(run_dir))


# -- writing -------------------------------------------------------------------------------------


def write_evaluation(
    evaluation: Evaluation,
    out_dir: str | Path,
    *,
    title: str = "Evaluation report",
    explain_panels: dict[str, bytes] | None = None,
) -> dict[str, Path]:
    """Write ``metrics.json``, ``report.md``, ``report.html``, the figures and, for a run, ``predictions.csv``.

    Every file is written atomically; existing files of those names are replaced (the command
    line refuses them first unless ``--overwrite``). ``explain_panels`` (image path -> PNG, e.g.
    from :func:`misclassified_panels`) puts Grad-CAM panels beside the misclassified images of
    ``report.html``. Returns file name -> path.
    """
    from hiercls.io import atomic_write_json
    from hiercls.predictions import write_predictions_csv
    from hiercls.report import write_reports

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    preds = evaluation.predictions
    figures_before = _figure_signatures(out)
    written: dict[str, Path] = {}
    if evaluation.run_dir is not None:
        written["predictions.csv"] = write_predictions_csv(
            out / "predictions.csv", preds.probs, preds.paths, preds.labels, preds.groups, preds.predictions
        )
    atomic_write_json(out / "metrics.json", evaluation.metrics)
    written["metrics.json"] = out / "metrics.json"
    reports = write_reports(evaluation, out, title=title, explain_panels=explain_panels)
    written.update({name: path for name, path in reports.items() if not name.endswith(".png")})
    for name, signature in sorted(_figure_signatures(out).items()):
        if figures_before.get(name) != signature:  # written now, not left from an earlier evaluation
            written[name] = out / name
    return written


def misclassified_panels(
    evaluation: Evaluation, *, limit: int = 24, device: str = "auto", checkpoint: str | None = None
) -> dict[str, bytes]:
    """Grad-CAM panels (PNG bytes) of the first ``limit`` misclassified images of a run's evaluation.

    Each panel shows one heatmap per decision on the *predicted* path, titled with the true label,
    so the report can show where the model looked when it went wrong.
    """
    from hiercls.explain import panels_for_images
    from hiercls.inference import load_run

    if evaluation.run_dir is None:
        raise ConfigError("--explain needs --run: Grad-CAM panels are drawn with the run's model")
    rows = (evaluation.metrics.get("misclassified") or {}).get("rows") or []
    if not rows or limit <= 0:
        return {}
    scored_with = evaluation.provenance.get("checkpoint")
    which = checkpoint or scored_with or "best"
    loaded = evaluation.loaded_run
    if loaded is None or which != scored_with:
        loaded = load_run(evaluation.run_dir, which=which)
    chosen = rows[:limit]
    titles = {row["path"]: f"{Path(row['path']).name}: true {row['label']}, predicted" for row in chosen}
    return panels_for_images(loaded, [row["path"] for row in chosen], titles=titles, device=device)


def _figure_signatures(folder: Path) -> dict[str, tuple[int, int]]:
    """PNG name -> (inode, mtime): the report replaces figures atomically, so both change when one is written."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.glob("*.png") if p.is_file()}
