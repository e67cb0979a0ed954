"""``hiercls calibrate``: fit per-node temperatures on a run's validation images (RUN/calibration.json)."""

from __future__ import annotations

import argparse
from typing import Any

from rich.console import Console

from hiercls.cli import add_command
from hiercls.console import make_console


def register(subparsers) -> None:
    p = add_command(
        subparsers,
        "calibrate",
        help="fit per-node temperatures on a run's validation images",
        description=(
            "Predict the run's own validation images (RUN/split.json), fit one temperature per internal "
            "node of the tree (p_i^(1/T) renormalised over the node's children, T minimising the "
            "negative log-likelihood of the true child) and write RUN/calibration.json. `hiercls "
            "predict`, `hiercls evaluate --run` and the Python estimator then give calibrated "
            "probabilities with that checkpoint (`hiercls predict --no-calibration` gives the raw ones). Prints the "
            "temperatures and the expected calibration error before and after (docs/metrics.md)."
        ),
        example_lines=(
            "hiercls calibrate --run runs/joint",
            "hiercls calibrate --run runs/joint --checkpoint last --device cpu --no-progress",
        ),
    )
    p.add_argument("--run", required=True, metavar="RUN", help="run folder written by `hiercls fit`")
    # best, as predict, evaluate --data and the estimator use by default; evaluate --split scores last
    # by default and its summary names this mismatch with the command for either way out.
    p.add_argument("--checkpoint", choices=("best", "last"), default="best",
                   help="checkpoint to calibrate (default: best, the one predict, evaluate --data and the estimator "
                   "use); predictions with the other one stay uncalibrated, so `evaluate --split val` (last by "
                   "default) needs --checkpoint best to score these temperatures")
    p.add_argument("--device", default="auto", metavar="auto|cpu|cuda|cuda:N", help="default: auto")
    p.add_argument("--batch-size", dest="batch_size", type=int, metavar="N", default=None,
                   help="default: twice the run's batch size")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars (logs)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hiercls.calibration import calibrate_run
    from hiercls.errors import ConfigError

    if args.batch_size is not None and args.batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {args.batch_size}")
    console = make_console(stderr=True)
    payload = calibrate_run(args.run, args.checkpoint, device=args.device, batch_size=args.batch_size,
                            progress=args.progress, console=console)
    from pathlib import Path

    from hiercls.calibration import CALIBRATION_FILE

    print_calibration(make_console(stderr=False), payload)
    make_console(stderr=False).print(f"wrote {Path(args.run) / CALIBRATION_FILE}", highlight=False)
    return 0


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"


def print_calibration(console: Console, payload: dict[str, Any]) -> None:
    """The temperatures (and why some nodes kept T = 1), then ECE before / after per depth."""
    from rich.table import Table

    temps = Table(title=f"temperatures ({payload['checkpoint']} checkpoint, {payload['n_images']} validation images)",
                  header_style="bold")
    for column in ("node", "images below", "T", "NLL before", "NLL after", "note"):
        temps.add_column(column, justify="left" if column in ("node", "note") else "right")
    skipped = payload.get("skipped") or {}
    nll_before, nll_after = payload.get("nll_before") or {}, payload.get("nll_after") or {}
    for node, temperature in payload["temperatures"].items():
        note = f"kept at 1: {skipped[node]}" if node in skipped else ""
        temps.add_row(node, str((payload.get("node_images") or {}).get(node, "")), f"{temperature:.3f}",
                      _fmt(nll_before.get(node)), _fmt(nll_after.get(node)), note)
    console.print(temps)
    ece = Table(title="expected calibration error", header_style="bold")
    for column in ("", "before", "after"):
        ece.add_column(column, justify="left" if not column else "right")
    before, after = payload.get("ece_before") or {}, payload.get("ece_after") or {}
    for key in before:
        ece.add_row(key, _fmt(before.get(key)), _fmt(after.get(key)))
    console.print(ece)
