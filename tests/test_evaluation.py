"""``hiercls.evaluation``: one pipeline behind ``hiercls evaluate``, ``hiercls cv`` and the estimator."""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest

from hiercls.cli import main
from hiercls.errors import ConfigError
from hiercls.evaluation import Evaluation, evaluate_prediction_set, evaluate_run, write_evaluation
from hiercls.metrics import hierarchical_prf
from hiercls.predictions import PredictionSet
from hiercls.probabilities import NodeProbabilities

from conftest import fit_leukemia_smears

REPO = Path(__file__).resolve().parents[1]
LEUKEMIA = REPO / "taxonomy" / "leukemia.yaml"
GROUP_REGEX = r"^(slide\d)_"
RUN_PROVENANCE = {"run", "checkpoint", "epoch", "strategy", "backbone", "img_size", "loss", "data", "taxonomy",
                  "taxonomy_fingerprint", "hiercls_version", "torch_version", "timm_version", "date"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """A one-epoch run of a tiny backbone on 12 smears of 3 slides: (run folder, data folder)."""
    return fit_leukemia_smears(tmp_path_factory.mktemp("evaluation"), epochs=1, seed=3)


def _without_date(metrics: dict) -> dict:
    return {**metrics, "provenance": {k: v for k, v in metrics["provenance"].items() if k != "date"}}


# -- a run: the library and the command line write the same files ------------------------------


def test_evaluate_run_writes_what_the_command_line_writes(trained, tmp_path):
    run, data = trained
    cli_out, api_out = tmp_path / "cli", tmp_path / "api"
    assert main(["evaluate", "--run", str(run), "--data", str(data), "--out", str(cli_out), "--device", "cpu",
                 "--group-by", "group", "--group-regex", GROUP_REGEX, "--ci", "--no-progress"]) == 0
    evaluation = evaluate_run(run, data=data, group_by="group", group_regex=GROUP_REGEX, ci=True, device="cpu")
    written = write_evaluation(evaluation, api_out)

    assert isinstance(evaluation, Evaluation) and evaluation.run_dir == run.resolve()
    assert {"metrics.json", "report.md", "predictions.csv", "confusion_leaves.png"} <= set(written)
    assert all(path.parent == api_out and path.is_file() for path in written.values())
    from_cli = json.loads((cli_out / "metrics.json").read_text())
    from_api = json.loads(written["metrics.json"].read_text())
    assert _without_date(from_api) == _without_date(from_cli)
    assert from_api["groups"]["n_groups"] == 3 and from_api["ci"]
    assert (api_out / "predictions.csv").read_text() == (cli_out / "predictions.csv").read_text()
    undated = [re.sub(r"\d{4}-\d\d-\d\dT[\d:]+\+00:00", "DATE", (folder / "report.md").read_text())
               for folder in (api_out, cli_out)]
    assert undated[0] == undated[1] and "DATE" in undated[0]  # the same report, made at another second
    assert evaluation.metrics == from_api  # what metrics.json holds
    assert evaluation.group_values == [f"slide{k}" for k in range(3)] * 4


def test_run_provenance_names_the_model_the_data_and_the_versions(trained, tmp_path):
    run, data = trained
    evaluation = evaluate_run(run, split="val")
    prov = evaluation.metrics["provenance"]
    assert RUN_PROVENANCE | {"split"} <= set(prov) and prov == evaluation.provenance
    assert (prov["run"], prov["checkpoint"], prov["split"]) == (str(run.resolve()), "last", "val")
    assert (prov["strategy"], prov["backbone"], prov["img_size"], prov["loss"]) == ("joint", "test_resnet", 16, "ce")
    assert prov["data"] == str(data) and prov["taxonomy"] == str(LEUKEMIA)
    assert prov["taxonomy_fingerprint"] == evaluation.taxonomy.fingerprint
    assert prov["epoch"] == 1 and "predictions" not in prov  # predicted here, not read from a CSV
    assert datetime.fromisoformat(prov["date"]).utcoffset() == timezone.utc.utcoffset(None)
    # the top-level keys that reports and older readers use stay
    assert {k: evaluation.metrics[k] for k in ("run", "checkpoint", "epoch", "split")} == {
        k: prov[k] for k in ("run", "checkpoint", "epoch", "split")}
    written = write_evaluation(evaluation, tmp_path / "val")
    assert "**last** checkpoint (epoch 1)" in written["report.md"].read_text()


def test_evaluate_run_refuses_another_tree_before_predicting(trained, tiny_taxonomy_file):
    run, data = trained
    with pytest.raises(ConfigError, match="is not the tree run"):
        evaluate_run(run, data=data, taxonomy=tiny_taxonomy_file)
    with pytest.raises(ConfigError, match="needs --data"):
        evaluate_run(run)


# -- a hand-made prediction set ----------------------------------------------------------------


def _hand_made(tiny_taxonomy) -> PredictionSet:
    labels = ["cat", "dog", "tree", "flower", "animal", None]
    predictions = ["cat", "cat", "tree", "plant", "dog", "dog"]
    return PredictionSet([f"i{k}.png" for k in range(6)], labels, ["a", "a", "b", "b", "c", None], predictions,
                         None, extra={"patient": ["p1", "p1", "p1", "p2", "p2", ""]}, source="hand.csv")


def test_evaluate_prediction_set_scores_a_hand_made_set(tiny_taxonomy):
    preds = _hand_made(tiny_taxonomy)
    evaluation = evaluate_prediction_set(tiny_taxonomy, preds)
    metrics = evaluation.metrics
    # 4 leaf labels, 2 right (cat, tree); the partial label 'animal' and the unlabelled row are left out
    assert metrics["accuracy"] == 0.5 and metrics["n_images"] == 5
    expected = hierarchical_prf(tiny_taxonomy, preds.labels[:5], preds.predictions[:5])
    assert metrics["hF"] == pytest.approx(expected["hF"])
    assert metrics["auroc"] is None and "groups" not in metrics and evaluation.group_values is None
    prov = metrics["provenance"]
    assert prov["predictions"] == "hand.csv" and prov["taxonomy"] == "tiny.yaml"
    assert prov["taxonomy_fingerprint"] == tiny_taxonomy.fingerprint and "run" not in prov
    assert {"hiercls_version", "torch_version", "timm_version", "date"} <= set(prov)
    json.dumps(metrics)  # JSON-ready as it is


def test_write_evaluation_lists_the_files_it_wrote(tiny_taxonomy, tmp_path):
    stale = tmp_path / "confusion_at_gone.png"
    stale.write_bytes(b"from an earlier evaluation")
    written = write_evaluation(evaluate_prediction_set(tiny_taxonomy, _hand_made(tiny_taxonomy)), tmp_path, title="T")
    assert {"metrics.json", "report.md", "confusion_leaves.png", "confusion_at_animal.png"} <= set(written)
    assert "confusion_at_gone.png" not in written and "predictions.csv" not in written  # not predicted here
    assert not (tmp_path / "predictions.csv").exists() and (tmp_path / "report.md").read_text().startswith("# T")
    assert json.loads(written["metrics.json"].read_text())["provenance"]["predictions"] == "hand.csv"


def test_evaluate_prediction_set_groups_by_any_column(tiny_taxonomy):
    evaluation = evaluate_prediction_set(tiny_taxonomy, _hand_made(tiny_taxonomy), group_by="patient")
    groups = evaluation.metrics["groups"]
    assert groups["n_groups"] == 2 and groups["group_by"] == "patient" and groups["aggregator"] == "mode"
    assert evaluation.group_values == ["p1", "p1", "p1", "p2", "p2", None]
    with pytest.raises(ConfigError, match="has no column 'slide'"):
        evaluate_prediction_set(tiny_taxonomy, _hand_made(tiny_taxonomy), group_by="slide")


def test_decode_needs_probabilities_and_decodes_them(tiny_taxonomy):
    with pytest.raises(ConfigError, match="needs probabilities"):
        evaluate_prediction_set(tiny_taxonomy, _hand_made(tiny_taxonomy), decode="greedy")
    leaf_probs = np.array([[0.1, 0.2, 0.3, 0.4]] * 6)  # cat, dog, tree, flower: greedy -> plant -> flower
    preds = _hand_made(tiny_taxonomy)
    preds.probs = NodeProbabilities.from_leaf_probabilities(tiny_taxonomy, leaf_probs)
    evaluation = evaluate_prediction_set(tiny_taxonomy, preds, decode="greedy")
    assert evaluation.predictions.predictions == ["flower"] * 6 and preds.predictions[0] == "cat"
    assert evaluation.metrics["accuracy"] == 0.25


# -- the estimator ------------------------------------------------------------------------------


def test_estimator_score_is_the_pipelines_accuracy(trained):
    from hiercls import HierarchicalImageClassifier

    run, data = trained
    clf = HierarchicalImageClassifier.load(run)
    X = sorted(str(p) for p in data.rglob("*.jpg"))
    predicted = list(clf.predict(X))
    # a third right, a third wrong leaves, a third partial labels (an internal node)
    wrong = {leaf: next(other for other in clf.classes_ if other != leaf) for leaf in clf.classes_}
    y = [p if k % 3 == 0 else wrong[p] if k % 3 == 1 else "Leukemia" for k, p in enumerate(predicted)]
    expected = evaluate_prediction_set(
        clf.taxonomy_, PredictionSet(X, y, [None] * len(X), predicted, clf.predict_proba(X))
    ).metrics["accuracy"]
    assert clf.score(X, y) == expected == 0.5  # partial labels left out, as hiercls evaluate does
    assert clf.score(X, y, sample_weight=np.ones(len(X))) == expected
    metrics = clf.evaluate(X, y, groups=[Path(x).name.split("_")[0] for x in X])
    assert metrics["accuracy"] == expected and metrics["groups"]["n_groups"] == 3
    assert metrics["provenance"]["run"] == str(run.resolve()) and metrics["provenance"]["checkpoint"] == "best"


# -- calibration and selective prediction in the pipeline ----------------------------------------


def test_a_calibrated_run_is_scored_calibrated_and_flags_its_own_validation_images(trained, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained[0], run)
    assert main(["calibrate", "--run", str(run), "--checkpoint", "last", "--device", "cpu", "--no-progress"]) == 0
    temperatures = json.loads((run / "calibration.json").read_text())["temperatures"]

    calibrated = evaluate_run(run, split="val", device="cpu")
    raw = evaluate_run(run, split="val", device="cpu", calibrated=False)
    section = calibrated.metrics["calibration"]
    n_val = calibrated.metrics["n_images"]
    assert section["temperatures"] == temperatures and section["ece_after"] is not None
    assert section["n_fitted_on_scored"] == n_val  # every scored image was used to fit the temperatures
    assert any("fitted on" in note for note in calibrated.metrics["notes"])
    assert raw.metrics["calibration"]["ece_after"] is None and raw.metrics["calibration"]["n_fitted_on_scored"] == 0
    assert section["ece_before"] == raw.metrics["calibration"]["ece_before"]
    if any(abs(t - 1.0) > 1e-6 for t in temperatures.values()):
        assert not np.allclose(calibrated.predictions.probs.conditional, raw.predictions.probs.conditional)


def test_selective_table_and_target_accuracy(tiny_taxonomy):
    rng = np.random.default_rng(0)
    leaves = list(tiny_taxonomy.leaves)
    labels = [leaves[i % len(leaves)] for i in range(40)]
    scores = np.exp(rng.random((40, len(leaves))) * 4)
    probs = NodeProbabilities.from_leaf_probabilities(tiny_taxonomy, scores / scores.sum(1, keepdims=True))
    preds = PredictionSet([f"{i}.png" for i in range(40)], labels, [None] * 40, probs.decode("greedy"), probs,
                          source="hand-made")
    evaluation = evaluate_prediction_set(tiny_taxonomy, preds, target_accuracy=0.0)
    rows = evaluation.metrics["selective"]
    assert rows[0]["threshold"] == 0.0 and rows[0]["coverage"] == 1.0
    assert [r["coverage"] for r in rows] == sorted((r["coverage"] for r in rows), reverse=True)
    target = evaluation.metrics["selective_target"]
    assert target["threshold"] == 0.0 and target["row"] == rows[0]  # any accuracy reaches 0: the widest row
    assert evaluation.metrics["calibration"]["ece_after"] is None
    assert evaluation.metrics["calibration"]["ece_before"]["overall"] is not None
    with pytest.raises(ConfigError, match="needs probabilities"):
        evaluate_prediction_set(tiny_taxonomy, PredictionSet(preds.paths, labels, preds.groups, preds.predictions,
                                                             None, source="x.csv"), target_accuracy=0.9)


def test_evaluate_command_prints_the_target_threshold_and_refuses_misplaced_options(trained, tmp_path, capsys):
    run, data = trained
    assert main(["evaluate", "--run", str(run), "--data", str(data), "--out", str(tmp_path / "e"), "--device", "cpu",
                 "--target-accuracy", "0.0", "--no-progress"]) == 0
    printed = " ".join(capsys.readouterr().out.split())  # as one line, whatever the console's width
    assert "target accuracy 0.000: threshold 0.00 decides 100.0% of the images" in printed
    assert "ECE (leaves)" in printed and "e/report.html" in printed and "open it in a browser" in printed
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert metrics["selective_target"]["threshold"] == 0.0
    assert main(["evaluate", "--predictions", str(tmp_path / "e" / "predictions.csv"), "--taxonomy", str(LEUKEMIA),
                 "--out", str(tmp_path / "f"), "--no-calibration"]) == 2
    assert "--no-calibration goes with --run" in capsys.readouterr().err


def test_explain_puts_grad_cam_panels_of_misclassified_images_in_the_html_report(trained, tmp_path):
    run, data = trained
    out = tmp_path / "explained"
    assert main(["evaluate", "--run", str(run), "--data", str(data), "--out", str(out), "--device", "cpu",
                 "--explain", "2", "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    wrong = metrics["misclassified"]["rows"]
    html = (out / "report.html").read_text()
    panels = html.count("data:image/png")  # thumbnails are JPEG; Grad-CAM panels and figures are PNG
    assert main(["evaluate", "--run", str(run), "--data", str(data), "--out", str(tmp_path / "plain"),
                 "--device", "cpu", "--no-progress"]) == 0
    plain = (tmp_path / "plain" / "report.html").read_text().count("data:image/png")
    assert panels - plain == min(2, len(wrong))
    assert main(["evaluate", "--predictions", str(out / "predictions.csv"), "--taxonomy", str(LEUKEMIA),
                 "--out", str(tmp_path / "csv"), "--explain"]) == 2


def test_explain_panels_reuse_the_model_that_made_the_predictions(trained, monkeypatch):
    import hiercls.inference
    from hiercls.evaluation import misclassified_panels

    run, data = trained
    evaluation = evaluate_run(run, data=data, device="cpu")
    wrong = evaluation.metrics["misclassified"]["rows"]
    if not wrong:
        pytest.skip("the one-epoch model made no mistake on these images, so there is no panel to draw")

    def refuse(*args, **kwargs):
        raise AssertionError("the run was loaded a second time")

    monkeypatch.setattr(hiercls.inference, "load_run", refuse)
    panels = misclassified_panels(evaluation, limit=1, device="cpu")
    assert list(panels) == [wrong[0]["path"]] and panels[wrong[0]["path"]].startswith(b"\x89PNG")
    with pytest.raises(AssertionError, match="second time"):  # another checkpoint is another model
        misclassified_panels(evaluation, limit=1, device="cpu", checkpoint="last")
