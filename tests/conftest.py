"""Shared test fixtures: tiny images written on the fly, tiny taxonomies, the shared real data."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hiercls.taxonomy import Taxonomy

if os.environ.get("PYTEST_XDIST_WORKER"):
    # one thread per pytest worker (and its child processes): two workers on two cores, not four threads
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_DATA = REPO_ROOT / "examples" / "data" / "blood-cells-sample"

TINY_TREE_YAML = """\
name: tiny
root: root
children:
  - name: animal
    aliases: [beast]
    children:
      - name: cat
        aliases: [kitty]
      - dog
  - name: plant
    children: [tree, flower]
"""


def shared_data_dir() -> Path | None:
    """The real datasets next to the repository (``../shared/data``) or ``$HIERCLS_SHARED_DATA``."""
    env = os.environ.get("HIERCLS_SHARED_DATA")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[2] / "shared" / "data")
    return next((c for c in candidates if c.is_dir()), None)


def random_image(size: tuple[int, int] = (24, 24), seed: int = 0) -> Image.Image:
    """A smooth random RGB picture (smooth, so JPEG re-encoding keeps its perceptual hash)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    return Image.fromarray(small, "RGB").resize(size, Image.Resampling.BICUBIC)


def write_image(
    path: str | Path,
    size: tuple[int, int] = (24, 24),
    seed: int = 0,
    image: Image.Image | None = None,
    **save_kwargs,
) -> Path:
    """Write a tiny image (format from the extension) and return its path; parents are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    (image or random_image(size, seed)).save(path, **save_kwargs)
    return path


def write_smears(root: Path, labels, per_label: int, seed: int, suffix: str = ".jpg") -> Path:
    """Tiny 16px "smears": a folder per label, files ``slideK_LABEL`` (K = slide, a group)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    for li, label in enumerate(labels):
        (root / label).mkdir(parents=True)
        for k in range(per_label):
            pixels = np.clip(np.array([30.0 * li, 200 - 20 * li, 120]) + rng.normal(0, 15, (16, 16, 3)), 0, 255)
            Image.fromarray(pixels.astype(np.uint8)).save(root / label / f"slide{k}_{label}{suffix}")
    return root


def fit_leukemia_smears(root: Path, *, epochs: int, seed: int) -> tuple[Path, Path]:
    """A tiny run (test_resnet, 16 px) on 12 leukemia smears of 3 slides: (run folder, data folder)."""
    from hiercls.cli import main

    data = write_smears(root / "data", ("Normal", "Reactive", "ALL", "CLL"), per_label=3, seed=seed)
    run = root / "run"
    assert main(["fit", "--taxonomy", str(REPO_ROOT / "taxonomy" / "leukemia.yaml"), "--data", str(data),
                 "--out", str(run), "--backbone", "test_resnet", "--img-size", "16", "--epochs", str(epochs),
                 "--batch-size", "8", "--device", "cpu", "--group-regex", r"^(slide\d)_", "--val-fraction", "0.34",
                 "--cache-dir", str(root / "cache"), "--no-progress", "--allow-incomplete-tree"]) == 0
    return run, data


@pytest.fixture
def make_image() -> Callable[..., Path]:
    """``make_image(path, size=(24, 24), seed=0, image=None, **save_kwargs) -> Path``."""
    return write_image


@pytest.fixture
def tiny_taxonomy() -> Taxonomy:
    """root -> animal (alias beast) -> cat (alias kitty), dog; root -> plant -> tree, flower."""
    import yaml

    return Taxonomy.from_dict(yaml.safe_load(TINY_TREE_YAML), source="tiny.yaml")


@pytest.fixture
def tiny_taxonomy_file(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_TREE_YAML, encoding="utf-8")
    return path


@pytest.fixture
def class_folder(tmp_path: Path) -> Path:
    """``data/{cat,dog,tree,flower}/`` with 3 distinct tiny PNG images each (12 images)."""
    root = tmp_path / "data"
    seed = 0
    for label in ("cat", "dog", "tree", "flower"):
        for k in range(3):
            write_image(root / label / f"{label}_{k}.png", seed=seed)
            seed += 1
    return root


@pytest.fixture
def shared_data() -> Path:
    """The shared real data folder; the test is skipped when it is absent."""
    found = shared_data_dir()
    if found is None:
        pytest.skip("shared data not found (../shared/data next to the repo, or set HIERCLS_SHARED_DATA)")
    return found
