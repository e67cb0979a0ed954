"""Reading data for a run trained with ``--exclude``, and manifests whose label column is misspelt."""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

import pytest

from hiercls.data import DataWarning, Exclusions, load_images, run_exclusions
from hiercls.errors import DataError

from conftest import write_smears

REPO = Path(__file__).resolve().parents[1]
LEUKEMIA = REPO / "taxonomy" / "leukemia.yaml"
LABELS = ("Normal", "Reactive", "ALL", "AML", "APML", "CLL", "CML")


def write_manifest_csv(folder: Path, header: list[str], rows: list[list[str]]) -> Path:
    path = folder / "manifest.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([header, *rows])
    return path


def _rows(class_folder: Path) -> list[list[str]]:
    return [[p.relative_to(class_folder).as_posix(), p.parent.name] for p in sorted(class_folder.rglob("*.png"))]


# -- a manifest without a 'label' column ----------------------------------------------------


def test_missing_label_column_warns_where_labels_are_optional(class_folder, tiny_taxonomy):
    manifest = write_manifest_csv(class_folder, ["path", "lable"], _rows(class_folder))
    with pytest.warns(DataWarning, match=r"no 'label' column \(found: 'path', 'lable'\).*'lable' meant to be 'label'"):
        table = load_images(manifest, tiny_taxonomy, require_labels=False)
    assert len(table) == 12 and all(label is None for label in table.labels)


def test_audit_counts_a_missing_label_column_as_a_problem(class_folder, tiny_taxonomy):
    from hiercls.data import audit

    manifest = write_manifest_csv(class_folder, ["path", "lable"], _rows(class_folder))
    with pytest.warns(DataWarning):
        table = load_images(manifest, tiny_taxonomy, require_labels=False, unknown_labels="keep")
    options = {"near_threshold": -1, "min_size": 1, "progress": False}
    assert audit(table, tiny_taxonomy, **options).problems() == {"manifest without a 'label' column": 1}
    paths_only = write_manifest_csv(class_folder, ["path"], [row[:1] for row in _rows(class_folder)])
    table = load_images(paths_only, tiny_taxonomy, require_labels=False, unknown_labels="keep")
    assert audit(table, tiny_taxonomy, **options).problems() == {}


def test_missing_label_column_is_an_error_where_labels_are_required(class_folder, tiny_taxonomy):
    manifest = write_manifest_csv(class_folder, ["path", "lable"], _rows(class_folder))
    with pytest.raises(DataError, match=r"missing column\(s\) label \(found: 'path', 'lable'\)"):
        load_images(manifest, tiny_taxonomy)


