"""Atomic file writes and bounded reads of user files, free of torch so that light modules
can import them cheaply.

The content is written to a temporary file in the same folder and moved into place with
``os.replace``, so a crash or Ctrl-C mid-write leaves either the old file or the new one,
never a truncated one. Every file of a run directory, report or predictions CSV goes
through these helpers.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "RUN_FILE_BYTES",
    "BoundedSafeLoader",
    "DuplicateYamlKey",
    "YamlTooLarge",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "load_yaml",
    "read_user_text",
]


# The most hiercls reads of one text file of a run folder (config, split, metrics, metadata):
# far above any real one, and a bound on what a hostile folder (e.g. a link to /dev/zero) costs.
RUN_FILE_BYTES = 256 * 2**20


def read_user_text(path: str | Path, what: str, error: type[Exception], encoding: str = "utf-8",
                   max_bytes: int = 64 * 2**20) -> str:
    """The text of a file the user named; a missing or unreadable file raises ``error``
    with a one-line message naming the file and what it was meant to be (``what``).

    Only regular files are read, and at most ``max_bytes`` of them: a FIFO or ``/dev/zero``
    given as a config would otherwise block or read forever.
    """
    path = Path(path)
    try:
        if path.exists() and not path.is_file():
            raise error(f"{path}: {what} is not a regular file")
        with open(path, encoding=encoding) as handle:
            text = handle.read(max_bytes + 1)
        if len(text) > max_bytes:
            raise error(f"{path}: {what} is larger than {max_bytes / 2**20:.0f} MiB; is it the right file?")
        return text
    except FileNotFoundError:
        raise error(f"{path}: {what} not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"{path}: cannot read {what} ({exc})") from None


def yaml_error_message(path: str | Path, exc: Exception) -> str:
    """``FILE:LINE:COLUMN: YAML syntax error: PROBLEM`` for a PyYAML parse error
    (``FILE:LINE: duplicate key ...`` for a repeated mapping key)."""
    if isinstance(exc, DuplicateYamlKey):
        return f"{path}:{exc.line}: {exc.problem}"
    mark = getattr(exc, "problem_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return f"{where}: YAML syntax error: {problem}"


# Bounds on what a YAML file users hand each other may expand to. Anchors and aliases let a few hundred bytes
# stand for billions of nodes (an "alias bomb"), so the size is counted on the YAML graph,
# with aliases expanded, before anything walks it. Real taxonomies and configs are far inside it.
MAX_YAML_NODES = 200_000


class YamlTooLarge(ValueError):
    """A YAML document that expands beyond ``MAX_YAML_NODES``, or refers to itself."""


def _check_expanded_size(root: yaml.Node) -> None:
    """Count the document's nodes with aliases expanded, without expanding them (memoised).

    Iterative, so a deeply nested document cannot exhaust Python's recursion limit here.
    """
    size: dict[int, int] = {}
    in_progress: set[int] = set()  # the nodes on the current path: meeting one again is a cycle
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        if children_done:
            in_progress.discard(id(node))
            size[id(node)] = 1 + sum(size[id(k)] for k in _yaml_children(node))
            if size[id(node)] > MAX_YAML_NODES:
                raise YamlTooLarge(
                    f"line {node.start_mark.line + 1}: the document expands to more than {MAX_YAML_NODES:,} "
                    "YAML nodes (anchors and aliases repeated inside each other?); write it out without "
                    "nested aliases"
                )
            continue
        if id(node) in size:
            continue
        if id(node) in in_progress:
            raise YamlTooLarge(f"line {node.start_mark.line + 1}: an alias refers to itself (a recursive anchor)")
        in_progress.add(id(node))
        stack.append((node, True))
        stack.extend((k, False) for k in _yaml_children(node) if id(k) not in size)


def _yaml_children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


class DuplicateYamlKey(yaml.constructor.ConstructorError):
    """A mapping that gives the same key twice. PyYAML keeps the last value silently, which in a
    hand-edited file drops a whole subtree or option; ``str()`` is one line: ``line N: duplicate key ...``."""

    def __init__(self, key: str, line: int, first_line: int):
        mark = yaml.Mark("<yaml>", 0, line - 1, 0, None, None)
        problem = (f"duplicate key '{key}' (first at line {first_line}); remove one of them, "
                   "or merge the two into one")
        super().__init__(problem=problem, problem_mark=mark)
        self.key, self.line, self.first_line = key, line, first_line

    def __str__(self) -> str:
        return f"line {self.line}: {self.problem}"


_MERGE_TAG = "tag:yaml.org,2002:merge"


def _check_duplicate_keys(root: yaml.Node) -> None:
    """Refuse a mapping that repeats a scalar key, before anything is constructed.

    Checked on the raw node graph, before merge keys (``<<: *base``) are flattened, so a key
    that overrides a merged one is still allowed. Each node is visited once (aliases share nodes).
    """
    visited: set[int] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if id(node) in visited:
            continue
        visited.add(id(node))
        if isinstance(node, yaml.MappingNode):
            first_seen: dict[tuple[str, str], yaml.Node] = {}
            for key, _ in node.value:
                if not isinstance(key, yaml.ScalarNode) or key.tag == _MERGE_TAG:
                    continue
                first = first_seen.setdefault((key.tag, key.value), key)
                if first is not key:
                    raise DuplicateYamlKey(key.value, key.start_mark.line + 1, first.start_mark.line + 1)
        stack.extend(_yaml_children(node))


class BoundedSafeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses documents whose aliases expand beyond ``MAX_YAML_NODES``
    and mappings that repeat a key (``DuplicateYamlKey``, a ``yaml.YAMLError``)."""

    def construct_document(self, node):  # type: ignore[override]
        _check_expanded_size(node)
        _check_duplicate_keys(node)
        return super().construct_document(node)


def load_yaml(text: str, loader: type[BoundedSafeLoader] = BoundedSafeLoader) -> Any:
    """``yaml.safe_load`` with alias expansion bounded (raises ``YamlTooLarge``, a ValueError)
    and duplicate mapping keys refused (raises ``DuplicateYamlKey``, a ``yaml.YAMLError``).

    ``loader`` must be ``BoundedSafeLoader`` or a subclass: safe constructors only.
    """
    if not (isinstance(loader, type) and issubclass(loader, BoundedSafeLoader)):
        raise TypeError(f"{loader!r} is not a BoundedSafeLoader")
    reader = loader(text)
    try:
        return reader.get_single_data()
    finally:
        reader.dispose()


def default_file_mode() -> int:
    """The mode a plain ``open(path, "w")`` would give a new file: 0o666 less the umask.

    ``mkstemp`` creates 0600 files; run folders, reports and predictions are shared files, so
    they get the mode the user's umask asks for.
    """
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str | Path, write: Callable[[Any], None], mode: str = "wb") -> Path:
    """Call ``write(file_object)`` on a temporary file next to ``path``, then move it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, default_file_mode())
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return atomic_write(path, lambda f: f.write(data), "wb")


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, lambda f: f.write(text), "w")


def atomic_write_json(path: str | Path, data: Any) -> Path:
    """Write ``data`` as indented JSON (non-JSON values via ``str``) to ``path`` atomically."""
    return atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def json_ready(value: Any) -> Any:
    """Plain JSON types (numpy scalars unwrapped); NaN and inf become null, not invalid JSON."""
    import math

    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if hasattr(value, "item") and getattr(value, "shape", None) == ():  # numpy / torch scalars
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return value
