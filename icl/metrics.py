"""Every column of a run's ``metrics.csv``: names, groups, labels, chance levels, and the paper
each follows. Torch-free.

The trainer writes these columns (``icl.train.loop.evaluation_row``, ``icl.train.evaluate``);
everything that reads them (TensorBoard tags, the sweep's live table, head attribution, the
analysis and the tests) imports the names from here, so no other module spells a metric
column or keeps a list of them. A row holds, in this order::

    step, sequences, train_loss, train_acc, lr          TRAIN (since the last evaluation)
    icl_acc, icl_acc_all, ece, icl_train_acc, iwl_acc,  EVALUATION (the fixed sets)
      flip_icl_ctx_acc, flip_icl_iwl_acc, ciwl_acc
    attn_L{l}_{stat}                                     ATTENTION, per layer (max over heads)
    steps_per_s, sequences_per_s, eval_s, wall_s         TIMING

**Adding a metric** is one line here: its name in a group (an accuracy in ``ACCURACIES``, the
order in which head attribution writes its rows), with its ``TITLES`` and ``PAPER`` entries
beside it; then compute it in :func:`icl.train.evaluate.set_metrics`. The groups decide the
rest: TensorBoard files an accuracy under ``eval/``, the analysis checks it lies in [0, 1],
head attribution ablates it; add it to ``LIVE`` to show it in the sweep's live table and to
``AXIS_LABELS`` for a longer axis label than its title.
"""

from __future__ import annotations

import re

STEP = "step"  # every row's key: the training step evaluated

# --------------------------------------------------------------------------- training, since the last evaluation
SEQUENCES = "sequences"  # training sequences seen: step x train.batch_size
TRAIN_LOSS = "train_loss"  # mean cross-entropy at the query (nats)
TRAIN_ACC = "train_acc"  # training-distribution accuracy (argmax over every label)
LR = "lr"  # the learning rate at the step
TRAIN = (SEQUENCES, TRAIN_LOSS, TRAIN_ACC, LR)

# --------------------------------------------------------------------------- evaluation, on the fixed sets
# Two definitions of accuracy, side by side wherever they differ: *all labels* (argmax over every
# label) and *in context* (argmax over the labels present in the sequence's context only: the peer
# code icl-dynamics' ``in_context_acc``; the suffix ``_inctx``, or the 2-label ICL columns).
ICL = "icl_acc"  # the headline: holdout classes, argmax over the 2 labels in context
ICL_ALL = "icl_acc_all"  # the same sequences, argmax over every label
ICL_TRAIN = "icl_train_acc"  # training classes relabelled 0/1, argmax over the 2 labels
ICL_TRAIN_ALL = "icl_train_acc_all"  # ... argmax over every label
IWL = "iwl_acc"  # query class absent from the context, argmax over every label
FLIP_CTX = "flip_icl_ctx_acc"  # flip ICL (trained labels swapped in context): the context's label
FLIP_CTX_INCTX = "flip_icl_ctx_acc_inctx"  # ... argmax over the labels in context (the peers')
FLIP_IWL = "flip_icl_iwl_acc"  # ... the query's own trained label (the weights' answer)
FLIP_IWL_INCTX = "flip_icl_iwl_acc_inctx"  # ... argmax over the labels in context (the peers')
CIWL = "ciwl_acc"  # context-constrained IWL: the query's trained label on another exemplar
CIWL_INCTX = "ciwl_acc_inctx"  # ... argmax over the labels in context (the peers')
ICL_EVEN = "icl_acc_even"  # icl_acc on the ICL set's even sequences: with ICL_ODD, the two
ICL_ODD = "icl_acc_odd"  # halves the analysis cross-fits the peak on (analysis.intervals)
ECE = "ece"  # expected calibration error on the ICL holdout set (eval.ece_bins bins)
ACCURACIES = (ICL, ICL_ALL, ICL_TRAIN, ICL_TRAIN_ALL, IWL, FLIP_CTX, FLIP_CTX_INCTX, FLIP_IWL, FLIP_IWL_INCTX,
              CIWL, CIWL_INCTX)
