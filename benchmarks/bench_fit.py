"""Throughput of ``hiercls fit`` / ``hiercls predict`` against a raw timm loop on the same data.

One process, one backbone / image size / batch / precision / compile setting:

(a) raw timm training: ``timm.create_model(num_classes=n_leaves)``, AdamW, the same
    autocast / channels_last / compile, real images indexed from the decoded cache tensor on
    the device, a horizontal flip every other step: the ceiling for this backbone;
(b) hiercls training: ``engine.fit`` with the joint strategy on the same images through the
    real data path (decode cache, residency, device augmentation); steady-state steps only,
    timed from inside the loop with the ``on_step`` hook (warm-up, compilation, epoch ends
    and checkpoints excluded);
(c) raw timm inference against ``predict_table`` (cache read, host-to-device copies and all);
(d) peak GPU memory of each;
(e) the time of the paper's cross-validation grid for this backbone, extrapolated from (b)
    and (c): see ``cv_grid_hours``.

Run ``python benchmarks/bench_fit.py --help``; benchmarks/README.md has the GPU commands.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TAXONOMY = REPO / "taxonomy" / "leukemia.yaml"

# The paper's grid (Hamdi et al.): 5 folds x {flat, per_node, joint} x {ViT-S/16, ConvNeXt-T}.
CV_FOLDS, CV_EPOCHS, CV_TRAIN_IMAGES = 5, 80, 2970
CV_VAL_IMAGES = CV_TRAIN_IMAGES // 4  # one fold of five is validation: train / 4
# Passes over the training images per epoch: flat 1, joint 1, per_node ~2.4 (each node model
# sees the images under its node). Validation runs every unit on every image: per_node has one
# model per decision of the leukemia tree (root, Leukemia, Acute, Chronic).
CV_TRAIN_PASSES = {"flat": 1.0, "joint": 1.0, "per_node": 2.4}
CV_VAL_PASSES = {"flat": 1.0, "joint": 1.0, "per_node": 4.0}
# Passes over a fold's validation images per cell: the fit's validation after its last epoch
# and the scoring of the last checkpoint.
CV_VAL_RUNS = 2


@dataclass
class Measure:
    """Images per second over the timed steps and the peak GPU memory (GiB, None on CPU)."""

    images_per_second: float
    peak_memory_gib: float | None
    images: int
    seconds: float


# -- helpers ---------------------------------------------------------------------------------


def benchmark_device(name: str) -> torch.device:
    """The device to measure on, with cuDNN autotuning and TF32 matmuls as ``hiercls fit`` sets them."""
    from hiercls.runtime import configure_backends, resolve_device

    device = resolve_device(name)
    configure_backends(device)
    return device


def device_label(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"


@contextmanager
def scratch_folder(prefix: str, keep: bool):
    """A temporary folder for images, cache and runs; deleted at the end unless ``keep``."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield work
    finally:
        if keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


