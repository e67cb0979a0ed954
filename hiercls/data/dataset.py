"""Reading a dataset into an ``ImageTable``: image paths, labels (tree nodes) and groups.

Three layouts are accepted (``docs/data.md``):

* a folder of class sub-folders, whose names are labels (node names or aliases);
* a folder of images without sub-folders (unlabelled, e.g. for prediction);
* a CSV manifest ``path,label[,group]`` whose paths are relative to the CSV's folder.

Groups (patient, slide) come from the manifest's ``group`` column or from a regular
expression on the file name; splits keep each group on one side.
"""

from __future__ import annotations

import csv
import difflib
import io
import os
import re
import tempfile
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from hiercls.data.images import IMAGE_EXTENSIONS, is_image_file, read_regular_file
from hiercls.errors import ConfigError, DataError, HierclsError, HierclsWarning
from hiercls.io import default_file_mode
from hiercls.taxonomy import Taxonomy, load_taxonomy

__all__ = ["DataWarning", "Exclusions", "ImageTable", "load_images", "missing_label_column", "run_exclusions",
           "unknown_label_counts", "write_manifest"]

_MAX_LISTED = 5  # line numbers / files quoted in one error message

#: Largest manifest read, in bytes (256 MiB: over a million rows).
MAX_MANIFEST_BYTES = 256 * 1024**2


@dataclass
class ImageTable:
    """Images of a dataset with their labels and groups, one entry per image.

    ``labels`` hold resolved node names (``None`` when unlabelled or, for an audit, when
    the label is unknown to the taxonomy); ``raw_labels`` keep what the folder or manifest
    said, so unknown labels can still be reported.
    """

    root: Path
    paths: list[Path]
    labels: list[str | None]
    groups: list[str | None] = field(default_factory=list)
    raw_labels: list[str | None] = field(default_factory=list)
    source: str = ""
    #: files found but left out while reading a folder (broken links, link loops)
    skipped: list[Path] = field(default_factory=list)
    #: the manifest's header as written (empty for a folder)
    columns: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.paths)
        if not self.groups:
            self.groups = [None] * n
        if not self.raw_labels:
            self.raw_labels = list(self.labels)
        for name in ("labels", "groups", "raw_labels"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"ImageTable.{name} has {len(getattr(self, name))} entries for {n} paths")

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def has_groups(self) -> bool:
        """True when at least one image has a group."""
        return any(g is not None for g in self.groups)

    def subset(self, indices: Sequence[int] | np.ndarray) -> ImageTable:
        """A new table with the images at ``indices`` (in that order)."""
        idx = [int(i) for i in np.asarray(indices, dtype=np.int64).reshape(-1)]
        return ImageTable(
            root=self.root,
            paths=[self.paths[i] for i in idx],
            labels=[self.labels[i] for i in idx],
            groups=[self.groups[i] for i in idx],
            raw_labels=[self.raw_labels[i] for i in idx],
            source=self.source,
            columns=list(self.columns),
        )

    def label_indices(self, taxonomy: Taxonomy) -> np.ndarray:
        """Node index of each image's label (``int64``); -1 when unlabelled or not a node."""
        return np.array([taxonomy.index.get(label, -1) if label else -1 for label in self.labels], dtype=np.int64)

    def counts_per_node(self, taxonomy: Taxonomy) -> dict[str, int]:
        """Images under each node: an image counts at its label node and at every ancestor.

        Every node of the tree is a key (zero when no image lies under it); the root counts
        all labelled images.
        """
        counts = dict.fromkeys(taxonomy.nodes, 0)
        for label, n in Counter(lab for lab in self.labels if lab in counts).items():
            for node in taxonomy.path(label):
                counts[node] += n
        return counts

    def exact_counts(self, taxonomy: Taxonomy) -> dict[str, int]:
        """Images labelled exactly at each node (at an internal node: partial labels)."""
        counts = dict.fromkeys(taxonomy.nodes, 0)
        for label in self.labels:
            if label in counts:
                counts[label] += 1
        return counts


#: A folder with a file of this name at its top is read through it rather than its sub-folders.
MANIFEST_NAME = "manifest.csv"


