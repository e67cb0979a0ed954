"""report.html's structure (html.parser, runs everywhere), the figures, and report.md's content.

``make_evaluation`` builds an ``Evaluation``-like object by hand (taxonomy, predictions with
probabilities, groups, metrics with calibration and selective tables, a run folder with
metrics.jsonl, a few real images and one missing); tests/test_report_browser.py reuses it.
"""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from hiercls.aggregate import evaluate_groups, get_aggregator
from hiercls.io import json_ready
from hiercls.metrics import evaluate_predictions
from hiercls.predictions import PredictionSet
from hiercls.probabilities import NodeProbabilities
from hiercls.taxonomy import Taxonomy

EVIL = "<script>alert('x')</script>"

TREE = {
    "name": "cells",
    "root": "root",
    "children": [
        {"name": "normal", "display_name": "Normal & healthy"},
        {"name": "blast", "display_name": "Blast cell, a long display name to wrap in the confusion matrix title",
         "children": [{"name": "myelo", "display_name": "Myeloblast"},
                      {"name": "lympho", "display_name": EVIL}]},
        {"name": "other"},
    ],
}


def write_png(path: Path, seed: int) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(path)
    return path


def make_evaluation(tmp_path: Path, n: int = 24, seed: int = 0, with_extras: bool = True) -> SimpleNamespace:
    """An evaluation of ``n`` images on the ``cells`` tree (display names with ``&`` and ``<script>``)."""
    taxonomy = Taxonomy.from_dict(TREE)
    rng = np.random.default_rng(seed)
    leaves = list(taxonomy.leaves)
    labels = [leaves[i] for i in rng.integers(0, len(leaves), n)]
    logits = rng.normal(0, 1, (n, len(leaves)))
    for i, label in enumerate(labels):
        logits[i, leaves.index(label)] += 1.5  # better than chance, with mistakes
    leaf_probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    probs = NodeProbabilities.from_leaf_probabilities(taxonomy, leaf_probs)
    predictions = probs.decode()
    paths = [str(write_png(tmp_path / "img" / f"cell_{i}.png", i)) for i in range(n)]
    first_wrong = next(i for i, (t, p) in enumerate(zip(labels, predictions)) if t != p)
    paths[first_wrong] = str(tmp_path / "img" / "moved_away.png")  # a missing image: a placeholder, not a crash
    groups = [f"slide{i % 4}" if i % 4 else f"patient {EVIL}" for i in range(n)]
    preds = PredictionSet(paths, labels, groups, predictions, probs, source="made in the test")
    metrics = evaluate_predictions(taxonomy, labels, predictions, probs)
    metrics["groups"] = evaluate_groups(taxonomy, groups, labels, predictions, probs, get_aggregator("mode"), "mode")
    run_dir = None
    if with_extras:
        bins = [{"bin_lo": k / 5, "bin_hi": (k + 1) / 5, "confidence": k / 5 + 0.1, "accuracy": k / 5 + 0.05 * (k % 2),
                 "count": 3 + k} for k in range(5)]
        metrics["calibration"] = {
            "ece_before": {"overall": 0.12, "depth 1": 0.10, "depth 2": 0.14},
            "ece_after": {"overall": 0.04, "depth 1": 0.03, "depth 2": 0.05},
            "temperatures": {"root": 1.7, "blast": 1.2},
            "warnings": ["temperatures fitted on 12 of the scored images"],
            "reliability": {"before": bins, "after": [dict(b, confidence=b["accuracy"]) for b in bins]},
        }
        metrics["selective"] = [{"threshold": t, "coverage": 1 - t / 2, "n_decided": int(n * (1 - t / 2)), "n": n,
                                 "accuracy": 0.6 + t / 3, "hF": 0.7 + t / 10} for t in (0.0, 0.3, 0.5, 0.7, 0.9)]
        metrics["selective_target"] = 0.8
        run_dir = tmp_path / "run"
        run_dir.mkdir()
        records = [{"epoch": e, "train_loss": {"joint": 2.0 / e}, "val_loss": 2.2 / e, "val_accuracy": 0.4 + e / 20,
                    "val_hF": 0.5 + e / 25} for e in range(1, 6)]
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + "not json\n")
    provenance = {"run": str(run_dir or ""), "checkpoint": "best", "epoch": 5, "strategy": "joint",
                  "backbone": "resnet18", "data": f"{tmp_path}/manifest.csv", "date": "2026-12-01T20:00:00Z",
                  "hiercls_version": "0.test", "note": EVIL}
    return SimpleNamespace(taxonomy=taxonomy, predictions=preds, group_values=groups, metrics=json_ready(metrics),
                           provenance=provenance, run_dir=run_dir)


class PageParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.ids: list[str] = []
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        if attrs.get("id"):
            self.ids.append(attrs["id"])

    def handle_data(self, data):
        self.text.append(data)


def parse(text: str) -> PageParser:
    parser = PageParser()
    parser.feed(text)
    parser.close()
    return parser


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    from hiercls.report import write_reports
    from hiercls.report_content import report_sections

    tmp_path = tmp_path_factory.mktemp("report")
    evaluation = make_evaluation(tmp_path)
    second_wrong = report_sections(evaluation)["misclassified"]["rows"][1]["path"]
    panels = {second_wrong: (Path(__file__).resolve().parents[1] / "docs" / "explain-cnn.png").read_bytes()}
    files = write_reports(evaluation, tmp_path / "out", title=f"Report {EVIL}", explain_panels=panels)
    return evaluation, files


def test_html_report_has_every_section_and_only_inline_content(written):
    from hiercls.report_html import SECTION_IDS

    evaluation, files = written
    text = files["report.html"].read_text(encoding="utf-8")
    page = parse(text)
    assert [i for i in page.ids if i in SECTION_IDS] == list(SECTION_IDS)
    links = [(tag, key, value) for tag, attrs in page.tags for key, value in attrs.items()
             if key in ("src", "href", "srcset", "action", "data", "poster") and value is not None]
    assert links, "the page shows pictures"
    for tag, key, value in links:
        if key == "href":
            assert value.startswith("#"), f"<{tag} {key}={value[:60]}> leaves the page"
        else:
            assert value.startswith("data:image/"), f"<{tag} {key}={value[:60]}> is not inline"
    assert not [t for t, _ in page.tags if t in ("script", "link", "iframe", "object", "embed", "base")]
    assert "url(" not in text.split("<body>")[0], "the CSS loads nothing"
    imgs = [attrs for tag, attrs in page.tags if tag == "img"]
    # Figures (confusion x 3, ROC, reliability, coverage, training), thumbnails and the Grad-CAM panel.
    assert sum(a["src"].startswith("data:image/png") for a in imgs) >= 8
    assert sum(a["src"].startswith("data:image/jpeg") for a in imgs) >= 1
    assert "image not available" in text  # the missing image's placeholder
    assert any("Grad-CAM" in (a.get("alt") or "") for a in imgs)


def test_html_report_escapes_every_user_string(written):
    _, files = written
    text = files["report.html"].read_text(encoding="utf-8")
    page = parse(text)
    assert "<script>" not in text and "alert('x')" not in text  # not even as an attribute
    shown = "".join(page.text)
    assert EVIL in shown  # the display name, the group and the provenance show as text
    assert "Normal & healthy" in shown
    assert "Report " + EVIL in shown


def test_html_report_numbers(written):
    evaluation, files = written
    text = files["report.html"].read_text(encoding="utf-8")
    shown = re.sub(r"\s+", " ", "".join(parse(text).text))
    metrics = evaluation.metrics
    n_leaf = len(evaluation.predictions.labels)
    right = sum(t == p for t, p in zip(evaluation.predictions.labels, evaluation.predictions.predictions))
    assert f"{right} / {n_leaf} images labelled at a leaf" in shown
    assert "macro avg (leaves)" in shown and "weighted avg (leaves)" in shown
    assert f"{metrics['hF']:.3f}" in shown
    # The highest coverage whose accuracy reaches 0.8: threshold 0.7 (accuracy 0.833, coverage 0.65).
    assert "Target accuracy 0.8: threshold 0.700 keeps it" in shown
    chosen = text.split('<tr class="chosen">')[1].split("</tr>")[0]
    assert ">0.700<" in chosen and text.count('<tr class="chosen">') == 1
    assert "slide1" in shown and "right" in shown
    assert "temperatures fitted on 12 of the scored images" in shown


