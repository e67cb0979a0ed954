"""Bad input: hostile images, broken manifests and folders, bad trees, mismatched checkpoints.

Each test feeds one kind of bad input and checks that hiercls either handles it (a
converted image, a counted skip with a warning) or refuses it with its own error type
naming the file / label / line — never a bare traceback, never a silently wrong result.
The cases are listed in docs/reliability.md.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hiercls.cli import main
from hiercls.data import (
    DataWarning,
    ImageCache,
    audit,
    grouped_kfold,
    grouped_train_val_split,
    load_images,
    open_rgb,
)
from hiercls.data.cache import MAX_LISTED_FILES
from hiercls.errors import CheckpointError, DataError, TaxonomyError
from hiercls.taxonomy import load_taxonomy

REPO = Path(__file__).resolve().parents[1]
LEUKEMIA = REPO / "taxonomy" / "leukemia.yaml"


def jpeg_bytes(size=(32, 32), seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def png_header_claiming(width: int, height: int) -> bytes:
    """A PNG whose header says width x height (1-bit) but holds almost no data: a cheap 'bomb'."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


# -- images -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("zero.jpg", b"", "empty file (0 bytes)"),
        ("truncated.jpg", jpeg_bytes()[:300], "damaged or truncated"),
        ("text.jpg", b"this is not an image\n", "not a readable image file"),
        ("bomb.png", png_header_claiming(20_000, 20_000), "too large to open safely"),
    ],
)
def test_unreadable_image_is_a_named_data_error(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError) as info:
        open_rgb(path)
    message = str(info.value)
    assert message.startswith(str(path)) and expected in message
    assert "\n" not in message


def test_decompression_bomb_guard_reports_the_size(tmp_path):
    path = tmp_path / "huge.png"
    path.write_bytes(png_header_claiming(20_000, 20_000))
    assert path.stat().st_size < 200  # the test file itself stays tiny
    with pytest.raises(DataError, match=r"400,000,000 pixels"):
        open_rgb(path)


def test_png_with_alpha_is_composited_on_white(tmp_path):
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 255  # red ...
    rgba[:2, :, 3] = 255  # ... opaque in the top half, transparent below
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    out = np.asarray(open_rgb(tmp_path / "a.png"))
    assert out.shape == (4, 4, 3)
    assert (out[:2] == [255, 0, 0]).all()
    assert (out[2:] == [255, 255, 255]).all()


def test_grayscale_becomes_three_equal_channels(tmp_path):
    gray = np.arange(16, dtype=np.uint8).reshape(4, 4) * 10
    Image.fromarray(gray, "L").save(tmp_path / "g.png")
    out = np.asarray(open_rgb(tmp_path / "g.png"))
    assert out.shape == (4, 4, 3)
    for c in range(3):
        assert (out[..., c] == gray).all()


def test_16_bit_tiff_is_scaled_to_the_full_8_bit_range(tmp_path):
    values = (np.arange(16, dtype=np.uint16).reshape(4, 4) * 1000 + 3000).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.tif")
    assert Image.open(tmp_path / "deep.tif").mode == "I;16"
    out = np.asarray(open_rgb(tmp_path / "deep.tif"))
    assert out.dtype == np.uint8 and out.shape == (4, 4, 3)
    assert out.min() == 0 and out.max() == 255  # not clipped to 255 everywhere, not all black
    assert (np.diff(out[..., 0].reshape(-1).astype(int)) >= 0).all()  # order kept


def test_cmyk_jpeg_is_converted_to_rgb(tmp_path):
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")  # pure red in CMYK
    out = np.asarray(open_rgb(tmp_path / "cmyk.jpg"))
    assert out.shape == (8, 8, 3)
    red, green, blue = out[4, 4].astype(int)
    assert red > 200 and green < 60 and blue < 60


def test_exif_rotation_is_applied(tmp_path):
    image = Image.new("RGB", (8, 4), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 4, 4))  # the left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    image.save(tmp_path / "phone.jpg", exif=exif, quality=100, subsampling=0)
    out = open_rgb(tmp_path / "phone.jpg")
    assert out.size == (4, 8)  # displayed upright: portrait
    pixels = np.asarray(out).astype(int)
    assert pixels[1, 2, 0] > 200 and pixels[1, 2, 2] < 60  # the red half is now on top
    assert pixels[6, 2, 2] > 200 and pixels[6, 2, 0] < 60  # the blue half below


