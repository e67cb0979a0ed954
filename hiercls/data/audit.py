"""Data audit: what to fix in a dataset before training on it (the paper's section 3.1).

``audit`` reads every image once and reports

* exact duplicates (same bytes: SHA-256), as sets of files;
* near duplicates: the same picture re-encoded, resized or slightly brightened. Found with a
  64-bit perceptual hash (``imagehash.phash``); two images are near duplicates when their
  hashes differ in at most ``near_threshold`` bits (default 4 of 64). Exact duplicates are
  not repeated here. Pairs are found with a pigeonhole index (split the hash into
  ``threshold + 1`` chunks; near pairs share at least one chunk exactly), not all pairs;
* unreadable, truncated or empty files, files that are not regular files (a FIFO, a link to a
  device), float images with NaN or infinite pixels, and images smaller than ``min_size``;
* groups with fewer than ``min_group_images`` images and groups that span several labels;
* labels unknown to the taxonomy (load with ``unknown_labels="keep"`` so they are reported);
* duplicate sets split across the folds of a given split (they leak);
* image counts per node and per level.

``AuditReport.clean_indices()`` is the table without what was flagged.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter, defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)

from hiercls.console import bars_enabled
from hiercls.data import images as _images
from hiercls.data.dataset import ImageTable, label_column_missing, unknown_label_counts
from hiercls.data.images import open_rgb_bytes, read_regular_file
from hiercls.errors import ConfigError, DataError
from hiercls.taxonomy import Taxonomy

__all__ = ["DEFAULT_NEAR_THRESHOLD", "AuditReport", "ImageInfo", "audit", "inspect_image", "near_duplicate_pairs"]

#: ``summary`` entries that describe the data rather than a problem in it.
_NOT_PROBLEMS = frozenset({"images", "unlabelled images", "images kept"})

#: Hamming distance (bits of 64) at or below which two perceptual hashes are near duplicates.
DEFAULT_NEAR_THRESHOLD = 4


@dataclass(frozen=True)
class ImageInfo:
    """What the audit learns from reading one file."""

    sha256: str | None
    phash: int | None
    width: int
    height: int
    error: str | None = None


def inspect_image(path: str | Path) -> ImageInfo:
    """Hash the bytes, decode, and perceptual-hash one image; errors are returned, not raised."""
    try:
        data = read_regular_file(path, _images.MAX_IMAGE_BYTES, what="image file")
    except DataError as exc:  # missing, not a regular file (FIFO, device), too large
        return ImageInfo(None, None, 0, 0, str(exc).removeprefix(f"{path}: "))
    digest = hashlib.sha256(data).hexdigest()
    try:
        image = open_rgb_bytes(data, name=str(path))
    except DataError as exc:
        message = str(exc).removeprefix(f"{path}: ")
        return ImageInfo(digest, None, 0, 0, message)
    width, height = image.size
    bits = _imagehash().phash(image).hash.flatten()
    value = int("".join("1" if b else "0" for b in bits), 2)
    return ImageInfo(digest, value, width, height)


def _imagehash():
    """The ``imagehash`` module, imported on first use so the rest of hiercls works without it."""
    try:
        import imagehash
    except ImportError:
        raise ConfigError("the audit needs the 'imagehash' package; install it with: pip install imagehash") from None
    return imagehash


def near_duplicate_pairs(hashes: Sequence[int], threshold: int = DEFAULT_NEAR_THRESHOLD) -> list[tuple[int, int]]:
    """Index pairs ``(i, j)``, ``i < j``, whose 64-bit hashes differ in at most ``threshold`` bits.

    Pigeonhole: split the 64 bits into ``threshold + 1`` chunks; two hashes within the
    threshold agree exactly on at least one chunk, so only hashes sharing a chunk value
    are compared (vectorised within each bucket).
    """
    if threshold < 0 or len(hashes) < 2:
        return []
    if threshold >= 64:  # every pair is within 64 bits
        return [(i, j) for i in range(len(hashes)) for j in range(i + 1, len(hashes))]
    values = np.array([int(h) for h in hashes], dtype=np.uint64)
    n_chunks = threshold + 1
    bounds = np.linspace(0, 64, n_chunks + 1).astype(int)
    pairs: set[tuple[int, int]] = set()
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        mask = np.uint64((1 << int(hi - lo)) - 1)
        keys = (values >> np.uint64(lo)) & mask
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
        ends = np.r_[starts[1:], len(order)]
        for start, end in zip(starts, ends):
            if end - start < 2:
                continue
            members = np.sort(order[start:end])
            bucket = values[members]
            dist = np.bitwise_count(bucket[:, None] ^ bucket[None, :])
            ii, jj = np.nonzero(np.triu(dist <= threshold, k=1))
            pairs.update(zip(members[ii].tolist(), members[jj].tolist()))
    return sorted(pairs)


def _components(n: int, pairs: Sequence[tuple[int, int]]) -> list[list[int]]:
    """Connected components with at least two members (union-find), each sorted."""
    parent = list(range(n))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in pairs:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    sets: dict[int, list[int]] = defaultdict(list)
    for i in range(n):
        sets[find(i)].append(i)
    return sorted((members for members in sets.values() if len(members) > 1), key=lambda m: m[0])


@dataclass
class AuditReport:
    """Everything ``audit`` found; indices refer to ``table``."""

    table: ImageTable
    infos: list[ImageInfo]
    min_size: int
    min_group_images: int
    near_threshold: int
    exact_duplicates: list[list[int]] = field(default_factory=list)
    near_duplicates: list[list[int]] = field(default_factory=list)
    unreadable: list[tuple[int, str]] = field(default_factory=list)
    too_small: list[tuple[int, int, int]] = field(default_factory=list)
    small_groups: list[tuple[str, int]] = field(default_factory=list)
    mixed_groups: list[tuple[str, list[str]]] = field(default_factory=list)
    unknown_labels: dict[str, int] = field(default_factory=dict)
    conflicting_duplicates: list[list[int]] = field(default_factory=list)
    cross_fold_duplicates: list[list[int]] = field(default_factory=list)
    counts_per_node: dict[str, int] = field(default_factory=dict)
    exact_counts: dict[str, int] = field(default_factory=dict)
    counts_per_level: list[dict[str, int]] = field(default_factory=list)
    checked_folds: bool = False

    def flagged(self) -> dict[int, str]:
        """Index -> reason for every image that ``clean_indices`` drops."""
        reasons: dict[int, str] = {}
        for i, message in self.unreadable:
            reasons[i] = f"unreadable: {message}"
        for i, w, h in self.too_small:
            reasons.setdefault(i, f"too small: {w}x{h} < {self.min_size}px")
        for i, (raw, label) in enumerate(zip(self.table.raw_labels, self.table.labels)):
            if raw is not None and label is None:
                reasons.setdefault(i, f"unknown label '{raw}'")
        small = {g for g, _ in self.small_groups}
        for i, group in enumerate(self.table.groups):
            if group in small:
                reasons.setdefault(i, f"group '{group}' has fewer than {self.min_group_images} images")
        for members in self.conflicting_duplicates:
            labels = sorted({str(self.table.labels[i]) for i in members})
            for i in members:
                reasons.setdefault(i, f"duplicate with conflicting labels ({', '.join(labels)})")
        for kind, sets in (("exact", self.exact_duplicates), ("near", self.near_duplicates)):
            for members in sets:
                keep = next((i for i in members if i not in reasons), None)
                for i in members:
                    if i != keep:
                        reasons.setdefault(i, f"{kind} duplicate of {self.table.paths[keep].name}" if keep is not None
                                           else f"{kind} duplicate")
        return reasons

    def clean_indices(self) -> np.ndarray:
        """Indices to keep: one copy of each duplicate set, none of the flagged files."""
        dropped = self.flagged()
        return np.array([i for i in range(len(self.table)) if i not in dropped], dtype=np.int64)

    def summary(self) -> dict[str, int]:
        """Counts of each finding, for a summary table or a test."""
        out = {
            "images": len(self.table),
            "unlabelled images": sum(raw is None for raw in self.table.raw_labels),
            "exact duplicate sets": len(self.exact_duplicates),
            "exact duplicate extra copies": sum(len(m) - 1 for m in self.exact_duplicates),
            "near duplicate sets": len(self.near_duplicates),
            "unreadable files": len(self.unreadable),
            f"smaller than {self.min_size}px": len(self.too_small),
            "unknown labels": sum(self.unknown_labels.values()),
            f"groups under {self.min_group_images} images": len(self.small_groups),
            "groups with several labels": len(self.mixed_groups),
            "duplicate sets with conflicting labels": len(self.conflicting_duplicates),
            "duplicate sets across folds": len(self.cross_fold_duplicates),
            "broken links skipped": len(self.table.skipped),
            "manifest without a 'label' column": int(label_column_missing(self.table)),
            "images kept": len(self.clean_indices()),
        }
        if not out["manifest without a 'label' column"]:
            del out["manifest without a 'label' column"]
        if self.min_group_images <= 1:
            del out[f"groups under {self.min_group_images} images"]
        if not self.checked_folds:
            del out["duplicate sets across folds"]
        if not self.table.skipped:
            del out["broken links skipped"]
        return out

    def problems(self) -> dict[str, int]:
        """The findings of ``summary`` that are problems to fix, with a non-zero count.

        Empty for a clean dataset; ``hiercls audit`` exits with status 1 when it is not.
        """
        return {key: value for key, value in self.summary().items() if value and key not in _NOT_PROBLEMS}


def audit(
    data: ImageTable | Sequence[str | Path],
    taxonomy: Taxonomy | None = None,
    min_size: int = 32,
    min_group_images: int = 1,
    near_threshold: int = DEFAULT_NEAR_THRESHOLD,
    splits: Sequence[tuple[np.ndarray, np.ndarray]] | None = None,
    progress: bool = True,
    workers: int | None = None,
    console: Console | None = None,
) -> AuditReport:
    """Audit a table (or a plain list of image paths) and return an ``AuditReport``.

    ``min_group_images=1`` turns the small-group check off; ``near_threshold=-1`` turns the
    near-duplicate search off. ``splits`` (``(train_idx, val_idx)`` pairs) enables the
    report of duplicate sets whose copies fall in different validation folds. The progress bar
    is drawn on ``console`` (default: rich's, on stdout); never in a log (``hiercls.console``).
    """
    table = data if isinstance(data, ImageTable) else _table_from_paths(data)
    infos = _inspect_all(table.paths, bars_enabled(console, progress), workers, console)
    report = AuditReport(table=table, infos=infos, min_size=min_size, min_group_images=min_group_images,
                         near_threshold=near_threshold)

    report.unreadable = [(i, info.error) for i, info in enumerate(infos) if info.error]
    report.too_small = [
        (i, info.width, info.height)
        for i, info in enumerate(infos)
        if not info.error and min(info.width, info.height) < min_size
    ]

    by_digest: dict[str, list[int]] = defaultdict(list)
    for i, info in enumerate(infos):
        if info.sha256 is not None:
            by_digest[info.sha256].append(i)
    report.exact_duplicates = sorted((m for m in by_digest.values() if len(m) > 1), key=lambda m: m[0])

    # Near duplicates among distinct contents: one representative per exact-duplicate set.
    reps = [m[0] for m in by_digest.values() if infos[m[0]].phash is not None]
    reps.sort()
    pairs = near_duplicate_pairs([infos[i].phash for i in reps], near_threshold)
    report.near_duplicates = [[reps[k] for k in comp] for comp in _components(len(reps), pairs)]

    for members in report.exact_duplicates + report.near_duplicates:
        labels = {table.labels[i] for i in members if table.labels[i] is not None}
        if len(labels) > 1:
            report.conflicting_duplicates.append(members)

    report.unknown_labels = dict(unknown_label_counts(table).most_common())
    _check_groups(report)
    if splits is not None:
        report.cross_fold_duplicates = _cross_fold(report, by_digest, splits)
        report.checked_folds = True
    if taxonomy is not None:
        report.counts_per_node = table.counts_per_node(taxonomy)
        report.exact_counts = table.exact_counts(taxonomy)
        report.counts_per_level = [
            {node: report.counts_per_node[node] for node in level} for level in taxonomy.levels[1:]
        ]
    return report


def _table_from_paths(paths: Sequence[str | Path]) -> ImageTable:
    absolute = [Path(os.path.abspath(p)) for p in paths]
    root = Path(os.path.commonpath([str(p.parent) for p in absolute])) if absolute else Path.cwd()
    return ImageTable(root=root, paths=absolute, labels=[None] * len(absolute))


def _inspect_all(paths: Sequence[Path], progress: bool, workers: int | None,
                 console: Console | None = None) -> list[ImageInfo]:
    workers = workers or min(8, os.cpu_count() or 1)
    infos: list[ImageInfo] = []
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        console=console, disable=not progress, transient=True,
    ) as bar:
        task = bar.add_task(f"hashing {len(paths)} images", total=len(paths))
        if workers <= 1 or len(paths) < 32:
            for path in paths:
                infos.append(inspect_image(path))
                bar.advance(task)
        else:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                for info in pool.map(inspect_image, paths, chunksize=16):
                    infos.append(info)
                    bar.advance(task)
    return infos


def _check_groups(report: AuditReport) -> None:
    table = report.table
    sizes = Counter(g for g in table.groups if g is not None)
    if report.min_group_images > 1:
        report.small_groups = sorted(
            ((g, n) for g, n in sizes.items() if n < report.min_group_images), key=lambda item: (item[1], item[0])
        )
    labels_of: dict[str, set[str]] = defaultdict(set)
    for group, label in zip(table.groups, table.labels):
        if group is not None and label is not None:
            labels_of[group].add(label)
    report.mixed_groups = sorted((g, sorted(labs)) for g, labs in labels_of.items() if len(labs) > 1)


def _cross_fold(report: AuditReport, by_digest, splits) -> list[list[int]]:
    fold_of: dict[int, int] = {}
    for k, (_, val) in enumerate(splits):
        for i in np.asarray(val).tolist():
            fold_of[int(i)] = k
    copies = {m[0]: m for m in by_digest.values()}
    out = []
    for members in report.exact_duplicates + [
        sorted(i for rep in near for i in copies.get(rep, [rep])) for near in report.near_duplicates
    ]:
        folds = {fold_of[i] for i in members if i in fold_of}
        if len(folds) > 1:
            out.append(members)
    return out
