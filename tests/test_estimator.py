"""HierarchicalImageClassifier: fit / predict_proba / predict / save / load, clone, inputs, CLI runs."""

from __future__ import annotations

import csv
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError

from hiercls import ConfigError, DataError, HierarchicalImageClassifier, Taxonomy
from hiercls.data import open_rgb
from hiercls.inference import load_run

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "examples" / "data" / "blood-cells-sample"
TAXONOMY = REPO / "taxonomy" / "blood-cells.yaml"
# the options a fit of these tests shares with `hiercls fit` (tiny and fast on a CPU)
OPTIONS = {"backbone": "resnet18", "img_size": 32, "epochs": 1, "batch_size": 8, "device": "cpu", "val_fraction": 0.0}


def sample_images(count: int = 20) -> tuple[list[str], list[str]]:
    """``count`` images of the sample manifest, leaves of every decision of the tree first."""
    rows = list(csv.DictReader(open(SAMPLE / "manifest.csv", encoding="utf-8")))
    tree = Taxonomy.from_dict(__import__("yaml").safe_load(TAXONOMY.read_text()))
    by_label: dict[str, list[dict]] = {}
    for row in rows:
        if tree.is_leaf(row["label"]):
            by_label.setdefault(row["label"], []).append(row)
    picked = [group[k] for k in range(2) for _label, group in sorted(by_label.items()) if k < len(group)]
    picked = picked[:count]
    return [str(SAMPLE / r["path"]) for r in picked], [r["label"] for r in picked]


