"""Omniglot sources: the npz pair and torchvision's omniglot-py PNG layout decode to the same ink."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import icl.config as config_module
import icl.data.omniglot as omniglot_module
from icl.config import build_config, data_roots
from icl.data import load_data
from icl.data.omniglot import (
    NPZ_FILES,
    check_dataset,
    find_source,
    how_to_provide,
    load_images,
    locate_root,
    read_raw,
    resize,
)
from icl.errors import UserError

N_BG, N_EV = 12, 4  # characters in the small npz copy: ids 0001..0012 and 0965..0968
N_PNG = 30  # characters in the PNG folder: ids 0001..0030


@pytest.fixture(scope="module")
def real(omniglot_subset) -> dict[str, np.ndarray]:
    """The first characters of each real npz file (True = paper, as stored)."""
    root = omniglot_subset(N_PNG, N_EV)
    return {part: np.load(root / name)["images"] for part, name in zip(("background", "evaluation"), NPZ_FILES)}


@pytest.fixture(scope="module")
def small_npz(omniglot_subset) -> Path:
    """A real-data npz pair with the first 12 background and 4 evaluation characters."""
    return omniglot_subset(N_BG, N_EV)


def write_png_folder(root: Path, images: np.ndarray) -> Path:
    """torchvision's layout: omniglot-py/images_background/<alphabet>/<characterNN>/NNNN_DD.png.

    Characters are spread over alphabets of 7 (as in the real set, ids run across alphabet
    folders); even characters are written as 1-bit PNGs (what the real files are), odd ones as
    8-bit grey, white paper and black ink either way."""
    tv = root / "omniglot-py"
    (tv / "images_evaluation").mkdir(parents=True)
    for c, drawers in enumerate(images):
        folder = tv / "images_background" / f"Alphabet_{c // 7:02d}" / f"character{c % 7 + 1:02d}"
        folder.mkdir(parents=True)
        for d, paper in enumerate(drawers):
            img = Image.fromarray(paper) if c % 2 == 0 else Image.fromarray(paper.astype(np.uint8) * 255)
            img.save(folder / f"{c + 1:04d}_{d + 1:02d}.png")
    return tv


@pytest.fixture(scope="module")
def png_root(real, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("png")
    write_png_folder(root, real["background"])
    return root


# --------------------------------------------------------------------------- npz


def test_npz_decodes_to_ink_at_105px(small_npz, real, tmp_path):
    source = find_source(small_npz)
    assert source.kind == "npz" and source.root == small_npz
    ink = read_raw(source)
    assert ink.dtype == bool and ink.shape == (N_BG + N_EV, 20, 105, 105)
    # background first, then evaluation (global id order); ink = ~images
    np.testing.assert_array_equal(ink[:N_BG], ~real["background"][:N_BG])
    np.testing.assert_array_equal(ink[N_BG:], ~real["evaluation"])
    images, _ = load_images(small_npz, tmp_path, 105, custom=True)
    assert images.dtype == np.uint8 and images.shape == (N_BG + N_EV, 20, 105, 105)
    np.testing.assert_array_equal(images, ink.astype(np.uint8) * 255)
    assert 0.04 < ink.mean() < 0.15  # about 8% of pixels are ink


def test_full_data_in_global_order(omniglot_dir, session_cache_dir, real):
    images, source = load_images(omniglot_dir, session_cache_dir, 14)
    assert source.kind == "npz" and images.shape == (1623, 20, 14, 14) and images.dtype == np.uint8
    np.testing.assert_array_equal(images[:N_PNG], resize(~real["background"], 14))
    np.testing.assert_array_equal(images[964:964 + N_EV], resize(~real["evaluation"], 14))
    assert (images.reshape(1623, -1).max(1) > 0).all()  # every character has ink


def test_resize_is_area_averaging():
    rng = np.random.default_rng(0)
    ink = rng.random((3, 2, 105, 105)) < 0.1
    out = resize(ink, 35)  # 105 / 35 = 3: each output pixel is the mean of a 3x3 block
    expected = ink.reshape(3, 2, 35, 3, 35, 3).mean(axis=(3, 5)) * 255
    assert out.dtype == np.uint8 and out.shape == (3, 2, 35, 35)
    assert np.abs(out.astype(float) - expected).max() <= 0.5 + 1e-6
    np.testing.assert_array_equal(resize(ink, 105), ink.astype(np.uint8) * 255)
    thin = np.zeros((1, 105, 105), dtype=bool)
    thin[0, 50, :] = True  # a one-pixel stroke survives downsampling
    assert resize(thin, 14).max() > 0


def test_missing_data_says_how_to_provide(tmp_path):
    with pytest.raises(UserError) as e:
        find_source(tmp_path)
    msg = str(e.value)
    assert str(tmp_path) in msg and "images_background.npz" in msg and "ICL_DATA_DIR" in msg
    assert "icl-data prepare" in msg and "omniglot-py" in msg
    # half a pair is not a source either
    shutil.copy(Path(__file__), tmp_path / NPZ_FILES[0])
    with pytest.raises(UserError, match="no Omniglot data"):
        find_source(tmp_path)


def test_sha256sums_checked(omniglot_dir, tmp_path):
    for name in (*NPZ_FILES, "SHA256SUMS"):
        shutil.copy(omniglot_dir / name, tmp_path / name)
    assert find_source(tmp_path).fingerprint == find_source(omniglot_dir).fingerprint  # by content
    path = tmp_path / NPZ_FILES[1]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(UserError) as e:
        find_source(tmp_path)
    assert str(path) in str(e.value) and "corrupt" in str(e.value)


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_npz_without_sums_is_reported(small_npz, tmp_path, damage):
    for name in NPZ_FILES:
        shutil.copy(small_npz / name, tmp_path / name)
    path = tmp_path / NPZ_FILES[0]
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 3] ^= 0xFF  # inside the compressed image stream
    path.write_bytes(bytes(data))
    with pytest.raises(UserError) as e:
        load_images(tmp_path, tmp_path / "cache", 14, custom=True)
    assert str(path) in str(e.value)
    assert not list(tmp_path.glob("cache/*.npy"))  # nothing cached from the damaged file


def test_npz_with_wrong_shape_is_reported(tmp_path):
    np.savez(tmp_path / NPZ_FILES[0], images=np.ones((2, 20, 28, 28), dtype=bool))
    np.savez(tmp_path / NPZ_FILES[1], images=np.ones((2, 20, 28, 28), dtype=bool))
    with pytest.raises(UserError, match=r"shape \[2, 20, 28, 28\], expected bool \[n, 20, 105, 105\]"):
        read_raw(find_source(tmp_path))


# --------------------------------------------------------------------------- torchvision PNG layout


def test_png_layout_decodes_to_the_npz_ink(png_root, real, tmp_path):
    source = find_source(png_root)
    assert source.kind == "torchvision" and "omniglot-py" in source.describe()
    ink = read_raw(source)
    assert ink.shape == (N_PNG, 20, 105, 105)
    np.testing.assert_array_equal(ink, ~real["background"])
    images, _ = load_images(png_root, tmp_path, 14, custom=True)
    np.testing.assert_array_equal(images, resize(~real["background"], 14))


def test_png_layout_end_to_end(png_root, tmp_path):
    # 30 characters: 23 holdout leave 7 training characters (56 classes with augmentation)
    cfg = build_config("tiny", {"data.root": str(png_root), "data.cache_dir": str(tmp_path), "data.custom": True,
                                "data.num_classes": 56, "data.augment": True})
    data = load_data(cfg)
    assert data.source.kind == "torchvision" and data.bank.n_chars == N_PNG
    assert data.split.num_classes == 56 and len(data.split.holdout_classes) == 23 * 8
    batch = data.train_batch(0)
    assert data.bank.render(batch.classes, batch.exemplars).shape == (16, 9, 14, 14)
    with pytest.raises(UserError, match="exceeds the 56 training classes"):
        load_data(build_config(cfg.to_dict(), {"data.num_classes": 57}))


def test_npz_pair_preferred_over_png_folder(small_npz, png_root, tmp_path):
    for name in NPZ_FILES:
        shutil.copy(small_npz / name, tmp_path / name)
    shutil.copytree(png_root / "omniglot-py", tmp_path / "omniglot-py")
    assert find_source(tmp_path).kind == "npz"


def test_png_fingerprint_follows_the_file_list(png_root, tmp_path):
    shutil.copytree(png_root / "omniglot-py", tmp_path / "omniglot-py")
    assert find_source(tmp_path).fingerprint == find_source(png_root).fingerprint
    (tmp_path / "omniglot-py/images_background/Alphabet_00/character01/0001_01.png").unlink()
    assert find_source(tmp_path).fingerprint != find_source(png_root).fingerprint


@pytest.fixture
def png_copy(png_root, tmp_path) -> Path:
    shutil.copytree(png_root / "omniglot-py", tmp_path / "omniglot-py")
    return tmp_path / "omniglot-py" / "images_background"


def test_png_missing_drawer_is_reported(png_copy):
    (png_copy / "Alphabet_00/character03/0003_07.png").unlink()
    with pytest.raises(UserError, match="0003 does not have 20 drawers"):
        read_raw(find_source(png_copy.parent.parent))


def test_png_gap_in_character_ids_is_reported(png_copy):
    shutil.rmtree(png_copy / "Alphabet_00/character02")
    with pytest.raises(UserError, match="not contiguous"):
        read_raw(find_source(png_copy.parent.parent))


def test_png_undecodable_file_is_reported(png_copy):
    bad = png_copy / "Alphabet_01/character01/0008_05.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(UserError) as e:
        read_raw(find_source(png_copy.parent.parent))
    assert str(bad) in str(e.value)


def test_png_wrong_size_is_reported(png_copy):
    bad = png_copy / "Alphabet_00/character01/0001_01.png"
    Image.new("L", (28, 28), 255).save(bad)
    with pytest.raises(UserError, match="expected 105x105"):
        read_raw(find_source(png_copy.parent.parent))


def test_empty_png_folder_is_reported(tmp_path):
    (tmp_path / "omniglot-py/images_background").mkdir(parents=True)
    (tmp_path / "omniglot-py/images_evaluation").mkdir(parents=True)
    with pytest.raises(UserError, match="no Omniglot PNG"):
        read_raw(find_source(tmp_path))


def test_load_data_on_real_data(omniglot_dir):
    cfg = build_config("tiny")
    data = load_data(cfg)
    assert data.source.kind == "npz" and data.source.root == omniglot_dir
    assert data.bank.images.shape == (1623, 20, 14, 14) and data.device == torch.device("cpu")
    assert data.train_classes.tolist() == data.split.train_classes.tolist()


# --------------------------------------------------------------------------- is it Omniglot?


def pair(root: Path, omniglot_dir: Path, evaluation: dict[str, np.ndarray]) -> Path:
    """The real background file and an evaluation file holding ``evaluation``."""
    root.mkdir(parents=True, exist_ok=True)
    (root / NPZ_FILES[0]).symlink_to(omniglot_dir / NPZ_FILES[0])
    np.savez_compressed(root / NPZ_FILES[1], **evaluation)
    return root


def refused(root: Path, custom: bool = False) -> str:
    with pytest.raises(UserError) as e:
        check_dataset(find_source(root), custom)
    return str(e.value)


def omniglot_labels(n: int) -> np.ndarray:
    return np.repeat(np.arange(n), 20).reshape(n, 20)


def test_real_omniglot_passes(omniglot_dir):
    check_dataset(find_source(omniglot_dir))


def test_a_subset_is_refused_unless_custom(small_npz):
    msg = refused(small_npz)
    assert "holds 12 characters" in msg and "964" in msg and "data.custom=true" in msg
    check_dataset(find_source(small_npz), custom=True)


def test_an_evaluation_file_short_of_characters(omniglot_dir, tmp_path):
    """The audit's case: 600 of the 659 evaluation characters trained on 1564 characters."""
    root = pair(tmp_path, omniglot_dir, {"images": np.ones((600, 20, 105, 105), bool), "labels": omniglot_labels(600)})
    msg = refused(root)
    assert str(root / NPZ_FILES[1]) in msg and "600 characters" in msg and "659" in msg
    check_dataset(find_source(root), custom=True)
    with pytest.raises(UserError, match="data.custom=true"):
        load_data(build_config("tiny", {"data.root": str(root), "data.cache_dir": str(tmp_path / "c")}))