def unknown_label_counts(table: ImageTable) -> Counter:
    """Raw labels that did not resolve to a node (only with ``unknown_labels="keep"``)."""
    return Counter(raw for raw, lab in zip(table.raw_labels, table.labels) if raw is not None and lab is None)


def load_images(
    data: str | Path,
    taxonomy: Taxonomy | None = None,
    group_regex: str | None = None,
    require_labels: bool = True,
    unknown_labels: Literal["raise", "keep"] = "raise",
    excluded: Exclusions | None = None,
    excluded_rows: Literal["unlabel", "drop"] = "unlabel",
) -> ImageTable:
    """Read a class-folder tree, a folder of images, or a CSV manifest into an ``ImageTable``.

    Labels are resolved with ``taxonomy.resolve_labels`` (names or aliases; one
    ``DataError`` lists every unknown label). ``unknown_labels="keep"`` instead leaves
    unknown labels as ``None`` in ``labels`` (their text stays in ``raw_labels``), which
    is what the audit uses to report them. ``group_regex`` derives each image's group
    from its file name (first capture group, else the whole match); it overrides a
    manifest's ``group`` column. Paths are absolute; order is deterministic.

    A folder holding a ``manifest.csv`` at its top is read through that manifest: it
    usually carries finer labels (and groups) than the class folders do.

    ``excluded`` (:func:`run_exclusions`) names nodes a run was trained without
    (``--exclude``): images labelled at or below them are not unknown labels but images the
    run cannot score. ``excluded_rows="unlabel"`` keeps them without a label (prediction),
    ``"drop"`` leaves them out (evaluation); either way a ``DataWarning`` names the labels
    and counts.
    """
    data = Path(data)
    if not data.exists():
        raise DataError(f"{data}: not found; give a folder of class sub-folders, a folder of images or a CSV manifest")
    if data.is_dir() and (data / MANIFEST_NAME).is_file():
        data = data / MANIFEST_NAME
    columns: list[str] = []
    if data.is_dir():
        root, paths, raw_labels, groups, skipped = _read_folder(data, require_labels)
        source = str(data)
    elif data.suffix.lower() == ".csv":
        root, paths, raw_labels, groups, columns = _read_manifest(data, require_labels)
        skipped = []
        source = str(data)
    else:
        raise DataError(f"{data}: not a folder or a .csv manifest; give a folder of class sub-folders or a CSV")
    if group_regex is not None:
        groups = _groups_from_regex(paths, group_regex, source)
    if excluded is not None:
        paths, raw_labels, groups = _set_aside_excluded(paths, raw_labels, groups, excluded, excluded_rows, source)
    try:
        labels = _resolve(raw_labels, taxonomy, source, unknown_labels)
    except DataError as exc:
        if excluded is None:
            raise
        raise DataError(f"{exc} ({excluded.hint()})") from None
    return ImageTable(root=root, paths=paths, labels=labels, groups=groups, raw_labels=raw_labels, source=source,
                      skipped=skipped, columns=columns)


