"""``hiercls cv``: the grid runs, the tables agree with the folds, restarts skip finished cells, config errors."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from rich.console import Console

from hiercls import cv, engine
from hiercls.cli import build_parser, main
from hiercls.cli.cv import overrides_from_args
from hiercls.cv import cell_dir, load_cv_config, run_cv, safe_name
from hiercls.errors import ConfigError, TaxonomyError
from hiercls.taxonomy import load_taxonomy

REPO = Path(__file__).resolve().parents[1]
LABELS = ("Normal", "Reactive", "ALL", "CML")
MINI_TREE = """\
name: mini
root: root
children:
  - Normal
  - Reactive
  - name: Leukemia
    children: [ALL, CML]
"""
BACKBONE = "test_resnet"


def write_slides(root: Path, groups_per_label: int = 3, per_group: int = 2) -> None:
    """Tiny JPEG smears ``data/<label>/s<label><g>_<k>.jpg``: a colour per label, a group per slide."""
    rng = np.random.default_rng(0)
    for li, label in enumerate(LABELS):
        for g in range(groups_per_label):
            for k in range(per_group):
                base = np.array([60 * li, 200 - 40 * li, 100 + 10 * g], dtype=np.float64)
                pixels = np.clip(base + rng.normal(0, 20, (16, 16, 3)), 0, 255).astype(np.uint8)
                path = root / "data" / label / f"s{li}{g}_{k}.jpg"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels).save(path, quality=90)


def write_config(folder: Path, name: str = "cv.yaml", **changes) -> Path:
    """A cv config with paths relative to ``folder`` (where the tree and the images are)."""
    options = {
        "taxonomy": "mini.yaml", "data": "data", "out": "out", "folds": 2, "seed": 0,
        "group_regex": r"^(s\d+)_", "strategies": ["flat", "joint"], "backbones": [BACKBONE],
        "fit": {"img_size": 16, "epochs": 1, "batch_size": 8, "lr": 1e-3, "device": "cpu", "cache_dir": "cache"},
    }
    options.update(changes)
    path = folder / name
    path.write_text(yaml.safe_dump(options, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cvproject")
    (folder / "mini.yaml").write_text(MINI_TREE, encoding="utf-8")
    write_slides(folder)
    return folder


@pytest.fixture(scope="module")
def finished(project: Path) -> Path:
    """The 2 strategies x 1 backbone x 2 folds grid, run through the command line."""
    config = write_config(project)
    assert main(["cv", "--config", str(config), "--no-progress"]) == 0
    return project / "out"


def quiet() -> Console:
    return Console(file=io.StringIO(), width=160)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


CELLS = [(s, k) for k in range(2) for s in ("flat", "joint")]


# -- a finished grid --------------------------------------------------------------------------


def test_every_cell_is_trained_scored_and_marked_done(finished: Path):
    for strategy, fold in CELLS:
        run = cell_dir(finished, strategy, BACKBONE, fold)
        done = read_json(run / "cv_done.json")
        assert (done["strategy"], done["fold"], done["checkpoint"]) == (strategy, fold, "last")
        metrics = read_json(run / "metrics.json")
        held_out = read_json(run / "split.json")["val"]
        assert metrics["n_images"] == len(held_out) > 0
        assert metrics["cv"]["checkpoint"] == "last"
        assert metrics["cv"]["epoch"] == read_json(run / "checkpoints" / "last.json")["epoch"]
        assert metrics["groups"]["n_groups"] == len({Path(p).name.split("_")[0] for p in held_out})
        lines = (run / "predictions.csv").read_text().splitlines()
        assert len(lines) == len(held_out) + 1 and lines[0].startswith("path,label,group,prediction,p:")


def test_metrics_json_agrees_with_the_predictions_csv(finished: Path):
    from hiercls.metrics import evaluate_predictions
    from hiercls.predictions import read_predictions_csv
    from hiercls.taxonomy import load_taxonomy

    run = cell_dir(finished, "joint", BACKBONE, 1)
    taxonomy = load_taxonomy(run / "taxonomy.yaml")
    preds = read_predictions_csv(run / "predictions.csv", taxonomy)
    again = evaluate_predictions(taxonomy, preds.labels, preds.predictions, preds.probs)
    stored = read_json(run / "metrics.json")
    for key in ("accuracy", "macro_f1", "hF"):
        assert stored[key] == pytest.approx(again[key])
    assert stored["auroc"]["leaf_macro"] == pytest.approx(again["auroc"]["leaf_macro"], abs=1e-4)


def test_every_model_of_a_fold_gets_the_same_grouped_split(finished: Path):
    vals = {}
    for strategy, fold in CELLS:
        vals[(strategy, fold)] = set(read_json(cell_dir(finished, strategy, BACKBONE, fold) / "split.json")["val"])
    assert vals[("flat", 0)] == vals[("joint", 0)] and vals[("flat", 1)] == vals[("joint", 1)]
    assert not vals[("flat", 0)] & vals[("flat", 1)]
    assert len(vals[("flat", 0)] | vals[("flat", 1)]) == len(LABELS) * 3 * 2
    groups = [{Path(p).name.split("_")[0] for p in vals[("flat", k)]} for k in range(2)]
    assert not groups[0] & groups[1]


def test_table2_rows_and_numbers_match_the_fold_metrics(finished: Path):
    tables = read_json(finished / "tables.json")
    assert tables["finished_cells"] == tables["total_cells"] == 4
    assert set(tables["table2"]) == {"images", "groups"}
    getters = {
        "accuracy": lambda m: m["accuracy"], "macro_f1": lambda m: m["macro_f1"],
        "auroc": lambda m: m["auroc"]["leaf_macro"], "hF": lambda m: m["hF"],
    }
    for level in ("images", "groups"):
        rows = tables["table2"][level]
        assert {(r["strategy"], r["metric"]) for r in rows} == {(s, m) for s in ("flat", "joint") for m in getters}
        for r in rows:
            per_fold = [read_json(cell_dir(finished, r["strategy"], BACKBONE, k) / "metrics.json") for k in range(2)]
            if level == "groups":
                per_fold = [m["groups"] for m in per_fold]
            expected = [getters[r["metric"]](m) for m in per_fold]
            assert r["folds"] == pytest.approx(expected)
            assert r["mean"] == pytest.approx(np.mean(expected))
            assert r["std"] == pytest.approx(np.std(expected, ddof=1))
    markdown = (finished / "tables.md").read_text()
    flat_acc = next(r for r in tables["table2"]["images"] if r["strategy"] == "flat" and r["metric"] == "accuracy")
    assert f"| flat / {BACKBONE} | ACC | {flat_acc['folds'][0]:.3f} | {flat_acc['folds'][1]:.3f} |" in markdown
    assert "std is the sample standard deviation" in markdown and "last" in markdown


def test_table3_scores_each_decision_on_its_subtree_and_adds_all_classes(finished: Path):
    tables = read_json(finished / "tables.json")
    per_fold = {s: [read_json(cell_dir(finished, s, BACKBONE, k) / "metrics.json") for k in range(2)]
                for s in ("flat", "joint")}
    rows3 = tables["table3"]["images"]
    assert [(r["node"], r["decision"]) for r in rows3 if r["strategy"] == "flat"] == [
        ("root", "Normal vs Reactive vs Leukemia"), ("Leukemia", "ALL vs CML"), ("all", "All 4 classes")]
    for r in rows3:
        source = per_fold[r["strategy"]]
        values = ([m["accuracy"] for m in source] if r["node"] == "all"
                  else [m["decision_accuracy"][r["node"]] for m in source])
        assert r["folds"] == values and r["mean"] == pytest.approx(np.mean(values))
    for r in tables["table3_end_to_end"]["images"]:
        values = [m["per_level_accuracy"][r["node"]] for m in per_fold[r["strategy"]]]
        assert r["mean"] == pytest.approx(np.mean(values)) and r["metric"] == "per_level_accuracy"
    assert {r["node"] for r in tables["table3"]["groups"]} == {"root", "Leukemia", "all"}
    markdown = (finished / "tables.md").read_text()
    assert "## Table 3: accuracy of each decision on its own subtree" in markdown
    assert "| model | root: Normal vs Reactive vs Leukemia | Leukemia: ALL vs CML | All 4 classes |" in markdown
    assert "## End-to-end accuracy at each decision" in markdown
    # the tree cut at depth 1 (Normal | Reactive | Leukemia); depth 2 is Table 2's ACC
    rows_depth = tables["depth_accuracy"]["images"]
    assert {(r["depth"], r["classes"]) for r in rows_depth} == {(1, 3)}
    for r in rows_depth:
        values = [m["depth_accuracy"]["1"] for m in per_fold[r["strategy"]]]
        assert r["mean"] == pytest.approx(np.mean(values))
    assert "| model | depth 1 (3 classes) |" in markdown


def test_table1_gives_macro_f1_per_backbone(finished: Path):
    tables = read_json(finished / "tables.json")
    for r in tables["table1"]["images"]:
        values = [read_json(cell_dir(finished, r["strategy"], BACKBONE, k) / "metrics.json")["macro_f1"]
                  for k in range(2)]
        assert r["metric"] == "macro_f1" and r["folds"] == values
    assert "## Table 1: macro-F1 per backbone" in (finished / "tables.md").read_text()
    assert "| backbone | flat | joint |" in (finished / "tables.md").read_text()


def test_table4_averages_the_folds_and_pools_their_counts(finished: Path):
    tables = read_json(finished / "tables.json")
    per_fold = {s: [read_json(cell_dir(finished, s, BACKBONE, k) / "metrics.json") for k in range(2)]
                for s in ("flat", "joint")}
    rows4 = tables["table4"]
    assert {r["node"] for r in rows4} == {"Normal", "Reactive", "Leukemia", "ALL", "CML"}
    for r in rows4:
        recalls = [m["per_class"][r["node"]]["recall"] for m in per_fold[r["strategy"]]]
        assert r["recall"] == pytest.approx(np.mean([v for v in recalls if v is not None]))
        assert r["support"] == sum(m["per_class"][r["node"]]["support"] for m in per_fold[r["strategy"]])
        assert r["pooled"]["tp"] + r["pooled"]["fn"] == r["support"]
    assert "pooled precision" in (finished / "tables.md").read_text()


def _csv_rows(run: Path) -> list[tuple[str, str]]:
    import csv

    with open(run / "predictions.csv", newline="", encoding="utf-8") as handle:
        return [(row["label"], row["prediction"]) for row in csv.DictReader(handle)]


def test_table4_merged_row_is_pooled_over_the_folds(finished: Path):
    config = load_cv_config(finished.parent / "cv.yaml", {"table4_rows": {"Normal": "Normal", "ALL+CML": ["ALL", "CML"]}})
    tables = cv.build_tables(config, cv.collect_cells(config), finished)
    rows = [r for r in tables["table4"] if r["strategy"] == "joint"]
    assert [(r["node"], r["nodes"]) for r in rows] == [("Normal", ["Normal"]), ("ALL+CML", ["ALL", "CML"])]
    merged = rows[1]
    pairs = [pair for k in range(2) for pair in _csv_rows(cell_dir(finished, "joint", BACKBONE, k))]
    leukemia = {"ALL", "CML"}
    tp = sum(t in leukemia and p in leukemia for t, p in pairs)
    fp = sum(t not in leukemia and p in leukemia for t, p in pairs)
    fn = sum(t in leukemia and p not in leukemia for t, p in pairs)
    assert (merged["pooled"]["tp"], merged["pooled"]["fp"], merged["pooled"]["fn"]) == (tp, fp, fn)
    assert merged["pooled"]["recall"] == pytest.approx(tp / (tp + fn))
    assert merged["pooled"]["precision"] == (pytest.approx(tp / (tp + fp)) if tp + fp else None)
    assert merged["support"] == tp + fn
    assert "&nbsp;&nbsp;ALL+CML | " in cv.render_tables_markdown(tables)


@pytest.mark.parametrize("rows, message", [
    ({"AML+APML": ["AML", "APML"]}, r"'table4_rows.AML\+APML': 'AML' is not a node of"),
    ({"R": "Reactive"}, "'table4_rows.R': 'Reactive' is excluded"),
    ({"R": []}, "needs a name and one or more node names"),
    ({}, "names no row"),
])
def test_table4_rows_are_checked_against_the_tree(project: Path, rows: dict, message: str):
    path = write_config(project, "cv-rows.yaml", exclude=["Reactive"], table4_rows=rows)
    with pytest.raises(ConfigError, match=message):
        load_cv_config(path)


def test_a_finished_grid_is_not_retrained(finished: Path, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("a finished cell was trained again")

    monkeypatch.setattr(engine, "fit", no_training)
    out = io.StringIO()
    result = run_cv(load_cv_config(finished.parent / "cv.yaml"), Console(file=out, width=160), progress=False)
    assert result.finished == 4 and result.trained == 0
    assert "skipped" in out.getvalue()


# -- restarts ---------------------------------------------------------------------------------


def snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.rglob("*") if p.is_file()}


def test_restart_skips_finished_cells_and_resumes_the_interrupted_one(project: Path, monkeypatch):
    config = load_cv_config(write_config(project, "cv-restart.yaml", out="out-restart"))
    real_fit = engine.fit
    calls: list[tuple[str, int, dict]] = []

    def crash_after_second_training(fit_config, console=None, **kwargs):
        calls.append((fit_config.strategy, fit_config.fold, kwargs))
        run = real_fit(fit_config, console, **kwargs)
        if len(calls) == 2:
            raise RuntimeError("simulated crash after training the second cell")
        return run

    monkeypatch.setattr(engine, "fit", crash_after_second_training)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_cv(config, quiet(), progress=False)
    out = Path(config.out)
    first, second = cell_dir(out, "flat", BACKBONE, 0), cell_dir(out, "joint", BACKBONE, 0)
    assert (first / "cv_done.json").is_file() and not (second / "cv_done.json").exists()
    assert (second / "checkpoints" / "last.json").is_file()
    assert read_json(out / "tables.json")["finished_cells"] == 1  # partial results are visible
    before = snapshot(first)

    from hiercls import inference

    calls.clear()
    checkpoints: list[str] = []
    real_load_run = inference.load_run

    def recording_fit(fit_config, console=None, **kwargs):
        calls.append((fit_config.strategy, fit_config.fold, kwargs))
        return real_fit(fit_config, console, **kwargs)

    def recording_load_run(run_dir, which="best"):
        checkpoints.append(which)
        return real_load_run(run_dir, which)

    monkeypatch.setattr(engine, "fit", recording_fit)
    monkeypatch.setattr(inference, "load_run", recording_load_run)
    log = io.StringIO()
    result = run_cv(config, Console(file=log, width=160), progress=False)
    assert [(s, k, kw["resume"]) for s, k, kw in calls] == [("joint", 0, True), ("flat", 1, False), ("joint", 1, False)]
    assert checkpoints == ["last"] * 3
    assert snapshot(first) == before
    assert result.finished == 4 and result.trained == 3
    assert "1 of 4 cells already finished: skipped" in log.getvalue()
    assert read_json(out / "tables.json")["finished_cells"] == 4


def test_ctrl_c_in_a_cell_stops_the_grid_without_marking_the_cell(project: Path, tmp_path: Path, monkeypatch):
    def interrupted_fit(fit_config, console=None, **kwargs):
        return engine.RunResult(Path(fit_config.out), 0, None, "val_hF", None, interrupted=True)

    monkeypatch.setattr(engine, "fit", interrupted_fit)
    log = io.StringIO()
    config = load_cv_config(write_config(project, "cv-int.yaml", out=str(tmp_path / "out")))
    result = run_cv(config, Console(file=log, width=160), progress=False)
    assert result.interrupted and result.finished == 0 and len(result.cells) == 4
    assert all(c.status == "pending" for c in result.cells)
    assert not (cell_dir(tmp_path / "out", "flat", BACKBONE, 0) / "cv_done.json").exists()
    assert "run the same command again" in log.getvalue()
    assert read_json(tmp_path / "out" / "tables.json")["finished_cells"] == 0


def test_cell_states(tmp_path: Path):
    run = tmp_path / "cell"
    assert cv._cell_state(run) == "new"
    (run / "checkpoints").mkdir(parents=True)  # what a run that failed before its first write leaves
    assert cv._cell_state(run) == "new" and not (run / "checkpoints").exists()
    (run / "config.yaml").write_text("strategy: flat\n")
    assert cv._cell_state(run) == "restart"
    (run / "cv_done.json").write_text("{}")
    assert cv._cell_state(run) == "done"
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("my own file")
    with pytest.raises(ConfigError, match="did not make"):
        cv._cell_state(other)


def test_changed_settings_or_a_foreign_out_folder_are_refused(finished: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setattr(engine, "fit", lambda *a, **k: pytest.fail("must fail before training"))
    changed = load_cv_config(finished.parent / "cv.yaml", {"fit": {"lr": 0.5}})
    with pytest.raises(ConfigError, match=r"other settings \(fit.lr: 0.001 -> 0.5\)"):
        run_cv(changed, quiet(), progress=False)
    foreign = tmp_path / "results"
    foreign.mkdir()
    (foreign / "tables.md").write_text("my notes")
    with pytest.raises(ConfigError, match="not a hiercls cv folder"):
        run_cv(load_cv_config(finished.parent / "cv.yaml", {"out": str(foreign)}), quiet(), progress=False)
    assert (foreign / "tables.md").read_text() == "my notes"


# -- exclusion --------------------------------------------------------------------------------


def test_excluded_node_leaves_the_tree_the_training_and_the_evaluation(project: Path):
    config = load_cv_config(write_config(project, "cv-excl.yaml", out="out-excl", strategies=["flat"], exclude=["Reactive"]))
    assert config.fit_config("flat", BACKBONE, 0).exclude == ["Reactive"]
    run_cv(config, quiet(), progress=False)
    out = project / "out-excl"
    for fold in range(2):
        run = cell_dir(out, "flat", BACKBONE, fold)
        assert "Reactive" not in (run / "taxonomy.yaml").read_text()
        split = read_json(run / "split.json")
        assert split["val"] and not any("/Reactive/" in p for p in split["train"] + split["val"])
        header = (run / "predictions.csv").read_text().splitlines()[0]
        assert "p:Normal" in header and "p:Reactive" not in header
    tables = read_json(out / "tables.json")
    assert tables["settings"]["exclude"] == ["Reactive"]
    assert {r["node"] for r in tables["table4"]} == {"Normal", "Leukemia", "ALL", "CML"}
    root = next(r for r in tables["table3"]["images"] if r["node"] == "root")
    assert root["decision"] == "Normal vs Leukemia"
    assert "without Reactive" in (out / "tables.md").read_text()


# -- configuration ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"epochs": 3}, "option 'epochs': unknown option"),
        ({"fit": {"strategy": "flat"}}, "use top-level 'strategies'"),
        ({"fit": {"lrr": 0.1}}, "unknown fit option(s) lrr"),
        ({"fit": {"lr": -1}}, "option 'fit.lr'"),
        ({"strategies": ["flat", "tree"]}, "option 'strategies': unknown strategy 'tree'"),
        ({"strategies": ["flat", "flat"]}, "more than once"),
        ({"folds": 1}, "option 'folds'"),
        ({"fit": {"strategy_options": {"feed_parent": False}}}, "put it under strategy_options.joint"),
        ({"group_regex": "(unclosed"}, "invalid regular expression"),
    ],
)
def test_config_errors_name_the_file_and_the_option(tmp_path: Path, changes: dict, message: str):
    path = write_config(tmp_path, **changes)
    with pytest.raises(ConfigError) as info:
        load_cv_config(path)
    assert str(path) in str(info.value) and message in str(info.value)


def test_command_line_errors_and_missing_files(tmp_path: Path, capsys):
    path = write_config(tmp_path)
    with pytest.raises(ConfigError, match="command-line option --folds"):
        load_cv_config(path, {"folds": 1})
    with pytest.raises(ConfigError, match="command-line option --device: 'gpu' is not a device"):
        load_cv_config(path, {"fit": {"device": "gpu"}})
    with pytest.raises(ConfigError, match="config file not found"):
        load_cv_config(tmp_path / "nope.yaml")
    assert main(["cv", "--config", str(path), "--strategies", "flat,bogus"]) == 2
    assert "--strategies" in capsys.readouterr().err


def test_problems_found_before_any_training(project: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setattr(engine, "fit", lambda *a, **k: pytest.fail("must fail before training"))
    config = load_cv_config(write_config(project, "cv-bad.yaml", out=str(tmp_path / "o1"), exclude=["Nope"]))
    with pytest.raises(TaxonomyError, match="Nope"):
        run_cv(config, quiet(), progress=False)
    weights = {"fit": {"pretrained": {BACKBONE: "weights/missing.safetensors"}}}
    config = load_cv_config(project / "cv-bad.yaml", {"exclude": [], "out": str(tmp_path / "o2"), **weights})
    with pytest.raises(ConfigError, match="never downloads"):
        run_cv(config, quiet(), progress=False)
    (tmp_path / "mini.yaml").write_text(MINI_TREE, encoding="utf-8")
    config = load_cv_config(write_config(tmp_path, data="no-such-folder", out="o3"))
    with pytest.raises(ConfigError, match="option 'data'"):
        run_cv(config, quiet(), progress=False)
    assert not any((tmp_path / name).exists() for name in ("o1", "o2", "o3"))


def test_relative_paths_resolve_against_the_config_folder(tmp_path: Path, monkeypatch):
    folder = tmp_path / "configs" / "sub"
    folder.mkdir(parents=True)
    path = write_config(folder, taxonomy="../mini.yaml", data="../../images", out="results",
                        fit={"pretrained": {"resnet18": "w/r18.safetensors", "other": "/abs/x.safetensors"},
                             "cache_dir": "c"})
    monkeypatch.chdir(tmp_path)
    config = load_cv_config(path)
    assert config.taxonomy == (tmp_path / "configs" / "mini.yaml").resolve()
    assert config.data == (tmp_path / "images").resolve()
    assert config.out == (folder / "results").resolve()
    assert config.fit["pretrained"] == {"resnet18": str((folder / "w" / "r18.safetensors").resolve()),
                                        "other": "/abs/x.safetensors"}
    assert config.pretrained_for("resnet18") == (folder / "w" / "r18.safetensors").resolve()
    assert config.pretrained_for(BACKBONE) is None
    assert config.fit["cache_dir"] == str((folder / "c").resolve())
    # command-line paths stay relative to the working directory
    assert load_cv_config(path, {"out": "elsewhere"}).out == Path("elsewhere")


def test_command_line_overrides_and_help(capsys):
    parser = build_parser()
    args = parser.parse_args(["cv", "--config", "c.yaml", "--strategies", "flat, joint", "--backbones", "a,b",
                              "--epochs", "3", "--device", "cpu", "--exclude", "Reactive", "--folds", "4"])
    assert overrides_from_args(args) == {
        "folds": 4, "exclude": ["Reactive"], "strategies": ["flat", "joint"], "backbones": ["a", "b"],
        "fit": {"epochs": 3, "device": "cpu"},
    }
    assert overrides_from_args(parser.parse_args(["cv", "--config", "c.yaml"])) == {}
    with pytest.raises(SystemExit) as info:
        parser.parse_args(["cv", "--help"])
    assert info.value.code == 0 and "examples:" in capsys.readouterr().out


def test_backbone_folder_names_are_safe_and_distinct():
    assert safe_name("hf-hub:timm/vit_small_patch16_384") == "hf-hub_timm_vit_small_patch16_384"
    assert cell_dir("OUT", "joint", "convnext_tiny", 3) == Path("OUT/joint__convnext_tiny/fold3")
    with pytest.raises(ValueError, match="same folder name"):
        cv.CVConfig(taxonomy="t", data="d", out="o", backbones=["a/b", "a:b"])


def test_shipped_configs_are_valid():
    suite = load_cv_config(REPO / "examples" / "leukemia" / "cv.yaml")
    assert suite.strategies == ["flat", "per_node", "joint"] and suite.folds == 5
    assert suite.backbones == ["vit_small_patch16_384", "convnext_tiny"]
    vit = suite.fit_config("joint", "vit_small_patch16_384", 4)
    assert (vit.img_size, vit.epochs, vit.optimizer, vit.loss) == (384, 80, "adamw", "focal")
    assert vit.pretrained is not None and "vit_small_patch16_384" in str(vit.pretrained)
    assert suite.fit_config("flat", "convnext_tiny", 0).strategy_options == {}
    without = load_cv_config(REPO / "examples" / "leukemia" / "cv-without-reactive.yaml")
    assert without.exclude == ["Reactive"] and without.strategies == suite.strategies
    merged = ("Normal", "Reactive", "ALL", "AML+APML", "CLL", "CML")
    assert [name for name, _ in suite.table4_rows_for(cv._table_taxonomy(suite))] == list(merged)
    assert dict(without.table4_rows_for(cv._table_taxonomy(without)))["AML+APML"] == ("AML", "APML")
    paper = load_cv_config(REPO / "examples" / "leukemia" / "cv-paper-stated.yaml")
    stated = paper.fit_config("joint", "vit_small_patch16_384", 0)
    assert (stated.optimizer, stated.img_size, stated.scheduler, stated.augment.hflip) == ("adamw", 384, "none", False)
    assert paper.folds == 5 and paper.aggregator == "mode" and paper.group_by_available is True
    cpu = load_cv_config(REPO / "examples" / "blood-cells" / "cv-cpu.yaml")
    assert cpu.data == (REPO.parent / "shared" / "data" / "blood-cells" / "manifest.csv").resolve()
    assert cpu.taxonomy == (REPO / "taxonomy" / "blood-cells.yaml").resolve()
    assert cpu.strategies == ["flat", "per_node", "per_level", "joint"] and cpu.folds == 3
    assert cpu.fit_config("per_level", "resnet18", 2).img_size == 64


def test_a_cell_validates_once_after_its_last_epoch_unless_asked(project: Path):
    """The tables score the last checkpoint: per-epoch validation would only cost time."""
    config = load_cv_config(write_config(project, "cv-val.yaml", fit={"epochs": 7, "device": "cpu"}))
    assert config.fit_config("joint", BACKBONE, 0).val_every == 7
    curves = load_cv_config(write_config(project, "cv-val1.yaml", fit={"epochs": 7, "val_every": 1}))
    assert curves.fit_config("joint", BACKBONE, 1).val_every == 1
    assert load_cv_config(write_config(project, "cv-val0.yaml", fit={})).fit_config("flat", BACKBONE, 0).val_every == 10


def test_table1_config_validates_without_training():
    """The paper's backbone comparison: flat 7-class on six backbones, Adam, parsed and checked only."""
    table1 = load_cv_config(REPO / "examples" / "leukemia" / "cv-table1.yaml")
    assert table1.strategies == ["flat"] and table1.folds == 5
    assert table1.backbones == ["tv/resnet18", "tv/resnet50", "tv/googlenet", "tv/densenet121",
                                "convnext_tiny", "vit_small_patch16_384"]
    for backbone in table1.backbones:
        fit = table1.fit_config("flat", backbone, 0)
        assert fit.optimizer == "adam" and fit.loss in ("focal", "weighted_ce") and fit.img_size == 384
        assert fit.pretrained is not None and safe_name(backbone) in str(fit.pretrained).replace("/", "_")
    assert len(cv._table_taxonomy(table1).leaves) == 7


