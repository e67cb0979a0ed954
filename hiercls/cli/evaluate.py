"""``hiercls evaluate``: metrics, group-level metrics and a report from predictions or a trained run.

Every command module is imported to build ``hiercls --help``, so the heavy imports (scikit-learn,
matplotlib, torch) happen inside ``run``, not here.
"""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path
from typing import Any

from rich.table import Table

from hiercls.aggregate import GROUP_SCORINGS, get_aggregator, group_column_title
from hiercls.cli import add_command
from hiercls.console import make_console
from hiercls.errors import ConfigError
from hiercls.probabilities import DECODE_METHODS
from hiercls.taxonomy import Taxonomy, load_taxonomy

console = make_console(stderr=False)


def register(subparsers) -> None:
    parser = add_command(
        subparsers,
        "evaluate",
        help="metrics and a report from a predictions CSV or a trained run",
        description=textwrap.fill(
            "Compute flat and hierarchical metrics (accuracy, macro-F1, hP/hR/hF, per-level accuracy, "
            "per-class P/R/F1, AUROC per node, mistake severity, calibration) from a predictions CSV "
            "(as written by `hiercls predict`), or predict with a trained run first. With --group-by, "
            "image predictions are also aggregated per group (slide, patient) and scored at group "
            "level. Writes OUT/metrics.json, OUT/report.md, a self-contained OUT/report.html and PNG figures.",
            width=88,
        ),
        example_lines=(
            "hiercls evaluate --predictions preds.csv --taxonomy taxonomy/leukemia.yaml --out eval/",
            "hiercls evaluate --predictions preds.csv --taxonomy T.yaml --out eval/ --group-by group --aggregator mean",
            "hiercls evaluate --predictions preds.csv --taxonomy T.yaml --out eval/ --decode threshold --threshold 0.7",
            "hiercls evaluate --run runs/joint --data test_manifest.csv --out runs/joint/eval --group-by group",
            "hiercls evaluate --run runs/joint --split val --out runs/joint/eval-val   # the run's own validation images",
            "hiercls evaluate --predictions preds.csv --taxonomy T.yaml --out eval/ --group-by group --group-scoring images",
        ),
    )
    source = parser.add_argument_group("what to evaluate (give --predictions or --run)")
    source.add_argument("--predictions", metavar="CSV", help="predictions CSV: path,label,group,prediction,p:<node>...")
    source.add_argument("--taxonomy", metavar="YAML", help="tree the predictions were made with (for --predictions)")
    source.add_argument("--run", metavar="RUN", help="trained run directory to predict with")
    source.add_argument("--data", metavar="PATH", help="images to predict with --run: class folders or a CSV manifest")
    source.add_argument(
        "--split", choices=("val", "train"),
        help="with --run: evaluate on the run's own validation (or training) images, as saved in RUN/split.json; "
        "--data defaults to the run's data",
    )
    source.add_argument(
        "--checkpoint", choices=("best", "last"), default=None,
        help="checkpoint of --run; default last with --split (best was chosen on the run's validation "
        "images, so its score there is optimistic), best with --data",
    )
    source.add_argument("--group-regex", metavar="REGEX", help="with --run: group of each image from its file name")
    source.add_argument("--batch-size", type=int, metavar="N", help="with --run: batch size for prediction")
    source.add_argument("--device", default="auto", help="with --run: auto, cpu, cuda or cuda:N (default: auto)")
    source.add_argument(
        "--explain", type=int, nargs="?", const=24, default=0, metavar="N",
        help="with --run: Grad-CAM panels of the first N misclassified images (default 24) beside their "
        "thumbnails in report.html",
    )
    source.add_argument("--no-calibration", dest="calibrated", action="store_false",
                        help="with --run: score the raw probabilities, not those calibrated by `hiercls calibrate`")

    parser.add_argument("--out", required=True, metavar="DIR", help="folder for metrics.json, report.md and figures")
    parser.add_argument("--group-by", metavar="COLUMN", help="also evaluate per group of this column (e.g. group)")
    parser.add_argument(
        "--aggregator", default="mode", metavar="NAME",
        help="how a group's images make one prediction: mode, mean or a plugin's "
        "(`hiercls plugins --aggregators`; default: mode)",
    )
    parser.add_argument(
        "--group-scoring", choices=GROUP_SCORINGS, default=None,
        help="with --group-by: score one row per group (groups, the default), or every image with its "
        "group's prediction (images: the per-slide vote counted in images)",
    )
    parser.add_argument(
        "--decode", choices=DECODE_METHODS,
        help="re-decode predictions from the probabilities (default: the CSV's prediction column / the run's rule)",
    )
    parser.add_argument(
        "--threshold", type=float, default=0.5, help="stop threshold of --decode threshold (default 0.5)"
    )
    parser.add_argument(
        "--target-accuracy", type=float, metavar="A",
        help="name the smallest stop threshold of the threshold decoder whose accuracy on the images it decides "
        "to a leaf reaches A (e.g. 0.95), with the share of images it decides (docs/metrics.md)",
    )
    parser.add_argument("--title", default="Evaluation report", help="title of report.md")
    parser.add_argument("--ci", action="store_true", help="95%% bootstrap confidence intervals of accuracy, macro-F1 "
                        "and hP/hR/hF (over groups with --group-by; docs/statistics.md)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the files of an earlier evaluation in OUT (metrics.json, report.md, "
                        "report.html, predictions.csv, the PNG figures); without it, any of them is refused")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="with --run: no progress bars while images are decoded and predicted (logs)")
    parser.set_defaults(func=run)


