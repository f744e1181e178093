"""Counter-based random numbers: every random word is a pure function of (key, position).

Why not ``torch.Generator``: a generator is one stream drawn by one kernel, so the K models
of a pack (each with its own seed) would need K sets of sampling kernels per step, and on a
GPU the host time spent launching them caps the whole pack (``benchmarks/dispatch_count.py``).
Here a key is a tensor, so one set of kernels makes the batches of every model at once.
Being integer arithmetic only, the words are also the same on every device (a batch does
not depend on whether it was made on a CPU or a GPU) and there is no generator state to
save or restore.

A word is a 32-bit value held in an ``int64`` tensor (torch has no complete unsigned 32-bit
arithmetic). Position ``(row, column)`` of stream ``stream`` under key ``(step, seed)``::

    word = H(H(seed) ^ H(step ^ H(counter))),  counter = (row * WORDS + column) * N_STREAMS + stream

with ``H`` = ``lowbias32`` (Chris Wellons' integer hash, a bijection of 32-bit values with
strong avalanche), evaluated so that no intermediate leaves the ``int64`` range. Distinct
(seed, step, stream, row, column) give distinct inputs, so no two batches, models or
evaluation sets share a stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Sequence, TypeVar

import torch
from torch import Tensor

MASK32 = 0xFFFFFFFF
WORDS = 216  # random words per sequence: enough for the most demanding sampler (training)
N_STREAMS = 4
STREAMS = {"train": 0, "icl": 1, "iwl": 2, "icl_train": 3}
MAX_COUNTER_ROWS = (1 << 32) // (WORDS * N_STREAMS)  # rows per batch with distinct counters
QUANTUM_BITS = 40  # categorical weights are integers summing to about 2^40

IntLike = TypeVar("IntLike", int, Tensor)


def _mul32(x: IntLike, c: int) -> IntLike:
    """``x * c mod 2^32`` for ``x < 2^32``: a constant of 2^31 or more is used as ``c - 2^32``
    (the same modulo 2^32), so the product stays within int64 and its low 32 bits are exact."""
    return (x * (c if c < 1 << 31 else c - (1 << 32))) & MASK32


def hash32(x: IntLike) -> IntLike:
    """``lowbias32`` on 32-bit values (Python ints or int64 tensors, elementwise)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _counters(rows: int, stream: int, device: torch.device) -> Tensor:
    """``H(counter)`` for a batch of ``rows`` sequences, ``[rows, WORDS]``."""
    pos = torch.arange(rows * WORDS, dtype=torch.int64, device=device).view(rows, WORDS)
    return hash32(pos * N_STREAMS + stream)


# Training asks for the same shape every step: keep its counters (not the evaluation sets'
# ones, made once and possibly large).
_train_counters = cache(_counters)


@cache
def _seed_keys(seeds: tuple[int, ...], device: torch.device) -> Tensor:
    """``H(seed)`` per seed, ``[K, 1, 1]``: made on the host once per pack, copied once."""
    return torch.tensor([hash32(s) for s in seeds], dtype=torch.int64, device=device).view(-1, 1, 1)


def check_key(seed: int, step: int | Tensor) -> None:
    """Seeds and steps must be 32-bit words. A step held in a device tensor (a captured CUDA
    graph's counter) is not read back to be checked: that would synchronise."""
    if not (0 <= seed <= MASK32 and (isinstance(step, Tensor) or 0 <= step <= MASK32)):
        raise ValueError(f"seeds and steps must lie in 0..2^32-1, got seed {seed}, step {step}")


def random_words(seeds: int | Sequence[int], step: int | Tensor, stream: str, rows: int,
                 device: torch.device | str = "cpu") -> Tensor:
    """The random words of ``rows`` sequences for each seed: ``[K, rows, WORDS]`` int64 in
    ``[0, 2^32)`` (``[rows, WORDS]`` for a single int seed). Model ``k``'s words equal
    ``random_words(seeds[k], ...)``; ``rows`` only sets how many rows, so a larger batch
    starts with the rows of a smaller one."""
    one = isinstance(seeds, int)
    seeds = (seeds,) if one else tuple(seeds)
    for s in seeds:
        check_key(s, step)
    if not 0 < rows <= MAX_COUNTER_ROWS:
        raise ValueError(f"rows must lie in 1..{MAX_COUNTER_ROWS}, got {rows}")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    counters = (_train_counters if stream == "train" else _counters)(rows, STREAMS[stream], device)
    per_step = hash32(counters ^ step)  # shared by the pack
    words = hash32(_seed_keys(seeds, device) ^ per_step)
    return words[0] if one else words


