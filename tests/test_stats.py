"""Bootstrap confidence intervals, paired comparisons (hiercls.stats) and ``hiercls compare``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from hiercls.cli import main
from hiercls.metrics import hierarchical_prf, leaf_accuracy, macro_f1
from hiercls.predictions import write_predictions_csv
from hiercls.stats import headline_cis, mcnemar_exact, metric_ci, paired_comparison
from hiercls.taxonomy import load_taxonomy

REPO = Path(__file__).resolve().parents[1]
LEUKEMIA = REPO / "taxonomy" / "leukemia.yaml"


@pytest.fixture(scope="module")
def tax():
    return load_taxonomy(LEUKEMIA)


def _noisy(tax, labels: list[str], p_correct: float, rng: np.random.Generator) -> list[str]:
    """Each prediction is the label with probability ``p_correct``, else a random other leaf."""
    leaves = list(tax.leaves)
    out = []
    for label in labels:
        if rng.random() < p_correct:
            out.append(label)
        else:
            out.append(rng.choice([leaf for leaf in leaves if leaf != label]))
    return out


def _labels(tax, n: int, rng: np.random.Generator) -> list[str]:
    leaves = list(tax.leaves)
    return [leaves[i] for i in rng.integers(0, len(leaves), n)]


# -- the built-in metrics reproduce hiercls.metrics on every resample ------------------------


def test_builtin_bootstrap_equals_metrics_functions_on_each_resample(tax):
    """The weighted-count path and metrics.py on the resampled rows give the same intervals (same draws)."""
    rng = np.random.default_rng(3)
    labels = _labels(tax, 60, rng)
    labels[:4] = ["Acute", "Chronic", "Leukemia", "Acute"]  # partial labels
    preds = _noisy(tax, labels, 0.6, rng)
    preds[10:13] = ["Acute", "Leukemia", tax.root]  # predictions that stop early
    labels[20] = None  # unlabelled: left out
    groups = [f"s{i % 7}" for i in range(60)]
    functions = {
        "accuracy": lambda t, p: leaf_accuracy(tax, t, p),
        "macro_f1": lambda t, p: macro_f1(tax, t, p),
        "hP": lambda t, p: hierarchical_prf(tax, t, p)["hP"],
        "hF": lambda t, p: hierarchical_prf(tax, t, p)["hF"],
    }
    for grouping in (None, groups):
        for name, function in functions.items():
            fast = metric_ci(name, labels, preds, taxonomy=tax, groups=grouping, resamples=25, seed=5)
            slow = metric_ci(function, labels, preds, groups=grouping, resamples=25, seed=5)
            assert fast.estimate == pytest.approx(slow.estimate, abs=1e-12), name
            assert fast.low == pytest.approx(slow.low, abs=1e-12), name
            assert fast.high == pytest.approx(slow.high, abs=1e-12), name
            assert fast.n_valid == slow.n_valid == 25


def test_interval_is_seeded_and_records_how_it_was_made(tax):
    rng = np.random.default_rng(0)
    labels = _labels(tax, 100, rng)
    preds = _noisy(tax, labels, 0.7, rng)
    first = metric_ci("accuracy", labels, preds, taxonomy=tax, resamples=200, seed=11)
    again = metric_ci("accuracy", labels, preds, taxonomy=tax, resamples=200, seed=11)
    other = metric_ci("accuracy", labels, preds, taxonomy=tax, resamples=200, seed=12)
    assert first == again
    assert (first.low, first.high) != (other.low, other.high)
    assert first.resamples == 200 and first.seed == 11 and first.unit == "image" and first.n_units == 100
    assert first.method == "percentile bootstrap" and first.level == 0.95
    assert first.low < first.estimate < first.high


def test_metric_function_with_probabilities(tax):
    from hiercls.probabilities import NodeProbabilities

    rng = np.random.default_rng(1)
    probs = NodeProbabilities.from_leaf_probabilities(tax, rng.dirichlet(np.ones(len(tax.leaves)), size=40))
    labels = _labels(tax, 40, rng)
    leaf_columns = [tax.index[leaf] for leaf in tax.leaves]
    mean_confidence = lambda t, p, pr: float(pr.marginal[:, leaf_columns].max(axis=1).mean())  # noqa: E731
    ci = metric_ci(mean_confidence, labels, probs.decode(), probs=probs, resamples=50)
    assert ci.estimate == pytest.approx(mean_confidence(labels, None, probs))
    assert ci.low <= ci.estimate <= ci.high


# -- paired comparison ----------------------------------------------------------------------


def test_paired_test_finds_a_planted_difference(tax):
    rng = np.random.default_rng(7)
    labels = _labels(tax, 500, rng)
    a = _noisy(tax, labels, 0.7, rng)
    b = [t if rng.random() < 0.6 else p for t, p in zip(labels, a)]  # B fixes about 60 % of A's mistakes
    result = paired_comparison(tax, labels, a, b, resamples=500)
    assert result["mcnemar"]["p_value"] < 0.01
    assert result["mcnemar"]["b"] == 0 and result["mcnemar"]["c"] > 50
    for name, row in result["metrics"].items():
        assert row["difference"] > 0, name
        assert row["low"] > 0, name  # the CI excludes 0
        assert row["low"] <= row["difference"] <= row["high"]


def test_identical_prediction_sets_show_no_difference(tax):
    rng = np.random.default_rng(8)
    labels = _labels(tax, 300, rng)
    a = _noisy(tax, labels, 0.7, rng)
    result = paired_comparison(tax, labels, a, list(a), groups=[i // 10 for i in range(300)], resamples=300)
    assert result["mcnemar"] == {**result["mcnemar"], "b": 0, "c": 0, "p_value": 1.0}
    for row in result["metrics"].values():
        assert row["difference"] == 0 and row["low"] == 0 and row["high"] == 0
    assert result["bootstrap"]["unit"] == "group" and result["bootstrap"]["n_units"] == 30


def test_mcnemar_exact_matches_the_binomial_formula():
    # 10 discordant pairs all one way: two-sided p = 2 * 0.5**10.
    a = [True] * 10 + [True, False] * 5
    b = [False] * 10 + [True, False] * 5
    result = mcnemar_exact(a, b)
    assert (result["b"], result["c"]) == (10, 0)
    assert result["p_value"] == pytest.approx(2 * 0.5**10)
    assert mcnemar_exact([True, False], [False, True])["p_value"] == pytest.approx(1.0)


# -- coverage and clustering ----------------------------------------------------------------


def test_intervals_cover_the_true_value_at_about_the_nominal_rate(tax):
    """200 seeded simulated test sets: the 95 % intervals of accuracy and hF hold the population value."""
    rng = np.random.default_rng(2024)
    p_correct = 0.75
    population_labels = _labels(tax, 30_000, rng)
    true_hf = hierarchical_prf(tax, population_labels, _noisy(tax, population_labels, p_correct, rng))["hF"]
    covered = {"accuracy": 0, "hF": 0}
    repetitions = 200
    for rep in range(repetitions):
        labels = _labels(tax, 150, rng)
        preds = _noisy(tax, labels, p_correct, rng)
        truth = {"accuracy": p_correct, "hF": true_hf}
        for name in covered:
            ci = metric_ci(name, labels, preds, taxonomy=tax, resamples=400, seed=rep)
            covered[name] += ci.low <= truth[name] <= ci.high
    for name, hits in covered.items():
        assert 0.88 <= hits / repetitions <= 0.99, (name, hits)
    print(f"coverage over {repetitions} simulated test sets: {covered}")


def test_group_bootstrap_is_wider_on_clustered_data(tax):
    """Slides differ in difficulty: resampling images ignores that and is too narrow."""
    rng = np.random.default_rng(5)
    labels, preds, groups = [], [], []
    for slide in range(30):
        p_slide = rng.beta(2, 2)  # strong slide effect
        slide_labels = _labels(tax, 20, rng)
        labels += slide_labels
        preds += _noisy(tax, slide_labels, p_slide, rng)
        groups += [f"slide{slide}"] * 20
    by_image = metric_ci("accuracy", labels, preds, taxonomy=tax, resamples=500)
    by_group = metric_ci("accuracy", labels, preds, taxonomy=tax, groups=groups, resamples=500)
    assert by_group.unit == "group" and by_group.n_units == 30
    assert by_group.estimate == by_image.estimate
    assert (by_group.high - by_group.low) > 1.5 * (by_image.high - by_image.low)


# -- the command line -----------------------------------------------------------------------


def _write(path: Path, paths, labels, preds, groups=None) -> Path:
    write_predictions_csv(path, None, paths, labels, groups, preds)
    return path


@pytest.fixture
def two_sets(tax, tmp_path):
    rng = np.random.default_rng(9)
    labels = _labels(tax, 120, rng)
    a = _noisy(tax, labels, 0.6, rng)
    b = [t if rng.random() < 0.7 else p for t, p in zip(labels, a)]
    paths = [f"img{i}.jpg" for i in range(120)]
    groups = [f"slide{i // 6}" for i in range(120)]
    return (
        _write(tmp_path / "a.csv", paths, labels, a, groups),
        _write(tmp_path / "b.csv", paths[::-1], labels[::-1], b[::-1], groups[::-1]),  # other row order
        (labels, a, b, groups),
    )


def test_cli_compare_prints_and_writes_the_comparison(tax, two_sets, tmp_path, capsys):
    csv_a, csv_b, (labels, a, b, groups) = two_sets
    out = tmp_path / "cmp"
    code = main(["compare", str(csv_a), str(csv_b), "--taxonomy", str(LEUKEMIA), "--group-by", "group",
                 "--resamples", "200", "--seed", "3", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "McNemar" in printed and "macro_f1" in printed and "95% CI" in printed
    result = json.loads((out / "comparison.json").read_text())
    expected = paired_comparison(tax, labels, a, b, groups=groups, resamples=200, seed=3)
    for name, row in expected["metrics"].items():
        assert result["metrics"][name] == pytest.approx(row), name
    assert result["mcnemar"] == expected["mcnemar"]
    assert result["bootstrap"] == {**expected["bootstrap"], "unit": "group", "n_units": 20}
    assert f"b = {expected['mcnemar']['b']}" in printed


def test_cli_compare_refuses_sets_on_different_images(two_sets, tmp_path, capsys):
    csv_a, _, (labels, a, _, _) = two_sets
    other = _write(tmp_path / "other.csv", [f"img{i}.jpg" for i in range(3, 125)], labels[:2] + labels, a[:2] + a)
    code = main(["compare", str(csv_a), str(other), "--taxonomy", str(LEUKEMIA)])
    assert code == 2
    err = capsys.readouterr().err
    assert "not on the same images" in err and "3 only in A" in err and "5 only in B" in err
    assert not (tmp_path / "cmp").exists()


def test_cli_compare_reads_run_folders_and_pools_folds(tax, tmp_path, capsys):
    """cv model folders: fold<k>/predictions.csv matched by fold, pooled; taxonomy.yaml found in the cells."""
    rng = np.random.default_rng(4)
    pooled = {"labels": [], "a": [], "b": []}
    for model, p_correct in (("flat", 0.5), ("joint", 0.8)):
        for fold in range(2):
            cell = tmp_path / model / f"fold{fold}"
            cell.mkdir(parents=True)
            (cell / "taxonomy.yaml").write_text(LEUKEMIA.read_text())
            fold_rng = np.random.default_rng(fold)
            labels = _labels(tax, 40, fold_rng)
            preds = _noisy(tax, labels, p_correct, rng)
            _write(cell / "predictions.csv", [f"f{fold}_{i}.jpg" for i in range(40)], labels, preds)
            if model == "flat":
                pooled["labels"] += labels
            pooled["a" if model == "flat" else "b"] += preds
    out = tmp_path / "cmp"
    flat, joint = str(tmp_path / "flat"), str(tmp_path / "joint")
    assert main(["compare", flat, joint, "--resamples", "100", "--out", str(out)]) == 0
    result = json.loads((out / "comparison.json").read_text())
    assert set(result["A"]) == {"fold0", "fold1"} and result["n_images"] == 80
    expected = paired_comparison(tax, pooled["labels"], pooled["a"], pooled["b"], resamples=100)
    assert result["mcnemar"] == expected["mcnemar"]
    assert result["metrics"]["accuracy"]["difference"] == pytest.approx(expected["metrics"]["accuracy"]["difference"])
    # A fold missing on one side is refused.
    (tmp_path / "joint" / "fold1" / "predictions.csv").rename(tmp_path / "joint" / "fold1" / "kept.csv")
    assert main(["compare", str(tmp_path / "flat"), str(tmp_path / "joint")]) == 2
    assert "same folds" in capsys.readouterr().err


def test_cli_evaluate_ci_adds_intervals(tax, two_sets, tmp_path, capsys):
    csv_a, _, (labels, a, _, groups) = two_sets
    out = tmp_path / "eval"
    assert main(["evaluate", "--predictions", str(csv_a), "--taxonomy", str(LEUKEMIA), "--out", str(out),
                 "--group-by", "group", "--ci"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["ci"]) == {"accuracy", "macro_f1", "hP", "hR", "hF"}
    for name, ci in metrics["ci"].items():
        assert ci["estimate"] == pytest.approx(metrics[name])
        assert ci["low"] <= ci["estimate"] <= ci["high"]
        assert ci["resamples"] == 1000 and ci["unit"] == "group" and ci["n_units"] == 20
    assert metrics["ci"] == headline_cis(tax, labels, a, groups=groups)
    assert "95% CI" in capsys.readouterr().out


def test_cli_compare_pools_seeds_matched_by_pattern(tax, tmp_path):
    """``'OUT/seed*/model'``: every seed's folds, named seed<s>/fold<k> on both sides, pooled; copies of an image
    from several seeds are one bootstrap unit."""
    rng = np.random.default_rng(6)
    labels = _labels(tax, 30, rng)
    pooled: dict[str, list] = {"labels": [], "a": [], "b": [], "paths": []}
    for seed in range(2):
        for model, p_correct in (("flat", 0.5), ("joint", 0.8)):
            preds = _noisy(tax, labels, p_correct, rng)
            cell = tmp_path / "cv" / f"seed{seed}" / model / "fold0"
            cell.mkdir(parents=True)
            _write(cell / "predictions.csv", [f"img{i}.jpg" for i in range(30)], labels, preds)
            pooled["a" if model == "flat" else "b"] += preds
        pooled["labels"] += labels
        pooled["paths"] += [f"img{i}.jpg" for i in range(30)]
    out = tmp_path / "cmp"
    pattern = str(tmp_path / "cv" / "seed*" / "{}")
    assert main(["compare", pattern.format("flat"), pattern.format("joint"), "--taxonomy", str(LEUKEMIA),
                 "--resamples", "100", "--out", str(out)]) == 0
    result = json.loads((out / "comparison.json").read_text())
    assert set(result["A"]) == set(result["B"]) == {"seed0/fold0", "seed1/fold0"}
    assert result["n_images"] == 60 and result["bootstrap"]["n_units"] == 30
    expected = paired_comparison(tax, pooled["labels"], pooled["a"], pooled["b"], groups=pooled["paths"],
                                 resamples=100)
    assert result["mcnemar"] == expected["mcnemar"]
    assert result["metrics"]["hF"] == pytest.approx(expected["metrics"]["hF"])
