"""Interrupted and failing runs: SIGKILL, Ctrl-C, existing or unwritable output, NaN loss, OOM.

The kill tests run ``python -m hiercls fit`` in a subprocess. A ``sitecustomize`` module on
the subprocess's ``PYTHONPATH`` slows every optimizer step a little (it changes no number),
so a kill lands in the middle of training rather than after it on a fast machine.
The cases are listed in docs/reliability.md.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hiercls.cli import main
from hiercls.errors import HierclsError

REPO = Path(__file__).resolve().parents[1]
LEUKEMIA = REPO / "taxonomy" / "leukemia.yaml"
LABELS = ("Normal", "Reactive", "ALL", "CLL")
EPOCHS = 3

SLOW_STEPS = """\
import time

import torch

_step = torch.optim.AdamW.step


def _slow_step(self, *args, **kwargs):
    time.sleep({delay})
    return _step(self, *args, **kwargs)


torch.optim.AdamW.step = _slow_step
"""


from conftest import write_smears  # noqa: E402


@pytest.fixture(scope="module")
def smears(tmp_path_factory) -> Path:
    """4 leukemia labels x 4 slides of 16px PNGs named slideK_LABEL.png (16 images)."""
    return write_smears(tmp_path_factory.mktemp("smears") / "data", LABELS, per_label=4, seed=5, suffix=".png")


def fit_args(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "fit", "--taxonomy", str(LEUKEMIA), "--data", str(data), "--out", str(out), "--backbone", "test_resnet",
        "--img-size", "16", "--epochs", str(EPOCHS), "--batch-size", "4", "--optimizer", "adamw", "--device", "cpu",
        "--seed", "7", "--group-regex", r"^(slide\d)_", "--val-fraction", "0.25",
        "--cache-dir", str(out.parent / "cache"), "--no-progress", "--allow-incomplete-tree", *extra,
    ]


@pytest.fixture(scope="module")
def reference(smears, tmp_path_factory) -> Path:
    """An uninterrupted run with the same seed, for comparison."""
    run = tmp_path_factory.mktemp("reference") / "run"
    assert main(fit_args(smears, run)) == 0
    return run


def epoch_numbers(run: Path) -> list[dict]:
    """metrics.jsonl without the timing fields (they differ between any two runs)."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    for record in records:
        record.pop("seconds", None)
        record.pop("images_per_second", None)
        record.pop("elapsed_seconds", None)
    return records


def assert_same_results(run: Path, reference: Path) -> None:
    got, want = epoch_numbers(run), epoch_numbers(reference)
    assert [r["epoch"] for r in got] == list(range(1, EPOCHS + 1))
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.keys() == b.keys()
        for key in a:
            if isinstance(a[key], float):
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
            elif isinstance(a[key], dict):
                assert a[key].keys() == b[key].keys()
                for k in a[key]:
                    assert a[key][k] == pytest.approx(b[key][k], rel=1e-5, abs=1e-6), (key, k)
            else:
                assert a[key] == b[key], key