def test_a_manifest_of_paths_only_is_unlabelled_without_a_warning(class_folder, tiny_taxonomy):
    manifest = write_manifest_csv(class_folder, ["path"], [row[:1] for row in _rows(class_folder)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        table = load_images(manifest, tiny_taxonomy, require_labels=False)
    assert len(table) == 12 and all(label is None for label in table.labels)


def test_misspelt_group_column_warns(class_folder, tiny_taxonomy):
    rows = [row + ["P1"] for row in _rows(class_folder)]
    manifest = write_manifest_csv(class_folder, ["path", "label", "gruop"], rows)
    with pytest.warns(DataWarning, match=r"no 'group' column.*'gruop' meant to be 'group'"):
        table = load_images(manifest, tiny_taxonomy)
    assert not table.has_groups


def test_other_columns_are_still_read_without_a_word(class_folder, tiny_taxonomy):
    rows = [row + ["P1", "note"] for row in _rows(class_folder)]
    manifest = write_manifest_csv(class_folder, ["path", "label", "group", "comment"], rows)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        table = load_images(manifest, tiny_taxonomy)
    assert table.labels[0] == "cat" and table.groups[0] == "P1"


# -- labels of excluded nodes, in data ------------------------------------------------------


def test_images_of_excluded_nodes_are_unlabelled_or_dropped(class_folder, tiny_taxonomy):
    reduced = tiny_taxonomy.exclude(["animal"])
    with pytest.raises(DataError, match="not in taxonomy"):
        load_images(class_folder, reduced, require_labels=False)  # what a run without exclusions says
    excluded = Exclusions(("animal",), tiny_taxonomy)
    with pytest.warns(DataWarning, match=r"6 image\(s\) labelled under .*--exclude animal.*'cat' x3, 'dog' x3.*predicted"):
        table = load_images(class_folder, reduced, require_labels=False, excluded=excluded)
    assert len(table) == 12 and sum(label is None for label in table.labels) == 6
    with pytest.warns(DataWarning, match=r"'cat' x3, 'dog' x3; they are left out of the scores"):
        table = load_images(class_folder, reduced, require_labels=False, excluded=excluded, excluded_rows="drop")
    assert sorted(set(table.labels)) == ["flower", "tree"] and len(table) == 6


def test_run_exclusions_reads_the_original_tree_only_when_it_matches(tiny_taxonomy_file, tiny_taxonomy, tmp_path):
    reduced = tiny_taxonomy.exclude(["animal"])
    assert run_exclusions(tiny_taxonomy_file, [], reduced) is None
    assert run_exclusions(tiny_taxonomy_file, ["animal"], reduced).excluded_node("kitty") == "animal"
    other = tiny_taxonomy.exclude(["plant"])  # the file no longer gives the run's tree
    fallback = run_exclusions(tiny_taxonomy_file, ["animal"], other)
    assert fallback.full is None and fallback.excluded_node("animal") == "animal"
    assert fallback.excluded_node("cat") is None
    gone = run_exclusions(tmp_path / "moved.yaml", ["animal"], reduced)
    assert gone.full is None


def test_unknown_label_error_names_the_exclusion_when_the_original_tree_is_gone(class_folder, tiny_taxonomy, tmp_path):
    reduced = tiny_taxonomy.exclude(["animal"])
    excluded = run_exclusions(tmp_path / "moved.yaml", ["animal"], reduced)
    with pytest.raises(DataError, match=r"trained without animal \(--exclude\).*moved.yaml cannot be read"):
        load_images(class_folder, reduced, require_labels=False, excluded=excluded)


# -- a run trained with --exclude, end to end ----------------------------------------------


@pytest.fixture(scope="module")
def excluded_run(tmp_path_factory) -> tuple[Path, Path]:
    from hiercls.config import load_config
    from hiercls.engine import fit

    base = tmp_path_factory.mktemp("excluded")
    smears = write_smears(base / "data", LABELS, per_label=3, seed=0)
    run = base / "run"
    config = load_config(None, {
        "taxonomy": str(LEUKEMIA), "data": str(smears), "out": str(run), "backbone": "test_resnet",
        "img_size": 16, "epochs": 1, "batch_size": 8, "strategy": "flat", "exclude": ["Reactive"],
        "group_regex": r"^(slide\d+)_", "val_fraction": 0.34, "cache_dir": str(base / "cache"), "device": "cpu",
    })
    fit(config, progress=False)
    return run, smears


def test_predict_keeps_images_of_an_excluded_node(excluded_run, tmp_path, capsys):
    from hiercls.cli import main

    run, smears = excluded_run
    out = tmp_path / "pred.csv"
    assert main(["predict", "--run", str(run), "--data", str(smears), "--out", str(out), "--device", "cpu",
                 "--no-progress"]) == 0
    assert "'Reactive' x3" in capsys.readouterr().err.replace("\n", "")
    with out.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(LABELS) * 3
    assert all(not row["label"] for row in rows if "/Reactive/" in row["path"])


def test_evaluate_leaves_out_images_of_an_excluded_node(excluded_run):
    from hiercls.evaluation import evaluate_run

    run, smears = excluded_run
    with pytest.warns(DataWarning, match=r"'Reactive' x3; they are left out of the scores"):
        evaluation = evaluate_run(run, data=smears, device="cpu")
    assert len(evaluation.predictions.paths) == (len(LABELS) - 1) * 3
    assert not any("/Reactive/" in p for p in evaluation.predictions.paths)
    with pytest.warns(DataWarning, match="'Reactive' x3"):
        val = evaluate_run(run, split="val", device="cpu")  # the run's own data, as calibrate reads it
    assert 0 < len(val.predictions.paths) < (len(LABELS) - 1) * 3


def test_evaluate_names_the_missing_label_column(excluded_run, tmp_path):
    from hiercls.evaluation import evaluate_run

    run, smears = excluded_run
    rows = [[p.relative_to(smears).as_posix(), p.parent.name] for p in sorted(smears.rglob("*.jpg"))]
    manifest = write_manifest_csv(smears, ["path", "lable"], rows)
    try:
        with pytest.warns(DataWarning), pytest.raises(DataError, match=r"no 'label' column \(found: 'path', 'lable'\)"):
            evaluate_run(run, data=manifest, device="cpu")
    finally:
        manifest.unlink()


def test_calibrate_reads_the_validation_images_of_a_run_with_exclusions(excluded_run):
    from hiercls.calibration import _validation_table
    from hiercls.inference import load_run, read_run_split

    run, _ = excluded_run
    with pytest.warns(DataWarning, match="'Reactive' x3"):
        table = _validation_table(load_run(run, "best", calibrated=False), run)
    assert {str(p.resolve()) for p in table.paths} == read_run_split(run)["val"]
