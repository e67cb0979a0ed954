"""``hiercls compare``: are two prediction sets on the same images really different?

Every command module is imported to build ``hiercls --help``, so scipy, scikit-learn and the
statistics happen inside ``run``, not here.
"""

from __future__ import annotations

import argparse
import glob
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.table import Table

from hiercls.cli import add_command
from hiercls.console import make_console
from hiercls.errors import ConfigError, DataError
from hiercls.taxonomy import Taxonomy, load_taxonomy

if TYPE_CHECKING:
    from hiercls.predictions import PredictionSet

console = make_console(stderr=False)
PREDICTIONS = "predictions.csv"
_EXAMPLES_SHOWN = 3  # paths named in a "not the same images" error


def register(subparsers) -> None:
    parser = add_command(
        subparsers,
        "compare",
        help="paired comparison of two prediction sets on the same images (CI of B−A, McNemar)",
        description=textwrap.fill(
            "Compare prediction set B with A on the same labelled images: accuracy, macro-F1 and hF of "
            "each, the difference B−A with a 95% paired bootstrap confidence interval (the same images, "
            "or groups with --group-by, drawn for both), and McNemar's exact test on the images one set "
            "gets right and the other wrong. A and B are predictions CSVs (from `hiercls predict` or "
            "`hiercls evaluate --run`), folders holding predictions.csv (an evaluation's --out, a run "
            "with eval/predictions.csv, a cv cell), or a cv model folder with fold*/predictions.csv "
            "(folds are matched by name and pooled); a quoted pattern pools every match (cv seeds). "
            "See docs/statistics.md.",
            width=88,
        ),
        example_lines=(
            "hiercls compare runs/flat/eval/predictions.csv runs/joint/eval/predictions.csv --taxonomy T.yaml",
            "hiercls compare runs/flat runs/joint --out runs/flat-vs-joint   # RUN/eval/predictions.csv",
            "hiercls compare runs/cv/flat__resnet18 runs/cv/joint__resnet18 --group-by group   # cv folds, pooled",
            "hiercls compare 'runs/cv/seed*/flat__resnet18' 'runs/cv/seed*/joint__resnet18'   # cv seeds, pooled",
        ),
    )
    parser.add_argument("a", metavar="A", help="predictions CSV or folder of the reference set")
    parser.add_argument("b", metavar="B", help="predictions CSV or folder of the set compared with A")
    parser.add_argument("--taxonomy", metavar="YAML",
                        help="tree the predictions were made with (default: taxonomy.yaml of the run folder)")
    parser.add_argument("--group-by", metavar="COLUMN",
                        help="resample groups of this column (e.g. group: slide / patient) instead of images")
    parser.add_argument("--resamples", type=int, default=1000, metavar="N", help="bootstrap resamples (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap (default 0)")
    parser.add_argument("--out", metavar="DIR", help="also write DIR/comparison.json")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing DIR/comparison.json")
    parser.set_defaults(func=run)


# -- finding and reading the prediction sets ------------------------------------------------


def prediction_files(arg: str) -> dict[str, Path]:
    """``{unit: CSV}``: one unnamed unit for a file or run folder, one per fold (and seed) for a cv model folder.

    A pattern (``runs/cv/seed*/joint__resnet18``) pools every match; its units are named by the parts
    the wildcards matched (``seed0/fold1``), so A and B pair up when their patterns match alike.
    """
    if glob.has_magic(arg):
        return _pattern_files(arg)
    path = Path(arg)
    if path.is_file():
        return {"": path}
    if not path.is_dir():
        raise DataError(f"{arg}: no such file or folder; give a predictions CSV or a folder holding {PREDICTIONS}")
    for candidate in (path / PREDICTIONS, path / "eval" / PREDICTIONS):
        if candidate.is_file():
            return {"": candidate}
    nested = sorted([*path.glob(f"fold*/{PREDICTIONS}"), *path.glob(f"seed*/fold*/{PREDICTIONS}")])
    if nested:
        return {f.parent.relative_to(path).as_posix(): f for f in nested}
    raise DataError(
        f"{arg}: no {PREDICTIONS} in it, in {arg}/eval/ or in {arg}/fold*/; run `hiercls evaluate --run {arg} "
        f"--split val --out {arg}/eval` first, or give the predictions CSV"
    )