def start_fit(args: list[str], tmp_path: Path, delay: float) -> subprocess.Popen:
    hook = tmp_path / "slow_hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(SLOW_STEPS.format(delay=delay))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(hook), str(REPO), os.environ.get("PYTHONPATH", "")]))
    return subprocess.Popen(
        [sys.executable, "-m", "hiercls", *args], cwd=tmp_path, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            _out, err = process.communicate()
            pytest.fail(f"fit ended (exit {process.returncode}) before writing {path.name}:\n{err[-2000:]}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"{path} did not appear within {timeout} s")
        time.sleep(0.01)


def assert_checkpoints_load(run: Path) -> None:
    """Every checkpoint file a reader would open is complete; only hidden temp files may be partial."""
    from hiercls.checkpoint import load_training_state, read_metadata
    from hiercls.inference import load_run

    folder = run / "checkpoints"
    for path in folder.iterdir():
        if path.name.startswith("."):
            assert path.name.endswith(".tmp"), path.name  # an unfinished atomic write, never read
            continue
        if path.suffix == ".json":
            read_metadata(path)
        elif path.name.endswith(".state.pt"):
            load_training_state(path)
    for which in ("last", "best"):
        if (folder / f"{which}.json").exists():
            load_run(run, which)


def checkpoint_epochs(run: Path) -> tuple[int, int | None]:
    """The epoch recorded by the last checkpoint's metadata and by its training state."""
    from hiercls.checkpoint import load_training_state

    meta = json.loads((run / "checkpoints" / "last.json").read_text())
    state_path = run / "checkpoints" / "last.state.pt"
    if not state_path.exists():
        return meta["epoch"], None
    return meta["epoch"], load_training_state(state_path)["position"]["epoch"]


def test_sigkill_at_a_random_moment_then_resume_matches_an_uninterrupted_run(smears, reference, tmp_path):
    run = tmp_path / "run"
    process = start_fit(fit_args(smears, run), tmp_path, delay=0.1)
    wait_for(run / "checkpoints" / "last.state.pt", process)  # the first checkpoint is complete
    time.sleep(random.Random().uniform(0.0, 0.2))  # a random moment after the first checkpoint
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL
    from hiercls.checkpoint import recover_checkpoint

    recover_checkpoint(run / "checkpoints", "last")  # what --resume does first: finish or drop a cut save
    assert_checkpoints_load(run)
    assert checkpoint_epochs(run)[0] == checkpoint_epochs(run)[1]  # weights, metadata and state agree
    finished = len(epoch_numbers(run))
    assert 1 <= finished <= EPOCHS

    assert main(["fit", "--out", str(run), "--resume", "--no-progress"]) == 0
    assert_same_results(run, reference)
    assert_checkpoints_load(run)
    from safetensors.torch import load_file

    got, want = load_file(run / "checkpoints" / "last.safetensors"), load_file(reference / "checkpoints" / "last.safetensors")
    assert got.keys() == want.keys()
    for key in got:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5)


def test_ctrl_c_saves_a_checkpoint_and_resume_finishes_the_run(smears, reference, tmp_path):
    run = tmp_path / "run"
    process = start_fit(fit_args(smears, run), tmp_path, delay=0.1)
    wait_for(run / "checkpoints" / "last.state.pt", process)
    time.sleep(0.15)  # into the next epoch
    process.send_signal(signal.SIGINT)
    _out, err = process.communicate(timeout=60)
    assert process.returncode == 130, err[-2000:]
    assert "interrupted" in err and "--resume" in err and "Traceback" not in err
    meta = json.loads((run / "checkpoints" / "last.json").read_text())
    assert meta["epoch"] < EPOCHS
    assert_checkpoints_load(run)

    assert main(["fit", "--out", str(run), "--resume", "--no-progress"]) == 0
    assert_same_results(run, reference)


def test_an_existing_run_is_never_overwritten_without_overwrite(reference, smears, tmp_path, capsys):
    before = {p: p.read_bytes() for p in reference.rglob("*") if p.is_file()}
    assert main(fit_args(smears, reference)) == 2
    err = capsys.readouterr().err
    assert "run folder exists and is not empty" in err and "--overwrite" in err
    assert {p: p.read_bytes() for p in reference.rglob("*") if p.is_file()} == before


def test_overwrite_never_empties_a_folder_that_is_not_a_run(smears, tmp_path, capsys):
    folder = tmp_path / "thesis"
    folder.mkdir()
    (folder / "chapter1.tex").write_text("precious")
    assert main(fit_args(smears, folder, "--overwrite")) == 2
    assert "not a hiercls run" in capsys.readouterr().err
    assert (folder / "chapter1.tex").read_text() == "precious"


def test_unwritable_output_is_reported_before_training(smears, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    out = blocker / "run"  # a folder below a regular file: cannot be created, even as root
    started = time.monotonic()
    assert main(fit_args(smears, out)) == 2
    err = capsys.readouterr().err
    assert "cannot write to the run folder" in err and "--out" in err and "Traceback" not in err
    assert time.monotonic() - started < 10
    assert not (tmp_path / "cache").exists()  # refused before any image was decoded


def test_full_output_disk_is_reported_before_training(smears, tmp_path, capsys, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 * 2**20, 10 * 2**20 - 4096, 4096))
    out = tmp_path / "run"
    assert main(fit_args(smears, out)) == 2
    err = capsys.readouterr().err
    assert "MiB free" in err and "--out" in err and "Traceback" not in err
    assert not (out / "metrics.jsonl").exists() and not list((out / "checkpoints").glob("*"))
    monkeypatch.undo()  # space freed: the same command starts the run, no --overwrite needed
    assert main(fit_args(smears, out)) == 0
    assert (out / "checkpoints" / "last.json").is_file()


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into a read-only folder; the file-path case covers it")
def test_read_only_output_folder_is_reported_before_training(smears, tmp_path, capsys):
    parent = tmp_path / "locked"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        assert main(fit_args(smears, parent / "run")) == 2
        assert "cannot write to the run folder" in capsys.readouterr().err
    finally:
        parent.chmod(0o700)


def config_for(smears: Path, out: Path, **options):
    from hiercls.config import load_config

    base = {
        "taxonomy": str(LEUKEMIA), "data": str(smears), "out": str(out), "backbone": "test_resnet", "img_size": 16,
        "epochs": 2, "batch_size": 4, "device": "cpu", "seed": 7, "group_regex": r"^(slide\d)_",
        "val_fraction": 0.25, "cache_dir": str(out.parent / "cache"), "allow_incomplete_tree": True,
    }
    return load_config(None, {**base, **options})


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(smears, tmp_path, monkeypatch):
    from hiercls.engine import TrainingError, fit
    from hiercls.inference import load_run
    from hiercls.strategies.joint import JointUnit

    epoch_now = {"epoch": 0}
    real_loss = JointUnit.compute_loss

    def poisoned(self, outputs, labels):
        loss, parts = real_loss(self, outputs, labels)
        return (loss * float("nan"), parts) if epoch_now["epoch"] >= 1 else (loss, parts)

    monkeypatch.setattr(JointUnit, "compute_loss", poisoned)
    run = tmp_path / "run"
    with pytest.raises(TrainingError, match=r"loss became nan at epoch 2 .*last good checkpoint is kept.*--lr") as info:
        fit(config_for(smears, run), progress=False, on_step=lambda epoch, unit, step: epoch_now.update(epoch=epoch))
    assert "\n" not in str(info.value)
    assert len(epoch_numbers(run)) == 1
    loaded = load_run(run, "last")
    assert loaded.metadata["epoch"] == 1
    assert all(torch.isfinite(p).all() for p in loaded.model.parameters())


def test_huge_learning_rate_exits_2_with_the_hint(smears, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(fit_args(smears, run, "--lr", "1e30")) == 2
    err = capsys.readouterr().err
    assert "loss became" in err and "lower --lr" in err and "Traceback" not in err


def test_out_of_memory_suggests_a_smaller_batch(smears, tmp_path, monkeypatch, capsys):
    from hiercls.strategies.joint import JointUnit

    def out_of_memory(self, outputs, labels):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(JointUnit, "compute_loss", out_of_memory)
    assert main(fit_args(smears, tmp_path / "run")) == 2
    err = capsys.readouterr().err
    assert "out of GPU memory at batch size 4" in err and "--batch-size 2" in err and "Traceback" not in err


def test_out_of_memory_as_plain_runtime_error_suggests_a_smaller_batch(smears, tmp_path, monkeypatch):
    from hiercls.engine import fit
    from hiercls.strategies.joint import JointUnit

    def out_of_memory(self, outputs, labels):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(JointUnit, "compute_loss", out_of_memory)
    with pytest.raises(HierclsError, match="--batch-size 2"):
        fit(config_for(smears, tmp_path / "run"), progress=False)


@pytest.mark.parametrize("dies_at_rename", [1, 2, 3, None])
def test_kill_between_checkpoint_parts_is_not_resumed_silently_wrong(smears, reference, tmp_path, monkeypatch,
                                                                     capsys, dies_at_rename):
    """A kill while the last checkpoint's files are committed (or just before) resumes exactly.

    ``dies_at_rename`` is the rename of the second save's commit at which the process "dies"
    (None: just before the commit, with every ``.new`` file written but the metadata's).
    """
    from hiercls import checkpoint

    class Killed(BaseException):
        """Stands in for SIGKILL at one exact moment (nothing after it runs)."""

    real_replace, real_json, saves = checkpoint.os.replace, checkpoint.atomic_write_json, []

    def counting_json(path, data):
        if str(path).endswith("last.json.new"):
            saves.append(path)
            if dies_at_rename is None and len(saves) == 2:
                raise Killed  # state and weights of epoch 2 written as .new, no commit mark yet
        return real_json(path, data)

    renames = []

    def dying_replace(src, dst):
        if len(saves) == 2 and str(dst).endswith(("last.state.pt", "last.safetensors", "last.json")):
            renames.append(dst)
            if len(renames) == dies_at_rename:
                raise Killed
        return real_replace(src, dst)

    run = tmp_path / "run"
    monkeypatch.setattr(checkpoint, "atomic_write_json", counting_json)
    monkeypatch.setattr(checkpoint.os, "replace", dying_replace)
    with pytest.raises(Killed):
        main(fit_args(smears, run))
    monkeypatch.setattr(checkpoint, "atomic_write_json", real_json)
    monkeypatch.setattr(checkpoint.os, "replace", real_replace)
    assert main(["fit", "--out", str(run), "--resume", "--no-progress"]) == 0
    assert not list((run / "checkpoints").glob("*.new"))
    assert_same_results(run, reference)