def test_symlink_loops_in_the_data_folder_are_skipped_and_counted(tmp_path, make_image):
    root = tmp_path / "data"
    make_image(root / "cat" / "c0.png", seed=1)
    make_image(root / "dog" / "d0.png", seed=2)
    os.symlink(root / "cat", root / "cat" / "again")  # folder link back up: must not recurse forever
    os.symlink("b.jpg", root / "dog" / "a.jpg")  # a.jpg -> b.jpg -> a.jpg
    os.symlink("a.jpg", root / "dog" / "b.jpg")
    os.symlink("nowhere.png", root / "dog" / "broken.png")
    with pytest.warns(DataWarning, match=r"skipped 3 image name\(s\)") as record:
        table = load_images(root)
    assert "dog/a.jpg" in str(record[0].message)
    assert sorted(p.name for p in table.paths) == ["c0.png", "d0.png"]
    assert sorted(p.name for p in table.skipped) == ["a.jpg", "b.jpg", "broken.png"]
    assert ImageCache(tmp_path / "cache").load(table.paths, 8, progress=False).shape == (2, 8, 8, 3)


def test_non_ascii_and_spaced_file_names_round_trip(tmp_path, make_image, tiny_taxonomy):
    root = tmp_path / "données"
    names = ["é café.png", "中文 图像.png", "with  spaces .png"]
    for k, name in enumerate(names):
        make_image(root / "cat" / name, seed=k)
    make_image(root / "dog" / "chien é.png", seed=9)
    table = load_images(root, tiny_taxonomy)
    assert sorted(p.name for p in table.paths) == sorted(names + ["chien é.png"])
    manifest = tmp_path / "m.csv"
    from hiercls.data import write_manifest

    write_manifest(table, manifest)
    again = load_images(manifest, tiny_taxonomy)
    assert again.paths == table.paths and again.labels == table.labels
    images = ImageCache(tmp_path / "cache").load(again.paths, 8, progress=False)
    assert images.shape == (4, 8, 8, 3) and images.any()


# -- unreadable images in the cache, and in fit / predict ------------------------------------


def test_cache_reports_every_unreadable_file_in_one_error(tmp_path, make_image):
    good = [make_image(tmp_path / "img" / f"ok{k}.png", seed=k) for k in range(3)]
    bad = []
    for k in range(MAX_LISTED_FILES + 2):
        path = tmp_path / "img" / f"bad{k:02d}.jpg"
        path.write_bytes(b"" if k % 2 else b"garbage")
        bad.append(path)
    cache_dir = tmp_path / "cache"
    with pytest.raises(DataError) as info:
        ImageCache(cache_dir).load(good + bad, 8, progress=False)
    message = str(info.value)
    assert f"{len(bad)} of {len(good) + len(bad)} image file(s) cannot be read" in message
    listed = [p for p in bad if str(p) in message]
    assert len(listed) == MAX_LISTED_FILES
    assert "and 2 more" in message and "--write-manifest" in message
    assert not any(str(p) in message for p in good)
    assert not [p for p in cache_dir.iterdir() if p.suffix in (".npy", ".json")]  # no entry, no temp file


def test_cache_reports_every_missing_file_in_one_error(tmp_path, make_image):
    paths = [make_image(tmp_path / f"i{k}.png", seed=k) for k in range(4)]
    paths[1].unlink()
    paths[3].unlink()
    with pytest.raises(DataError, match=r"2 of 4 image file\(s\) cannot be read") as info:
        ImageCache(tmp_path / "cache").load(paths, 8, progress=False)
    assert str(paths[1]) in str(info.value) and str(paths[3]) in str(info.value)


@pytest.fixture(scope="module")
def smears(tmp_path_factory) -> Path:
    """8 leukemia labels x 3 slides of 16px images, named slideK_LABEL.png."""
    root = tmp_path_factory.mktemp("smears") / "data"
    rng = np.random.default_rng(3)
    for li, label in enumerate(("Normal", "Reactive", "ALL", "AML", "APML", "CLL", "CML", "Acute")):
        for k in range(3):
            pixels = np.clip(np.array([30.0 * li, 200 - 20 * li, 120]) + rng.normal(0, 15, (16, 16, 3)), 0, 255)
            (root / label).mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels.astype(np.uint8)).save(root / label / f"slide{k}_{label}.png")
    return root


