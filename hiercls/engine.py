"""``hiercls fit``: prepare the data, the model and the run folder, then train.

The engine checks everything a run needs (device, data, split, model) before it writes
anything, opens and locks the run folder, and hands the loop to the in-memory
``hiercls.training.trainer.Trainer`` with two callbacks: ``RunFolder``
(``hiercls.training.run_folder``: config, split, metrics, checkpoints, resume) and the
console report (summary, progress bars, one line per epoch). ``hiercls fit`` and
``hiercls.HierarchicalImageClassifier`` both train through ``fit`` here.

Data are decoded once into a uint8 cache (or handed over decoded, ``TrainingSource``) and kept
as one tensor (on the GPU when it fits); augmentation runs on the device.

Started by ``torchrun`` (``WORLD_SIZE`` > 1) the same loop runs data-parallel: each unit's
module is wrapped in ``DistributedDataParallel``, every process takes a disjoint share of
each global batch of the same seeded order (what ``DistributedSampler`` does), and only
rank 0 writes files, validates and shows progress.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from hiercls.augment import BatchAugment
from hiercls.config import FitConfig
from hiercls.console import EpochProgress, bars_enabled
from hiercls.data.coverage import check_training_coverage
from hiercls.errors import ConfigError, DataError
from hiercls.inference import build_model, normalization_stats
from hiercls.run import RunPaths, check_run_dir
from hiercls.runtime import configure_backends, resolve_device, use_channels_last
from hiercls.taxonomy import Taxonomy, load_taxonomy
from hiercls.training.run_folder import RunFolder, open_run_folder, restore_last
from hiercls.training.trainer import (
    CHECK_EVERY,
    Callback,
    Dist,
    StopFlag,
    Trainer,
    TrainingData,
    TrainingError,
    TrainingUnit,
    build_units,
    validation_metrics,
)

__all__ = ["fit", "RunResult", "TrainingError", "TrainingSource", "validation_metrics", "CHECK_EVERY"]

#: How long a process of a multi-process run waits for the others at a collective.
PROCESS_GROUP_TIMEOUT = timedelta(minutes=60)


@dataclass
class RunResult:
    """What a finished (or interrupted) ``fit`` leaves behind."""

    run_dir: Path
    epochs_completed: int
    best_epoch: int | None
    best_metric_name: str
    best_metric: float | None
    last_metrics: dict[str, Any] = field(default_factory=dict)
    interrupted: bool = False


# -- data preparation ---------------------------------------------------------------------


@dataclass
class TrainingSource:
    """Training images handed to ``fit`` in memory instead of read from ``config.data``.

    ``table`` lists the labelled images (for decoded ``images`` its paths only name them);
    ``images`` are the decoded ``uint8 [N, img_size, img_size, 3]`` pixels in table order
    (resized as the image cache resizes), or ``None`` to decode ``table.paths`` through the
    cache; ``val_idx`` fixes the validation rows (``None``: split as the config says).
    """

    table: Any  # ImageTable
    images: np.ndarray | None = None
    val_idx: np.ndarray | None = None


@dataclass
class _Prepared:
    taxonomy: Taxonomy
    table: Any  # ImageTable of the usable images
    train_idx: np.ndarray
    val_idx: np.ndarray
    dropped: int
    split_note: str
    images: np.ndarray | None = None  # decoded in memory (TrainingSource); None: through the cache


def _prepare_data(config: FitConfig, source: TrainingSource | None = None) -> _Prepared:
    from hiercls.data import load_images

    full = load_taxonomy(config.taxonomy)
    taxonomy = full.exclude(config.exclude) if config.exclude else full
    if source is None:
        table = load_images(config.data, taxonomy=full, group_regex=config.group_regex, require_labels=True)
        images, fixed_val = None, None
    else:
        table, images = source.table, source.images
        fixed_val = None if source.val_idx is None else np.isin(np.arange(len(table)), source.val_idx)
    keep = np.array([label in taxonomy.index for label in table.labels], dtype=bool)
    dropped = int((~keep).sum())
    if dropped:
        table = table.subset(np.where(keep)[0])
        images = None if images is None else images[keep]
        fixed_val = None if fixed_val is None else fixed_val[keep]
    if len(table) == 0:
        raise DataError(f"{config.data}: no labelled images left to train on (after excluding {config.exclude})")
    if fixed_val is not None:
        train_idx, val_idx, note = np.where(~fixed_val)[0], np.where(fixed_val)[0], "validation data given"
    else:
        train_idx, val_idx, note = _split(config, table)
    return _Prepared(taxonomy, table, np.asarray(train_idx), np.asarray(val_idx), dropped, note, images)


def _split(config: FitConfig, table) -> tuple[np.ndarray, np.ndarray, str]:
    """Train / validation rows as the config says: a cross-validation fold, a fraction, or none."""
    from hiercls.data import grouped_kfold, grouped_train_val_split

    split_seed = config.seed if config.split_seed is None else config.split_seed
    if config.folds is not None:
        folds = grouped_kfold(table, config.folds, split_seed)
        train_idx, val_idx = folds[config.fold]
        return train_idx, val_idx, f"fold {config.fold} of {config.folds}"
    if config.effective_val_fraction > 0:
        asked = config.effective_val_fraction
        train_idx, val_idx = grouped_train_val_split(table, asked, split_seed)
        return train_idx, val_idx, _val_fraction_note(asked, len(val_idx) / len(table))
    return np.arange(len(table)), np.arange(0), "no validation set"


def _val_fraction_note(asked: float, achieved: float) -> str:
    """The summary's split note with the share really achieved (the split takes 1/k of the groups)."""
    from hiercls.data.splits import val_fraction_folds

    k = val_fraction_folds(asked)
    if abs(1.0 / k - asked) > 0.005:
        return f"val_fraction {achieved:.2f}: 1/{k} of the groups, {asked:g} asked"
    return f"val_fraction {achieved:.2f}, {asked:g} asked"


