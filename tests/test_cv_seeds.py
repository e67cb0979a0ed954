"""``hiercls cv`` with ``seeds:``: every training seed on the same folds, finished cells never redone."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from test_cv import BACKBONE, MINI_TREE, quiet, read_json, write_config, write_slides

from hiercls import engine
from hiercls.cv import cell_dir, load_cv_config, run_cv
from hiercls.errors import ConfigError


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cvseeds")
    (folder / "mini.yaml").write_text(MINI_TREE, encoding="utf-8")
    write_slides(folder)
    return folder


def test_seeds_train_on_the_same_folds_and_extend_without_redoing(project: Path, monkeypatch):
    config = load_cv_config(write_config(project, "cv-seeds.yaml", seeds=[0, 1], strategies=["flat"]))
    result = run_cv(config, quiet(), progress=False)
    out = project / "out"
    assert result.finished == 4 and result.trained == 4
    for fold in range(2):
        cells = [cell_dir(out / f"seed{s}", "flat", BACKBONE, fold) for s in (0, 1)]
        assert read_json(cells[0] / "split.json") == read_json(cells[1] / "split.json")  # same folds
        configs = [yaml.safe_load((c / "config.yaml").read_text()) for c in cells]
        assert [(c["seed"], c["split_seed"]) for c in configs] == [(0, 0), (1, 0)]
        weights = [(c / "checkpoints" / "last.safetensors").read_bytes() for c in cells]
        assert weights[0] != weights[1]  # the training seed changed the model
        assert read_json(cells[1] / "cv_done.json")["seed"] == 1

    tables = read_json(out / "tables.json")
    assert tables["seeds"] == [0, 1] and tables["finished_cells"] == tables["total_cells"] == 4
    accuracy = next(r for r in tables["table2"]["images"] if r["metric"] == "accuracy")
    per_seed = [next(r for r in read_json(out / f"seed{s}" / "tables.json")["table2"]["images"]
                     if r["metric"] == "accuracy")["mean"] for s in (0, 1)]
    assert accuracy["seeds"] == pytest.approx(per_seed) and accuracy["n_seeds"] == 2
    assert "seed0/tables.md" in (out / "tables.md").read_text()

    trained: list[int] = []
    real_fit = engine.fit

    def recording_fit(fit_config, console=None, **kwargs):
        trained.append(fit_config.seed)
        return real_fit(fit_config, console, **kwargs)

    monkeypatch.setattr(engine, "fit", recording_fit)
    more = load_cv_config(write_config(project, "cv-seeds.yaml", seeds=[0, 1, 2], strategies=["flat"]))
    result = run_cv(more, quiet(), progress=False)
    assert trained == [2, 2]  # only the new seed's two folds
    assert result.finished == 6 and result.trained == 2
    assert read_json(out / "tables.json")["finished_cells"] == 6


def test_seeds_are_checked(project: Path):
    with pytest.raises(ConfigError, match="more than once"):
        load_cv_config(write_config(project, "cv-bad.yaml", seeds=[0, 0]))
    with pytest.raises(ConfigError, match="split_seed"):
        load_cv_config(write_config(project, "cv-bad.yaml", fit={"split_seed": 3}))
