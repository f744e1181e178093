"""The class split of STUDY.md: fixed holdout, nested training lists, augmentation grouping."""

from __future__ import annotations

import numpy as np
import pytest

from icl.config import N_CHARACTERS, N_VARIANTS, build_config
from icl.data.split import character_order, expand, make_split, split_for

SEED = 1337


def split(num_classes: int, augment: bool = False, n_holdout: int = 23, split_seed: int = SEED):
    return make_split(N_CHARACTERS, n_holdout, num_classes, augment, split_seed)


def test_sizes_without_augmentation():
    s = split(1600)
    assert s.num_classes == 1600 and len(s.holdout_classes) == 23
    assert s.train_classes.dtype == np.int64 and s.holdout_classes.dtype == np.int64
    # the full pool and the holdout partition all 1623 characters
    both = np.concatenate([s.train_classes, s.holdout_classes])
    assert sorted(both.tolist()) == list(range(N_CHARACTERS))
    with pytest.raises(ValueError):
        split(1601)


def test_sizes_with_augmentation():
    s = split(12800, augment=True)
    assert s.num_classes == 12800 and len(s.holdout_classes) == 23 * 8 == 184
    both = np.concatenate([s.train_classes, s.holdout_classes])
    assert sorted(both.tolist()) == list(range(N_CHARACTERS * N_VARIANTS))
    with pytest.raises(ValueError):
        split(12801, augment=True)


@pytest.mark.parametrize("augment, sizes", [(False, [4, 5, 64, 100, 1000, 1599, 1600]),
                                            (True, [4, 7, 64, 100, 800, 1601, 12800])])
def test_holdout_identical_and_training_nested(augment, sizes):
    splits = [split(n, augment) for n in sizes]
    full = splits[-1]
    for s in splits:
        np.testing.assert_array_equal(s.holdout_classes, full.holdout_classes)
        np.testing.assert_array_equal(s.train_classes, full.train_classes[: s.num_classes])  # prefix
        assert len(set(s.train_classes.tolist())) == s.num_classes  # no repeats
        assert not set(s.train_classes.tolist()) & set(s.holdout_classes.tolist())


def test_holdout_never_shares_a_character_with_training():
    for n in (100, 1601, 12800):  # 100 and 1601 cut a character's 8 variants in the middle
        s = split(n, augment=True)
        train_chars = set((s.train_classes // 8).tolist())
        hold_chars = set((s.holdout_classes // 8).tolist())
        assert not train_chars & hold_chars
        assert len(hold_chars) == 23


def test_augmentation_groups_variants_consecutively():
    s = split(12800, augment=True)
    for classes in (s.train_classes, s.holdout_classes):
        groups = classes.reshape(-1, 8)
        chars = groups[:, 0] // 8
        np.testing.assert_array_equal(groups, chars[:, None] * 8 + np.arange(8))  # 8c .. 8c+7, in order
    # the same characters are held out, and trained in the same order, with or without augmentation
    plain = split(1600)
    np.testing.assert_array_equal(s.holdout_classes.reshape(-1, 8)[:, 0] // 8, plain.holdout_classes)
    np.testing.assert_array_equal(s.train_classes.reshape(-1, 8)[:, 0] // 8, plain.train_classes)
    np.testing.assert_array_equal(expand(np.array([0, 5]), True), [0, 1, 2, 3, 4, 5, 6, 7, 40, 41, 42, 43, 44, 45, 46, 47])
    np.testing.assert_array_equal(expand(np.array([0, 5]), False), [0, 5])


def test_holdout_is_the_last_characters_of_the_fixed_permutation():
    order = character_order(N_CHARACTERS, SEED)
    assert sorted(order.tolist()) == list(range(N_CHARACTERS))
    s = split(1600)
    np.testing.assert_array_equal(s.holdout_classes, order[-23:])
    np.testing.assert_array_equal(s.train_classes, order[:-23])
    assert not np.array_equal(order, np.arange(N_CHARACTERS))  # actually permuted


def test_fixed_split_seed():
    a, b = split(1600), split(1600)
    np.testing.assert_array_equal(a.train_classes, b.train_classes)
    np.testing.assert_array_equal(a.holdout_classes, b.holdout_classes)
    c = split(1600, split_seed=SEED + 1)
    assert set(c.holdout_classes.tolist()) != set(a.holdout_classes.tolist())
    assert not np.array_equal(c.train_classes, a.train_classes)


def test_n_holdout_changes_holdout_size():
    for n_holdout in (1, 10, 100):
        s = split(100, n_holdout=n_holdout)
        assert len(s.holdout_classes) == n_holdout
        s = split(100, augment=True, n_holdout=n_holdout)
        assert len(s.holdout_classes) == 8 * n_holdout


def test_split_for_uses_the_config():
    cfg = build_config("tiny", {"data.num_classes": 100, "data.augment": True, "data.split_seed": 7,
                                "data.n_holdout": 30})
    s = split_for(cfg, N_CHARACTERS)
    ref = make_split(N_CHARACTERS, 30, 100, True, 7)
    np.testing.assert_array_equal(s.train_classes, ref.train_classes)
    np.testing.assert_array_equal(s.holdout_classes, ref.holdout_classes)
    assert s.augment is True and s.num_classes == 100
