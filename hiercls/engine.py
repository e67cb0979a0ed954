"""The training loop behind ``hiercls fit``.

One loop serves every strategy: a strategy hands out *training units* (one for flat and
joint, one per internal node for per_node, one per depth for per_level), each with its own
module, sample mask, loss, optimizer and schedule. Epochs are the outer loop and units the
inner one, so all units advance in lockstep and a checkpoint always holds the whole model.

Data are decoded once into a uint8 cache and kept as one tensor (on the GPU when it fits);
augmentation runs on the device. Every random choice comes from generators seeded by
(seed, epoch, unit), and their state is saved with the checkpoint, so an interrupted run
resumed with ``--resume`` ends exactly where an uninterrupted one would (on the CPU).

The loop never makes the host wait for the GPU inside a step: batch indices live on the
images' device, losses are accumulated on the device, and their finiteness (and the Ctrl-C
flag under several processes) is checked every ``CHECK_EVERY`` steps, at the end of every
unit's epoch and always before a checkpoint is written, so a non-finite model is never saved.

Started by ``torchrun`` (``WORLD_SIZE`` > 1) the same loop runs data-parallel: each unit's
module is wrapped in ``DistributedDataParallel``, every process takes a disjoint share of
each global batch of the same seeded order (what ``DistributedSampler`` does), and only
rank 0 writes files, validates and shows progress.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

import hiercls
from hiercls.augment import BatchAugment
from hiercls.checkpoint import (
    load_training_state,
    load_weights,
    read_metadata,
    recover_checkpoint,
    save_checkpoint,
    weights_checkpoint_id,
)
from hiercls.config import FitConfig
from hiercls.errors import CheckpointError, ConfigError, DataError, HierclsError
from hiercls.inference import (
    autocast_context,
    build_model,
    configure_backends,
    normalization_stats,
    predict_conditionals,
    resolve_device,
    use_channels_last,
)
from hiercls.io import RUN_FILE_BYTES, atomic_write_json, atomic_write_text, read_user_text
from hiercls.plugins import check_run_provenance, run_provenance
from hiercls.probabilities import NodeProbabilities
from hiercls.run import (
    RunLock,
    RunPaths,
    check_free_space,
    check_run_dir,
    checkpoint_bytes,
    existing_checkpoint_bytes,
    prepare_run_dir,
    remove_failed_run,
    remove_stale_temp_files,
)
from hiercls.taxonomy import Taxonomy, load_taxonomy

__all__ = ["fit", "RunResult", "TrainingError", "TrainingSource", "validation_metrics", "CHECK_EVERY"]

#: Steps between host-device synchronisations (loss finiteness, progress numbers, Ctrl-C
#: agreement between processes). Each unit's epoch also ends with one.
CHECK_EVERY = 25

#: How long a process of a multi-process run waits for the others at a collective.
PROCESS_GROUP_TIMEOUT = timedelta(minutes=60)


class TrainingError(HierclsError):
    """Training cannot go on (non-finite loss, out of memory); the last good checkpoint is kept."""


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

    if config.folds is not None:
        folds = grouped_kfold(table, config.folds, config.seed)
        train_idx, val_idx = folds[config.fold]
        return train_idx, val_idx, f"fold {config.fold} of {config.folds}"
    if config.effective_val_fraction > 0:
        train_idx, val_idx = grouped_train_val_split(table, config.effective_val_fraction, config.seed)
        return train_idx, val_idx, f"val_fraction {config.effective_val_fraction:g}"
    return np.arange(len(table)), np.arange(0), "no validation set"


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


# -- optimisation -------------------------------------------------------------------------


def _optimizer(config: FitConfig, params) -> torch.optim.Optimizer:
    """The configured optimizer; on CUDA the fused (Adam/AdamW) or foreach (SGD) kernels."""
    params = [p for p in params if p.requires_grad]
    cuda = bool(params) and all(p.is_cuda for p in params)
    if config.optimizer == "sgd":
        extra = {"foreach": True} if cuda else {}
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay, **extra)
    extra = {"fused": True} if cuda and _fused_available() else ({"foreach": True} if cuda else {})
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay, **extra)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, **extra)


def _fused_available() -> bool:
    import inspect

    return "fused" in inspect.signature(torch.optim.AdamW).parameters


def _scheduler(config: FitConfig, optimizer, steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    total = max(1, config.epochs * steps_per_epoch)
    warmup = int(round(config.warmup_epochs * steps_per_epoch))

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if config.scheduler == "none":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _batches(n: int, batch_size: int, min_last: int = 2) -> int:
    """Number of batches per epoch: full batches only, as timm trains.

    Every step then has the same shape, so a compiled model never meets a second batch size
    (which would cost a recompilation, or a slower dynamic-shape graph); each epoch draws a
    new order, so the images left over differ from epoch to epoch. A unit with fewer images
    than one batch trains on all of them in one step, if there are at least ``min_last``
    (BatchNorm needs 2 per process: ``min_last = 2 N`` under N processes).
    """
    full = n // batch_size
    if full:
        return full
    return 1 if n >= min_last else 0


def _epoch_seed(seed: int, epoch: int, unit: int) -> int:
    return (seed * 1_000_003 + epoch * 1_009 + unit) % (2**63 - 1)


@dataclass
class _Unit:
    name: str
    unit: Any
    forward: Callable
    indices: np.ndarray
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    steps_per_epoch: int


# -- processes and devices ----------------------------------------------------------------


@dataclass
class _Dist:
    """Where this process stands in a ``torchrun`` job (world 1: a plain single process)."""

    world: int = 1
    rank: int = 0
    local_rank: int = 0
    owned: bool = False  # this fit() started the process group and ends it

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def all_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.active:
            torch.distributed.all_reduce(tensor)
        return tensor

    def close(self) -> None:
        if self.owned and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _init_distributed(config: FitConfig) -> _Dist:
    """Join the process group that ``torchrun`` describes in WORLD_SIZE / RANK / LOCAL_RANK."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return _Dist()
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
    return _Dist(world, rank, local_rank, owned)


