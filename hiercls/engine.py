"""The training loop behind ``hiercls fit``.

One loop serves every strategy: a strategy hands out *training units* (one for flat and
joint, one per internal node for per_node, one per depth for per_level), each with its own
module, sample mask, loss, optimizer and schedule. Epochs are the outer loop and units the
inner one, so all units advance in lockstep and a checkpoint always holds the whole model.

Data are decoded once into a uint8 cache and kept as one tensor (on the GPU when it fits);
augmentation runs on the device. Every random choice comes from generators seeded by
(seed, epoch, unit), and their state is saved with the checkpoint, so an interrupted run
resumed with ``--resume`` ends exactly where an uninterrupted one would (on the CPU).
"""

from __future__ import annotations

import json
import math
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

import hiercls
from hiercls.augment import BatchAugment
from hiercls.checkpoint import (
    atomic_write_json,
    atomic_write_text,
    load_training_state,
    load_weights,
    save_checkpoint,
    save_training_state,
)
from hiercls.config import FitConfig
from hiercls.errors import CheckpointError, ConfigError, DataError, HierclsError
from hiercls.inference import (
    autocast_context,
    build_model,
    normalization_stats,
    predict_conditionals,
    resolve_device,
    use_channels_last,
)
from hiercls.probabilities import NodeProbabilities
from hiercls.run import RunPaths, prepare_run_dir
from hiercls.taxonomy import Taxonomy, load_taxonomy

__all__ = ["fit", "RunResult", "TrainingError", "validation_metrics"]


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
class _Prepared:
    taxonomy: Taxonomy
    table: Any  # ImageTable of the usable images
    train_idx: np.ndarray
    val_idx: np.ndarray
    dropped: int
    split_note: str


def _prepare_data(config: FitConfig) -> _Prepared:
    from hiercls.data import grouped_kfold, grouped_train_val_split, load_images

    full = load_taxonomy(config.taxonomy)
    taxonomy = full.exclude(config.exclude) if config.exclude else full
    table = load_images(config.data, taxonomy=full, group_regex=config.group_regex, require_labels=True)
    keep = np.array([label in taxonomy.index for label in table.labels], dtype=bool)
    dropped = int((~keep).sum())
    if dropped:
        table = table.subset(np.where(keep)[0])
    if len(table) == 0:
        raise DataError(f"{config.data}: no labelled images left to train on (after excluding {config.exclude})")
    if config.folds is not None:
        folds = grouped_kfold(table, config.folds, config.seed)
        train_idx, val_idx = folds[config.fold]
        note = f"fold {config.fold} of {config.folds}"
    elif config.effective_val_fraction > 0:
        train_idx, val_idx = grouped_train_val_split(table, config.effective_val_fraction, config.seed)
        note = f"val_fraction {config.effective_val_fraction:g}"
    else:
        train_idx, val_idx = np.arange(len(table)), np.arange(0)
        note = "no validation set"
    return _Prepared(taxonomy, table, np.asarray(train_idx), np.asarray(val_idx), dropped, note)


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
    """The decoded training set as one uint8 tensor: on the GPU if it fits, else pinned memory."""
    tensor = torch.from_numpy(np.ascontiguousarray(images))
    if device.type != "cuda":
        return tensor
    free, _total = torch.cuda.mem_get_info(device)
    if tensor.numel() < 0.4 * free:
        return tensor.to(device)
    return tensor.pin_memory()


# -- optimisation -------------------------------------------------------------------------


def _optimizer(config: FitConfig, params) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


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


def _batches(n: int, batch_size: int) -> int:
    """Number of batches per epoch; a trailing batch of one image is dropped (BatchNorm needs 2)."""
    full, rest = divmod(n, batch_size)
    return full + (1 if rest > 1 else 0)


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