# -- helpers --------------------------------------------------------------------------------


def _check_args(args: argparse.Namespace) -> None:
    if bool(args.predictions) == bool(args.run):
        raise ConfigError("give either --predictions CSV (with --taxonomy) or --run RUN (with --data), not both")
    if args.predictions and not args.taxonomy:
        raise ConfigError("--predictions needs --taxonomy: the tree the predictions were made with")
    if args.run and not args.data and not args.split:
        raise ConfigError("--run needs --data (the labelled images to evaluate on) or --split val")
    if args.split and not args.run:
        raise ConfigError("--split goes with --run: it selects the run's own validation or training images")
    if args.predictions and (args.data or args.group_regex):
        raise ConfigError("--data and --group-regex go with --run; a predictions CSV names its images and groups")
    if not 0.0 <= args.threshold <= 1.0:
        raise ConfigError(f"--threshold must lie in [0, 1], got {args.threshold}")
    if args.target_accuracy is not None and not 0.0 <= args.target_accuracy <= 1.0:
        raise ConfigError(f"--target-accuracy must lie in [0, 1], got {args.target_accuracy}")
    if args.explain and not args.run:
        raise ConfigError("--explain goes with --run: Grad-CAM panels are drawn with the run's model")
    if args.explain < 0:
        raise ConfigError(f"--explain N needs N >= 0, got {args.explain}")
    if not args.calibrated and not args.run:
        raise ConfigError("--no-calibration goes with --run: a predictions CSV holds the probabilities it was given")
    if args.group_scoring and not args.group_by:
        raise ConfigError("--group-scoring goes with --group-by: it says how the groups' predictions are scored")


def _output_dir(args: argparse.Namespace) -> Path:
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a folder; choose a folder")
    if not args.overwrite:
        existing = next((path for path in _owned_files(out, run=bool(args.run)) if path.exists()), None)
        if existing is not None:
            raise ConfigError(f"{existing} already exists; pass --overwrite to replace it or choose another --out")
    return out


