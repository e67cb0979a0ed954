"""Model checkpoints (safetensors weights + JSON metadata) and the training state for --resume.

Every file goes through the atomic writers of ``hiercls.io`` (re-exported here so older
imports keep working): a crash or Ctrl-C mid-write leaves either the old file or the new
one, never a truncated one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from hiercls.errors import CheckpointError
from hiercls.io import (
    atomic_write,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
)

__all__ = [
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "save_weights",
    "load_weights",
    "save_checkpoint",
    "read_metadata",
    "save_training_state",
    "load_training_state",
]


# -- model weights ------------------------------------------------------------------------


def _plain_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    # clone() breaks shared storage (tied weights), which safetensors refuses to write.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in module.state_dict().items()}


def save_weights(path: str | Path, module: torch.nn.Module) -> Path:
    """Write ``module``'s state dict as safetensors (pickle-free), atomically."""
    return atomic_write_bytes(path, safetensors_save(_plain_state(module)))


def load_weights(path: str | Path, module: torch.nn.Module) -> None:
    """Load safetensors weights into ``module``; a mismatch raises ``CheckpointError``."""
    path = Path(path)
    try:
        state = safetensors_load(path.read_bytes())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: checkpoint weights not found") from None
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(f"{path}: cannot read checkpoint weights ({exc})") from None
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise CheckpointError(
            f"{path}: weights do not fit the model built from the run's config ({first}); "
            "was the checkpoint copied from another run?"
        ) from None


def save_checkpoint(folder: str | Path, name: str, module: torch.nn.Module, metadata: dict[str, Any]) -> Path:
    """Write ``folder/name.safetensors`` then ``folder/name.json``.

    The JSON is written last, so a checkpoint counts as finished only when its metadata exists.
    """
    folder = Path(folder)
    save_weights(folder / f"{name}.safetensors", module)
    atomic_write_json(folder / f"{name}.json", metadata)
    return folder / f"{name}.json"


def read_metadata(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: checkpoint metadata not found") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read checkpoint metadata ({exc})") from None


# -- optimizer / scheduler / RNG state for --resume ---------------------------------------


def save_training_state(path: str | Path, state: dict[str, Any]) -> Path:
    return atomic_write(path, lambda f: torch.save(state, f), "wb")


def load_training_state(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        # Written by hiercls itself (optimizer state holds plain tensors and numbers).
        return torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: training state not found; the run cannot be resumed") from None
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot read training state ({exc}); the run cannot be resumed") from None