def test_comparison_table_pairs_each_strategy_with_the_reference_on_the_same_images(finished: Path):
    """joint against flat, pooled over both folds: McNemar's counts recomputed from the cells' CSVs."""
    from hiercls.predictions import read_predictions_csv

    tables = read_json(finished / "tables.json")
    (row,) = tables["comparison"]
    assert (row["strategy"], row["reference"], row["folds"]) == ("joint", "flat", 2)
    taxonomy = load_taxonomy(finished.parent / "mini.yaml")
    only_flat = only_joint = images = 0
    for fold in range(2):
        flat = read_predictions_csv(cell_dir(finished, "flat", BACKBONE, fold) / "predictions.csv", taxonomy)
        joint = read_predictions_csv(cell_dir(finished, "joint", BACKBONE, fold) / "predictions.csv", taxonomy)
        joint_pred = dict(zip(joint.paths, joint.predictions))
        for path, label, pred in zip(flat.paths, flat.labels, flat.predictions):
            images += 1
            only_flat += pred == label != joint_pred[path]
            only_joint += joint_pred[path] == label != pred
    assert row["n_images"] == images
    assert (row["mcnemar"]["b"], row["mcnemar"]["c"]) == (only_flat, only_joint)
    assert row["bootstrap"]["unit"] == "group"  # slides are resampled, not images
    accuracy = row["metrics"]["accuracy"]
    assert accuracy["difference"] == pytest.approx(accuracy["B"] - accuracy["A"])
    assert "Does the tree pay?" in (finished / "tables.md").read_text(encoding="utf-8")