def _pattern_files(pattern: str) -> dict[str, Path]:
    matches = sorted(glob.glob(pattern))
    if not matches:
        raise DataError(f"{pattern}: matches no file or folder")
    wild = [i for i, part in enumerate(Path(pattern).parts) if glob.has_magic(part)]
    files: dict[str, Path] = {}
    for match in matches:
        parts = Path(match).parts
        prefix = "/".join(parts[i] for i in wild if i < len(parts))
        for unit, csv_path in prediction_files(match).items():
            files["/".join(p for p in (prefix, unit) if p)] = csv_path
    return files


def _taxonomy_near(csv_path: Path) -> Path | None:
    """The run's taxonomy.yaml next to the CSV or one folder up (RUN/eval/predictions.csv)."""
    for folder in (csv_path.parent, csv_path.parent.parent):
        if (folder / "taxonomy.yaml").is_file():
            return folder / "taxonomy.yaml"
    return None


def resolve_taxonomy(given: str | None, files_a: dict[str, Path], files_b: dict[str, Path]) -> Taxonomy:
    if given:
        return load_taxonomy(given)
    found = [p for p in (_taxonomy_near(f) for f in [*files_a.values(), *files_b.values()]) if p is not None]
    if not found:
        raise ConfigError("no taxonomy.yaml next to the predictions; give --taxonomy (the tree they were made with)")
    trees = [load_taxonomy(p) for p in dict.fromkeys(found)]
    if len({t.fingerprint for t in trees}) > 1:
        raise ConfigError(
            f"{found[0]} and another run's taxonomy.yaml differ; A and B must be predicted on the same tree "
            "(give --taxonomy to check both against one tree)"
        )
    return trees[0]


def _rows_by_path(preds: PredictionSet) -> dict[str, int]:
    index: dict[str, int] = {}
    for i, path in enumerate(preds.paths):
        if path in index:
            raise DataError(f"{preds.source}: image {path} appears twice; each image needs one row")
        index[path] = i
    return index


def _check_same_images(a: PredictionSet, b: PredictionSet, rows_a: dict[str, int], rows_b: dict[str, int]) -> None:
    only_a = [p for p in rows_a if p not in rows_b]
    only_b = [p for p in rows_b if p not in rows_a]
    if only_a or only_b:
        examples = ", ".join([*only_a[:_EXAMPLES_SHOWN], *only_b[:_EXAMPLES_SHOWN]])
        raise DataError(
            f"{a.source} and {b.source} are not on the same images: {len(only_a)} only in A, "
            f"{len(only_b)} only in B, {len(rows_a) - len(only_a)} in both (e.g. {examples}); "
            "predict both on the same images (same data, same split)"
        )
    for path, i in rows_a.items():
        label_a, label_b = a.labels[i], b.labels[rows_b[path]]
        if label_a is not None and label_b is not None and label_a != label_b:
            raise DataError(
                f"image {path} is labelled {label_a} in {a.source} but {label_b} in {b.source}; "
                "compare predictions on the same labelled data"
            )


def _group_column(preds: PredictionSet, column: str) -> list[str | None]:
    if column == "group":
        return list(preds.groups)
    if column in preds.extra:
        return [v or None for v in preds.extra[column]]
    available = ", ".join(["group", *preds.extra])
    raise ConfigError(f"--group-by {column}: {preds.source} has no column '{column}' (available: {available})")