def write_manifest(table: ImageTable, path: str | Path, overwrite: bool = False) -> None:
    """Write ``path,label[,group]`` rows, paths relative to the manifest's folder, atomically.

    Images outside the manifest's folder are written with absolute paths (a relative path
    with '..' would be refused when the manifest is read). An existing file is replaced
    only with ``overwrite=True``.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise DataError(f"{path}: already exists; choose another file name or allow overwriting")
    folder = Path(os.path.abspath(path)).parent
    if not folder.is_dir():
        raise DataError(f"{folder}: folder does not exist; create it first or choose another manifest path")
    with_groups = table.has_groups
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["path", "label", "group"] if with_groups else ["path", "label"])
            for image, label, group in zip(table.paths, table.labels, table.groups):
                try:
                    rel = image.relative_to(folder).as_posix()
                except ValueError:
                    rel = str(image)
                row = [rel, label or ""]
                writer.writerow(row + [group or ""] if with_groups else row)
        os.chmod(tmp, default_file_mode())  # mkstemp creates 0600; a manifest is an ordinary shared file
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# ----------------------------------------------------------------------------------------
# Folders


class DataWarning(HierclsWarning):
    """Something in the data was skipped or looks risky; training goes on."""


def _dangling(path: Path) -> bool:
    """True for a symbolic link that leads nowhere (broken, or a loop of links)."""
    if not path.is_symlink():
        return False
    try:
        path.stat()
    except OSError:  # ENOENT (broken) or ELOOP (loop)
        return True
    return False


def _image_files_below(folder: Path, skipped: list[Path]) -> list[Path]:
    """Image files anywhere below ``folder``, skipping hidden files and hidden folders, sorted.

    Linked folders are not followed (``os.walk`` default), so a link back up the tree cannot
    make the walk loop; image names that are broken links or link loops go to ``skipped``.
    """
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if is_image_file(name):
                path = Path(dirpath) / name
                (skipped if _dangling(path) else found).append(path)
    return sorted(found)


def _warn_skipped(root: Path, skipped: list[Path]) -> None:
    if skipped:
        shown = ", ".join(str(p.relative_to(root)) for p in sorted(skipped)[:_MAX_LISTED])
        warnings.warn(
            f"{root}: skipped {len(skipped)} image name(s) that are broken symbolic links or link loops "
            f"({shown}{', ...' if len(skipped) > _MAX_LISTED else ''}); fix or remove the links",
            DataWarning,
            stacklevel=4,
        )


def _read_folder(folder: Path, require_labels: bool):
    root = Path(os.path.abspath(folder))
    try:
        entries = sorted(root.iterdir())
    except OSError as exc:
        raise DataError(f"{root}: cannot list the folder ({exc.strerror or exc}); check its permissions") from None
    skipped: list[Path] = [p for p in entries if is_image_file(p) and _dangling(p)]
    subdirs = [p for p in entries if p.is_dir() and not p.name.startswith(".")]
    # Not ``is_file()``: an image name that is a FIFO or a link to a device is kept, so that the
    # audit lists it and the cache refuses it by name instead of it vanishing from the data.
    top_images = [p for p in entries if is_image_file(p) and not p.is_dir() and not _dangling(p)]
    paths: list[Path] = []
    raw_labels: list[str | None] = []
    for sub in subdirs:
        images = _image_files_below(sub, skipped)
        paths.extend(images)
        raw_labels.extend([sub.name] * len(images))
    if paths and top_images:
        raise DataError(
            f"{root}: has class sub-folders and also {len(top_images)} image(s) directly inside it "
            f"(e.g. {top_images[0].name}); move them into a class folder or list everything in a manifest"
        )
    if not paths:
        if not top_images:
            raise DataError(
                f"{root}: no images found (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))}); "
                "check the folder or give a CSV manifest"
            )
        if require_labels:
            raise DataError(
                f"{root}: has images but no class sub-folders, so no labels; put the images in one "
                "sub-folder per label or give a CSV manifest path,label"
            )
        paths = top_images
        raw_labels = [None] * len(paths)
    _warn_skipped(root, skipped)
    return root, paths, raw_labels, [None] * len(paths), skipped


# ----------------------------------------------------------------------------------------
# Manifests


def _cell(row: list[str], col: int | None) -> str:
    """The stripped text of column ``col`` of a CSV row ('' when the column is absent)."""
    return row[col].strip() if col is not None and col < len(row) else ""


def _read_manifest(csv_path: Path, require_labels: bool):
    """Root folder, image paths, raw labels and groups of a CSV manifest, every row checked."""
    root = Path(os.path.abspath(csv_path.parent))
    rows = _manifest_rows(csv_path)
    columns = _manifest_columns(csv_path, rows[0], require_labels)
    entries = _manifest_entries(csv_path, root, rows[1:], columns, require_labels)
    _check_listed_files(csv_path, root, entries)
    return root, entries.paths, entries.raw_labels, entries.groups, [h.strip() for h in rows[0]]


def _manifest_rows(csv_path: Path) -> list[list[str]]:
    """The CSV's rows (header first), read within the size limit; refuses an empty or non-UTF-8 file."""
    data = read_regular_file(csv_path, MAX_MANIFEST_BYTES, what="manifest")  # no FIFO, no endless file
    try:
        rows = list(csv.reader(io.StringIO(data.decode("utf-8-sig"), newline="")))
    except UnicodeDecodeError:
        raise DataError(f"{csv_path}: not a UTF-8 text file; save the manifest as UTF-8 CSV") from None
    except csv.Error as exc:
        raise DataError(f"{csv_path}: malformed CSV ({exc})") from None
    if not rows:
        raise DataError(
            f"{csv_path}: empty manifest; it needs a header line 'path,label[,group]' and one row per image"
        )
    return rows


