"""The fixed evaluation sets: built once from ``eval.seed``, identical for every run and
every checkpoint, so curves from different runs and steps are directly comparable.

- ``icl``: 2-way 4-shot on holdout classes, labels 0/1 at random per sequence (chance 0.5).
  It depends only on the eval seed and the holdout split, so it is the same set for every
  ``num_classes``.
- ``iwl``: no-support sequences over the training classes, fixed labels.
- ``icl_train``: 2-way 4-shot on *training* classes relabelled 0/1 (the transience paper's
  main ICL evaluator).
ICL sets draw their two classes uniformly from their pool; the IWL query follows the
training class distribution (Zipf weights).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from icl.data.rng import Categorical, Draws, random_words
from icl.data.sequences import Sequences, sample_icl, sample_iwl, zipf_weights
from icl.data.split import Split

EVAL_SETS = ("icl", "iwl", "icl_train")


@dataclass
class EvalSets:
    icl: Sequences
    iwl: Sequences
    icl_train: Sequences

    def items(self) -> list[tuple[str, Sequences]]:
        return [(name, getattr(self, name)) for name in EVAL_SETS]

    def to(self, device: torch.device | str) -> "EvalSets":
        return EvalSets(*(s.to(device) for _, s in self.items()))


def _draws(eval_seed: int, which: str, n: int) -> Draws:
    """Each set its own stream of ``eval.seed`` (the training streams never meet them)."""
    return Draws(random_words(eval_seed, 0, which, n))


def build_eval_sets(split: Split, n: int, eval_seed: int, zipf_exponent: float) -> EvalSets:
    """On the CPU (the sets are the same on every device anyway, and moved once)."""
    train = torch.as_tensor(split.train_classes)
    holdout = torch.as_tensor(split.holdout_classes)
    dist = Categorical.from_weights(zipf_weights(len(train), zipf_exponent))
    return EvalSets(
        icl=sample_icl(_draws(eval_seed, "icl", n), holdout),
        iwl=sample_iwl(_draws(eval_seed, "iwl", n), train, dist),
        icl_train=sample_icl(_draws(eval_seed, "icl_train", n), train),
    )
