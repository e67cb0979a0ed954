"""The training loop, in memory: units, epochs, validation and callbacks.

A strategy hands out *training units* (one for flat and joint, one per internal node for
per_node, one per depth for per_level), each with its own module, sample mask, loss,
optimizer and schedule. Epochs are the outer loop and units the inner one, so all units
advance in lockstep and a checkpoint always holds the whole model.

Every random choice comes from generators seeded by (seed, epoch, unit); ``Trainer`` keeps
their state (``training_state``) so a run resumed from a checkpoint ends exactly where an
uninterrupted one would (on the CPU). The loop never makes the host wait for the GPU inside a
step: losses are accumulated on the device and their finiteness (and the stop request) is
checked every ``CHECK_EVERY`` steps and at the end of every unit's epoch.

The trainer writes no files, prints nothing and reads no environment: the run folder
(``hiercls.training.run_folder.RunFolder``), the console and progress hooks are
``Callback``s, and a ``torchrun`` process group comes in as a ``Dist``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from hiercls.augment import BatchAugment
from hiercls.config import FitConfig
from hiercls.errors import HierclsError
from hiercls.inference import predict_conditionals
from hiercls.probabilities import NodeProbabilities
from hiercls.runtime import autocast_context
from hiercls.taxonomy import Taxonomy

__all__ = [
    "CHECK_EVERY", "Callback", "Dist", "ResumeState", "Trainer", "TrainingData", "TrainingError", "TrainingUnit",
    "build_units", "validation_metrics",
]

#: Steps between host-device synchronisations (loss finiteness, progress numbers, Ctrl-C
#: agreement between processes). Each unit's epoch also ends with one.
CHECK_EVERY = 25


class TrainingError(HierclsError):
    """Training cannot go on (non-finite loss, out of memory); the last good checkpoint is kept."""



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
class TrainingUnit:
    name: str
    unit: Any
    forward: Callable
    indices: np.ndarray
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    steps_per_epoch: int


@dataclass
class Dist:
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

    def agree(self, failed: bool) -> None:
        """Every process tells whether it failed; one that did not, while another did, raises
        ``PeerFailedError``. A collective: every process must reach it (instead of a barrier that
        the others would wait at forever, or until the launcher kills them with a traceback)."""
        if not self.active:
            return
        from hiercls.errors import PeerFailedError

        on_gpu = torch.distributed.get_backend() == "nccl"
        flag = torch.tensor([int(failed)], device=torch.device("cuda", torch.cuda.current_device()) if on_gpu else "cpu")
        torch.distributed.all_reduce(flag)
        if int(flag.item()) and not failed:
            raise PeerFailedError(f"process {self.rank}: stopped because another process failed (its error is above)")

    def on_main(self, action: Callable[[], Any]) -> Any:
        """``action()`` on rank 0 only (e.g. a check of the run folder); when it raises there,
        the other processes stop with ``PeerFailedError`` instead of waiting for rank 0."""
        result = None
        if self.main:
            try:
                result = action()
            except BaseException:
                self.agree(failed=True)
                raise
        self.agree(failed=False)
        return result

    def all_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.active:
            torch.distributed.all_reduce(tensor)
        return tensor

    def close(self) -> None:
        if self.owned and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()



# -- units ---------------------------------------------------------------------------------


def _wrap(module: torch.nn.Module, dist: Dist, device: torch.device, compile: bool):
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


def validation_metrics(
    taxonomy: Taxonomy, probs: NodeProbabilities, true_nodes: list[str], decode: str, threshold: float
) -> dict[str, Any]:
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


class StopFlag:
    requested = False


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



# -- steps ---------------------------------------------------------------------------------


def _shard_rows(size: int, dist: Dist) -> torch.Tensor | None:
    """This process's rows of a global batch of ``size`` images (every ``world``-th, from ``rank``)."""
    if not dist.active:
        return None
    return torch.arange(dist.rank, size, dist.world)


