"""The README demo's data: ``examples/data/blood-cells-demo`` and the script that draws it."""

from __future__ import annotations

import csv
import hashlib
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml
from PIL import Image

from hiercls.taxonomy import load_taxonomy

from conftest import REPO_ROOT, SAMPLE_DATA, shared_data_dir, write_image

DEMO = REPO_ROOT / "examples" / "data" / "blood-cells-demo"
DEMO_CONFIG = REPO_ROOT / "examples" / "blood-cells" / "demo.yaml"
FOLDERS = ("basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte", "neutrophil", "platelet")

sys.path.insert(0, str(REPO_ROOT / "examples" / "data"))
import make_demo_sample  # noqa: E402  (a script, not a package)


def manifest(folder: Path) -> list[dict[str, str]]:
    with (folder / "manifest.csv").open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_demo_sample_is_balanced_small_and_credited() -> None:
    rows = manifest(DEMO)
    assert len(rows) == 1000
    assert Counter(r["path"].split("/")[0] for r in rows) == {f: 125 for f in FOLDERS}
    files = sorted(p.relative_to(DEMO).as_posix() for p in DEMO.rglob("*.jpg"))
    assert files == sorted(r["path"] for r in rows)  # every listed image exists, no unlisted one
    total = sum(p.stat().st_size for p in DEMO.rglob("*") if p.is_file())
    assert total < 5_000_000, f"{total} bytes"
    for path in files[::97]:
        with Image.open(DEMO / path) as image:
            assert image.format == "JPEG" and image.mode == "RGB" and image.size == (80, 80)
    credits = (DEMO / "README.md").read_text(encoding="utf-8")
    assert "CC BY 4.0" in credits and "Acevedo" in credits and "10.17632/snkd93bnjr.1" in credits


def test_demo_labels_are_the_trees_with_partial_labels() -> None:
    tree = load_taxonomy(REPO_ROOT / "taxonomy" / "blood-cells.yaml")
    labels = Counter(r["label"] for r in manifest(DEMO))
    assert all(tree.resolve(label) == label for label in labels)  # node names, no alias
    assert labels["neutrophil"] >= 5 and labels["immature_granulocyte"] >= 5
    assert not tree.is_leaf("neutrophil") and not tree.is_leaf("immature_granulocyte")


def test_demo_has_no_duplicates_and_nothing_of_the_test_sample() -> None:
    digests = Counter(hashlib.sha256(p.read_bytes()).hexdigest() for p in DEMO.rglob("*.jpg"))
    assert max(digests.values()) == 1
    names = {Path(r["path"]).name for r in manifest(DEMO)}
    assert not names & {Path(r["path"]).name for r in manifest(SAMPLE_DATA)}


def test_the_readme_main_job_trains_on_the_demo_sample() -> None:
    config = yaml.safe_load(DEMO_CONFIG.read_text(encoding="utf-8"))
    assert (DEMO_CONFIG.parent / config["data"]).resolve() == DEMO.resolve()
    assert "pretrained" not in config  # from random weights: nothing to download
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    setup = readme.split("## Use")[0]
    assert f"`{config['backbone']}`" in setup, "README's set-up must name the demo's backbone"
    assert f"{config['epochs']} epochs" in DEMO_CONFIG.read_text(encoding="utf-8")  # its comment matches it
    assert "hiercls fit --config examples/blood-cells/demo.yaml --out runs/demo" in readme


def test_the_script_rebuilds_the_shipped_sample_byte_for_byte(tmp_path: Path) -> None:
    shared = shared_data_dir()
    if shared is None or not (shared / "blood-cells" / "manifest.csv").is_file():
        pytest.skip("needs the PBC development copy in ../shared/data/blood-cells (or $HIERCLS_SHARED_DATA)")
    out = tmp_path / "demo"
    assert make_demo_sample.main(["--source", str(shared / "blood-cells"), "--out", str(out),
                                  "--avoid", str(SAMPLE_DATA)]) == 0
    built = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    shipped = sorted(p.relative_to(DEMO).as_posix() for p in DEMO.rglob("*") if p.is_file() and p.name != "README.md")
    assert built == shipped
    assert all((out / rel).read_bytes() == (DEMO / rel).read_bytes() for rel in built)


def test_the_script_skips_duplicates_and_avoided_images_and_keeps_partial_labels(tmp_path: Path) -> None:
    source, rows = tmp_path / "source", []
    for fi, folder in enumerate(FOLDERS):
        for k in range(12):
            rel = f"{folder}/{folder[:2].upper()}_{k}.jpg"
            write_image(source / rel, size=(30, 30), seed=100 * fi + k)
            label = {"neutrophil": "segmented_neutrophil", "ig": "myelocyte"}.get(folder, folder)
            rows.append((rel, "neutrophil" if folder == "neutrophil" and k < 6 else label))
    dup = source / "basophil" / "BA_dup.jpg"
    dup.write_bytes((source / "basophil" / "BA_0.jpg").read_bytes())  # same bytes, another name
    rows.append(("basophil/BA_dup.jpg", "basophil"))
    avoid = tmp_path / "avoid"
    avoid.mkdir()
    (avoid / "manifest.csv").write_text("path,label\nbasophil/BA_1.jpg,basophil\n", encoding="utf-8")
    (source / "manifest.csv").write_text("path,label\n" + "".join(f"{path},{label}\n" for path, label in rows), encoding="utf-8")
    labels = make_demo_sample.read_manifest(source)
    by_folder = make_demo_sample.distinct_files(source, labels, {"basophil/BA_1.jpg"})
    assert "basophil/BA_dup.jpg" not in by_folder["basophil"] and "basophil/BA_1.jpg" not in by_folder["basophil"]
    chosen = make_demo_sample.draw(by_folder, labels, per_folder=8, seed=3)
    assert Counter(c.split("/")[0] for c in chosen) == {f: 8 for f in FOLDERS}
    assert sum(labels[c] == "neutrophil" for c in chosen) >= make_demo_sample.MIN_PARTIAL
    assert chosen == make_demo_sample.draw(by_folder, labels, per_folder=8, seed=3)
    out = tmp_path / "out"
    make_demo_sample.main(["--source", str(source), "--out", str(out), "--avoid", str(avoid), "--per-folder", "8",
                           "--size", "16", "--seed", "3"])
    assert [(r["path"], r["label"]) for r in manifest(out)] == [(c, labels[c]) for c in chosen]
    with Image.open(out / manifest(out)[0]["path"]) as image:
        assert image.size == (16, 16)
