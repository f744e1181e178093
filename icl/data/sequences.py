"""Few-shot sequences as index tensors: which class, which label, which exemplar, per item.

A sequence is 9 items, 8 context (image, label) pairs then the query, query last. Every
sampler here is vectorised over the batch (no Python loop per sequence), runs on whatever
device its generator lives on, and draws from the ``torch.Generator`` it is given, so a
training batch is a pure function of (config, seed, step) — see :func:`step_generator`.

Training sequences (STUDY.md): with probability ``p_bursty`` a sequence is *bursty*: two
burst classes x 3 exemplars plus 2 distractor items, context order shuffled, the query a
fresh exemplar of one of the burst classes. The 4 classes of a bursty sequence (2 burst, 2
distractors) are distinct, so the burst structure is exact. Otherwise the 9 items are
independent draws. Classes are drawn from Zipf weights over the training list; labels are
fixed (label = index in the training list). Within a sequence, the exemplars of one class
are always distinct (drawn without replacement, query included), bursty or not.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np
import torch
from torch import Tensor

from icl.config import CONTEXT_LEN, N_DRAWERS, SEQ_LEN


@dataclass
class Sequences:
    """Index tensors, each ``[N, 9]``, query last."""

    classes: Tensor  # global class ids
    labels: Tensor  # label ids the model sees; the last is the target
    exemplars: Tensor  # drawer index 0..19 of each image

    def __len__(self) -> int:
        return self.classes.shape[0]

    def to(self, device: torch.device | str) -> "Sequences":
        return Sequences(self.classes.to(device), self.labels.to(device), self.exemplars.to(device))

    def __getitem__(self, idx: slice | Tensor) -> "Sequences":
        return Sequences(self.classes[idx], self.labels[idx], self.exemplars[idx])

    @property
    def targets(self) -> Tensor:
        return self.labels[:, -1]


def zipf_weights(n: int, exponent: float, device: torch.device | str = "cpu") -> Tensor:
    """``p(k) ~ (k+1)^-exponent`` over the training list (exponent 0 = uniform)."""
    ranks = torch.arange(1, n + 1, dtype=torch.float64, device=device)
    w = ranks.pow(-exponent)
    return (w / w.sum()).float()


def step_generator(seed: int, step: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator for one training step: seeded from (seed, step) alone, so a batch never
    depends on what came before it and a resumed run draws exactly the same data."""
    mixed = np.random.SeedSequence([seed, step]).generate_state(2, dtype=np.uint32)
    g = torch.Generator(device=device)
    g.manual_seed(int(mixed[0]) << 32 | int(mixed[1]))
    return g


def seeded_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


@cache
def _slots(values: tuple[int, ...], device: torch.device) -> Tensor:
    """A small constant index tensor, made once per device (a fresh ``torch.tensor`` on a GPU
    would be a host-to-device copy, a synchronisation, in every step)."""
    return torch.tensor(values, device=device)


def _rand(shape: tuple[int, ...], g: torch.Generator) -> Tensor:
    return torch.rand(shape, generator=g, device=g.device)


def _permutations(n: int, size: int, g: torch.Generator) -> Tensor:
    """``[n, size]`` independent random permutations of ``range(size)``."""
    return _rand((n, size), g).argsort(dim=-1)


def assign_exemplars(classes: Tensor, g: torch.Generator) -> Tensor:
    """Exemplar ids ``[N, 9]`` such that repeats of a class within a row are all distinct.

    Each item takes the ``r``-th entry of a random permutation of the 20 drawers that
    belongs to the first item of its class in the row, ``r`` counting earlier items of the
    same class: distinct by construction, one gather for the whole batch.
    """
    n, length = classes.shape
    same = classes[:, :, None] == classes[:, None, :]  # [N, 9, 9]
    earlier = torch.ones(length, length, dtype=torch.bool, device=classes.device).tril(-1)
    rank = (same & earlier).sum(-1)  # how many earlier items share my class
    first = same.to(torch.uint8).argmax(-1)  # index of my class's first item
    perms = _rand((n, length, N_DRAWERS), g).argsort(dim=-1)  # one permutation per first item
    rows = torch.arange(n, device=classes.device)[:, None]
    return perms[rows, first, rank]


def sample_training(
    n: int, train_classes: Tensor, weights: Tensor, p_bursty: float, g: torch.Generator
) -> Sequences:
    """``n`` training sequences (bursty with probability ``p_bursty``), fixed labels."""
    k = train_classes.shape[0]
    device = train_classes.device
    bursty = _rand((n,), g) < p_bursty
    # Bursty rows: 4 distinct classes (2 burst, 2 distractors); context slots 0,0,0,1,1,1,2,3
    # shuffled; the query is one of the two burst classes.
    four = torch.multinomial(weights.expand(n, k), 4, replacement=False, generator=g)
    slots = _slots((0, 0, 0, 1, 1, 1, 2, 3), device).expand(n, CONTEXT_LEN)
    slots = slots.gather(1, _permutations(n, CONTEXT_LEN, g))
    query_slot = (_rand((n, 1), g) < 0.5).long()
    burst_idx = four.gather(1, torch.cat([slots, query_slot], dim=1))
    # Non-bursty rows: 9 independent draws.
    iid_idx = torch.multinomial(weights, n * SEQ_LEN, replacement=True, generator=g).view(n, SEQ_LEN)
    idx = torch.where(bursty[:, None], burst_idx, iid_idx)  # positions in the training list
    classes = train_classes[idx]
    return Sequences(classes, idx, assign_exemplars(classes, g))


def sample_icl(n: int, pool: Tensor, g: torch.Generator, shots: int = 4) -> Sequences:
    """2-way ``shots``-shot sequences over ``pool``: two distinct classes, no distractors,
    labels 0/1 assigned at random per sequence, query from one of the two classes."""
    assert 2 * shots == CONTEXT_LEN
    m = pool.shape[0]
    device = pool.device
    two = torch.multinomial(torch.ones(n, m, device=device), 2, replacement=False, generator=g)
    slots = _slots((0,) * shots + (1,) * shots, device).expand(n, CONTEXT_LEN)
    slots = slots.gather(1, _permutations(n, CONTEXT_LEN, g))
    slots = torch.cat([slots, (_rand((n, 1), g) < 0.5).long()], dim=1)  # query slot last
    classes = pool[two.gather(1, slots)]
    flip = (_rand((n, 1), g) < 0.5).long()  # label of slot 0 is `flip`, of slot 1 `1 - flip`
    labels = slots ^ flip
    return Sequences(classes, labels, assign_exemplars(classes, g))


def sample_iwl(n: int, train_classes: Tensor, weights: Tensor, g: torch.Generator) -> Sequences:
    """No-support sequences: the query's class (from the training distribution) never
    appears in the context; fixed labels, so only in-weights knowledge answers them."""
    k = train_classes.shape[0]
    query = torch.multinomial(weights, n, replacement=True, generator=g)  # [n]
    w = weights.expand(n, k).clone()
    w[torch.arange(n, device=w.device), query] = 0.0
    context = torch.multinomial(w, CONTEXT_LEN, replacement=True, generator=g)
    idx = torch.cat([context, query[:, None]], dim=1)
    classes = train_classes[idx]
    return Sequences(classes, idx, assign_exemplars(classes, g))
