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


def _hxe_installed() -> bool:
    from hiercls.plugins import loss_registrations

    return any(r.name == "hxe" for r in loss_registrations())


@pytest.mark.skipif(not _hxe_installed(), reason="needs the hiercls-hxe plugin (pip install -e plugins/hiercls-hxe)")
def test_a_model_with_its_own_loss_is_compared_pooled_over_folds_and_seeds(project: Path):
    config = load_cv_config(write_config(project, "cv-loss.yaml", out="out-loss", seeds=[0, 1],
                                         strategies=["flat", "joint+hxe"]))
    assert run_cv(config, console=quiet(), progress=False).finished
    out = project / "out-loss"
    cell = yaml.safe_load((cell_dir(out / "seed1", "joint+hxe", BACKBONE, 0) / "config.yaml").read_text())
    assert (cell["strategy"], cell["loss"], cell["seed"]) == ("joint", "hxe", 1)

    tables = read_json(out / "tables.json")
    images_per_seed = sum(1 for _ in (project / "data").rglob("*.jpg"))
    (row,) = tables["comparison"]
    assert (row["strategy"], row["reference"], row["fold_runs"]) == ("joint+hxe", "flat", 4)
    assert row["n_images"] == 2 * images_per_seed  # every image once per seed...
    groups = {p.name.split("_")[0] for p in (project / "data").rglob("*.jpg")}
    assert row["bootstrap"]["unit"] == "group" and row["bootstrap"]["n_units"] == len(groups)  # ...one cluster
    decisions = {r["node"] for r in tables["table3"]["images"] if r["strategy"] == "joint+hxe"}
    assert decisions == {"root", "Leukemia", "all"}
    text = (out / "tables.md").read_text()
    assert "pooled over the folds and the seeds" in text and "Table 3 over seeds" in text


@pytest.mark.parametrize("model, message", [("joint+nope", "unknown loss 'nope'"), ("joint+", "strategy\\+loss")])
def test_a_model_naming_a_bad_loss_is_refused(project: Path, model: str, message: str):
    with pytest.raises(ConfigError, match=message):
        load_cv_config(write_config(project, "cv-bad-loss.yaml", strategies=["flat", model]))