def fit_args(data: Path, out: Path, *extra: str, backbone: str = "test_resnet") -> list[str]:
    return [
        "fit", "--taxonomy", str(LEUKEMIA), "--data", str(data), "--out", str(out), "--backbone", backbone,
        "--img-size", "16", "--epochs", "1", "--batch-size", "8", "--device", "cpu", "--group-regex",
        r"^(slide\d)_", "--val-fraction", "0.34", "--cache-dir", str(out.parent / "cache"), "--no-progress", *extra,
    ]


def test_fit_with_unreadable_images_stops_before_training_naming_them(smears, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(smears, data)
    (data / "AML" / "slide0_AML.png").write_bytes(b"")
    (data / "CLL" / "slide1_CLL.png").write_bytes(b"<html>not found</html>")
    run = tmp_path / "run"
    assert main(fit_args(data, run)) == 2
    err = capsys.readouterr().err
    assert "2 of 24 image file(s) cannot be read" in err
    assert "slide0_AML.png" in err and "slide1_CLL.png" in err and "Traceback" not in err
    assert not list((run / "checkpoints").glob("*.json"))  # nothing was trained


# -- labels and manifests -------------------------------------------------------------------


def test_label_not_in_the_taxonomy_is_named_with_count_and_closest_name(tmp_path, make_image, tiny_taxonomy):
    make_image(tmp_path / "data" / "cat" / "a.png", seed=1)
    make_image(tmp_path / "data" / "dgo" / "b.png", seed=2)
    make_image(tmp_path / "data" / "dgo" / "c.png", seed=3)
    with pytest.raises(DataError, match=r"dgo") as info:
        load_images(tmp_path / "data", tiny_taxonomy)
    assert "2" in str(info.value) and "dog" in str(info.value)


def labelled_table(tmp_path, make_image, counts: dict[str, int]):
    seed = 0
    for label, n in counts.items():
        for k in range(n):
            make_image(tmp_path / "data" / label / f"{label}{k}.png", seed=seed)
            seed += 1
    return load_images(tmp_path / "data")


def test_class_with_one_image_splits_with_a_warning_not_a_traceback(tmp_path, make_image):
    table = labelled_table(tmp_path, make_image, {"cat": 6, "dog": 1, "tree": 5})
    with pytest.warns(DataWarning) as record:
        folds = grouped_kfold(table, n_folds=3, seed=0)
    assert sorted(np.concatenate([v for _, v in folds]).tolist()) == list(range(len(table)))
    messages = [str(w.message) for w in record if issubclass(w.category, DataWarning)]
    dog = [m for m in messages if "'dog'" in m]
    assert len(dog) == 1 and "1 image(s)" in dog[0]
    # the fold whose validation part holds the only dog image trains without any dog
    (fold,) = [k + 1 for k, (_, val) in enumerate(folds) if any(table.labels[i] == "dog" for i in val)]
    assert f"training part of fold {fold}" in dog[0]
    assert not any("'cat'" in m for m in messages)


def test_class_with_zero_images_is_simply_absent(tmp_path, make_image, tiny_taxonomy):
    table = labelled_table(tmp_path, make_image, {"cat": 4, "dog": 4})
    table = load_images(tmp_path / "data", tiny_taxonomy)
    counts = table.counts_per_node(tiny_taxonomy)
    assert counts["flower"] == 0 and counts["animal"] == 8
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)  # nothing to warn about: both labels in both parts
        train, val = grouped_train_val_split(table, 0.5, seed=0)
    assert {table.labels[i] for i in train} == {table.labels[i] for i in val} == {"cat", "dog"}


def test_train_val_split_missing_a_class_warns_naming_it(tmp_path, make_image):
    table = labelled_table(tmp_path, make_image, {"cat": 6, "dog": 1})
    with pytest.warns(DataWarning, match=r"label 'dog' \(1 image\(s\)\) is missing from the (training|validation) part of split"):
        grouped_train_val_split(table, 0.5, seed=0)


