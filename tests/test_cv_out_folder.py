"""``hiercls cv`` out folder: an impossible grid writes and prints nothing; a failed start does not lock OUT."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from hiercls import cv, engine
from hiercls.cv import DONE_FILE, SETTINGS_FILE, cell_dir, load_cv_config, run_cv
from hiercls.errors import ConfigError, DataError
from tests.test_cv import BACKBONE, MINI_TREE, write_config, write_slides


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cvout")
    (folder / "mini.yaml").write_text(MINI_TREE, encoding="utf-8")
    write_slides(folder, groups_per_label=1, per_group=2)  # 4 groups (slides), 8 images
    return folder


def test_more_folds_than_groups_is_refused_before_any_output_or_file(project: Path):
    config = load_cv_config(write_config(project, "cv-many.yaml", out="out-many", folds=50, strategies=["flat"]))
    printed = io.StringIO()
    with pytest.raises(DataError, match="only 4 group"):
        run_cv(config, Console(file=printed, width=160), progress=False)
    assert printed.getvalue() == ""
    assert not (project / "out-many").exists()


def test_excluded_images_do_not_count_as_groups_for_the_folds(project: Path):
    config = load_cv_config(write_config(project, "cv-excl.yaml", out="out-excl", folds=4, strategies=["flat"],
                                         exclude=["Reactive"]))
    with pytest.raises(DataError, match="only 3 group"):
        run_cv(config, Console(file=io.StringIO()), progress=False)
    assert not (project / "out-excl").exists()


def _failed_start(project: Path, out: str) -> None:
    """OUT as a command leaves it that failed in its first cell: settings written, a cell with a checkpoint."""
    old = load_cv_config(write_config(project, f"{out}-old.yaml", out=out, folds=3, strategies=["flat"],
                                      fit={"img_size": 16, "epochs": 1, "batch_size": 8, "device": "cpu"}))
    cv._prepare_out(cv._absolute(old))
    cell = cell_dir(project / out, "flat", BACKBONE, 0)
    cell.mkdir(parents=True)
    (cell / "config.yaml").write_text("taxonomy: x\n", encoding="utf-8")


def test_changed_settings_are_allowed_when_no_cell_finished(project: Path, monkeypatch):
    _failed_start(project, "out-failed")
    calls = []

    class Stop(Exception):
        pass

    def fake_fit(config, console, *, resume, overwrite, progress):
        calls.append((config.out, resume, overwrite, config.epochs))
        raise Stop  # the cell itself is not what this test is about

    monkeypatch.setattr(engine, "fit", fake_fit)
    monkeypatch.setattr(cv, "_cell_state", lambda run_dir: "resume" if run_dir.name == "fold0" else "new")
    new = load_cv_config(write_config(project, "out-failed-new.yaml", out="out-failed", folds=2, strategies=["flat"],
                                      fit={"img_size": 16, "epochs": 2, "batch_size": 8, "device": "cpu"}))
    with pytest.raises(Stop):
        run_cv(new, Console(file=io.StringIO()), progress=False)
    # the cell trained with the old settings starts again instead of resuming
    assert calls == [(cell_dir(project / "out-failed", "flat", BACKBONE, 0), False, True, 2)]
    stored = yaml.safe_load((project / "out-failed" / SETTINGS_FILE).read_text(encoding="utf-8"))
    assert stored["settings"]["folds"] == 2 and stored["settings"]["fit"]["epochs"] == 2


def test_changed_settings_are_refused_once_a_cell_finished(project: Path):
    _failed_start(project, "out-done")
    (cell_dir(project / "out-done", "flat", BACKBONE, 0) / DONE_FILE).write_text("{}", encoding="utf-8")
    new = load_cv_config(write_config(project, "out-done-new.yaml", out="out-done", folds=2, strategies=["flat"],
                                      fit={"img_size": 16, "epochs": 2, "batch_size": 8, "device": "cpu"}))
    with pytest.raises(ConfigError, match="other settings .*folds: 3 -> 2"):
        run_cv(new, Console(file=io.StringIO()), progress=False)