# --------------------------------------------------------------------------- using words


class Draws:
    """The words of a batch of rows (``[N, WORDS]``), handed out column by column, so every
    draw of a sampler reads its own fresh columns."""

    def __init__(self, words: Tensor):
        self.words = words
        self.used = 0

    def take(self, n: int) -> Tensor:
        """``[N, n]`` fresh 32-bit words."""
        if self.used + n > self.words.shape[-1]:
            raise ValueError(f"a sampler needs more than the {self.words.shape[-1]} random words per row")
        out = self.words[:, self.used : self.used + n]
        self.used += n
        return out

    def bits62(self, n: int) -> Tensor:
        """``[N, n]`` uniform integers in ``[0, 2^62)`` (two words each)."""
        w = self.take(2 * n)
        return ((w[:, :n] >> 2) << 32) | w[:, n:]

    def coin(self, n: int, p: float) -> Tensor:
        """``[N, n]`` booleans, true with probability ``p`` (exactly, up to 2^-32)."""
        return self.take(n) < round(p * (1 << 32))

    def permutations(self, n: int) -> Tensor:
        """``[N, n]`` random permutations of ``range(n)`` (stable sort of fresh words, so
        the rare equal words still give the same order on every device)."""
        return self.take(n).argsort(dim=-1, stable=True)


@dataclass(frozen=True)
class Categorical:
    """A distribution over ``range(n)`` as integer masses (``mass[i] >= 1``, summing to about
    2^40): index ``i`` owns the interval ``[start[i], start[i] + mass[i])``, so drawing, also
    without replacement, is exact integer arithmetic, the same on every device."""

    mass: Tensor  # [n] int64
    start: Tensor  # [n] int64: mass[0] + ... + mass[i-1]
    end: Tensor  # [n] int64: start + mass
    total: int

    @classmethod
    def from_masses(cls, mass: Tensor) -> "Categorical":
        end = mass.cumsum(0)
        return cls(mass, end - mass, end, int(end[-1]))

    @classmethod
    def from_weights(cls, weights: Tensor) -> "Categorical":
        w = weights.detach().to("cpu", torch.float64)
        mass = (w / w.sum() * (1 << QUANTUM_BITS)).round().clamp_min(1).to(torch.int64)
        return cls.from_masses(mass.to(weights.device))

    @classmethod
    def uniform(cls, n: int, device: torch.device | str = "cpu") -> "Categorical":
        return cls.from_masses(torch.ones(n, dtype=torch.int64, device=device))

    def locate(self, x: Tensor) -> Tensor:
        """The index whose interval holds ``x``."""
        return torch.searchsorted(self.end, x, right=True)

    def sample(self, bits: Tensor) -> Tensor:
        """Independent draws, one per 62-bit integer in ``bits`` (any shape)."""
        return self.locate(bits % self.total)

    def sample_excluding(self, bits: Tensor, excluded: Tensor) -> Tensor:
        """Independent draws ``[N, m]``, row ``n`` from the distribution without index
        ``excluded[n]`` (renormalised)."""
        mass, start = self.mass[excluded, None], self.start[excluded, None]
        x = bits % (self.total - mass)
        return self.locate(x + (x >= start) * mass)  # step over the excluded interval

    def sample_distinct(self, bits: Tensor) -> Tensor:
        """Draws without replacement ``[N, m]``, column ``i`` from the masses left after
        columns ``0..i-1`` are taken away (successive sampling, as
        ``torch.multinomial(..., replacement=False)`` draws)."""
        picks = self.sample(bits[:, :1])  # [N, 1]
        for i in range(1, bits.shape[1]):
            mass, start = self.mass[picks], self.start[picks]  # [N, i]: the intervals taken
            x = bits[:, i : i + 1] % (self.total - mass.sum(1, keepdim=True))
            y = x
            for _ in range(i):  # step over every taken interval at or below y (a fixpoint in <= i rounds)
                y = x + ((y >= start) * mass).sum(1, keepdim=True)
            picks = torch.cat([picks, self.locate(y)], dim=1)
        return picks