def test_group_spanning_two_labels_is_reported_by_the_audit(tmp_path, make_image, tiny_taxonomy):
    for k, label in enumerate(("cat", "dog", "dog")):
        make_image(tmp_path / f"{label}{k}.png", seed=k)
    (tmp_path / "m.csv").write_text("path,label,group\ncat0.png,cat,P1\ndog1.png,dog,P1\ndog2.png,dog,P2\n")
    report = audit(load_images(tmp_path / "m.csv", tiny_taxonomy), tiny_taxonomy, min_size=1, progress=False)
    assert report.mixed_groups == [("P1", ["cat", "dog"])]
    assert report.summary()["groups with several labels"] == 1


def write_manifest_text(tmp_path, make_image, text: str, newline: str = "\n", bom: bool = False) -> Path:
    for k, name in enumerate(("a.png", "b.png")):
        make_image(tmp_path / name, seed=k)
    path = tmp_path / "m.csv"
    data = text.replace("\n", newline).encode("utf-8")
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + data)
    return path


@pytest.mark.parametrize(
    "text, expected",
    [
        ("file,label\na.png,cat\n", r"m\.csv: missing column\(s\) path"),
        ("path,label\na.png,cat\nb.png,dog\na.png,cat\n", r"m\.csv: 1 row\(s\) list a file already listed above \(line 4\)"),
        ("path,label\n../outside.png,cat\n", r"m\.csv: 1 path\(s\) point outside .* line 2 \(\.\./outside\.png\)"),
        ("", r"m\.csv: empty manifest"),
        ("path,label\n", r"m\.csv: the manifest lists no images"),
        ("path,label\na.png,cat\nmissing.png,dog\n", r"m\.csv: 1 listed file\(s\) not found \(line 3"),
        ("path,label\na.png,\n", r"m\.csv: 1 row\(s\) without a label \(line 2\)"),
    ],
)
def test_broken_manifest_is_a_one_line_error_naming_the_line(tmp_path, make_image, tiny_taxonomy, text, expected):
    path = write_manifest_text(tmp_path, make_image, text)
    with pytest.raises(DataError, match=expected) as info:
        load_images(path, tiny_taxonomy)
    assert "\n" not in str(info.value)


def test_manifest_with_bom_crlf_and_extra_whitespace_reads_cleanly(tmp_path, make_image, tiny_taxonomy):
    text = " Path , Label ,group \n a.png , kitty , P1 \n\n b.png,dog,P2\n"
    path = write_manifest_text(tmp_path, make_image, text, newline="\r\n", bom=True)
    table = load_images(path, tiny_taxonomy)
    assert [p.name for p in table.paths] == ["a.png", "b.png"]
    assert table.labels == ["cat", "dog"]  # the alias resolved, whitespace and CR gone
    assert table.groups == ["P1", "P2"]


def test_folder_without_images_is_refused(tmp_path):
    (tmp_path / "data" / "cat").mkdir(parents=True)
    (tmp_path / "data" / "cat" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match=r"data: no images found"):
        load_images(tmp_path / "data")