def test_report_md_has_the_same_content(written):
    evaluation, files = written
    md = files["report.md"].read_text(encoding="utf-8")
    for heading in ("## Provenance", "## Headline metrics", "## Accuracy at each depth", "## Per-level accuracy",
                    "## Per-class precision, recall, F1", "## Confusion matrices", "## AUROC", "## Calibration",
                    "## Selective prediction", "## Training", "## Groups", "## Misclassified images"):
        assert heading in md, heading
    assert "| strategy | joint |" in md and "computed over" in md
    assert "| **macro avg** (leaves) |" in md and "| **weighted avg** (leaves) |" in md
    assert "| true \\ predicted | Normal & healthy |" in md
    assert "![roc_leaves](roc_leaves.png)" in md and "![training_curves](training_curves.png)" in md
    assert "| 0.700 | 0.650 |" in md and md.count("◀") == 2  # the sentence and the row
    assert "moved_away.png" in md
    assert "**Warning:** temperatures fitted on 12 of the scored images" in md
    for name in ("reliability.png", "coverage_accuracy.png", "training_curves.png", "roc_leaves.png",
                 "confusion_leaves.png"):
        assert files[name].stat().st_size > 1000


def test_macro_and_weighted_rows_match_scikit_learn(tmp_path):
    """Hand-made labels: the average rows equal classification_report's, every leaf and an absent one."""
    from sklearn.metrics import classification_report

    from hiercls.report import render_markdown
    from hiercls.report_content import build_sections

    taxonomy = Taxonomy.from_dict(TREE)
    y_true = ["normal"] * 5 + ["myelo"] * 3 + ["lympho"] * 2 + ["other"] * 1
    y_pred = ["normal"] * 4 + ["myelo"] + ["myelo", "lympho", "blast"] + ["lympho", "normal"] + ["normal"]
    metrics = evaluate_predictions(taxonomy, y_true, y_pred)
    sections = build_sections(taxonomy, y_true, y_pred, metrics)
    report = sections["class_report"]
    labels = [leaf for leaf in taxonomy.leaves if leaf in set(y_true) | set(y_pred)]
    expected = classification_report(y_true, y_pred, labels=labels, output_dict=True, zero_division=0)
    for name in ("macro avg", "weighted avg"):
        for key, theirs in (("precision", "precision"), ("recall", "recall"), ("f1", "f1-score"),
                            ("support", "support")):
            assert report[name][key] == pytest.approx(expected[name][theirs]), (name, key)
    assert report["macro avg"]["f1"] == pytest.approx(metrics["macro_f1"])
    md = render_markdown({**metrics, **sections}, taxonomy)
    row = f"| **macro avg** (leaves) | {expected['macro avg']['precision']:.3f} | {expected['macro avg']['recall']:.3f}"
    assert row in md
    assert f"| **weighted avg** (leaves) | {expected['weighted avg']['precision']:.3f}" in md
    # Denominators: 6 of 11 right; the 'blast' prediction is a mistake of the confusion matrix's "elsewhere".
    assert sections["denominators"]["accuracy"] == {"numerator": 6, "denominator": 11,
                                                    "of": "images labelled at a leaf"}
    leaves_cm = sections["confusion_matrices"]["leaves"]
    assert leaves_cm["n"] == 11 and leaves_cm["n_outside"] == 1
    row_myelo = leaves_cm["labels"].index("myelo")
    assert leaves_cm["counts"][row_myelo] == [0, 1, 1, 0] and leaves_cm["outside"][row_myelo] == 1
    assert leaves_cm["row_percent"][row_myelo] == [0, 33.3, 33.3, 0] and leaves_cm["row_totals"][row_myelo] == 3
    blast = sections["confusion_matrices"]["decisions"]["blast"]  # 'blast' and 'normal' went elsewhere
    assert blast["counts"] == [[1, 1], [0, 1]] and blast["outside"] == [1, 1] and blast["n"] == 5
    assert sections["misclassified"]["n"] == 5


