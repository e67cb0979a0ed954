"""Files that are not what they claim (FIFOs, device links, float images with NaN), a full disk
under the image cache, a training set that leaves decisions of the tree empty, and the audit's
exit status.

Calls that would block or read forever without the fix run in a subprocess with a timeout
and a memory limit, or in a thread that is released from its FIFO after a timeout, so a
regression fails the test instead of hanging the suite or exhausting the machine.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hiercls.cli import main
from hiercls.data import ImageCache, audit, load_images, open_rgb
from hiercls.data import cache as cache_module
from hiercls.data import images as images_module
from hiercls.data.cache import STALE_TEMPORARY_AGE_S
from hiercls.data.coverage import check_training_coverage, training_counts
from hiercls.data.dataset import DataWarning
from hiercls.errors import DataError, HierclsWarning
from hiercls.taxonomy import Taxonomy

from conftest import write_image, write_smears

REPO = Path(__file__).resolve().parents[1]
HANG_TIMEOUT_S = 120  # generous: the child imports numpy, PIL and scikit-learn on a busy machine

needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo") or not Path("/dev/zero").exists(),
                                reason="needs POSIX FIFOs and /dev/zero")


def run_isolated(args: list[str], timeout: float = HANG_TIMEOUT_S) -> subprocess.CompletedProcess:
    """Run ``python ARGS`` with this checkout first on the path, at most 1 GiB of memory and a timeout.

    A child that blocks (on a FIFO) is killed at the timeout and the test fails; one that reads
    ``/dev/zero`` without end hits the memory limit and fails instead of exhausting the machine.
    """
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]), OMP_NUM_THREADS="1",
               OPENBLAS_NUM_THREADS="1", COLUMNS="200")

    def limit_memory() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (1024**3, 1024**3))

    try:
        return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout,
                              preexec_fn=limit_memory, cwd=REPO)
    except subprocess.TimeoutExpired:
        pytest.fail(f"`{' '.join(args[:3])} ...` did not finish within {timeout}s: it blocks on a non-regular file")


def call_unblocking_fifos(fn, fifos: list[Path], timeout: float = HANG_TIMEOUT_S):
    """``fn()`` in a thread; if it has not returned after ``timeout``, fail the test.

    A reader stuck on a FIFO is released first (a writer opens and closes it, so the reader
    sees the end of the file), so that a regression fails instead of leaving a blocked thread.
    """
    result: dict[str, object] = {}

    def target() -> None:
        try:
            result["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            result["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        for fifo in fifos:
            with contextlib.suppress(OSError):
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(30)
        pytest.fail(f"did not finish within {timeout}s: blocked reading a FIFO")
    if "error" in result:
        raise result["error"]
    return result["value"]


@pytest.fixture
def odd_files(tmp_path):
    """A class-folder dataset with a FIFO ``cat/pipe.jpg`` and a link ``dog/x.jpg`` to /dev/zero."""
    root = tmp_path / "data"
    for k in range(2):
        write_image(root / "cat" / f"cat_{k}.png", size=(40, 40), seed=k)
        write_image(root / "dog" / f"dog_{k}.png", size=(40, 40), seed=10 + k)
    os.mkfifo(root / "cat" / "pipe.jpg")
    os.symlink("/dev/zero", root / "dog" / "x.jpg")
    return root


# -- (6) files that are not files -------------------------------------------------------


@needs_fifo
def test_fifo_and_device_link_are_refused_by_name_without_blocking(odd_files):
    code = textwrap.dedent(f"""
        from hiercls.data import open_rgb
        from hiercls.errors import DataError
        for name in ("cat/pipe.jpg", "dog/x.jpg"):
            try:
                open_rgb({str(odd_files)!r} + "/" + name)
            except DataError as exc:
                print("REFUSED", exc)
    """)
    done = run_isolated(["-c", code])
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert len(lines) == 2
    assert "pipe.jpg: not a regular file (a FIFO" in lines[0]
    assert "x.jpg: not a regular file (a character device)" in lines[1]


@needs_fifo
def test_audit_lists_fifo_and_device_link_as_unreadable_and_exits_1(odd_files, tiny_taxonomy_file):
    done = run_isolated(["-m", "hiercls", "audit", "--taxonomy", str(tiny_taxonomy_file), "--data", str(odd_files),
                         "--no-progress", "--near-threshold", "-1"])
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    assert "pipe.jpg" in done.stdout and "x.jpg" in done.stdout
    assert "unreadable files: 2" in done.stdout


@needs_fifo
def test_cache_refuses_fifo_and_device_link_naming_both(odd_files, tmp_path):
    code = textwrap.dedent(f"""
        from hiercls.data import ImageCache, load_images
        from hiercls.errors import DataError
        table = load_images({str(odd_files)!r})
        try:
            ImageCache({str(tmp_path / "cache")!r}, workers=1).load(table.paths, 8, progress=False)
        except DataError as exc:
            print("REFUSED", exc)
    """)
    done = run_isolated(["-c", code])
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("REFUSED 2 of 6 image file(s) cannot be read")
    assert "pipe.jpg (not a regular file (a FIFO" in done.stdout and "x.jpg (not a regular file" in done.stdout


@needs_fifo
def test_fit_stops_on_a_fifo_with_its_name(tmp_path, capsys):
    labels = ("Normal", "Reactive", "ALL", "AML", "APML", "CLL", "CML", "Acute")
    data = write_smears(tmp_path / "data", labels, per_label=3, seed=1)
    os.mkfifo(data / "ALL" / "pipe.jpg")
    args = [
        "fit", "--taxonomy", str(REPO / "taxonomy" / "leukemia.yaml"), "--data", str(data),
        "--out", str(tmp_path / "run"), "--backbone", "test_resnet", "--img-size", "16", "--epochs", "1",
        "--device", "cpu", "--val-fraction", "0", "--cache-dir", str(tmp_path / "cache"), "--no-progress",
    ]
    assert call_unblocking_fifos(lambda: main(args), [data / "ALL" / "pipe.jpg"]) == 2
    assert "pipe.jpg (not a regular file (a FIFO" in capsys.readouterr().err


def test_fifo_in_a_manifest_is_not_reported_missing(tmp_path):
    if not hasattr(os, "mkfifo"):
        pytest.skip("needs POSIX FIFOs")
    write_image(tmp_path / "a.png", size=(40, 40))
    os.mkfifo(tmp_path / "b.jpg")
    (tmp_path / "m.csv").write_text("path,label\na.png,cat\nb.jpg,dog\n", encoding="utf-8")
    table = load_images(tmp_path / "m.csv")
    assert [p.name for p in table.paths] == ["a.png", "b.jpg"]
    report = call_unblocking_fifos(lambda: audit(table, progress=False, near_threshold=-1), [tmp_path / "b.jpg"])
    assert [(table.paths[i].name, why.split(" (")[0]) for i, why in report.unreadable] == [
        ("b.jpg", "not a regular file")]


def test_manifest_that_is_a_fifo_is_refused(tmp_path):
    if not hasattr(os, "mkfifo"):
        pytest.skip("needs POSIX FIFOs")
    os.mkfifo(tmp_path / "m.csv")
    with pytest.raises(DataError, match=r"m\.csv: not a regular file \(a FIFO"):
        call_unblocking_fifos(lambda: load_images(tmp_path / "m.csv"), [tmp_path / "m.csv"])


def test_image_over_the_size_limit_is_unreadable(tmp_path, monkeypatch):
    path = write_image(tmp_path / "big.png", size=(64, 64), seed=3)
    monkeypatch.setattr(images_module, "MAX_IMAGE_BYTES", path.stat().st_size - 1)
    with pytest.raises(DataError, match=r"big\.png: image file is larger than the limit"):
        open_rgb(path)
    report = audit([path], progress=False)
    assert report.unreadable and "larger than the limit" in report.unreadable[0][1]
    monkeypatch.setattr(images_module, "MAX_IMAGE_BYTES", path.stat().st_size)
    assert open_rgb(path).size == (64, 64)


# -- (7) float images -------------------------------------------------------------------


def write_float_tiff(path: Path, array: np.ndarray) -> Path:
    Image.fromarray(array.astype(np.float32), mode="F").save(path)
    assert Image.open(path).mode == "F"
    return path


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_float_tiff_with_a_non_finite_pixel_is_unreadable(tmp_path, bad):
    array = np.linspace(0, 1, 32 * 32).reshape(32, 32)
    array[5, 7] = bad
    path = write_float_tiff(tmp_path / "f.tif", array)
    with pytest.raises(DataError, match=r"f\.tif: 1 of 1024 pixel\(s\) are NaN or infinite"):
        open_rgb(path)
    report = audit([path], progress=False)
    assert len(report.unreadable) == 1 and "NaN or infinite" in report.unreadable[0][1]


def test_float_tiff_in_0_1_keeps_its_brightness(tmp_path):
    array = np.full((16, 16), 0.25)
    array[0, 0] = 0.5
    rgb = np.asarray(open_rgb(write_float_tiff(tmp_path / "dim.tif", array)))
    assert rgb.shape == (16, 16, 3)
    assert rgb[1, 1].tolist() == [64, 64, 64] and rgb[0, 0].tolist() == [128, 128, 128]


def test_float_tiff_outside_0_1_is_stretched_from_min_to_max(tmp_path):
    array = np.linspace(-50.0, 1950.0, 16 * 16).reshape(16, 16)
    gray = np.asarray(open_rgb(write_float_tiff(tmp_path / "raw.tif", array)))[..., 0]
    assert gray.min() == 0 and gray.max() == 255
    assert abs(int(gray.reshape(-1)[128]) - 128) <= 1


# -- (13) the audit's exit status --------------------------------------------------------


def test_audit_exits_0_on_clean_data_and_1_on_each_kind_of_problem(tmp_path, tiny_taxonomy_file, capsys):
    root = tmp_path / "data"
    for k in range(2):
        write_image(root / "cat" / f"c{k}.png", size=(48, 48), seed=k)
        write_image(root / "dog" / f"d{k}.png", size=(48, 48), seed=20 + k)
    args = ["audit", "--taxonomy", str(tiny_taxonomy_file), "--data", str(root), "--no-progress"]
    assert main(args) == 0
    assert "no problems found" in capsys.readouterr().out

    (root / "dog" / "broken.png").write_bytes(b"not a png")
    assert main(args) == 1
    assert "unreadable files: 1" in capsys.readouterr().out
    (root / "dog" / "broken.png").unlink()

    write_image(root / "zebra" / "z.png", size=(48, 48), seed=40)
    assert main(args) == 1
    assert "unknown labels: 1" in capsys.readouterr().out
    (root / "zebra" / "z.png").unlink()
    (root / "zebra").rmdir()

    (root / "cat" / "copy.png").write_bytes((root / "cat" / "c0.png").read_bytes())
    assert main(args) == 1
    assert "exact duplicate sets: 1" in capsys.readouterr().out
    (root / "cat" / "copy.png").unlink()

    Image.open(root / "cat" / "c1.png").convert("RGB").save(root / "cat" / "c1_again.jpg", quality=90)
    assert main(args) == 1
    assert "near duplicate sets: 1" in capsys.readouterr().out
    assert main(args + ["--near-threshold", "-1"]) == 0  # the check is off: nothing else is wrong
    capsys.readouterr()

    assert main(args + ["--min-size", "64"]) == 1  # every image is under 64 px
    assert main(["audit", "--taxonomy", str(tiny_taxonomy_file), "--data", str(tmp_path / "nope")]) == 2


def test_audit_exits_1_on_duplicates_across_folds(tmp_path, tiny_taxonomy_file, capsys):
    root = tmp_path / "data"
    for k in range(6):
        write_image(root / "cat" / f"P{k}_c.png", size=(48, 48), seed=k)
        write_image(root / "dog" / f"P{k}_d.png", size=(48, 48), seed=20 + k)
    (root / "cat" / "P9_copy.png").write_bytes((root / "cat" / "P0_c.png").read_bytes())  # other group
    args = ["audit", "--taxonomy", str(tiny_taxonomy_file), "--data", str(root), "--no-progress",
            "--group-regex", r"^(P\d)_", "--folds", "3"]
    assert main(args + ["--near-threshold", "-1"]) == 1
    assert "duplicate sets across folds: 1" in " ".join(capsys.readouterr().out.split())  # the closing line


def test_audit_help_documents_the_exit_status(capsys):
    with pytest.raises(SystemExit):
        main(["audit", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "Exit status: 0 when nothing was found, 1 when problems were found" in out


# -- (5) a full disk while building the image cache ------------------------------------


@pytest.fixture
def few_images(tmp_path):
    return [write_image(tmp_path / "img" / f"{k}.png", size=(20, 20), seed=k) for k in range(3)]


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_full_disk_is_a_clear_error_and_leaves_no_temporary_file(tmp_path, few_images, monkeypatch):
    cache_dir = tmp_path / "cache"
    monkeypatch.setattr(os, "posix_fallocate", no_space, raising=False)
    with pytest.raises(DataError) as info:
        ImageCache(cache_dir).load(few_images, 64, progress=False)
    message = str(info.value)
    assert message.startswith(f"{cache_dir}: not enough disk space for the image cache: 3 images at 64px need")
    assert "MiB are free there" in message and "--cache-dir" in message and "HIERCLS_CACHE" in message
    assert list(cache_dir.iterdir()) == []


def test_without_fallocate_zeros_are_written_and_a_full_disk_is_still_clear(tmp_path, few_images, monkeypatch):
    def unsupported(*args, **kwargs):
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))

    monkeypatch.setattr(os, "posix_fallocate", unsupported, raising=False)
    written = []
    real_write_zeros = cache_module._write_zeros

    def recording_write_zeros(fd, offset, length):
        written.append(length)
        real_write_zeros(fd, offset, length)

    monkeypatch.setattr(cache_module, "_write_zeros", recording_write_zeros)
    array = ImageCache(tmp_path / "c1").load(few_images, 8, progress=False)
    assert written == [3 * 8 * 8 * 3]
    assert np.array_equal(array, ImageCache(tmp_path / "c2").load(few_images, 8, progress=False))

    monkeypatch.setattr(cache_module, "_write_zeros", no_space)
    with pytest.raises(DataError, match="not enough disk space"):
        ImageCache(tmp_path / "c3").load(few_images, 8, progress=False)
    assert list((tmp_path / "c3").iterdir()) == []


def test_cache_space_is_allocated_before_images_are_written(tmp_path, few_images, monkeypatch):
    allocated = []
    real = cache_module._allocate

    def record(path, offset, length):
        real(path, offset, length)
        allocated.append(os.stat(path).st_blocks * 512 >= offset + length)

    monkeypatch.setattr(cache_module, "_allocate", record)
    ImageCache(tmp_path / "cache").load(few_images, 32, progress=False)
    assert allocated == [True]  # the blocks exist on disk: the file is not sparse


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_temporary_files_are_removed_by_the_next_load(tmp_path, few_images):
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    key, host = "0123456789abcdef" * 2, cache_module._host_tag()
    killed = cache_dir / f".{key}.{host}-{dead_pid()}.{'a' * 32}.tmp.npy"  # writer gone
    old = cache_dir / f".{key}.{'b' * 32}.tmp.npy"  # older naming, two days old
    running = cache_dir / f".{key}.{host}-{os.getpid()}.{'c' * 32}.tmp.npy"  # writer alive
    elsewhere = cache_dir / f".{key}.otherhost-1.{'d' * 32}.tmp.json"  # another host, recent
    unrelated = cache_dir / ".keep"
    for path in (killed, old, running, elsewhere, unrelated):
        path.write_bytes(b"\0" * 100)
    two_days_ago = time.time() - 2 * 24 * 3600
    os.utime(old, (two_days_ago, two_days_ago))
    ImageCache(cache_dir).load(few_images, 8, progress=False)
    left = {p.name for p in cache_dir.iterdir() if p.name.startswith(".")}
    assert left == {running.name, elsewhere.name, unrelated.name}
    assert STALE_TEMPORARY_AGE_S == 24 * 3600  # the documented age


def test_stale_temporary_is_removed_even_on_a_cache_hit(tmp_path, few_images):
    cache = ImageCache(tmp_path / "cache")
    cache.load(few_images, 8, progress=False)
    killed = tmp_path / "cache" / f".{'e' * 32}.{cache_module._host_tag()}-{dead_pid()}.{'f' * 32}.tmp.npy"
    killed.write_bytes(b"\0" * 100)
    cache.load(few_images, 8, progress=False)
    assert cache.last_decoded == 0 and not killed.exists()


# -- (10) a training set that does not cover the tree ------------------------------------


SEVEN_LEAVES = {
    "name": "seven",
    "root": "root",
    "children": [
        {"name": "Normal", "aliases": ["healthy"]},
        "Reactive",
        {"name": "Malignant", "children": [
            {"name": "Acute", "children": ["ALL", "AML", "APML"]},
            {"name": "Chronic", "children": ["CLL", "CML"]},
        ]},
    ],
}


@pytest.fixture
def seven():
    return Taxonomy.from_dict(SEVEN_LEAVES, source="seven.yaml")


def test_full_coverage_is_silent(seven):
    labels = ["Normal", "healthy", "Reactive", "ALL", "AML", "APML", "CLL", "CML", None]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_training_coverage(seven, labels) == []


def test_one_leaf_of_seven_with_images_stops_before_training(seven):
    with pytest.warns(DataWarning, match=r"6 of 7 leaves of the tree 'seven' have no training images "
                                         r"\(Reactive, ALL, AML, APML, CLL, CML\)"):
        with pytest.raises(DataError) as info:
            check_training_coverage(seven, ["Normal"] * 20)
    message = str(info.value)
    assert message.startswith("4 decision(s) of the tree 'seven' have fewer than two children with training images")
    assert "root (Normal: 20, Reactive: 0, Malignant: 0)" in message
    assert "Acute (ALL: 0, AML: 0, APML: 0)" in message and "Chronic (CLL: 0, CML: 0)" in message
    assert "exclude" in message and "--allow-incomplete-tree" in message


def test_allow_incomplete_only_warns_and_returns_the_empty_leaves(seven):
    with pytest.warns(DataWarning) as caught:
        empty = check_training_coverage(seven, ["Normal", "ALL", "CLL"], allow_incomplete=True)
    assert empty == ["Reactive", "AML", "APML", "CML"]
    texts = [str(w.message) for w in caught]
    assert len(texts) == 2 and "4 of 7 leaves" in texts[0]
    assert "Acute (ALL: 1, AML: 0, APML: 0)" in texts[1] and "Chronic (CLL: 1, CML: 0)" in texts[1]
    assert "training anyway" in texts[1]
    assert issubclass(DataWarning, HierclsWarning)


def test_partial_labels_count_for_their_node_and_ancestors_only(seven):
    labels = ["Normal", "Reactive", "Acute", "Acute", "CLL", "CML"]  # Acute: partial labels only
    with pytest.warns(DataWarning, match=r"3 of 7 leaves .*\(ALL, AML, APML\)"):
        with pytest.raises(DataError) as info:
            check_training_coverage(seven, labels)
    message = str(info.value)
    assert message.startswith("1 decision(s)") and "Acute (ALL: 0, AML: 0, APML: 0)" in message
    assert "Malignant (" not in message  # Acute's partial labels count for Malignant's decision
    counts = training_counts(seven, labels)
    assert counts["Acute"] == 2 and counts["Malignant"] == 4 and counts["root"] == 6 and counts["ALL"] == 0


def test_a_lone_child_needs_only_itself():
    tree = Taxonomy.from_dict({"name": "lone", "root": "root", "children": [
        {"name": "A", "children": ["a1", "a2"]}, {"name": "C", "children": ["c1"]}]})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_training_coverage(tree, ["a1", "a2", "c1"]) == []
    with pytest.warns(DataWarning), pytest.raises(DataError, match=r"C \(c1: 0\)"):
        check_training_coverage(tree, ["a1", "a2", "C"])


def test_unknown_training_label_is_an_error(seven):
    with pytest.raises(DataError, match="Lymphoma"):
        check_training_coverage(seven, ["Normal", "Reactive", "Lymphoma"])