def paired_rows(
    taxonomy: Taxonomy, files_a: dict[str, Path], files_b: dict[str, Path], group_by: str | None
) -> dict[str, list[Any]]:
    """Labels, both predictions, clusters and groups, row i of A paired with row i of B, all units pooled."""
    from hiercls.predictions import read_predictions_csv

    if set(files_a) != set(files_b):
        raise DataError(
            f"A has folds {', '.join(sorted(files_a)) or '(one file)'} but B has "
            f"{', '.join(sorted(files_b)) or '(one file)'}; compare runs of the same folds"
        )
    out: dict[str, list[Any]] = {"labels": [], "a": [], "b": [], "clusters": [], "groups": []}
    for unit in sorted(files_a):
        a, b = read_predictions_csv(files_a[unit], taxonomy), read_predictions_csv(files_b[unit], taxonomy)
        rows_a, rows_b = _rows_by_path(a), _rows_by_path(b)
        _check_same_images(a, b, rows_a, rows_b)
        groups = _group_column(a, group_by) if group_by else list(a.groups)
        for path, i in rows_a.items():
            j = rows_b[path]
            out["labels"].append(a.labels[i] if a.labels[i] is not None else b.labels[j])
            out["a"].append(a.predictions[i])
            out["b"].append(b.predictions[j])
            out["groups"].append(groups[i])
            # Copies of one image (several seeds) or of one group are drawn together.
            out["clusters"].append(("group", groups[i]) if group_by and groups[i] is not None else ("image", path))
    return out


# -- the command ----------------------------------------------------------------------------


def _fmt(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "–"
    return f"{value:+.4f}" if signed else f"{value:.4f}"


def _print_result(result: dict[str, Any], label_a: str, label_b: str) -> None:
    boot = result["bootstrap"]
    table = Table(title=f"B − A  (A = {label_a}, B = {label_b})", header_style="bold")
    for column in ("metric", "A", "B", "B − A", f"{boot['level']:.0%} CI"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for name, row in result["metrics"].items():
        ci = "–" if row["low"] is None else f"[{_fmt(row['low'], True)}, {_fmt(row['high'], True)}]"
        table.add_row(name, _fmt(row["A"]), _fmt(row["B"]), _fmt(row["difference"], True), ci)
    console.print(table)
    m = result["mcnemar"]
    console.print(
        f"McNemar exact test on {m['n_pairs']} leaf-labelled pairs: b = {m['b']} (A right, B wrong), "
        f"c = {m['c']} (A wrong, B right), p = {m['p_value']:.3g}",
        highlight=False,
    )
    console.print(
        f"[dim]{boot['method']}: {boot['resamples']} resamples of {boot['n_units']} {boot['unit']}s, "
        f"seed {boot['seed']}[/]",
        highlight=False,
    )


def _check_args(args: argparse.Namespace) -> Path | None:
    if args.resamples < 1:
        raise ConfigError(f"--resamples must be at least 1, got {args.resamples}")
    if not args.out:
        return None
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a folder; choose a folder")
    if (out / "comparison.json").exists() and not args.overwrite:
        raise ConfigError(f"{out / 'comparison.json'} already exists; pass --overwrite or choose another --out")
    return out


def run(args: argparse.Namespace) -> int:
    from hiercls.io import atomic_write_json, json_ready
    from hiercls.stats import paired_comparison

    out = _check_args(args)
    files_a, files_b = prediction_files(args.a), prediction_files(args.b)
    taxonomy = resolve_taxonomy(args.taxonomy, files_a, files_b)
    rows = paired_rows(taxonomy, files_a, files_b, args.group_by)
    if all(label is None for label in rows["labels"]):
        raise DataError(f"{args.a}: no row has a label; a comparison scores both sets against true labels")
    if args.group_by and all(g is None for g in rows["groups"]):
        raise DataError(f"--group-by {args.group_by}: no row of {args.a} has a value; fill it or leave --group-by out")
    result = paired_comparison(
        taxonomy, rows["labels"], rows["a"], rows["b"], groups=rows["clusters"],
        resamples=args.resamples, seed=args.seed, unit="group" if args.group_by else "image",
    )
    result["A"] = {unit: str(path) for unit, path in files_a.items()}
    result["B"] = {unit: str(path) for unit, path in files_b.items()}
    result["group_by"] = args.group_by
    _print_result(result, args.a, args.b)
    if not args.group_by and any(g is not None for g in rows["groups"]):
        console.print("[dim]note: the predictions have groups; images of one slide or patient are not independent, "
                      "so prefer --group-by group (see docs/statistics.md)[/]", highlight=False)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "comparison.json", json_ready(result))
        console.print(f"wrote {out / 'comparison.json'}")
    return 0