def _split_record(table, train_idx: np.ndarray, val_idx: np.ndarray) -> dict[str, list[str]]:
    return {
        "train": [str(table.paths[i]) for i in train_idx],
        "val": [str(table.paths[i]) for i in val_idx],
    }


def _load_cache(config: FitConfig, paths: list[Path], progress: bool) -> np.ndarray:
    from hiercls.data import ImageCache

    cache = ImageCache(config.cache_dir, workers=config.num_workers or None)
    return cache.load(paths, config.img_size, progress=progress)


def _images_on_device(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """The decoded training set as one uint8 tensor: on the GPU if it fits, else in host memory.

    The host copy is not pinned: pinning rounds the allocation up to a power of two (a 33 GB
    set would pin 64 GB); each batch is gathered into a pinned staging buffer instead (``_gather``).
    """
    tensor = torch.from_numpy(np.ascontiguousarray(images))
    if device.type != "cuda":
        return tensor
    free, _total = torch.cuda.mem_get_info(device)
    if tensor.numel() < 0.4 * free:
        return tensor.to(device)
    return tensor


# -- processes and devices ----------------------------------------------------------------


def _init_distributed(config: FitConfig) -> Dist:
    """Join the process group that ``torchrun`` describes in WORLD_SIZE / RANK / LOCAL_RANK."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return Dist()
    if config.batch_size % world:
        raise ConfigError(
            f"--batch-size {config.batch_size} is the global batch and must divide evenly over the {world} "
            f"processes; use a multiple of {world} (e.g. {config.batch_size - config.batch_size % world or world})"
        )
    if not torch.distributed.is_available():
        raise ConfigError("this PyTorch build has no torch.distributed; run hiercls fit as a single process")
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    owned = False
    if not torch.distributed.is_initialized():
        cuda = config.device != "cpu" and torch.cuda.is_available()
        if cuda:
            _check_local_rank(rank, local_rank)
            torch.cuda.set_device(local_rank)
        # generous: rank 0 may decode a large dataset into the cache while the others wait;
        # when a process fails, torchrun stops the others rather than leaving them waiting
        torch.distributed.init_process_group(backend="nccl" if cuda else "gloo", timeout=PROCESS_GROUP_TIMEOUT)
        owned = True
    return Dist(world, rank, local_rank, owned)


def _process_device(config: FitConfig, dist: Dist) -> torch.device:
    """``config.device``; under torchrun, CUDA device ``LOCAL_RANK`` of this machine."""
    device = resolve_device(config.device)
    if dist.active and device.type == "cuda":
        _check_local_rank(dist.rank, dist.local_rank)
        device = torch.device("cuda", dist.local_rank)
    return device


def _check_local_rank(rank: int, local_rank: int) -> None:
    if local_rank >= torch.cuda.device_count():
        raise ConfigError(
            f"process {rank} has LOCAL_RANK {local_rank} but this machine has "
            f"{torch.cuda.device_count()} CUDA device(s); use --nproc-per-node {torch.cuda.device_count()} or less"
        )


# -- interruption ---------------------------------------------------------------------------


@contextmanager
def _sigint_sets(flag: StopFlag):
    """While training, Ctrl-C asks the loop to stop after the current step (a second one aborts)."""
    try:
        previous = signal.getsignal(signal.SIGINT)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return

    def handler(signum, frame):
        if flag.requested:
            signal.signal(signal.SIGINT, previous)
            raise KeyboardInterrupt
        flag.requested = True

    try:
        signal.signal(signal.SIGINT, handler)
    except ValueError:
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


# -- the loop -----------------------------------------------------------------------------


def fit(
    config: FitConfig,
    console: Console | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    on_step: Callable[[int, str, int], None] | None = None,
    source: TrainingSource | None = None,
) -> RunResult:
    """Train a model as ``config`` says and write a run directory at ``config.out``.

    ``resume`` continues the run in ``config.out`` from its last checkpoint; ``overwrite``
    replaces a previous hiercls run there. ``on_step(epoch, unit_name, step)`` is called
    after every optimizer step (for progress hooks, benchmarks and tests). Under
    ``torchrun`` every process calls ``fit``; rank 0 writes the run and its result is the
    one to read (the others receive the same best epoch and metrics). ``source`` hands
    the images over in memory (``TrainingSource``) instead of reading ``config.data``.
    """
    config = _absolute_paths(config)
    dist = _init_distributed(config)
    try:
        return _fit(config, console, dist, resume=resume, overwrite=overwrite, progress=progress, on_step=on_step,
                    source=source)
    finally:
        dist.close()


def _fit(config: FitConfig, console: Console | None, dist: Dist, *, resume: bool, overwrite: bool,
         progress: bool, on_step: Callable[[int, str, int], None] | None,
         source: TrainingSource | None = None) -> RunResult:
    """Check everything a run needs (device, data, tree coverage, model), then open its folder.

    Nothing is written before these checks pass, so a fit refused for a user mistake leaves
    no run folder behind (and a later attempt needs no --overwrite).
    """
    console = console or Console(stderr=True)
    if not dist.main:
        console, progress = Console(stderr=True, quiet=True), False
    dist.on_main(lambda: check_run_dir(config.out, resume=resume, overwrite=overwrite))
    torch.manual_seed(config.seed)
    device = _process_device(config, dist)
    configure_backends(device, config.deterministic)
    prepared = _prepare_data(config, source)
    taxonomy, table = prepared.taxonomy, prepared.table
    check_training_coverage(taxonomy, [table.labels[i] for i in prepared.train_idx], config.allow_incomplete_tree)
    train_labels = table.label_indices(taxonomy)[prepared.train_idx]
    class_counts = np.bincount(train_labels, minlength=taxonomy.num_nodes).astype(np.float64)
    model = build_model(config, taxonomy, class_counts)
    with open_run_folder(config, dist, resume=resume, overwrite=overwrite) as paths:
        return _train(config, console, dist, paths, prepared, model, device, resume=resume, progress=progress,
                      on_step=on_step)


def _train(config: FitConfig, console: Console, dist: Dist, paths: RunPaths, prepared: _Prepared, model,
           device: torch.device, *, resume: bool, progress: bool,
           on_step: Callable[[int, str, int], None] | None) -> RunResult:
    taxonomy, table = prepared.taxonomy, prepared.table
    train_labels = table.label_indices(taxonomy)[prepared.train_idx]
    class_counts = np.bincount(train_labels, minlength=taxonomy.num_nodes).astype(np.float64)
    folder = RunFolder(paths, config, taxonomy, class_counts, model, dist)
    folder.write_start(_split_record(table, prepared.train_idx, prepared.val_idx), resume)
    folder.check_space(resume)
    channels_last = use_channels_last(config.channels_last, device)
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    units = build_units(config, model, train_labels, dist, device)
    state = restore_last(paths, model, units, device) if resume else None
    if state is not None and state.start_epoch > config.epochs:
        raise ConfigError(
            f"{paths.root}: the run has already finished {state.start_epoch} epochs; --epochs {config.epochs} "
            "cannot go back (use --epochs larger than that to train longer)"
        )
    _print_summary(console, config, prepared, units, device, state.start_epoch if state else 0, dist)
    data = _training_data(config, prepared, train_labels, device, dist, progress)
    mean, std = normalization_stats(model)
    augment = BatchAugment(config.augment, mean, std, channels_last,
                           compile_batch_size=config.batch_size // dist.world if config.compile else None)
    callbacks: list[Callback] = [folder, _ConsoleReport(console, config, paths, progress, dist)]
    if on_step is not None:
        callbacks.append(_StepHook(on_step))
    validating = {"progress": bars_enabled(console, progress), "description": "validating", "console": console}
    trainer = Trainer(config, taxonomy, model, units, data, augment, device, dist=dist, channels_last=channels_last,
                      callbacks=callbacks, resume=state, validation_progress=validating)
    with _sigint_sets(trainer.stop):
        epochs, interrupted = trainer.fit()
    return RunResult(paths.root, epochs, trainer.best_epoch, config.best_metric, trainer.best_metric,
                     trainer.last_metrics, interrupted)


def _training_data(config: FitConfig, prepared: _Prepared, train_labels: np.ndarray, device: torch.device,
                   dist: Dist, progress: bool) -> TrainingData:
    """The decoded training images on their device, their targets, and (rank 0) the validation images."""
    if not dist.main:
        dist.barrier()  # rank 0 decodes the images into the cache first; the others then read it
    all_images = prepared.images
    if all_images is None:
        all_images = _load_cache(config, list(prepared.table.paths), progress)
    if dist.main:
        dist.barrier()
    train_images = _images_on_device(all_images[prepared.train_idx], device)
    val_images = all_images[prepared.val_idx] if len(prepared.val_idx) and dist.main else None
    train_targets = torch.from_numpy(train_labels.astype(np.int64))
    if train_images.device.type == "cuda":
        train_targets = train_targets.to(device)
    val_true = [prepared.table.labels[i] for i in prepared.val_idx]
    return TrainingData(train_images, train_targets, val_images, val_true, has_val=len(prepared.val_idx) > 0)


class _StepHook(Callback):
    """``fit(on_step=...)``: called with (epoch, unit name, step) after every optimizer step."""

    def __init__(self, function: Callable[[int, str, int], None]):
        self.function = function

    def on_step(self, trainer, epoch, unit, step) -> None:
        self.function(epoch, unit.name, step)


class _ConsoleReport(Callback):
    """Progress while a unit trains (a bar, or a line now and then in a log), one line per epoch,
    and how to resume after Ctrl-C."""

    def __init__(self, console: Console, config: FitConfig, paths: RunPaths, progress: bool, dist: Dist):
        self.console, self.config, self.paths, self.dist = console, config, paths, dist
        self.progress = progress
        self.shown: EpochProgress | None = None

    def on_unit_begin(self, trainer, epoch, unit, skip) -> None:
        description = f"epoch {epoch + 1}/{self.config.epochs} {unit.name}"
        self.shown = EpochProgress(self.console, description, unit.steps_per_epoch, enabled=self.progress)
        self.shown.start(skip)

    def on_step(self, trainer, epoch, unit, step) -> None:
        self.shown.step(trainer.unit_sizes[step], lambda: trainer.running_loss(step))

    def on_check(self, trainer, epoch, unit, mean_loss, rate) -> None:
        self.shown.show_loss(mean_loss)

    def on_unit_end(self, trainer, epoch, unit) -> None:
        self.shown.stop()

    def on_epoch_end(self, trainer, epoch, record, improved) -> None:
        if self.dist.main:
            _print_epoch(self.console, record, self.config.best_metric, improved)

    def on_interrupt(self, trainer, epoch, unit_index, step, step_losses) -> None:
        self.console.print(
            f"[yellow]interrupted[/] at epoch {epoch + 1}, {trainer.units[unit_index].name} step {step + 1}; the state "
            f"is saved. Continue with: hiercls fit --out {self.paths.root} --resume"
        )


def _absolute_paths(config: FitConfig) -> FitConfig:
    update = {}
    for key in ("taxonomy", "data", "out", "pretrained", "cache_dir"):
        value = getattr(config, key)
        if value is not None:
            update[key] = Path(value).expanduser().resolve()
    return config.model_copy(update=update)


def _print_summary(console: Console, config: FitConfig, prepared: _Prepared, units: list[TrainingUnit], device, start_epoch: int,
                   dist: Dist | None = None) -> None:
    table = Table(title=f"hiercls fit -> {config.out}", show_header=False, box=None)
    n_train, n_val = len(prepared.train_idx), len(prepared.val_idx)
    groups = prepared.table.groups
    n_groups = len({g for g in groups if g is not None})
    table.add_row("images", f"{len(prepared.table)} ({n_train} train, {n_val} val; {prepared.split_note})")
    if prepared.dropped:
        table.add_row("excluded", f"{prepared.dropped} images labelled under {', '.join(config.exclude)}")
    table.add_row("groups", str(n_groups) if n_groups else "none (per-image split: neighbouring images may leak)")
    tree = prepared.taxonomy
    table.add_row("taxonomy", f"{tree.name}: {tree.num_nodes} nodes, {len(tree.leaves)} leaves")
    table.add_row("strategy", f"{config.strategy} ({len(units)} unit{'s' if len(units) != 1 else ''}: "
                  + ", ".join(f"{u.name} [{len(u.indices)} img]" for u in units) + ")")
    weights = f", weights {config.pretrained}" if config.pretrained else ", random init"
    table.add_row("backbone", f"{config.backbone} @ {config.img_size}px{weights}")
    table.add_row("optimiser", f"{config.optimizer} lr {config.lr:g}, {config.scheduler} schedule, batch {config.batch_size}")
    table.add_row("device", f"{device}" + (f", resuming at epoch {start_epoch + 1}" if start_epoch else ""))
    if dist is not None and dist.active:
        table.add_row("processes", f"{dist.world} (DistributedDataParallel; {config.batch_size // dist.world} images "
                      f"per process and step, global batch {config.batch_size})")
    console.print(table)
    for u in units:
        if u.steps_per_epoch == 0:
            console.print(
                f"[yellow]warning:[/] unit {u.name} has {len(u.indices)} training image(s), too few to train; "
                "its decision stays at its random initialisation"
            )


def _print_epoch(console: Console, record: dict[str, Any], best_name: str, improved: bool) -> None:
    losses = ", ".join(f"{k} {v:.4f}" for k, v in record["train_loss"].items() if v is not None)
    val = ""
    if "val_accuracy" in record:
        acc = record["val_accuracy"]
        acc_text = "–" if acc is None else f"{acc:.3f}"
        val = f" | val acc {acc_text} hF {record['val_hF']:.3f} loss {record['val_loss']:.4f}"
    star = f" [green]* best {best_name}[/]" if improved else ""
    console.print(f"epoch {record['epoch']}: train {losses}{val} ({record['images_per_second']} img/s){star}")
