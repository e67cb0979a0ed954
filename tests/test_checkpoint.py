"""Atomic writes, safetensors weights, checkpoint metadata and training state."""

from __future__ import annotations

import json

import pytest
import torch

from hiercls.checkpoint import (
    load_training_state,
    load_weights,
    read_metadata,
    save_checkpoint,
    save_training_state,
    save_weights,
    weights_checkpoint_id,
)
from hiercls.errors import CheckpointError
from hiercls.io import atomic_write, atomic_write_json, atomic_write_text


def test_atomic_write_replaces_content(tmp_path):
    path = tmp_path / "sub" / "f.txt"
    atomic_write_text(path, "one")
    atomic_write_text(path, "two")
    assert path.read_text() == "two"
    assert [p.name for p in path.parent.iterdir()] == ["f.txt"]


def test_failure_mid_write_keeps_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "metrics.json"
    atomic_write_json(path, {"epoch": 1})

    def broken(handle):
        handle.write(b'{"epoch": 2, "trunc')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, broken)
    assert json.loads(path.read_text()) == {"epoch": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_interrupt_mid_write_keeps_old_file(tmp_path):
    path = tmp_path / "a.txt"
    atomic_write_text(path, "old")

    def interrupted(handle):
        handle.write("new, half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, interrupted, "w")
    assert path.read_text() == "old"


def tiny_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2))
    model[1].running_mean += torch.arange(3.0)  # buffers must round-trip too
    return model


def test_weights_round_trip_gives_identical_outputs(tmp_path):
    source, target = tiny_model(0), tiny_model(1)
    x = torch.randn(5, 4)
    source.eval(), target.eval()
    assert not torch.equal(source(x), target(x))
    save_weights(tmp_path / "w.safetensors", source)
    load_weights(tmp_path / "w.safetensors", target)
    assert torch.equal(source(x), target(x))


def test_tied_weights_can_be_saved(tmp_path):
    def tied_model(seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3))
        model[1].weight = model[0].weight
        return model

    source, target = tied_model(0), tied_model(1)
    assert not torch.equal(source[0].weight, target[0].weight)
    save_weights(tmp_path / "tied.safetensors", source)
    load_weights(tmp_path / "tied.safetensors", target)
    for name, value in source.state_dict().items():
        assert torch.equal(value, target.state_dict()[name])
    assert target[1].weight is target[0].weight  # the tie survives loading


def test_weights_of_another_model_are_refused(tmp_path):
    save_weights(tmp_path / "w.safetensors", torch.nn.Linear(4, 3))
    with pytest.raises(CheckpointError, match="do not fit"):
        load_weights(tmp_path / "w.safetensors", torch.nn.Linear(4, 5))
    (tmp_path / "bad.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_weights(tmp_path / "bad.safetensors", torch.nn.Linear(4, 3))
    with pytest.raises(CheckpointError, match="not found"):
        load_weights(tmp_path / "none.safetensors", torch.nn.Linear(4, 3))


def test_save_checkpoint_writes_weights_and_metadata(tmp_path):
    model = tiny_model(0)
    meta_path = save_checkpoint(tmp_path / "ckpt", "best", model, {"epoch": 3, "strategy": "joint"})
    assert (tmp_path / "ckpt" / "best.safetensors").is_file()
    meta = read_metadata(meta_path)
    assert {k: v for k, v in meta.items() if k != "checkpoint_id"} == {"epoch": 3, "strategy": "joint"}
    assert meta["checkpoint_id"] == weights_checkpoint_id(tmp_path / "ckpt" / "best.safetensors")
    assert not list((tmp_path / "ckpt").glob("*.new"))
    with pytest.raises(CheckpointError, match="metadata not found"):
        read_metadata(tmp_path / "ckpt" / "last.json")


def test_training_state_round_trip(tmp_path):
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    save_training_state(tmp_path / "s.pt", {"optimizer": optimizer.state_dict(), "rng": torch.get_rng_state()})
    state = load_training_state(tmp_path / "s.pt")
    fresh = torch.optim.AdamW(model.parameters(), lr=0.1)
    fresh.load_state_dict(state["optimizer"])
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    with pytest.raises(CheckpointError, match="cannot be resumed"):
        load_training_state(tmp_path / "missing.pt")


def test_atomic_writers_live_in_a_torch_free_module():
    import subprocess
    import sys

    code = "import sys, hiercls.io; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0, "hiercls.io must not import torch"