def _process_device(config: FitConfig, dist: _Dist) -> torch.device:
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


def _wrap(module: torch.nn.Module, dist: _Dist, device: torch.device, compile: bool):
    """The callable a unit trains through: DDP across processes, then ``torch.compile``.

    The module itself stays unwrapped inside the model, so validation and checkpoints see
    plain parameter names; the loss is computed outside the wrapper.
    """
    forward = module
    if dist.active:
        from torch.nn.parallel import DistributedDataParallel

        forward = DistributedDataParallel(
            module, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=False
        )
    if compile:
        # Static shapes: a batch of another size compiles a second static graph instead of a
        # dynamic-shape one that would then serve (more slowly) every later batch.
        forward = torch.compile(forward, dynamic=False)
    return forward


def _compiles(config: FitConfig, unit_images: int) -> bool:
    """Whether a unit trains through ``torch.compile``: with ``--compile``, if it has a full batch.

    A unit smaller than one batch (a rare node of per_node) takes one small step per epoch,
    whose size changes from fold to fold: not worth a compilation each time.
    """
    return config.compile and unit_images >= config.batch_size


def _allow_compiled_graphs(count: int) -> None:
    """Let dynamo keep ``count`` more graphs per function than this process has compiled so far.

    Every training unit is an instance of one of a few module classes, so their compiled
    graphs (one per backbone, head shape and batch size) share those classes' code objects
    and their recompile limit (8 by default); beyond it dynamo silently runs eagerly. A tree
    with many internal nodes, or the many cells ``hiercls cv`` trains in one process, would
    otherwise leave models uncompiled. The limit is process-wide and is only ever raised.
    """
    from torch._dynamo.utils import counters

    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    needed = int(counters["stats"]["unique_graphs"]) + count
    if getattr(config, name) < needed:
        setattr(config, name, needed)


# -- validation ---------------------------------------------------------------------------


def _leaf_accuracy(taxonomy: Taxonomy, true_nodes: list[str], predictions: list[str]) -> float | None:
    pairs = [(p, t) for p, t in zip(predictions, true_nodes) if taxonomy.is_leaf(t)]
    return float(np.mean([p == t for p, t in pairs])) if pairs else None