ICL_HALVES = (ICL_EVEN, ICL_ODD)
EVALUATION = (ICL, ICL_ALL, *ICL_HALVES, ECE, *ACCURACIES[2:])  # in metrics.csv's order
ICL_ACCURACIES = (ICL, ICL_ALL, ICL_TRAIN, ICL_TRAIN_ALL)  # the ICL curves, drawn against CHANCE
PEERS = (ICL_ALL, ICL_TRAIN, ICL_TRAIN_ALL, CIWL, CIWL_INCTX, FLIP_CTX, FLIP_CTX_INCTX, FLIP_IWL,
         FLIP_IWL_INCTX)  # columns older runs may lack (added with the peer evaluators)

# --------------------------------------------------------------------------- timing
STEPS_PER_S = "steps_per_s"  # training steps per second since the last evaluation (evaluation excluded)
SEQUENCES_PER_S = "sequences_per_s"
EVAL_S = "eval_s"  # seconds of this evaluation
WALL_S = "wall_s"  # the run's (pack's) wall time so far: training plus every evaluation
TIMING = (STEPS_PER_S, SEQUENCES_PER_S, EVAL_S, WALL_S)

COLUMNS = (STEP, *TRAIN, *EVALUATION, *TIMING)  # every column but the attention ones
PEAK_ICL = "peak_icl_acc"  # not in metrics.csv: TensorBoard's running maximum of ICL (icl.train.hparams)
HPARAMS_METRICS = (PEAK_ICL, IWL)  # what TensorBoard's HParams view sets against the hyperparameters
PROBABILITIES = (TRAIN_ACC, *EVALUATION)  # lie in [0, 1]
REQUIRED = (ICL, IWL, TRAIN_ACC)  # what the analysis cannot do without

# --------------------------------------------------------------------------- attention diagnostics
# Per head on the ICL holdout set (icl.train.evaluate.attention_scores; attention.npz keeps them
# per head, metrics.csv per layer as the maximum over heads).
ATTN_STATS = ("match_img", "match_lbl", "other", "induction", "prev_tok")
ATTN_PREFIX = "attn_"
ATTN_RE = re.compile(r"^attn_L(\d+)_(" + "|".join(ATTN_STATS) + r")$")  # groups: layer, stat


def attn_column(layer: int, stat: str) -> str:
    """The ``metrics.csv`` column of one attention statistic of one layer: ``attn_L0_induction``."""
    return f"{ATTN_PREFIX}L{layer}_{stat}"


def attn_max_column(stat: str) -> str:
    """The analysis's maximum of a statistic over layers: ``attn_max_induction``."""
    return f"{ATTN_PREFIX}max_{stat}"


def is_attention(column: str) -> bool:
    return column.startswith(ATTN_PREFIX)


def is_metric(column: str) -> bool:
    """A column the trainer writes (``step`` included)."""
    return column in COLUMNS or is_attention(column)


def group(column: str) -> str:
    """The group a column is shown under (TensorBoard's tag prefix); a new evaluator's column
    lands under ``eval``."""
    if is_attention(column):
        return "attention"
    if column in TIMING:
        return "timing"
    if column in TRAIN:
        return "train"
    return "eval"


# --------------------------------------------------------------------------- chance, provenance, labels
CHANCE = 0.5  # ICL restricted to the 2 labels in context (ICL, ICL_TRAIN); IWL's is 1/num_classes

PAPER = {
    ICL: "Chan et al. 2022 (holdout 2-way 4-shot, labels 0/1, restricted to the 2 labels; STUDY.md)",
    ICL_ALL: "Chan et al. 2022 (the same, over every label)",
    ICL_EVEN: "icl_acc on the even sequences (this project: for the cross-fitted peak)",
    ICL_ODD: "icl_acc on the odd sequences (this project: for the cross-fitted peak)",
    ICL_TRAIN: "Singh et al. 2023 (their main ICL evaluator: training classes relabelled 0/1; icl-dynamics in_context_acc)",
    ICL_TRAIN_ALL: "Singh et al. 2023's ICL evaluator, over every label",
    IWL: "Chan et al. 2022 (no support); the peer code's pure_iwl (argmax over every label)",
    FLIP_CTX: "peer code icl-dynamics, flip_icl (coopetition paper), argmax over every label",
    FLIP_CTX_INCTX: "peer code icl-dynamics, flip_icl scored with in_context_acc (the peers' definition)",
    FLIP_IWL: "peer code icl-dynamics, flip_icl (coopetition paper), argmax over every label",
    FLIP_IWL_INCTX: "peer code icl-dynamics, flip_icl scored with in_context_acc (the peers' definition)",
    CIWL: "peer code icl-dynamics, iwl_copy_avail (coopetition paper), argmax over every label",
    CIWL_INCTX: "peer code icl-dynamics, iwl_copy_avail scored with in_context_acc (the peers' definition)",
    ECE: "STUDY.md: equal-width bins on the ICL holdout set",
    TRAIN_ACC: "STUDY.md: training-distribution accuracy",
}

