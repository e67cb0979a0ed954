"""Per-node temperature scaling: fitting, applying, measuring, RUN/calibration.json and the commands."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from hiercls.calibration import (
    CALIBRATION_FILE,
    apply_temperatures,
    calibration_metrics,
    fit_calibration,
    fit_temperatures,
    paths_digest,
    read_calibration,
    reliability_bins,
    write_calibration,
)
from hiercls.cli import main
from hiercls.errors import CheckpointError, ConfigError, DataError
from hiercls.probabilities import NodeProbabilities
from hiercls.taxonomy import Taxonomy

from conftest import write_smears  # noqa: E402

TREE = {"animal": {"cat": {}, "dog": {}}, "plant": {"tree": {}, "flower": {}}}


@pytest.fixture(scope="module")
def tree() -> Taxonomy:
    return Taxonomy.from_nested(TREE)


def synthetic(tree: Taxonomy, power: float, n: int = 1500, seed: int = 0):
    """Labels drawn from calibrated conditionals q, and the probabilities q**power renormalised.

    ``power`` > 1 makes the model overconfident (the fitted T should come out near ``power``);
    ``power`` = 1 is a calibrated model.
    """
    rng = np.random.default_rng(seed)
    true_cond = np.ones((n, tree.num_nodes))
    for node in tree.internal_nodes:
        q = rng.uniform(0.5, 0.95, n)
        flip = rng.random(n) < 0.5
        first = np.where(flip, q, 1 - q)
        true_cond[:, tree.children_indices(node)] = np.stack([first, 1 - first], axis=1)
    labels = []
    for i in range(n):
        node = tree.root
        while not tree.is_leaf(node):
            children = tree.children_indices(node)
            node = tree.nodes[children[rng.choice(len(children), p=true_cond[i, children])]]
        labels.append(node)
    shown = true_cond.copy()
    for node in tree.internal_nodes:
        children = tree.children_indices(node)
        sharp = true_cond[:, children] ** power
        shown[:, children] = sharp / sharp.sum(axis=1, keepdims=True)
    return NodeProbabilities.from_conditionals(tree, shown), labels


# -- fitting and applying -----------------------------------------------------------------------


def test_overconfident_model_gets_t_above_one_and_lower_ece(tree):
    probs, labels = synthetic(tree, power=3.0)
    temperatures = fit_temperatures(tree, probs, labels)
    assert set(temperatures) == set(tree.internal_nodes)
    for node, t in temperatures.items():
        assert 2.0 < t < 4.5, (node, t)
    after = apply_temperatures(probs, temperatures)
    measured = calibration_metrics(tree, labels, probs, after, temperatures=temperatures)
    for key in ("overall", "depth 1", "depth 2"):
        assert measured["ece_after"][key] < measured["ece_before"][key] / 2, key
    assert measured["temperatures"] == temperatures
    assert measured["n_images"] == len(labels)
    assert sum(b["count"] for b in measured["reliability"]["after"]) == len(labels)


def test_calibrated_model_stays_near_one(tree):
    probs, labels = synthetic(tree, power=1.0, seed=1)
    for node, t in fit_temperatures(tree, probs, labels).items():
        assert 0.8 < t < 1.25, (node, t)


def test_underconfident_model_gets_t_below_one(tree):
    probs, labels = synthetic(tree, power=0.5, seed=2)
    assert all(t < 0.8 for t in fit_temperatures(tree, probs, labels).values())


def test_apply_with_t_one_is_identity_and_keeps_decisions(tree):
    probs, labels = synthetic(tree, power=2.0, n=200)
    same = apply_temperatures(probs, {node: 1.0 for node in tree.internal_nodes})
    np.testing.assert_allclose(same.conditional, probs.conditional, atol=1e-12)
    np.testing.assert_allclose(same.marginal, probs.marginal, atol=1e-12)
    tempered = apply_temperatures(probs, {"root": 2.5, "animal": 0.4})
    assert tempered.consistency_error() < 1e-9
    assert tempered.decode("greedy") == probs.decode("greedy")  # argmax of every node unchanged
    assert not np.allclose(tempered.conditional, probs.conditional)
    p = probs.conditional[:, tree.children_indices("root")]
    expected = p ** (1 / 2.5) / (p ** (1 / 2.5)).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(tempered.conditional[:, tree.children_indices("root")], expected, rtol=1e-10)


def test_zero_probabilities_stay_finite(tree):
    cond = np.ones((2, tree.num_nodes))
    cond[:, tree.children_indices("root")] = [[1.0, 0.0], [0.0, 1.0]]
    cond[:, tree.children_indices("animal")] = [[0.5, 0.5], [1.0, 0.0]]
    cond[:, tree.children_indices("plant")] = [[0.5, 0.5], [0.5, 0.5]]
    probs = NodeProbabilities.from_conditionals(tree, cond)
    tempered = apply_temperatures(probs, {"root": 20.0, "animal": 0.05})
    assert np.isfinite(tempered.marginal).all()
    assert tempered.conditional[0, tree.index["plant"]] < 1e-14


def test_small_or_one_class_nodes_keep_t_one(tree):
    probs, labels = synthetic(tree, power=3.0, n=300)
    labels = ["cat" if t in ("cat", "dog") else t for t in labels]  # animal: only one child seen
    fit = fit_calibration(tree, probs, labels, min_images=10)
    assert fit.temperatures["animal"] == 1.0 and fit.skipped["animal"] == "its images all lie under one child"
    assert fit.temperatures["root"] != 1.0
    small = fit_calibration(tree, probs[np.arange(6)], labels[:6])
    assert set(small.skipped) == set(tree.internal_nodes)
    assert all(t == 1.0 for t in small.temperatures.values())
    assert all("fewer than 10" in reason for reason in small.skipped.values())


def test_partial_labels_count_for_ancestors_only(tree):
    probs, labels = synthetic(tree, power=3.0, n=400)
    partial = ["animal" if t in ("cat", "dog") else t for t in labels]
    fit = fit_calibration(tree, probs, partial)
    assert fit.node_images["root"] == 400
    assert fit.node_images["animal"] == 0 and fit.temperatures["animal"] == 1.0


def test_non_finite_probabilities_and_temperatures_are_refused(tree):
    probs, labels = synthetic(tree, power=1.0, n=50)
    broken = NodeProbabilities(tree, probs.conditional.copy(), probs.marginal.copy())
    broken.conditional[3, 1] = np.nan
    with pytest.raises(DataError, match="non-finite"):
        fit_temperatures(tree, broken, labels)
    with pytest.raises(DataError, match="non-finite"):
        apply_temperatures(broken, {"root": 2.0})
    for bad in (float("nan"), float("inf"), 0.0, -1.0, "2"):
        with pytest.raises(CheckpointError, match="temperature of 'root'"):
            apply_temperatures(probs, {"root": bad})
    with pytest.raises(CheckpointError, match="not in the run's taxonomy"):
        apply_temperatures(probs, {"fungus": 2.0})
    with pytest.raises(CheckpointError, match="is a leaf"):
        apply_temperatures(probs, {"cat": 2.0})


def test_reliability_bins_match_metrics_ece(tree):
    from hiercls.metrics import _ece

    rng = np.random.default_rng(3)
    confidence, correct = rng.random(500), (rng.random(500) < 0.6).astype(float)
    bins = reliability_bins(confidence, correct, 15)
    assert len(bins) == 15 and sum(b["count"] for b in bins) == 500
    ece = sum(b["count"] / 500 * abs(b["accuracy"] - b["confidence"]) for b in bins if b["count"])
    assert ece == pytest.approx(_ece(confidence, correct, 15))
    probs, labels = synthetic(tree, power=2.0, n=300)
    measured = calibration_metrics(tree, labels, probs)
    assert measured["ece_after"] is None and measured["reliability"]["after"] is None
    # the deepest level of this tree is the leaf prediction: "overall" equals "depth 2"
    assert measured["ece_before"]["overall"] == pytest.approx(measured["ece_before"]["depth 2"])


# -- RUN/calibration.json -------------------------------------------------------------------------


def _run_folder(tmp_path: Path, tree: Taxonomy) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    tree.to_yaml(run / "taxonomy.yaml")
    return run


def _payload(**extra):
    return {"temperatures": {"root": 2.0, "animal": 1.0, "plant": 0.5}, "checkpoint": "best", "split": "val",
            "n_images": 12, "paths_sha256": paths_digest(["a.png", "b.png"]), **extra}


def test_calibration_file_round_trip(tmp_path, tree):
    run = _run_folder(tmp_path, tree)
    assert read_calibration(run) is None
    path = write_calibration(run, _payload())
    assert path == run / CALIBRATION_FILE
    back = read_calibration(run)
    assert back["temperatures"] == {"root": 2.0, "animal": 1.0, "plant": 0.5}
    assert back["checkpoint"] == "best" and back["n_images"] == 12 and back["split"] == "val"
    assert back["date"].endswith("+00:00") and back["format"] == 1


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda text: text.replace("2.0", "NaN"), "NaN, not a number"),
        (lambda text: text.replace('"plant"', '"fungus"'), "'fungus' is not in the run's taxonomy"),
        (lambda text: text.replace("2.0", "-3"), "must be a finite number > 0"),
        (lambda text: text.replace('"best"', '"middle"'), "checkpoint must be 'best' or 'last'"),
        (lambda text: text[:-5], "not valid JSON"),
        (lambda text: text + " " * (5 * 2**20), "larger than"),
    ],
)
def test_tampered_calibration_file_is_refused(tmp_path, tree, edit, message):
    run = _run_folder(tmp_path, tree)
    path = write_calibration(run, _payload())
    path.write_text(edit(path.read_text()))
    with pytest.raises(CheckpointError, match=message):
        read_calibration(run)


def test_write_refuses_bad_payload(tmp_path, tree):
    run = _run_folder(tmp_path, tree)
    with pytest.raises(CheckpointError, match="temperature of 'root'"):
        write_calibration(run, _payload(temperatures={"root": float("nan")}))
    assert not (run / CALIBRATION_FILE).exists()


# -- the commands on a tiny run ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, Path]:
    """A 1-epoch run on 4 leaves x 8 images, half of the slides for validation (16 validation images)."""
    root = tmp_path_factory.mktemp("calib")
    data = write_smears(root / "data", ("cat", "dog", "tree", "flower"), per_label=8, seed=4)
    tree_file = root / "tiny.yaml"
    Taxonomy.from_nested(TREE, root="root").to_yaml(tree_file)
    run = root / "run"
    code = main(["fit", "--taxonomy", str(tree_file), "--data", str(data), "--out", str(run), "--backbone",
                 "test_resnet", "--img-size", "16", "--epochs", "1", "--batch-size", "8", "--device", "cpu",
                 "--group-regex", r"^(slide\d)_", "--val-fraction", "0.5", "--cache-dir", str(root / "cache"),
                 "--no-progress"])
    assert code == 0
    return run, data


def _probabilities(path: Path) -> np.ndarray:
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    return np.array([[float(v) for k, v in row.items() if k.startswith("p:")] for row in rows])


def test_calibrate_command_writes_file_and_predict_applies_it(tiny_run, tmp_path, capsys):
    run, data = tiny_run
    raw = tmp_path / "raw.csv"
    assert main(["predict", "--run", str(run), "--data", str(data), "--out", str(raw), "--no-progress"]) == 0
    assert main(["calibrate", "--run", str(run), "--device", "cpu", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "temperatures" in out and "expected calibration error" in out and "calibration.json" in out
    payload = json.loads((run / CALIBRATION_FILE).read_text())
    val = json.loads((run / "split.json").read_text())["val"]
    assert payload["n_images"] == len(val) == 16
    assert payload["paths_sha256"] == paths_digest(val)
    assert payload["checkpoint"] == "best" and payload["split"] == "val"
    assert payload["temperatures"]["root"] != 1.0  # 16 images below the root: fitted
    assert payload["ece_before"]["overall"] is not None and payload["ece_after"]["overall"] is not None
    calibrated, plain = tmp_path / "cal.csv", tmp_path / "plain.csv"
    assert main(["predict", "--run", str(run), "--data", str(data), "--out", str(calibrated), "--no-progress"]) == 0
    err = " ".join(capsys.readouterr().err.split())  # rich wraps at the test console's width
    assert "16 of 32 image(s) are the validation images the run's temperatures were fitted on" in err
    assert main(["predict", "--run", str(run), "--data", str(data), "--out", str(plain), "--no-progress",
                 "--no-calibration"]) == 0
    np.testing.assert_allclose(_probabilities(plain), _probabilities(raw), atol=1e-6)
    assert np.abs(_probabilities(calibrated) - _probabilities(plain)).max() > 1e-3


def test_load_run_applies_calibration_of_its_checkpoint_only(tiny_run):
    from hiercls.calibration import calibration_overlap
    from hiercls.data import load_images
    from hiercls.inference import load_run, predict_table

    run, data = tiny_run
    if not (run / CALIBRATION_FILE).exists():
        assert main(["calibrate", "--run", str(run), "--device", "cpu", "--no-progress"]) == 0
    loaded = load_run(run)
    assert loaded.calibration["temperatures"] == read_calibration(run)["temperatures"]
    table = load_images(data, loaded.taxonomy)
    tempered = predict_table(loaded, table, device="cpu", progress=False)
    raw = predict_table(loaded, table, device="cpu", progress=False, calibrated=False)
    expected = apply_temperatures(raw, loaded.calibration["temperatures"])
    np.testing.assert_allclose(tempered.marginal, expected.marginal, atol=1e-9)
    with pytest.warns(UserWarning, match="fitted on the best checkpoint"):
        assert load_run(run, "last").calibration is None
    assert load_run(run, calibrated=False).calibration is None
    assert calibration_overlap(run, table.paths) == 16
    val = set(json.loads((run / "split.json").read_text())["val"])
    some = table.paths[:10]
    assert calibration_overlap(run, some) == sum(str(p) in val for p in some)
    assert calibration_overlap(run, [p for p in table.paths if str(p) not in val]) == 0


def test_calibration_section_for_an_evaluation(tree):
    from hiercls.calibration import calibration_section

    probs, labels = synthetic(tree, power=3.0, n=400)
    payload = {"temperatures": fit_temperatures(tree, probs, labels), "checkpoint": "best", "split": "val",
               "n_images": 400, "epoch": 3}
    section = calibration_section(tree, labels, probs, payload, n_fitted_on_scored=400)
    assert section["ece_after"]["overall"] < section["ece_before"]["overall"]
    assert section["fitted_on"]["checkpoint"] == "best" and section["fitted_on"]["epoch"] == 3
    assert section["n_fitted_on_scored"] == 400 and "fitted on 400 of the scored images" in section["notes"][0]
    plain = calibration_section(tree, labels, probs, None)
    assert plain["ece_after"] is None and plain["fitted_on"] is None and plain["notes"] == []


def test_stale_or_other_checkpoint_calibration_is_not_applied(tiny_run, tmp_path):
    import shutil

    from hiercls.inference import load_run

    run, _ = tiny_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns(".hiercls.lock"))
    assert main(["calibrate", "--run", str(copy), "--checkpoint", "last", "--device", "cpu", "--no-progress"]) == 0
    assert load_run(copy, "last").calibration["checkpoint"] == "last"
    with pytest.warns(UserWarning, match="fitted on the last checkpoint"):
        assert load_run(copy, "best").calibration is None
    payload = json.loads((copy / CALIBRATION_FILE).read_text())
    payload["checkpoint_id"] = "0" * 16  # as after --resume trained on: the last checkpoint changed
    (copy / CALIBRATION_FILE).write_text(json.dumps(payload))
    with pytest.warns(UserWarning, match="fitted on an earlier last checkpoint"):
        assert load_run(copy, "last").calibration is None


def test_damaged_calibration_file_stops_predict_with_clear_error(tiny_run, tmp_path, capsys):
    run, data = tiny_run
    copy = tmp_path / "run"
    import shutil

    shutil.copytree(run, copy, ignore=shutil.ignore_patterns(".hiercls.lock"))
    (copy / CALIBRATION_FILE).write_text('{"temperatures": {"root": NaN}, "checkpoint": "best", "n_images": 3}')
    code = main(["predict", "--run", str(copy), "--data", str(data), "--out", str(tmp_path / "p.csv"), "--no-progress"])
    assert code == 2
    assert "calibration.json: holds NaN" in " ".join(capsys.readouterr().err.split())
    assert main(["predict", "--run", str(copy), "--data", str(data), "--out", str(tmp_path / "p.csv"),
                 "--no-progress", "--no-calibration"]) == 0


def test_calibrate_refuses_run_without_validation(tiny_run, tmp_path, capsys):
    run, data = tiny_run
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns(".hiercls.lock"))
    split = json.loads((copy / "split.json").read_text())
    (copy / "split.json").write_text(json.dumps({"train": split["train"] + split["val"], "val": []}))
    assert main(["calibrate", "--run", str(copy), "--device", "cpu", "--no-progress"]) == 2
    assert "no validation split" in " ".join(capsys.readouterr().err.split())
    with pytest.raises(ConfigError, match="val_fraction is 0"):
        from hiercls.config import load_config

        load_config(None, {"taxonomy": "t.yaml", "data": "d", "out": "o", "val_fraction": 0.0, "calibrate": True})


def test_fit_calibrate_option_writes_calibration(tiny_run, tmp_path, capsys):
    run, data = tiny_run
    out = tmp_path / "run2"
    assert main(_fit_args(run, data, out, "--calibrate")) == 0
    assert "expected calibration error" in capsys.readouterr().err
    payload = read_calibration(out)
    assert payload["checkpoint"] == "best" and payload["n_images"] == 16
    assert payload["paths_sha256"] == paths_digest(json.loads((out / "split.json").read_text())["val"])
    # the same temperatures as `hiercls calibrate` fits from the files
    fitted_in_memory = payload["temperatures"]
    assert main(["calibrate", "--run", str(out), "--device", "cpu", "--no-progress"]) == 0
    for node, t in read_calibration(out)["temperatures"].items():
        assert t == pytest.approx(fitted_in_memory[node], rel=1e-3)


def _fit_args(run: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["fit", "--taxonomy", str(run / "taxonomy.yaml"), "--data", str(data), "--out", str(out),
            "--backbone", "test_resnet", "--img-size", "16", "--epochs", "1", "--batch-size", "8",
            "--device", "cpu", "--group-regex", r"^(slide\d)_", "--val-fraction", "0.5",
            "--cache-dir", str(run.parent / "cache"), "--no-progress", *extra]


def test_failed_calibration_at_end_of_fit_keeps_the_run(tiny_run, tmp_path, monkeypatch, capsys):
    import hiercls.calibration as calibration

    def broken(*args, **kwargs):
        raise DataError("validation: 3 image(s) have non-finite (NaN or inf) node probabilities")

    monkeypatch.setattr(calibration, "fit_calibration", broken)
    run, data = tiny_run
    out = tmp_path / "run3"
    assert main(_fit_args(run, data, out, "--calibrate")) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "calibration at the end of training failed" in err and "hiercls calibrate --run" in err
    assert (out / "checkpoints" / "best.safetensors").is_file() and not (out / CALIBRATION_FILE).exists()


def test_estimator_calibrate_fits_on_arrays_and_predicts_calibrated(tmp_path):
    from hiercls.estimator import HierarchicalImageClassifier
    from hiercls.inference import predict_images

    rng = np.random.default_rng(5)
    leaves = ("cat", "dog", "tree", "flower")
    y = [leaves[i % 4] for i in range(40)]
    X = np.stack([np.clip(rng.normal(40 * (i % 4) + 60, 20, (16, 16, 3)), 0, 255) for i in range(40)]).astype(np.uint8)
    clf = HierarchicalImageClassifier(TREE, backbone="test_resnet", img_size=16, epochs=1, batch_size=8,
                                      val_fraction=0.5, device="cpu", calibrate=True, run_dir=tmp_path / "est",
                                      cache_dir=tmp_path / "cache")
    clf.fit(X, y)
    assert clf.get_params()["calibrate"] is True
    payload = read_calibration(clf.run_dir_)
    assert payload["n_images"] == 20 and payload["temperatures"]["root"] != 1.0
    assert clf.loaded_run_.calibration is not None
    calibrated = clf.predict_proba(X)
    raw = predict_images(clf.loaded_run_, X, device="cpu", progress=False, calibrated=False)
    np.testing.assert_allclose(calibrated.marginal, apply_temperatures(raw, payload["temperatures"]).marginal,
                               atol=1e-9)
    assert HierarchicalImageClassifier.load(clf.run_dir_).get_params()["calibrate"] is True
