"""The decoded-image cache: built once, reused, keyed by its source, never used when damaged.

The small real-data pairs are not the whole of Omniglot, so they load with ``custom=True``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import icl.data.omniglot as og
from icl.data.omniglot import NPZ_FILES, cache_paths, find_source, load_images, resize

N_BG, N_EV = 10, 3


@pytest.fixture(scope="module")
def small_npz(omniglot_subset) -> Path:
    """A real-data npz pair: the first 10 background and 3 evaluation characters."""
    return omniglot_subset(N_BG, N_EV)


@pytest.fixture(scope="module")
def expected(small_npz) -> np.ndarray:
    ink = ~np.concatenate([np.load(small_npz / n)["images"] for n in NPZ_FILES])
    return resize(ink, 28)


@pytest.fixture
def built(small_npz, tmp_path, capsys):
    """A fresh cache (28 px) of the small pair in tmp_path; returns (npy, json) paths."""
    load_images(small_npz, tmp_path, 28, custom=True)
    assert capsys.readouterr().err == ""
    npy, meta = cache_paths(tmp_path, find_source(small_npz), 28)
    assert npy.is_file() and meta.is_file()
    return npy, meta


def no_rebuild(monkeypatch):
    def fail(source):
        raise AssertionError("the cache was rebuilt from the raw data")

    monkeypatch.setattr(og, "read_raw", fail)


def test_built_once_then_reused(small_npz, tmp_path, built, expected, monkeypatch, capsys):
    npy, meta = built
    stat = npy.stat(), meta.stat()
    no_rebuild(monkeypatch)
    for _ in range(2):
        images, source = load_images(small_npz, tmp_path, 28, custom=True)
        np.testing.assert_array_equal(images, expected)
    assert capsys.readouterr().err == ""
    assert (npy.stat().st_mtime_ns, npy.stat().st_ino) == (stat[0].st_mtime_ns, stat[0].st_ino)
    assert (meta.stat().st_mtime_ns, meta.stat().st_ino) == (stat[1].st_mtime_ns, stat[1].st_ino)
    # exactly one entry, no temporary files left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([npy.name, meta.name])
    m = json.loads(meta.read_text())
    assert m["source"] == source.fingerprint and m["image_size"] == 28 and m["shape"] == [13, 20, 28, 28]


def test_cache_keyed_by_size_and_source(small_npz, tmp_path, built, monkeypatch):
    npy, _ = built
    load_images(small_npz, tmp_path, 14, custom=True)
    assert len(list(tmp_path.glob("*.npy"))) == 2  # one entry per image size
    # other data (here: one character fewer) gets its own entry, never the old one
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(small_npz / NPZ_FILES[0], other / NPZ_FILES[0])
    np.savez_compressed(other / NPZ_FILES[1], images=np.load(small_npz / NPZ_FILES[1])["images"][:2])
    images, _ = load_images(other, tmp_path, 28, custom=True)
    assert images.shape[0] == N_BG + 2
    assert cache_paths(tmp_path, find_source(other), 28)[0] != npy


def test_session_cache_reused_on_real_data(omniglot_dir, session_cache_dir, monkeypatch, capsys):
    load_images(omniglot_dir, session_cache_dir, 14)  # builds it if no earlier test did
    no_rebuild(monkeypatch)
    images, _ = load_images(omniglot_dir, session_cache_dir, 14)
    assert images.shape == (1623, 20, 14, 14)
    assert "warning" not in capsys.readouterr().err


def damage_truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])


def damage_flip_pixel(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1000] ^= 0x01  # a pixel value; header and shape intact
    path.write_bytes(bytes(data))


def damage_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[:6] = b"XXXXXX"  # not an .npy any more
    path.write_bytes(bytes(data))


def damage_empty(path: Path) -> None:
    path.write_bytes(b"")


def damage_delete(path: Path) -> None:
    path.unlink()


@pytest.mark.parametrize("damage", [damage_truncate, damage_flip_pixel, damage_header, damage_empty, damage_delete])
def test_damaged_array_is_reported_and_rebuilt(small_npz, tmp_path, built, expected, capsys, damage):
    npy, meta = built
    good = npy.read_bytes()
    damage(npy)
    images, _ = load_images(small_npz, tmp_path, 28, custom=True)
    err = capsys.readouterr().err
    assert err.startswith("warning:") and str(npy) in err and "rebuilding" in err
    np.testing.assert_array_equal(images, expected)  # the rebuilt array, not the damaged one
    assert npy.read_bytes() == good
    # and the rebuilt entry is trusted again next time
    load_images(small_npz, tmp_path, 28, custom=True)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("text", ["", '{"format": 1, "sour', '{"format": 1}', "[1, 2]", '"x"'])
def test_damaged_sidecar_is_reported_and_rebuilt(small_npz, tmp_path, built, expected, capsys, text):
    npy, meta = built
    meta.write_text(text)
    images, _ = load_images(small_npz, tmp_path, 28, custom=True)
    err = capsys.readouterr().err
    assert err.startswith("warning:") and "rebuilding" in err
    np.testing.assert_array_equal(images, expected)
    assert json.loads(meta.read_text())["image_size"] == 28


def test_sidecar_of_other_data_is_not_trusted(small_npz, tmp_path, built, capsys):
    npy, meta = built
    m = json.loads(meta.read_text())
    m["source"] = "0" * 64
    meta.write_text(json.dumps(m))
    load_images(small_npz, tmp_path, 28, custom=True)
    assert "other data" in capsys.readouterr().err


def test_array_swapped_for_another_valid_array(small_npz, tmp_path, built, expected, capsys):
    npy, meta = built
    np.save(npy, np.zeros_like(expected))  # a well-formed .npy, right shape, wrong content
    images, _ = load_images(small_npz, tmp_path, 28, custom=True)
    assert "checksum" in capsys.readouterr().err
    np.testing.assert_array_equal(images, expected)


def test_unwritable_cache_is_a_user_error(small_npz, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder should be")
    with pytest.raises(og.UserError, match="ICL_CACHE_DIR"):
        load_images(small_npz, blocker / "cache", 28, custom=True)
