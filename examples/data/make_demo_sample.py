"""Build ``examples/data/blood-cells-demo/``: the README demo's sample of the PBC dataset.

A seeded, balanced draw of ``--per-folder`` images from each of the 8 class folders of the PBC
development copy (``../shared/data/blood-cells``, Acevedo et al. 2020, CC BY 4.0). Exact
duplicate files (same bytes under another name) count once, and the images of the 200-image
``blood-cells-sample`` (and their duplicates) are left out, so that sample stays unseen by the
demo's model. The images are resized whole to ``--size`` pixels (bicubic, as hiercls's cache does) and re-encoded
as JPEG; ``manifest.csv`` keeps the source's finest label for each image, partial labels
(``neutrophil``, ``immature_granulocyte``) included.

    python examples/data/make_demo_sample.py --source ../shared/data/blood-cells \
        --out examples/data/blood-cells-demo

Running it again with the same source and options gives the same files, byte for byte.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import random
import sys
from collections import defaultdict
from pathlib import Path

from PIL import Image

FOLDERS = ("basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte", "neutrophil", "platelet")
MAX_MANIFEST_BYTES = 10_000_000
# Labels at an internal node of taxonomy/blood-cells.yaml: the source gave no sub-type.
PARTIAL_LABELS = ("neutrophil", "immature_granulocyte")
MIN_PARTIAL = 5


def read_manifest(source: Path) -> dict[str, str]:
    """``path -> label`` of the source's manifest.csv (paths relative to ``source``)."""
    path = source / "manifest.csv"
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        sys.exit(f"{path}: larger than {MAX_MANIFEST_BYTES} bytes; is this the PBC manifest?")
    with path.open(newline="", encoding="utf-8") as handle:
        return {row["path"]: row["label"] for row in csv.DictReader(handle)}


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def distinct_files(source: Path, labels: dict[str, str], avoid: set[str]) -> dict[str, list[str]]:
    """Each folder's files in name order, an exact duplicate of an earlier file (or of ``avoid``) left out."""
    seen = {digest(source / rel) for rel in avoid if (source / rel).is_file()}
    by_folder: dict[str, list[str]] = defaultdict(list)
    for rel in sorted(labels):
        folder = rel.split("/", 1)[0]
        if folder not in FOLDERS or rel in avoid:
            continue
        key = digest(source / rel)
        if key in seen:
            continue
        seen.add(key)
        by_folder[folder].append(rel)
    return by_folder


def draw(by_folder: dict[str, list[str]], labels: dict[str, str], per_folder: int, seed: int) -> list[str]:
    """``per_folder`` files of each folder, drawn with one seeded generator, sorted.

    Partial labels keep their share of the folder, but at least ``MIN_PARTIAL`` of each: with
    fewer, the stratified 1-in-5 validation split may hold none, and the demo would warn.
    """
    rng = random.Random(seed)
    chosen: list[str] = []
    for folder in FOLDERS:
        files = by_folder.get(folder, [])
        if len(files) < per_folder:
            sys.exit(f"{folder}: {len(files)} distinct images, fewer than --per-folder {per_folder}")
        partial = [f for f in files if labels[f] in PARTIAL_LABELS]
        n_partial = min(len(partial), max(MIN_PARTIAL, round(per_folder * len(partial) / len(files))))
        full = [f for f in files if labels[f] not in PARTIAL_LABELS]
        chosen += rng.sample(partial, n_partial) + rng.sample(full, per_folder - n_partial)
    return sorted(chosen)


def encode(path: Path, size: int, quality: int) -> bytes:
    """The image resized whole to ``size`` x ``size`` (RGB), as JPEG bytes without metadata."""
    with Image.open(path) as image:
        small = image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    small.save(buffer, format="JPEG", quality=quality, optimize=True)
    return buffer.getvalue()


def write_sample(source: Path, out: Path, chosen: list[str], labels: dict[str, str], size: int, quality: int) -> int:
    """Write the images and manifest.csv; returns the bytes written."""
    total = 0
    for rel in chosen:
        target = out / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        data = encode(source / rel, size, quality)
        target.write_bytes(data)
        total += len(data)
    with (out / "manifest.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["path", "label"])
        writer.writerows([rel, labels[rel]] for rel in chosen)
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, default=Path("../shared/data/blood-cells"),
                        help="the PBC folder with manifest.csv (default: ../shared/data/blood-cells)")
    parser.add_argument("--out", type=Path, default=Path("examples/data/blood-cells-demo"))
    parser.add_argument("--per-folder", type=int, default=125, help="images per class folder (default: 125)")
    parser.add_argument("--size", type=int, default=80, help="side in pixels of the stored images (default: 80)")
    parser.add_argument("--quality", type=int, default=85, help="JPEG quality (default: 85)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--avoid", type=Path, default=Path("examples/data/blood-cells-sample"),
                        help="a sample whose images (and their duplicates) are left out, so it stays unseen by "
                             "the demo's model (default: examples/data/blood-cells-sample)")
    args = parser.parse_args(argv)
    labels = read_manifest(args.source)
    avoid = set(read_manifest(args.avoid)) if (args.avoid / "manifest.csv").is_file() else set()
    chosen = draw(distinct_files(args.source, labels, avoid), labels, args.per_folder, args.seed)
    for old in (args.out.glob("*/*.jpg") if args.out.is_dir() else []):
        old.unlink()  # a rerun with other options leaves no stale image behind
    size = write_sample(args.source, args.out, chosen, labels, args.size, args.quality)
    partial = sum(labels[rel] in PARTIAL_LABELS for rel in chosen)
    print(f"wrote {len(chosen)} images ({size / 1e6:.1f} MB, {partial} partial labels) and manifest.csv to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