def validation_metrics(taxonomy: Taxonomy, probs: NodeProbabilities, true_nodes: list[str], decode: str, threshold: float) -> dict[str, Any]:
    """Validation numbers for one epoch: loss, accuracy, hierarchical P/R/F, per-node accuracy.

    ``val_loss`` is the mean negative log marginal probability of each image's label node,
    which is defined for every strategy and for partial labels alike.
    """
    label_idx = np.array([taxonomy.index[t] for t in true_nodes])
    p_true = probs.marginal[np.arange(len(label_idx)), label_idx]
    predictions = probs.decode(decode, threshold=threshold)
    out: dict[str, Any] = {
        "val_loss": float(-np.log(np.clip(p_true, 1e-12, 1.0)).mean()),
        # Exact match on images labelled at a leaf, like `hiercls evaluate`'s accuracy: a partial
        # label (an internal node) has no single right leaf; the hierarchical scores count it.
        "val_accuracy": _leaf_accuracy(taxonomy, true_nodes, predictions),
    }
    try:
        from hiercls import metrics
    except ImportError:
        metrics = None
    if metrics is not None and hasattr(metrics, "hierarchical_prf"):
        prf = metrics.hierarchical_prf(taxonomy, true_nodes, predictions)
    else:
        prf = _hierarchical_prf(taxonomy, true_nodes, predictions)
    out.update({f"val_{k}": float(v) for k, v in prf.items()})
    if metrics is not None and hasattr(metrics, "per_level_accuracy"):
        try:
            per_level = metrics.per_level_accuracy(taxonomy, true_nodes, predictions)
            out["val_per_level_accuracy"] = {
                k: (None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v))
                for k, v in dict(per_level).items()
            }
        except Exception:  # optional extra; a metrics-module change must not stop training
            pass
    return out


def _hierarchical_prf(taxonomy: Taxonomy, true_nodes: list[str], pred_nodes: list[str]) -> dict[str, float]:
    """Micro hP/hR/hF over ancestor sets, root excluded (used when hiercls.metrics is absent)."""
    inter = n_pred = n_true = 0
    for t, p in zip(true_nodes, pred_nodes):
        ts, ps = set(taxonomy.path(t)[1:]), set(taxonomy.path(p)[1:])
        inter, n_pred, n_true = inter + len(ts & ps), n_pred + len(ps), n_true + len(ts)
    hp = inter / n_pred if n_pred else 0.0
    hr = inter / n_true if n_true else 0.0
    return {"hP": hp, "hR": hr, "hF": 2 * hp * hr / (hp + hr) if hp + hr else 0.0}


def _is_better(name: str, value: float, best: float | None) -> bool:
    if not math.isfinite(value):  # a NaN metric is never the best epoch
        return False
    if best is None:
        return True
    return value < best if name == "val_loss" else value > best


# -- interruption ---------------------------------------------------------------------------


class _StopFlag:
    requested = False


@contextmanager
def _sigint_sets(flag: _StopFlag):
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


def _fit(config: FitConfig, console: Console | None, dist: _Dist, *, resume: bool, overwrite: bool,
         progress: bool, on_step: Callable[[int, str, int], None] | None,
         source: TrainingSource | None = None) -> RunResult:
    """Check everything a run needs (device, data, tree coverage, model), then open its folder.

    Nothing is written before these checks pass, so a fit refused for a user mistake leaves
    no run folder behind (and a later attempt needs no --overwrite).
    """
    console = console or Console(stderr=True)
    if not dist.main:
        console, progress = Console(stderr=True, quiet=True), False
    if dist.main:
        check_run_dir(config.out, resume=resume, overwrite=overwrite)
    torch.manual_seed(config.seed)
    device = _process_device(config, dist)
    configure_backends(device, config.deterministic)
    prepared = _prepare_data(config, source)
    taxonomy, table = prepared.taxonomy, prepared.table
    train_labels = table.label_indices(taxonomy)[prepared.train_idx]
    class_counts = np.bincount(train_labels, minlength=taxonomy.num_nodes).astype(np.float64)
    model = build_model(config, taxonomy, class_counts)
    with _run_folder(config, dist, resume=resume, overwrite=overwrite) as paths:
        return _train(config, console, dist, paths, prepared, model, device, resume=resume, progress=progress,
                      on_step=on_step)