@pytest.mark.parametrize(
    "images, words",
    [
        (np.full((3, 20, 105, 105), 3.5), ["float64", "expected bool"]),  # not binary, outside [0, 1]
        (np.ones((3, 20, 105, 105), np.uint8), ["uint8"]),
        (np.ones((659, 20, 28, 28), bool), ["[659, 20, 28, 28]"]),
        (np.ones((3, 19, 105, 105), bool), ["[3, 19, 105, 105]"]),
    ],
)
def test_images_not_binary_or_of_the_wrong_size_are_refused_even_when_custom(omniglot_dir, tmp_path, images, words):
    root = pair(tmp_path, omniglot_dir, {"images": images, "labels": omniglot_labels(len(images))})
    for custom in (False, True):
        msg = refused(root, custom)
        assert str(root / NPZ_FILES[1]) in msg and all(w in msg for w in words)


@pytest.mark.parametrize(
    "labels, custom, words",
    [
        (np.zeros((3,), np.int64), False, ["'labels'", "[3]", "expected integers [3, 20]"]),
        (np.zeros((3, 20), np.float32), True, ["float32"]),
        (None, False, ["no array 'labels'"]),
        (omniglot_labels(659)[::-1].copy(), False, ["labels character 0"]),
    ],
)
def test_labels_must_number_the_characters(omniglot_dir, tmp_path, labels, custom, words):
    n = 659 if labels is None or labels.shape == (659, 20) else 3  # a wrong count is refused first
    arrays = {"images": np.ones((n, 20, 105, 105), bool)}
    if labels is not None:
        arrays["labels"] = labels
    msg = refused(pair(tmp_path, omniglot_dir, arrays), custom)
    assert all(w in msg for w in words)


