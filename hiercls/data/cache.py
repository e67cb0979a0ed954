"""Decode and resize every image once; later runs memory-map the result.

Decoding JPEGs is the slowest part of training small models on a few thousand images.
``ImageCache.load(paths, size)`` returns a ``uint8 [N, size, size, 3]`` array that is
memory-mapped from ``<cache_dir>/<key>.npy``. The key hashes the identity of every file
(absolute path, byte size, modification time in ns) and the target size, so the same
images at the same size hit the cache and a changed file misses it.

Images are resized whole to ``size x size`` (bicubic, aspect ratio not kept): blood-cell
crops are near-square and squashing keeps every cell in view, where a centre crop could
cut off the cell that carries the label.

Entries are written under a temporary name in the cache folder and renamed into place
(``os.replace``), the metadata file last, so a killed run never leaves a half entry that
is later read. The folder can be deleted at any time.

The space of an entry is allocated on disk before any image is written into it
(``os.posix_fallocate``, else zeros written in chunks): writing through a memory map of a
sparse file on a full disk kills the process with SIGBUS ("Bus error"), while allocating
first fails with ENOSPC, which becomes a ``DataError`` saying how much space is needed
where. Temporary files of killed writers are removed by the next ``load``
(``remove_stale_temporaries``): those written on this host by a process that no longer
exists, and any older than ``STALE_TEMPORARY_AGE_S``. When a file list misses, rows for
images already decoded at the same size in other entries (e.g. the whole dataset when a
subset is asked for) are copied instead of decoded again.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from hiercls.console import TaskProgress
from hiercls.data.images import open_rgb
from hiercls.errors import DataError

__all__ = [
    "MAX_LISTED_FILES",
    "STALE_TEMPORARY_AGE_S",
    "ImageCache",
    "decode_resized",
    "default_cache_dir",
    "remove_stale_temporaries",
    "unreadable_error",
]

_FORMAT_VERSION = 1
_PARALLEL_FROM = 32  # fewer images than this are decoded in the calling thread
_ZEROS_CHUNK = 16 * 1024**2  # bytes written at a time where the file system cannot fallocate

#: A cache temporary file untouched for this long (seconds) is taken as left by a killed run.
STALE_TEMPORARY_AGE_S = 24 * 3600

# Temporary names: ".<key>.<host>-<pid>.<random>.tmp.npy|json"; older versions wrote no host-pid.
_TEMPORARY_NAME = re.compile(
    r"^\.[0-9a-f]{32}\.(?:(?P<host>[A-Za-z0-9]+)-(?P<pid>\d+)\.)?[A-Za-z0-9_]+\.tmp\.(?:npy|json)$"
)


def default_cache_dir() -> Path:
    """``$HIERCLS_CACHE`` when set, else ``~/.cache/hiercls``."""
    env = os.environ.get("HIERCLS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "hiercls"


def decode_resized(path: str | Path, size: int) -> np.ndarray:
    """One image as ``uint8 [size, size, 3]``: RGB, resized whole with bicubic interpolation."""
    image = open_rgb(path)
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(image, dtype=np.uint8)


#: Bad files quoted by name in one error; the rest are counted.
MAX_LISTED_FILES = 10

_AUDIT_HINT = (
    "run `hiercls audit --taxonomy T.yaml --data DATA --write-manifest clean.csv` to list every bad "
    "file and write a manifest without them, then use that manifest as --data"
)


def _identity(path: Path) -> tuple[str, int, int]:
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found; it was listed but has been moved or deleted") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read image file ({exc.strerror or exc})") from None
    return (str(path), int(stat.st_size), int(stat.st_mtime_ns))


def _identities(paths: Sequence[Path]) -> list[tuple[str, int, int]]:
    """File identities of all ``paths``; one ``DataError`` names every file that cannot be read."""
    identities, failures = [], []
    for path in paths:
        try:
            identities.append(_identity(path))
        except DataError as exc:
            failures.append((path, str(exc)))
    if failures:
        raise unreadable_error(failures, len(paths))
    return identities


def unreadable_error(failures: Sequence[tuple[Path, str]], total: int) -> DataError:
    """One ``DataError`` for all files that failed: the count, the first few with reasons, the fix.

    A run must not stop at the first bad file and then again at the next one after the
    user fixed it: every unreadable file is found in one pass and reported together.
    """
    shown = "; ".join(_short_reason(path, message) for path, message in failures[:MAX_LISTED_FILES])
    more = f"; and {len(failures) - MAX_LISTED_FILES} more" if len(failures) > MAX_LISTED_FILES else ""
    return DataError(
        f"{len(failures)} of {total} image file(s) cannot be read: {shown}{more}. "
        f"Fix or remove them, or {_AUDIT_HINT}"
    )


def _short_reason(path: Path, message: str) -> str:
    """'PATH (reason)' from an error message that starts with 'PATH: '."""
    reason = message.removeprefix(f"{path}: ").split(";")[0]
    return f"{path} ({reason})"


def _host_tag() -> str:
    """This host's name reduced to letters and digits (it is part of temporary file names)."""
    return re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:40] or "host"


