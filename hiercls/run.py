"""The run directory: where its files live, and the rules for creating, resuming or reusing one.

Layout::

    RUN/config.yaml              resolved FitConfig (absolute paths)
    RUN/taxonomy.yaml            the tree that was trained (after exclusions)
    RUN/split.json               train / val image paths
    RUN/metrics.jsonl            one JSON object per finished epoch
    RUN/checkpoints/last.*       latest weights (.safetensors) + metadata (.json)
    RUN/checkpoints/best.*       weights of the best epoch by ``best_metric``
    RUN/checkpoints/last.state.pt  optimizer / scheduler / RNG state for --resume
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from hiercls.errors import CheckpointError, ConfigError

__all__ = ["RunPaths", "prepare_run_dir"]

# Files and folders a run creates; --overwrite removes only these.
RUN_ARTIFACTS = ("config.yaml", "taxonomy.yaml", "split.json", "metrics.jsonl", "checkpoints")


@dataclass(frozen=True)
class RunPaths:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def taxonomy(self) -> Path:
        return self.root / "taxonomy.yaml"

    @property
    def split(self) -> Path:
        return self.root / "split.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def weights(self, which: str) -> Path:
        return self.checkpoints / f"{which}.safetensors"

    def metadata(self, which: str) -> Path:
        return self.checkpoints / f"{which}.json"

    @property
    def state(self) -> Path:
        return self.checkpoints / "last.state.pt"

    def is_run(self) -> bool:
        return self.config.is_file()


def _never_trained(paths: RunPaths) -> bool:
    """A hiercls run folder holding only set-up files: nothing trained, nothing to lose."""
    if not paths.is_run() or (paths.metrics.is_file() and paths.metrics.stat().st_size > 0):
        return False
    return not (paths.checkpoints.is_dir() and any(paths.checkpoints.iterdir()))


def prepare_run_dir(out: str | Path, resume: bool = False, overwrite: bool = False) -> RunPaths:
    """Check ``out`` can hold this run and return its paths.

    * a missing or empty folder is used as is;
    * ``resume`` needs an existing run with a last checkpoint;
    * ``overwrite`` removes a previous run's files, but only from a folder that is a hiercls
      run (it has config.yaml): a user's other folder is never emptied;
    * a hiercls run that stopped before it trained anything (no checkpoint, no metrics, e.g.
      refused for bad images or a full disk) is started again without ``overwrite``: there is
      nothing in it to lose;
    * otherwise a non-empty folder is refused.
    """
    paths = RunPaths(Path(out).expanduser().resolve())
    root = paths.root
    if root.exists() and not root.is_dir():
        raise ConfigError(f"{root}: --out must be a folder for the run, but a file has that name")
    non_empty = root.is_dir() and any(root.iterdir())
    if resume:
        if not paths.is_run():
            raise CheckpointError(f"{root}: not a hiercls run (no config.yaml); nothing to resume")
        if not paths.metadata("last").is_file() or not paths.state.is_file():
            raise CheckpointError(
                f"{root}: the run has no finished checkpoint to resume from; start it again with --overwrite"
            )
    elif non_empty:
        if not overwrite and not _never_trained(paths):
            raise ConfigError(
                f"{root}: run folder exists and is not empty; use --resume to continue it, "
                "--overwrite to replace it, or choose another --out"
            )
        if not paths.is_run():
            raise ConfigError(
                f"{root}: refusing to overwrite a folder that is not a hiercls run (no config.yaml); "
                "choose another --out"
            )
        for name in RUN_ARTIFACTS:
            target = root / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    check_writable(root)
    paths.checkpoints.mkdir(parents=True, exist_ok=True)
    return paths


def check_writable(folder: Path) -> None:
    """Fail before training, not after an hour, when the run folder cannot be written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".write-test-", dir=folder)
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        raise ConfigError(f"{folder}: cannot write to the run folder ({exc.strerror}); choose another --out") from None


def check_free_space(folder: Path, needed_bytes: int) -> None:
    """Fail before training when the run folder's disk cannot hold the checkpoints."""
    import shutil

    free = shutil.disk_usage(folder).free
    if free < needed_bytes:
        raise ConfigError(
            f"{folder}: only {free / 2**20:.0f} MiB free, but the checkpoints of this run need about "
            f"{needed_bytes / 2**20:.0f} MiB; free some space or choose another --out"
        )


def checkpoint_bytes(model) -> int:
    """Disk a run's checkpoints can take at once: best and last weights, the training state
    (about two optimizer moments per parameter) and the ``.new`` copies of a two-phase save."""
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return 2 * (2 * weights + 3 * weights) + 16 * 2**20


# Options that may change when a run is resumed; everything else must stay as it was.
RESUMABLE_OPTIONS = ("epochs", "device", "num_workers", "cache_dir", "out")


def load_resume_config(out: str | Path, overrides: dict):
    """The stored config of the run in ``out``, with the few options a resume may change."""
    import yaml

    from hiercls.config import FitConfig, load_config

    paths = RunPaths(Path(out).expanduser().resolve())
    if not paths.is_run():
        raise CheckpointError(f"{paths.root}: not a hiercls run (no config.yaml); nothing to resume")
    try:
        stored = FitConfig.model_validate(yaml.safe_load(paths.config.read_text(encoding="utf-8")))
    except Exception as exc:
        raise CheckpointError(f"{paths.config}: cannot read the run's config ({str(exc).splitlines()[0]})") from None
    given = {k: v for k, v in overrides.items() if v is not None}
    current = stored.model_dump()
    changed = [
        k for k, v in given.items()
        if k not in RESUMABLE_OPTIONS and k in current and _differs(current[k], v)
    ]
    if changed:
        flags = ", ".join("--" + k.replace("_", "-") for k in changed)
        raise ConfigError(
            f"{paths.root}: {flags} cannot change when resuming (only "
            f"{', '.join('--' + k.replace('_', '-') for k in RESUMABLE_OPTIONS)} can); start a new run instead"
        )
    allowed = {k: v for k, v in given.items() if k in RESUMABLE_OPTIONS}
    allowed["out"] = str(paths.root)
    return load_config(None, {**stored.model_dump(mode="json", exclude_none=True), **allowed})


def _differs(stored, given) -> bool:
    if isinstance(stored, Path) or isinstance(given, Path):
        return Path(stored).expanduser().resolve() != Path(given).expanduser().resolve()
    if isinstance(stored, (list, tuple)) and isinstance(given, (list, tuple)):
        return list(stored) != list(given)
    return stored != given