def write_json(path: Path | None, results: dict[str, Any]) -> None:
    """``results`` as indented JSON at ``path`` (nothing when None)."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2) + "\n")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def write_synthetic(folder: Path, n: int, img_size: int, seed: int = 0) -> Path:
    """``n`` smear-like JPEGs (pink background, purple blobs) spread over the leukemia leaves.

    Written larger than ``img_size`` so the decode-and-resize path of the cache is exercised.
    """
    from PIL import Image, ImageDraw, ImageFilter

    from hiercls.taxonomy import load_taxonomy

    leaves = load_taxonomy(DEFAULT_TAXONOMY).leaves
    rng = np.random.default_rng(seed)
    side = max(16, int(img_size * 1.25))
    for i in range(n):
        label = leaves[i % len(leaves)]
        (folder / label).mkdir(parents=True, exist_ok=True)
        base = rng.normal((230, 200, 210), 12, (side // 4 + 1, side // 4 + 1, 3)).clip(0, 255).astype(np.uint8)
        image = Image.fromarray(base).resize((side, side), Image.Resampling.BILINEAR)
        draw = ImageDraw.Draw(image)
        for _ in range(int(rng.integers(1, 4))):
            r = int(rng.integers(side // 10, side // 4))
            x, y = (int(v) for v in rng.integers(r, side - r, 2))
            tone = tuple(int(v) for v in rng.normal((110 + 8 * (i % 9), 60, 150), 15).clip(0, 255))
            draw.ellipse((x - r, y - r, x + r, y + r), fill=tone)
        image.filter(ImageFilter.GaussianBlur(1)).save(folder / label / f"img{i:05d}.jpg", quality=90)
    return folder


def cycled_manifest(data: Path, taxonomy, out: Path) -> Path:
    """A manifest of every image under ``data`` labelled with the leaves of ``taxonomy`` in turn."""
    import csv

    from hiercls.data import load_images

    paths = sorted(str(p) for p in load_images(data).paths)
    if not paths:
        raise SystemExit(f"{data}: no images found")
    leaves = taxonomy.leaves
    with out.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label"])
        writer.writerows([path, leaves[i % len(leaves)]] for i, path in enumerate(paths))
    return out


def prepare_images(data: Path | None, taxonomy_path: Path, cycle_labels: bool, synthetic: int, img_size: int,
                   work: Path, cache: Path, device: torch.device):
    """The benchmark's data: ``(data path, ImageTable, uint8 leaf images on device, leaf indices)``.

    ``data`` None: ``synthetic`` smear-like JPEGs in ``work``; ``cycle_labels``: the images of
    ``data`` get the leaves of the tree in turn. Images are decoded once into ``cache``, which
    the hiercls runs of the benchmark then read. Images not labelled with a leaf are left out
    of the raw loops.
    """
    from hiercls.data import ImageCache, load_images
    from hiercls.taxonomy import load_taxonomy

    taxonomy = load_taxonomy(taxonomy_path)
    data = write_synthetic(work / "data", synthetic, img_size) if data is None else data.resolve()
    if cycle_labels:
        data = cycled_manifest(data, taxonomy, work / "cycled.csv")
    table = load_images(data, taxonomy=taxonomy)
    leaves = {leaf: i for i, leaf in enumerate(taxonomy.leaves)}
    usable = [i for i, label in enumerate(table.labels) if label in leaves]
    decoded = ImageCache(cache).load([table.paths[i] for i in usable], img_size, progress=False)
    images = torch.from_numpy(np.ascontiguousarray(decoded)).to(device)
    labels = torch.tensor([leaves[table.labels[i]] for i in usable], device=device)
    return data, table, images, labels


class _Windows:
    """Steady-state timing from ``on_step``: per (epoch, unit) window, after the warm-up steps.

    The device is synchronised only at a window's first and last step, so the loop runs as it
    does in production; the time between epochs (checkpoints, validation) never counts.
    """

    def __init__(self, device: torch.device, warmup: int, steps: int, sizes: dict[str, list[int]]):
        self.device, self.warmup, self.steps, self.sizes = device, warmup, steps, sizes
        self.global_step, self.timed_steps, self.images, self.seconds = 0, 0, 0, 0.0
        self.open: tuple[Any, int, float] | None = None

    def __call__(self, epoch: int, unit: str, step: int) -> None:
        self.global_step += 1
        last = step == len(self.sizes[unit]) - 1
        if self.global_step <= self.warmup or self.timed_steps >= self.steps:
            return
        if self.open is None or self.open[0] != (epoch, unit):
            _sync(self.device)
            self.open = ((epoch, unit), step, time.perf_counter())
            return
        self.timed_steps += 1
        if last or self.timed_steps >= self.steps:
            _sync(self.device)
            _key, first, t0 = self.open
            self.seconds += time.perf_counter() - t0
            self.images += sum(self.sizes[unit][first + 1 : step + 1])
            self.open = None


# -- (a) raw timm training and (c) raw inference -------------------------------------------


def _timm_model(backbone: str, num_classes: int, img_size: int, device, channels_last: bool):
    import timm

    kwargs: dict[str, Any] = {}
    try:
        model = timm.create_model(backbone, pretrained=False, num_classes=num_classes, img_size=img_size)
    except TypeError:  # CNNs take any size and no img_size argument
        model = timm.create_model(backbone, pretrained=False, num_classes=num_classes, **kwargs)
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def raw_training(images: torch.Tensor, labels: torch.Tensor, *, backbone: str, num_classes: int, batch_size: int,
                 device: torch.device, precision: str, channels_last: bool, compile: bool,
                 warmup: int, steps: int) -> Measure:
    """The plain timm loop on device-resident uint8 images (no augmentation but a flip)."""
    from hiercls.augment import normalize
    from hiercls.runtime import autocast_context

    model = _timm_model(backbone, num_classes, images.shape[1], device, channels_last)
    fused = {"fused": True} if device.type == "cuda" else {}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, **fused)
    forward = torch.compile(model) if compile else model
    loss_fn = torch.nn.CrossEntropyLoss()
    n = len(images)
    offsets = torch.arange(batch_size, device=images.device)
    model.train()
    _reset_peak(device)

    def step(k: int) -> None:
        idx = (offsets + k * batch_size) % n
        x = normalize(images[idx], channels_last=channels_last)
        if k % 2:
            x = torch.flip(x, dims=(3,))
        with autocast_context(device, precision):
            loss = loss_fn(forward(x).float(), labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for k in range(warmup):
        step(k)
    _sync(device)
    t0 = time.perf_counter()
    for k in range(warmup, warmup + steps):
        step(k)
    _sync(device)
    seconds = time.perf_counter() - t0
    return Measure(steps * batch_size / seconds, _peak(device), steps * batch_size, seconds)


def raw_inference(images: torch.Tensor, *, backbone: str, num_classes: int, batch_size: int, device: torch.device,
                  precision: str, channels_last: bool, compile: bool, warmup: int, steps: int) -> Measure:
    """Plain timm forward passes in inference mode on device-resident images."""
    from hiercls.augment import normalize
    from hiercls.runtime import autocast_context

    model = _timm_model(backbone, num_classes, images.shape[1], device, channels_last).eval()
    forward = torch.compile(model) if compile else model
    n = len(images)
    offsets = torch.arange(batch_size, device=images.device)
    _reset_peak(device)
    out = None
    with torch.inference_mode():
        for k in range(warmup + steps):
            if k == warmup:
                _sync(device)
                t0 = time.perf_counter()
            x = normalize(images[(offsets + k * batch_size) % n], channels_last=channels_last)
            with autocast_context(device, precision):
                out = forward(x)
        _sync(device)
    seconds = time.perf_counter() - t0
    del out
    return Measure(steps * batch_size / seconds, _peak(device), steps * batch_size, seconds)


# -- (b) hiercls training and (c) predict_table ------------------------------------------------


def hiercls_training(args: argparse.Namespace, data: Path, taxonomy: Path, out: Path, cache: Path,
                     device: torch.device) -> tuple[Measure, dict[str, Any]]:
    """``engine.fit`` (joint) timed over steady-state steps through the ``on_step`` hook."""
    from hiercls import engine
    from hiercls.config import load_config
    from hiercls.training import trainer

    config = load_config(None, {
        "taxonomy": str(taxonomy), "data": str(data), "out": str(out), "strategy": args.strategy,
        "backbone": args.backbone, "img_size": args.img_size, "batch_size": args.batch_size,
        "precision": args.precision, "compile": args.compile, "device": args.device, "val_fraction": 0,
        "cache_dir": str(cache), "epochs": 1, "seed": 0,
    })
    # Enough epochs to cover warm-up + timed steps with the unit sizes the engine will use.
    prepared = engine._prepare_data(engine._absolute_paths(config))
    labels = prepared.table.label_indices(prepared.taxonomy)[prepared.train_idx]
    model = engine.build_model(config, prepared.taxonomy, None)
    sizes: dict[str, list[int]] = {}
    for unit in model.training_units():
        count = int(unit.sample_mask(labels).sum())
        steps = trainer._batches(count, config.batch_size)
        sizes[unit.name] = [min(config.batch_size, count - s * config.batch_size) for s in range(steps)]
    per_epoch = sum(len(v) for v in sizes.values())
    if per_epoch < 2:
        raise SystemExit(f"{data}: too few images for batch size {args.batch_size}; use --synthetic or a smaller batch")
    windows_per_epoch = sum(max(0, len(v) - 1) for v in sizes.values())
    epochs = 1 + int(np.ceil((args.warmup + args.steps) / max(1, windows_per_epoch)))
    config = config.model_copy(update={"epochs": epochs})
    del model
    timer = _Windows(device, args.warmup, args.steps, sizes)
    _reset_peak(device)
    engine.fit(config, progress=False, on_step=timer, console=_quiet_console())
    if timer.seconds <= 0:
        raise SystemExit("no steady-state steps were timed; raise --steps or give more images")
    info = {"epochs": epochs, "steps_per_epoch": per_epoch, "timed_steps": timer.timed_steps}
    return Measure(timer.images / timer.seconds, _peak(device), timer.images, timer.seconds), info


def hiercls_inference(run: Path, data: Path, batch_size: int, device: torch.device, compile: bool,
                      repeats: int = 2) -> Measure:
    """``predict_table`` on every image, timed on the last of ``repeats`` calls (compile excluded)."""
    from hiercls.data import load_images
    from hiercls.inference import load_run, predict_table

    loaded = load_run(run, "last")
    table = load_images(data, taxonomy=loaded.taxonomy)
    _reset_peak(device)
    seconds = 0.0
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        predict_table(loaded, table, batch_size=batch_size, device=str(device), progress=False, compile=compile)
        _sync(device)
        seconds = time.perf_counter() - t0
    return Measure(len(table) / seconds, _peak(device), len(table), seconds)


def _quiet_console():
    from rich.console import Console

    return Console(stderr=True, quiet=True)


# -- (e) the cross-validation grid -----------------------------------------------------------


def cv_grid_hours(train_rate: float, infer_rate: float) -> dict[str, float]:
    """Hours of the paper's CV grid for one backbone, from its hiercls images per second.

    hours(strategy) = folds x (epochs x train_images x train_passes / train_rate
                               + CV_VAL_RUNS x val_images x val_passes / infer_rate) / 3600
    with folds 5, epochs 80, train_images 2,970, val_images 742, train_passes flat 1 / joint 1 /
    per_node 2.4 and val_passes 1 / 1 / 4; a cell validates after its last epoch and is then
    scored once (``hiercls cv`` validates once per cell by default). The grid for two
    backbones is the sum of both runs.
    """
    hours = {
        s: CV_FOLDS * (CV_EPOCHS * CV_TRAIN_IMAGES * CV_TRAIN_PASSES[s] / train_rate
                       + CV_VAL_RUNS * CV_VAL_IMAGES * CV_VAL_PASSES[s] / infer_rate) / 3600
        for s in CV_TRAIN_PASSES
    }
    hours["total"] = sum(hours.values())
    return hours


def cv_bound_hours(raw_train_rate: float) -> float:
    """The physical bound of the grid for one backbone: its training passes at raw timm speed."""
    passes = sum(CV_TRAIN_PASSES.values())
    return CV_FOLDS * CV_EPOCHS * CV_TRAIN_IMAGES * passes / raw_train_rate / 3600


# -- driver ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench_fit.py",
        description="hiercls fit / predict throughput against a raw timm loop on the same images.",
        epilog="example (H100): python benchmarks/bench_fit.py --backbone vit_small_patch16_384 --img-size 384 "
               "--batch-size 64 --compile --data local-data/all-subtypes --taxonomy taxonomy/all-subtypes.yaml",
    )
    p.add_argument("--backbone", default="resnet18", help="timm model name (default: resnet18)")
    p.add_argument("--img-size", type=int, default=64, help="default: 64")
    p.add_argument("--batch-size", type=int, default=32, help="training batch (default: 32)")
    p.add_argument("--infer-batch-size", type=int, default=None, help="inference batch (default: 4x --batch-size)")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto", help="auto: bf16 on cuda")
    p.add_argument("--compile", action="store_true", help="torch.compile every model (both sides)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per measurement (default: 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default: 2; use 10+ with --compile)")
    p.add_argument("--strategy", default="joint", help="hiercls strategy to time (default: joint)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--data", type=Path, default=None, help="image folder or manifest (with --taxonomy)")
    p.add_argument("--taxonomy", type=Path, default=None, help="label tree of --data (default: leukemia)")
    p.add_argument("--synthetic", type=int, default=None, metavar="N",
                   help="write N smear-like JPEGs to a temporary folder (default when --data is absent)")
    p.add_argument("--cycle-labels", action="store_true",
                   help="give the images of --data the leaves of --taxonomy in turn (speed only: real images "
                        "on the leukemia tree, whatever their own labels)")
    p.add_argument("--json", type=Path, default=None, metavar="OUT", help="write the numbers to this JSON file")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (run, cache, images)")
    args = p.parse_args(argv)
    if args.data is not None and args.synthetic is not None:
        p.error("give --data or --synthetic, not both")
    for name in ("img_size", "batch_size", "steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run every measurement, print the table and return the numbers (also to ``--json``)."""
    from hiercls.runtime import use_channels_last
    from hiercls.taxonomy import load_taxonomy

    args = parse_args(argv)
    device = benchmark_device(args.device)
    infer_batch = args.infer_batch_size or 4 * args.batch_size
    with scratch_folder("hiercls-bench-", args.keep) as work:
        taxonomy_path = (args.taxonomy or DEFAULT_TAXONOMY).resolve()
        cache = work / "cache"
        synthetic = args.synthetic or (args.warmup + args.steps + 2) * args.batch_size
        data, table, images, labels = prepare_images(args.data, taxonomy_path, args.cycle_labels, synthetic,
                                                     args.img_size, work, cache, device)
        leaves = load_taxonomy(taxonomy_path).leaves
        channels_last = use_channels_last("auto", device)
        common = dict(backbone=args.backbone, num_classes=len(leaves), device=device, precision=args.precision,
                      channels_last=channels_last, compile=args.compile, warmup=args.warmup, steps=args.steps)

        raw_train = raw_training(images, labels, batch_size=args.batch_size, **common)
        raw_infer = raw_inference(images, batch_size=infer_batch, **common)
        # the raw loops' device copy goes before hiercls runs: its peak memory counts only its own
        del images, labels
        if device.type == "cuda":
            torch.cuda.empty_cache()
        ours_train, info = hiercls_training(args, data, taxonomy_path, work / "run", cache, device)
        ours_infer = hiercls_inference(work / "run", data, infer_batch, device, args.compile)

        results: dict[str, Any] = {
            "device": device_label(device),
            "torch": torch.__version__,
            "backbone": args.backbone, "img_size": args.img_size, "batch_size": args.batch_size,
            "infer_batch_size": infer_batch, "precision": args.precision, "compile": args.compile,
            "strategy": args.strategy, "images": len(table), "warmup": args.warmup, "steps": args.steps,
            "fit": info,
            "raw_train": vars(raw_train), "hiercls_train": vars(ours_train),
            "raw_infer": vars(raw_infer), "hiercls_predict": vars(ours_infer),
            "train_ratio": ours_train.images_per_second / raw_train.images_per_second,
            "predict_ratio": ours_infer.images_per_second / raw_infer.images_per_second,
            "cv_grid_hours": cv_grid_hours(ours_train.images_per_second, ours_infer.images_per_second),
            "cv_bound_hours": cv_bound_hours(raw_train.images_per_second),
        }
        _print(results)
        write_json(args.json, results)
        return results


