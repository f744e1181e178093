"""Evaluation on the fixed sets: accuracies, calibration, and attention diagnostics.

Two definitions of accuracy, side by side wherever they differ (README "Evaluation sets"):
*all labels* takes the argmax over every label of the vocabulary; *in context* (suffix
``_inctx``, or the 2-label ICL columns) takes it over the labels present in the sequence's
context only, as icl-dynamics scores ``icl``, ``flip_icl``, ``iwl_copy_avail`` and
``train_eval`` (``main.eval_step``: ``in_context_acc``).

Metric names (the columns of ``metrics.csv``; the names, their groups and labels are
:mod:`icl.metrics`'s):
- ``icl_acc``: ICL on holdout classes, argmax over the two labels in context (0 and 1),
  chance 0.5 — the headline. ``icl_acc_all``: argmax over every label.
  ``icl_acc_even`` / ``icl_acc_odd``: ``icl_acc`` on the even / odd sequence indices of the
  set, two fixed halves, so the analysis can choose a peak on one half and read it on the
  other (an unbiased peak: ``analysis.summary``).
- ``icl_train_acc``: the same 2-way 4-shot task on training classes relabelled 0/1,
  restricted to the two labels; ``icl_train_acc_all``: argmax over every label.
- ``iwl_acc``: no-support sequences, argmax over every label (chance 1/num_classes).
- ``flip_icl_ctx_acc`` / ``flip_icl_iwl_acc``: on ``flip_icl`` (training classes, trained
  labels swapped within the sequence), how often the argmax over every label is the label the
  context gives the query's class / the query's own trained label (the weights' answer). The
  two sum to at most 1; the rest goes to other labels. ``flip_icl_ctx_acc_inctx`` /
  ``flip_icl_iwl_acc_inctx``: the same with the argmax over the two labels in context (the
  peers' definition); they sum to exactly 1.
- ``ciwl_acc``: context-constrained IWL (query class absent from the context, its trained
  label on another exemplar), argmax over every label; ``ciwl_acc_inctx``: over the labels in
  context (the peers' definition).
- ``ece``: expected calibration error on the ICL holdout set, from the probabilities
  renormalised over the two in-context labels, ``eval.ece_bins`` equal-width bins.
- ``attn_L{l}_{match_img,match_lbl,other,induction,prev_tok}``: see :func:`attention_scores`;
  per layer, the maximum over heads. The full per-head array is returned too.
"""

from __future__ import annotations

from typing import Iterator, Mapping

import numpy as np
import torch
from einops import reduce
from torch import Tensor

from icl.config import CONTEXT_LEN, Config
from icl.data import EvalSets, StudyData
from icl.data.sequences import Sequences
from icl.metrics import (ATTN_STATS, CIWL, CIWL_INCTX, ECE, EVALUATION, FLIP_CTX, FLIP_CTX_INCTX, FLIP_IWL,
                         FLIP_IWL_INCTX, ICL, ICL_ALL, ICL_HALVES, ICL_TRAIN, ICL_TRAIN_ALL, IWL, attn_column)
from icl.model.hooks import run_with_cache
from icl.model.transformer import QUERY_POS, SequenceModel
from icl.train.precision import autocast, param_dtype


