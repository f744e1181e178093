"""Counter-based random words and the exact integer draws built on them.

Statistical checks use fixed keys and 5-sigma binomial bounds, as in test_data_sequences.py.
"""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

from icl.config import MAX_ROWS
from icl.data.rng import MASK32, MAX_COUNTER_ROWS, QUANTUM_BITS, WORDS, Categorical, Draws, hash32, random_words


def within(count: int | float, n: int, p: float, sigmas: float = 5.0) -> bool:
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p)) + 1e-9


def lowbias32(x: int) -> int:
    """The published hash, written with plain unsigned 32-bit arithmetic."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & MASK32
    x ^= x >> 15
    x = (x * 0x846CA68B) & MASK32
    return x ^ (x >> 16)


def test_hash_is_lowbias32_on_ints_and_tensors():
    rng = random.Random(0)
    xs = [0, 1, 2, 0x7FFFFFFF, 0x80000000, MASK32] + [rng.getrandbits(32) for _ in range(20000)]
    expected = [lowbias32(x) for x in xs]
    assert [hash32(x) for x in xs] == expected
    assert hash32(torch.tensor(xs)).tolist() == expected  # int64 tensors: no overflow anywhere
    assert len(set(expected)) == len(xs)  # a bijection: no collisions


def test_words_are_32_bit_and_a_pure_function_of_the_key():
    w = random_words(3, 10, "train", 64)
    assert w.shape == (64, WORDS) and w.dtype == torch.int64
    assert 0 <= int(w.min()) and int(w.max()) <= MASK32
    assert torch.equal(w, random_words(3, 10, "train", 64))


def test_every_key_part_changes_the_words():
    keys = [(seed, step, stream) for seed in (0, 1) for step in (0, 1, 1 << 20) for stream in ("train", "icl", "iwl")]
    words = [random_words(*key, 8) for key in keys]
    for (a, wa), (b, wb) in itertools.combinations(zip(keys, words), 2):
        assert (wa == wb).float().mean() < 0.01, f"{a} and {b} share words"


def test_pack_words_equal_each_seeds_own():
    seeds = [5, 0, 2**32 - 1]
    pack = random_words(seeds, 7, "train", 16)
    assert pack.shape == (3, 16, WORDS)
    for k, seed in enumerate(seeds):
        assert torch.equal(pack[k], random_words(seed, 7, "train", 16))
    assert torch.equal(random_words(5, 7, "train", 40)[:16], pack[0])  # rows do not depend on the batch size


def test_bits_are_balanced_and_independent_across_neighbouring_keys():
    a = random_words(0, 0, "train", 512)  # 110,592 words
    n = a.numel()
    for bit in range(32):
        ones = int(((a >> bit) & 1).sum())
        assert within(ones, n, 0.5), f"bit {bit}: {ones}/{n}"
    # neighbouring steps, seeds, rows and columns: each bit agrees half the time
    neighbours = {
        "next step": random_words(0, 1, "train", 512),
        "next seed": random_words(1, 0, "train", 512),
        "next row": torch.roll(a, 1, dims=0),
        "next column": torch.roll(a, 1, dims=1),
    }
    for name, b in neighbours.items():
        same_bits = sum(int((((a ^ b) >> bit) & 1).eq(0).sum()) for bit in range(32))
        assert within(same_bits, 32 * n, 0.5), f"{name}: {same_bits}/{32 * n} bits agree"


def test_keys_out_of_range_are_refused():
    for seed, step in ((-1, 0), (2**32, 0), (0, -1), (0, 2**32)):
        with pytest.raises(ValueError, match="0..2\\^32-1"):
            random_words(seed, step, "train", 4)
    with pytest.raises(ValueError, match="rows"):
        random_words(0, 0, "train", 0)
    assert MAX_ROWS <= MAX_COUNTER_ROWS  # every batch the config allows has distinct counters


# --------------------------------------------------------------------------- draws


def test_draws_hand_out_fresh_columns_and_refuse_to_run_out():
    w = random_words(0, 0, "train", 4)
    d = Draws(w)
    assert torch.equal(d.take(3), w[:, :3]) and torch.equal(d.take(2), w[:, 3:5])
    bits = d.bits62(4)
    assert 0 <= int(bits.min()) and int(bits.max()) < 2**62 and d.used == 13
    with pytest.raises(ValueError, match="random words per row"):
        d.take(WORDS)


@pytest.mark.parametrize("p", [0.0, 0.1, 0.9, 1.0])
def test_coin(p):
    heads = Draws(random_words(1, 0, "train", 4000)).coin(25, p)
    n = heads.numel()
    if p in (0.0, 1.0):
        assert int(heads.sum()) == n * p
    else:
        assert within(int(heads.sum()), n, p)


def test_permutations_are_uniform():
    perms = Draws(random_words(2, 0, "train", 20000)).permutations(8)
    assert torch.equal(perms.sort(1).values, torch.arange(8).expand(20000, 8))
    for pos in range(8):  # every value lands in every position with probability 1/8
        counts = torch.bincount(perms[:, pos], minlength=8)
        assert all(within(int(c), 20000, 1 / 8) for c in counts), f"position {pos}: {counts.tolist()}"


# --------------------------------------------------------------------------- categorical


W = [0.5, 0.3, 0.15, 0.05]


def test_masses_are_the_weights_in_units_of_2_to_the_minus_40():
    c = Categorical.from_weights(torch.tensor(W, dtype=torch.float64))
    assert c.mass.tolist() == [round(w * 2**QUANTUM_BITS) for w in W]
    assert c.total == int(c.mass.sum()) and torch.equal(c.start + c.mass, c.end)
    tiny = Categorical.from_weights(torch.tensor([1.0, 1e-30]))
    assert int(tiny.mass[1]) == 1  # every class keeps a chance
    assert Categorical.uniform(3).mass.tolist() == [1, 1, 1]


def test_sample_follows_the_weights():
    c = Categorical.from_weights(torch.tensor(W, dtype=torch.float64))
    x = c.sample(Draws(random_words(3, 0, "train", 20000)).bits62(10))
    counts = torch.bincount(x.flatten(), minlength=4)
    assert all(within(int(counts[i]), x.numel(), w) for i, w in enumerate(W)), counts.tolist()


def test_sample_distinct_is_successive_sampling():
    """P(i, j, k) = w_i * w_j / (1 - w_i) * w_k / (1 - w_i - w_j), exactly what
    ``torch.multinomial(w, 3, replacement=False)`` draws."""
    n = 40000
    c = Categorical.from_weights(torch.tensor(W, dtype=torch.float64))
    x = c.sample_distinct(Draws(random_words(4, 0, "train", n)).bits62(4))
    assert (x.sort(1).values == torch.arange(4)).all()  # 4 of 4 classes: always all of them
    counts = {t: 0 for t in itertools.permutations(range(4), 3)}
    for row in x[:, :3].tolist():
        counts[tuple(row)] += 1
    for (i, j, k), got in counts.items():
        p = W[i] * W[j] / (1 - W[i]) * W[k] / (1 - W[i] - W[j])
        assert within(got, n, p), f"{(i, j, k)}: {got}/{n}, expected {p:.4f}"


def test_sample_excluding_renormalises_the_rest():
    n = 20000
    c = Categorical.from_weights(torch.tensor(W, dtype=torch.float64))
    excluded = torch.arange(n) % 4
    x = c.sample_excluding(Draws(random_words(5, 0, "train", n)).bits62(6), excluded)
    assert not (x == excluded[:, None]).any()
    for e in range(4):
        rows = x[excluded == e].flatten()
        for i in set(range(4)) - {e}:
            assert within(int((rows == i).sum()), rows.numel(), W[i] / (1 - W[e])), (e, i)