def _check(step_losses: torch.Tensor, step: int, flag: StopFlag, dist: Dist, epoch: int, unit: str,
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


def _train_step(u: TrainingUnit, images: torch.Tensor, targets: torch.Tensor, batch_idx: torch.Tensor, augment: BatchAugment,
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


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """torch's random state on the host and, on CUDA, the device's (dropout, drop-path)."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _restore_rng(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)



# -- the trainer -----------------------------------------------------------------------------


class Callback:
    """What the trainer tells the outside world; every hook is optional.

    Hooks run on every process of a multi-process run, in the order the callbacks were given;
    a hook may read the trainer's state (``best_epoch``, ``units``, ``training_state()``).
    """

    def on_train_begin(self, trainer: Trainer) -> None: ...

    def on_unit_begin(self, trainer: Trainer, epoch: int, unit: TrainingUnit, skip: int) -> None: ...

    def on_step(self, trainer: Trainer, epoch: int, unit: TrainingUnit, step: int) -> None: ...

    def on_check(self, trainer: Trainer, epoch: int, unit: TrainingUnit, mean_loss: float, rate: float) -> None: ...

    def on_unit_end(self, trainer: Trainer, epoch: int, unit: TrainingUnit) -> None: ...

    def on_epoch_end(self, trainer: Trainer, epoch: int, record: dict[str, Any], improved: bool) -> None: ...

    def on_interrupt(self, trainer: Trainer, epoch: int, unit_index: int, step: int,
                     step_losses: torch.Tensor) -> None: ...


@dataclass
class TrainingData:
    """The decoded training set on its device, and the validation images (``None``: no validation here)."""

    images: torch.Tensor  # uint8 [N, H, W, 3], on the GPU when it fits
    targets: torch.Tensor  # node index per training image
    val_images: np.ndarray | None = None
    val_true: list[str] = field(default_factory=list)
    has_val: bool = False  # the run validates (on rank 0; the other processes hold no images)


@dataclass
class ResumeState:
    """Where a resumed run continues: the epoch, the best so far, and a position inside an epoch."""

    start_epoch: int = 0
    best_metric: float | None = None
    best_epoch: int | None = None
    position: dict[str, Any] | None = None  # unit, step, generator and RNG states of a cut epoch
    last_metrics: dict[str, Any] = field(default_factory=dict)


def build_units(config: FitConfig, model: torch.nn.Module, train_labels: np.ndarray, dist: Dist,
                device: torch.device) -> list[TrainingUnit]:
    """One ``TrainingUnit`` per unit of the model: its images, optimizer, schedule and (wrapped) forward."""
    units: list[TrainingUnit] = []
    if config.compile:
        _allow_compiled_graphs(2 * len(model.training_units()) + 2)
    for unit in model.training_units():
        indices = np.where(unit.sample_mask(train_labels))[0]
        steps = _batches(len(indices), config.batch_size, min_last=2 * dist.world)
        optimizer = _optimizer(config, unit.module.parameters())
        forward = _wrap(unit.module, dist, device, compile=_compiles(config, len(indices)))
        units.append(TrainingUnit(unit.name, unit, forward, indices, optimizer, _scheduler(config, optimizer, steps), steps))
    return units


class _Interrupted(Exception):
    """A stop request was agreed on inside a unit's epoch (after its state was handed to the callbacks)."""


class Trainer:
    """Trains ``units`` of ``model`` for ``config.epochs`` epochs; ``fit()`` returns (epochs done, interrupted)."""

    def __init__(self, config: FitConfig, taxonomy: Taxonomy, model: torch.nn.Module, units: list[TrainingUnit],
                 data: TrainingData, augment: BatchAugment, device: torch.device, *, dist: Dist | None = None,
                 channels_last: bool = False, callbacks: Sequence[Callback] = (), resume: ResumeState | None = None,
                 validation_progress: dict[str, Any] | None = None):
        self.config, self.taxonomy, self.model, self.units = config, taxonomy, model, units
        self.data, self.augment, self.device = data, augment, device
        self.dist = dist or Dist()
        self.channels_last = channels_last
        self.callbacks = list(callbacks)
        start = resume or ResumeState()
        self.start_epoch, self.position = start.start_epoch, start.position
        self.best_metric, self.best_epoch = start.best_metric, start.best_epoch
        self.last_metrics: dict[str, Any] = start.last_metrics
        self.generator = torch.Generator()
        self.running: dict[str, list[float]] = {}
        self.unit_losses, self.unit_sizes = torch.zeros(1), [0]  # the current unit's epoch (see train_unit)
        self.stop = StopFlag()  # set it (e.g. from a SIGINT handler) to stop after the current step
        # how validation shows progress: predict_conditionals' progress/console/description (default: none)
        self.validation_progress = validation_progress or {"progress": False}

    def _notify(self, hook: str, *args) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self, *args)

    def fit(self) -> tuple[int, bool]:
        """Train the remaining epochs: ``(epochs completed, interrupted)``."""
        self.loop_started = time.monotonic()
        self._notify("on_train_begin")
        for epoch in range(self.start_epoch, self.config.epochs):
            try:
                record = self.train_epoch(epoch)
            except _Interrupted:
                return epoch, True
            self.end_epoch(epoch, record)
        self._share_best()
        return self.config.epochs, False

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        """Train every unit for one epoch, then validate when due; returns the epoch's record."""
        t0 = time.perf_counter()
        images_seen = 0
        position, self.position = self.position, None
        first_unit = position["unit"] if position else 0
        self.running = position["running"] if position else {}
        for ui, u in enumerate(self.units):
            if ui < first_unit:
                continue
            images_seen += self.train_unit(epoch, ui, u, position if ui == first_unit else None)
        seconds = time.perf_counter() - t0
        # the whole epoch from the loop's start, previous epochs' validation and checkpoints included
        elapsed = time.monotonic() - self.loop_started
        record: dict[str, Any] = {
            "epoch": epoch + 1,
            "train_loss": {name: (s / n if n else None) for name, (s, n) in self.running.items()},
            "lr": {u.name: u.optimizer.param_groups[0]["lr"] for u in self.units},
            "seconds": round(seconds, 3),
            "elapsed_seconds": round(elapsed, 3),
            "images_per_second": round(images_seen / seconds, 1) if seconds > 0 else None,
        }
        _check_finite_weights(self.model, epoch, self.config)
        if self.data.val_images is not None and _validates(self.config, epoch):
            record.update(self.validate())
            _check_finite_validation(record, epoch, self.config)
        self.last_metrics = record
        return record

    def train_unit(self, epoch: int, ui: int, u: TrainingUnit, position: dict[str, Any] | None) -> int:
        """One unit's epoch (from ``position``'s step when resuming inside it); returns images trained on."""
        config, device = self.config, self.device
        seed = _epoch_seed(config.seed, epoch, ui)
        self.generator.manual_seed(seed)
        torch.manual_seed(seed)
        order = torch.from_numpy(u.indices)[torch.randperm(len(u.indices), generator=self.generator)]
        order = order.to(self.data.images.device, non_blocking=True)
        step_losses = torch.zeros(max(1, u.steps_per_epoch), dtype=_loss_dtype(device), device=device)
        skip = 0
        if position:
            skip = position["step"]
            self.generator.set_state(position["generator"])
            _restore_rng(position["torch_rng"], device)
            if position.get("step_losses") is not None:
                step_losses.copy_(position["step_losses"].to(_loss_dtype(device)))
        sizes = [min(config.batch_size, len(u.indices) - s * config.batch_size) for s in range(u.steps_per_epoch)]
        self.unit_losses, self.unit_sizes = step_losses, sizes  # for running_loss()
        self.model.train()
        self._notify("on_unit_begin", epoch, u, skip)
        try:
            total = self._steps(epoch, ui, u, order, sizes, skip, step_losses)
        finally:
            self._notify("on_unit_end", epoch, u)
        if total is None and u.steps_per_epoch:  # resumed after the unit's last step
            total, _ = _check(step_losses, u.steps_per_epoch - 1, StopFlag(), self.dist, epoch, u.name, config)
        self.running[u.name] = [float(total), sum(sizes)] if u.steps_per_epoch else [0.0, 0]
        return sum(sizes[skip:])

    def _steps(self, epoch: int, ui: int, u: TrainingUnit, order: torch.Tensor, sizes: list[int], skip: int,
               step_losses: torch.Tensor) -> float | None:
        """The optimizer steps of one unit's epoch; the summed loss at its last check (None: no check)."""
        config, dist = self.config, self.dist
        unit_t0, timed_from, total = time.perf_counter(), skip, None
        for step in range(skip, u.steps_per_epoch):
            start = step * config.batch_size
            global_idx = order[start : start + sizes[step]]
            rows = _shard_rows(sizes[step], dist)
            batch_idx = global_idx if rows is None else global_idx[rows.to(global_idx.device, non_blocking=True)]
            loss = _train_step(u, self.data.images, self.data.targets, batch_idx, self.augment, self.generator,
                               self.device, config, rows, sizes[step])
            step_losses[step] = loss * sizes[step]
            self._notify("on_step", epoch, u, step)
            last = step == u.steps_per_epoch - 1
            stop = self.stop.requested
            if last or (step + 1 - skip) % CHECK_EVERY == 0 or (stop and not dist.active):
                total, stop = _check(step_losses, step, self.stop, dist, epoch, u.name, config)
                rate = sum(sizes[timed_from : step + 1]) / max(1e-9, time.perf_counter() - unit_t0)
                self._notify("on_check", epoch, u, total / max(1, sum(sizes[: step + 1])), rate)
            elif dist.active:
                stop = False  # processes agree on stopping only at a check
            if stop:
                self._notify("on_interrupt", epoch, ui, step, step_losses)
                dist.barrier()
                raise _Interrupted
        return total

    def running_loss(self, step: int) -> float:
        """Mean loss per image of the current unit's epoch through ``step``, on this process.

        For progress displays: it waits for the device, so call it now and then, not every step.
        """
        seen = sum(self.unit_sizes[: step + 1])
        return float(self.unit_losses[: step + 1].sum()) / max(1, seen)

    def validate(self) -> dict[str, Any]:
        """Validation metrics of the current model on the validation images."""
        config = self.config
        cond = _guard_oom(lambda: predict_conditionals(
            self.model, self.data.val_images, batch_size=2 * config.batch_size, device=self.device,
            precision=config.precision, channels_last=self.channels_last, **self.validation_progress,
        ), config)
        probs = NodeProbabilities.from_conditionals(self.taxonomy, cond)
        return validation_metrics(self.taxonomy, probs, self.data.val_true, config.decode, config.threshold)

    def end_epoch(self, epoch: int, record: dict[str, Any]) -> None:
        """Keep the best epoch by ``best_metric``, tell the callbacks, and wait for the other processes."""
        name = self.config.best_metric
        value = record.get(name)
        improved = self.data.has_val and value is not None and _is_better(name, value, self.best_metric)
        if improved:
            self.best_metric, self.best_epoch = value, epoch + 1
        self._notify("on_epoch_end", epoch, record, improved)
        self.dist.barrier()  # the others wait for validation and checkpoints

    def _share_best(self) -> None:
        """Under several processes, rank 0's best epoch and metrics become everyone's."""
        if self.dist.active:
            shared = [self.best_epoch, self.best_metric, self.last_metrics]
            torch.distributed.broadcast_object_list(shared, src=0)
            self.best_epoch, self.best_metric, self.last_metrics = shared

    def training_state(self, next_position: dict[str, int], step_losses: torch.Tensor | None = None) -> dict[str, Any]:
        """Everything --resume needs besides the weights: optimizers, schedules, RNG, position, best."""
        return {
            "position": next_position,
            "best_metric": self.best_metric,
            "best_epoch": self.best_epoch,
            "units": [{"name": u.name, "optimizer": u.optimizer.state_dict(), "scheduler": u.scheduler.state_dict()}
                      for u in self.units],
            "torch_rng": _rng_state(self.device),
            "generator": self.generator.get_state(),
            "running": self.running,
            "step_losses": None if step_losses is None else step_losses.detach().cpu(),
            "world_size": self.dist.world,
        }
