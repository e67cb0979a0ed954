"""Reading datasets (folders, manifests, groups) and opening images safely."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hiercls.data import ImageTable, load_images, open_rgb
from hiercls.data.dataset import write_manifest
from hiercls.errors import ConfigError, DataError
from hiercls.taxonomy import load_taxonomy

from conftest import SAMPLE_DATA, write_image


def write_manifest_text(folder: Path, text: str, name: str = "manifest.csv") -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


# -- folders --------------------------------------------------------------------------


def test_class_folders(class_folder, tiny_taxonomy, make_image):
    make_image(class_folder / "kitty" / "deep" / "nested.JPG")  # alias, nested, upper-case extension
    (class_folder / "cat" / ".hidden.png").write_bytes(b"junk")
    (class_folder / "cat" / "notes.txt").write_text("not an image")
    (class_folder / "README.md").write_text("top-level non-image files are ignored")
    table = load_images(class_folder, tiny_taxonomy)
    assert len(table) == 13
    assert all(p.is_absolute() for p in table.paths)
    assert table.labels.count("cat") == 4
    assert table.raw_labels.count("kitty") == 1
    assert table.groups == [None] * 13
    assert not any(p.name.startswith(".") for p in table.paths)
    assert table.paths == load_images(class_folder, tiny_taxonomy).paths  # deterministic


def test_folder_unknown_label_lists_counts_and_folder(class_folder, tiny_taxonomy, make_image):
    make_image(class_folder / "Dog" / "a.png")
    make_image(class_folder / "Dog" / "b.png", seed=5)
    with pytest.raises(DataError) as info:
        load_images(class_folder, tiny_taxonomy)
    message = str(info.value)
    assert str(class_folder) in message and "'Dog' x2 (closest: dog)" in message


def test_folder_without_taxonomy_keeps_folder_names(class_folder):
    table = load_images(class_folder)
    assert sorted(set(table.labels)) == ["cat", "dog", "flower", "tree"]


def test_flat_folder_is_unlabelled_only_when_allowed(tmp_path, make_image):
    for k in range(3):
        make_image(tmp_path / "imgs" / f"{k}.png", seed=k)
    table = load_images(tmp_path / "imgs", require_labels=False)
    assert len(table) == 3 and table.labels == [None] * 3
    with pytest.raises(DataError, match="no class sub-folders"):
        load_images(tmp_path / "imgs")


def test_empty_folder_and_missing_path(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images found"):
        load_images(tmp_path / "empty")
    with pytest.raises(DataError, match="not found"):
        load_images(tmp_path / "absent")


def test_images_beside_class_folders_refused(class_folder, make_image):
    make_image(class_folder / "stray.png")
    with pytest.raises(DataError, match="stray.png"):
        load_images(class_folder)


# -- manifests ------------------------------------------------------------------------


def test_manifest_with_groups_and_partial_labels(class_folder, tiny_taxonomy):
    csv = write_manifest_text(
        class_folder,
        "path,label,group\ncat/cat_0.png,kitty,P1\ncat/cat_1.png,animal,P1\ntree/tree_0.png,tree,\n",
    )
    table = load_images(csv, tiny_taxonomy)
    assert table.root == class_folder
    assert table.paths[0] == class_folder / "cat" / "cat_0.png"
    assert table.labels == ["cat", "animal", "tree"]
    assert table.groups == ["P1", "P1", None]
    assert table.label_indices(tiny_taxonomy).tolist() == [
        tiny_taxonomy.index["cat"], tiny_taxonomy.index["animal"], tiny_taxonomy.index["tree"]
    ]
    counts = table.counts_per_node(tiny_taxonomy)
    assert counts["animal"] == 2 and counts["cat"] == 1 and counts["root"] == 3 and counts["dog"] == 0
    assert table.exact_counts(tiny_taxonomy)["animal"] == 1


def test_manifest_missing_files_name_lines(class_folder, tiny_taxonomy):
    rows = "".join(f"cat/missing_{k}.png,cat\n" for k in range(7))
    csv = write_manifest_text(class_folder, "path,label\ncat/cat_0.png,cat\n" + rows)
    with pytest.raises(DataError) as info:
        load_images(csv, tiny_taxonomy)
    message = str(info.value)
    assert str(csv) in message and "7 listed file(s) not found" in message
    assert "lines 3, 4, 5, 6, 7, ..." in message


def test_manifest_missing_column(class_folder):
    csv = write_manifest_text(class_folder, "file,class\ncat/cat_0.png,cat\n")
    with pytest.raises(DataError) as info:
        load_images(csv)
    message = str(info.value)
    assert str(csv) in message and "missing column(s) path, label" in message and "'file', 'class'" in message


def test_manifest_path_outside_root_refused(tmp_path, class_folder):
    write_image(tmp_path / "x.jpg")
    csv = write_manifest_text(class_folder, "path,label\ncat/cat_0.png,cat\n../x.jpg,cat\n")
    with pytest.raises(DataError, match=r"line 3 \(\.\./x\.jpg\)"):
        load_images(csv)


def test_manifest_empty_label(class_folder, tiny_taxonomy):
    csv = write_manifest_text(class_folder, "path,label\ncat/cat_0.png,\ncat/cat_1.png,cat\n")
    with pytest.raises(DataError, match=r"without a label \(line 2\)"):
        load_images(csv, tiny_taxonomy)
    table = load_images(csv, tiny_taxonomy, require_labels=False)
    assert table.labels == [None, "cat"]
    assert table.label_indices(tiny_taxonomy).tolist() == [-1, tiny_taxonomy.index["cat"]]


def test_manifest_unknown_labels_raise_or_are_kept(class_folder, tiny_taxonomy):
    csv = write_manifest_text(class_folder, "path,label\ncat/cat_0.png,cta\ncat/cat_1.png,cat\n")
    with pytest.raises(DataError, match=r"'cta' x1 \(closest: cat"):
        load_images(csv, tiny_taxonomy)
    table = load_images(csv, tiny_taxonomy, unknown_labels="keep")
    assert table.labels == [None, "cat"] and table.raw_labels == ["cta", "cat"]


def test_manifest_repeated_row(class_folder):
    csv = write_manifest_text(class_folder, "path,label\ncat/cat_0.png,cat\ncat/cat_0.png,cat\n")
    with pytest.raises(DataError, match=r"\(line 3\)"):
        load_images(csv)


def test_sample_manifest_is_finer_than_folders(tmp_path):
    taxonomy = load_taxonomy(Path(__file__).resolve().parents[1] / "taxonomy" / "blood-cells.yaml")
    fine = load_images(SAMPLE_DATA / "manifest.csv", taxonomy)
    # The class folders alone (a copy without the manifest) give only the coarse labels.
    folders_only = tmp_path / "sample"
    shutil.copytree(SAMPLE_DATA, folders_only, ignore=shutil.ignore_patterns("manifest.csv"))
    coarse = load_images(folders_only, taxonomy)
    assert sorted(p.relative_to(SAMPLE_DATA) for p in fine.paths) == sorted(
        p.relative_to(folders_only) for p in coarse.paths
    )
    assert "promyelocyte" in fine.labels and "immature_granulocyte" in fine.labels
    assert set(coarse.labels) & {"promyelocyte", "segmented_neutrophil"} == set()
    assert coarse.labels.count("immature_granulocyte") == 25  # the `ig` folder, via its alias
    assert 0 < fine.labels.count("neutrophil") < 25  # partial labels


def test_folder_with_manifest_is_read_through_it():
    taxonomy = load_taxonomy(Path(__file__).resolve().parents[1] / "taxonomy" / "blood-cells.yaml")
    via_folder = load_images(SAMPLE_DATA, taxonomy)
    via_manifest = load_images(SAMPLE_DATA / "manifest.csv", taxonomy)
    assert via_folder.paths == via_manifest.paths
    assert via_folder.labels == via_manifest.labels
    assert "promyelocyte" in via_folder.labels


# -- groups ---------------------------------------------------------------------------


def test_group_regex_capture_group_and_whole_match(tmp_path, tiny_taxonomy):
    for name in ("P01_a.png", "P01_b.png", "P02_a.png"):
        write_image(tmp_path / "d" / "cat" / name)
    table = load_images(tmp_path / "d", tiny_taxonomy, group_regex=r"^(P\d+)_")
    assert table.groups == ["P01", "P01", "P02"]
    table = load_images(tmp_path / "d", tiny_taxonomy, group_regex=r"P\d+")
    assert table.groups == ["P01", "P01", "P02"]


def test_group_regex_must_match_every_file(tmp_path):
    write_image(tmp_path / "d" / "cat" / "P01_a.png")
    write_image(tmp_path / "d" / "cat" / "scan7.png")
    with pytest.raises(DataError) as info:
        load_images(tmp_path / "d", group_regex=r"^(P\d+)_")
    assert "scan7.png" in str(info.value) and "^(P\\d+)_" in str(info.value)
    with pytest.raises(ConfigError):
        load_images(tmp_path / "d", group_regex="(unclosed")


def test_subset_keeps_columns(class_folder, tiny_taxonomy):
    table = load_images(class_folder, tiny_taxonomy, group_regex=r"^[a-z]+")
    part = table.subset(np.array([3, 0]))
    assert isinstance(part, ImageTable) and len(part) == 2
    assert part.paths == [table.paths[3], table.paths[0]]
    assert part.groups == [table.groups[3], table.groups[0]]


def test_write_manifest_round_trip(class_folder, tiny_taxonomy, tmp_path):
    table = load_images(class_folder, tiny_taxonomy, group_regex=r"^[a-z]+")
    inside = class_folder / "clean.csv"
    write_manifest(table, inside)
    again = load_images(inside, tiny_taxonomy)
    assert again.paths == table.paths and again.labels == table.labels and again.groups == table.groups
    assert "cat/cat_0.png" in inside.read_text()
    outside = tmp_path / "elsewhere" / "clean.csv"
    outside.parent.mkdir()
    write_manifest(table, outside)  # images outside the manifest's folder: absolute paths
    assert load_images(outside, tiny_taxonomy).paths == table.paths
    before = outside.read_text()
    with pytest.raises(DataError, match="already exists"):
        write_manifest(table.subset([0]), outside)
    assert outside.read_text() == before
    write_manifest(table.subset([0]), outside, overwrite=True)
    assert len(load_images(outside, tiny_taxonomy)) == 1


# -- opening images -------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "I;16", "LA"])
def test_open_rgb_converts_modes(tmp_path, mode):
    base = Image.new("RGB", (10, 8), (200, 40, 40))
    if mode == "I;16":
        image = Image.fromarray(np.arange(80, dtype=np.uint16).reshape(8, 10) * 800)
        path = tmp_path / "x.png"
    else:
        image = base.convert(mode)
        path = tmp_path / ("x.tiff" if mode == "CMYK" else "x.png")
    image.save(path)
    out = open_rgb(path)
    assert out.mode == "RGB" and out.size == (10, 8)
    if mode == "I;16":
        array = np.asarray(out)
        assert array.min() == 0 and array.max() == 255  # range scaled, not clipped


def test_open_rgb_composites_transparency_on_white(tmp_path):
    Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(tmp_path / "t.png")
    assert np.asarray(open_rgb(tmp_path / "t.png")).min() == 255


def test_open_rgb_applies_exif_orientation(tmp_path):
    image = Image.new("RGB", (20, 10), (10, 200, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    image.save(tmp_path / "r.jpg", exif=exif.tobytes())
    assert open_rgb(tmp_path / "r.jpg").size == (10, 20)


def test_open_rgb_bad_files_raise_data_error(tmp_path):
    write_image(tmp_path / "ok.jpg", size=(64, 64))
    data = (tmp_path / "ok.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image")
    for name, words in (("truncated.jpg", "truncated"), ("empty.png", "empty"), ("text.png", "not a readable")):
        with pytest.raises(DataError, match=words) as info:
            open_rgb(tmp_path / name)
        assert name in str(info.value)
    with pytest.raises(DataError, match="not found"):
        open_rgb(tmp_path / "absent.png")


def test_open_rgb_decompression_bomb(tmp_path, monkeypatch):
    write_image(tmp_path / "big.png", size=(40, 40))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # over twice the limit: PIL refuses to open
    with pytest.raises(DataError, match=r"big\.png: image is too large.*1,600 pixels"):
        open_rgb(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # between limit and twice: PIL only warns
    with pytest.raises(DataError, match=r"big\.png: image is too large.*40x40"):
        open_rgb(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)
    assert open_rgb(tmp_path / "big.png").size == (40, 40)
