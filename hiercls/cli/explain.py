"""``hiercls explain``: a Grad-CAM panel per image, one heatmap per decision on the predicted path.

Every command module is imported to build ``hiercls --help``, so torch, timm and
matplotlib are imported inside ``run``, not here.
"""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

from rich.console import Console
from rich.table import Table

from hiercls.cli import add_command
from hiercls.console import TaskProgress, make_console
from hiercls.errors import ConfigError, DataError

PANEL_SUFFIX = "_gradcam.png"
SUMMARY_NAME = "summary.csv"
SUMMARY_COLUMNS = ("path", "decision", "child", "probability", "cam_max", "peak_row", "peak_col")


def register(subparsers) -> None:
    parser = add_command(
        subparsers,
        "explain",
        help="Grad-CAM heatmaps for each decision of a trained run, one PNG per image",
        description=textwrap.fill(
            "For each image, predict with a trained run and explain every decision on the predicted "
            "path through the tree (root: Leukemia, Leukemia: Acute, Acute: AML) with a Grad-CAM "
            "heatmap, and write OUT/<image name>_gradcam.png: the input as the model saw it "
            "(resized to the run's image size) and one overlay per decision, and OUT/summary.csv: "
            "one row per image and decision (probability, the map's maximum and where it peaks). "
            "Folders given to --images are searched for image files. Unreadable images are "
            "reported and skipped. See docs/explain.md for how to read the panels.",
            width=88,
        ),
        example_lines=(
            "hiercls explain --run runs/joint --images smear1.jpg smear2.jpg --out runs/joint/gradcam",
            "hiercls explain --run runs/joint --images test_images/ --out gradcam/ --checkpoint last --device cpu",
            "hiercls explain --run runs/joint --images cell.png --out gradcam/ --target AML --overwrite",
        ),
    )
    parser.add_argument("--run", required=True, metavar="RUN", help="run folder written by `hiercls fit`")
    parser.add_argument(
        "--images", required=True, nargs="+", metavar="PATH", help="image files and/or folders of images"
    )
    parser.add_argument(
        "--out", required=True, metavar="DIR", help="folder for the PNG panels and summary.csv (created)"
    )
    parser.add_argument("--checkpoint", choices=("best", "last"), default="best", help="default: best")
    parser.add_argument("--device", default="auto", metavar="auto|cpu|cuda|cuda:N", help="default: auto")
    parser.add_argument(
        "--target",
        metavar="NODE",
        default=None,
        help="explain the decisions on the path to this node (e.g. the true label) instead of the predicted path",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace existing panels and summary.csv in --out"
    )
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    parser.set_defaults(func=run)


