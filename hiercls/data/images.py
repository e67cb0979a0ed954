"""Opening image files safely: every readable image comes back as 8-bit RGB.

Microscopy exports come in every mode PIL knows (grayscale, palette, RGBA, CMYK, 16-bit
TIFF) and sometimes truncated or empty. Training, the cache and the audit all open images
through ``open_rgb`` so that they agree on what a readable image is, and so that a bad
file is reported by name instead of crashing a worker thread with a traceback.

Only regular files are read (after following symbolic links), and at most
``MAX_IMAGE_BYTES`` of them: a FIFO named ``pipe.jpg`` would block the reader forever and
a link to ``/dev/zero`` would never end, so both are reported like unreadable images.
Float images (PIL mode ``F``, e.g. 32-bit float TIFF) with a NaN or infinite pixel are
unreadable too: scaling them would silently give an all-black picture.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import re
import stat
import threading
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from hiercls.errors import DataError

__all__ = [
    "IMAGE_EXTENSIONS",
    "MAX_IMAGE_BYTES",
    "is_image_file",
    "open_rgb",
    "open_rgb_bytes",
    "read_regular_file",
]

#: File extensions treated as images (compared case-insensitively).
IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})

#: Largest image file read, in bytes (256 MiB). A 224 px JPEG is ~20 KiB and an uncompressed
#: 8k x 8k RGB TIFF 192 MiB; anything larger is refused as unreadable rather than read whole.
MAX_IMAGE_BYTES: int = 256 * 1024**2

_READ_CHUNK = 1024**2


def is_image_file(path: str | Path) -> bool:
    """True for a non-hidden file name with an image extension (the file itself is not read)."""
    path = Path(path)
    return not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS


def open_rgb(path: str | Path) -> Image.Image:
    """Open an image file as a fully decoded 8-bit RGB ``PIL.Image``.

    EXIF orientation is applied, so a phone photo of a smear is upright. Grayscale,
    palette, RGBA/LA (composited on white), CMYK and 16-bit images are converted.
    PIL's decompression-bomb guard (``Image.MAX_IMAGE_PIXELS``) stays in force; a file
    that trips it, a truncated, empty or non-image file raises ``DataError`` naming it.
    """
    path = Path(path)
    return open_rgb_bytes(read_regular_file(path, MAX_IMAGE_BYTES, what="image file"), name=str(path))


def read_regular_file(path: str | Path, max_bytes: int, what: str = "file") -> bytes:
    """All bytes of a regular file of at most ``max_bytes``; ``DataError`` naming it otherwise.

    The file is opened non-blocking and checked with ``fstat`` on the open descriptor (so a
    link is followed and nothing can be swapped in between): a FIFO, socket, device or
    folder is refused without reading, and no more than ``max_bytes + 1`` bytes are read
    even when the file grows meanwhile.
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise DataError(f"{path}: {what} not found") from None
    except OSError as exc:
        if exc.errno == errno.EISDIR:
            raise DataError(f"{path}: not a regular file (a folder); remove it or rename it") from None
        raise DataError(f"{path}: cannot read {what} ({exc.strerror or exc})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise DataError(
                f"{path}: not a regular file ({_file_kind(info.st_mode)}); only plain files are read, "
                "remove it or replace it with the file itself"
            )
        if info.st_size > max_bytes:
            raise DataError(_too_big(path, f"{info.st_size / 1024**2:,.1f} MiB", max_bytes, what))
        return _read_at_most(fd, path, max_bytes, what)
    except OSError as exc:
        raise DataError(f"{path}: cannot read {what} ({exc.strerror or exc})") from None
    finally:
        os.close(fd)


def _read_at_most(fd: int, path: Path, max_bytes: int, what: str) -> bytes:
    chunks, total = [], 0
    while True:
        chunk = os.read(fd, min(_READ_CHUNK, max_bytes + 1 - total))
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        total += len(chunk)
        if total > max_bytes:
            raise DataError(_too_big(path, "it grew while being read", max_bytes, what))


def _too_big(path: Path, detail: str, max_bytes: int, what: str) -> str:
    return (
        f"{path}: {what} is larger than the limit of {max_bytes / 1024**2:,.1f} MiB ({detail}); "
        "downscale, tile or recompress it"
    )