@contextmanager
def _run_folder(config: FitConfig, dist: _Dist, *, resume: bool, overwrite: bool):
    """The run folder, locked for this fit; a new run that fails before it trained anything
    is removed again (the error says why; nothing of the user's is touched)."""
    if not dist.main:
        dist.barrier()
        yield RunPaths(Path(config.out))
        return
    root = Path(config.out)
    created = not root.exists()
    lock = RunLock(root)
    lock_existed = lock.path.exists()
    with lock:
        try:
            paths = prepare_run_dir(root, resume=resume, overwrite=overwrite)
        except BaseException:
            if not lock_existed:
                lock.path.unlink(missing_ok=True)
            if created:
                shutil.rmtree(root, ignore_errors=True)
            raise
        remove_stale_temp_files(paths)
        dist.barrier()
        try:
            yield paths
        except BaseException:
            if not resume:
                remove_failed_run(paths, created)
            raise


def _train(config: FitConfig, console: Console, dist: _Dist, paths: RunPaths, prepared: _Prepared, model,
           device: torch.device, *, resume: bool, progress: bool,
           on_step: Callable[[int, str, int], None] | None) -> RunResult:
    taxonomy, table = prepared.taxonomy, prepared.table
    split = _split_record(table, prepared.train_idx, prepared.val_idx)
    if resume:
        stored = json.loads(read_user_text(paths.split, "split", CheckpointError, max_bytes=RUN_FILE_BYTES)) \
            if paths.split.is_file() else None
        if stored != split:
            raise CheckpointError(
                f"{paths.split}: the images or split differ from when the run started; "
                "resume with the same data, or start a new run"
            )
    elif dist.main:
        atomic_write_text(paths.taxonomy, taxonomy.to_yaml())
        atomic_write_json(paths.split, split)
    if dist.main:
        atomic_write_text(paths.config, config.to_yaml())  # on resume: records a changed --epochs

    train_labels = table.label_indices(taxonomy)[prepared.train_idx]
    class_counts = np.bincount(train_labels, minlength=taxonomy.num_nodes).astype(np.float64)
    if dist.main:
        check_free_space(paths.root, checkpoint_bytes(model), existing_checkpoint_bytes(paths) if resume else 0)
    channels_last = use_channels_last(config.channels_last, device)
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)

    units: list[_Unit] = []
    if config.compile:
        _allow_compiled_graphs(2 * len(model.training_units()) + 2)
    for unit in model.training_units():
        indices = np.where(unit.sample_mask(train_labels))[0]
        steps = _batches(len(indices), config.batch_size, min_last=2 * dist.world)
        optimizer = _optimizer(config, unit.module.parameters())
        forward = _wrap(unit.module, dist, device, compile=_compiles(config, len(indices)))
        units.append(_Unit(unit.name, unit, forward, indices, optimizer, _scheduler(config, optimizer, steps), steps))

    start_epoch, best_metric, best_epoch, position = 0, None, None, None
    if resume:
        start_epoch, best_metric, best_epoch, position = _restore(paths, model, units, device)
        if start_epoch > config.epochs:
            raise ConfigError(
                f"{paths.root}: the run has already finished {start_epoch} epochs; --epochs {config.epochs} "
                "cannot go back (use --epochs larger than that to train longer)"
            )

    _print_summary(console, config, prepared, units, device, start_epoch, dist)
    if not dist.main:
        dist.barrier()  # rank 0 decodes the images into the cache first; the others then read it
    all_images = prepared.images if prepared.images is not None else _load_cache(config, list(table.paths), progress)
    if dist.main:
        dist.barrier()
    train_images = _images_on_device(all_images[prepared.train_idx], device)
    val_images = all_images[prepared.val_idx] if len(prepared.val_idx) and dist.main else None
    has_val = len(prepared.val_idx) > 0
    train_targets = torch.from_numpy(train_labels.astype(np.int64))
    if train_images.device.type == "cuda":
        train_targets = train_targets.to(device)
    mean, std = normalization_stats(model)
    augment = BatchAugment(config.augment, mean, std, channels_last,
                           compile_batch_size=config.batch_size // dist.world if config.compile else None)
    val_true = [table.labels[i] for i in prepared.val_idx]
    built_by = run_provenance(config.backbone, config.loss)

    def metadata(epoch: int, metrics: dict[str, Any], partial: bool = False) -> dict[str, Any]:
        import timm

        return {
            "hiercls_version": hiercls.__version__,
            "torch_version": torch.__version__,
            "timm_version": timm.__version__,
            "strategy": config.strategy,
            "backbone": config.backbone,
            "img_size": config.img_size,
            "epoch": epoch,
            "partial_epoch": partial,
            "taxonomy_fingerprint": taxonomy.fingerprint,
            "taxonomy": json.loads(json.dumps(taxonomy.to_dict(), default=str)),
            "label_map": list(taxonomy.nodes),
            "class_counts": class_counts.tolist(),
            "config": config.model_dump(mode="json"),
            "metrics": metrics,
            "best_metric_name": config.best_metric,
            "best_metric": best_metric,
            "best_epoch": best_epoch,
            "provenance": built_by,
        }

    generator = torch.Generator()
    running: dict[str, list[float]] = {}

    def save_last(epoch: int, metrics: dict[str, Any], next_position: dict[str, int], partial: bool = False,
                  step_losses: torch.Tensor | None = None) -> None:
        if not dist.main:
            return
        save_checkpoint(paths.checkpoints, "last", model, metadata(epoch, metrics, partial), training_state={
            "position": next_position,
            "best_metric": best_metric,
            "best_epoch": best_epoch,
            "units": [{"name": u.name, "optimizer": u.optimizer.state_dict(), "scheduler": u.scheduler.state_dict()} for u in units],
            "torch_rng": _rng_state(device),
            "generator": generator.get_state(),
            "running": running,
            "step_losses": None if step_losses is None else step_losses.detach().cpu(),
            "world_size": dist.world,
        })

    flag = _StopFlag()
    last_saved = loop_started = time.monotonic()
    previous = _read_metrics(paths, start_epoch) if resume else []
    last_metrics: dict[str, Any] = previous[-1] if previous else {}
    with _sigint_sets(flag):
        for epoch in range(start_epoch, config.epochs):
            t0 = time.perf_counter()
            images_seen = 0
            first_unit = position["unit"] if position else 0
            running = position["running"] if position else {}
            for ui, u in enumerate(units):
                if ui < first_unit:
                    continue
                seed = _epoch_seed(config.seed, epoch, ui)
                generator.manual_seed(seed)
                torch.manual_seed(seed)
                order = torch.from_numpy(u.indices)[torch.randperm(len(u.indices), generator=generator)]
                order = order.to(train_images.device, non_blocking=True)
                step_losses = torch.zeros(max(1, u.steps_per_epoch), dtype=_loss_dtype(device), device=device)
                skip = 0
                if position and ui == first_unit:
                    skip = position["step"]
                    generator.set_state(position["generator"])
                    _restore_rng(position["torch_rng"], device)
                    if position.get("step_losses") is not None:
                        step_losses.copy_(position["step_losses"].to(_loss_dtype(device)))
                position = None
                sizes = [min(config.batch_size, len(u.indices) - s * config.batch_size) for s in range(u.steps_per_epoch)]
                model.train()
                unit_t0, timed_from, total = time.perf_counter(), skip, None
                with _progress(console, progress, f"epoch {epoch + 1}/{config.epochs} {u.name}", u.steps_per_epoch) as (bar, task):
                    bar.advance(task, skip)
                    for step in range(skip, u.steps_per_epoch):
                        start = step * config.batch_size
                        global_idx = order[start : start + sizes[step]]
                        rows = _shard_rows(sizes[step], dist)
                        batch_idx = global_idx if rows is None else global_idx[rows.to(global_idx.device, non_blocking=True)]
                        loss = _train_step(u, train_images, train_targets, batch_idx, augment, generator, device,
                                           config, rows, sizes[step])
                        step_losses[step] = loss * sizes[step]
                        bar.advance(task, 1)
                        if on_step is not None:
                            on_step(epoch, u.name, step)
                        last = step == u.steps_per_epoch - 1
                        stop = flag.requested
                        if last or (step + 1 - skip) % CHECK_EVERY == 0 or (stop and not dist.active):
                            total, stop = _check(step_losses, step, flag, dist, epoch, u.name, config)
                            done = sum(sizes[timed_from : step + 1])
                            rate = done / max(1e-9, time.perf_counter() - unit_t0)
                            bar.update(task, loss=f"{total / max(1, sum(sizes[: step + 1])):.4f}", rate=f"{rate:.0f}")
                        elif dist.active:
                            stop = False  # processes agree on stopping only at a check
                        if stop:
                            save_last(epoch, last_metrics, {"epoch": epoch, "unit": ui, "step": step + 1}, partial=True,
                                      step_losses=step_losses)
                            dist.barrier()
                            console.print(
                                f"[yellow]interrupted[/] at epoch {epoch + 1}, {u.name} step {step + 1}; the state is "
                                f"saved. Continue with: hiercls fit --out {paths.root} --resume"
                            )
                            return RunResult(paths.root, epoch, best_epoch, config.best_metric, best_metric, last_metrics, True)
                if total is None and u.steps_per_epoch:  # resumed after the unit's last step
                    total, _ = _check(step_losses, u.steps_per_epoch - 1, _StopFlag(), dist, epoch, u.name, config)
                running[u.name] = [float(total), sum(sizes)] if u.steps_per_epoch else [0.0, 0]
                images_seen += sum(sizes[skip:])
            seconds = time.perf_counter() - t0
            # the whole epoch from the loop's start, previous epochs' validation and checkpoints included
            elapsed = time.monotonic() - loop_started
            record: dict[str, Any] = {
                "epoch": epoch + 1,
                "train_loss": {name: (s / n if n else None) for name, (s, n) in running.items()},
                "lr": {u.name: u.optimizer.param_groups[0]["lr"] for u in units},
                "seconds": round(seconds, 3),
                "elapsed_seconds": round(elapsed, 3),
                "images_per_second": round(images_seen / seconds, 1) if seconds > 0 else None,
            }
            _check_finite_weights(model, epoch, config)
            if val_images is not None and _validates(config, epoch):
                cond = _guard_oom(lambda: predict_conditionals(
                    model, val_images, batch_size=2 * config.batch_size, device=device, precision=config.precision,
                    channels_last=channels_last, progress=progress, description="validating", console=console,
                ), config)
                probs = NodeProbabilities.from_conditionals(taxonomy, cond)
                record.update(validation_metrics(taxonomy, probs, val_true, config.decode, config.threshold))
                _check_finite_validation(record, epoch, config)
            last_metrics = record
            if dist.main:
                _append_metrics(paths, record)
                value = record.get(config.best_metric)
                improved = has_val and value is not None and _is_better(config.best_metric, value, best_metric)
                final = epoch + 1 == config.epochs
                save = improved or final or time.monotonic() - last_saved >= 60 * config.checkpoint_minutes
                if improved or (save and not has_val):  # without validation, best is the latest saved
                    # best before last: last's state must never name unwritten best weights
                    best_metric, best_epoch = value, epoch + 1
                    save_checkpoint(paths.checkpoints, "best", model, metadata(epoch + 1, record))
                if save:
                    save_last(epoch + 1, record, {"epoch": epoch + 1, "unit": 0, "step": 0})
                    last_saved = time.monotonic()
                _print_epoch(console, record, config.best_metric, improved)
            dist.barrier()  # the others wait for validation and checkpoints
    if dist.active:
        shared = [best_epoch, best_metric, last_metrics]
        torch.distributed.broadcast_object_list(shared, src=0)
        best_epoch, best_metric, last_metrics = shared
    return RunResult(paths.root, config.epochs, best_epoch, config.best_metric, best_metric, last_metrics, False)


def _check_finite_weights(model: torch.nn.Module, epoch: int, config: FitConfig) -> None:
    """Stop before a model with NaN or inf weights is validated, selected or saved.

    A finite training loss does not prove finite weights: the loss is computed before the
    step that may overflow them (e.g. a huge --lr with one step per epoch). One sync per epoch.
    """
    tensors = [t for t in model.state_dict().values() if t.is_floating_point()]
    if not tensors or bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()):
        return
    raise TrainingError(
        f"the model's weights became non-finite (nan or inf) in epoch {epoch + 1}; training stopped, nothing "
        f"of this epoch is saved (earlier checkpoints are kept). Try a lower --lr (now {config.lr:g}) "
        "or --precision fp32"
    )


