"""Data for the study: Omniglot images, the class split, sequences, fixed evaluation sets.

``load_data(cfg, device)`` is the one entry point the trainer and the CLI use.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Sequence

import torch
from einops import rearrange

from icl.config import Config, cache_dir
from icl.data.evalsets import EvalSets, build_eval_sets
from icl.data.images import ImageBank
from icl.data.omniglot import Source, load_images, locate_root
from icl.data.rng import Categorical, Draws, random_words
from icl.data.sequences import Sequences, sample_training, zipf_weights
from icl.data.split import Split, split_for
from icl.errors import UserError

__all__ = ["StudyData", "load_data", "Sequences", "EvalSets", "Split", "ImageBank"]


@dataclass
class StudyData:
    cfg: Config
    source: Source
    split: Split
    bank: ImageBank

    @property
    def device(self) -> torch.device:
        return self.bank.images.device

    @cached_property
    def train_classes(self) -> torch.Tensor:
        return torch.as_tensor(self.split.train_classes, device=self.device)

    @cached_property
    def label_of_class(self) -> torch.Tensor:
        """Global class id -> its trained label (index in the training list); -1 otherwise."""
        lut = torch.full((self.bank.n_classes,), -1, dtype=torch.long, device=self.device)
        lut[self.train_classes] = torch.arange(len(self.train_classes), device=self.device)
        return lut

    def trained_labels(self, classes: torch.Tensor) -> torch.Tensor:
        """The label each class was trained with (``-1`` for holdout classes): what a model
        answering from its weights predicts, e.g. for a ``flip_icl`` query."""
        return self.label_of_class[classes]

    @cached_property
    def class_dist(self) -> Categorical:
        """Zipf weights over the training list, as exact integer masses."""
        return Categorical.from_weights(zipf_weights(self.split.num_classes, self.cfg.data.zipf_exponent, self.device))

    def train_batch(self, step: int | torch.Tensor, batch_size: int | None = None,
                    seeds: Sequence[int] | None = None) -> Sequences:
        """The training batch of ``step``: a pure function of (config, seed, step). ``step``
        may be a 0-d int64 tensor on the device (a CUDA graph's step counter).

        With ``seeds``, the batches of several runs that differ only in their seed, made by
        one set of kernels and stacked: rows ``k*B .. (k+1)*B - 1`` are ``seeds[k]``'s batch,
        exactly what that run's own ``train_batch(step)`` returns (a pack of models)."""
        n = batch_size or self.cfg.train.batch_size
        words = random_words([self.cfg.seed] if seeds is None else seeds, step, "train", n, self.device)
        draws = Draws(rearrange(words, "k n w -> (k n) w"))
        return sample_training(draws, self.train_classes, self.class_dist, self.cfg.data.p_bursty)

    @cached_property
    def eval_sets(self) -> EvalSets:
        e = self.cfg.eval
        sets = build_eval_sets(self.split, e.n_sequences, e.seed, self.cfg.data.zipf_exponent)
        return sets.to(self.device)


def load_data(cfg: Config, device: torch.device | str = "cpu") -> StudyData:
    images, source = load_images(locate_root(cfg), cache_dir(cfg), cfg.data.image_size, cfg.data.custom)
    n_chars = images.shape[0]
    d = cfg.data
    if d.n_holdout + 4 > n_chars:
        raise UserError(f"data.n_holdout={d.n_holdout} leaves too few of the {n_chars} characters for training")
    available = (n_chars - d.n_holdout) * (8 if d.augment else 1)
    if d.num_classes > available:
        raise UserError(
            f"data.num_classes={d.num_classes} exceeds the {available} training classes available "
            f"from {source.describe()} after {d.n_holdout} holdout characters"
        )
    bank = ImageBank(images, d.augment, device)
    return StudyData(cfg, source, split_for(cfg, n_chars), bank)
