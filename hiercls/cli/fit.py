"""``hiercls fit``: train a hierarchical classifier and write a run directory."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING

from hiercls.cli import add_command
from hiercls.console import log_interval, make_console

if TYPE_CHECKING:
    from rich.console import Console

# Command-line flags that map one-to-one to FitConfig options (dest == option name).
CONFIG_FLAGS = (
    "taxonomy", "data", "out", "strategy", "backbone", "loss", "pretrained", "img_size", "epochs",
    "batch_size", "lr", "optimizer", "val_fraction", "fold", "folds", "seed", "device", "precision",
    "group_regex", "exclude", "cache_dir", "num_workers", "best_metric", "val_every",
    "checkpoint_minutes",
)


def register(subparsers) -> None:
    p = add_command(
        subparsers,
        "fit",
        help="train a model on a labelled image folder or manifest",
        description=(
            "Train a hierarchical classifier (flat, per_node, per_level or joint) and write a run "
            "folder with the resolved config, the split, metrics per epoch and checkpoints. Options "
            "given here override those of --config. Ctrl-C stops after the current step and saves a "
            "checkpoint that --resume continues from. Started by torchrun, the processes train "
            "data-parallel (DistributedDataParallel): --batch-size is the global batch, split evenly "
            "over the processes; rank 0 writes the run."
        ),
        example_lines=(
            "hiercls fit --taxonomy taxonomy/leukemia.yaml --data smears/ --out runs/joint",
            "hiercls fit --config examples/leukemia/vit_s16_joint.yaml --data smears/manifest.csv --out runs/vit",
            "hiercls fit --taxonomy T.yaml --data D --out runs/cv0 --fold 0 --folds 5 --strategy per_node",
            "hiercls fit --out runs/joint --resume --epochs 20",
            "torchrun --nproc-per-node 4 -m hiercls fit --config C.yaml --out runs/ddp --batch-size 256",
        ),
    )
    S = argparse.SUPPRESS  # unset flags stay out of the namespace, so the config file's values win
    p.add_argument("--config", default=None, metavar="C.yaml", help="YAML file of options (paths relative to it)")
    p.add_argument("--taxonomy", metavar="T.yaml", default=S, help="label tree (YAML)")
    p.add_argument("--data", metavar="D", default=S, help="folder of class sub-folders, or a manifest CSV path,label[,group]")
    p.add_argument("--out", metavar="RUN", default=S, help="run folder to create")
    # no argparse choices: listing them would load every plugin (and torch) just to parse arguments;
    # the config check names the registered strategies (and the closest one) instead
    p.add_argument("--strategy", metavar="NAME", default=S,
                   help="flat, per_node, per_level, joint or a plugin's (`hiercls plugins --strategies`); default: joint")
    p.add_argument("--backbone", metavar="NAME", default=S, help="timm model name or plugin backbone (default: resnet18)")
    p.add_argument("--loss", metavar="NAME", default=S, help="ce, weighted_ce, focal or a plugin loss (default: ce)")
    p.add_argument("--pretrained", metavar="PATH", default=S, help="local weights file for the backbone (never downloaded)")
    p.add_argument("--img-size", dest="img_size", type=int, metavar="N", default=S, help="default: 224")
    p.add_argument("--epochs", type=int, metavar="N", default=S, help="default: 10")
    p.add_argument("--batch-size", dest="batch_size", type=int, metavar="N", default=S, help="default: 32")
    p.add_argument("--lr", type=float, metavar="X", default=S, help="learning rate (default: 3e-4)")
    p.add_argument("--optimizer", choices=("adamw", "adam", "sgd"), default=S, help="default: adamw")
    split = p.add_mutually_exclusive_group()
    split.add_argument("--val-fraction", dest="val_fraction", type=float, metavar="F", default=S,
                       help="grouped validation fraction (default: 0.2)")
    split.add_argument("--fold", type=int, metavar="K", default=S, help="validate on fold K of --folds (grouped k-fold)")
    p.add_argument("--folds", type=int, metavar="N", default=S, help="number of folds, with --fold")
    p.add_argument("--val-every", dest="val_every", type=int, metavar="N", default=S,
                   help="validate after every N-th epoch and after the last (default: 1)")
    p.add_argument("--checkpoint-minutes", dest="checkpoint_minutes", type=float, metavar="M", default=S,
                   help="write the resumable checkpoint after an epoch once M minutes have passed since the "
                        "last one, and always at the end and on Ctrl-C (default: 5; 0: every epoch)")
    p.add_argument("--seed", type=int, metavar="S", default=S, help="default: 0")
    p.add_argument("--device", metavar="auto|cpu|cuda|cuda:N", default=S, help="default: auto (cuda when available)")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default=S, help="auto: bf16 on cuda, fp32 on cpu")
    p.add_argument("--compile", dest="compile", action="store_true", default=S, help="torch.compile each model (GPU)")
    p.add_argument("--deterministic", action="store_true", default=S,
                   help="CUDA: no cuDNN autotuning or TF32 (bit-stable reruns, slower)")
    p.add_argument("--group-regex", dest="group_regex", metavar="R", default=S,
                   help="regex on file names giving the group (slide / patient)")
    p.add_argument("--exclude", nargs="+", metavar="NODE", default=S, help="drop these nodes (and their images) from the tree")
    p.add_argument("--cache-dir", dest="cache_dir", metavar="DIR", default=S,
                   help="decoded-image cache (default: $HIERCLS_CACHE or ~/.cache/hiercls)")
    p.add_argument("--num-workers", dest="num_workers", type=int, metavar="N", default=S,
                   help="threads for decoding images into the cache")
    p.add_argument("--best-metric", dest="best_metric", choices=("val_hF", "val_accuracy", "val_loss"), default=S,
                   help="default: val_hF")
    p.add_argument("--allow-incomplete-tree", dest="allow_incomplete_tree", action="store_true", default=S,
                   help="train although a decision of the tree has fewer than two children with training "
                        "images (refused by default: that decision cannot be learned)")
    p.add_argument("--calibrate", action="store_true", default=S,
                   help="at the end, fit per-node temperatures on the validation images and write "
                        "RUN/calibration.json, as `hiercls calibrate` does")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier hiercls run in --out")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars, nor progress lines in a log")
    p.set_defaults(func=run)


def overrides_from_args(args: argparse.Namespace) -> dict:
    """The config options the user actually gave on the command line."""
    given = {name: getattr(args, name) for name in CONFIG_FLAGS if hasattr(args, name)}
    if getattr(args, "compile", None):
        given["compile"] = True
    if getattr(args, "deterministic", None):
        given["deterministic"] = True
    if getattr(args, "allow_incomplete_tree", None):
        given["allow_incomplete_tree"] = True
    if getattr(args, "calibrate", None):
        given["calibrate"] = True
    return given


def run(args: argparse.Namespace) -> int:
    from hiercls.config import load_config, read_config_file
    from hiercls.engine import fit
    from hiercls.errors import ConfigError
    from hiercls.run import load_resume_config

    # Under torchrun only rank 0 speaks; the other processes train silently.
    console = make_console(quiet=os.environ.get("RANK", "0") not in ("", "0"))
    log_interval()  # a bad HIERCLS_LOG_INTERVAL is refused before anything starts
    if args.resume and args.overwrite:
        raise ConfigError("--resume and --overwrite contradict each other; choose one")
    overrides = overrides_from_args(args)
    if args.resume:
        out = overrides.get("out")
        if out is None and args.config:
            out = read_config_file(Path(args.config)).get("out")
        if out is None:
            raise ConfigError("--resume needs --out RUN (the run folder to continue)")
        config = load_resume_config(out, overrides)
    else:
        config = load_config(args.config, overrides)
    result = fit(config, console, resume=args.resume, overwrite=args.overwrite, progress=args.progress)
    if result.interrupted:
        return 130
    best = _epoch_record(result.run_dir, result.best_epoch)
    if result.best_metric is not None and best:
        numbers = ", ".join(
            f"{key.removeprefix('val_')} {best[key]:.4f}"
            for key in ("val_accuracy", "val_hP", "val_hR", "val_hF", "val_loss") if best.get(key) is not None
        )
        console.print(
            f"[bold green]done[/]: best {result.best_metric_name} at epoch {result.best_epoch} "
            f"(validation {numbers}); run folder {result.run_dir}"
        )
    else:
        console.print(f"[bold green]done[/]: {result.epochs_completed} epochs; run folder {result.run_dir}")
    if config.calibrate:
        _print_calibration(console, result.run_dir)
    return 0


def _print_calibration(console: Console, run_dir: Path) -> None:
    """The temperatures and ECE that the end of the fit wrote to RUN/calibration.json."""
    from hiercls.calibration import read_calibration
    from hiercls.cli.calibrate import print_calibration

    payload = read_calibration(run_dir)
    if payload is not None:
        print_calibration(console, payload)


def _epoch_record(run_dir: Path, epoch: int | None) -> dict:
    """The metrics.jsonl line of ``epoch`` (empty when absent)."""
    import json

    path = run_dir / "metrics.jsonl"
    if epoch is None or not path.is_file():
        return {}
    for line in path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line) if line.strip() else {}
        if record.get("epoch") == epoch:
            return record
    return {}
