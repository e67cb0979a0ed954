"""The run directory: where its files live, and the rules for creating, resuming or reusing one.

Layout::

    RUN/config.yaml              resolved FitConfig (absolute paths)
    RUN/taxonomy.yaml            the tree that was trained (after exclusions)
    RUN/split.json               train / val image paths
    RUN/metrics.jsonl            one JSON object per finished epoch
    RUN/checkpoints/last.*       latest weights (.safetensors) + metadata (.json)
    RUN/checkpoints/best.*       weights of the best epoch by ``best_metric``
    RUN/checkpoints/last.state.pt  optimizer / scheduler / RNG state for --resume
    RUN/.hiercls.lock            held (flock) by the one `fit` that writes the run

One process writes a run at a time: ``RunLock`` takes an exclusive ``flock`` on the lock
file for the whole fit. The kernel releases it when the process ends, however it ends, so a
killed fit never leaves a stale lock behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from hiercls.errors import CheckpointError, ConfigError

__all__ = ["RunPaths", "RunLock", "check_run_dir", "prepare_run_dir", "remove_stale_temp_files", "remove_failed_run"]

# Files and folders a run creates; --overwrite removes only these.
RUN_ARTIFACTS = ("config.yaml", "taxonomy.yaml", "split.json", "metrics.jsonl", "checkpoints", "calibration.json")
LOCK_NAME = ".hiercls.lock"
# The one piece of advice for a run that cannot be resumed or predicted from (no checkpoint yet).
START_AGAIN = "start it again with `hiercls fit ... --out {root} --overwrite`"


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


def check_run_dir(out: str | Path, resume: bool = False, overwrite: bool = False) -> RunPaths:
    """Whether ``out`` can hold this run, without changing anything (see ``prepare_run_dir``)."""
    paths = RunPaths(Path(out).expanduser().resolve())
    root = paths.root
    if root.exists() and not root.is_dir():
        raise ConfigError(f"{root}: --out must be a folder for the run, but a file has that name")
    non_empty = root.is_dir() and any(p.name != LOCK_NAME for p in root.iterdir())
    if resume:
        if not paths.is_run():
            raise CheckpointError(f"{root}: not a hiercls run (no config.yaml); nothing to resume")
        if not paths.metadata("last").is_file() or not paths.state.is_file():
            raise CheckpointError(
                f"{root}: the run has no finished checkpoint to resume from; {START_AGAIN.format(root=root)}"
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
    return paths


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
    paths = check_run_dir(out, resume=resume, overwrite=overwrite)
    if not resume and paths.root.is_dir():
        for name in RUN_ARTIFACTS:
            target = paths.root / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    check_writable(paths.root)
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


def check_free_space(folder: Path, needed_bytes: int, replaced_bytes: int = 0) -> None:
    """Fail before training when the run folder's disk cannot hold the checkpoints.

    ``replaced_bytes`` are the checkpoint files already there that the new ones replace
    (on --resume): they count as free, or a run that filled its disk once could never resume.
    """
    free = shutil.disk_usage(folder).free + replaced_bytes
    if free < needed_bytes:
        raise ConfigError(
            f"{folder}: only {free / 2**20:.0f} MiB free, but the checkpoints of this run need about "
            f"{needed_bytes / 2**20:.0f} MiB; free some space or choose another --out"
        )


def existing_checkpoint_bytes(paths: RunPaths) -> int:
    """Bytes of the checkpoint files a run folder holds now (replaced by the next saves)."""
    if not paths.checkpoints.is_dir():
        return 0
    return sum(p.stat().st_size for p in paths.checkpoints.iterdir() if p.is_file())


def remove_stale_temp_files(paths: RunPaths) -> list[Path]:
    """Delete the hidden ``.NAME.XXXX.tmp`` files that killed writers left in the run folder.

    Only call with the run's lock held: then no live writer of this run can own them.
    """
    removed = []
    for folder in (paths.root, paths.checkpoints):
        if not folder.is_dir():
            continue
        for item in folder.iterdir():
            if item.name.startswith(".") and item.name.endswith(".tmp") and item.is_file():
                item.unlink(missing_ok=True)
                removed.append(item)
    return removed


def remove_failed_run(paths: RunPaths, created_folder: bool) -> None:
    """Undo a fit that failed before it trained anything: a new attempt needs no --overwrite.

    Removes only the run's own files (``RUN_ARTIFACTS``), and the folder when this fit created it.
    """
    if paths.metrics.is_file() and paths.metrics.stat().st_size > 0:
        return
    if paths.checkpoints.is_dir() and any(paths.checkpoints.iterdir()):
        return
    for name in RUN_ARTIFACTS:
        target = paths.root / name
        if target.is_dir():
            shutil.rmtree(target, ignore_errors=True)
        elif target.exists():
            target.unlink(missing_ok=True)
    (paths.root / LOCK_NAME).unlink(missing_ok=True)
    if created_folder:
        try:
            paths.root.rmdir()  # only when empty: a user's file put there meanwhile stays
        except OSError:
            pass


class RunLock:
    """An exclusive lock on a run folder for the whole of one fit (``with RunLock(root):``).

    A second fit on the same folder fails at once with the holder's process id instead of
    mixing its config, metrics and checkpoints into the first one's.
    """

    def __init__(self, root: Path):
        self.path = Path(root) / LOCK_NAME
        self._handle = None

    def __enter__(self) -> RunLock:
        try:
            import fcntl
        except ImportError:  # no flock (Windows): runs are not protected against a second fit
            return self
        check_writable(self.path.parent)
        try:
            handle = open(self.path, "a+", encoding="utf-8")
        except OSError as exc:
            raise ConfigError(
                f"{self.path.parent}: cannot write to the run folder ({exc.strerror}); choose another --out"
            ) from None
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read(64).strip() or "another process"
            handle.close()
            raise ConfigError(
                f"{self.path.parent}: another `hiercls fit` ({holder}) is writing this run folder; "
                "wait for it to finish or stop it, or choose another --out"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}\n")
        handle.flush()
        self._handle = handle
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()  # closing the file releases the flock
            self._handle = None


def checkpoint_bytes(model) -> int:
    """Disk a run's checkpoints can take at once: best and last weights, the training state
    (about two optimizer moments per parameter) and the ``.new`` copies of a two-phase save."""
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return 2 * (2 * weights + 3 * weights) + 16 * 2**20


# Options that may change when a run is resumed; everything else must stay as it was.
RESUMABLE_OPTIONS = ("epochs", "device", "num_workers", "cache_dir", "out")


def load_resume_config(out: str | Path, overrides: dict):
    """The stored config of the run in ``out``, with the few options a resume may change."""
    from hiercls.config import FitConfig, load_config
    from hiercls.io import RUN_FILE_BYTES, load_yaml, read_user_text

    paths = RunPaths(Path(out).expanduser().resolve())
    if not paths.is_run():
        raise CheckpointError(f"{paths.root}: not a hiercls run (no config.yaml); nothing to resume")
    try:
        text = read_user_text(paths.config, "run config", CheckpointError, max_bytes=RUN_FILE_BYTES)
        stored = FitConfig.model_validate(load_yaml(text))
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
