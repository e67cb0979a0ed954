"""A plain flat timm training script, on the same split as a hiercls run: the budget-matched reference.

hiercls's strategies should do at least as well as the plain recipe people already use. This
script is that recipe, deliberately without anything of hiercls: timm's model, timm's standard
transforms (``timm.data.create_transform``: random-resized crop, flip, colour jitter for
training; resize + centre crop for evaluation), AdamW, a per-step cosine schedule,
cross-entropy, one label per image taken from its **class folder** (what ``ImageFolder``
gives). It reads the train / validation file lists from a hiercls run's ``split.json``, so
both are scored on exactly the same images, and prints the validation accuracy.

Compare its accuracy with hiercls's accuracy at the tree depth whose nodes are the folders
(``depth_accuracy`` in ``hiercls evaluate``'s metrics.json; depth 2 on blood-cells, the leaves
on all-subtypes)::

    python benchmarks/plain_timm.py --run runs/long-bc-flat --epochs 30 --img-size 64 --json plain.json

Runs on the CPU (slowly) or a GPU; no download (``pretrained=False``).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from bench_fit import benchmark_device, device_label, write_json
from PIL import Image
from timm.data import create_transform


def read_split(run: Path) -> tuple[list[Path], list[Path]]:
    """The train and validation image paths of a hiercls run."""
    split = json.loads((run / "split.json").read_text())
    return [Path(p) for p in split["train"]], [Path(p) for p in split["val"]]


def folder_labels(train: list[Path], val: list[Path]) -> tuple[list[str], list[int], list[int]]:
    """Class names (sorted folder names, as ``ImageFolder``) and each image's class index."""
    classes = sorted({p.parent.name for p in train + val})
    index = {name: i for i, name in enumerate(classes)}
    return classes, [index[p.parent.name] for p in train], [index[p.parent.name] for p in val]


class Images(torch.utils.data.Dataset):
    """Images decoded once into memory (RGB PIL), transformed per access as a plain script does."""

    def __init__(self, paths: list[Path], labels: list[int], transform):
        self.images = [Image.open(p).convert("RGB") for p in paths]
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.transform(self.images[i]), self.labels[i]


def evaluate(model, loader, device) -> float:
    model.eval()
    correct = total = 0
    with torch.inference_mode():
        for x, y in loader:
            pred = model(x.to(device)).argmax(1).cpu()
            correct += int((pred == y).sum())
            total += len(y)
    model.train()
    return correct / total


def train(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    device = benchmark_device(args.device)
    train_paths, val_paths = read_split(args.run)
    classes, train_labels, val_labels = folder_labels(train_paths, val_paths)
    train_set = Images(train_paths, train_labels, create_transform(args.img_size, is_training=True))
    val_set = Images(val_paths, val_labels, create_transform(args.img_size, is_training=False))
    loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                         num_workers=args.workers, persistent_workers=args.workers > 0)
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=256, num_workers=args.workers)

    model = timm.create_model(args.backbone, pretrained=False, num_classes=len(classes)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    total_steps = args.epochs * len(loader)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / total_steps)))

    history = []
    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        for x, y in loader:
            loss = F.cross_entropy(model(x.to(device)), y.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        if epoch % args.eval_every == 0 or epoch == args.epochs:
            accuracy = evaluate(model, val_loader, device)
            history.append({"epoch": epoch, "val_accuracy": accuracy, "seconds": time.perf_counter() - start})
            print(f"epoch {epoch:3d}  val accuracy {accuracy:.4f}  ({time.perf_counter() - start:.0f} s)", flush=True)
    return {
        "run": str(args.run), "classes": classes, "n_train": len(train_set), "n_val": len(val_set),
        "backbone": args.backbone, "img_size": args.img_size, "epochs": args.epochs, "batch_size": args.batch_size,
        "lr": args.lr, "weight_decay": args.weight_decay, "seed": args.seed, "device": device_label(device),
        "val_accuracy": history[-1]["val_accuracy"], "history": history,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a hiercls run folder (its split.json is used)")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    parser.add_argument("--eval-every", type=int, default=5, help="validate every N epochs (and after the last)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", type=Path, help="write every figure here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if not (args.run / "split.json").is_file():
        raise SystemExit(f"{args.run}: no split.json here; give a folder written by `hiercls fit`")
    results = train(args)
    write_json(args.json, results)
    print(f"plain timm {args.backbone}, {len(results['classes'])} folder classes: "
          f"val accuracy {results['val_accuracy']:.4f} on {results['n_val']} images")
    return results


if __name__ == "__main__":
    main()
