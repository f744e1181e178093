"""The class split of STUDY.md: fixed holdout characters, nested training class lists.

Characters are permuted once with ``split_seed``; the last ``n_holdout`` are holdout, the
rest, in permuted order, are the training pool. With augmentation a character ``c``
becomes the 8 consecutive classes ``8c .. 8c+7`` (rotation 0/90/180/270 x h-flip), and a
character's variants always travel together. Training classes are the first
``num_classes`` of the pool, so a smaller class set is a prefix of a larger one and the
holdout set never depends on ``num_classes``. A class's label is its index in the list.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from icl.config import N_VARIANTS, Config


@dataclass(frozen=True)
class Split:
    train_classes: np.ndarray  # int64 [num_classes], global class ids; label = position
    holdout_classes: np.ndarray  # int64 [n_holdout (x8)], global class ids
    augment: bool

    @property
    def num_classes(self) -> int:
        return len(self.train_classes)


def character_order(n_chars: int, split_seed: int) -> np.ndarray:
    """The fixed permutation of character ids that every split cuts from."""
    return np.random.default_rng(split_seed).permutation(n_chars)


def expand(chars: np.ndarray, augment: bool) -> np.ndarray:
    """Character ids -> class ids (each character's 8 variants consecutive when augmenting)."""
    chars = np.asarray(chars, dtype=np.int64)
    if not augment:
        return chars
    return (chars[:, None] * N_VARIANTS + np.arange(N_VARIANTS)).reshape(-1)


def make_split(
    n_chars: int, n_holdout: int, num_classes: int, augment: bool, split_seed: int
) -> Split:
    order = character_order(n_chars, split_seed)
    pool = expand(order[:-n_holdout], augment)
    if num_classes > len(pool):
        raise ValueError(f"num_classes {num_classes} > {len(pool)} available")
    return Split(pool[:num_classes].copy(), expand(order[-n_holdout:], augment), augment)


def split_for(cfg: Config, n_chars: int) -> Split:
    d = cfg.data
    return make_split(n_chars, d.n_holdout, d.num_classes, d.augment, d.split_seed)