def _file_kind(mode: int) -> str:
    for test, kind in (
        (stat.S_ISFIFO, "a FIFO / named pipe"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISDIR, "a folder"),
    ):
        if test(mode):
            return kind
    return "not a plain file"


def open_rgb_bytes(data: bytes, name: str = "<bytes>") -> Image.Image:
    """``open_rgb`` for bytes already read (the audit hashes and decodes one read)."""
    if not data:
        raise DataError(f"{name}: empty file (0 bytes); remove it or replace it with the image")
    try:
        with _quiet_bomb_warning():
            image = Image.open(io.BytesIO(data))
        # PIL only warns between MAX_IMAGE_PIXELS and twice that; treat it as the error it hints at.
        limit = Image.MAX_IMAGE_PIXELS
        if limit and image.size[0] * image.size[1] > limit:
            raise Image.DecompressionBombError(f"{image.size[0]}x{image.size[1]}")
        image.load()  # decode now, so truncation is found here and not in a worker later
        image = ImageOps.exif_transpose(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DataError(
            f"{name}: image is too large to open safely ({_pixels_text(exc)}; PIL's limit is "
            f"{Image.MAX_IMAGE_PIXELS:,} pixels); downscale or tile it first"
        ) from None
    except UnidentifiedImageError:
        raise DataError(f"{name}: not a readable image file; remove it or re-export it") from None
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - malformed files surface as many exception types inside PIL
        raise DataError(f"{name}: damaged or truncated image ({exc}); remove it or re-export it") from None
    return _to_rgb(image, name)


@contextlib.contextmanager
def _quiet_bomb_warning():
    """Silence PIL's bomb warning (the size check turns it into a ``DataError``) in the main thread.

    ``warnings.catch_warnings`` changes process-wide state and is not thread-safe, so worker
    threads leave the filters alone; the size check after opening raises either way.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        yield


def _pixels_text(exc: Exception) -> str:
    """The image size from the guard's exception text, e.g. '1,600 pixels'."""
    found = re.search(r"(\d+)x(\d+)", str(exc))
    if found:
        width, height = int(found.group(1)), int(found.group(2))
        return f"{width}x{height} = {width * height:,} pixels"
    found = re.search(r"(\d+) pixels", str(exc))
    return f"{int(found.group(1)):,} pixels" if found else "size unknown"


def _to_rgb(image: Image.Image, name: str = "<image>") -> Image.Image:
    """Convert any PIL mode to 8-bit RGB; transparency is composited on white."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode == "F":
        return _gray_to_rgb(_float_to_gray(np.asarray(image, dtype=np.float64), name))
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        return _gray_to_rgb(_stretch(np.asarray(image, dtype=np.float64)))
    return image.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def _stretch(array: np.ndarray) -> np.ndarray:
    """16-bit / 32-bit grayscale: scale the actual range to 0..255 rather than clip at 255."""
    low, high = float(array.min()), float(array.max())
    scale = 255.0 / (high - low) if high > low else 0.0
    return ((array - low) * scale).round().clip(0, 255).astype(np.uint8)


def _float_to_gray(array: np.ndarray, name: str) -> np.ndarray:
    """A float image as 8-bit gray: 0..1 data times 255, any other range stretched like 16-bit.

    Intensities already in 0..1 (the usual float export) keep their brightness, so a dim
    image stays dim; other ranges (raw detector counts, negative values) are stretched from
    their minimum to their maximum. A NaN or infinite pixel makes the image unreadable.
    """
    bad = int(array.size - np.count_nonzero(np.isfinite(array)))
    if bad:
        raise DataError(
            f"{name}: {bad} of {array.size} pixel(s) are NaN or infinite in this float image; "
            "re-export it with finite values (or as 8/16-bit) or remove it"
        )
    if array.size and array.min() >= 0.0 and array.max() <= 1.0:
        return (array * 255.0).round().clip(0, 255).astype(np.uint8)
    return _stretch(array)


def _gray_to_rgb(gray: np.ndarray) -> Image.Image:
    return Image.fromarray(gray, mode="L").convert("RGB")