def _manifest_columns(csv_path: Path, header_row: list[str], require_labels: bool) -> tuple[int, int | None, int | None]:
    """Positions of the path, label and group columns (``None`` for an absent optional column)."""
    header = [h.strip().lower() for h in header_row]
    required = ["path", "label"] if require_labels else ["path"]
    missing = [c for c in required if c not in header]
    found = ", ".join(repr(h.strip()) for h in header_row) or "none"
    if missing:
        raise DataError(
            f"{csv_path}: missing column(s) {', '.join(missing)} (found: {found}); "
            "the first line must be a header such as 'path,label,group'"
        )
    _warn_about_columns(csv_path, header, found)
    col_label = header.index("label") if "label" in header else None
    col_group = header.index("group") if "group" in header else None
    return header.index("path"), col_label, col_group


def _warn_about_columns(csv_path: Path, header: list[str], found: str) -> None:
    """Warn of a missing ``label`` column and of a column that looks like a misspelt ``group``.

    Without a label column every image reads as unlabelled, which prediction and the audit
    accept; a warning keeps a typo in the header from passing unnoticed. A manifest of paths
    (and groups) only is unlabelled on purpose and gets no warning.
    """
    if _label_column_missing(header):
        warnings.warn(
            f"{csv_path}: the manifest has no 'label' column (found: {found}), so every image is read as "
            f"unlabelled; name the label column 'label' in the header line{_did_you_mean(header, 'label')}",
            DataWarning, stacklevel=5,
        )
    hint = _did_you_mean(header, "group") if "group" not in header else ""
    if hint:
        warnings.warn(f"{csv_path}: the manifest has no 'group' column (found: {found}), so no image has a "
                      f"group; name the group column 'group' in the header line{hint}", DataWarning, stacklevel=5)


def _label_column_missing(header: list[str]) -> bool:
    """True for a header (lower case) with columns besides path and group but no ``label``."""
    return "label" not in header and bool(set(header) - {"path", "group", ""})


def label_column_missing(table: ImageTable) -> bool:
    """True when ``table`` comes from a manifest with other columns but no ``label`` column (a typo?)."""
    return _label_column_missing([c.strip().lower() for c in table.columns])


def _did_you_mean(header: list[str], name: str) -> str:
    """" (is 'lable' meant to be 'label'?)" for an unread column close to ``name``; '' when none is."""
    unread = [h for h in header if h not in ("path", "label", "group")]
    close = difflib.get_close_matches(name, unread, n=1, cutoff=0.6)
    return f" (is '{close[0]}' meant to be '{name}'?)" if close else ""


def missing_label_column(table: ImageTable) -> str | None:
    """Why no image of ``table`` has a label when its manifest lacks a ``label`` column, else ``None``."""
    if not table.columns or "label" in (c.strip().lower() for c in table.columns):
        return None
    found = ", ".join(repr(c) for c in table.columns)
    return (f"{table.source}: the manifest has no 'label' column (found: {found}); "
            "name the label column 'label' in the header line")


@dataclass
class _ManifestEntries:
    """The manifest's non-blank rows, with the CSV line each came from."""

    paths: list[Path] = field(default_factory=list)
    raw_labels: list[str | None] = field(default_factory=list)
    groups: list[str | None] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)


def _manifest_entries(
    csv_path: Path, root: Path, rows: list[list[str]], columns: tuple[int, int | None, int | None],
    require_labels: bool,
) -> _ManifestEntries:
    """Every non-blank row as an absolute path, label and group; refuses paths outside ``root`` and missing labels."""
    col_path, col_label, col_group = columns
    entries = _ManifestEntries()
    outside: list[tuple[int, str]] = []
    no_label: list[int] = []
    for line_no, row in enumerate(rows, start=2):
        if not row or all(not cell.strip() for cell in row):
            continue  # blank line
        rel = _cell(row, col_path)
        if not rel:
            raise DataError(f"{csv_path}:{line_no}: empty path; every row needs a path to an image")
        path = _inside_root(root, rel)
        if path is None:
            outside.append((line_no, rel))
            continue
        label = _cell(row, col_label) or None
        if label is None and require_labels:
            no_label.append(line_no)
        entries.paths.append(path)
        entries.raw_labels.append(label)
        entries.groups.append(_cell(row, col_group) or None)
        entries.lines.append(line_no)
    _refuse_bad_rows(csv_path, root, outside, no_label)
    if not entries.paths:
        raise DataError(f"{csv_path}: the manifest lists no images; add one row per image under the header")
    return entries


