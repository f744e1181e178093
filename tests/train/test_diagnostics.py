"""Attention diagnostics and calibration on hand-built inputs with known answers."""

import torch

from icl.model import N_TOKENS, QUERY_POS
from icl.metrics import ATTN_STATS
from icl.train.evaluate import attention_masks, attention_scores, expected_calibration_error

# One sequence: context classes 7 7 3 7 3 5 3 7, query class 7 -> matching context items 0, 1, 3, 7.
CLASSES = torch.tensor([[7, 7, 3, 7, 3, 5, 3, 7, 7]])
MATCH = [0, 1, 3, 7]
OTHER = [2, 4, 5, 6]


def pattern(rows: dict[int, dict[int, float]]) -> torch.Tensor:
    """A causal pattern [T, T]: given rows get the given weights; others attend to themselves."""
    p = torch.eye(N_TOKENS)
    for row, weights in rows.items():
        p[row] = 0
        for col, w in weights.items():
            p[row, col] = w
    return p


def test_masks_mark_matching_images_and_their_labels():
    img, lbl, other_lbl = attention_masks(CLASSES)
    assert img[0].nonzero().flatten().tolist() == [2 * j for j in MATCH]
    assert lbl[0].nonzero().flatten().tolist() == [2 * j + 1 for j in MATCH]
    assert other_lbl[0].nonzero().flatten().tolist() == [2 * j + 1 for j in OTHER]


def test_scores_on_a_hand_built_pattern():
    heads = [
        # head 0: an induction head: query spreads all attention over matching labels
        pattern({QUERY_POS: {2 * j + 1: 0.25 for j in MATCH}}),
        # head 1: query looks at matching images (0.5) and at itself (0.5)
        pattern({QUERY_POS: {**{2 * j: 0.125 for j in MATCH}, QUERY_POS: 0.5}}),
        # head 2: query looks at non-matching labels only; every label looks at its image
        pattern({QUERY_POS: {2 * j + 1: 0.25 for j in OTHER}, **{2 * k + 1: {2 * k: 1.0} for k in range(8)}}),
        # head 3: label tokens split attention 0.5 on their image, 0.5 on the token before it
        pattern({2 * k + 1: {2 * k: 0.5, max(2 * k - 1, 0): 0.5} if k else {0: 1.0} for k in range(8)}),
    ]
    patterns = torch.stack(heads)[None, None]  # [B=1, L=1, H=4, T, T]
    s = attention_scores(patterns, CLASSES)[0]  # [H, 5]
    col = {name: i for i, name in enumerate(ATTN_STATS)}
    expected = {
        0: dict(match_img=0.0, match_lbl=1.0, other=0.0, induction=1.0),
        1: dict(match_img=0.5, match_lbl=0.0, other=0.5, induction=0.0),
        2: dict(match_img=0.0, match_lbl=0.0, other=1.0, induction=-1.0, prev_tok=1.0),
        3: dict(match_img=0.0, match_lbl=0.0, other=1.0, induction=0.0, prev_tok=(1.0 + 7 * 0.5) / 8),
    }
    for head, values in expected.items():
        for name, value in values.items():
            assert abs(float(s[head, col[name]]) - value) < 1e-6, (head, name)
    assert float(s[0, col["prev_tok"]]) == 0.0  # head 0's label tokens attend to themselves


def test_scores_average_over_sequences():
    a = pattern({QUERY_POS: {2 * j + 1: 0.25 for j in MATCH}})
    b = pattern({QUERY_POS: {QUERY_POS: 1.0}})
    patterns = torch.stack([a, b])[:, None, None]  # two sequences, one head
    s = attention_scores(patterns, CLASSES.repeat(2, 1))
    assert abs(float(s[0, 0, ATTN_STATS.index("match_lbl")]) - 0.5) < 1e-6


def test_ece_is_zero_when_confidence_equals_accuracy_and_the_gap_otherwise():
    targets = torch.tensor([0, 0, 1, 1])
    sure_right = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    assert expected_calibration_error(sure_right, targets, 10) == 0.0
    half_right = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    assert abs(expected_calibration_error(half_right, targets, 10) - 0.5) < 1e-6
    calibrated = torch.tensor([[0.75, 0.25]] * 4)  # 75% confident, right on 3 of 4
    assert abs(expected_calibration_error(calibrated, torch.tensor([0, 0, 0, 1]), 10)) < 1e-6


