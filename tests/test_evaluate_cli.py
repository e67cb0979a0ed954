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
from hiercls.report_content import SECTION_KEYS
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
    # the metrics, what made them, what only probabilities tell, and the report's numbers
    assert set(metrics) == set(METRIC_KEYS) | {"provenance", "calibration", "selective"} | set(SECTION_KEYS)
    assert (out / "report.html").is_file()
    assert metrics["provenance"]["predictions"] == str(preds_csv)
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
    assert "| own subtree | end to end |" in report  # the paper's Table 3 reading beside the end-to-end one
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
        "cache_dir": str(tmp_path / "cache"), "device": "cpu", "allow_incomplete_tree": True,
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


# -- vote, then score images ------------------------------------------------------------------


def _vote_csv(tmp_path: Path) -> Path:
    """g1 = 4 images labelled ALL voted ALL (one of them predicted AML), g2 = 2 images labelled CLL voted CML."""
    path = tmp_path / "vote.csv"
    write_predictions_csv(path, None, [f"i{k}.jpg" for k in range(6)], ["ALL"] * 4 + ["CLL"] * 2,
                          ["g1"] * 4 + ["g2"] * 2, ["ALL", "ALL", "AML", "ALL", "CML", "CML"])
    return path


def test_group_scoring_images_counts_voted_images(tmp_path, capsys):
    path = _vote_csv(tmp_path)
    base = ["--predictions", str(path), "--taxonomy", str(LEUKEMIA), "--group-by", "group"]
    assert _evaluate(*base, "--out", str(tmp_path / "groups")) == 0
    assert _evaluate(*base, "--out", str(tmp_path / "images"), "--group-scoring", "images") == 0
    by_group = json.loads((tmp_path / "groups" / "metrics.json").read_text())
    by_image = json.loads((tmp_path / "images" / "metrics.json").read_text())
    assert by_image["accuracy"] == pytest.approx(3 / 6)  # the images' own predictions
    assert by_image["groups"]["accuracy"] == pytest.approx(4 / 6) and by_image["groups"]["n_images"] == 6
    assert by_group["groups"]["accuracy"] == pytest.approx(1 / 2) and by_group["groups"]["n_images"] == 2
    assert (by_group["groups"]["scoring"], by_image["groups"]["scoring"]) == ("groups", "images")
    assert "images, group vote" in capsys.readouterr().out
    report = (tmp_path / "images" / "report.md").read_text()
    assert "| metric | images | images, group vote |" in report
    assert "every image scored with its group's prediction" in report


def test_group_scoring_needs_group_by(tmp_path, capsys):
    path = _vote_csv(tmp_path)
    assert _evaluate("--predictions", str(path), "--taxonomy", str(LEUKEMIA), "--out", str(tmp_path / "e"),
                     "--group-scoring", "images") == 2
    assert "--group-scoring goes with --group-by" in capsys.readouterr().err


# -- figure names -----------------------------------------------------------------------------

ODD_TREE = """
name: odd
root: root
children:
  - name: α
    children:
      - name: x/y
        children: [{name: a}, {name: b}]
      - name: x y
        children: [{name: c}, {name: d}]
  - name: β
    children: [{name: e}, {name: f}]
"""


def test_figure_names_are_unique_and_safe_for_any_node_name(tmp_path):
    from hiercls.report import figure_names

    tax_file = tmp_path / "odd.yaml"
    tax_file.write_text(ODD_TREE, encoding="utf-8")
    odd = load_taxonomy(tax_file)
    labels = ["a", "b", "c", "d", "e", "f"] * 2
    preds = ["a", "b", "d", "c", "e", "e", "b", "a", "c", "d", "f", "e"]
    path = tmp_path / "odd.csv"
    write_predictions_csv(path, None, [f"i{k}.jpg" for k in range(len(labels))], labels, None, preds)
    out = tmp_path / "eval"
    assert _evaluate("--predictions", str(path), "--taxonomy", str(tax_file), "--out", str(out)) == 0
    decisions = sorted(p.name for p in out.glob("confusion_at_*.png"))
    assert len(decisions) == len(odd.internal_nodes) == 5
    assert all(name.isascii() and "/" not in name and " " not in name for name in decisions)
    report = (out / "report.md").read_text()
    assert all(f"({name})" in report for name in decisions)
    # Stable (a hash of the name, not of the order) and plain where the name is already safe.
    names = figure_names(odd.internal_nodes)
    assert names == figure_names(list(reversed(odd.internal_nodes)))
    assert names["root"] == "root" and names["x/y"] != names["x y"]


def test_figure_names_apart_on_case_insensitive_file_systems_and_long_names():
    from hiercls.report import figure_names

    names = figure_names(["Acute", "acute", "n" * 300, "ALL"])
    assert len({n.lower() for n in names.values()}) == 4
    assert names["ALL"] == "ALL" and len(names["n" * 300]) < 80
    # A node literally named like another node's hashed name still gets its own file.
    hashed = figure_names(["x/y"])["x/y"]
    clash = figure_names(["x/y", hashed])
    assert clash["x/y"].lower() != clash[hashed].lower()


def test_run_split_scores_the_last_checkpoint_by_default(tmp_path, capsys):
    """--split val: ``best`` was chosen on those images, so ``last`` is scored unless asked otherwise."""
    from conftest import fit_leukemia_smears

    run, data = fit_leukemia_smears(tmp_path, epochs=2, seed=2)
    epochs = {w: json.loads((run / "checkpoints" / f"{w}.json").read_text())["epoch"] for w in ("best", "last")}
    for extra, which in (((), "last"), (("--checkpoint", "best"), "best")):
        out = tmp_path / f"eval-{which}"
        assert _evaluate("--run", str(run), "--split", "val", "--out", str(out), "--no-progress", *extra) == 0
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["run"] == str(run.resolve()) and metrics["split"] == "val"
        assert (metrics["checkpoint"], metrics["epoch"]) == (which, epochs[which])
        assert f"**{which}** checkpoint (epoch {epochs[which]})" in (out / "report.md").read_text()
    assert epochs["last"] == 2
    # The run's own split is chosen, so no warning about training images.
    assert "training split" not in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _evaluate("--help")
    assert "default last with --split" in " ".join(capsys.readouterr().out.split())
