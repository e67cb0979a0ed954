"""``hiercls evaluate``: no file of OUT is replaced without --overwrite, and the calibration line tells the truth."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from hiercls.cli import main
from hiercls.predictions import write_predictions_csv
from hiercls.probabilities import NodeProbabilities
from hiercls.taxonomy import load_taxonomy

REPO = Path(__file__).resolve().parents[1]
LEUKEMIA = REPO / "taxonomy" / "leukemia.yaml"


@pytest.fixture(scope="module")
def preds_csv(tmp_path_factory) -> Path:
    tax = load_taxonomy(LEUKEMIA)
    rng = np.random.default_rng(0)
    n = 30
    probs = NodeProbabilities.from_leaf_probabilities(tax, rng.dirichlet(np.full(len(tax.leaves), 0.5), size=n))
    labels = [tax.leaves[i] for i in rng.integers(0, len(tax.leaves), n)]
    path = tmp_path_factory.mktemp("preds") / "preds.csv"
    write_predictions_csv(path, probs, [f"img{i}.jpg" for i in range(n)], labels, [None] * n, probs.decode())
    return path


@pytest.fixture(scope="module")
def first_evaluation(preds_csv, tmp_path_factory) -> Path:
    """An evaluation folder as `evaluate` writes it: the list of every file it owns."""
    out = tmp_path_factory.mktemp("first") / "eval"
    assert _from_csv(preds_csv, out) == 0
    return out


def _from_csv(preds_csv: Path, out: Path, *extra: str) -> int:
    return main(["evaluate", "--predictions", str(preds_csv), "--taxonomy", str(LEUKEMIA), "--out", str(out), *extra])


def test_every_file_evaluate_writes_is_guarded(preds_csv, first_evaluation, tmp_path, capsys):
    written = sorted(p.name for p in first_evaluation.iterdir())
    assert {"metrics.json", "report.md", "report.html", "reliability.png", "confusion_leaves.png"} <= set(written)
    assert any(name.startswith("confusion_at_") for name in written)
    for name in written:
        out = tmp_path / f"out-{name}"
        out.mkdir()
        (out / name).write_bytes(b"mine")
        capsys.readouterr()
        assert _from_csv(preds_csv, out) == 2, name
        err = " ".join(capsys.readouterr().err.split())
        assert f"{out / name} already exists" in err and "--overwrite" in err
        assert [p.name for p in out.iterdir()] == [name]  # refused before any work
        assert (out / name).read_bytes() == b"mine"


def test_the_first_existing_file_is_named_and_overwrite_replaces(preds_csv, tmp_path, capsys):
    out = tmp_path / "eval"
    out.mkdir()
    (out / "report.html").write_text("mine")
    (out / "reliability.png").write_text("mine")
    assert _from_csv(preds_csv, out) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"{out / 'report.html'} already exists; pass --overwrite" in err
    assert (out / "report.html").read_text() == "mine" and (out / "reliability.png").read_text() == "mine"
    assert _from_csv(preds_csv, out, "--overwrite") == 0
    assert (out / "report.html").read_text() != "mine" and (out / "reliability.png").read_bytes() != b"mine"


def test_other_files_in_out_are_left_alone(preds_csv, tmp_path):
    out = tmp_path / "eval"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "photo.png").write_text("mine")
    assert _from_csv(preds_csv, out) == 0
    assert (out / "notes.txt").read_text() == "mine" and (out / "photo.png").read_text() == "mine"


def test_a_csv_ece_line_does_not_ask_to_calibrate_a_run(preds_csv, tmp_path, capsys):
    capsys.readouterr()
    assert _from_csv(preds_csv, tmp_path / "eval") == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("ECE (leaves)"))
    assert "hiercls calibrate" not in line and "as given" in line


# -- calibrate (best by default), then evaluate --split val (last by default) ------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    from conftest import fit_leukemia_smears

    run, _ = fit_leukemia_smears(tmp_path_factory.mktemp("calibrated"), epochs=2, seed=2)
    return run


def _ece_line(run: Path, out: Path, capsys, *extra: str) -> str:
    capsys.readouterr()
    assert main(["evaluate", "--run", str(run), "--split", "val", "--out", str(out), "--device", "cpu",
                 "--no-progress", *extra]) == 0
    return " ".join(next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("ECE (leaves)")).split())


def test_calibrate_then_evaluate_split_says_which_checkpoint_was_calibrated(run, tmp_path, capsys):
    # Without calibration.json: the command names the checkpoint that was scored.
    line = _ece_line(run, tmp_path / "before", capsys)
    assert f"not calibrated: `hiercls calibrate --run {run} --checkpoint last`" in line
    assert main(["calibrate", "--run", str(run), "--device", "cpu", "--no-progress"]) == 0
    assert json.loads((run / "calibration.json").read_text())["checkpoint"] == "best"  # as predict uses
    # The documented workflow: the summary says why, and both ways out, not the command just run.
    line = _ece_line(run, tmp_path / "after", capsys)
    assert "fitted on the best checkpoint and this is the last one" in line
    assert f"`hiercls calibrate --run {run} --checkpoint last` calibrates it" in line
    assert "--checkpoint best evaluates the calibrated one" in line
    # Following the second advice gives calibrated numbers.
    assert "after calibration" in _ece_line(run, tmp_path / "best", capsys, "--checkpoint", "best")
    assert "raw probabilities: --no-calibration" in _ece_line(run, tmp_path / "raw", capsys, "--checkpoint", "best",
                                                              "--no-calibration")
