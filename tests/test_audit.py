"""The data audit: planted duplicates and bad files are found; the clean manifest drops them."""

from __future__ import annotations

import csv
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from hiercls.cli import main
from hiercls.data import audit, grouped_kfold, load_images
from hiercls.data.audit import near_duplicate_pairs
from hiercls.taxonomy import load_taxonomy

from conftest import write_image

SIZE = (64, 64)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def planted(tmp_path):
    """A class-folder dataset with one of each problem the audit must find."""
    root = tmp_path / "data"
    for k in range(4):
        write_image(root / "cat" / f"P{k}_cat.jpg", size=SIZE, seed=k, quality=95)
        write_image(root / "dog" / f"P{k}_dog.jpg", size=SIZE, seed=10 + k, quality=95)
    shutil.copy(root / "cat" / "P0_cat.jpg", root / "cat" / "P5_copy.jpg")  # exact duplicate
    original = Image.open(root / "dog" / "P1_dog.jpg").convert("RGB")
    original.save(root / "dog" / "P6_requality.jpg", quality=60)  # near: re-encoded
    ImageEnhance.Brightness(original).enhance(1.08).save(root / "dog" / "P7_bright.png")  # near: brighter
    (root / "dog" / "P8_broken.jpg").write_bytes((root / "dog" / "P2_dog.jpg").read_bytes()[:300])
    write_image(root / "cat" / "P9_tiny.png", size=(20, 40), seed=50)
    write_image(root / "zebra" / "P3_zebra.png", size=SIZE, seed=60)  # unknown label
    return root


def names(report, members):
    return sorted(report.table.paths[i].name for i in members)


def test_planted_problems_are_found(planted, tiny_taxonomy):
    table = load_images(planted, tiny_taxonomy, group_regex=r"^(P\d+)_", unknown_labels="keep")
    report = audit(table, tiny_taxonomy, min_size=32, min_group_images=2, progress=False)

    assert [names(report, m) for m in report.exact_duplicates] == [["P0_cat.jpg", "P5_copy.jpg"]]
    near = [names(report, m) for m in report.near_duplicates]
    assert near == [["P1_dog.jpg", "P6_requality.jpg", "P7_bright.png"]]
    assert [table.paths[i].name for i, _ in report.unreadable] == ["P8_broken.jpg"]
    assert [(table.paths[i].name, w, h) for i, w, h in report.too_small] == [("P9_tiny.png", 20, 40)]
    assert report.unknown_labels == {"zebra": 1}
    # P5..P9 hold one image each; P3 spans dog and an unknown label (only known labels count)
    assert {g for g, _ in report.small_groups} == {"P5", "P6", "P7", "P8", "P9"}
    assert report.mixed_groups == [("P0", ["cat", "dog"]), ("P1", ["cat", "dog"]), ("P2", ["cat", "dog"]),
                                   ("P3", ["cat", "dog"])]
    assert report.counts_per_node["animal"] == 13 and report.counts_per_node["plant"] == 0
    assert report.counts_per_level[0] == {"animal": 13, "plant": 0}


def test_clean_indices_keep_one_copy_and_drop_flagged(planted, tiny_taxonomy):
    table = load_images(planted, tiny_taxonomy, unknown_labels="keep")
    report = audit(table, tiny_taxonomy, progress=False)
    kept = {table.paths[i].name for i in report.clean_indices()}
    assert "P0_cat.jpg" in kept and "P5_copy.jpg" not in kept
    assert "P1_dog.jpg" in kept and not {"P6_requality.jpg", "P7_bright.png"} & kept
    assert not {"P8_broken.jpg", "P9_tiny.png", "P3_zebra.png"} & kept
    assert len(kept) == len(table) - 6


def test_near_threshold_and_distinct_images(planted):
    paths = sorted(planted.rglob("P[0-3]_*.jpg"))  # eight distinct pictures
    report = audit(paths, progress=False)
    assert report.near_duplicates == [] and report.exact_duplicates == []
    strict = audit(sorted(planted.rglob("P1_dog.jpg")) + sorted(planted.rglob("P7_*")), near_threshold=-1,
                   progress=False)
    assert strict.near_duplicates == []