def test_flip_and_ciwl_metrics_tell_context_from_weights():
    """On hand-made logits: a model that follows the context on flip_icl scores ctx 1 / iwl 0,
    one that answers from its weights the reverse; CIWL counts the query's trained label."""
    from icl.config import load_config
    from icl.data import load_data
    from icl.train.evaluate import set_metrics

    cfg = load_config("tiny")
    data = load_data(cfg)
    sets = data.eval_sets
    vocab = cfg.data.num_classes

    def onehot(labels):
        return torch.nn.functional.one_hot(labels, vocab).float()

    logits = {name: onehot(s.targets) for name, s in sets.items()}
    m = set_metrics(logits, sets, data, cfg)
    assert m["flip_icl_ctx_acc"] == 1.0 and m["flip_icl_iwl_acc"] == 0.0 and m["ciwl_acc"] == 1.0
    assert m["icl_acc"] == m["iwl_acc"] == m["icl_train_acc"] == 1.0
    weights = data.trained_labels(sets.flip_icl.classes[:, -1])
    assert (weights >= 0).all()
    m = set_metrics({**logits, "flip_icl": onehot(weights), "ciwl": onehot(sets.ciwl.labels[:, 0])}, sets, data, cfg)
    assert m["flip_icl_ctx_acc"] == 0.0 and m["flip_icl_iwl_acc"] == 1.0
    assert 0.0 < m["ciwl_acc"] < 0.3  # the label of the first context item: right only where it carries the query's
    assert (data.trained_labels(torch.as_tensor(data.split.holdout_classes)) == -1).all()


def test_in_context_argmax_follows_the_peers_masking():
    """icl-dynamics ``in_context_acc``: only labels shown in the context compete, a label shown
    several times counts once, ties go to the lowest label id, the query's own label is not shown."""
    from icl.data.sequences import Sequences
    from icl.train.evaluate import in_context_argmax

    labels = torch.tensor([[3, 3, 5, 5, 3, 5, 3, 5, 9],   # context {3, 5}; the query's label 9 is never shown
                           [1, 1, 1, 1, 6, 6, 6, 6, 1],
                           [2, 4, 2, 4, 2, 4, 2, 4, 4]])
    seqs = Sequences(torch.zeros_like(labels), labels, torch.zeros_like(labels))
    logits = torch.zeros(3, 10)
    logits[0, [9, 3, 5]] = torch.tensor([9.0, 1.0, 2.0])  # best overall is 9 (not in context) -> 5
    logits[1, [0, 1, 6]] = torch.tensor([5.0, -3.0, -3.0])  # a tie in context -> the lower id, 1
    logits[2, [7, 2, 4]] = torch.tensor([1.0, -1.0, -0.5])  # every context logit below an absent one -> 4
    assert in_context_argmax(logits, seqs).tolist() == [5, 1, 4]
    assert logits.argmax(-1).tolist() == [9, 0, 7]


def test_in_context_columns_beside_the_all_label_ones():
    """A model whose top logit is a label absent from the context and whose second is the
    target scores 0 over all labels and 1 over the labels in context, on every evaluator;
    the ICL headline equals the 2-label argmax it always was; the two halves average to it."""
    from icl.config import load_config
    from icl.data import load_data
    from icl.metrics import ACCURACIES as ACCURACY_METRICS, ICL_HALVES
    from icl.train.evaluate import set_metrics

    cfg = load_config("tiny")
    data = load_data(cfg)
    sets = data.eval_sets
    vocab = cfg.data.num_classes
    one = torch.nn.functional.one_hot

    def absent(s):  # per sequence, the lowest label id not shown in its context
        shown = one(s.labels[:, :8], vocab).sum(1) > 0
        return (~shown).float().argmax(-1)

    def target_second(s, target):
        return one(target, vocab).float() + 2 * one(absent(s), vocab).float()

    weights = data.trained_labels(sets.flip_icl.classes[:, -1])
    logits = {name: target_second(s, s.targets) for name, s in sets.items()}
    m = set_metrics(logits, sets, data, cfg)
    assert set(ACCURACY_METRICS) | set(ICL_HALVES) | {"ece"} == set(m)
    for all_labels, in_context in (("icl_acc_all", "icl_acc"), ("icl_train_acc_all", "icl_train_acc"),
                                   ("flip_icl_ctx_acc", "flip_icl_ctx_acc_inctx"), ("ciwl_acc", "ciwl_acc_inctx")):
        assert (m[all_labels], m[in_context]) == (0.0, 1.0), all_labels
    assert m["flip_icl_iwl_acc"] == 0.0 and m["flip_icl_iwl_acc_inctx"] == 0.0
    m = set_metrics({**logits, "flip_icl": target_second(sets.flip_icl, weights)}, sets, data, cfg)
    assert (m["flip_icl_iwl_acc"], m["flip_icl_iwl_acc_inctx"], m["flip_icl_ctx_acc_inctx"]) == (0.0, 1.0, 0.0)

    g = torch.Generator().manual_seed(0)
    noisy = {name: torch.randn(len(s), vocab, generator=g) for name, s in sets.items()}
    m = set_metrics(noisy, sets, data, cfg)
    two = (noisy["icl"][:, :2].argmax(-1) == sets.icl.targets).float()
    assert m["icl_acc"] == two.mean().item()
    assert m["icl_acc_even"] == two[0::2].mean().item() and m["icl_acc_odd"] == two[1::2].mean().item()
    assert m["flip_icl_ctx_acc_inctx"] + m["flip_icl_iwl_acc_inctx"] == 1.0  # two labels in context
    assert m["flip_icl_ctx_acc"] + m["flip_icl_iwl_acc"] < 1.0  # the rest of the vocabulary takes some
    assert m["ciwl_acc_inctx"] > m["ciwl_acc"]
