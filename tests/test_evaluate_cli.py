"""``hiercls evaluate`` end to end on predictions CSVs written in the test (and on a tiny trained run)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from hiercls.cli import main
from hiercls.metrics import METRIC_KEYS, hierarchical_prf
from hiercls.predictions import write_predictions_csv
from hiercls.probabilities import NodeProbabilities
from hiercls.taxonomy import load_taxonomy

REPO = Path(__file__).resolve().parents[1]
LEUKEMIA = REPO / "taxonomy" / "leukemia.yaml"


@pytest.fixture(scope="module")
def tax():
    return load_taxonomy(LEUKEMIA)


def _sample(tax, n: int = 30, seed: int = 0):
    rng = np.random.default_rng(seed)
    probs = NodeProbabilities.from_leaf_probabilities(tax, rng.dirichlet(np.full(len(tax.leaves), 0.5), size=n))
    labels = [tax.leaves[i] for i in rng.integers(0, len(tax.leaves), n)]
    labels[0] = None  # unlabelled image
    groups = [f"slide{i // 5}" for i in range(n)]
    return probs, labels, groups


@pytest.fixture
def preds_csv(tax, tmp_path) -> Path:
    probs, labels, groups = _sample(tax)
    path = tmp_path / "preds.csv"
    write_predictions_csv(path, probs, [f"img{i}.jpg" for i in range(len(labels))], labels, groups, probs.decode())
    return path


def _evaluate(*args: str) -> int:
    return main(["evaluate", *args])


def test_metrics_json_report_and_figures(tax, preds_csv, tmp_path, capsys):
    out = tmp_path / "eval"
    assert _evaluate("--predictions", str(preds_csv), "--taxonomy", str(LEUKEMIA), "--out", str(out)) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == set(METRIC_KEYS)
    assert metrics["n_images"] == 29
    assert any("without a label" in n for n in metrics["notes"])
    assert set(metrics["per_level_accuracy"]) == {"root", "Leukemia", "Acute", "Chronic"}
    assert metrics["auroc"]["leaf_macro"] is not None and set(metrics["ece"]["per_depth"]) == {"1", "2", "3"}
    # The numbers are the library's, computed on the labelled rows.
    probs, labels, _ = _sample(tax)
    keep = [i for i, lab in enumerate(labels) if lab is not None]
    expected = hierarchical_prf(tax, [labels[i] for i in keep], [probs.decode()[i] for i in keep])
    assert metrics["hF"] == pytest.approx(expected["hF"])
    report = (out / "report.md").read_text()
    assert "Per-level accuracy" in report and "Leukemia: Acute vs Chronic" in report
    assert "## Accuracy at each depth" in report and set(metrics["depth_accuracy"]) == {"1", "2", "3"}
    assert (out / "confusion_leaves.png").stat().st_size > 0
    assert (out / "confusion_at_Acute.png").exists()
    assert "hF" in capsys.readouterr().out


def test_group_by(preds_csv, tmp_path):
    out = tmp_path / "eval"
    args = ["--predictions", str(preds_csv), "--taxonomy", str(LEUKEMIA), "--out", str(out), "--group-by", "group"]
    assert _evaluate(*args) == 0
    groups = json.loads((out / "metrics.json").read_text())["groups"]
    assert groups["n_groups"] == 6 and groups["aggregator"] == "mode"
    assert set(METRIC_KEYS) <= set(groups)
    assert groups["n_mixed_groups"] == len(groups["mixed_groups"]) > 0
    assert _evaluate(*args, "--aggregator", "mean", "--overwrite") == 0
    assert json.loads((out / "metrics.json").read_text())["groups"]["aggregator"] == "mean"
    assert "## Groups" in (out / "report.md").read_text()


def test_without_probability_columns(tax, tmp_path):
    path = tmp_path / "hard.csv"
    write_predictions_csv(path, None, ["a", "b", "c"], ["ALL", "AML", "CML"], ["s1", "s1", "s2"], ["ALL", "ALL", "CLL"])
    out = tmp_path / "eval"
    assert _evaluate("--predictions", str(path), "--taxonomy", str(LEUKEMIA), "--out", str(out), "--group-by", "group") == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["auroc"] is None and metrics["ece"] is None
    assert any("no probability columns" in n for n in metrics["notes"])
    assert metrics["groups"]["auroc"] is None
    # The mean aggregator and re-decoding need probabilities: a clear error, exit status 2.
    for extra in (["--aggregator", "mean", "--group-by", "group"], ["--decode", "best_leaf"]):
        assert _evaluate("--predictions", str(path), "--taxonomy", str(LEUKEMIA), "--out", str(out),
                         "--overwrite", *extra) == 2


def test_refuses_to_overwrite(preds_csv, tmp_path, capsys):
    out = tmp_path / "eval"
    args = ["--predictions", str(preds_csv), "--taxonomy", str(LEUKEMIA), "--out", str(out)]
    assert _evaluate(*args) == 0
    before = (out / "metrics.json").read_text()
    assert _evaluate(*args, "--decode", "best_leaf") == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "metrics.json").read_text() == before
    assert _evaluate(*args, "--decode", "best_leaf", "--overwrite") == 0


def test_group_by_without_group_values(tax, tmp_path, capsys):
    path = tmp_path / "nogroups.csv"
    write_predictions_csv(path, None, ["a", "b"], ["ALL", "AML"], None, ["ALL", "ALL"])
    out = tmp_path / "eval"
    assert _evaluate("--predictions", str(path), "--taxonomy", str(LEUKEMIA), "--out", str(out), "--group-by", "group") == 2
    err = capsys.readouterr().err
    assert "--group-by group" in err and "no row" in err
    assert not (out / "metrics.json").exists()
    assert _evaluate("--predictions", str(path), "--taxonomy", str(LEUKEMIA), "--out", str(out), "--group-by", "patient") == 2
    assert "no column 'patient'" in capsys.readouterr().err


def test_argument_errors(preds_csv, tmp_path, capsys):
    out = str(tmp_path / "eval")
    assert _evaluate("--predictions", str(preds_csv), "--out", out) == 2
    assert "--taxonomy" in capsys.readouterr().err
    assert _evaluate("--out", out) == 2
    assert _evaluate("--predictions", str(preds_csv), "--taxonomy", str(LEUKEMIA), "--out", out, "--aggregator", "median") == 2
    assert "unknown aggregator 'median'" in capsys.readouterr().err
    unlabelled = tmp_path / "unlabelled.csv"
    write_predictions_csv(unlabelled, None, ["a"], None, None, ["ALL"])
    assert _evaluate("--predictions", str(unlabelled), "--taxonomy", str(LEUKEMIA), "--out", out) == 2
    assert "no row has a label" in capsys.readouterr().err


def test_evaluate_a_trained_run(tmp_path):
    """Train a tiny model for one epoch, then evaluate it on the same images with groups."""
    engine = pytest.importorskip("hiercls.engine")
    config_mod = pytest.importorskip("hiercls.config")
    from PIL import Image

    data = tmp_path / "data"
    rng = np.random.default_rng(0)
    for li, label in enumerate(("Normal", "Reactive", "ALL", "CLL")):
        (data / label).mkdir(parents=True)
        for k in range(3):
            pixels = np.clip(rng.normal(40 * li, 20, (16, 16, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(data / label / f"slide{k}_{label}.jpg")
    run = tmp_path / "run"
    config = config_mod.load_config(None, {
        "taxonomy": str(LEUKEMIA), "data": str(data), "out": str(run), "backbone": "test_resnet",
        "img_size": 16, "epochs": 1, "batch_size": 8, "group_regex": r"^(slide\d+)_", "val_fraction": 0.34,
        "cache_dir": str(tmp_path / "cache"), "device": "cpu",
    })
    engine.fit(config, progress=False)
    out = tmp_path / "eval"
    # Class folders carry no group: refused before predicting, unless a regex gives one.
    assert _evaluate("--run", str(run), "--data", str(data), "--out", str(out), "--group-by", "group") == 2
    code = _evaluate("--run", str(run), "--data", str(data), "--out", str(out), "--device", "cpu",
                     "--group-by", "group", "--group-regex", r"^(slide\d+)_", "--no-progress")
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_images"] == 12 and metrics["groups"]["n_groups"] == 3
    assert metrics["auroc"] is not None
    header = (out / "predictions.csv").read_text().splitlines()[0].split(",")
    assert header[:4] == ["path", "label", "group", "prediction"] and "p:ALL" in header
