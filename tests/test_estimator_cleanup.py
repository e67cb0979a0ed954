"""Who owns an estimator's run folder, and the decode threshold every caller validates.

Without ``run_dir`` the estimator trains into a temporary run folder that it owns: removed when
the estimator is garbage-collected, on ``close()``, when a refit replaces it, and at once when
``fit`` fails. A ``run_dir`` given by the user, a folder passed to ``load`` and a ``save`` copy are
never removed.
"""

from __future__ import annotations

import copy
import gc
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest

from hiercls import ConfigError, HierarchicalImageClassifier, Taxonomy
from hiercls.probabilities import NodeProbabilities

TREE = {"animal": {"cat": {}, "dog": {}}, "plant": {}}
OPTIONS = {"backbone": "resnet18", "img_size": 32, "epochs": 1, "batch_size": 4, "device": "cpu",
           "val_fraction": 0.0, "pretrained": False}


@pytest.fixture(autouse=True)
def temporary(tmp_path, monkeypatch) -> Path:
    """Temporary folders (``tempfile.mkdtemp``) of these tests go to a folder of their own."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def images(n: int = 6, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 24, 24, 3), dtype=np.uint8), (["cat", "dog", "plant"] * n)[:n]


def left_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("hiercls-*"))  # torch may keep caches there too


def test_the_temporary_run_folder_goes_with_the_estimator_but_a_saved_copy_stays(temporary, tmp_path):
    X, y = images()
    clf = HierarchicalImageClassifier(taxonomy=TREE, **OPTIONS).fit(X, y)
    run = clf.run_dir_
    assert run.parent == temporary.resolve() and (run / "config.yaml").is_file()
    saved = clf.save(tmp_path / "kept")
    expected = clf.predict(X)
    del clf
    gc.collect()
    assert not run.exists()
    assert left_in(temporary) == []  # the fit's work folder went at once, the run with the estimator
    assert (saved / "checkpoints" / "best.safetensors").is_file()
    assert list(HierarchicalImageClassifier.load(saved).predict(X)) == list(expected)


def test_a_refit_removes_the_run_it_replaces_and_close_removes_the_last(temporary):
    X, y = images()
    clf = HierarchicalImageClassifier(taxonomy=TREE, **OPTIONS).fit(X, y)
    first = clf.run_dir_
    clf.fit(X[:3], y[:3])
    assert not first.exists() and clf.run_dir_.is_dir()
    assert left_in(temporary) == [clf.run_dir_.name]
    clf.close()
    assert left_in(temporary) == []
    assert set(clf.predict(X)) <= {"cat", "dog", "plant"}  # the model stays in memory
    with pytest.raises(ConfigError, match=r"temporary run folder was removed \(close\(\)\).*run_dir="):
        clf.save(temporary / "late")


def test_a_copy_never_removes_the_folder_of_the_original(temporary):
    X, y = images()
    clf = HierarchicalImageClassifier(taxonomy=TREE, **OPTIONS).fit(X, y)
    twin = copy.deepcopy(clf)
    assert twin.run_dir_ == clf.run_dir_
    del twin
    gc.collect()
    assert clf.run_dir_.is_dir()


def test_a_failed_fit_leaves_nothing_and_keeps_the_previous_run(temporary):
    X, y = images()
    clf = HierarchicalImageClassifier(taxonomy=TREE, **OPTIONS)
    with pytest.raises(ConfigError):
        clf.set_params(backbone="no_such_backbone_xyz").fit(X, y)
    assert left_in(temporary) == []
    clf.set_params(backbone="resnet18").fit(X, y)
    run = clf.run_dir_
    with pytest.raises(ConfigError):
        clf.set_params(backbone="no_such_backbone_xyz").fit(X, y)
    assert left_in(temporary) == [run.name] and clf.run_dir_ == run  # the fitted model and its folder remain


def test_a_run_dir_of_the_user_and_a_loaded_run_are_never_removed(temporary, tmp_path):
    X, y = images()
    user_run = tmp_path / "mine"
    clf = HierarchicalImageClassifier(taxonomy=TREE, run_dir=str(user_run), **OPTIONS).fit(X, y)
    clf.close()
    loaded = HierarchicalImageClassifier.load(user_run)
    loaded.close()
    del clf, loaded
    gc.collect()
    assert (user_run / "checkpoints" / "best.safetensors").is_file()
    # a failed fit into the user's folder removes nothing of it either
    with pytest.raises(ConfigError):
        HierarchicalImageClassifier(taxonomy=TREE, run_dir=str(user_run),
                                    **{**OPTIONS, "backbone": "no_such_backbone_xyz"}).fit(X, y)
    assert (user_run / "checkpoints" / "best.safetensors").is_file()


# -- the decode threshold --------------------------------------------------------------------


def node_probabilities() -> NodeProbabilities:
    tree = Taxonomy.from_nested(TREE)
    marginal = np.zeros((2, len(tree.nodes)))
    for row, (leaf, p) in enumerate([("cat", 0.7), ("plant", 0.9)]):
        marginal[row, tree.index[tree.root]] = 1.0
        for node in tree.leaves:
            marginal[row, tree.index[node]] = p if node == leaf else (1 - p) / 2
        marginal[row, tree.index["animal"]] = marginal[row, tree.index["cat"]] + marginal[row, tree.index["dog"]]
    return NodeProbabilities.from_marginals(tree, marginal)


@pytest.mark.parametrize("threshold", [2, 1.0000001, -1, -0.0001, math.nan, math.inf, "0.5x", None])
def test_a_threshold_outside_0_1_is_refused_by_decode(threshold):
    probs = node_probabilities()
    with pytest.raises(ConfigError, match=r"threshold must be (a number )?in \[0, 1\], got"):
        probs.decode("threshold", threshold=threshold)


def test_thresholds_0_and_1_still_decode():
    probs = node_probabilities()
    assert probs.decode("threshold", threshold=0.0) == probs.decode("greedy")
    assert probs.decode("threshold", threshold=1.0) == ["root", "root"]


def test_the_estimator_refuses_a_threshold_outside_0_1_like_the_cli():
    X, y = images()
    clf = HierarchicalImageClassifier(taxonomy=TREE, **OPTIONS).fit(X, y)
    for bad in (2, -1, math.nan):
        with pytest.raises(ConfigError, match=r"threshold must be in \[0, 1\]"):
            clf.predict(X[:3], decode="threshold", threshold=bad)
        with pytest.raises(ConfigError, match=r"threshold must be in \[0, 1\]"):
            clf.evaluate(X[:3], y[:3], decode="threshold", threshold=bad)