# -- taxonomy files ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, line",
    [
        ("root: root\nchildren:\n\t- cat\n\t- dog\n", 3),  # a tab for indentation
        ("root: root\nchildren: [cat, dog\n", 3),  # unclosed bracket (reported where the file ends)
        ("root: root\nchildren:\n  - name: a\n    children: {b: [c}\n", 4),  # mismatched brackets
    ],
)
def test_malformed_yaml_names_the_line_and_exits_2(tmp_path, capsys, text, line):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(TaxonomyError, match=rf"bad\.yaml:{line}"):
        load_taxonomy(path)
    assert main(["taxonomy", "validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml" in err and "Traceback" not in err


# -- checkpoints that do not belong to the run ------------------------------------------------


@pytest.fixture(scope="module")
def runs(smears, tmp_path_factory):
    """Three finished 1-epoch runs: 'base', 'other_backbone' and 'other_tree' (APML excluded)."""
    top = tmp_path_factory.mktemp("runs")
    made = {}
    for name, extra, backbone in (
        ("base", (), "test_resnet"),
        ("other_backbone", (), "test_efficientnet"),
        ("other_tree", ("--exclude", "APML"), "test_resnet"),
    ):
        made[name] = top / name
        assert main(fit_args(smears, made[name], *extra, backbone=backbone)) == 0
    return made


def predict(run: Path, data: Path, out: Path, *extra: str) -> int:
    return main(["predict", "--run", str(run), "--data", str(data), "--out", str(out), "--device", "cpu",
                 "--no-progress", *extra])


def transplant(source: Path, target: Path, files=("best.safetensors", "best.json")) -> None:
    for name in files:
        shutil.copy2(source / "checkpoints" / name, target / "checkpoints" / name)


def test_checkpoint_from_another_tree_is_refused_by_predict(runs, smears, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(runs["base"], run)
    transplant(runs["other_tree"], run)
    assert predict(run, smears, tmp_path / "p.csv") == 2
    err = capsys.readouterr().err
    assert "trained on another tree" in err and "Traceback" not in err
    assert not (tmp_path / "p.csv").exists()


def test_checkpoint_from_another_backbone_is_refused_by_predict(runs, smears, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(runs["base"], run)
    transplant(runs["other_backbone"], run)
    assert predict(run, smears, tmp_path / "p.csv") == 2
    err = capsys.readouterr().err
    assert "backbone 'test_efficientnet' disagrees" in err and "Traceback" not in err


def test_weights_alone_from_another_backbone_are_refused(runs, smears, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(runs["base"], run)
    transplant(runs["other_backbone"], run, files=("best.safetensors",))
    assert predict(run, smears, tmp_path / "p.csv") == 2
    err = capsys.readouterr().err
    assert "weights do not fit the model" in err and "Traceback" not in err


def test_load_run_refuses_an_edited_checkpoint_tree(runs, tmp_path):
    from hiercls.inference import load_run

    run = tmp_path / "run"
    shutil.copytree(runs["base"], run)
    meta_path = run / "checkpoints" / "best.json"
    meta = json.loads(meta_path.read_text())
    meta["taxonomy_fingerprint"] = "0" * 16
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="does not match the stored tree"):
        load_run(run)


def test_predict_on_a_run_without_a_finished_checkpoint_exits_2(runs, smears, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(runs["base"], run)
    for path in (run / "checkpoints").iterdir():
        path.unlink()  # as if killed before its first epoch ended
    assert predict(run, smears, tmp_path / "p.csv") == 2
    err = capsys.readouterr().err
    assert "no finished 'best' checkpoint" in err and "Traceback" not in err


def test_predict_on_a_folder_that_is_not_a_run_exits_2(smears, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert predict(tmp_path / "empty", smears, tmp_path / "p.csv") == 2
    assert "not a hiercls run" in capsys.readouterr().err


def test_predict_into_a_missing_folder_is_refused_before_predicting(runs, smears, tmp_path, capsys):
    assert predict(runs["base"], smears, tmp_path / "no" / "such" / "p.csv") == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "--out" in err and "Traceback" not in err


def test_predict_never_overwrites_an_existing_file_without_overwrite(runs, smears, tmp_path, capsys):
    out = tmp_path / "p.csv"
    out.write_text("my notes")
    assert predict(runs["base"], smears, out) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert out.read_text() == "my notes"
    assert predict(runs["base"], smears, out, "--overwrite") == 0
    assert out.read_text().startswith("path,label,group,prediction")


def test_predict_with_unreadable_images_names_them_all(runs, smears, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(smears, data)
    for name in ("ALL/slide0_ALL.png", "CML/slide2_CML.png", "Normal/slide1_Normal.png"):
        (data / name).write_bytes(b"\0" * 10)
    assert predict(runs["base"], data, tmp_path / "p.csv") == 2
    err = capsys.readouterr().err
    assert "3 of 24 image file(s) cannot be read" in err
    assert all(name in err for name in ("slide0_ALL.png", "slide2_CML.png", "slide1_Normal.png"))
    assert not (tmp_path / "p.csv").exists()


def test_full_disk_while_writing_the_cache_is_a_named_error(tmp_path, make_image, monkeypatch):
    import errno

    paths = [make_image(tmp_path / f"i{k}.png", seed=k) for k in range(3)]

    def disk_full(*args, **kwargs):  # the cache allocates its space before writing into it
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", disk_full, raising=False)
    cache_dir = tmp_path / "cache"
    with pytest.raises(DataError, match=r"cache: not enough disk space for the image cache: .*--cache-dir"):
        ImageCache(cache_dir).load(paths, 8, progress=False)
    assert list(cache_dir.iterdir()) == []  # no partial entry left behind