def _owned_files(out: Path, *, run: bool) -> list[Path]:
    """Every file ``evaluate`` may write into OUT, in a fixed order, known before any work.

    Which confusion matrices are drawn depends on the predictions, so every existing
    ``confusion_at_*.png`` counts as one (the name pattern is the report's own).
    """
    from hiercls.figures import FIGURE_NAMES, confusion_figure_name

    names = ["metrics.json", "report.md", "report.html"] + (["predictions.csv"] if run else [])
    files = [out / name for name in names + list(FIGURE_NAMES.values())]
    if out.is_dir():
        files += sorted(out.glob(confusion_figure_name("*")))
    return files


def _fmt(value: Any) -> str:
    return "–" if value is None else (f"{value:.4f}" if isinstance(value, float) else str(value))


def _print_summary(metrics: dict[str, Any], taxonomy: Taxonomy, out: Path, not_calibrated: str) -> None:
    groups = metrics.get("groups")
    table = Table(title="evaluation", show_header=True, header_style="bold")
    table.add_column("metric")
    table.add_column("images", justify="right")
    if groups:
        table.add_column(group_column_title(groups), justify="right")
    auroc = lambda m: (m.get("auroc") or {}).get("leaf_macro")  # noqa: E731
    rows = [
        ("n", lambda m: m["n_images"] if m.get("scoring") == "images" else m.get("n_groups", m["n_images"])),
        ("accuracy", lambda m: m["accuracy"]),
        ("macro-F1", lambda m: m["macro_f1"]),
        ("hP", lambda m: m["hP"]),
        ("hR", lambda m: m["hR"]),
        ("hF", lambda m: m["hF"]),
        ("AUROC (leaves)", auroc),
        ("mistake severity", lambda m: m["mistake_severity"]["mean_distance"]),
    ]
    for depth in (metrics.get("depth_accuracy") or {}):
        if int(depth) < taxonomy.max_depth:  # the deepest cut is the leaf accuracy above
            rows.append((f"accuracy, tree cut at depth {depth}",
                         lambda m, depth=depth: (m.get("depth_accuracy") or {}).get(depth)))
    for node, value in metrics["per_level_accuracy"].items():
        decision = f"{node}: " + " vs ".join(taxonomy.children(node))
        if metrics.get("decision_accuracy"):
            rows.append((f"acc {decision} (own subtree)",
                         lambda m, node=node: (m.get("decision_accuracy") or {}).get(node)))
        rows.append((f"acc {decision} (end to end)", lambda m, node=node: m["per_level_accuracy"].get(node)))
    for name, get in rows:
        cells = [_fmt(get(metrics))] + ([_fmt(get(groups))] if groups else [])
        table.add_row(name, *cells)
    console.print(table)
    for line in _probability_lines(metrics, not_calibrated):
        console.print(line, highlight=False)
    for note in metrics["notes"]:
        console.print(f"[dim]note: {note}[/]", highlight=False)
    for note in (groups or {}).get("notes", []):
        console.print(f"[dim]note (groups): {note}[/]", highlight=False)
    console.print(f"wrote {out / 'metrics.json'} and {out / 'report.md'}")
    console.print(f"report: {(out / 'report.html').resolve()} (open it in a browser)", highlight=False)


def _probability_lines(metrics: dict[str, Any], not_calibrated: str) -> list[str]:
    """ECE before / after calibration and the threshold that keeps the target accuracy, when known.

    ``not_calibrated`` (from :func:`_why_not_calibrated`) follows the ECE when there is no "after".
    """
    lines = []
    calibration = metrics.get("calibration") or {}
    before = (calibration.get("ece_before") or {}).get("overall")
    if before is not None:
        after = (calibration.get("ece_after") or {}).get("overall")
        lines.append(f"ECE (leaves) {before:.4f}" + (f" -> {after:.4f} after calibration" if after is not None else
                                                      f" ({not_calibrated})"))
    target = metrics.get("selective_target")
    if target:
        row = target["row"]
        lines.append(f"target accuracy {target['target']:.3f}: " + (
            f"threshold {row['threshold']:.2f} decides {row['coverage']:.1%} of the images to a leaf "
            f"({row['n_decided']} of {row['n']}), accuracy {row['accuracy']:.4f} on them" if row else
            "no threshold reaches it (see the selective table in the report)"))
    return lines


