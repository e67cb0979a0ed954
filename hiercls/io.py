"""Atomic file writes, free of torch so that light modules can import them cheaply.

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

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text", "atomic_write_json"]


def read_user_text(path: str | Path, what: str, error: type[Exception], encoding: str = "utf-8") -> str:
    """The text of a file the user named; a missing or unreadable file raises ``error``
    with a one-line message naming the file and what it was meant to be (``what``)."""
    path = Path(path)
    try:
        return path.read_text(encoding=encoding)
    except FileNotFoundError:
        raise error(f"{path}: {what} not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"{path}: cannot read {what} ({exc})") from None


def yaml_error_message(path: str | Path, exc: Exception) -> str:
    """``FILE:LINE:COLUMN: YAML syntax error: PROBLEM`` for a PyYAML parse error."""
    mark = getattr(exc, "problem_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return f"{where}: YAML syntax error: {problem}"


def atomic_write(path: str | Path, write: Callable[[Any], None], mode: str = "wb") -> Path:
    """Call ``write(file_object)`` on a temporary file next to ``path``, then move it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
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
