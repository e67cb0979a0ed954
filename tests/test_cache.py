"""The decoded-image cache: hits without decoding, misses on change, never a half-written entry."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from hiercls.data import cache as cache_module
from hiercls.data.cache import ImageCache, default_cache_dir
from hiercls.errors import DataError

from conftest import write_image


@pytest.fixture
def images(tmp_path):
    return [write_image(tmp_path / "img" / f"{k}.png", size=(20 + k, 16), seed=k) for k in range(5)]


@pytest.fixture
def counted_decode(monkeypatch):
    calls = []
    real = cache_module.decode_resized

    def counting(path, size):
        calls.append(path)
        return real(path, size)

    monkeypatch.setattr(cache_module, "decode_resized", counting)
    return calls


def test_load_shape_and_content(tmp_path, images):
    array = ImageCache(tmp_path / "cache").load(images, 8, progress=False)
    assert array.shape == (5, 8, 8, 3) and array.dtype == np.uint8
    assert isinstance(array, np.memmap)
    expected = np.asarray(Image.open(images[2]).convert("RGB").resize((8, 8), Image.Resampling.BICUBIC))
    assert np.array_equal(array[2], expected)


def test_second_load_does_not_decode(tmp_path, images, counted_decode):
    first = ImageCache(tmp_path / "cache").load(images, 8, progress=False)
    assert len(counted_decode) == 5
    cache = ImageCache(tmp_path / "cache")  # a new run
    second = cache.load(images, 8, progress=False)
    assert len(counted_decode) == 5 and cache.last_decoded == 0
    assert np.array_equal(first, second)
    reordered = cache.load(images[::-1], 8, progress=False)  # same files, other order: still a hit
    assert len(counted_decode) == 5
    assert np.array_equal(reordered, np.asarray(first)[::-1])


def test_other_size_misses(tmp_path, images, counted_decode):
    cache = ImageCache(tmp_path / "cache")
    cache.load(images, 8, progress=False)
    cache.load(images, 6, progress=False)
    assert len(counted_decode) == 10


def test_changed_file_misses(tmp_path, images, counted_decode):
    cache = ImageCache(tmp_path / "cache")
    before = np.array(cache.load(images, 8, progress=False))
    write_image(images[1], size=(21, 16), seed=100)
    stat = images[1].stat()
    os.utime(images[1], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10_000_000))
    after = cache.load(images, 8, progress=False)
    assert cache.last_decoded == 1  # the other four rows come from the old entry
    assert not np.array_equal(before[1], after[1])
    assert np.array_equal(before[0], after[0])


def test_subset_reuses_rows(tmp_path, images, counted_decode):
    cache = ImageCache(tmp_path / "cache")
    full = cache.load(images, 8, progress=False)
    part = cache.load(images[1:3], 8, progress=False)
    assert len(counted_decode) == 5
    assert np.array_equal(part, np.asarray(full)[1:3])


def test_no_temporary_files_left_and_killed_write_not_read(tmp_path, images, monkeypatch):
    cache_dir = tmp_path / "cache"
    cache = ImageCache(cache_dir)

    def broken(path, size):
        raise KeyboardInterrupt  # a run killed while decoding

    monkeypatch.setattr(cache_module, "decode_resized", broken)
    with pytest.raises(KeyboardInterrupt):
        cache.load(images, 8, progress=False)
    assert list(cache_dir.iterdir()) == []  # nothing half-written stays behind
    monkeypatch.undo()
    cache.load(images, 8, progress=False)
    names = sorted(p.name for p in cache_dir.iterdir())
    assert len(names) == 2 and not any(n.startswith(".") for n in names)


def test_entry_without_metadata_is_rebuilt(tmp_path, images, counted_decode):
    cache = ImageCache(tmp_path / "cache")
    cache.load(images, 8, progress=False)
    for meta in (tmp_path / "cache").glob("*.json"):
        meta.unlink()  # as if killed between the two renames
    cache.load(images, 8, progress=False)
    assert len(counted_decode) == 10


def test_parallel_decode_matches_serial(tmp_path):
    paths = [write_image(tmp_path / "many" / f"{k}.png", size=(12, 12), seed=k) for k in range(40)]
    parallel = ImageCache(tmp_path / "c1", workers=2).load(paths, 8, progress=False)
    serial = ImageCache(tmp_path / "c2", workers=1).load(paths, 8, progress=False)
    assert np.array_equal(parallel, serial)


def test_unreadable_and_missing_files(tmp_path, images):
    bad = tmp_path / "img" / "bad.png"
    bad.write_text("nope")
    with pytest.raises(DataError, match="bad.png"):
        ImageCache(tmp_path / "cache").load(images + [bad], 8, progress=False)
    with pytest.raises(DataError, match="gone.png"):
        ImageCache(tmp_path / "cache").load([tmp_path / "gone.png"], 8, progress=False)


def test_default_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("HIERCLS_CACHE", str(tmp_path / "here"))
    assert default_cache_dir() == tmp_path / "here"
    assert ImageCache().cache_dir == tmp_path / "here"
    monkeypatch.delenv("HIERCLS_CACHE")
    assert default_cache_dir().parts[-2:] == (".cache", "hiercls")