def test_group_votes_show_each_groups_diagnosis(tmp_path):
    from hiercls.report_content import report_sections

    evaluation = make_evaluation(tmp_path, with_extras=False)
    rows = report_sections(evaluation)["group_votes"]
    assert [r["group"] for r in rows] == [f"patient {EVIL}", "slide1", "slide2", "slide3"]
    preds = evaluation.predictions
    for r in rows:
        members = [i for i, g in enumerate(preds.groups) if g == r["group"]]
        assert sum(r["votes"].values()) == r["n_images"] == len(members)
        assert r["prediction"] == max(r["votes"], key=r["votes"].get) or r["votes"][r["prediction"]] == max(
            r["votes"].values())
    json.dumps(rows)  # JSON-ready for metrics.json


def test_report_without_probabilities_groups_or_images(tmp_path):
    """A predictions CSV without p: columns: no ROC, no calibration; sections say so, nothing crashes."""
    from hiercls.figures import report_figures
    from hiercls.report_html import SECTION_IDS, write_html_report

    evaluation = make_evaluation(tmp_path, with_extras=False)
    preds = evaluation.predictions
    evaluation.predictions = PredictionSet(["/nowhere/a.png"] * len(preds), preds.labels, [None] * len(preds),
                                           preds.predictions, None)
    evaluation.group_values = None
    evaluation.metrics = json_ready(evaluate_predictions(evaluation.taxonomy, preds.labels, preds.predictions))
    evaluation.provenance = {}
    figures = report_figures(evaluation)
    assert "roc_leaves.png" not in figures and "reliability.png" not in figures
    text = write_html_report(evaluation, tmp_path / "out", title="plain", figures=figures).read_text()
    page = parse(text)
    assert [i for i in page.ids if i in SECTION_IDS] == list(SECTION_IDS)
    assert "No probabilities in these predictions" in text and "No grouping" in text


def test_figures_return_none_on_empty_input():
    from hiercls.figures import (
        plot_confusion_matrix,
        plot_coverage_accuracy,
        plot_reliability,
        plot_roc_curves,
        plot_training_curves,
        read_training_records,
    )
    from hiercls.metrics import ConfusionMatrix

    taxonomy = Taxonomy.from_dict(TREE)
    assert plot_confusion_matrix(ConfusionMatrix("root", (), np.zeros((0, 0)), 0), "empty") is None
    assert plot_roc_curves(taxonomy, [], None) is None
    assert plot_reliability([], None) is None and plot_reliability(None) is None
    assert plot_reliability([{"bin_lo": 0, "bin_hi": 1, "confidence": float("nan"), "accuracy": 1, "count": 3}]) is None
    assert plot_coverage_accuracy([]) is None and plot_coverage_accuracy([{"coverage": "x"}]) is None
    assert plot_training_curves([]) is None and plot_training_curves(None) is None
    assert read_training_records("/nonexistent/run") == []


def test_confusion_matrix_png_keeps_a_long_title_whole():
    """Constrained layout and a wrapped title: no ink is cut at the image's top edge."""
    from io import BytesIO

    from PIL import Image

    from hiercls.figures import plot_confusion_matrix
    from hiercls.metrics import ConfusionMatrix

    taxonomy = Taxonomy.from_dict(TREE)
    cm = ConfusionMatrix("blast", ("myelo", "lympho"), np.array([[3, 1], [2, 4]]), 0)
    title = "blast: " + " vs ".join(["a rather long display name of a child"] * 4)
    png = plot_confusion_matrix(cm, title, taxonomy)
    pixels = np.asarray(Image.open(BytesIO(png)).convert("L"))
    assert (pixels[:3] > 250).all() and (pixels[:, :3] > 250).all() and (pixels[:, -3:] > 250).all()
    assert (pixels[:40] < 128).any()  # the title is drawn near the top