@pytest.fixture(scope="module")
def data() -> tuple[list[str], list[str]]:
    return sample_images()


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(autouse=True)
def temporary_folders(tmp_path, monkeypatch) -> Path:
    """Runs without a run_dir go to a new temporary folder: here, inside the test's own."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


@pytest.fixture(scope="module")
def fitted(data, cache, tmp_path_factory) -> HierarchicalImageClassifier:
    X, y = data
    clf = HierarchicalImageClassifier(taxonomy=str(TAXONOMY), strategy="joint", pretrained=False, cache_dir=cache,
                                      **OPTIONS)
    temporary = tmp_path_factory.mktemp("tmp")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tempfile, "tempdir", str(temporary))
        assert clf.fit(X, y) is clf
    # the run lives in a new temporary folder; the manifest's work folder is gone
    assert clf.run_dir_.parent == temporary.resolve()
    assert [p.name[:12] for p in temporary.glob("hiercls-*")] == ["hiercls-run-"]
    return clf


def weights(run: Path, which: str = "last") -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(run) / "checkpoints" / f"{which}.safetensors"))


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert np.array_equal(a[key].numpy(), b[key].numpy()), key


def decoded(paths: list[str]) -> np.ndarray:
    return np.stack([np.asarray(open_rgb(p)) for p in paths])


# -- fit, predict_proba, predict, save / load -------------------------------------------------


def test_fit_then_predict_proba_is_a_consistent_distribution(fitted, data):
    X, _ = data
    probs = fitted.predict_proba(X)
    tree = fitted.taxonomy_
    assert probs.marginal.shape == (len(X), tree.num_nodes)
    np.testing.assert_allclose(probs.marginal[:, tree.index[tree.root]], 1.0)
    for node in tree.internal_nodes:
        children = tree.children_indices(node)
        np.testing.assert_allclose(probs.conditional[:, children].sum(axis=1), 1.0, atol=1e-5)
        np.testing.assert_allclose(probs.marginal[:, children].sum(axis=1), probs.marginal[:, tree.index[node]],
                                   atol=1e-5)
    np.testing.assert_allclose(probs.leaf_marginals().sum(axis=1), 1.0, atol=1e-5)
    assert list(fitted.classes_) == list(tree.leaves)
    assert len(fitted.history_) == 1 and fitted.history_[0]["epoch"] == 1
    assert (fitted.run_dir_ / "config.yaml").is_file()


def test_predict_gives_node_names_and_follows_the_decode_options(fitted, data):
    X, y = data
    predicted = fitted.predict(X)
    assert len(predicted) == len(X) and set(predicted) <= set(fitted.taxonomy_.leaves)
    assert list(predicted) == fitted.predict_proba(X).decode("greedy")
    # no child is ever sure at threshold 1.0: every image stops above the leaves
    cautious = fitted.predict(X, decode="threshold", threshold=1.0)
    assert not set(cautious) & set(fitted.taxonomy_.leaves)
    assert 0.0 <= fitted.score(X, y) <= 1.0


def test_save_then_load_predicts_the_same_and_the_cli_reads_it(fitted, data, tmp_path):
    X, _ = data
    saved = fitted.save(tmp_path / "my-model")
    again = HierarchicalImageClassifier.load(saved)
    np.testing.assert_array_equal(again.predict_proba(X).marginal, fitted.predict_proba(X).marginal)
    assert list(again.predict(X)) == list(fitted.predict(X))
    assert again.get_params() == {**fitted.get_params(), "taxonomy": str(TAXONOMY), "pretrained": None}
    assert load_run(saved).config.img_size == 32
    from hiercls.cli import main

    manifest = tmp_path / "predict.csv"
    manifest.write_text("path\n" + "".join(f"{p}\n" for p in X[:3]))
    assert main(["predict", "--run", str(saved), "--data", str(manifest), "--out", str(tmp_path / "p.csv"),
                 "--device", "cpu", "--no-progress"]) == 0
    assert (tmp_path / "p.csv").is_file()


def test_save_refuses_a_folder_that_is_not_empty(fitted, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(Exception, match="not an empty folder"):
        fitted.save(tmp_path / "taken")
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"


# -- scikit-learn conventions -------------------------------------------------------------------


def test_clone_gives_an_unfitted_copy_with_equal_params(fitted, data):
    copy = clone(fitted)
    assert copy.get_params() == fitted.get_params()
    assert not hasattr(copy, "model_")
    with pytest.raises(NotFittedError):
        copy.predict(data[0])


def test_predicting_before_fit_raises_not_fitted_error(data):
    clf = HierarchicalImageClassifier(taxonomy=str(TAXONOMY))
    for call in (clf.predict, clf.predict_proba):
        with pytest.raises(NotFittedError):
            call(data[0])


def test_set_params_and_unknown_params_follow_scikit_learn():
    clf = HierarchicalImageClassifier(taxonomy=str(TAXONOMY)).set_params(epochs=3, lr=1e-3)
    assert clf.get_params()["epochs"] == 3 and clf.lr == 1e-3
    with pytest.raises(ValueError):
        clf.set_params(not_an_option=1)
    with pytest.raises(TypeError):
        HierarchicalImageClassifier(taxonomy=str(TAXONOMY), not_an_option=1)


# -- inputs ---------------------------------------------------------------------------------------


def test_uint8_arrays_predict_and_train_as_the_same_images_given_as_paths(fitted, data, cache):
    X, y = data
    arrays = decoded(X)  # 224 px originals: resized to 32 px as the cache resizes the files
    np.testing.assert_allclose(fitted.predict_proba(arrays).marginal, fitted.predict_proba(X).marginal, atol=1e-6)
    np.testing.assert_allclose(fitted.predict_proba(list(arrays)).marginal, fitted.predict_proba(X).marginal, atol=1e-6)
    tree = Taxonomy.from_dict(__import__("yaml").safe_load(TAXONOMY.read_text()))  # a Taxonomy object, too
    from_arrays = HierarchicalImageClassifier(taxonomy=tree, cache_dir=cache, **OPTIONS).fit(arrays, y)
    assert_same_weights(weights(from_arrays.run_dir_), weights(fitted.run_dir_))


def test_a_label_outside_the_tree_is_the_clear_data_error(data):
    X, y = data
    clf = HierarchicalImageClassifier(taxonomy=str(TAXONOMY), **OPTIONS)
    with pytest.raises(DataError, match=r"y: 1 label\(s\) not in taxonomy 'blood-cells': 'neutrophyl' x1 "
                                        r"\(closest: neutrophil"):
        clf.fit(X, y[:-1] + ["neutrophyl"])


@pytest.mark.parametrize(
    ("X", "y", "message"),
    [
        (np.zeros((2, 32, 32, 3), dtype=np.float32), ["basophil"] * 2, "dtype float32; decoded images must be uint8"),
        (np.zeros((32, 32, 3), dtype=np.uint8), ["basophil"], r"shape \(32, 32, 3\).*X\[None\]"),
        (np.zeros((2, 32, 32), dtype=np.uint8), ["basophil"] * 2, r"must be \[N, H, W, 3\]"),
        (np.zeros((3, 32, 32, 3), dtype=np.uint8), ["basophil"] * 2, "X has 3 images but y has 2 labels"),
        ("one.jpg", ["basophil"], "single path"),
        ([1, 2], ["basophil"] * 2, r"X\[0\] is a int, not an image path"),
        (["/no/such/image.jpg"], ["basophil"], "1 image file"),
        (np.zeros((1, 32, 32, 3), dtype=np.uint8), [None], r"y\[0\] has no label"),
    ],
)
def test_bad_inputs_are_clear_errors_before_training(X, y, message, tmp_path):
    clf = HierarchicalImageClassifier(taxonomy=str(TAXONOMY), run_dir=str(tmp_path / "run"), **OPTIONS)
    with pytest.raises(DataError, match=message):
        clf.fit(X, y)
    assert not (tmp_path / "run").exists()


def test_shape_and_length_errors_are_also_value_errors():
    clf = HierarchicalImageClassifier(taxonomy=str(TAXONOMY), **OPTIONS)
    with pytest.raises(ValueError, match="X has 3 images but y has 2"):
        clf.fit(np.zeros((3, 8, 8, 3), dtype=np.uint8), ["basophil"] * 2)


def test_validation_data_validates_every_epoch_and_is_recorded_as_the_split(data, cache, tmp_path):
    X, y = data
    clf = HierarchicalImageClassifier(taxonomy=str(TAXONOMY), cache_dir=cache, run_dir=str(tmp_path / "run"),
                                      **OPTIONS)
    clf.fit(X[:16], y[:16], validation_data=(X[16:], y[16:]))
    assert clf.run_dir_ == (tmp_path / "run").resolve()
    assert "val_hF" in clf.history_[-1] and "val_loss" in clf.history_[-1]
    split = json.loads((clf.run_dir_ / "split.json").read_text())
    assert split["val"] == [str(Path(p).resolve()) for p in X[16:]]
    assert len(split["train"]) == 16


def test_a_nested_dict_tree_trains_silently_unless_verbose(capfd):
    tree = {"animal": {"cat": {}, "dog": {}}, "plant": {}}
    rng = np.random.default_rng(0)
    X = rng.integers(0, 256, (8, 24, 24, 3), dtype=np.uint8)
    y = ["cat", "dog", "plant", "animal"] * 2
    clf = HierarchicalImageClassifier(taxonomy=tree, backbone="resnet18", img_size=32, epochs=1, batch_size=4,
                                      device="cpu")
    clf.fit(X[:6], y[:6], validation_data=(X[6:], y[6:]))
    assert set(clf.predict(X)) <= {"cat", "dog", "plant"}
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == ""
    assert sorted(clf.classes_) == ["cat", "dog", "plant"]
    assert len(json.loads((clf.run_dir_ / "split.json").read_text())["val"]) == 2
    assert "val_hF" in clf.history_[-1]
    with pytest.raises(DataError, match="X holds images but X_val holds paths"):
        clf.fit(X[:6], y[:6], validation_data=([str(TAXONOMY)], ["cat"]))


def test_a_refit_replaces_its_own_run_but_never_another(data, cache, tmp_path):
    X, y = data
    options = {**OPTIONS, "cache_dir": cache, "run_dir": str(tmp_path / "run")}
    clf = HierarchicalImageClassifier(taxonomy=str(TAXONOMY), **options).fit(X[:12], y[:12])
    first = (tmp_path / "run" / "split.json").read_text()
    clf.fit(X[8:], y[8:])
    assert (tmp_path / "run" / "split.json").read_text() != first
    assert clf.run_dir_ == (tmp_path / "run").resolve()
    with pytest.raises(ConfigError, match="run folder exists and is not empty"):
        HierarchicalImageClassifier(taxonomy=str(TAXONOMY), **options).fit(X[:12], y[:12])


# -- the command line and the estimator share runs ----------------------------------------------


def test_a_cli_run_loads_as_an_estimator_and_trains_the_same_weights(fitted, data, cache, tmp_path):
    X, y = data
    manifest = tmp_path / "train.csv"
    manifest.write_text("path,label\n" + "".join(f"{p},{label}\n" for p, label in zip(X, y)))
    from hiercls.cli import main

    run = tmp_path / "cli-run"
    argv = ["fit", "--taxonomy", str(TAXONOMY), "--data", str(manifest), "--out", str(run), "--backbone", "resnet18",
            "--img-size", "32", "--epochs", "1", "--batch-size", "8", "--device", "cpu", "--val-fraction", "0",
            "--cache-dir", cache, "--no-progress"]
    assert main(argv) == 0
    loaded = HierarchicalImageClassifier.load(run)
    params = loaded.get_params()
    assert (params["img_size"], params["epochs"], params["batch_size"], params["strategy"]) == (32, 1, 8, "joint")
    assert params["taxonomy"] == str(TAXONOMY) and params["run_dir"] is None
    assert loaded.run_dir_ == run.resolve()
    # same images, same config: the CLI and the estimator train bit-identical weights
    assert_same_weights(weights(run), weights(fitted.run_dir_))
    np.testing.assert_array_equal(loaded.predict_proba(X).marginal, fitted.predict_proba(X).marginal)


def test_with_a_validation_split_the_cli_and_the_estimator_agree_on_every_epoch(data, cache, tmp_path):
    X, y = data
    manifest = tmp_path / "train.csv"
    manifest.write_text("path,label\n" + "".join(f"{p},{label}\n" for p, label in zip(X, y)))
    from hiercls.cli import main

    run = tmp_path / "cli-run"
    assert main(["fit", "--taxonomy", str(TAXONOMY), "--data", str(manifest), "--out", str(run), "--img-size", "32",
                 "--epochs", "2", "--batch-size", "8", "--device", "cpu", "--val-fraction", "0.5",
                 "--checkpoint-minutes", "0", "--cache-dir", cache, "--no-progress", "--allow-incomplete-tree"]) == 0
    clf = HierarchicalImageClassifier(taxonomy=str(TAXONOMY), cache_dir=cache, run_dir=str(tmp_path / "est-run"),
                                      **{**OPTIONS, "epochs": 2, "val_fraction": 0.5},
                                      allow_incomplete_tree=True).fit(X, y)
    # checkpoint_minutes is no estimator parameter: at its default, last is written at the end only
    assert_same_weights(weights(run, "last"), weights(clf.run_dir_, "last"))
    assert_same_weights(weights(run, "best"), weights(clf.run_dir_, "best"))
    timing = ("seconds", "elapsed_seconds", "images_per_second")
    cli_history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [{k: v for k, v in r.items() if k not in timing} for r in cli_history] == \
        [{k: v for k, v in r.items() if k not in timing} for r in clf.history_]
    assert "val_hF" in clf.history_[-1]
    assert json.loads((run / "split.json").read_text()) == json.loads((clf.run_dir_ / "split.json").read_text())