def _refuse_bad_rows(csv_path: Path, root: Path, outside: list[tuple[int, str]], no_label: list[int]) -> None:
    if outside:
        shown = ", ".join(f"line {n} ({p})" for n, p in outside[:_MAX_LISTED])
        raise DataError(
            f"{csv_path}: {len(outside)} path(s) point outside the manifest's folder {root}: {shown}; "
            "use paths relative to the CSV's folder without '..', or absolute paths"
        )
    if no_label:
        raise DataError(
            f"{csv_path}: {len(no_label)} row(s) without a label ({_lines(no_label)}); "
            "fill in the label column or remove those rows"
        )


def _check_listed_files(csv_path: Path, root: Path, entries: _ManifestEntries) -> None:
    """Refuse listed files that do not exist, and files listed twice."""
    # ``exists`` rather than ``is_file``: a listed FIFO or device is not "missing"; it is
    # reported as unreadable by the audit and refused by name by the cache.
    missing_files = [(n, p) for n, p in zip(entries.lines, entries.paths) if not p.exists()]
    if missing_files:
        raise DataError(
            f"{csv_path}: {len(missing_files)} listed file(s) not found ({_lines([n for n, _ in missing_files])}, "
            f"e.g. {missing_files[0][1]}); fix the paths (relative to {root}) or remove those rows"
        )
    seen: dict[Path, int] = {}
    repeated = []
    for n, p in zip(entries.lines, entries.paths):
        if p in seen:
            repeated.append(n)
        seen.setdefault(p, n)
    if repeated:
        raise DataError(
            f"{csv_path}: {len(repeated)} row(s) list a file already listed above ({_lines(repeated)}); "
            "remove the repeated rows"
        )


def _inside_root(root: Path, rel: str) -> Path | None:
    """Absolute path of a manifest entry; ``None`` when a relative path climbs out of ``root``.

    Absolute paths are taken as given (they were written on purpose, e.g. by
    ``hiercls audit --write-manifest`` for images outside the manifest's folder).
    """
    rel = rel.replace("\\", "/")
    candidate = Path(rel)
    if candidate.is_absolute():
        return Path(os.path.normpath(candidate))
    full = Path(os.path.normpath(root / candidate))
    try:
        full.relative_to(root)
    except ValueError:
        return None
    return full


def _lines(numbers: list[int]) -> str:
    """'line 7' or 'lines 2, 3, 4, 5, 6, ...' (the first few only)."""
    shown = ", ".join(str(n) for n in numbers[:_MAX_LISTED])
    return ("line " if len(numbers) == 1 else "lines ") + shown + (", ..." if len(numbers) > _MAX_LISTED else "")


# ----------------------------------------------------------------------------------------
# Groups and labels


def _groups_from_regex(paths: list[Path], pattern: str, source: str) -> list[str | None]:
    try:
        regex = re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"--group-regex '{pattern}' is not a valid regular expression ({exc})") from None
    groups: list[str | None] = []
    unmatched: list[Path] = []
    for path in paths:
        match = regex.search(path.name)
        if match is None:
            unmatched.append(path)
            groups.append(None)
            continue
        value = next((g for g in match.groups() if g is not None), None) if regex.groups else match.group(0)
        groups.append(value if value else None)
        if not value:
            unmatched.append(path)
    if unmatched:
        raise DataError(
            f"{source}: group regex '{pattern}' does not match {len(unmatched)} of {len(paths)} file name(s) "
            f"(e.g. {unmatched[0].name}); change the regex so it matches every file name"
        )
    return groups