# -- validation ---------------------------------------------------------------------------


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
        "val_accuracy": float(np.mean([p == t for p, t in zip(predictions, true_nodes)])),
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
) -> RunResult:
    """Train a model as ``config`` says and write a run directory at ``config.out``.

    ``resume`` continues the run in ``config.out`` from its last checkpoint; ``overwrite``
    replaces a previous hiercls run there. ``on_step(epoch, unit_name, step)`` is called
    after every optimizer step (for progress hooks and tests).
    """
    console = console or Console(stderr=True)
    config = _absolute_paths(config)
    paths = prepare_run_dir(config.out, resume=resume, overwrite=overwrite)
    torch.manual_seed(config.seed)
    device = resolve_device(config.device)
    prepared = _prepare_data(config)
    taxonomy, table = prepared.taxonomy, prepared.table
    split = _split_record(table, prepared.train_idx, prepared.val_idx)
    if resume:
        stored = json.loads(paths.split.read_text(encoding="utf-8")) if paths.split.is_file() else None
        if stored != split:
            raise CheckpointError(
                f"{paths.split}: the images or split differ from when the run started; "
                "resume with the same data, or start a new run"
            )
    else:
        atomic_write_text(paths.taxonomy, taxonomy.to_yaml())
        atomic_write_json(paths.split, split)
    atomic_write_text(paths.config, config.to_yaml())  # on resume: records a changed --epochs

    label_idx = table.label_indices(taxonomy)
    train_labels = label_idx[prepared.train_idx]
    class_counts = np.bincount(train_labels, minlength=taxonomy.num_nodes).astype(np.float64)
    model = build_model(config, taxonomy, class_counts)
    channels_last = use_channels_last(config.channels_last, device)
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)

    units: list[_Unit] = []
    for unit in model.training_units():
        indices = np.where(unit.sample_mask(train_labels))[0]
        steps = _batches(len(indices), config.batch_size)
        optimizer = _optimizer(config, unit.module.parameters())
        forward = torch.compile(unit.module) if config.compile else unit.module
        units.append(_Unit(unit.name, unit, forward, indices, optimizer, _scheduler(config, optimizer, steps), steps))

    start_epoch, best_metric, best_epoch, position = 0, None, None, None
    if resume:
        start_epoch, best_metric, best_epoch, position = _restore(paths, model, units)
        if start_epoch > config.epochs:
            raise ConfigError(
                f"{paths.root}: the run has already finished {start_epoch} epochs; --epochs {config.epochs} "
                "cannot go back (use --epochs larger than that to train longer)"
            )

    _print_summary(console, config, prepared, units, device, start_epoch)
    all_images = _load_cache(config, list(table.paths), progress)
    train_images = _images_on_device(all_images[prepared.train_idx], device)
    val_images = all_images[prepared.val_idx] if len(prepared.val_idx) else None
    train_targets = torch.from_numpy(train_labels.astype(np.int64))
    if train_images.device.type == "cuda":
        train_targets = train_targets.to(device)
    mean, std = normalization_stats(model)
    augment = BatchAugment(config.augment, mean, std, channels_last)
    val_true = [table.labels[i] for i in prepared.val_idx]

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
        }

    generator = torch.Generator()
    running: dict[str, list[float]] = {}

    def save_last(epoch: int, metrics: dict[str, Any], next_position: dict[str, int], partial: bool = False) -> None:
        save_checkpoint(paths.checkpoints, "last", model, metadata(epoch, metrics, partial))
        save_training_state(paths.state, {
            "position": next_position,
            "best_metric": best_metric,
            "best_epoch": best_epoch,
            "units": [{"name": u.name, "optimizer": u.optimizer.state_dict(), "scheduler": u.scheduler.state_dict()} for u in units],
            "torch_rng": torch.get_rng_state(),
            "generator": generator.get_state(),
            "running": running,
        })

    flag = _StopFlag()
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
                skip = 0
                if position and ui == first_unit:
                    skip = position["step"]
                    generator.set_state(position["generator"])
                    torch.set_rng_state(position["torch_rng"])
                position = None
                sums = running.setdefault(u.name, [0.0, 0])
                model.train()
                seen, unit_t0 = 0, time.perf_counter()
                with _progress(console, progress, f"epoch {epoch + 1}/{config.epochs} {u.name}", u.steps_per_epoch) as (bar, task):
                    bar.advance(task, skip)
                    for step in range(skip, u.steps_per_epoch):
                        batch_idx = order[step * config.batch_size : (step + 1) * config.batch_size]
                        loss, _parts = _train_step(u, train_images, train_targets, batch_idx, augment, generator, device, config, epoch)
                        sums[0] += float(loss) * len(batch_idx)
                        sums[1] += len(batch_idx)
                        seen += len(batch_idx)
                        rate = seen / max(1e-9, time.perf_counter() - unit_t0)
                        bar.update(task, advance=1, loss=f"{sums[0] / sums[1]:.4f}", rate=f"{rate:.0f}")
                        if on_step is not None:
                            on_step(epoch, u.name, step)
                        if flag.requested:
                            save_last(epoch, last_metrics, {"epoch": epoch, "unit": ui, "step": step + 1}, partial=True)
                            console.print(
                                f"[yellow]interrupted[/] at epoch {epoch + 1}, {u.name} step {step + 1}; the state is "
                                f"saved. Continue with: hiercls fit --out {paths.root} --resume"
                            )
                            return RunResult(paths.root, epoch, best_epoch, config.best_metric, best_metric, last_metrics, True)
                images_seen += seen
            seconds = time.perf_counter() - t0
            record: dict[str, Any] = {
                "epoch": epoch + 1,
                "train_loss": {name: (s / n if n else None) for name, (s, n) in running.items()},
                "lr": {u.name: u.optimizer.param_groups[0]["lr"] for u in units},
                "seconds": round(seconds, 3),
                "images_per_second": round(images_seen / seconds, 1) if seconds > 0 else None,
            }
            if val_images is not None:
                cond = _guard_oom(lambda: predict_conditionals(
                    model, val_images, batch_size=config.batch_size, device=device, precision=config.precision,
                    channels_last=channels_last, progress=progress, description="validating", console=console,
                ), config)
                probs = NodeProbabilities.from_conditionals(taxonomy, cond)
                record.update(validation_metrics(taxonomy, probs, val_true, config.decode, config.threshold))
            last_metrics = record
            _append_metrics(paths, record)
            value = record.get(config.best_metric)
            improved = val_images is None or (value is not None and _is_better(config.best_metric, value, best_metric))
            if improved:
                best_metric, best_epoch = value, epoch + 1
            save_last(epoch + 1, record, {"epoch": epoch + 1, "unit": 0, "step": 0})
            if improved:
                save_checkpoint(paths.checkpoints, "best", model, metadata(epoch + 1, record))
            _print_epoch(console, record, config.best_metric, improved and val_images is not None)
    return RunResult(paths.root, config.epochs, best_epoch, config.best_metric, best_metric, last_metrics, False)


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
    records = [json.loads(line) for line in paths.metrics.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r for r in records if r.get("epoch", 0) <= up_to_epoch]


