"""``hiercls evaluate``: metrics, group-level metrics and a report from predictions or a trained run.

Every command module is imported to build ``hiercls --help``, so the heavy imports (scikit-learn,
matplotlib, torch) happen inside ``run``, not here.
"""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from hiercls.aggregate import GROUP_SCORINGS, get_aggregator, group_column_title
from hiercls.cli import add_command
from hiercls.errors import ConfigError, DataError
from hiercls.io import json_ready
from hiercls.probabilities import DECODE_METHODS
from hiercls.taxonomy import Taxonomy, load_taxonomy

if TYPE_CHECKING:
    from hiercls.predictions import PredictionSet

console = Console()


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
            "level. Writes OUT/metrics.json, OUT/report.md and confusion-matrix PNGs.",
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
    parser.add_argument("--title", default="Evaluation report", help="title of report.md")
    parser.add_argument("--ci", action="store_true", help="95%% bootstrap confidence intervals of accuracy, macro-F1 "
                        "and hP/hR/hF (over groups with --group-by; docs/statistics.md)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT/metrics.json and report")
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
    if args.group_scoring and not args.group_by:
        raise ConfigError("--group-scoring goes with --group-by: it says how the groups' predictions are scored")


def _checkpoint(args: argparse.Namespace) -> str:
    """``last`` on the run's own split: ``best`` was chosen on the val images, its score there is optimistic."""
    return args.checkpoint or ("last" if args.split else "best")


def _output_dir(args: argparse.Namespace) -> Path:
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a folder; choose a folder")
    owned = [out / "metrics.json", out / "report.md"] + ([out / "predictions.csv"] if args.run else [])
    existing = [p for p in owned if p.exists()]
    if existing and not args.overwrite:
        raise ConfigError(
            f"{existing[0]} already exists; pass --overwrite to replace it or choose another --out"
        )
    return out


def _predict_with_run(args: argparse.Namespace, out: Path) -> tuple[Taxonomy, PredictionSet, dict[str, Any]]:
    """Predict with the run; also returns what metrics.json records of it (run, checkpoint, epoch, notes)."""
    from hiercls.data import load_images
    from hiercls.inference import decode, load_run, predict_table, run_image_warnings
    from hiercls.predictions import PredictionSet, write_predictions_csv

    checkpoint = _checkpoint(args)
    loaded = load_run(args.run, which=checkpoint)
    taxonomy = loaded.taxonomy
    if args.taxonomy:
        given = load_taxonomy(args.taxonomy)
        if given.fingerprint != taxonomy.fingerprint:
            raise ConfigError(
                f"--taxonomy {args.taxonomy} is not the tree run {args.run} was trained on; leave --taxonomy out"
            )
    data = args.data or loaded.config.data
    group_regex = args.group_regex or (loaded.config.group_regex if not args.data else None)
    table = load_images(data, taxonomy, group_regex=group_regex, require_labels=False)
    warnings: list[str] = []
    if args.split:
        table = _split_subset(table, Path(args.run), args.split)
    else:
        warnings = run_image_warnings(args.run, table.paths, checkpoint)
    for line in warnings:
        Console(stderr=True).print(f"[yellow]warning:[/] {line}", highlight=False)
    if args.group_by == "group" and not any(table.groups):
        raise DataError(
            f"--group-by group: no image of {args.data} has a group; give --group-regex or a manifest "
            "with a group column, or leave --group-by out"
        )
    if all(label is None for label in table.labels):
        raise DataError(f"{args.data}: no image has a label; evaluation needs labelled images")
    probs = predict_table(loaded, table, batch_size=args.batch_size, device=args.device, console=console,
                          progress=getattr(args, "progress", True))
    predictions = probs.decode(args.decode, args.threshold) if args.decode else decode(probs, loaded.config)
    paths = [str(p) for p in table.paths]
    labels, groups = list(table.labels), list(table.groups)
    csv_path = write_predictions_csv(out / "predictions.csv", probs, paths, labels, groups, predictions)
    console.print(f"wrote {csv_path} (the {checkpoint} checkpoint, epoch {loaded.metadata.get('epoch')})")
    source = {"run": str(loaded.run_dir), "checkpoint": checkpoint, "epoch": loaded.metadata.get("epoch"),
              "split": args.split, "warnings": warnings}
    return taxonomy, PredictionSet(paths, labels, groups, predictions, probs, source=str(data)), source


