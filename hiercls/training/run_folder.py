"""The run folder during training: its set-up files, metrics, checkpoints and resume.

``open_run_folder`` creates (or reopens) and locks ``config.out`` for one fit and removes a
new run that failed before it trained anything. ``RunFolder`` is the trainer's callback that
writes the folder (see ``hiercls.run`` for the layout): the config, tree and split when
training starts, one ``metrics.jsonl`` line per epoch, the ``best`` checkpoint whenever the
best metric improves and the resumable ``last`` checkpoint (every ``checkpoint_minutes``, at
the end, and on Ctrl-C). ``restore_last`` reads ``last`` back for --resume. Only rank 0
of a multi-process run writes.
"""

from __future__ import annotations

import json
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

import hiercls
from hiercls.checkpoint import (
    load_training_state,
    load_weights,
    read_metadata,
    recover_checkpoint,
    save_checkpoint,
    weights_checkpoint_id,
)
from hiercls.config import FitConfig
from hiercls.errors import CheckpointError
from hiercls.io import RUN_FILE_BYTES, atomic_write_json, atomic_write_text, read_user_text
from hiercls.plugins import check_run_provenance, run_provenance
from hiercls.run import (
    RunLock,
    RunPaths,
    check_free_space,
    checkpoint_bytes,
    existing_checkpoint_bytes,
    prepare_run_dir,
    remove_failed_run,
    remove_stale_temp_files,
)
from hiercls.taxonomy import Taxonomy
from hiercls.training.trainer import Callback, Dist, ResumeState, Trainer, TrainingUnit, _restore_rng

__all__ = ["RunFolder", "open_run_folder", "read_metrics", "restore_last"]


class RunFolder(Callback):
    """Writes a run folder as training goes (rank 0 only; the other processes' calls do nothing)."""

    def __init__(self, paths: RunPaths, config: FitConfig, taxonomy: Taxonomy, class_counts: np.ndarray,
                 model: torch.nn.Module, dist: Dist | None = None):
        self.paths, self.config, self.taxonomy, self.model = paths, config, taxonomy, model
        self.class_counts = class_counts
        self.dist = dist or Dist()
        self.built_by = run_provenance(config.backbone, config.loss)
        self.last_saved = time.monotonic()

    def write_start(self, split: dict[str, list[str]], resume: bool) -> None:
        """The tree, split and config of a new run; on --resume, check the split is still the same."""
        paths = self.paths
        if resume:
            stored = json.loads(read_user_text(paths.split, "split", CheckpointError, max_bytes=RUN_FILE_BYTES)) \
                if paths.split.is_file() else None
            if stored != split:
                raise CheckpointError(
                    f"{paths.split}: the images or split differ from when the run started; "
                    "resume with the same data, or start a new run"
                )
        elif self.dist.main:
            atomic_write_text(paths.taxonomy, self.taxonomy.to_yaml())
            atomic_write_json(paths.split, split)
        if self.dist.main:
            atomic_write_text(paths.config, self.config.to_yaml())  # on resume: records a changed --epochs

    def check_space(self, resume: bool) -> None:
        def check() -> None:
            replaced = existing_checkpoint_bytes(self.paths) if resume else 0
            check_free_space(self.paths.root, checkpoint_bytes(self.model), replaced)

        self.dist.on_main(check)  # a full disk stops every process, not only rank 0

    def metadata(self, trainer: Trainer, epoch: int, metrics: dict[str, Any], partial: bool = False) -> dict[str, Any]:
        import timm

        config, taxonomy = self.config, self.taxonomy
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
            "class_counts": self.class_counts.tolist(),
            "config": config.model_dump(mode="json"),
            "metrics": metrics,
            "best_metric_name": config.best_metric,
            "best_metric": trainer.best_metric,
            "best_epoch": trainer.best_epoch,
            "provenance": self.built_by,
        }

    def save_last(self, trainer: Trainer, epoch: int, metrics: dict[str, Any], next_position: dict[str, int],
                  partial: bool = False, step_losses: torch.Tensor | None = None) -> None:
        if self.dist.main:
            save_checkpoint(self.paths.checkpoints, "last", self.model, self.metadata(trainer, epoch, metrics, partial),
                            training_state=trainer.training_state(next_position, step_losses))

    def on_train_begin(self, trainer: Trainer) -> None:
        self.last_saved = time.monotonic()

    def on_epoch_end(self, trainer: Trainer, epoch: int, record: dict[str, Any], improved: bool) -> None:
        if not self.dist.main:
            return
        config = self.config
        append_metrics(self.paths, record)
        final = epoch + 1 == config.epochs
        save = improved or final or time.monotonic() - self.last_saved >= 60 * config.checkpoint_minutes
        if improved or (save and not trainer.data.has_val):
            if not improved:  # without validation, best is the latest saved
                trainer.best_metric, trainer.best_epoch = record.get(config.best_metric), epoch + 1
            # best before last: last's state must never name unwritten best weights
            save_checkpoint(self.paths.checkpoints, "best", self.model, self.metadata(trainer, epoch + 1, record))
        if save:
            self.save_last(trainer, epoch + 1, record, {"epoch": epoch + 1, "unit": 0, "step": 0})
            self.last_saved = time.monotonic()
        if final and config.calibrate and trainer.data.has_val:
            self.calibrate(trainer)

    def calibrate(self, trainer: Trainer) -> None:
        """``calibrate: true``: fit the best checkpoint's temperatures on the validation images in memory.

        A failure is a warning, not an error: the trained run stands, and ``hiercls calibrate`` can
        be run on it later.
        """
        import warnings

        from hiercls.calibration import calibrate_run
        from hiercls.errors import HierclsError, HierclsWarning

        try:
            val_paths = json.loads(read_user_text(self.paths.split, "split", CheckpointError,
                                                  max_bytes=RUN_FILE_BYTES))["val"]
            calibrate_run(self.paths.root, "best", device=str(trainer.device), progress=False,
                          images=trainer.data.val_images, labels=trainer.data.val_true, paths=val_paths)
        except HierclsError as exc:
            warnings.warn(f"calibration at the end of training failed ({exc}); the run is complete without "
                          f"it: run `hiercls calibrate --run {self.paths.root}` after fixing the cause", HierclsWarning)

    def on_interrupt(self, trainer: Trainer, epoch: int, unit_index: int, step: int,
                     step_losses: torch.Tensor) -> None:
        self.save_last(trainer, epoch, trainer.last_metrics, {"epoch": epoch, "unit": unit_index, "step": step + 1},
                       partial=True, step_losses=step_losses)


