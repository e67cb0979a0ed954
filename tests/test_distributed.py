"""Data-parallel training: two gloo processes under torchrun equal one process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hiercls.cli import main

TREE = """\
name: tiny
root: root
children:
  - name: animal
    children: [cat, dog]
  - name: plant
    children: [tree, flower]
"""

gloo = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="this PyTorch build has no torch.distributed gloo backend (needed to run 2 CPU processes)",
)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """16 tiny JPEGs, 4 per leaf: with no validation split every step sees a full global batch of 8."""
    from PIL import Image

    root = tmp_path_factory.mktemp("ddp")
    (root / "tree.yaml").write_text(TREE)
    rng = np.random.default_rng(0)
    for li, label in enumerate(("cat", "dog", "tree", "flower")):
        (root / "data" / label).mkdir(parents=True)
        for k in range(4):
            pixels = np.clip(np.array([60.0 * li, 200 - 40 * li, 100 + 20 * k]) + rng.normal(0, 20, (32, 32, 3)), 0, 255)
            Image.fromarray(pixels.astype(np.uint8)).save(root / "data" / label / f"{label}_{k}.jpg")
    return root


def fit_args(root: Path, out: str) -> list[str]:
    # A LayerNorm ViT (no BatchNorm statistics per process) and SGD: its update is linear in the
    # gradient, so the float noise of averaging two half-batch gradients stays at noise level
    # (Adam would blow up the pure-noise gradient of attention key biases to full-size steps).
    return [
        "fit", "--taxonomy", str(root / "tree.yaml"), "--data", str(root / "data"), "--out", str(root / out),
        "--strategy", "flat", "--backbone", "test_vit", "--img-size", "32", "--epochs", "2", "--batch-size", "8",
        "--optimizer", "sgd", "--lr", "0.05", "--val-fraction", "0", "--device", "cpu", "--seed", "1",
        "--cache-dir", str(root / "cache"), "--no-progress",
    ]


def weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "checkpoints" / "last.safetensors"))


def losses(run: Path) -> list[float]:
    return [json.loads(line)["train_loss"]["flat"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@gloo
def test_two_processes_match_one_process(dataset):
    assert main(fit_args(dataset, "single")) == 0
    done = torchrun(fit_args(dataset, "multi"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("done:") == 1, "only rank 0 reports"
    assert "2 (DistributedDataParallel; 4 images per process" in done.stderr

    single, multi = weights(dataset / "single"), weights(dataset / "multi")
    assert single.keys() == multi.keys()
    for key in single:
        assert torch.allclose(single[key], multi[key], rtol=1e-4, atol=1e-6), key
    assert losses(dataset / "multi") == pytest.approx(losses(dataset / "single"), rel=1e-5)
    # the weights moved: the comparison is not between two untouched initialisations
    first_step = dataset / "single" / "checkpoints" / "last.json"
    assert json.loads(first_step.read_text())["epoch"] == 2
    assert losses(dataset / "single")[1] < losses(dataset / "single")[0]

    # both runs predict the same probabilities
    from hiercls.data import load_images
    from hiercls.inference import load_run, predict_table

    a, b = load_run(dataset / "single", "last"), load_run(dataset / "multi", "last")
    table = load_images(dataset / "data", taxonomy=a.taxonomy)
    pa = predict_table(a, table, device="cpu", progress=False).marginal
    pb = predict_table(b, table, device="cpu", progress=False).marginal
    assert np.allclose(pa, pb, atol=1e-5)


def torchrun(args: list[str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "hiercls",
               *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)


@gloo
def test_a_run_folder_refused_on_rank_0_stops_every_process_with_one_message(dataset):
    """Rank 0 alone checks the run folder; the others must stop with it, not die on a closed connection."""
    taken = dataset / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    done = torchrun(fit_args(dataset, "taken"))
    assert done.returncode != 0
    assert done.stderr.count("run folder exists and is not empty") == 1, done.stderr[-3000:]
    assert "[rank1]" not in done.stderr and "Connection closed" not in done.stderr, done.stderr[-3000:]
    assert "exitcode  : 2" in done.stderr  # every process ended with the user-error status
    assert [p.name for p in taken.iterdir()] == ["notes.txt"] and (taken / "notes.txt").read_text() == "mine"


def test_on_main_in_one_process_runs_the_action_and_raises_its_error():
    from hiercls.errors import ConfigError
    from hiercls.training.trainer import Dist as _Dist

    assert _Dist().on_main(lambda: 42) == 42
    with pytest.raises(ConfigError, match="refused"):
        _Dist().on_main(lambda: (_ for _ in ()).throw(ConfigError("refused")))


@gloo
def test_global_batch_must_divide_over_processes(dataset, monkeypatch, capsys):
    from hiercls.config import load_config
    from hiercls.engine import _init_distributed
    from hiercls.errors import ConfigError

    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    config = load_config(None, {"taxonomy": "t", "data": "d", "out": "o", "batch_size": 8})
    with pytest.raises(ConfigError, match=r"--batch-size 8 is the global batch.*3 processes"):
        _init_distributed(config)


def test_shards_are_disjoint_and_cover_the_batch():
    from hiercls.training.trainer import Dist as _Dist
    from hiercls.training.trainer import _batches, _shard_rows

    for size in (8, 7, 5):
        rows = [_shard_rows(size, _Dist(world=2, rank=r)).tolist() for r in range(2)]
        assert sorted(rows[0] + rows[1]) == list(range(size)) and not set(rows[0]) & set(rows[1])
    assert _shard_rows(8, _Dist()) is None
    # a unit smaller than one global batch trains only if each of 2 processes gets 2 images
    assert _batches(4, 8, min_last=4) == 1 and _batches(3, 8, min_last=4) == 0


def test_sharded_augmentation_equals_the_whole_batch():
    """N processes augmenting their rows of a global batch produce the one-process batch."""
    from hiercls.augment import BatchAugment
    from hiercls.config import AugmentConfig

    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (7, 12, 12, 3), dtype=np.uint8))
    augment = BatchAugment(AugmentConfig(color_jitter=0.3))
    one = torch.Generator().manual_seed(5)
    whole = augment(images, one)
    for rank in range(2):
        rows = torch.arange(rank, 7, 2)
        generator = torch.Generator().manual_seed(5)
        part = augment(images[rows], generator, rows=rows, global_size=7)
        assert torch.allclose(part, whole[rows], atol=1e-6)
        # every process's generator advances as the single process's does, so later draws agree too
        assert torch.equal(generator.get_state(), one.get_state())