def _check_finite_validation(record: dict[str, Any], epoch: int, config: FitConfig) -> None:
    loss = record.get("val_loss")
    if loss is not None and not math.isfinite(loss):
        raise TrainingError(
            f"validation loss is {loss} after epoch {epoch + 1}; training stopped and nothing of this epoch "
            f"is saved (earlier checkpoints are kept). Try a lower --lr (now {config.lr:g}) or --precision fp32"
        )


def _validates(config: FitConfig, epoch: int) -> bool:
    """Whether epoch ``epoch`` (0-based) ends with validation: every ``val_every``-th, and the last."""
    done = epoch + 1
    return done % config.val_every == 0 or done == config.epochs


def _shard_rows(size: int, dist: _Dist) -> torch.Tensor | None:
    """This process's rows of a global batch of ``size`` images (every ``world``-th, from ``rank``)."""
    if not dist.active:
        return None
    return torch.arange(dist.rank, size, dist.world)


def _check(step_losses: torch.Tensor, step: int, flag: _StopFlag, dist: _Dist, epoch: int, unit: str,
           config: FitConfig) -> tuple[float, bool]:
    """The one host-device sync of a stretch of steps: summed loss so far, stop agreement.

    Raises ``TrainingError`` when a loss of the stretch was not finite (on every process at once).
    """
    packed = torch.stack([step_losses[: step + 1].sum(), step_losses.new_tensor(float(flag.requested))])
    packed = dist.all_sum(packed)
    total, stop = packed.tolist()
    total /= dist.world
    if not math.isfinite(total):
        raise TrainingError(
            f"loss became {total} at epoch {epoch + 1} in unit '{unit}'; training stopped and the "
            f"last good checkpoint is kept. Try a lower --lr (now {config.lr:g}) or --precision fp32"
        )
    return total, stop > 0


