"""``hiercls cv`` with ``group_scoring: images``: every held-out image scored with its slide's vote."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_cv import MINI_TREE, write_config, write_slides

from hiercls.aggregate import evaluate_groups, get_aggregator
from hiercls.cli import main
from hiercls.cv import load_cv_config
from hiercls.errors import ConfigError
from hiercls.predictions import read_predictions_csv
from hiercls.taxonomy import load_taxonomy


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cvscoring")
    (folder / "mini.yaml").write_text(MINI_TREE, encoding="utf-8")
    write_slides(folder)
    return folder


def test_cv_scores_images_with_their_group_vote(project: Path):
    config = write_config(project, strategies=["flat"], group_scoring="images")
    assert main(["cv", "--config", str(config), "--no-progress"]) == 0
    taxonomy = load_taxonomy(project / "mini.yaml")
    for fold in range(2):
        cell = project / "out" / "flat__test_resnet" / f"fold{fold}"
        groups = json.loads((cell / "metrics.json").read_text())["groups"]
        preds = read_predictions_csv(cell / "predictions.csv", taxonomy)
        by_image = evaluate_groups(taxonomy, preds.groups, preds.labels, preds.predictions, preds.probs,
                                   get_aggregator("mode"), "mode", scoring="images")
        assert groups["scoring"] == "images" and groups["n_images"] == len(preds) > groups["n_groups"]
        assert groups["accuracy"] == pytest.approx(by_image["accuracy"])


def test_group_scoring_is_a_setting_only_when_set(tmp_path: Path):
    base = dict(taxonomy=tmp_path / "t.yaml", data=tmp_path, out=tmp_path / "out")
    assert "group_scoring" not in load_cv_config(None, base).settings()  # OUT folders of older versions continue
    assert load_cv_config(None, {**base, "group_scoring": "images"}).settings()["group_scoring"] == "images"
    with pytest.raises(ConfigError, match="group_scoring"):
        load_cv_config(write_config(tmp_path, group_scoring="slides"))
