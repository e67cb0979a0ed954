"""Opening image files safely: every readable image comes back as 8-bit RGB.

Microscopy exports come in every mode PIL knows (grayscale, palette, RGBA, CMYK, 16-bit
TIFF) and sometimes truncated or empty. Training, the cache and the audit all open images
through ``open_rgb`` so that they agree on what a readable image is, and so that a bad
file is reported by name instead of crashing a worker thread with a traceback.
"""

from __future__ import annotations

import contextlib
import io
import re
import threading
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from hiercls.errors import DataError

__all__ = ["IMAGE_EXTENSIONS", "is_image_file", "open_rgb", "open_rgb_bytes"]

#: File extensions treated as images (compared case-insensitively).
IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})


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
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read image file ({exc.strerror or exc})") from None
    return open_rgb_bytes(data, name=str(path))


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
    return _to_rgb(image)


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


def _to_rgb(image: Image.Image) -> Image.Image:
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
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16-bit / 32-bit grayscale: scale the actual range to 0..255 rather than clip at 255.
        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        scale = 255.0 / (high - low) if high > low else 0.0
        gray = ((array - low) * scale).round().clip(0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    return image.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV
