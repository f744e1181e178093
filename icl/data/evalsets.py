"""The fixed evaluation sets: built once from ``eval.seed``, identical for every run and
every checkpoint, so curves from different runs and steps are directly comparable.

- ``icl``: 2-way 4-shot on holdout classes, labels 0/1 at random per sequence (chance 0.5).
  It depends only on the eval seed and the holdout split, so it is the same set for every
  ``num_classes``.
- ``iwl``: no-support sequences over the training classes, fixed labels.
- ``icl_train``: 2-way 4-shot on *training* classes relabelled 0/1 (the transience paper's
  main ICL evaluator).
- ``flip_icl``: two training classes x 4 shots with their trained labels swapped within the
  sequence (:func:`~icl.data.sequences.sample_flip_icl`): the context and the weights give
  different answers.
- ``ciwl``: context-constrained IWL (:func:`~icl.data.sequences.sample_ciwl`): the query's
  class is absent from the context, its trained label sits on another exemplar.
ICL sets (``icl``, ``icl_train``, ``flip_icl``) draw their two classes uniformly from their
pool; the IWL queries (``iwl``, ``ciwl``) follow the training class distribution (Zipf weights).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from icl.data.rng import Categorical, Draws, random_words
from icl.data.sequences import Sequences, sample_ciwl, sample_flip_icl, sample_icl, sample_iwl, zipf_weights
from icl.data.split import Split

EVAL_SETS = ("icl", "iwl", "icl_train", "flip_icl", "ciwl")
# (counter stream, step) of each set's random words. The counter has four streams
# (icl.data.rng.STREAMS) and evaluation sets read step 0 of theirs; the sets added later read
# step 1 of an evaluation stream, which nothing else reads, so adding them changed neither the
# first three sets nor any training batch.
_WORDS = {"icl": ("icl", 0), "iwl": ("iwl", 0), "icl_train": ("icl_train", 0),
          "flip_icl": ("icl_train", 1), "ciwl": ("iwl", 1)}


@dataclass
class EvalSets:
    icl: Sequences
    iwl: Sequences
    icl_train: Sequences
    flip_icl: Sequences
    ciwl: Sequences

    def items(self) -> list[tuple[str, Sequences]]:
        return [(name, getattr(self, name)) for name in EVAL_SETS]

    def to(self, device: torch.device | str) -> "EvalSets":
        return EvalSets(*(s.to(device) for _, s in self.items()))


def _draws(eval_seed: int, which: str, n: int) -> Draws:
    """Each set its own words of ``eval.seed`` (the training streams never meet them)."""
    stream, step = _WORDS[which]
    return Draws(random_words(eval_seed, step, stream, n))


def build_eval_sets(split: Split, n: int, eval_seed: int, zipf_exponent: float) -> EvalSets:
    """On the CPU (the sets are the same on every device anyway, and moved once)."""
    train = torch.as_tensor(split.train_classes)
    holdout = torch.as_tensor(split.holdout_classes)
    dist = Categorical.from_weights(zipf_weights(len(train), zipf_exponent))
    return EvalSets(
        icl=sample_icl(_draws(eval_seed, "icl", n), holdout),
        iwl=sample_iwl(_draws(eval_seed, "iwl", n), train, dist),
        icl_train=sample_icl(_draws(eval_seed, "icl_train", n), train),
        flip_icl=sample_flip_icl(_draws(eval_seed, "flip_icl", n), train),
        ciwl=sample_ciwl(_draws(eval_seed, "ciwl", n), train, dist),
    )
