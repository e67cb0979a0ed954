"""``hiercls predict``: node probabilities and decoded predictions for a folder or manifest."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from hiercls.cli import add_command
from hiercls.console import make_console

if TYPE_CHECKING:
    from hiercls.taxonomy import Taxonomy


def register(subparsers) -> None:
    p = add_command(
        subparsers,
        "predict",
        help="predict every image of a folder or manifest with a trained run",
        description=(
            "Load a run's best (or last) checkpoint, predict a probability for every node of the "
            "tree and write a CSV: path, label (when known), group, prediction, p:<node> per node. "
            "Labels are optional: an unlabelled folder of images works too. Images the run was trained "
            "on (listed in RUN/split.json) are counted in a warning: predictions on them are optimistic."
        ),
        example_lines=(
            "hiercls predict --run runs/joint --data smears/ --out runs/joint/predictions.csv",
            "hiercls predict --run runs/joint --data test/manifest.csv --out preds.csv --decode threshold --threshold 0.7",
            "hiercls predict --run runs/joint --data new_slides/ --out preds.csv --group-regex '^(S\\d+)_'",
            "hiercls predict --run runs/joint --data smears/ --out raw.csv --no-calibration   # without calibration.json",
        ),
    )
    p.add_argument("--run", required=True, metavar="RUN", help="run folder written by `hiercls fit`")
    p.add_argument("--data", required=True, metavar="D", help="folder (class sub-folders or plain images) or manifest CSV")
    p.add_argument("--out", required=True, metavar="preds.csv", help="predictions CSV to write")
    p.add_argument("--group-regex", dest="group_regex", metavar="R", default=None, help="regex on file names giving the group")
    p.add_argument("--checkpoint", choices=("best", "last"), default="best", help="default: best")
    p.add_argument("--batch-size", dest="batch_size", type=int, metavar="N", default=None,
                   help="default: twice the run's batch size")
    p.add_argument("--compile", action="store_true", help="torch.compile the model first (pays off for many images on a GPU)")
    p.add_argument("--device", default="auto", metavar="auto|cpu|cuda|cuda:N", help="default: auto")
    p.add_argument("--decode", choices=("greedy", "best_leaf", "threshold"), default=None, help="default: the run's decode rule")
    p.add_argument("--threshold", type=float, default=None, metavar="X", help="for --decode threshold (default: the run's, 0.5)")
    p.add_argument("--no-calibration", dest="calibrated", action="store_false",
                   help="the model's raw probabilities, without the temperatures of RUN/calibration.json "
                        "(`hiercls calibrate`); default: calibrated when the run has them")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hiercls.data import load_images, run_exclusions
    from hiercls.errors import ConfigError
    from hiercls.inference import load_run, predict_table, run_image_warnings
    from hiercls.predictions import write_predictions_csv

    console = make_console()
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise ConfigError(f"{out}: file exists; use --overwrite to replace it or choose another --out")
    if out.exists() and out.is_dir():
        raise ConfigError(f"{out}: is a folder; --out is the CSV file to write")
    if args.batch_size is not None and args.batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.threshold is not None and not 0 <= args.threshold <= 1:
        raise ConfigError(f"--threshold must be in [0, 1], got {args.threshold}")
    _check_writable(out)
    loaded = load_run(args.run, args.checkpoint, calibrated=args.calibrated)
    excluded = run_exclusions(loaded.config.taxonomy, loaded.config.exclude, loaded.taxonomy)
    table = load_images(args.data, taxonomy=loaded.taxonomy, group_regex=args.group_regex, require_labels=False,
                        excluded=excluded)  # images of excluded nodes are predicted, unlabelled
    if len(table) == 0:
        raise ConfigError(f"{args.data}: no images found")
    for line in run_image_warnings(args.run, table.paths, args.checkpoint) + _calibration_warnings(loaded, table.paths):
        console.print(f"[yellow]warning:[/] {line}", highlight=False)
    probs = predict_table(loaded, table, batch_size=args.batch_size, device=args.device,
                          progress=args.progress, console=console, compile=args.compile,
                          calibrated=args.calibrated)
    method = args.decode or loaded.config.decode
    threshold = args.threshold if args.threshold is not None else loaded.config.threshold
    predictions = probs.decode(method, threshold=threshold)
    write_predictions_csv(out, probs, [str(p) for p in table.paths], table.labels, table.groups, predictions)
    summary = f"wrote {len(table)} {'calibrated ' if loaded.calibration else ''}predictions to {out}"
    scored = accuracy_summary(loaded.taxonomy, table.labels, predictions)
    console.print(summary + (f" ({scored})" if scored else ""), highlight=False)
    return 0


def _calibration_warnings(loaded, paths) -> list[str]:
    """A warning when the run's temperatures were fitted on some of these images."""
    from hiercls.calibration import calibration_overlap
    from hiercls.errors import CheckpointError

    if not loaded.calibration:
        return []
    try:
        n = calibration_overlap(loaded.run_dir, paths)
    except CheckpointError as exc:
        return [f"cannot check which images the temperatures were fitted on: {exc}"]
    if not n:
        return []
    return [f"{n} of {len(paths)} image(s) are the validation images the run's temperatures were fitted on "
            "(calibration.json); their probabilities look better calibrated than they are"]


def accuracy_summary(taxonomy: Taxonomy, labels: Sequence[str | None], predictions: Sequence[str]) -> str | None:
    """The accuracy line of ``predict``: the ``accuracy`` of ``hiercls evaluate`` on the same rows.

    Both come from ``hiercls.metrics.leaf_accuracy``: rows labelled at a leaf only; partial
    labels (an internal node) are left out and counted. ``None`` when no row has a label.
    """
    from hiercls.metrics import leaf_accuracy, leaf_label_mask

    known = [(t, p) for t, p in zip(labels, predictions) if t is not None]
    if not known:
        return None
    true_nodes, pred_nodes = [t for t, _ in known], [p for _, p in known]
    n_leaf = int(leaf_label_mask(taxonomy, true_nodes).sum())
    partial = f"; {len(known) - n_leaf} partial label(s) left out" if n_leaf < len(known) else ""
    value = leaf_accuracy(taxonomy, true_nodes, pred_nodes)
    if value is None:
        return f"no image labelled at a leaf: no exact-match accuracy{partial}"
    return f"exact-match accuracy on {n_leaf} images labelled at a leaf: {value:.3f}{partial}"


def _check_writable(out: Path) -> None:
    """Refuse an --out that cannot be written before predicting, not after an hour of it."""
    import os
    import tempfile

    from hiercls.errors import ConfigError

    folder = Path(os.path.abspath(out)).parent
    if not folder.is_dir():
        raise ConfigError(f"{out}: folder {folder} does not exist; create it first or choose another --out")
    try:
        fd, name = tempfile.mkstemp(prefix=".write-test-", dir=folder)
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        raise ConfigError(f"{out}: cannot write to {folder} ({exc.strerror or exc}); choose another --out") from None