def _absolute_paths(config: FitConfig) -> FitConfig:
    update = {}
    for key in ("taxonomy", "data", "out", "pretrained", "cache_dir"):
        value = getattr(config, key)
        if value is not None:
            update[key] = Path(value).expanduser().resolve()
    return config.model_copy(update=update)


def _read_metrics(paths: RunPaths, up_to_epoch: int) -> list[dict[str, Any]]:
    """The metrics lines of epochs 1..up_to_epoch (later lines belong to an unsaved epoch)."""
    if not paths.metrics.is_file():
        return []
    text = read_user_text(paths.metrics, "metrics", CheckpointError, max_bytes=RUN_FILE_BYTES)
    records = [json.loads(line) for line in text.splitlines() if line.strip()]
    return [r for r in records if r.get("epoch", 0) <= up_to_epoch]


def _append_metrics(paths: RunPaths, record: dict[str, Any]) -> None:
    records = _read_metrics(paths, record["epoch"] - 1) + [record]
    atomic_write_text(paths.metrics, "".join(json.dumps(r) + "\n" for r in records))


def _train_step(u: _Unit, images: torch.Tensor, targets: torch.Tensor, batch_idx: torch.Tensor, augment: BatchAugment,
                generator: torch.Generator, device: torch.device, config: FitConfig,
                rows: torch.Tensor | None = None, global_size: int | None = None) -> torch.Tensor:
    """One optimizer step of one unit; returns the detached loss, left on the device (no sync)."""
    batch, labels = _gather(images, targets, batch_idx, device)
    try:
        x = augment(batch, generator, rows=rows, global_size=global_size)
        with autocast_context(device, config.precision):
            outputs = u.forward(x)
            loss, _parts = u.unit.compute_loss(outputs, labels)
        u.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        u.optimizer.step()
        u.scheduler.step()
    except (torch.cuda.OutOfMemoryError, RuntimeError) as exc:
        if not _is_out_of_memory(exc):
            raise
        raise TrainingError(
            f"out of GPU memory at batch size {config.batch_size} ({u.name}); try --batch-size "
            f"{max(1, config.batch_size // 2)} or a smaller --img-size"
        ) from None
    return loss.detach().to(_loss_dtype(device))