def _why_not_calibrated(args: argparse.Namespace, evaluation: Any) -> str:
    """Why the scored probabilities carry no temperatures, and the command that would give them.

    ``calibrate`` fits one checkpoint (best by default, as ``predict`` uses), while
    ``evaluate --split`` scores last by default: name the mismatch rather than repeat a command
    the user may have just run.
    """
    if not args.run:
        return "the CSV's probabilities as given"
    if not args.calibrated:
        return "raw probabilities: --no-calibration"
    from hiercls.calibration import CALIBRATION_FILE, read_calibration

    run, which = evaluation.run_dir, evaluation.provenance.get("checkpoint")
    command = f"`hiercls calibrate --run {args.run} --checkpoint {which}`"
    fitted = read_calibration(run, evaluation.taxonomy)
    if fitted is None:
        return f"not calibrated: {command} fits temperatures"
    if fitted.get("checkpoint") != which:
        return (f"not calibrated: {Path(args.run) / CALIBRATION_FILE} was fitted on the {fitted.get('checkpoint')} "
                f"checkpoint and this is the {which} one; {command} calibrates it, or --checkpoint "
                f"{fitted.get('checkpoint')} evaluates the calibrated one")
    loaded = getattr(evaluation, "loaded_run", None)
    current_id = (loaded.metadata if loaded is not None else {}).get("checkpoint_id")
    if fitted.get("checkpoint_id") and current_id and fitted.get("checkpoint_id") != current_id:
        return (f"not calibrated: {Path(args.run) / CALIBRATION_FILE} was fitted on an earlier {which} checkpoint "
                f"(the run trained on since); run {command} again")
    return "not calibrated"


# -- the command ----------------------------------------------------------------------------


def _evaluate(args: argparse.Namespace):
    """The Evaluation of a predictions CSV, or of a run's predictions on --data / --split."""
    from hiercls.evaluation import evaluate_prediction_set, evaluate_run
    from hiercls.predictions import read_predictions_csv

    scoring = {"decode": args.decode, "threshold": args.threshold, "group_by": args.group_by,
               "aggregator": args.aggregator, "group_scoring": args.group_scoring or "groups", "ci": args.ci,
               "target_accuracy": args.target_accuracy}
    if args.predictions:
        taxonomy = load_taxonomy(args.taxonomy)
        return evaluate_prediction_set(taxonomy, read_predictions_csv(args.predictions, taxonomy), **scoring)
    return evaluate_run(
        args.run, data=args.data, split=args.split, checkpoint=args.checkpoint, group_regex=args.group_regex,
        batch_size=args.batch_size, device=args.device, progress=args.progress, console=console,
        taxonomy=args.taxonomy, calibrated=args.calibrated, **scoring,
    )


def run(args: argparse.Namespace) -> int:
    from hiercls.evaluation import misclassified_panels, write_evaluation

    _check_args(args)
    out = _output_dir(args)
    get_aggregator(args.aggregator)  # fail on an unknown name before any work
    evaluation = _evaluate(args)
    panels = misclassified_panels(evaluation, limit=args.explain, device=args.device) if args.explain else None
    written = write_evaluation(evaluation, out, title=args.title, explain_panels=panels)
    metrics = evaluation.metrics
    if "predictions.csv" in written:
        console.print(f"wrote {written['predictions.csv']} (the {metrics['checkpoint']} checkpoint, "
                      f"epoch {metrics['epoch']})")
    _print_summary(metrics, evaluation.taxonomy, out, _why_not_calibrated(args, evaluation))
    if args.ci:
        from hiercls.stats import ci_lines

        for line in ci_lines(metrics["ci"]):
            console.print(line, highlight=False)
    return 0
