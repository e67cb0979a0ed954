"""Hostile and careless inputs around a run folder: crafted files, two fits at once, NaN models,
full disks, failed fits, plugins that change under a run. Listed in docs/reliability.md."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from test_reliability_runs import fit_args as reliability_fit_args
from torch import nn

from hiercls.checkpoint import load_training_state, load_weights, save_weights
from hiercls.cli import main
from hiercls.errors import CheckpointError, ConfigError
from hiercls.hookspecs import hookimpl
from hiercls.plugins import PluginOverrideWarning, check_provenance, get_plugin_manager

from conftest import write_smears

REPO = Path(__file__).resolve().parents[1]
LEUKEMIA = REPO / "taxonomy" / "leukemia.yaml"
LABELS = ("Normal", "Reactive", "ALL", "CLL")


@pytest.fixture(scope="module")
def smears(tmp_path_factory) -> Path:
    return write_smears(tmp_path_factory.mktemp("smears") / "data", LABELS, per_label=4, seed=3, suffix=".png")


def fit_args(data: Path, out: Path, *extra: str) -> list[str]:
    """The reliability tests' fit command, two epochs (a later option wins over an earlier one)."""
    return reliability_fit_args(data, out, "--epochs", "2", *extra)


@pytest.fixture(scope="module")
def trained(smears, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("trained") / "run"
    assert main(fit_args(smears, run)) == 0
    return run


def copy_run(run: Path, to: Path) -> Path:
    import shutil

    shutil.copytree(run, to)
    return to


# -- 1. no code runs from a run folder ----------------------------------------------------


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_training_state_is_refused_and_runs_no_code(trained, tmp_path, capsys):
    run = copy_run(trained, tmp_path / "run")
    marker = tmp_path / "pwned"
    state = run / "checkpoints" / "last.state.pt"
    torch.save({"position": {"epoch": 1}, "payload": _RunsCode(marker)}, state)
    assert main(["fit", "--out", str(run), "--resume", "--epochs", "3", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "refusing to load the training state" in err and "Traceback" not in err
    assert not marker.exists()


def test_a_real_training_state_loads_without_pickle_objects(trained):
    state = load_training_state(trained / "checkpoints" / "last.state.pt")
    assert state["position"]["epoch"] == 2 and isinstance(state["generator"], torch.Tensor)


def test_an_oversized_training_state_is_refused_before_it_is_read(trained, tmp_path):
    path = tmp_path / "big.state.pt"
    path.write_bytes(b"\0" * 4096)
    with pytest.raises(CheckpointError, match="more than"):
        load_training_state(path, max_bytes=1024)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.num_features = 8

    def forward(self, x):
        return self.body(x).mean(dim=(2, 3))


class _ShadowsTestResnet:
    """A plugin that answers to the name a run's built-in backbone has."""

    @staticmethod
    @hookimpl
    def register_backbones(register):
        register("test_resnet", lambda name, pretrained=None, **kw: _Net())


class _ExtraBackbone:
    @staticmethod
    @hookimpl
    def register_backbones(register):
        register("guard/net", lambda name, pretrained=None, **kw: _Net())


@pytest.fixture
def plugin():
    pm, added = get_plugin_manager(), []

    def add(obj, name):
        pm.register(obj, name=name)
        added.append(obj)

    yield add
    for obj in added:
        if pm.is_registered(obj):
            pm.unregister(obj)


def test_a_plugin_overriding_a_runs_backbone_is_refused_and_new_fits_are_warned(trained, smears, tmp_path, plugin,
                                                                                  capsys):
    plugin(_ShadowsTestResnet, "guard-shadow")
    images = smears / "ALL"
    assert main(["predict", "--run", str(trained), "--data", str(images), "--out", str(tmp_path / "p.csv"),
                 "--device", "cpu", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "guard-shadow" in err and "answers to that name" in err and "Traceback" not in err
    assert not (tmp_path / "p.csv").exists()
    with pytest.warns(PluginOverrideWarning, match="test_resnet.*guard-shadow"):
        from hiercls.plugins import _warned, find_backbone

        _warned.clear()
        find_backbone("test_resnet")


def test_a_run_whose_plugin_is_gone_names_the_plugin_to_install(smears, tmp_path, plugin, capsys):
    plugin(_ExtraBackbone, "guard-extra")
    run = tmp_path / "run"
    assert main(fit_args(smears, run, "--backbone", "guard/net", "--epochs", "1")) == 0
    recorded = json.loads((run / "checkpoints" / "last.json").read_text())["provenance"]
    assert recorded["backbone"]["plugin"] == "guard-extra" and recorded["loss"]["distribution"] == "hiercls"
    get_plugin_manager().unregister(_ExtraBackbone)
    assert main(["predict", "--run", str(run), "--data", str(smears / "ALL"), "--out", str(tmp_path / "p.csv"),
                 "--device", "cpu", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "plugin 'guard-extra'" in err and "not installed here" in err


def test_provenance_names_the_package_to_install():
    recorded = {"plugin": "cells", "distribution": "hiercls-cells", "version": "1.2"}
    with pytest.raises(ConfigError, match=r"pip install hiercls-cells"):
        check_provenance("backbone", "cells/net", recorded, "run/checkpoints/best.json")
    builtin = {"plugin": "hiercls.builtin.losses", "distribution": "hiercls", "version": "0.0.1"}
    check_provenance("loss", "ce", builtin, "x")  # the built-in itself: accepted (its version is hiercls's)


# -- 2. YAML that expands without end -----------------------------------------------------

BOMB = "l0: &l0 [leaf]\n" + "".join(
    f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]\n" for i in range(1, 10)
) + "root: r\nchildren: [{name: x, children: *l9}]\n"


def _load_in_subprocess(path: Path, loader: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Load in a child process, so that a hang fails the test instead of stalling the suite."""
    code = textwrap.dedent(f"""
        import sys
        from hiercls.errors import HierclsError
        try:
            {loader}({str(path)!r})
        except HierclsError as exc:
            print(exc); sys.exit(2)
    """)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)


def test_an_alias_bomb_taxonomy_is_refused_at_once(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB)
    done = _load_in_subprocess(path, "__import__('hiercls.taxonomy').taxonomy.load_taxonomy")
    assert done.returncode == 2, done.stderr
    assert "bomb.yaml" in done.stdout and "more than 200,000 YAML nodes" in done.stdout


def test_an_alias_bomb_config_is_refused(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(BOMB.replace("root: r\nchildren: [{name: x, children: *l9}]\n", "backbone_kwargs: {x: *l9}\n"))
    done = _load_in_subprocess(path, "(lambda p: __import__('hiercls.config').config.load_config(p, {}))")
    assert done.returncode == 2, done.stderr
    assert "config.yaml" in done.stdout and "YAML nodes" in done.stdout


def test_a_self_referencing_alias_is_refused(tmp_path):
    from hiercls.errors import TaxonomyError
    from hiercls.taxonomy import load_taxonomy

    path = tmp_path / "loop.yaml"
    path.write_text("root: r\nchildren: &a [{name: x, children: *a}]\n")
    with pytest.raises(TaxonomyError, match="refers to itself"):
        load_taxonomy(path)


@pytest.mark.parametrize("depth", [70, 400])
def test_a_very_deep_taxonomy_gets_a_clear_limit(tmp_path, depth):
    from hiercls.errors import TaxonomyError
    from hiercls.taxonomy import MAX_DEPTH, load_taxonomy

    tree = "leaf"
    for i in range(depth):
        tree = f"{{name: n{i}, children: [{tree}]}}"
    path = tmp_path / "deep.yaml"
    path.write_text(f"root: r\nchildren: [{tree}, other]\n")
    with pytest.raises(TaxonomyError, match=f"deeper than {MAX_DEPTH} levels"):
        load_taxonomy(path)


def test_a_deep_but_allowed_taxonomy_loads(tmp_path):
    from hiercls.taxonomy import load_taxonomy

    tree = "leaf"
    for i in range(30):
        tree = f"{{name: n{i}, children: [{tree}, s{i}]}}"
    path = tmp_path / "deep.yaml"
    path.write_text(f"root: r\nchildren: [{tree}, other]\n")
    assert load_taxonomy(path).depth("leaf") == 31


# -- 3. one fit per run folder ------------------------------------------------------------


def test_a_second_fit_on_a_folder_in_use_is_refused(smears, tmp_path, capsys):
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from hiercls.run import RunLock
            with RunLock({str(run)!r}):
                print("locked", flush=True)
                time.sleep(120)
        """)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(fit_args(smears, run)) == 2
        err = capsys.readouterr().err
        assert "another `hiercls fit`" in err and f"pid {holder.pid}" in err
        assert not (run / "config.yaml").exists()
    finally:
        holder.kill()
        holder.wait()
    # the holder was killed: its lock is gone with it, and the folder trains
    assert main(fit_args(smears, run, "--epochs", "1")) == 0


def test_a_stale_lock_file_does_not_block_resume(trained, tmp_path):
    run = copy_run(trained, tmp_path / "run")
    (run / ".hiercls.lock").write_text("pid 999999\n")  # left by a killed fit: no flock on it
    assert main(["fit", "--out", str(run), "--resume", "--epochs", "3", "--no-progress"]) == 0


# -- 4. no NaN model saved as a success ---------------------------------------------------


def test_non_finite_weights_stop_the_run_before_anything_is_saved(smears, tmp_path, monkeypatch, capsys):
    """The loss of the one step is finite; the weights after it are not (a huge --lr)."""
    real_step = torch.optim.AdamW.step

    def overflowing_step(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        with torch.no_grad():
            self.param_groups[0]["params"][0].fill_(float("inf"))
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", overflowing_step)
    run = tmp_path / "run"
    assert main(fit_args(smears, run, "--epochs", "1", "--batch-size", "16")) == 2
    err = capsys.readouterr().err
    assert "weights became non-finite" in err and "--lr" in err and "done" not in err
    assert not run.exists()  # nothing trained: the failed run leaves no folder


def test_a_nan_validation_loss_is_never_the_best_epoch():
    from hiercls.training.trainer import _is_better

    assert not _is_better("val_loss", float("nan"), None)
    assert not _is_better("val_hF", float("nan"), 0.1)
    assert _is_better("val_loss", 0.5, None)


def test_non_finite_weights_are_neither_saved_nor_loaded(tmp_path):
    from safetensors.torch import save_file

    net = _Net()
    with torch.no_grad():
        net.body[0].weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="refusing to save weights with NaN"):
        save_weights(tmp_path / "w.safetensors", net)
    assert not (tmp_path / "w.safetensors").exists()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "w.safetensors"))
    with pytest.raises(CheckpointError, match="NaN or inf"):
        load_weights(tmp_path / "w.safetensors", _Net())


def test_predict_refuses_a_run_with_non_finite_weights(trained, smears, tmp_path, capsys):
    from safetensors import safe_open
    from safetensors.torch import save_file

    run = copy_run(trained, tmp_path / "run")
    weights = run / "checkpoints" / "last.safetensors"
    with safe_open(str(weights), framework="pt") as handle:
        meta = handle.metadata()
        state = {k: handle.get_tensor(k) for k in handle.keys()}
    first = next(k for k, v in state.items() if v.is_floating_point())
    state[first] = torch.full_like(state[first], float("nan"))
    save_file(state, str(weights), metadata=meta)
    assert main(["predict", "--run", str(run), "--checkpoint", "last", "--data", str(smears / "ALL"),
                 "--out", str(tmp_path / "p.csv"), "--device", "cpu", "--no-progress"]) == 2
    assert "NaN or inf" in capsys.readouterr().err


def test_an_infinite_learning_rate_is_a_config_error(smears, tmp_path, capsys):
    assert main(fit_args(smears, tmp_path / "run", "--lr", "inf")) == 2
    err = capsys.readouterr().err
    assert "lr" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


# -- 5. a full disk -----------------------------------------------------------------------


def test_a_full_disk_at_a_checkpoint_is_a_clear_error_and_resume_continues(smears, tmp_path, monkeypatch, capsys):
    from hiercls import checkpoint

    real_save, saves = checkpoint.save_weights, []

    def filling_save(path, module, checkpoint_id=None):
        saves.append(path)
        if len(saves) == 3:  # epoch 2's best weights: epoch 1 is saved
            Path(path).with_name(".partial.tmp").write_bytes(b"x")  # what a killed writer leaves
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_save(path, module, checkpoint_id)

    run = tmp_path / "run"
    monkeypatch.setattr(checkpoint, "save_weights", filling_save)
    assert main(fit_args(smears, run)) == 2
    err = capsys.readouterr().err
    assert "the disk is full" in err and "--resume" in err and "Traceback" not in err
    assert not list((run / "checkpoints").glob("*.new"))
    monkeypatch.setattr(checkpoint, "save_weights", real_save)  # space freed
    assert main(["fit", "--out", str(run), "--resume", "--no-progress"]) == 0
    assert not (run / "checkpoints" / ".partial.tmp").exists()  # stale temp files are cleaned
    assert json.loads((run / "checkpoints" / "last.json").read_text())["epoch"] == 2


def test_resume_counts_the_checkpoints_it_replaces_as_free_space(trained, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from hiercls.inference import load_run
    from hiercls.run import RunPaths, checkpoint_bytes, existing_checkpoint_bytes

    run = copy_run(trained, tmp_path / "run")
    existing = existing_checkpoint_bytes(RunPaths(run))
    needed = checkpoint_bytes(load_run(run, "last").model)
    usage = namedtuple("usage", "total used free")
    free = needed - existing // 2  # too little on its own, enough with the replaced files
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(2**30, 2**30 - free, free))
    assert main(["fit", "--out", str(run), "--resume", "--epochs", "3", "--no-progress"]) == 0


def test_a_full_disk_anywhere_is_one_line_not_a_traceback(monkeypatch, capsys, smears, tmp_path):
    from hiercls.training import run_folder

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", "metrics.jsonl")

    monkeypatch.setattr(run_folder, "append_metrics", full)
    assert main(fit_args(smears, tmp_path / "run", "--epochs", "1")) == 2
    assert "the disk is full" in capsys.readouterr().err


# -- 8, 11, 12: clear errors, nothing left behind, one piece of advice --------------------


def test_a_negative_seed_is_a_config_error(smears, tmp_path, capsys):
    assert main(fit_args(smears, tmp_path / "run", "--seed", "-1")) == 2
    err = capsys.readouterr().err
    assert "seed" in err and "Traceback" not in err


@pytest.mark.parametrize("bad", [
    ("--backbone", "no_such_model_anywhere"),
    ("--data", "/no/such/folder"),
    ("--device", "cuda:7"),
    ("--loss", "dice"),
])
def test_a_failed_fit_leaves_no_run_folder(smears, tmp_path, capsys, bad):
    run = tmp_path / "run"
    args = fit_args(smears, run)
    if bad[0] in args:
        args[args.index(bad[0]) + 1] = bad[1]
    else:
        args += list(bad)
    assert main(args) == 2
    assert "Traceback" not in capsys.readouterr().err
    assert not run.exists()


def test_a_failed_fit_in_an_existing_empty_folder_leaves_it_empty(smears, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    assert main(fit_args(smears, run, "--backbone", "no_such_model_anywhere")) == 2
    assert run.is_dir() and not any(run.iterdir())


def test_an_untrained_run_gets_one_piece_of_advice(trained, smears, tmp_path, capsys):
    import shutil

    run = copy_run(trained, tmp_path / "run")
    shutil.rmtree(run / "checkpoints")
    (run / "checkpoints").mkdir()
    assert main(["predict", "--run", str(run), "--data", str(smears / "ALL"), "--out", str(tmp_path / "p.csv"),
                 "--device", "cpu", "--no-progress"]) == 2
    predict_err = capsys.readouterr().err
    assert main(["fit", "--out", str(run), "--resume", "--no-progress"]) == 2
    resume_err = capsys.readouterr().err
    for err in (predict_err, resume_err):
        assert "--overwrite" in err and "--resume it" not in err
        assert "start it again with `hiercls fit ... --out" in err


# -- run files that are not what they seem ------------------------------------------------


def test_a_run_config_linked_to_dev_zero_is_refused_not_read_forever(trained, smears, tmp_path):
    run = copy_run(trained, tmp_path / "run")
    (run / "config.yaml").unlink()
    (run / "config.yaml").symlink_to("/dev/zero")
    done = subprocess.run(
        [sys.executable, "-m", "hiercls", "predict", "--run", str(run), "--data", str(smears / "ALL"),
         "--out", str(tmp_path / "p.csv"), "--device", "cpu", "--no-progress"],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert "config.yaml" in done.stderr and "not a regular file" in done.stderr


def test_deeply_nested_checkpoint_metadata_is_a_clear_error(trained, tmp_path):
    from hiercls.inference import load_run

    run = copy_run(trained, tmp_path / "run")
    (run / "checkpoints" / "best.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CheckpointError, match="cannot read checkpoint metadata"):
        load_run(run, "best")


def test_files_written_atomically_respect_the_umask(tmp_path):
    from hiercls.io import atomic_write_text

    old = os.umask(0o022)
    try:
        path = atomic_write_text(tmp_path / "shared.txt", "x")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644  # mkstemp alone would leave 0600


def test_fit_refuses_a_tree_whose_decisions_have_no_images_and_leaves_no_folder(smears, tmp_path, capsys):
    """The smears cover Normal, Reactive, ALL and CLL: Acute and Chronic have one trained child each."""
    run = tmp_path / "run"
    args = [a for a in fit_args(smears, run) if a != "--allow-incomplete-tree"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Acute (ALL: " in err and "Chronic (CLL: " in err and "--allow-incomplete-tree" in err
    assert "[training images at or below each child]" in err  # brackets are printed, not eaten as markup
    assert not run.exists()