def _resolve(
    raw_labels: list[str | None], taxonomy: Taxonomy | None, source: str, unknown_labels: str
) -> list[str | None]:
    if unknown_labels not in ("raise", "keep"):
        raise ValueError(f"unknown_labels must be 'raise' or 'keep', not {unknown_labels!r}")
    if taxonomy is None:
        return list(raw_labels)
    given = [lab for lab in raw_labels if lab is not None]
    if unknown_labels == "raise":
        mapping = dict(zip(given, taxonomy.resolve_labels(given, source=source)))
    else:
        mapping = {}
        for label in set(given):
            try:
                mapping[label] = taxonomy.resolve(label)
            except DataError:
                mapping[label] = None
    return [mapping[lab] if lab is not None else None for lab in raw_labels]


# ----------------------------------------------------------------------------------------
# Nodes a run was trained without (--exclude)


@dataclass(frozen=True)
class Exclusions:
    """Nodes a run left out of its tree (``--exclude``), to recognise their labels in data.

    ``full`` is the tree before the exclusion when it can still be read (the run's config
    names it); without it only labels naming an excluded node itself are recognised.
    """

    nodes: tuple[str, ...]
    full: Taxonomy | None = None
    taxonomy_file: str = ""

    def excluded_node(self, raw_label: str) -> str | None:
        """The excluded node at or above ``raw_label`` (a name or alias), else ``None``."""
        if self.full is None:
            return raw_label if raw_label in self.nodes else None
        try:
            node = self.full.resolve(raw_label)
        except DataError:
            return None
        return next((n for n in self.full.path(node) if n in self.nodes), None)

    def hint(self) -> str:
        """Why a label of the full tree may be unknown to the run, and what to do."""
        nodes = ", ".join(self.nodes)
        if self.full is not None:
            return f"the run was trained without {nodes} (--exclude)"
        return (f"the run was trained without {nodes} (--exclude), and its original taxonomy "
                f"{self.taxonomy_file or '(unknown)'} cannot be read to recognise labels below them; "
                "put that file back or remove those rows")


def run_exclusions(taxonomy_file: str | Path | None, exclude: Sequence[str], run_taxonomy: Taxonomy) -> Exclusions | None:
    """The :class:`Exclusions` of a run from its config's ``taxonomy`` and ``exclude``; ``None`` without exclusions.

    The original tree is used only when it still gives the run's tree once the nodes are
    excluded (the file may have moved or changed since training).
    """
    if not exclude:
        return None
    full: Taxonomy | None = None
    try:
        candidate = load_taxonomy(taxonomy_file) if taxonomy_file else None
        if candidate is not None and candidate.exclude(list(exclude)).fingerprint == run_taxonomy.fingerprint:
            full = candidate
    except (HierclsError, OSError):
        full = None
    return Exclusions(tuple(exclude), full, str(taxonomy_file or ""))


def _set_aside_excluded(
    paths: list[Path], raw_labels: list[str | None], groups: list[str | None], excluded: Exclusions,
    action: str, source: str,
) -> tuple[list[Path], list[str | None], list[str | None]]:
    """Unlabel (``"unlabel"``) or drop (``"drop"``) images labelled under excluded nodes, with a warning."""
    if action not in ("unlabel", "drop"):
        raise ValueError(f"excluded_rows must be 'unlabel' or 'drop', not {action!r}")
    hit = [raw is not None and excluded.excluded_node(raw) is not None for raw in raw_labels]
    if not any(hit):
        return paths, raw_labels, groups
    counts = Counter(raw for raw, h in zip(raw_labels, hit) if h)
    listed = ", ".join(f"'{label}' x{n}" for label, n in counts.most_common())
    what = (f"{sum(hit)} image(s) labelled under node(s) the run was trained without "
            f"(--exclude {' '.join(excluded.nodes)}): {listed}")
    if action == "unlabel":
        warnings.warn(f"{source}: {what}; they are predicted like unlabelled images", DataWarning, stacklevel=3)
        return paths, [None if h else raw for raw, h in zip(raw_labels, hit)], groups
    keep = [i for i, h in enumerate(hit) if not h]
    if not keep:
        raise DataError(f"{source}: all {what}; the run cannot score them, give images of the nodes it was trained on")
    warnings.warn(f"{source}: {what}; they are left out of the scores, since the run cannot predict those nodes",
                  DataWarning, stacklevel=3)
    return [paths[i] for i in keep], [raw_labels[i] for i in keep], [groups[i] for i in keep]