def test_duplicates_across_folds(planted, tiny_taxonomy):
    table = load_images(planted, tiny_taxonomy, unknown_labels="keep")
    folds = grouped_kfold(table, n_folds=3, seed=0)
    report = audit(table, tiny_taxonomy, splits=folds, progress=False)
    fold_of = {int(i): k for k, (_, val) in enumerate(folds) for i in val}
    for members in report.exact_duplicates:
        crosses = len({fold_of[i] for i in members}) > 1
        assert crosses == (members in report.cross_fold_duplicates)


def test_conflicting_duplicate_labels_drop_all(tmp_path, tiny_taxonomy):
    write_image(tmp_path / "d" / "cat" / "a.png", size=SIZE, seed=1)
    (tmp_path / "d" / "dog").mkdir()
    shutil.copy(tmp_path / "d" / "cat" / "a.png", tmp_path / "d" / "dog" / "b.png")  # same bytes, other label
    write_image(tmp_path / "d" / "dog" / "c.png", size=SIZE, seed=2)
    table = load_images(tmp_path / "d", tiny_taxonomy)
    report = audit(table, tiny_taxonomy, progress=False)
    assert len(report.conflicting_duplicates) == 1
    assert [table.paths[i].name for i in report.clean_indices()] == ["c.png"]


def test_near_duplicate_pairs_match_brute_force():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2**63, size=300, dtype=np.int64).astype(np.uint64)
    noisy = base[:50] ^ (np.uint64(1) << rng.integers(0, 64, size=50).astype(np.uint64))
    hashes = [int(h) for h in np.concatenate([base, noisy])]
    for threshold in (0, 1, 4, 10):
        expected = [(i, j) for i in range(len(hashes)) for j in range(i + 1, len(hashes))
                    if bin(hashes[i] ^ hashes[j]).count("1") <= threshold]
        assert near_duplicate_pairs(hashes, threshold) == expected


def test_audit_command_writes_clean_manifest(planted, tiny_taxonomy_file, tmp_path, capsys):
    out = planted / "clean.csv"
    args = ["audit", "--taxonomy", str(tiny_taxonomy_file), "--data", str(planted), "--no-progress",
            "--write-manifest", str(out)]
    assert main(args) == 1  # problems found; the clean manifest is still written
    printed = capsys.readouterr().out
    assert "P5_copy.jpg" in printed and "P8_broken.jpg" in printed and "zebra" in printed
    with open(out, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 14 - 6 and {r["path"].split("/")[0] for r in rows} == {"cat", "dog"}
    assert load_images(out, load_taxonomy(tiny_taxonomy_file)).labels.count("cat") == 4
    before = out.read_text()
    assert main(args) == 2  # never overwrite without --overwrite
    assert "already exists" in capsys.readouterr().err
    assert out.read_text() == before
    assert main(args + ["--overwrite"]) == 1


@pytest.mark.integration
def test_all_subtypes_has_40_exact_duplicate_sets(shared_data, capsys):
    data = shared_data / "all-subtypes"
    if not data.is_dir():
        pytest.skip(f"{data} not found")
    taxonomy = load_taxonomy(REPO / "taxonomy" / "all-subtypes.yaml")
    start = time.perf_counter()
    report = audit(load_images(data, taxonomy), taxonomy, progress=False)
    assert time.perf_counter() - start < 60
    assert len(report.exact_duplicates) == 40
    assert all(len(m) == 2 for m in report.exact_duplicates)
    pairs = {tuple(names(report, m)) for m in report.exact_duplicates}
    assert ("WBC-Malignant-Pro-011.jpg", "WBC-Malignant-Pro-012.jpg") in pairs
    assert report.unreadable == [] and report.unknown_labels == {}
    assert report.counts_per_node["malignant"] == 788 + 770 + 643


def test_audit_with_folds_prints_the_images_per_node_in_each_fold(capsys):
    sample = Path(__file__).resolve().parents[1] / "examples" / "data" / "blood-cells-sample"
    taxonomy = Path(__file__).resolve().parents[1] / "taxonomy" / "blood-cells.yaml"
    assert main(["audit", "--taxonomy", str(taxonomy), "--data", str(sample), "--folds", "3", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "Images per node in each of 3 validation folds" in out
    row = next(line for line in out.splitlines() if "segmented_neutrophil" in line and "│" in line and "fold" not in line
               and line.count("│") >= 6)
    counts = [int(c) for c in row.split("│")[2:-1] if c.strip()]
    assert counts[0] == sum(counts[1:])  # the folds partition the node's images
