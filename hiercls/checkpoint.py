"""Model checkpoints (safetensors weights + JSON metadata) and the training state for --resume.

Every file goes through the atomic writers of ``hiercls.io``: a crash or Ctrl-C mid-write
leaves either the old file or the new one, never a truncated one.

A checkpoint is several files (weights, metadata, training state) that must belong together,
so they are saved in two phases: each new file is first written beside the old one as
``<file>.new``, the metadata last (its ``.new`` is the commit mark); then the ``.new`` files
are renamed over the old ones, metadata last. A run killed at any moment leaves either the
old set intact (no ``<name>.json.new``: the stray ``.new`` files are dropped) or a committed
new set whose renames ``recover_checkpoint`` finishes. All parts carry the same
``checkpoint_id``, which the readers compare.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from hiercls.errors import CheckpointError
from hiercls.io import (
    RUN_FILE_BYTES,
    atomic_write,
    atomic_write_bytes,
    atomic_write_json,
    read_user_text,
)

__all__ = [
    "non_finite_tensors",
    "save_weights",
    "load_weights",
    "save_checkpoint",
    "recover_checkpoint",
    "weights_checkpoint_id",
    "read_metadata",
    "save_training_state",
    "load_training_state",
]


# -- model weights ------------------------------------------------------------------------


def _plain_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    # clone() breaks shared storage (tied weights), which safetensors refuses to write.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in module.state_dict().items()}


def non_finite_tensors(state: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors of ``state`` holding NaN or inf."""
    return [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def save_weights(path: str | Path, module: torch.nn.Module, checkpoint_id: str | None = None) -> Path:
    """Write ``module``'s state dict as safetensors (pickle-free), atomically.

    Weights holding NaN or inf are refused: such a model predicts nothing meaningful, and a
    checkpoint of it would look like a success.
    """
    state = _plain_state(module)
    bad = non_finite_tensors(state)
    if bad:
        raise CheckpointError(
            f"{path}: refusing to save weights with NaN or inf values ({len(bad)} tensors, e.g. {bad[0]}); "
            "training diverged: try a lower --lr"
        )
    metadata = {"checkpoint_id": checkpoint_id} if checkpoint_id else None
    return atomic_write_bytes(path, safetensors_save(state, metadata=metadata))


def weights_checkpoint_id(path: str | Path) -> str | None:
    """The ``checkpoint_id`` stored in a safetensors file's header (None for older files)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return (handle.metadata() or {}).get("checkpoint_id")
    except Exception:  # unreadable header: the loader reports it properly
        return None


def load_weights(path: str | Path, module: torch.nn.Module) -> None:
    """Load safetensors weights into ``module``; a mismatch raises ``CheckpointError``."""
    path = Path(path)
    try:
        state = safetensors_load(path.read_bytes())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: checkpoint weights not found") from None
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(f"{path}: cannot read checkpoint weights ({exc})") from None
    bad = non_finite_tensors(state)
    if bad:
        raise CheckpointError(
            f"{path}: the checkpoint's weights hold NaN or inf values ({len(bad)} tensors, e.g. {bad[0]}); "
            "the model diverged in training and cannot predict. Retrain it (e.g. with a lower --lr)"
        )
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise CheckpointError(
            f"{path}: weights do not fit the model built from the run's config ({first}); "
            "was the checkpoint copied from another run?"
        ) from None


def _parts(folder: Path, name: str) -> list[Path]:
    """The files of checkpoint ``name``, in commit order (metadata last)."""
    return [folder / f"{name}.state.pt", folder / f"{name}.safetensors", folder / f"{name}.json"]


def _new(path: Path) -> Path:
    return path.with_name(path.name + ".new")


def save_checkpoint(
    folder: str | Path,
    name: str,
    module: torch.nn.Module,
    metadata: dict[str, Any],
    training_state: dict[str, Any] | None = None,
) -> Path:
    """Save ``folder/name.{safetensors,json}`` (and ``name.state.pt`` when given) as one unit.

    See the module docstring for the two-phase write that keeps the parts consistent.
    """
    folder = Path(folder)
    recover_checkpoint(folder, name)
    try:
        return _save_parts(folder, name, module, metadata, training_state)
    except OSError as exc:
        recover_checkpoint(folder, name)  # drop the uncommitted parts: they hold the space a retry needs
        reason = "the disk is full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else (exc.strerror or str(exc))
        raise CheckpointError(
            f"{folder}: cannot write checkpoint '{name}' ({reason}); the previous '{name}' checkpoint is kept. "
            f"Free some space, then continue with `hiercls fit --out {folder.parent} --resume`"
        ) from None


def _save_parts(folder: Path, name: str, module: torch.nn.Module, metadata: dict[str, Any],
                training_state: dict[str, Any] | None) -> Path:
    checkpoint_id = uuid.uuid4().hex
    state_path, weights_path, meta_path = _parts(folder, name)
    if training_state is not None:
        save_training_state(_new(state_path), dict(training_state, checkpoint_id=checkpoint_id))
    elif state_path.exists():
        state_path.unlink()  # a state left from another kind of save would not match
    save_weights(_new(weights_path), module, checkpoint_id)
    atomic_write_json(_new(meta_path), dict(metadata, checkpoint_id=checkpoint_id))  # the commit mark
    _finish_commit(folder, name)
    return meta_path


def _finish_commit(folder: Path, name: str) -> None:
    for part in _parts(folder, name):
        if _new(part).exists():
            os.replace(_new(part), part)


def recover_checkpoint(folder: str | Path, name: str) -> None:
    """Finish a committed save that was interrupted, or drop an uncommitted one."""
    folder = Path(folder)
    if _new(_parts(folder, name)[-1]).exists():
        _finish_commit(folder, name)
        return
    for part in _parts(folder, name)[:-1]:
        if _new(part).exists():
            _new(part).unlink()


def read_metadata(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        return json.loads(read_user_text(path, "checkpoint metadata", CheckpointError, max_bytes=RUN_FILE_BYTES))
    except (OSError, json.JSONDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{path}: cannot read checkpoint metadata ({type(exc).__name__}: {exc})") from None


# -- optimizer / scheduler / RNG state for --resume ---------------------------------------


def save_training_state(path: str | Path, state: dict[str, Any]) -> Path:
    return atomic_write(path, lambda f: torch.save(state, f), "wb")


def load_training_state(path: str | Path, max_bytes: int | None = None) -> dict[str, Any]:
    """Read a training state written by ``save_training_state``, never executing code from it.

    A run folder is data people hand each other, so the file is untrusted: it is unpickled
    with ``weights_only=True`` (tensors, numbers, strings and containers only; any other
    object, such as a crafted ``__reduce__``, is refused before it can run), and a file
    larger than ``max_bytes`` is refused before it is read.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise CheckpointError(f"{path}: training state not found; the run cannot be resumed") from None
    if max_bytes is not None and size > max_bytes:
        raise CheckpointError(
            f"{path}: training state is {size / 2**20:.0f} MiB, more than the {max_bytes / 2**20:.0f} MiB "
            "a state of this model can take; it was not written by hiercls for this run"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{path}: refusing to load the training state: it holds objects other than tensors and numbers "
            f"({first}); it was not written by hiercls, or was tampered with. Do not resume this run folder"
        ) from None
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot read training state ({exc}); the run cannot be resumed") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: training state is a {type(state).__name__}, not a dict; the run cannot be resumed")
    return state