def _loss_dtype(device: torch.device) -> torch.dtype:
    """Step losses are summed in float64, except on Apple's MPS, which has no float64."""
    return torch.float32 if device.type == "mps" else torch.float64


def _gather(images: torch.Tensor, targets: torch.Tensor, idx: torch.Tensor, device: torch.device):
    """The uint8 images and labels of ``idx`` on ``device``.

    Resident images are indexed where they are; host images bound for a GPU are gathered
    straight into a pinned staging buffer and copied without blocking the host.
    """
    if images.device.type == "cuda" or device.type == "cpu":
        return images[idx], targets[idx]
    idx = idx.cpu()
    staged = torch.empty((len(idx), *images.shape[1:]), dtype=images.dtype, pin_memory=device.type == "cuda")
    torch.index_select(images, 0, idx, out=staged)
    return staged.to(device, non_blocking=True), targets[idx].to(device, non_blocking=True)


def _is_out_of_memory(exc: BaseException) -> bool:
    """torch raises OutOfMemoryError, but some kernels still raise a plain RuntimeError."""
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _guard_oom(call: Callable, config: FitConfig):
    try:
        return call()
    except (torch.cuda.OutOfMemoryError, RuntimeError) as exc:
        if not _is_out_of_memory(exc):
            raise
        raise TrainingError(
            f"out of GPU memory while validating at batch size {config.batch_size}; try --batch-size "
            f"{max(1, config.batch_size // 2)}"
        ) from None