def _append_metrics(paths: RunPaths, record: dict[str, Any]) -> None:
    records = _read_metrics(paths, record["epoch"] - 1) + [record]
    atomic_write_text(paths.metrics, "".join(json.dumps(r) + "\n" for r in records))


def _train_step(u: _Unit, images, targets, batch_idx, augment, generator, device, config: FitConfig, epoch: int):
    """One optimizer step of one unit; returns the (detached) loss and per-head parts."""
    if images.device.type == "cuda":
        batch = images[batch_idx.to(images.device)]
        labels = targets[batch_idx.to(images.device)]
    else:
        batch = images[batch_idx]
        if images.is_pinned():
            batch = batch.pin_memory()
        batch = batch.to(device, non_blocking=True)
        labels = targets[batch_idx].to(device, non_blocking=True)
    try:
        x = augment(batch, generator)
        with autocast_context(device, config.precision):
            outputs = u.forward(x)
            loss, parts = u.unit.compute_loss(outputs, labels)
        if not torch.isfinite(loss):
            raise TrainingError(
                f"loss became {float(loss.detach())} at epoch {epoch + 1} in unit '{u.name}'; training stopped and the "
                f"last good checkpoint is kept. Try a lower --lr (now {config.lr:g}) or --precision fp32"
            )
        u.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        u.optimizer.step()
        u.scheduler.step()
    except torch.cuda.OutOfMemoryError:
        raise TrainingError(
            f"out of GPU memory at batch size {config.batch_size} ({u.name}); try --batch-size "
            f"{max(1, config.batch_size // 2)} or a smaller --img-size"
        ) from None
    return loss.detach(), parts


def _guard_oom(call: Callable, config: FitConfig):
    try:
        return call()
    except torch.cuda.OutOfMemoryError:
        raise TrainingError(
            f"out of GPU memory while validating at batch size {config.batch_size}; try --batch-size "
            f"{max(1, config.batch_size // 2)}"
        ) from None


def _restore(paths: RunPaths, model, units: list[_Unit]):
    """Load weights, optimizer/scheduler state and loop position from the last checkpoint."""
    load_weights(paths.weights("last"), model)
    state = load_training_state(paths.state)
    names = [s["name"] for s in state["units"]]
    if names != [u.name for u in units]:
        raise CheckpointError(f"{paths.state}: training units {names} differ from the model's; cannot resume")
    for u, saved in zip(units, state["units"]):
        u.optimizer.load_state_dict(saved["optimizer"])
        u.scheduler.load_state_dict(saved["scheduler"])
    position = dict(state["position"])
    if position.get("step", 0) or position.get("unit", 0):
        position.update(generator=state["generator"], torch_rng=state["torch_rng"], running=state.get("running", {}))
    else:
        torch.set_rng_state(state["torch_rng"])
        position = None
    start_epoch = state["position"]["epoch"]
    return start_epoch, state.get("best_metric"), state.get("best_epoch"), position


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


def _print_summary(console: Console, config: FitConfig, prepared: _Prepared, units: list[_Unit], device, start_epoch: int) -> None:
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
        val = f" | val acc {record['val_accuracy']:.3f} hF {record['val_hF']:.3f} loss {record['val_loss']:.4f}"
    star = f" [green]* best {best_name}[/]" if improved else ""
    console.print(f"epoch {record['epoch']}: train {losses}{val} ({record['images_per_second']} img/s){star}")
