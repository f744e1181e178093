"""Images on the device: the augmentation fast path against the plain numpy reference."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from icl.data.images import ImageBank, transform, variant_maps
from icl.data.omniglot import load_images


@pytest.fixture(scope="module")
def ink105(omniglot_subset) -> np.ndarray:
    """uint8 ink (255 = ink) of the first 6 real characters at 105 px."""
    with np.load(omniglot_subset(6, 1) / "images_background.npz") as z:
        return (~z["images"]).astype(np.uint8) * 255


@pytest.fixture(scope="module")
def ink14(omniglot_dir, session_cache_dir) -> np.ndarray:
    """All of Omniglot at 14 px (the tiny preset's size), from the session cache."""
    images, _ = load_images(omniglot_dir, session_cache_dir, 14)
    return images


def test_transform_reference_is_rot90_ccw_then_hflip():
    img = np.arange(12).reshape(3, 4)
    np.testing.assert_array_equal(transform(img, 0), img)
    np.testing.assert_array_equal(transform(img, 1), [[3, 7, 11], [2, 6, 10], [1, 5, 9], [0, 4, 8]])  # ccw
    np.testing.assert_array_equal(transform(img, 2), img[::-1, ::-1])
    np.testing.assert_array_equal(transform(img, 4), img[:, ::-1])
    np.testing.assert_array_equal(transform(img, 5), [[11, 7, 3], [10, 6, 2], [9, 5, 1], [8, 4, 0]])
    # the 8 variants of a square image without symmetry are the 8 distinct elements of D4
    sq = np.arange(25).reshape(5, 5)
    assert len({transform(sq, v).tobytes() for v in range(8)}) == 8


def test_variant_maps_are_permutations():
    maps = variant_maps(7)
    assert maps.shape == (8, 49)
    for m in maps:
        assert sorted(m.tolist()) == list(range(49))
    assert torch.equal(maps[0], torch.arange(49))


@pytest.mark.parametrize("size", [105, 14])
def test_augmented_bank_equals_numpy_reference_for_all_variants(size, ink105, ink14):
    images = ink105 if size == 105 else ink14[:40]
    bank = ImageBank(images, augment=True)
    assert bank.n_chars == len(images) and bank.n_classes == 8 * len(images) and bank.size == size
    n_chars = len(images)
    # every variant of every character, a few drawers, as one [chars, 8, drawers] index batch
    drawers = torch.tensor([0, 7, 19])
    classes = (torch.arange(n_chars)[:, None, None] * 8 + torch.arange(8)[None, :, None]).expand(-1, -1, 3)
    exemplars = drawers.expand(n_chars, 8, 3)
    out = bank.raw(classes, exemplars).numpy()
    assert out.shape == (n_chars, 8, 3, size, size) and out.dtype == np.uint8
    for c in range(n_chars):
        for v in range(8):
            for j, d in enumerate(drawers.tolist()):
                np.testing.assert_array_equal(out[c, v, j], transform(images[c, d], v), err_msg=f"c={c} v={v} d={d}")


def test_augmented_variants_of_real_images_differ(ink105):
    bank = ImageBank(ink105, augment=True)
    out = bank.raw(torch.arange(8), torch.zeros(8, dtype=torch.long))
    assert len({out[v].numpy().tobytes() for v in range(8)}) == 8


def test_plain_bank_is_a_gather(ink14):
    bank = ImageBank(ink14, augment=False)
    assert bank.n_classes == bank.n_chars == 1623 and bank.maps is None
    g = torch.Generator().manual_seed(0)
    classes = torch.randint(0, 1623, (4, 9), generator=g)
    exemplars = torch.randint(0, 20, (4, 9), generator=g)
    out = bank.raw(classes, exemplars).numpy()
    np.testing.assert_array_equal(out, ink14[classes.numpy(), exemplars.numpy()])


@pytest.mark.parametrize("augment", [False, True])
def test_render_is_float_ink_in_unit_range(ink105, augment):
    bank = ImageBank(ink105, augment=augment)
    classes = torch.tensor([[0, 1, 2], [3, 4, 5]])
    exemplars = torch.tensor([[0, 1, 2], [3, 4, 5]])
    x = bank.render(classes, exemplars)
    assert x.dtype == torch.float32 and x.shape == (2, 3, 105, 105)
    assert set(torch.unique(x).tolist()) == {0.0, 1.0}  # 105 px: binary, 1 = ink
    torch.testing.assert_close(x, bank.raw(classes, exemplars).float() / 255)
    ink = x.mean().item()
    assert 0.01 < ink < 0.25  # ink is the minority of pixels (about 8% in Omniglot)
    assert bank.render(classes, exemplars, torch.float16).dtype == torch.float16