def _print(results: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    def gib(m: dict) -> str:
        return "-" if m["peak_memory_gib"] is None else f"{m['peak_memory_gib']:.2f}"

    table = Table(title=(f"{results['backbone']} @ {results['img_size']}px, batch {results['batch_size']} / "
                         f"{results['infer_batch_size']}, precision {results['precision']}, "
                         f"compile {results['compile']} on {results['device']}"))
    for column in ("measurement", "img/s", "ratio", "peak GiB"):
        table.add_column(column, justify="left" if column == "measurement" else "right")
    table.add_row("raw timm training", f"{results['raw_train']['images_per_second']:.1f}", "", gib(results["raw_train"]))
    table.add_row(f"hiercls fit ({results['strategy']})", f"{results['hiercls_train']['images_per_second']:.1f}",
                  f"{results['train_ratio']:.3f}", gib(results["hiercls_train"]))
    table.add_row("raw timm inference", f"{results['raw_infer']['images_per_second']:.1f}", "", gib(results["raw_infer"]))
    table.add_row("hiercls predict_table", f"{results['hiercls_predict']['images_per_second']:.1f}",
                  f"{results['predict_ratio']:.3f}", gib(results["hiercls_predict"]))
    console = Console()
    console.print(table)
    hours = results["cv_grid_hours"]
    console.print(
        "CV grid for this backbone (5 folds x 80 epochs, 2,970 train / 742 val images per fold; "
        "flat 1, joint 1, per_node 2.4 training passes): "
        + ", ".join(f"{k} {v:.2f} h" for k, v in hours.items())
        + f"; bound at raw timm speed {results['cv_bound_hours']:.2f} h "
        f"(grid / bound {hours['total'] / results['cv_bound_hours']:.3f})"
    )


if __name__ == "__main__":
    main()
