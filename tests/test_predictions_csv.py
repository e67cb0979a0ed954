"""The predictions CSV: round trip, and one clear error per kind of broken file."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from hiercls.errors import DataError
from hiercls.predictions import read_predictions_csv, write_predictions_csv
from hiercls.probabilities import NodeProbabilities
from hiercls.taxonomy import Taxonomy, load_taxonomy

TAXONOMY = Path(__file__).resolve().parents[1] / "taxonomy" / "leukemia.yaml"


@pytest.fixture(scope="module")
def tax() -> Taxonomy:
    return load_taxonomy(TAXONOMY)


def _probs(tax: Taxonomy, n: int, seed: int = 0) -> NodeProbabilities:
    rng = np.random.default_rng(seed)
    return NodeProbabilities.from_leaf_probabilities(tax, rng.dirichlet(np.ones(len(tax.leaves)), size=n))


def _write_sample(tax: Taxonomy, path: Path, n: int = 6) -> NodeProbabilities:
    probs = _probs(tax, n)
    labels = ["ALL", None, "Acute", "CML", "Normal", "APML"][:n]
    groups = ["s1", "s1", None, "s2", "s2", "s3"][:n]
    write_predictions_csv(path, probs, [f"img/{i}.jpg" for i in range(n)], labels, groups, probs.decode())
    return probs


def _rows(path: Path) -> list[list[str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.reader(handle))


def _save_rows(path: Path, rows: list[list[str]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        csv.writer(handle, lineterminator="\n").writerows(rows)


def test_round_trip(tax, tmp_path):
    path = tmp_path / "preds.csv"
    probs = _write_sample(tax, path)
    header = _rows(path)[0]
    assert header[:4] == ["path", "label", "group", "prediction"]
    assert header[4:] == [f"p:{n}" for n in tax.nodes if n != tax.root]
    back = read_predictions_csv(path, tax)
    assert back.paths == [f"img/{i}.jpg" for i in range(6)]
    assert back.labels == ["ALL", None, "Acute", "CML", "Normal", "APML"]
    assert back.groups == ["s1", "s1", None, "s2", "s2", "s3"]
    assert back.predictions == probs.decode()
    np.testing.assert_allclose(back.probs.marginal, probs.marginal, atol=1e-6)
    np.testing.assert_allclose(back.probs.conditional, probs.conditional, atol=1e-4)
    assert [p.name for p in tmp_path.iterdir()] == ["preds.csv"]  # no temporary file left behind


def test_without_probability_columns_and_with_extra_columns(tax, tmp_path):
    path = tmp_path / "preds.csv"
    _save_rows(path, [["path", "label", "prediction", "patient"], ["a.jpg", "APL", "ALL", "P1"], ["b.jpg", "", "root", "P2"]])
    back = read_predictions_csv(path, tax)
    assert back.probs is None
    assert back.labels == ["APML", None]  # the alias resolves to its node
    assert back.predictions == ["ALL", "root"]  # a prediction may stop at the root
    assert back.groups == [None, None]
    assert back.extra == {"patient": ["P1", "P2"]}
    assert len(back.subset([1])) == 1 and back.subset([1]).extra == {"patient": ["P2"]}


def test_missing_file_and_missing_columns(tax, tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_predictions_csv(tmp_path / "nope.csv", tax)
    path = tmp_path / "preds.csv"
    _save_rows(path, [["path", "label"], ["a.jpg", "ALL"]])
    with pytest.raises(DataError, match=r"preds\.csv: missing required column\(s\) prediction"):
        read_predictions_csv(path, tax)


def test_probability_columns_of_another_taxonomy(tax, tmp_path):
    other = Taxonomy.from_nested({"benign": {}, "malignant": {"pre_b": {}, "pro_b": {}}}, name="all")
    path = tmp_path / "preds.csv"
    probs = _probs(other, 2)
    write_predictions_csv(path, probs, ["a", "b"], None, None, ["benign", "pre_b"])
    with pytest.raises(DataError) as info:
        read_predictions_csv(path, tax)
    message = str(info.value)
    assert "p:benign" in message and "p:Normal" in message and "another taxonomy" in message


def test_unknown_labels_and_predictions_are_listed_with_counts(tax, tmp_path):
    path = tmp_path / "preds.csv"
    _save_rows(path, [["path", "label", "prediction"], ["a", "Lymphoma", "ALL"], ["b", "Lymphoma", "ALL"], ["c", "AML", "ALL"]])
    with pytest.raises(DataError, match=r"'Lymphoma' x2"):
        read_predictions_csv(path, tax)
    _save_rows(path, [["path", "label", "prediction"], ["a", "AML", "AMLL"]])
    with pytest.raises(DataError, match=r"column prediction.*'AMLL' x1.*closest: AML"):
        read_predictions_csv(path, tax)
    _save_rows(path, [["path", "label", "prediction"], ["a", "AML", "ALL"], ["b", "AML", ""]])
    with pytest.raises(DataError, match=r"preds\.csv:3: empty prediction"):
        read_predictions_csv(path, tax)


def test_non_numeric_probability_names_the_line(tax, tmp_path):
    path = tmp_path / "preds.csv"
    _write_sample(tax, path, n=3)
    rows = _rows(path)
    rows[2][rows[0].index("p:AML")] = "high"
    _save_rows(path, rows)
    with pytest.raises(DataError, match=r"preds\.csv:3: column p:AML holds 'high'"):
        read_predictions_csv(path, tax)


def test_inconsistent_probabilities_name_the_line(tax, tmp_path):
    path = tmp_path / "preds.csv"
    _write_sample(tax, path, n=3)
    rows = _rows(path)
    col = rows[0].index("p:Acute")
    rows[3][col] = f"{float(rows[3][col]) + 0.01:.6g}"  # parent no longer the sum of its children
    _save_rows(path, rows)
    with pytest.raises(DataError, match=r"preds\.csv:4: inconsistent probabilities: .*p:Acute = [0-9.]+ but its children sum to"):
        read_predictions_csv(path, tax)
    # A tiny rounding difference (< 1e-3) is accepted.
    rows[3][col] = f"{float(rows[3][col]) - 0.0099:.6g}"
    _save_rows(path, rows)
    read_predictions_csv(path, tax)


def test_top_level_must_sum_to_one(tax, tmp_path):
    path = tmp_path / "preds.csv"
    probs = NodeProbabilities.from_leaf_probabilities(tax, np.full((1, len(tax.leaves)), 0.2))
    write_predictions_csv(path, probs, ["a"], None, None, ["ALL"])
    with pytest.raises(DataError, match=r"preds\.csv:2: .*top-level probabilities sum to 1\.4"):
        read_predictions_csv(path, tax)


def test_row_with_wrong_number_of_fields(tax, tmp_path):
    path = tmp_path / "preds.csv"
    path.write_text("path,label,prediction\na.jpg,ALL,ALL,extra\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"preds\.csv:2: 4 fields but the header has 3"):
        read_predictions_csv(path, tax)


def test_write_replaces_atomically_and_checks_lengths(tax, tmp_path):
    path = tmp_path / "preds.csv"
    path.write_text("old content\n", encoding="utf-8")
    probs = _probs(tax, 2)
    with pytest.raises(ValueError, match="predictions"):
        write_predictions_csv(path, probs, ["a", "b"], None, None, ["ALL"])
    assert path.read_text(encoding="utf-8") == "old content\n"
    write_predictions_csv(path, probs, ["a", "b"], None, None, ["ALL", "AML"])
    assert read_predictions_csv(path, tax).predictions == ["ALL", "AML"]
