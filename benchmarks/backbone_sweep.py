"""Which backbones run at a given image size: build each, forward two images, print a table.

    python benchmarks/backbone_sweep.py --img-size 64
    python benchmarks/backbone_sweep.py --models resnet18,vit_small_patch16_384,levit_128s --img-size 72

Each model is built the way `hiercls fit` builds it (``create_backbone`` with the run's image
size: random weights, CPU), then two images of that size go through it. A row says ``ok`` with
the parameter count, the feature width and the seconds it took, or ``error`` with the one-line
message `hiercls fit` would print (for a size the model cannot take, the sizes it can). ``crash``
would be a bug in hiercls: an exception other than its own clear errors.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from dataclasses import dataclass

import torch

from hiercls.errors import HierclsError
from hiercls.models import create_backbone
from hiercls.plugins import backbone_registrations

# One or two small members of each family: CNNs, ViT-likes, windowed and hybrid models.
DEFAULT_MODELS = (
    "resnet18",
    "convnext_atto",
    "efficientnet_b0",
    "mobilenetv3_small_100",
    "regnetx_002",
    "densenet121",
    "efficientvit_b0",
    "fastvit_t8",
    "vit_tiny_patch16_224",
    "deit_tiny_patch16_224",
    "swin_tiny_patch4_window7_224",
    "eva02_tiny_patch14_224",
    "levit_128s",
    "maxvit_tiny_tf_224",
)


@dataclass
class SweepRow:
    """One model at one size: ``status`` is ok, error (a clear hiercls error) or crash (a bug)."""

    model: str
    img_size: int
    status: str
    seconds: float
    params: int | None = None
    num_features: int | None = None
    output_shape: tuple[int, ...] | None = None
    message: str = ""


def try_backbone(name: str, img_size: int) -> SweepRow:
    """Build ``name`` for ``img_size`` px images and run two (different) images through it."""
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            backbone = create_backbone(name, run_img_size=img_size)
            images = torch.rand(2, 3, img_size, img_size, generator=torch.Generator().manual_seed(1))
            with torch.no_grad():
                output = backbone.eval()(images)
    except HierclsError as exc:
        return SweepRow(name, img_size, "error", time.perf_counter() - start, message=str(exc))
    except Exception as exc:  # anything else is a bug in hiercls: report it, keep sweeping
        message = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        return SweepRow(name, img_size, "crash", time.perf_counter() - start, message=message)
    return SweepRow(
        name,
        img_size,
        "ok",
        time.perf_counter() - start,
        params=sum(p.numel() for p in backbone.parameters()),
        num_features=int(backbone.num_features),
        output_shape=tuple(output.shape),
    )


def format_table(rows: list[SweepRow]) -> str:
    lines = ["| model | px | result | params (M) | features | seconds | message |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        params = "-" if row.params is None else f"{row.params / 1e6:.1f}"
        features = "-" if row.num_features is None else str(row.num_features)
        message = row.message.replace("|", "/")
        lines.append(
            f"| {row.model} | {row.img_size} | {row.status} | {params} | {features} | {row.seconds:.2f} | {message} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS),
                        help="comma-separated backbone names (timm names or plugin names such as tv/resnet18)")
    parser.add_argument("--img-size", type=int, default=64, help="image side in pixels (default: 64)")
    args = parser.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not args.models:
        parser.error("--models names no backbone")
    if args.img_size < 1:
        parser.error("--img-size must be a positive integer")
    return args


def main(argv: list[str] | None = None) -> list[SweepRow]:
    args = parse_args(argv)
    backbone_registrations()  # load the plugins (and timm) before the first timing
    rows = []
    for name in args.models:
        rows.append(try_backbone(name, args.img_size))
        print(f"{name}: {rows[-1].status} ({rows[-1].seconds:.1f} s)", file=sys.stderr, flush=True)
    print(format_table(rows))
    return rows


if __name__ == "__main__":
    results = main()
    sys.exit(1 if any(r.status == "crash" for r in results) else 0)