def test_png_layout_of_a_few_characters_is_refused_unless_custom(png_root):
    msg = refused(png_root)
    assert "holds 30 characters" in msg and "data.custom=true" in msg
    check_dataset(find_source(png_root), custom=True)


def test_the_check_runs_before_the_cache(small_npz, tmp_path):
    """A cache built with data.custom=true is not a way around the check later."""
    load_images(small_npz, tmp_path, 14, custom=True)
    with pytest.raises(UserError, match="holds 12 characters"):
        load_images(small_npz, tmp_path, 14)


# --------------------------------------------------------------------------- where the data is found


@pytest.fixture
def checkout(tmp_path: Path, monkeypatch) -> Path:
    """A checkout at tmp/proj with nothing configured (no data.root, no ICL_DATA_DIR)."""
    proj = tmp_path / "proj"
    proj.mkdir()
    monkeypatch.setattr(config_module, "PROJECT_ROOT", proj)
    monkeypatch.delenv("ICL_DATA_DIR", raising=False)
    return proj


def place(folder: Path, source: Path) -> Path:
    """``folder`` holding the npz pair of ``source`` (symbolic links: nothing is copied)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in NPZ_FILES:
        (folder / name).symlink_to(source / name)
    return folder


def test_a_fresh_checkout_finds_the_copy_in_or_beside_it_in_order(checkout: Path, small_npz: Path):
    cfg = build_config("tiny")
    beside = place(checkout.parent / "shared" / "data" / "omniglot", small_npz)
    assert data_roots(cfg) == [checkout / "data", checkout / "shared/data/omniglot", beside]
    assert locate_root(cfg) == beside
    inside = place(checkout / "shared" / "data" / "omniglot", small_npz)
    assert locate_root(cfg) == inside
    own = place(checkout / "data", small_npz)
    assert locate_root(cfg) == own


def test_a_configured_root_is_the_only_place_looked_and_never_downloaded_into(checkout, small_npz, tmp_path,
                                                                              monkeypatch):
    place(checkout.parent / "shared" / "data" / "omniglot", small_npz)
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setattr(omniglot_module, "can_download", lambda host="": True)  # as if online
    fetched = []
    for cfg in (build_config("tiny", [f"data.root={empty}"]), None):
        if cfg is None:
            monkeypatch.setenv("ICL_DATA_DIR", str(empty))
            cfg = build_config("tiny")
        with pytest.raises(UserError) as e:
            locate_root(cfg, fetch=fetched.append)
        assert str(e.value) == how_to_provide(empty)
    assert fetched == []


def test_found_nowhere_it_is_downloaded_into_data_when_online(checkout, small_npz, monkeypatch, capsys):
    """The internet cannot be reached here: ``fetch`` stands in for torchvision's download."""
    monkeypatch.setattr(omniglot_module, "can_download", lambda host="": True)
    cfg = build_config("tiny")

    def fetch(root: Path):
        return find_source(place(root, small_npz))

    assert locate_root(cfg, fetch=fetch) == checkout / "data"
    assert "downloading it with torchvision into" in capsys.readouterr().err
    assert locate_root(cfg, fetch=None) == checkout / "data"  # found there from now on


def test_found_nowhere_offline_is_the_error_that_says_how_to_provide_it(checkout, monkeypatch):
    monkeypatch.setattr(omniglot_module, "can_download", lambda host="": False)
    with pytest.raises(UserError) as e:
        locate_root(build_config("tiny"), fetch=lambda root: pytest.fail("no download offline"))
    assert str(e.value) == how_to_provide(checkout / "data")


def test_a_damaged_copy_found_first_is_reported_not_passed_over(checkout, small_npz, tmp_path):
    place(checkout.parent / "shared" / "data" / "omniglot", small_npz)
    damaged = checkout / "data"
    damaged.mkdir()
    for name in NPZ_FILES:
        shutil.copy(small_npz / name, damaged / name)
    (damaged / "SHA256SUMS").write_text(f"{'0' * 64}  {NPZ_FILES[0]}\n")
    cfg = build_config("tiny", [f"data.cache_dir={tmp_path / 'cache'}", "data.custom=true", "data.n_holdout=4",
                                "data.num_classes=8"])
    with pytest.raises(UserError, match="corrupt"):
        load_data(cfg)
