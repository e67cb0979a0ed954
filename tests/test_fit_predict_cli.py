"""`hiercls fit` and `hiercls predict` end to end through the command line."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from hiercls.cli import main
from hiercls.probabilities import NodeProbabilities
from hiercls.taxonomy import load_taxonomy

from conftest import write_smears  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LEUKEMIA = REPO / "taxonomy" / "leukemia.yaml"
LABELS = ("Normal", "Reactive", "ALL", "AML", "APML", "CLL", "CML", "Acute")


@pytest.fixture(scope="module")
def smears(tmp_path_factory) -> Path:
    return write_smears(tmp_path_factory.mktemp("cli") / "data", LABELS, per_label=3, seed=1)


def fit_args(smears: Path, out: Path, *extra: str) -> list[str]:
    return [
        "fit", "--taxonomy", str(LEUKEMIA), "--data", str(smears), "--out", str(out), "--backbone", "test_resnet",
        "--img-size", "16", "--epochs", "1", "--batch-size", "8", "--device", "cpu", "--group-regex", r"^(slide\d)_",
        "--val-fraction", "0.34", "--cache-dir", str(out.parent / "cache"), "--no-progress", *extra,
    ]


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


@pytest.mark.parametrize("strategy", ["flat", "per_node", "per_level", "joint"])
def test_fit_then_predict_every_strategy(strategy, smears, tmp_path):
    run = tmp_path / "run"
    assert main(fit_args(smears, run, "--strategy", strategy)) == 0
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1
    for name in ("best.safetensors", "best.json", "last.safetensors", "last.json", "last.state.pt"):
        assert (run / "checkpoints" / name).is_file(), name
    assert json.loads((run / "checkpoints" / "best.json").read_text())["strategy"] == strategy

    preds = tmp_path / "preds.csv"
    assert main(["predict", "--run", str(run), "--data", str(smears), "--out", str(preds), "--device", "cpu",
                 "--group-regex", r"^(slide\d)_", "--no-progress"]) == 0
    columns, rows = read_csv(preds)
    taxonomy = load_taxonomy(LEUKEMIA)
    assert columns == ["path", "label", "group", "prediction"] + [f"p:{n}" for n in taxonomy.nodes[1:]]
    assert len(rows) == len(LABELS) * 3
    assert {r["label"] for r in rows} == set(LABELS)
    assert {r["group"] for r in rows} == {"slide0", "slide1", "slide2"}
    marginal = np.array([[1.0] + [float(r[f"p:{n}"]) for n in taxonomy.nodes[1:]] for r in rows])
    probs = NodeProbabilities.from_marginals(taxonomy, marginal)
    assert probs.consistency_error() < 1e-4
    assert [r["prediction"] for r in rows] == probs.decode("greedy")


def test_predict_csv_matches_the_loaded_run(smears, tmp_path):
    from hiercls.data import load_images
    from hiercls.inference import load_run, predict_table

    run = tmp_path / "run"
    assert main(fit_args(smears, run)) == 0
    preds = tmp_path / "p.csv"
    assert main(["predict", "--run", str(run), "--data", str(smears), "--out", str(preds), "--no-progress",
                 "--checkpoint", "last", "--decode", "best_leaf"]) == 0
    loaded = load_run(run, "last")
    table = load_images(smears, taxonomy=loaded.taxonomy)
    probs = predict_table(loaded, table, device="cpu", progress=False)
    _, rows = read_csv(preds)
    from_csv = np.array([[float(r[f"p:{n}"]) for n in loaded.taxonomy.nodes[1:]] for r in rows])
    assert np.allclose(from_csv, probs.marginal[:, 1:], rtol=1e-5, atol=1e-7)
    assert [r["prediction"] for r in rows] == probs.decode("best_leaf")
    assert all(r["prediction"] in loaded.taxonomy.leaves for r in rows)


def test_fit_refuses_existing_run_and_resume_continues(smears, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(fit_args(smears, run)) == 0
    capsys.readouterr()
    assert main(fit_args(smears, run)) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["fit", "--out", str(run), "--resume", "--epochs", "2", "--no-progress"]) == 0
    assert [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert main(["fit", "--out", str(run), "--resume", "--lr", "0.5"]) == 2
    assert "--lr cannot change when resuming" in capsys.readouterr().err
    assert main(fit_args(smears, run, "--overwrite")) == 0
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1


def test_predict_without_checkpoint_exits_2_with_message(smears, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(fit_args(smears, run)) == 0
    shutil.rmtree(run / "checkpoints")
    capsys.readouterr()
    code = main(["predict", "--run", str(run), "--data", str(smears), "--out", str(tmp_path / "p.csv")])
    err = capsys.readouterr().err
    assert code == 2
    assert str(run) in err.replace("\n", "") and "no finished 'best' checkpoint" in err
    assert "Traceback" not in err
    assert not (tmp_path / "p.csv").exists()


def test_predict_refuses_to_overwrite_and_unknown_run(smears, tmp_path, capsys):
    out = tmp_path / "p.csv"
    out.write_text("mine")
    assert main(["predict", "--run", str(tmp_path), "--data", str(smears), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err and out.read_text() == "mine"
    assert main(["predict", "--run", str(tmp_path), "--data", str(smears), "--out", str(tmp_path / "q.csv")]) == 2
    assert "not a hiercls run" in capsys.readouterr().err


def test_checkpoint_from_another_tree_is_refused(smears, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(fit_args(smears, run)) == 0
    meta_path = run / "checkpoints" / "best.json"
    meta = json.loads(meta_path.read_text())
    meta["backbone"] = "resnet50"
    meta_path.write_text(json.dumps(meta))
    capsys.readouterr()
    assert main(["predict", "--run", str(run), "--data", str(smears), "--out", str(tmp_path / "p.csv")]) == 2
    assert "backbone 'resnet50' disagrees" in capsys.readouterr().err
    meta["backbone"] = "test_resnet"
    meta["taxonomy_fingerprint"] = "0" * 16
    meta_path.write_text(json.dumps(meta))
    assert main(["predict", "--run", str(run), "--data", str(smears), "--out", str(tmp_path / "p.csv")]) == 2
    assert "fingerprint" in capsys.readouterr().err


def test_fit_user_mistakes_exit_2(smears, tmp_path, capsys):
    assert main(["fit", "--data", str(smears), "--out", str(tmp_path / "r")]) == 2
    assert "--taxonomy" in capsys.readouterr().err
    assert main(fit_args(smears, tmp_path / "r", "--lr", "-1")) == 2
    assert "--lr" in capsys.readouterr().err
    config = tmp_path / "c.yaml"
    config.write_text("taxonomy: x.yaml\nepochz: 3\n")
    assert main(["fit", "--config", str(config), "--data", str(smears), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "epochz" in err and str(config) in err.replace("\n", "")


def test_predict_accuracy_leaves_partial_labels_out_like_evaluate():
    from hiercls.cli.predict import accuracy_summary
    from hiercls.metrics import evaluate_predictions

    taxonomy = load_taxonomy(LEUKEMIA)
    labels, preds = ["ALL", "ALL", "Acute", None], ["ALL", "AML", "Acute", "CML"]
    summary = accuracy_summary(taxonomy, labels, preds)
    expected = evaluate_predictions(taxonomy, labels, preds)["accuracy"]
    assert expected == 0.5 and summary.startswith("exact-match accuracy on 2 images labelled at a leaf: 0.500")
    assert "1 partial label(s) left out" in summary
    assert accuracy_summary(taxonomy, [None], ["ALL"]) is None
    assert accuracy_summary(taxonomy, ["Acute"], ["ALL"]).startswith("no image labelled at a leaf")


def _relabel(rows: list[dict[str, str]], taxonomy) -> list[tuple[str, str]]:
    """(path, label) per row, labels chosen from the predictions: right leaves, wrong leaves, partial labels."""
    out = []
    for k, row in enumerate(rows):
        pred = row["prediction"]
        if k % 3 == 0:
            label = pred  # right
        elif k % 3 == 1:
            label = next(leaf for leaf in taxonomy.leaves if leaf != pred)  # wrong
        else:
            label = "Acute" if pred != "Acute" else "Chronic"  # a partial label (an internal node)
        out.append((row["path"], label))
    return out


def test_predict_warns_about_training_images_and_matches_evaluate_accuracy(tmp_path, capsys):
    data = write_smears(tmp_path / "data", LABELS[:-1], per_label=3, seed=4)
    run = tmp_path / "run"
    assert main(fit_args(data, run)) == 0
    n_train = len(json.loads((run / "split.json").read_text())["train"])
    capsys.readouterr()
    probe = tmp_path / "probe.csv"
    assert main(["predict", "--run", str(run), "--data", str(data), "--out", str(probe), "--no-progress"]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert f"{n_train} of 21 image(s) were in the run's training split" in err
    assert "validation images, on which the best checkpoint was chosen" in err

    # A manifest with partial labels, made from the predictions so some leaf labels are right.
    taxonomy = load_taxonomy(LEUKEMIA)
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("path,label\n" + "".join(f"{p},{lab}\n" for p, lab in _relabel(read_csv(probe)[1], taxonomy)))
    preds = tmp_path / "preds.csv"
    assert main(["predict", "--run", str(run), "--data", str(manifest), "--out", str(preds), "--no-progress"]) == 0
    printed = re.search(r"labelled at a leaf: (\d\.\d{3})", " ".join(capsys.readouterr().err.split())).group(1)
    assert main(["evaluate", "--predictions", str(preds), "--taxonomy", str(LEUKEMIA),
                 "--out", str(tmp_path / "e1")]) == 0
    assert main(["evaluate", "--run", str(run), "--data", str(manifest), "--out", str(tmp_path / "e2"),
                 "--no-progress"]) == 0
    from_csv = json.loads((tmp_path / "e1" / "metrics.json").read_text())["accuracy"]
    from_run = json.loads((tmp_path / "e2" / "metrics.json").read_text())
    assert printed == f"{from_csv:.3f}" == f"{from_run['accuracy']:.3f}"
    # 21 rows: 7 right, 7 wrong leaves, 7 partial labels left out (counting them would give 7 / 21).
    assert from_csv == pytest.approx(7 / 14)
    assert any("were in the run's training split" in n for n in from_run["notes"])
    assert (from_run["checkpoint"], from_run["epoch"]) == ("best", 1) and from_run["split"] is None


def test_run_image_warnings_from_split_json(tmp_path, monkeypatch):
    from hiercls import inference

    images = [tmp_path / f"i{k}.jpg" for k in range(5)]
    (tmp_path / "split.json").write_text(json.dumps({"train": [str(p) for p in images[:2]], "val": [str(images[2])]}))
    warnings = inference.run_image_warnings(tmp_path, images[1:], "best")
    assert len(warnings) == 2 and warnings[0].startswith("1 of 4 image(s) were in the run's training split")
    assert warnings[1].startswith("1 of 4 image(s) are the run's validation images")
    assert inference.run_image_warnings(tmp_path, images[1:], "last") == warnings[:1]
    assert inference.run_image_warnings(tmp_path, images[3:], "best") == []
    # An edited, broken or oversized split.json: a one-line reason, never a traceback.
    (tmp_path / "split.json").write_text('{"train": 3, "val": []}')
    assert "cannot check which images" in inference.run_image_warnings(tmp_path, images, "best")[0]
    monkeypatch.setattr(inference, "MAX_SPLIT_BYTES", 4)
    with pytest.raises(inference.CheckpointError, match="larger than"):
        inference.read_run_split(tmp_path)