def attention_masks(classes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Token masks ``[B, 17]`` for the query's matching images, their labels, and the labels
    of non-matching images (context image ``j`` is token ``2j``, its label ``2j + 1``)."""
    b = classes.shape[0]
    match = classes[:, :CONTEXT_LEN] == classes[:, CONTEXT_LEN:]  # [B, 8]
    img = torch.zeros(b, 2 * CONTEXT_LEN + 1, dtype=torch.bool, device=classes.device)
    lbl, other_lbl = img.clone(), img.clone()
    img[:, 0 : 2 * CONTEXT_LEN : 2] = match
    lbl[:, 1 : 2 * CONTEXT_LEN : 2] = match
    other_lbl[:, 1 : 2 * CONTEXT_LEN : 2] = ~match
    return img, lbl, other_lbl


def attention_scores(patterns: Tensor, classes: Tensor) -> Tensor:
    """Per-head diagnostics ``[L, H, 5]`` (mean over sequences), columns ``ATTN_STATS``:

    - ``match_img``: query's attention to context images of its own class,
    - ``match_lbl``: to the label tokens that follow those images,
    - ``other``: to everything else (1 - the two above),
    - ``induction``: ``match_lbl`` minus attention to labels of non-matching images,
    - ``prev_tok``: each label token's attention to the image just before it (mean over the 8).

    ``patterns`` is ``[B, L, H, T, T]``: every layer's ``attn.hook_pattern``, stacked.
    """
    img, lbl, other_lbl = (m[:, None, None, :].to(patterns.dtype) for m in attention_masks(classes))
    query = patterns[..., QUERY_POS, :]  # [B, L, H, T]
    match_img = (query * img).sum(-1)
    match_lbl = (query * lbl).sum(-1)
    other = 1.0 - match_img - match_lbl
    induction = match_lbl - (query * other_lbl).sum(-1)
    label_rows = torch.arange(1, 2 * CONTEXT_LEN, 2, device=patterns.device)
    prev_tok = patterns[..., label_rows, label_rows - 1].mean(-1)  # [B, L, H]
    stats = torch.stack([match_img, match_lbl, other, induction, prev_tok], dim=-1)  # [B, L, H, 5]
    return reduce(stats.float(), "b l h s -> l h s", "mean")


def expected_calibration_error(probs: Tensor, targets: Tensor, bins: int) -> float:
    """Equal-width-bin ECE of the argmax prediction: sum_b n_b/N |acc_b - conf_b|, i.e. the
    per-bin gap between summed correctness and summed confidence, over N."""
    conf, pred = probs.max(dim=-1)
    correct = (pred == targets).float()
    idx = (conf * bins).long().clamp(max=bins - 1)
    acc = torch.zeros(bins, device=probs.device).index_add_(0, idx, correct)
    cf = torch.zeros(bins, device=probs.device).index_add_(0, idx, conf)
    return float(((acc - cf).abs().sum()) / max(len(targets), 1))


PATTERNS = "attn.hook_pattern"


def chunks(seqs: Sequences, cfg: Config) -> Iterator[Sequences]:
    for start in range(0, len(seqs), cfg.eval.batch_size):
        yield seqs[start : start + cfg.eval.batch_size]


@torch.no_grad()
def _run(model: SequenceModel, data: StudyData, seqs: Sequences, cfg: Config, attention: bool):
    """Logits for a whole set (in chunks of ``eval.batch_size``) and, if asked, the attention
    diagnostics (read from the hook-point cache of the patterns)."""
    logits, scores = [], None
    for chunk in chunks(seqs, cfg):
        images = data.bank.render(chunk.classes, chunk.exemplars, param_dtype(cfg))
        with autocast(cfg, images.device):
            if attention:
                out, cache = run_with_cache(model, images, chunk.labels, names_filter=lambda n: n.endswith(PATTERNS))
                s = attention_scores(cache.stack(PATTERNS).float(), chunk.classes) * len(chunk)
                scores = s if scores is None else scores + s
            else:
                out = model(images, chunk.labels)
        logits.append(out.float())
    result = torch.cat(logits)
    return result, (scores / len(seqs) if attention else None)


def in_context_argmax(logits: Tensor, seqs: Sequences) -> Tensor:
    """The argmax over the labels present in each sequence's context only ``[N]``:
    icl-dynamics' ``in_context_acc`` (``main.eval_step``: logits of labels absent from the
    context pushed to -1e20; a label shown several times counts once; ties go to the lowest
    label id, as ``jnp.argmax`` and ``torch.argmax`` both take the first maximum)."""
    present = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, seqs.labels[:, :CONTEXT_LEN], True)
    return logits.masked_fill(~present, -torch.inf).argmax(-1)


def set_hits(logits: Mapping[str, Tensor], sets: EvalSets, data: StudyData) -> dict[str, Tensor]:
    """Each accuracy metric's per-sequence correctness (bool ``[N]``) from the logits of each
    evaluation set: the accuracies are their means, and head attribution's paired standard
    errors come from the per-sequence differences (ablated - clean, same sequences)."""
    t = sets.icl.targets
    flip = logits["flip_icl"].argmax(-1)
    flip_ctx = in_context_argmax(logits["flip_icl"], sets.flip_icl)
    flip_weights = data.trained_labels(sets.flip_icl.classes[:, -1])
    return {
        ICL: in_context_argmax(logits["icl"], sets.icl) == t,
        ICL_ALL: logits["icl"].argmax(-1) == t,
        ICL_TRAIN: in_context_argmax(logits["icl_train"], sets.icl_train) == sets.icl_train.targets,
        ICL_TRAIN_ALL: logits["icl_train"].argmax(-1) == sets.icl_train.targets,
        IWL: logits["iwl"].argmax(-1) == sets.iwl.targets,
        FLIP_CTX: flip == sets.flip_icl.targets,
        FLIP_CTX_INCTX: flip_ctx == sets.flip_icl.targets,
        FLIP_IWL: flip == flip_weights,
        FLIP_IWL_INCTX: flip_ctx == flip_weights,
        CIWL: logits["ciwl"].argmax(-1) == sets.ciwl.targets,
        CIWL_INCTX: in_context_argmax(logits["ciwl"], sets.ciwl) == sets.ciwl.targets,
    }


def set_metrics(logits: Mapping[str, Tensor], sets: EvalSets, data: StudyData, cfg: Config) -> dict[str, float]:
    """Every accuracy and the ECE from the logits of each evaluation set (``{set name: [N, vocab]}``);
    the accuracies are read from the device in one copy."""
    hits = set_hits(logits, sets, data)
    icl = hits[ICL].float()
    means = [*(h.float().mean() for h in hits.values()), icl[0::2].mean(), icl[1::2].mean()]
    accs = dict(zip([*hits, *ICL_HALVES], torch.stack(means).tolist()))
    accs[ECE] = expected_calibration_error(logits["icl"][:, :2].softmax(-1), sets.icl.targets, cfg.eval.ece_bins)
    return {k: accs[k] for k in EVALUATION}


def evaluate(model: SequenceModel, data: StudyData, cfg: Config) -> tuple[dict[str, float], np.ndarray]:
    """All evaluation metrics, and the per-head attention array ``[L, H, 5]``."""
    was_training = model.training
    model.eval()
    heads = None
    logits: dict[str, Tensor] = {}
    try:
        for name, seqs in data.eval_sets.items():
            logits[name], scores = _run(model, data, seqs, cfg, attention=name == "icl")
            heads = scores if scores is not None else heads
    finally:
        model.train(was_training)
    metrics = set_metrics(logits, data.eval_sets, data, cfg)
    assert heads is not None
    per_layer = heads.max(dim=1).values  # max over heads: [L, 5]
    for layer in range(per_layer.shape[0]):
        for s, name in enumerate(ATTN_STATS):
            metrics[attn_column(layer, name)] = float(per_layer[layer, s])
    return metrics, heads.cpu().numpy()
