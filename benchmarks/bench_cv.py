"""Time a whole ``hiercls cv`` grid at a few epochs, extrapolate it to 80, and compare with the bound.

The paper's study is 5 grouped folds x {flat, per_node, joint} x {ViT-S/16, ConvNeXt-T} at 80
epochs. This script runs that grid for real (``hiercls.cv.run_cv``: model building, the decode
cache, compilation, training, the last-epoch validation, checkpoints, scoring, tables) at
``--epochs`` epochs, reads each cell's time (``cv_done.json``) and its steady epochs' time
(``metrics.jsonl``, epochs 2 .. E-1), and extrapolates every cell to ``--target-epochs``:

    cell(80) = cell(E) + (80 - E) x steady epoch time

The bound is the same training passes at the raw timm speed of each backbone, measured in the
same process (``bench_fit.raw_training``):

    bound(cell) = 80 x training images the cell's units see per epoch / raw img/s

and the grid's ratio (sum of cells / sum of bounds) is the issue's figure (target: at most
1.10). Defaults run on a CPU in a few minutes (ResNet-18 at 32 px, 2 folds, synthetic JPEGs);
benchmarks/README.md has the GPU command.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_fit  # the sibling script: data preparation and the raw timm loop


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench_cv.py",
        description="Time a hiercls cv grid at a few epochs and extrapolate it to the paper's 80.",
        epilog="example (H100): python benchmarks/bench_cv.py --backbones vit_small_patch16_384 convnext_tiny "
               "--img-size 384 --batch-size 64 --compile --folds 5 --epochs 3 --data local-data/all-subtypes "
               "--cycle-labels",
    )
    p.add_argument("--backbones", nargs="+", default=["resnet18"], help="timm model names (default: resnet18)")
    p.add_argument("--strategies", nargs="+", default=["flat", "per_node", "joint"],
                   choices=("flat", "per_node", "per_level", "joint"), help="default: the paper's three")
    p.add_argument("--folds", type=int, default=2, help="grouped folds (the paper: 5; default: 2)")
    p.add_argument("--epochs", type=int, default=3, help="epochs actually trained per cell (at least 3)")
    p.add_argument("--target-epochs", type=int, default=80, help="epochs to extrapolate to (default: 80)")
    p.add_argument("--img-size", type=int, default=32, help="default: 32")
    p.add_argument("--batch-size", type=int, default=32, help="default: 32")
    p.add_argument("--loss", default="focal", help="default: focal (the paper's)")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto", help="auto: bf16 on cuda")
    p.add_argument("--compile", action="store_true", help="torch.compile (both the raw loop and hiercls)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--raw-steps", type=int, default=20, help="timed steps of the raw loop (default: 20)")
    p.add_argument("--raw-warmup", type=int, default=5, help="untimed raw steps first (default: 5; 15 with --compile)")
    p.add_argument("--data", type=Path, default=None, help="image folder or manifest (with --taxonomy)")
    p.add_argument("--taxonomy", type=Path, default=None, help="label tree (default: leukemia)")
    p.add_argument("--cycle-labels", action="store_true", help="label the images of --data with the tree's leaves in turn")
    p.add_argument("--synthetic", type=int, default=320, metavar="N",
                   help="smear-like JPEGs to write when --data is absent (default: 320)")
    p.add_argument("--json", type=Path, default=None, metavar="OUT", help="write the numbers to this JSON file")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (images, cache, cells)")
    args = p.parse_args(argv)
    if args.epochs < 3:
        p.error("--epochs must be at least 3 (epoch 1 compiles, the last validates: steady epochs lie between)")
    if args.target_epochs < args.epochs:
        p.error("--target-epochs must be at least --epochs")
    return args


def cell_times(run_dir: Path, target_epochs: int) -> dict[str, float]:
    """Measured seconds of a finished cell, its steady epoch, images per epoch and the extrapolation."""
    done = json.loads((run_dir / "cv_done.json").read_text(encoding="utf-8"))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    # Epoch 1 compiles and warms up; the last one also validates. Between the ends of epochs 1
    # and E-1 lie steady epochs with everything around them (metrics, progress, checkpoints).
    steady = records[1:-1]
    epoch_seconds = (records[-2]["elapsed_seconds"] - records[0]["elapsed_seconds"]) / len(steady)
    images_per_epoch = float(np.mean([r["seconds"] * r["images_per_second"] for r in steady]))
    measured = float(done["seconds"])
    return {
        "epochs": int(done["epochs"]),
        "measured_seconds": measured,
        "steady_epoch_seconds": epoch_seconds,
        "images_per_epoch": images_per_epoch,
        "extrapolated_seconds": measured + (target_epochs - int(done["epochs"])) * epoch_seconds,
    }


def grid_summary(cells: list[dict[str, Any]], raw_rates: dict[str, float], target_epochs: int) -> dict[str, Any]:
    """Every cell's bound, the sums per (strategy, backbone) and the grid's ratio to its bound."""
    for cell in cells:
        cell["bound_seconds"] = target_epochs * cell["images_per_epoch"] / raw_rates[cell["backbone"]]
    groups: dict[str, dict[str, float]] = {}
    for cell in cells:
        key = f"{cell['strategy']} x {cell['backbone']}"
        group = groups.setdefault(key, {"measured_seconds": 0.0, "extrapolated_seconds": 0.0, "bound_seconds": 0.0})
        for name in group:
            group[name] += cell[name]
    total = {name: sum(g[name] for g in groups.values()) for name in ("measured_seconds", "extrapolated_seconds",
                                                                       "bound_seconds")}
    total["ratio"] = total["extrapolated_seconds"] / total["bound_seconds"]
    return {"cells": cells, "groups": groups, "total": total}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from rich.console import Console

    from hiercls.cv import CVConfig, cell_dir, run_cv
    from hiercls.runtime import use_channels_last
    from hiercls.taxonomy import load_taxonomy

    args = parse_args(argv)
    device = bench_fit.benchmark_device(args.device)
    with bench_fit.scratch_folder("hiercls-bench-cv-", args.keep) as work:
        taxonomy_path = (args.taxonomy or bench_fit.DEFAULT_TAXONOMY).resolve()
        cache = work / "cache"
        data, table, images, labels = bench_fit.prepare_images(
            args.data, taxonomy_path, args.cycle_labels, args.synthetic, args.img_size, work, cache, device)
        leaves = load_taxonomy(taxonomy_path).leaves
        raw_rates = {}
        for backbone in args.backbones:
            raw = bench_fit.raw_training(
                images, labels, backbone=backbone, num_classes=len(leaves), batch_size=args.batch_size,
                device=device, precision=args.precision, channels_last=use_channels_last("auto", device),
                compile=args.compile, warmup=args.raw_warmup, steps=args.raw_steps)
            raw_rates[backbone] = raw.images_per_second
        del images, labels
        if device.type == "cuda":
            torch.cuda.empty_cache()

        config = CVConfig.model_validate({
            "taxonomy": taxonomy_path, "data": data, "out": work / "cv", "folds": args.folds,
            "strategies": args.strategies, "backbones": args.backbones,
            "fit": {"img_size": args.img_size, "epochs": args.epochs, "batch_size": args.batch_size,
                    "loss": args.loss, "precision": args.precision, "compile": args.compile,
                    "device": str(device), "cache_dir": str(cache)},
        })
        quiet = Console(file=io.StringIO())
        run_cv(config, quiet, progress=False)
        cells = []
        for strategy, backbone, fold in config.cells:
            times = cell_times(cell_dir(config.out, strategy, backbone, fold), args.target_epochs)
            cells.append({"strategy": strategy, "backbone": backbone, "fold": fold, **times})
        summary = grid_summary(cells, raw_rates, args.target_epochs)
        results = {
            "device": bench_fit.device_label(device),
            "torch": torch.__version__, "img_size": args.img_size, "batch_size": args.batch_size,
            "compile": args.compile, "precision": args.precision, "folds": args.folds, "epochs": args.epochs,
            "target_epochs": args.target_epochs, "images": len(table), "raw_train_img_per_s": raw_rates,
            **summary,
        }
        _print(results)
        bench_fit.write_json(args.json, results)
        return results


def _print(results: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    target = results["target_epochs"]
    table = Table(title=(f"hiercls cv, {results['folds']} folds x {results['epochs']} epochs -> {target} epochs, "
                         f"{results['img_size']}px, batch {results['batch_size']}, compile {results['compile']} "
                         f"on {results['device']}"))
    for column in ("cells", f"measured ({results['epochs']} ep)", f"extrapolated ({target} ep)",
                   "bound (raw timm)", "ratio"):
        table.add_column(column, justify="left" if column == "cells" else "right")
    for key, group in results["groups"].items():
        table.add_row(key, _minutes(group["measured_seconds"]), _minutes(group["extrapolated_seconds"]),
                      _minutes(group["bound_seconds"]), f"{group['extrapolated_seconds'] / group['bound_seconds']:.3f}")
    total = results["total"]
    table.add_row("grid", _minutes(total["measured_seconds"]), _minutes(total["extrapolated_seconds"]),
                  _minutes(total["bound_seconds"]), f"{total['ratio']:.3f}", style="bold")
    Console().print(table)
    rates = ", ".join(f"{b} {r:,.0f} img/s" for b, r in results["raw_train_img_per_s"].items())
    Console().print(f"raw timm training (the bound's speed): {rates}")


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


if __name__ == "__main__":
    main()