@contextmanager
def open_run_folder(config: FitConfig, dist: Dist, *, resume: bool, overwrite: bool):
    """The run folder, locked for this fit; a new run that fails before it trained anything
    is removed again (the error says why; nothing of the user's is touched)."""
    if not dist.main:
        dist.agree(failed=False)  # rank 0 opened the folder, or its error stops this process too
        yield RunPaths(Path(config.out))
        return
    root = Path(config.out)
    created = not root.exists()
    lock = RunLock(root)
    lock_existed = lock.path.exists()
    opened = False
    try:
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
            opened = True
            dist.agree(failed=False)
            try:
                yield paths
            except BaseException:
                if not resume:
                    remove_failed_run(paths, created)
                raise
    except BaseException:
        if not opened:  # the lock or the folder was refused: the other processes wait for this answer
            dist.agree(failed=True)
        raise


def restore_last(paths: RunPaths, model, units: list[TrainingUnit], device: torch.device) -> ResumeState:
    """Load weights, optimizer/scheduler state and loop position from the last checkpoint (--resume)."""
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
    previous = read_metrics(paths, start_epoch)
    return ResumeState(start_epoch, state.get("best_metric"), state.get("best_epoch"), position,
                       previous[-1] if previous else {})


def read_metrics(paths: RunPaths, up_to_epoch: int) -> list[dict[str, Any]]:
    """The metrics lines of epochs 1..up_to_epoch (later lines belong to an unsaved epoch)."""
    if not paths.metrics.is_file():
        return []
    text = read_user_text(paths.metrics, "metrics", CheckpointError, max_bytes=RUN_FILE_BYTES)
    records = [json.loads(line) for line in text.splitlines() if line.strip()]
    return [r for r in records if r.get("epoch", 0) <= up_to_epoch]


def append_metrics(paths: RunPaths, record: dict[str, Any]) -> None:
    records = read_metrics(paths, record["epoch"] - 1) + [record]
    atomic_write_text(paths.metrics, "".join(json.dumps(r) + "\n" for r in records))
