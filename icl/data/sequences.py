"""Few-shot sequences as index tensors: which class, which label, which exemplar, per item.

A sequence is 9 items, 8 context (image, label) pairs then the query, query last. Every
sampler here is vectorised over the batch (no Python loop per sequence), runs on whatever
device its inputs live on, and reads its randomness from :class:`~icl.data.rng.Draws`: the
counter-based words of :func:`~icl.data.rng.random_words`, a pure function of (seed, step,
row), so a training batch is a pure function of (config, seed, step), the same on every
device, and the batches of many seeds are made by one call (a pack of models).

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

import torch
from einops import rearrange
from torch import Tensor

from icl.config import CONTEXT_LEN, N_DRAWERS, SEQ_LEN
from icl.data.rng import Categorical, Draws


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
    """``p(k) ~ (k+1)^-exponent`` over the training list (exponent 0 = uniform), float64."""
    ranks = torch.arange(1, n + 1, dtype=torch.float64, device=device)
    w = ranks.pow(-exponent)
    return w / w.sum()


@cache
def _slots(values: tuple[int, ...], device: torch.device) -> Tensor:
    """A small constant index tensor, made once per device (a fresh ``torch.tensor`` on a GPU
    would be a host-to-device copy, a synchronisation, in every step)."""
    return torch.tensor(values, device=device)


def assign_exemplars(classes: Tensor, draws: Draws) -> Tensor:
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
    words = rearrange(draws.take(length * N_DRAWERS), "n (item drawer) -> n item drawer", drawer=N_DRAWERS)
    perms = words.argsort(dim=-1, stable=True)  # one permutation of the drawers per first item
    rows = torch.arange(n, device=classes.device)[:, None]
    return perms[rows, first, rank]


def sample_training(draws: Draws, train_classes: Tensor, dist: Categorical, p_bursty: float) -> Sequences:
    """One training sequence per row of ``draws`` (bursty with probability ``p_bursty``),
    classes from ``dist`` over the training list, fixed labels."""
    n = draws.words.shape[0]
    device = train_classes.device
    bursty = draws.coin(1, p_bursty)
    # Bursty rows: 4 distinct classes (2 burst, 2 distractors); context slots 0,0,0,1,1,1,2,3
    # shuffled; the query is one of the two burst classes.
    four = dist.sample_distinct(draws.bits62(4))
    slots = _slots((0, 0, 0, 1, 1, 1, 2, 3), device).expand(n, CONTEXT_LEN).gather(1, draws.permutations(CONTEXT_LEN))
    query_slot = draws.take(1) >> 31  # 0 or 1
    burst_idx = four.gather(1, torch.cat([slots, query_slot], dim=1))
    # Non-bursty rows: 9 independent draws.
    iid_idx = dist.sample(draws.bits62(SEQ_LEN))
    idx = torch.where(bursty, burst_idx, iid_idx)  # positions in the training list
    classes = train_classes[idx]
    return Sequences(classes, idx, assign_exemplars(classes, draws))


def sample_icl(draws: Draws, pool: Tensor, shots: int = 4) -> Sequences:
    """2-way ``shots``-shot sequences over ``pool``, one per row of ``draws``: two distinct
    classes, no distractors, labels 0/1 assigned at random per sequence, query from one of
    the two classes."""
    assert 2 * shots == CONTEXT_LEN
    n = draws.words.shape[0]
    device = pool.device
    two = Categorical.uniform(pool.shape[0], device).sample_distinct(draws.bits62(2))
    slots = _slots((0,) * shots + (1,) * shots, device).expand(n, CONTEXT_LEN).gather(1, draws.permutations(CONTEXT_LEN))
    slots = torch.cat([slots, draws.take(1) >> 31], dim=1)  # query slot last
    classes = pool[two.gather(1, slots)]
    flip = draws.take(1) >> 31  # label of slot 0 is `flip`, of slot 1 `1 - flip`
    labels = slots ^ flip
    return Sequences(classes, labels, assign_exemplars(classes, draws))


def sample_iwl(draws: Draws, train_classes: Tensor, dist: Categorical) -> Sequences:
    """No-support sequences, one per row of ``draws``: the query's class (from the training
    distribution) never appears in the context; fixed labels, so only in-weights knowledge
    answers them."""
    query = dist.sample(draws.bits62(1))  # [n, 1]
    context = dist.sample_excluding(draws.bits62(CONTEXT_LEN), query[:, 0])
    idx = torch.cat([context, query], dim=1)
    classes = train_classes[idx]
    return Sequences(classes, idx, assign_exemplars(classes, draws))


def sample_flip_icl(draws: Draws, train_classes: Tensor, shots: int = 4) -> Sequences:
    """icl-dynamics' ``flip_icl``: two distinct training classes (uniform) x ``shots`` exemplars,
    shuffled, the query a fresh exemplar of the first class; each class's items carry the
    *other* class's trained label. The target is the label the context gives the query's class
    (the second class's trained label); a model answering from its weights gives the query's
    own trained label instead (:meth:`icl.data.StudyData.trained_labels`). As
    ``samplers.fewshot_fliplabels`` on ``get_constant_burst_seq_idxs(burstiness=4,
    distractor=True)`` (``coopetition_paper_sweep.py``, ctx8 evaluators)."""
    assert 2 * shots == CONTEXT_LEN
    n = draws.words.shape[0]
    device = train_classes.device
    two = Categorical.uniform(train_classes.shape[0], device).sample_distinct(draws.bits62(2))  # trained labels
    order = draws.permutations(CONTEXT_LEN)
    slots = _slots((0,) * shots + (1,) * shots, device).expand(n, CONTEXT_LEN).gather(1, order)
    slots = torch.cat([slots, torch.zeros_like(slots[:, :1])], dim=1)  # the query is of class 0
    classes = train_classes[two.gather(1, slots)]
    labels = two.gather(1, 1 - slots)  # swapped within the sequence
    return Sequences(classes, labels, assign_exemplars(classes, draws))


def sample_ciwl(draws: Draws, train_classes: Tensor, dist: Categorical) -> Sequences:
    """Context-constrained IWL (icl-dynamics' ``iwl_copy_avail``): the query's class (from the
    training distribution) is absent from the context, whose 8 classes are distinct (when
    there are at least 9 training classes; else drawn with repeats, still never the query's);
    labels are the trained ones, except that one random context item carries the query's
    trained label. Only the weights say which in-context label is the query's. As
    ``get_constant_burst_seq_idxs(burstiness=0, no_support=True, unique_rest=True)`` with
    ``make_data_sampler(assign_query_label_random=True)`` (``samplers.py``)."""
    if train_classes.shape[0] > CONTEXT_LEN:
        idx = dist.sample_distinct(draws.bits62(SEQ_LEN))  # query first, then 8 distinct others
        query, context = idx[:, :1], idx[:, 1:]
    else:
        query = dist.sample(draws.bits62(1))
        context = dist.sample_excluding(draws.bits62(CONTEXT_LEN), query[:, 0])
    idx = torch.cat([context, query], dim=1)
    classes = train_classes[idx]
    labels = idx.scatter(1, draws.take(1) % CONTEXT_LEN, query)  # 2^32 is a multiple of 8: uniform
    return Sequences(classes, labels, assign_exemplars(classes, draws))