def _writer_tag() -> str:
    return f"{_host_tag()}-{os.getpid()}"


def _process_exists(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)  # signal 0: existence check only (POSIX; on Windows it would kill)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, as another user's process
        return True
    return True


def _is_stale_temporary(path: Path, now: float) -> bool:
    found = _TEMPORARY_NAME.match(path.name)
    if found is None:
        return False
    try:
        age = now - path.lstat().st_mtime
    except OSError:
        return False
    if age > STALE_TEMPORARY_AGE_S:
        return True
    # The PID test only holds for this host: another machine sharing the folder has its own PIDs.
    same_host = found.group("host") == _host_tag() and os.name == "posix"
    return same_host and not _process_exists(int(found.group("pid")))


def remove_stale_temporaries(cache_dir: str | Path) -> list[Path]:
    """Delete cache temporary files left by killed writers; return the paths removed.

    A temporary file is stale when its writer ran on this host and no longer exists (its
    PID is in the name), or when it is older than ``STALE_TEMPORARY_AGE_S`` (writers on
    other hosts, or files from versions without a PID in the name). A run killed while
    writing a large entry, e.g. by a full disk, otherwise keeps that disk full.
    """
    removed = []
    now = time.time()
    try:
        candidates = [Path(entry.path) for entry in os.scandir(cache_dir) if entry.name.startswith(".")]
    except OSError:
        return removed
    for path in candidates:
        if _is_stale_temporary(path, now):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path)
    return removed


def _new_array_file(path: Path, shape: tuple[int, ...]) -> np.memmap:
    """A ``uint8`` ``.npy`` file of ``shape`` whose blocks are allocated on disk, memory-mapped."""
    with open(path, "wb") as handle:
        np.lib.format.write_array_header_1_0(
            handle, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                     "shape": shape}
        )
        header_bytes = handle.tell()
    _allocate(path, header_bytes, int(np.prod(shape)))
    return np.lib.format.open_memmap(path, mode="r+")


def _allocate(path: Path, offset: int, length: int) -> None:
    """Reserve ``length`` bytes after ``offset`` on disk now: a full disk raises ENOSPC here.

    Without this the file is sparse and the disk fills while images are written through the
    memory map, which the kernel can only report with SIGBUS, killing the process.
    """
    fd = os.open(path, os.O_RDWR)
    try:
        try:
            os.posix_fallocate(fd, offset, length)
            return
        except AttributeError:  # no posix_fallocate (macOS)
            pass
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
        _write_zeros(fd, offset, length)
    finally:
        os.close(fd)


def _write_zeros(fd: int, offset: int, length: int) -> None:
    """The portable fallback of ``_allocate``: write the zeros, a chunk at a time."""
    zeros = memoryview(bytes(min(_ZEROS_CHUNK, max(length, 1))))
    os.lseek(fd, offset, os.SEEK_SET)
    left = length
    while left > 0:
        left -= os.write(fd, zeros[: min(left, len(zeros))])