LIVE = {  # the sweep's live table: the accuracies shown, metric -> column header (in this order)
    ICL: "ICL",
    IWL: "IWL",
    TRAIN_ACC: "train acc",
    CIWL: "CIWL",
    CIWL_INCTX: "CIWL in ctx",
    FLIP_CTX: "flip ctx",
    FLIP_CTX_INCTX: "flip ctx in ctx",
    FLIP_IWL: "flip IWL",  # its in-context twin is 1 - flip ctx in ctx: left out
}

TITLES = {  # short names, for plot titles and legends
    ICL: "ICL, holdout",
    ICL_TRAIN: "ICL, train classes",
    IWL: "IWL",
    CIWL: "CIWL",
    FLIP_CTX: "flip ICL: context",
    FLIP_IWL: "flip ICL: weights",
    ICL_ALL: "ICL, all labels",
    ICL_TRAIN_ALL: "ICL, train classes, all labels",
    CIWL_INCTX: "CIWL, in context",
    FLIP_CTX_INCTX: "flip ICL: context, in context",
    FLIP_IWL_INCTX: "flip ICL: weights, in context",
    TRAIN_ACC: "training accuracy",
}
HEAD_MAP_METRICS = (ICL, ICL_TRAIN, IWL, CIWL, FLIP_CTX, FLIP_IWL)  # the panels of a head-ablation map

ATTN_NAMES = {  # what each attention statistic measures
    "match_img": "matching images",
    "match_lbl": "matching labels",
    "other": "other tokens",
    "induction": "induction (match − non-match labels)",
    "prev_tok": "previous token (label → its image)",
}

AXIS_LABELS = {  # a curve's y-axis label
    ICL: "ICL acc., holdout\n(chance 0.5)",
    ICL_ALL: "ICL acc., all labels",
    ICL_TRAIN: "ICL acc., train classes\n(chance 0.5)",
    IWL: "IWL accuracy\n(chance 1/classes)",
    TRAIN_ACC: "training accuracy",
    CIWL: "CIWL accuracy\n(query's label in context)",
    FLIP_CTX: "flip ICL: follows\nthe context",
    FLIP_IWL: "flip ICL: follows\nthe weights",
    ICL_TRAIN_ALL: "ICL acc., train classes,\nall labels",
    CIWL_INCTX: "CIWL accuracy\n(query's label in context)",
    FLIP_CTX_INCTX: "flip ICL: follows\nthe context",
    FLIP_IWL_INCTX: "flip ICL: follows\nthe weights",
    TRAIN_LOSS: "training loss (nats)",
    ECE: "ECE, ICL holdout",
    attn_max_column("induction"): "induction score\n(max over layers)",
    attn_max_column("match_lbl"): "attn. to matching labels\n(fraction, max over layers)",
    attn_max_column("match_img"): "attn. to matching images\n(fraction, max over layers)",
    attn_max_column("prev_tok"): "previous-token attn.\n(fraction, max over layers)",
    attn_max_column("other"): "attn. to other tokens\n(fraction, max over layers)",
}
X_LABELS = {STEP: "training step", SEQUENCES: "training sequences"}  # the time axes

# --------------------------------------------------------------------------- per-trial columns the analysis adds
N_EVAL = "eval_sequences"  # the run's eval.n_sequences (the binomial error of its accuracies)
DECAY_EXP = "decay_exponent"  # wd * sum_t lr_t over the run (icl.schedule): the shrink factor is exp(-it)