def _split_subset(table, run_dir: Path, split: str):
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


def _group_values(preds: PredictionSet, column: str, from_run: bool) -> list[str | None]:
    """The group of every row, from the ``group`` column or another column of the CSV."""
    if column == "group":
        values = preds.groups
    elif column in preds.extra:
        values = [v or None for v in preds.extra[column]]
    else:
        available = ", ".join(["group", *preds.extra])
        raise ConfigError(f"--group-by {column}: {preds.source} has no column '{column}' (available: {available})")
    if all(v is None for v in values):
        hint = " (or give --group-regex)" if from_run else ""
        raise DataError(
            f"--group-by {column}: no row of {preds.source} has a {column} value; fill the column{hint} "
            "or leave --group-by out"
        )
    return list(values)


def _group_metrics(
    taxonomy: Taxonomy,
    preds: PredictionSet,
    pred_nodes: list[str],
    groups: list[str | None],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Aggregate per group (images without a group value are left out) and evaluate the groups."""
    from hiercls.aggregate import evaluate_groups

    options = {"decode": args.decode or "greedy", "threshold": args.threshold} if args.aggregator == "mean" else {}
    try:
        metrics = evaluate_groups(
            taxonomy, groups, preds.labels, pred_nodes, preds.probs,
            get_aggregator(args.aggregator, **options), args.aggregator, scoring=args.group_scoring or "groups",
        )
    except DataError as exc:
        raise DataError(f"--group-by {args.group_by}: {exc}") from None
    metrics["group_by"] = args.group_by
    return metrics


def _fmt(value: Any) -> str:
    return "–" if value is None else (f"{value:.4f}" if isinstance(value, float) else str(value))


def _print_summary(metrics: dict[str, Any], taxonomy: Taxonomy, out: Path) -> None:
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
    for note in metrics["notes"]:
        console.print(f"[dim]note: {note}[/]", highlight=False)
    for note in (groups or {}).get("notes", []):
        console.print(f"[dim]note (groups): {note}[/]", highlight=False)
    console.print(f"wrote {out / 'metrics.json'} and {out / 'report.md'}")


# -- the command ----------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    from hiercls.io import atomic_write_json
    from hiercls.metrics import evaluate_predictions
    from hiercls.predictions import read_predictions_csv
    from hiercls.report import write_report

    _check_args(args)
    out = _output_dir(args)
    get_aggregator(args.aggregator)  # fail on an unknown name before any work

    run_source: dict[str, Any] = {}
    if args.predictions:
        taxonomy = load_taxonomy(args.taxonomy)
        preds = read_predictions_csv(args.predictions, taxonomy)
    else:
        taxonomy, preds, run_source = _predict_with_run(args, out)
    if len(preds) == 0:
        raise DataError(f"{preds.source}: no rows to evaluate")
    if all(label is None for label in preds.labels):
        raise DataError(
            f"{preds.source}: no row has a label; evaluation compares predictions with true labels "
            "(fill the label column, or give labelled data)"
        )

    pred_nodes = list(preds.predictions)
    if args.decode:
        if preds.probs is None:
            raise ConfigError(f"--decode {args.decode} needs probabilities, but {preds.source} has no p: columns")
        pred_nodes = preds.probs.decode(args.decode, args.threshold)

    groups = _group_values(preds, args.group_by, from_run=bool(args.run)) if args.group_by else None
    metrics = evaluate_predictions(taxonomy, preds.labels, pred_nodes, preds.probs)
    if groups is not None:
        metrics["groups"] = _group_metrics(taxonomy, preds, pred_nodes, groups, args)
    if args.ci:
        from hiercls.stats import headline_cis

        metrics["ci"] = headline_cis(taxonomy, preds.labels, pred_nodes, groups=groups)
    if run_source:
        metrics["notes"] += run_source.pop("warnings")
        metrics.update(run_source)  # which model made the numbers: run, checkpoint, epoch, split

    metrics = json_ready(metrics)
    atomic_write_json(out / "metrics.json", metrics)
    labelled = [i for i, t in enumerate(preds.labels) if t is not None]
    write_report(
        out, metrics, taxonomy, [preds.labels[i] for i in labelled], [pred_nodes[i] for i in labelled], title=args.title
    )
    _print_summary(metrics, taxonomy, out)
    if args.ci:
        from hiercls.stats import ci_lines

        for line in ci_lines(metrics["ci"]):
            console.print(line, highlight=False)
    return 0
