"""The sequence generator and the fixed evaluation sets against STUDY.md.

Statistical checks use fixed seeds and binomial 5-sigma bounds (a false alarm has
probability < 1e-6 per check even if the seed were changed), so they are never flaky.
"""

from __future__ import annotations

import math

import pytest
import torch

from icl.config import N_CHARACTERS, build_config
from icl.data import load_data
from icl.data.evalsets import build_eval_sets
from icl.data.rng import Categorical, Draws, random_words
from icl.data.sequences import (
    Sequences,
    assign_exemplars,
    sample_ciwl,
    sample_icl,
    sample_iwl,
    sample_training,
    zipf_weights,
)
from icl.data.split import make_split

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.cuda),
]


def train_list(k: int, augment: bool = False) -> torch.Tensor:
    return torch.as_tensor(make_split(N_CHARACTERS, 23, k, augment, 1337).train_classes)


def holdout_list(augment: bool = False) -> torch.Tensor:
    return torch.as_tensor(make_split(N_CHARACTERS, 23, 4, augment, 1337).holdout_classes)


def draws(n: int, seed: int = 0, step: int = 0, device: str = "cpu") -> Draws:
    return Draws(random_words(seed, step, "train", n, device))


def zipf(k: int, a: float, device: str = "cpu") -> Categorical:
    return Categorical.from_weights(zipf_weights(k, a, device))


def train(n: int, k: int, p: float, a: float = 0.0, seed: int = 0, augment: bool = False) -> tuple[Sequences, torch.Tensor]:
    classes = train_list(k, augment)
    return sample_training(draws(n, seed), classes, zipf(k, a), p), classes


def within(count: int | float, n: int, p: float, sigmas: float = 5.0) -> bool:
    """``count`` successes out of ``n`` is within ``sigmas`` binomial standard deviations of ``n p``."""
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p)) + 1e-9


def context_counts(s: Sequences) -> torch.Tensor:
    """``[N, 8]``: how often each context item's class occurs in the context."""
    ctx = s.classes[:, :8]
    return (ctx[:, :, None] == ctx[:, None, :]).sum(-1)


def bursty_rows(s: Sequences) -> torch.Tensor:
    """Rows with the exact bursty structure: 2 classes x 3 + 2 singletons in context, query
    class one of the two 3-fold classes. Independent draws from >= 400 classes produce it
    with probability < 1e-9 per row."""
    cnt = context_counts(s)
    ctx, q = s.classes[:, :8], s.classes[:, 8:]
    pattern = ((cnt == 3).sum(1) == 6) & ((cnt == 1).sum(1) == 2)
    return pattern & ((ctx == q) & (cnt == 3)).any(1)


def assert_exemplars_distinct_per_class(s: Sequences) -> None:
    c, e = s.classes, s.exemplars
    assert ((e >= 0) & (e < 20)).all()
    same = c[:, :, None] == c[:, None, :]
    clash = same & (e[:, :, None] == e[:, None, :]) & ~torch.eye(9, dtype=torch.bool)
    assert not clash.any(), f"{int(clash.any(-1).any(-1).sum())} rows repeat an exemplar of a class"


def assert_fixed_labels(s: Sequences, classes: torch.Tensor) -> None:
    """label == index of the class in the training list, everywhere (query included)."""
    assert torch.equal(classes[s.labels], s.classes)


def query_in_context(s: Sequences) -> torch.Tensor:
    return (s.classes[:, :8] == s.classes[:, 8:]).any(1)


# --------------------------------------------------------------------------- training sequences


def test_shapes_and_dtypes():
    s, _ = train(32, 64, 0.9)
    assert len(s) == 32 and s.targets.shape == (32,)
    for t in (s.classes, s.labels, s.exemplars):
        assert t.shape == (32, 9) and t.dtype == torch.int64
    assert torch.equal(s.targets, s.labels[:, -1])
    assert torch.equal(s[:5].classes, s.classes[:5]) and len(s[torch.tensor([0, 2])]) == 2