def _no_space_error(cache_dir: Path, n_images: int, size: int, exc: OSError) -> DataError:
    needed = n_images * size * size * 3
    try:
        free = f"{shutil.disk_usage(cache_dir).free / 1024**2:,.1f} MiB are free there"
    except OSError:
        free = "free space unknown"
    quota = " (disk quota exceeded)" if exc.errno == errno.EDQUOT else ""
    return DataError(
        f"{cache_dir}: not enough disk space for the image cache{quota}: {n_images} images at {size}px need "
        f"{needed / 1024**2:,.1f} MiB and {free}; free some space there, or point --cache-dir (or the "
        "HIERCLS_CACHE environment variable) at a folder on a disk with room for it"
    )


class ImageCache:
    """A folder of decoded, resized image arrays keyed by file identity and size."""

    def __init__(self, cache_dir: str | Path | None = None, workers: int | None = None):
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        self.workers = workers or min(8, os.cpu_count() or 1)
        #: images decoded by the last ``load`` call (0 on a full cache hit)
        self.last_decoded = 0

    def key(self, paths: Sequence[str | Path], size: int) -> str:
        """The cache key of a file list at a size (order of ``paths`` does not matter)."""
        identities = sorted(_identities([Path(os.path.abspath(p)) for p in paths]))
        return self._key(identities, size)

    @staticmethod
    def _key(identities: list[tuple[str, int, int]], size: int) -> str:
        blob = json.dumps({"v": _FORMAT_VERSION, "size": int(size), "files": identities})
        return hashlib.sha256(blob.encode()).hexdigest()[:32]

    def load(self, paths: Sequence[str | Path], size: int, progress: bool = True) -> np.ndarray:
        """``uint8 [N, size, size, 3]`` images in the order of ``paths``.

        A copy-on-write memory map (writes stay in memory; the cache file never changes)
        when the entry was stored in this order, which is always the case for the call that
        created it; an in-memory copy in the requested order otherwise. Unreadable images
        raise one ``DataError`` naming them all (up to ``MAX_LISTED_FILES``, then a count)
        before anything is trained, with the hint to run ``hiercls audit --write-manifest``.
        """
        if int(size) <= 0:
            raise ValueError(f"size must be positive, got {size}")
        size = int(size)
        abs_paths = [Path(os.path.abspath(p)) for p in paths]
        if not abs_paths:
            return np.empty((0, size, size, 3), dtype=np.uint8)
        identities = _identities(abs_paths)
        key = self._key(sorted(identities), size)
        self.last_decoded = 0
        remove_stale_temporaries(self.cache_dir)
        hit = self._open(key, size, len(abs_paths))
        if hit is not None:
            array, stored = hit
            if stored == identities:
                return array
            row = {ident: i for i, ident in enumerate(stored)}
            return np.ascontiguousarray(array[[row[ident] for ident in identities]])
        self._create(key, abs_paths, identities, size, progress)
        opened = self._open(key, size, len(abs_paths))
        if opened is None:  # the entry vanished (cache deleted meanwhile): decode in memory
            return self._decode_all(abs_paths, size, None, progress)
        return opened[0]

    # -- entries ------------------------------------------------------------------------

    def _paths(self, key: str) -> tuple[Path, Path]:
        return self.cache_dir / f"{key}.npy", self.cache_dir / f"{key}.json"

    def _open(self, key: str, size: int, n: int):
        array_path, meta_path = self._paths(key)
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            array = np.lib.format.open_memmap(array_path, mode="c")  # copy-on-write: the file never changes
        except (OSError, ValueError):
            return None
        if array.shape != (n, size, size, 3) or array.dtype != np.uint8 or meta.get("v") != _FORMAT_VERSION:
            return None
        return array, [tuple(item) for item in meta["files"]]

    def _create(self, key, paths, identities, size, progress) -> None:
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DataError(
                f"{self.cache_dir}: cannot create the image cache folder ({exc.strerror or exc}); "
                "set HIERCLS_CACHE to a writable folder"
            ) from None
        array_path, meta_path = self._paths(key)
        writer = _writer_tag()  # in the names, so the next run can tell a killed writer's leftovers
        tmp = self.cache_dir / f".{key}.{writer}.{uuid.uuid4().hex}.tmp.npy"
        meta_tmp = None
        placed = False
        try:
            out = _new_array_file(tmp, (len(paths), size, size, 3))
            self._decode_all(paths, size, out, progress, identities)
            out.flush()
            del out
            os.replace(tmp, array_path)
            placed = True
            meta = {"v": _FORMAT_VERSION, "size": size, "files": [list(i) for i in identities]}
            fd, meta_tmp = tempfile.mkstemp(dir=self.cache_dir, prefix=f".{key}.{writer}.", suffix=".tmp.json")
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(meta, handle)
            os.replace(meta_tmp, meta_path)
            placed = False
        except OSError as exc:  # disk full, read-only or vanished folder: the images themselves are fine
            if placed:  # an array without its metadata is never read: do not leave it taking space
                with contextlib.suppress(OSError):
                    array_path.unlink()
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise _no_space_error(self.cache_dir, len(paths), size, exc) from None
            raise DataError(
                f"{self.cache_dir}: cannot write the image cache ({exc.strerror or exc}); free some space, "
                "or point --cache-dir / HIERCLS_CACHE at a writable folder with room for it"
            ) from None
        finally:
            for leftover in (tmp, meta_tmp):
                if leftover is not None and os.path.exists(leftover):
                    os.unlink(leftover)

    def _reusable_rows(self, identities, size) -> dict[tuple, tuple[Path, int]]:
        """Rows of other entries at the same size that already hold some of these images."""
        wanted = set(identities)
        found: dict[tuple, tuple[Path, int]] = {}
        for meta_path in sorted(self.cache_dir.glob("*.json")):
            if meta_path.name.startswith("."):
                continue  # an entry being written
            try:
                meta = json.loads(meta_path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if meta.get("v") != _FORMAT_VERSION or meta.get("size") != size:
                continue
            for row, item in enumerate(meta.get("files", [])):
                ident = tuple(item)
                if ident in wanted and ident not in found:
                    found[ident] = (meta_path.with_suffix(".npy"), row)
            if len(found) == len(wanted):
                break
        return found

    def _decode_all(self, paths, size, out, progress, identities=None) -> np.ndarray:
        if out is None:
            out = np.empty((len(paths), size, size, 3), dtype=np.uint8)
        todo = list(range(len(paths)))
        if identities is not None and self.cache_dir.exists():
            todo = self._copy_known_rows(identities, size, out)
        failures: list[tuple[Path, str]] = []

        def decode(i: int) -> tuple[int, np.ndarray | None, str | None]:
            try:
                return i, decode_resized(paths[i], size), None
            except DataError as exc:  # collected: every bad file is reported in one error
                return i, None, str(exc)

        with _progress_bar(progress) as bar:
            task = bar.add_task(f"decoding {len(todo)} images at {size}px", total=len(todo))
            if len(todo) < _PARALLEL_FROM or self.workers <= 1:
                results = map(decode, todo)
                self._store(results, out, failures, paths, bar, task)
            else:
                with ThreadPoolExecutor(max_workers=self.workers) as pool:
                    self._store(pool.map(decode, todo), out, failures, paths, bar, task)
        if failures:
            raise unreadable_error(sorted(failures), len(paths))
        return out

    def _store(self, results, out, failures, paths, bar, task) -> None:
        for i, image, error in results:
            if error is None:
                out[i] = image
                self.last_decoded += 1
            else:
                failures.append((paths[i], error))
            bar.advance(task)

    def _copy_known_rows(self, identities, size, out) -> list[int]:
        known = self._reusable_rows(identities, size)
        todo = []
        opened: dict[Path, np.ndarray | None] = {}
        for i, ident in enumerate(identities):
            source = known.get(ident)
            array = None
            if source is not None:
                if source[0] not in opened:
                    try:
                        opened[source[0]] = np.lib.format.open_memmap(source[0], mode="r")
                    except (OSError, ValueError):
                        opened[source[0]] = None
                array = opened[source[0]]
            if array is not None and source[1] < len(array) and array.shape[1:] == (size, size, 3):
                out[i] = array[source[1]]
            else:
                todo.append(i)
        return todo


def _progress_bar(enabled: bool) -> TaskProgress:
    # a bar in a terminal; in a log a line every 30 s (never a blank line when a bar stops)
    return TaskProgress(enabled=enabled)