def _restore(paths: RunPaths, model, units: list[_Unit], device: torch.device):
    """Load weights, optimizer/scheduler state and loop position from the last checkpoint."""
    recover_checkpoint(paths.checkpoints, "last")  # finish (or drop) a save a kill interrupted
    config_meta = read_metadata(paths.metadata("last"))
    stored = config_meta.get("config") or {}
    check_run_provenance(config_meta, stored.get("backbone", ""), stored.get("loss", "ce"), str(paths.metadata("last")))
    load_weights(paths.weights("last"), model)
    state = load_training_state(paths.state, max_bytes=checkpoint_bytes(model))
    ids = {
        "weights": weights_checkpoint_id(paths.weights("last")),
        "training state": state.get("checkpoint_id"),
        "metadata": read_metadata(paths.metadata("last")).get("checkpoint_id"),
    }
    if len(set(ids.values())) != 1:
        raise CheckpointError(
            f"{paths.checkpoints}: the parts of the last checkpoint do not belong together "
            f"({', '.join(f'{k} {v}' for k, v in ids.items())}); it cannot be resumed safely. "
            "Start again with --overwrite, or predict with --checkpoint best"
        )
    names = [s["name"] for s in state["units"]]
    if names != [u.name for u in units]:
        raise CheckpointError(f"{paths.state}: training units {names} differ from the model's; cannot resume")
    for u, saved in zip(units, state["units"]):
        u.optimizer.load_state_dict(saved["optimizer"])
        u.scheduler.load_state_dict(saved["scheduler"])
    position = dict(state["position"])
    if position.get("step", 0) or position.get("unit", 0):
        position.update(generator=state["generator"], torch_rng=state["torch_rng"], running=state.get("running", {}),
                        step_losses=state.get("step_losses"))
    else:
        _restore_rng(state["torch_rng"], device)
        position = None
    start_epoch = state["position"]["epoch"]
    return start_epoch, state.get("best_metric"), state.get("best_epoch"), position


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """torch's random state on the host and, on CUDA, the device's (dropout, drop-path)."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _restore_rng(state: dict[str, torch.Tensor] | torch.Tensor, device: torch.device) -> None:
    if isinstance(state, torch.Tensor):  # checkpoints of hiercls 0.1.0 kept the host state only
        state = {"cpu": state}
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


@contextmanager
def _progress(console: Console, enabled: bool, description: str, total: int):
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("{task.fields[rate]} img/s"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        disable=not enabled,
    )
    with bar:
        task = bar.add_task(description, total=total, loss="-", rate="-")
        yield bar, task


def _print_summary(console: Console, config: FitConfig, prepared: _Prepared, units: list[_Unit], device, start_epoch: int,
                   dist: _Dist | None = None) -> None:
    table = Table(title=f"hiercls fit -> {config.out}", show_header=False, box=None)
    n_train, n_val = len(prepared.train_idx), len(prepared.val_idx)
    groups = prepared.table.groups
    n_groups = len({g for g in groups if g is not None})
    table.add_row("images", f"{len(prepared.table)} ({n_train} train, {n_val} val; {prepared.split_note})")
    if prepared.dropped:
        table.add_row("excluded", f"{prepared.dropped} images labelled under {', '.join(config.exclude)}")
    table.add_row("groups", str(n_groups) if n_groups else "none (per-image split: neighbouring images may leak)")
    table.add_row("taxonomy", f"{prepared.taxonomy.name}: {prepared.taxonomy.num_nodes} nodes, {len(prepared.taxonomy.leaves)} leaves")
    table.add_row("strategy", f"{config.strategy} ({len(units)} unit{'s' if len(units) != 1 else ''}: "
                  + ", ".join(f"{u.name} [{len(u.indices)} img]" for u in units) + ")")
    table.add_row("backbone", f"{config.backbone} @ {config.img_size}px" + (f", weights {config.pretrained}" if config.pretrained else ", random init"))
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