@pytest.mark.parametrize("p", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_bursty_fraction(p):
    n = 4000
    s, _ = train(n, 400, p, seed=1)
    got = int(bursty_rows(s).sum())
    if p in (0.0, 1.0):
        assert got == n * p
    else:
        assert within(got, n, p), f"{got}/{n} bursty, expected {p}"


@pytest.mark.parametrize("k, a", [(4, 0.0), (5, 1.0), (64, 0.0), (1600, 1.0)])
def test_burst_structure(k, a):
    s, classes = train(2000, k, 1.0, a, seed=2)
    cnt = context_counts(s)
    ctx, q = s.classes[:, :8], s.classes[:, 8]
    # exactly 2 classes x 3 and 2 distractors of 2 other distinct classes: 4 distinct classes
    assert ((cnt == 3).sum(1) == 6).all() and ((cnt == 1).sum(1) == 2).all()
    assert all(len(set(row)) == 4 for row in ctx.tolist())
    # the query is one of the 2 burst classes, with an exemplar not shown in the context
    assert bursty_rows(s).all()
    assert ((ctx == q[:, None]).sum(1) == 3).all()
    assert not ((ctx == q[:, None]) & (s.exemplars[:, :8] == s.exemplars[:, 8:])).any()
    assert_exemplars_distinct_per_class(s)
    assert_fixed_labels(s, classes)


def test_burst_order_is_shuffled_and_query_class_balanced():
    n = 4000
    s, _ = train(n, 400, 1.0, seed=3)
    distractor = context_counts(s) == 1
    for pos in range(8):  # each context slot holds a distractor with probability 2/8
        assert within(int(distractor[:, pos].sum()), n, 2 / 8), f"slot {pos}"
    # which of the two burst classes is queried: the one with the smaller id half the time
    ctx, q = s.classes[:, :8], s.classes[:, 8]
    burst_min = torch.where(context_counts(s) == 3, ctx, torch.full_like(ctx, 10**9)).min(1).values
    assert within(int((q == burst_min).sum()), n, 0.5)


@pytest.mark.parametrize("k, a", [(64, 0.0), (64, 1.0), (1600, 0.0)])
def test_non_bursty_rows_are_independent_draws(k, a):
    n = 8000 if k < 1000 else 3000
    s, classes = train(n, k, 0.0, a, seed=4)
    w = zipf_weights(k, a).double()
    # P(query class among 8 independent context draws) = sum_k w_k (1 - (1 - w_k)^8)
    expected = float((w * (1 - (1 - w) ** 8)).sum())
    got = int(query_in_context(s).sum())
    assert within(got, n, expected), f"query in context {got}/{n}, expected {expected:.4f}"
    if k == 1600:
        assert got / n < 0.01  # "almost never"
    assert_exemplars_distinct_per_class(s)
    assert_fixed_labels(s, classes)


def test_holdout_never_in_training_sequences():
    for augment, k, n in ((False, 1600, 2000), (True, 12800, 200)):
        s, classes = train(n, k, 0.9, augment=augment, seed=5)
        held = holdout_list(augment)
        assert not torch.isin(s.classes, held).any()
        assert torch.isin(s.classes, classes).all()
        assert_fixed_labels(s, classes)
        assert_exemplars_distinct_per_class(s)


def test_small_class_list_uses_only_its_prefix():
    s, classes = train(2000, 10, 0.9, seed=6)
    assert torch.isin(s.classes, classes).all() and s.labels.max() < 10
    assert set(s.labels.unique().tolist()) == set(range(10))


@pytest.mark.parametrize("a", [0.0, 1.0, 2.0])
def test_zipf_frequencies(a):
    k, n = 100, 8000
    s, _ = train(n, k, 0.0, a, seed=7)  # non-bursty: 9 independent draws per row
    draws = n * 9
    freq = torch.bincount(s.labels.flatten(), minlength=k)
    w = (torch.arange(1, k + 1, dtype=torch.float64) ** -a)
    w /= w.sum()
    for rank in range(10):  # label = rank in the training list
        assert within(int(freq[rank]), draws, float(w[rank])), f"a={a} rank {rank}: {int(freq[rank])}/{draws}"
    if a == 0.0:
        assert all(within(int(f), draws, 1 / k) for f in freq)


def test_zipf_with_bursts_still_ranks_classes():
    s, _ = train(8000, 100, 0.9, 1.0, seed=8)
    freq = torch.bincount(s.labels.flatten(), minlength=100)
    assert (freq[:6].diff() < 0).all()  # top ranks strictly more frequent
    assert freq[0] > 4 * freq[20:].float().mean()


def test_zipf_weights():
    w = zipf_weights(5, 1.0)
    assert w.dtype == torch.float64
    torch.testing.assert_close(w, torch.tensor([60, 30, 20, 15, 12], dtype=torch.float64) / 137.0)
    torch.testing.assert_close(zipf_weights(4, 0.0), torch.full((4,), 0.25, dtype=torch.float64))


def test_exemplars_uniform_over_drawers():
    s, _ = train(4000, 64, 0.9, seed=9)
    freq = torch.bincount(s.exemplars.flatten(), minlength=20)
    assert all(within(int(f), s.exemplars.numel(), 1 / 20) for f in freq)


def test_assign_exemplars_without_replacement_even_for_one_class():
    classes = torch.zeros(1000, 9, dtype=torch.long)  # 9 items of a single class
    e = assign_exemplars(classes, draws(1000))
    assert all(len(set(row)) == 9 for row in e.tolist())


# --------------------------------------------------------------------------- evaluation sets


@pytest.fixture(scope="module")
def eval_sets():
    split = make_split(N_CHARACTERS, 23, 100, False, 1337)
    return split, build_eval_sets(split, 4096, 2024, 0.0)


def check_two_way(s: Sequences, pool: torch.Tensor) -> None:
    """2 distinct classes x 4 shots from ``pool``, labels 0/1 one-to-one with the classes within a
    row, the query one of the two classes and labelled like it is in the context."""
    n = len(s)
    ctx, q = s.classes[:, :8], s.classes[:, 8]
    assert torch.isin(s.classes, pool).all()
    assert all(len(set(row)) == 2 for row in ctx.tolist())
    assert (context_counts(s) == 4).all()
    assert set(s.labels.unique().tolist()) == {0, 1}
    assert ((s.labels[:, :8] == 0).sum(1) == 4).all()
    # class -> label is one consistent mapping in every row (query included)
    same_class = s.classes[:, :, None] == s.classes[:, None, :]
    same_label = s.labels[:, :, None] == s.labels[:, None, :]
    assert torch.equal(same_class, same_label)
    assert (ctx == q[:, None]).any(1).all()
    assert_exemplars_distinct_per_class(s)
    # labels are assigned at random per sequence: the smaller class id gets label 0 half the time
    lo = ctx.min(1).values
    label_of_lo = torch.where(ctx == lo[:, None], s.labels[:, :8], 2).min(1).values
    assert within(int((label_of_lo == 0).sum()), n, 0.5)
    assert within(int((s.targets == 0).sum()), n, 0.5)


def test_icl_holdout_set(eval_sets):
    split, sets = eval_sets
    held = torch.as_tensor(split.holdout_classes)
    check_two_way(sets.icl, held)
    # the two classes are drawn uniformly from the 23 holdout classes
    n = len(sets.icl)
    pairs = torch.stack([sets.icl.classes[:, :8].min(1).values, sets.icl.classes[:, :8].max(1).values], 1)
    for c in held.tolist():
        assert within(int((pairs == c).any(1).sum()), n, 2 / 23), f"holdout class {c}"


def test_icl_train_set(eval_sets):
    split, sets = eval_sets
    check_two_way(sets.icl_train, torch.as_tensor(split.train_classes))


@pytest.mark.parametrize("a", [0.0, 1.0])
def test_iwl_set(a):
    split = make_split(N_CHARACTERS, 23, 64, False, 1337)
    classes = torch.as_tensor(split.train_classes)
    s = build_eval_sets(split, 4096, 2024, a).iwl
    assert not query_in_context(s).any()
    assert_fixed_labels(s, classes)
    assert_exemplars_distinct_per_class(s)
    # the query follows the training distribution (Zipf weights)
    w = zipf_weights(64, a).double()
    assert within(int((s.targets == 0).sum()), len(s), float(w[0]))


def test_iwl_with_the_minimum_of_four_classes():
    classes = train_list(4)
    s = sample_iwl(draws(2000), classes, zipf(4, 0.0))
    assert not query_in_context(s).any()
    assert_fixed_labels(s, classes)


def label_of(classes: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
    """Trained label (index in the training list ``pool``) of each class id."""
    lut = torch.full((int(pool.max()) + 1,), -1)
    lut[pool] = torch.arange(len(pool))
    return lut[classes]


def test_flip_icl_set(eval_sets):
    """Two training classes x 4 shots, query of one of them; every item shows the *other*
    class's trained label, so the target (the context's answer) is the other class's label
    and the query's own trained label (the weights' answer) sits on the other class's items."""
    split, sets = eval_sets
    s, pool = sets.flip_icl, torch.as_tensor(split.train_classes)
    n = len(s)
    ctx, q = s.classes[:, :8], s.classes[:, 8]
    assert torch.isin(s.classes, pool).all()
    assert all(len(set(row)) == 2 for row in ctx.tolist())
    assert (context_counts(s) == 4).all()
    assert ((ctx == q[:, None]).sum(1) == 4).all()  # the query's class is one of the two
    other = torch.where(ctx != q[:, None], ctx, -1).max(1).values  # the other class
    trained = label_of(s.classes, pool)
    shown = torch.where(ctx == q[:, None], label_of(other, pool)[:, None], label_of(q, pool)[:, None])
    assert torch.equal(s.labels[:, :8], shown)  # swapped within the sequence
    assert torch.equal(s.targets, label_of(other, pool))  # following the context
    assert not (s.targets == trained[:, 8]).any()  # ... is never the weights' answer
    assert_exemplars_distinct_per_class(s)
    # classes drawn uniformly from the 100 training classes: each in about 2% of the rows
    for c in pool[:10].tolist():
        assert within(int((ctx == c).any(1).sum()), n, 2 / 100), c
    assert not torch.equal(s.labels, sets.icl_train.labels)  # its own random words


@pytest.mark.parametrize("a", [0.0, 1.0])
def test_ciwl_set(a):
    """Query class absent from a context of 8 distinct training classes, trained labels,
    except exactly one context item (at a uniformly random position) that carries the query's
    trained label; the query follows the training distribution."""
    split = make_split(N_CHARACTERS, 23, 64, False, 1337)
    pool = torch.as_tensor(split.train_classes)
    s = build_eval_sets(split, 4096, 2024, a).ciwl
    n = len(s)
    assert not query_in_context(s).any()
    assert all(len(set(row)) == 8 for row in s.classes[:, :8].tolist())
    trained = label_of(s.classes, pool)
    assert torch.equal(s.targets, trained[:, 8])
    carries = s.labels[:, :8] == s.targets[:, None]
    assert (carries.sum(1) == 1).all()  # the query's label is available exactly once
    assert torch.equal(torch.where(carries, trained[:, :8], s.labels[:, :8]), trained[:, :8])  # others: trained
    position = carries.float().argmax(1)
    for j in range(8):
        assert within(int((position == j).sum()), n, 1 / 8), j
    assert_exemplars_distinct_per_class(s)
    w = zipf_weights(64, a).double()
    assert within(int((s.targets == 0).sum()), n, float(w[0]))


def test_ciwl_with_fewer_than_nine_classes_keeps_the_query_out_of_the_context():
    classes = train_list(4)
    s = sample_ciwl(draws(2000), classes, zipf(4, 0.0))
    assert not query_in_context(s).any()
    assert ((s.labels[:, :8] == s.targets[:, None]).sum(1) == 1).all()


def test_eval_sets_are_fixed():
    a = load_data(build_config("tiny")).eval_sets
    b = load_data(build_config("tiny", {"seed": 5, "data.p_bursty": 0.5})).eval_sets  # another run
    for (name, x), (_, y) in zip(a.items(), b.items()):
        for t in ("classes", "labels", "exemplars"):
            assert torch.equal(getattr(x, t), getattr(y, t)), f"{name}.{t}"
    assert len(a.icl) == 128  # tiny: eval.n_sequences


def test_icl_holdout_set_independent_of_the_training_classes():
    sets = [build_eval_sets(make_split(N_CHARACTERS, 23, k, False, 1337), 256, 2024, a)
            for k, a in ((4, 0.0), (64, 0.0), (1600, 1.0))]
    for s in sets[1:]:
        for t in ("classes", "labels", "exemplars"):
            assert torch.equal(getattr(s.icl, t), getattr(sets[0].icl, t))
    assert not torch.equal(sets[1].iwl.classes, sets[2].iwl.classes)  # these do follow the classes


def test_eval_seed_changes_the_sets():
    split = make_split(N_CHARACTERS, 23, 64, False, 1337)
    a, b = build_eval_sets(split, 256, 2024, 0.0), build_eval_sets(split, 256, 2025, 0.0)
    for (name, x), (_, y) in zip(a.items(), b.items()):
        assert not torch.equal(x.classes, y.classes), name
    # the three sets of one seed are drawn from different streams
    assert not torch.equal(a.icl.labels, a.icl_train.labels)


# --------------------------------------------------------------------------- determinism, devices


@pytest.fixture(scope="module")
def tiny():
    return load_data(build_config("tiny"))


def same(a: Sequences, b: Sequences) -> bool:
    return all(torch.equal(getattr(a, t), getattr(b, t)) for t in ("classes", "labels", "exemplars"))


def test_batch_is_a_function_of_seed_and_step(tiny):
    b5 = tiny.train_batch(5)
    assert len(b5) == 16  # tiny: train.batch_size
    tiny.train_batch(3)  # what came before does not matter
    assert same(b5, tiny.train_batch(5))
    assert same(b5, load_data(build_config("tiny")).train_batch(5))  # a fresh process-like rebuild
    assert not same(b5, tiny.train_batch(6))
    assert not same(b5, load_data(build_config("tiny", {"seed": 1})).train_batch(5))
    assert len(tiny.train_batch(5, batch_size=40)) == 40


def test_pack_batches_equal_each_seeds_own_batch(tiny):
    seeds = [0, 7, 3]
    packed = tiny.train_batch(5, seeds=seeds)
    assert len(packed) == 3 * 16
    for k, seed in enumerate(seeds):
        alone = load_data(build_config("tiny", {"seed": seed})).train_batch(5)
        assert same(packed[16 * k : 16 * (k + 1)], alone), f"seed {seed}"


def test_a_larger_batch_starts_with_the_smaller_one(tiny):
    assert same(tiny.train_batch(5, batch_size=40)[:16], tiny.train_batch(5))


@pytest.mark.parametrize("device", DEVICES)
def test_generator_on_device(device):
    """Integer arithmetic only: every device draws exactly the CPU's sequences."""
    classes = train_list(64)
    s = sample_training(draws(512, device=device), classes.to(device), zipf(64, 1.0, device), 0.9)
    assert s.classes.device.type == device
    assert same(s.to("cpu"), sample_training(draws(512), classes, zipf(64, 1.0), 0.9))
    icl = sample_icl(draws(256, step=1, device=device), holdout_list().to(device))
    iwl = sample_iwl(draws(256, step=2, device=device), classes.to(device), zipf(64, 1.0, device))
    assert icl.classes.device.type == device and iwl.classes.device.type == device
    assert same(icl.to("cpu"), sample_icl(draws(256, step=1), holdout_list()))
    assert same(iwl.to("cpu"), sample_iwl(draws(256, step=2), classes, zipf(64, 1.0)))


@pytest.mark.parametrize("device", DEVICES)
def test_study_data_on_device(device):
    data = load_data(build_config("tiny", {"data.augment": True, "data.num_classes": 100}), device)
    assert data.device.type == device
    batch = data.train_batch(0)
    assert batch.classes.device.type == device
    x = data.bank.render(batch.classes, batch.exemplars)
    assert x.shape == (16, 9, 14, 14) and x.device.type == device and 0 <= x.min() and x.max() <= 1
    assert data.eval_sets.icl.classes.device.type == device
    # the evaluation sets and the training batches are the same on every device
    cpu_sets = build_eval_sets(data.split, 128, 2024, 0.0)
    assert torch.equal(data.eval_sets.icl.classes.cpu(), cpu_sets.icl.classes)
    cpu = load_data(build_config("tiny", {"data.augment": True, "data.num_classes": 100}))
    assert same(batch.to("cpu"), cpu.train_batch(0))