def collect_images(arguments: list[str]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Image files named by ``arguments`` (folders searched recursively, sorted) and ``(path, reason)`` skips."""
    from hiercls.data.images import is_image_file

    found: list[Path] = []
    skipped: list[tuple[str, str]] = []
    for argument in arguments:
        path = Path(argument).expanduser()
        if path.is_dir():
            inside = sorted(p for p in path.rglob("*") if p.is_file() and is_image_file(p))
            if not inside:
                skipped.append((str(path), "folder holds no image files"))
            found.extend(inside)
        elif path.is_file():
            found.append(path)
        else:
            skipped.append((str(path), "not found"))
    unique = list(dict.fromkeys(p.resolve() for p in found))
    return unique, skipped


def panel_names(images: list[Path]) -> list[str]:
    """``<stem>_gradcam.png`` per image; repeated stems get ``_2``, ``_3``, ... in input order."""
    names: list[str] = []
    used: set[str] = set()
    for image in images:
        name, k = f"{image.stem}{PANEL_SUFFIX}", 1
        while name.lower() in used:
            k += 1
            name = f"{image.stem}_{k}{PANEL_SUFFIX}"
        used.add(name.lower())
        names.append(name)
    return names


def run(args: argparse.Namespace) -> int:
    import torch

    from hiercls.augment import normalize
    from hiercls.data.cache import decode_resized
    from hiercls.explain import gradcam_per_level, render_panel, run_temperatures
    from hiercls.inference import load_run, normalization_stats
    from hiercls.runtime import resolve_device

    console = make_console(stderr=False)
    err = make_console(stderr=True)
    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: is a file; give a folder for the PNG panels")
    images, skipped = collect_images(args.images)
    if not images:
        reasons = "; ".join(f"{p}: {why}" for p, why in skipped[:3])
        raise DataError(f"no image to explain in --images ({reasons}); give image files or folders of images")
    targets = [out / name for name in panel_names(images)]
    existing = [t for t in [*targets, out / SUMMARY_NAME] if t.exists()]
    if existing and not args.overwrite:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise ConfigError(
            f"{existing[0]}: file exists{more}; use --overwrite to replace, or choose another --out"
        )

    loaded = load_run(args.run, args.checkpoint)
    taxonomy = loaded.taxonomy
    target = _resolve_target(taxonomy, args.target)
    device = resolve_device(args.device)
    model = loaded.model.to(device)
    mean, std = normalization_stats(model)
    size = int(loaded.config.img_size)
    temperatures = run_temperatures(loaded)  # probabilities as predict and evaluate report them

    written: list[tuple[Path, str, Path]] = []
    rows: list[tuple[str, ...]] = []
    with TaskProgress(err, enabled=args.progress) as bar:
        task = bar.add_task("Grad-CAM", total=len(images))
        for image_path, panel in zip(images, targets):
            try:
                pixels = decode_resized(image_path, size)
            except DataError as exc:
                skipped.append((str(image_path), str(exc).removeprefix(f"{image_path}: ")))
                bar.advance(task)
                continue
            batch = normalize(torch.from_numpy(pixels.copy())[None].to(device), mean, std)
            cams = gradcam_per_level(model, batch, target=target, temperatures=temperatures)
            path_text = " > ".join(cam.child for cam in cams) or taxonomy.root
            title = f"{image_path.name}: {'path to ' + target if target else 'predicted'}: {path_text}"
            render_panel(pixels, cams, panel, taxonomy, title=title, overwrite=args.overwrite)
            written.append((image_path, path_text, panel))
            rows.extend(summary_rows(image_path, cams))
            bar.advance(task)

    if written:
        write_summary_csv(out / SUMMARY_NAME, rows)
    _summary(console, written, skipped, out, target)
    if not written:
        raise DataError(
            f"none of the {len(images)} image(s) could be read (first: {skipped[0][0]}: {skipped[0][1]})"
        )
    return 0


def summary_rows(image: Path, cams) -> list[tuple[str, ...]]:
    """One ``summary.csv`` row per decision: ``SUMMARY_COLUMNS`` as text.

    ``cam_max`` is the map's maximum before it was scaled to [0, 1]; ``peak_row`` /
    ``peak_col`` the pixel where it peaks in the model's input (the image resized to the
    run's ``img_size``; row 0 at the top, column 0 at the left), empty when the map is all zero.
    """
    rows = []
    for cam in cams:
        peak = cam.peak()
        row, col = ("", "") if peak is None else (str(peak[0]), str(peak[1]))
        rows.append(
            (str(image), cam.decision, cam.child, f"{cam.probability:.6g}", f"{cam.cam_max:.6g}", row, col)
        )
    return rows


def write_summary_csv(path: Path, rows: list[tuple[str, ...]]) -> Path:
    """``SUMMARY_COLUMNS`` then ``rows``, written atomically (no half-written file on a crash)."""
    import csv
    import io

    from hiercls.io import atomic_write_text

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(SUMMARY_COLUMNS)
    writer.writerows(rows)
    return atomic_write_text(path, buffer.getvalue())


def _resolve_target(taxonomy, name: str | None) -> str | None:
    if name is None:
        return None
    try:
        return taxonomy.resolve(name)
    except DataError as exc:
        raise ConfigError(
            f"--target {name!r} is not a node (other than the root) of taxonomy '{taxonomy.name}': {exc}"
        ) from None


def _summary(
    console: Console, written: list[tuple[Path, str, Path]], skipped: list[tuple[str, str]], out: Path,
    target: str | None,
) -> None:
    if written:
        table = Table(title=f"Grad-CAM panels in {out}", title_justify="left")
        table.add_column("image", overflow="fold")
        table.add_column("path to target" if target else "predicted path", overflow="fold")
        table.add_column("panel", overflow="fold")
        for image, path_text, panel in written:
            table.add_row(str(image), path_text, panel.name)
        console.print(table)
    for path, reason in skipped:
        console.print(f"[yellow]skipped[/] {path}: {reason}", highlight=False, soft_wrap=True)
    summary = f" and {SUMMARY_NAME}" if written else ""
    console.print(f"wrote {len(written)} panel(s){summary} to {out}; skipped {len(skipped)}", highlight=False)
