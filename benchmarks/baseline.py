"""The naive baseline: the training step one writes first, for the same model and data.

Every ratio in ``benchmarks/throughput.py`` is measured against this. It is what a careful
user writes before thinking about throughput, not a straw man:

- the sequences are sampled on the host with numpy, one sequence at a time, following the
  recipe of STUDY.md (bursty with probability ``p_bursty``: 2 burst classes x 3 exemplars
  + 2 distractors, shuffled, query from a burst class; otherwise 9 independent draws;
  Zipf class weights; exemplars of one class distinct within a sequence);
- each sequence's images are gathered from the Omniglot uint8 array in host memory (one
  fancy-index per sequence; augmented classes rotated/flipped with numpy), converted to
  float32 in [0, 1], and the batch is copied to the device every step;
- the model is the project's own (``icl.model.build_model``), trained eagerly with
  ``torch.optim.AdamW`` in PyTorch's default implementation (the trainer uses the fused
  one) over the same decay groups (``icl.train.optim.make_optimizer(..., fused=False)``) and
  the same hyperparameters and learning-rate schedule, in the config's precision (bf16 autocast on CUDA when
  ``train.precision`` is bf16, as the trainer), and the loss is read with ``.item()``
  every step (to log it), which synchronises host and device.

The data distribution is the study's, drawn from a numpy stream rather than the trainer's
counter-based sampler, so the batches are not the trainer's batches; only the
cost is compared. Loading the images (once, before timing) uses the project's data layer.

    python benchmarks/baseline.py --config tiny --steps 50      # trains and prints steps/s
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from icl.config import CONTEXT_LEN, N_DRAWERS, N_VARIANTS, SEQ_LEN, Config, load_config
from icl.data import load_data
from icl.data.images import transform
from icl.model import build_model
from icl.train.precision import autocast
from icl.schedule import lr_at
from icl.train.optim import make_optimizer, set_lr


class NaiveBaseline:
    """An eager, host-fed trainer of one model: ``step()`` = sample, copy, forward,
    backward, AdamW, ``loss.item()``."""

    def __init__(self, cfg: Config, device: torch.device | str, seed: int | None = None):
        self.cfg = cfg
        self.device = torch.device(device)
        data = load_data(cfg, "cpu")  # the decoded Omniglot array and the class split
        self.images = data.bank.images.numpy()  # uint8 [n_chars, 20, S, S], host memory
        self.augment = cfg.data.augment
        self.train_classes = np.asarray(data.split.train_classes)
        ranks = np.arange(1, len(self.train_classes) + 1, dtype=np.float64)
        w = ranks ** -cfg.data.zipf_exponent
        self.weights = w / w.sum()
        seed = cfg.seed if seed is None else seed
        self.rng = np.random.default_rng(seed)
        torch.manual_seed(seed)
        self.model = build_model(cfg).to(self.device).train()
        self.optimizer = make_optimizer(self.model, cfg.optim, fused=False)  # torch.optim.AdamW as a user writes it
        self.steps_done = 0

    def sample_sequence(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One training sequence: (global class ids, labels, exemplar ids), each ``[9]``."""
        rng, n = self.rng, len(self.train_classes)
        if rng.random() < self.cfg.data.p_bursty:
            four = rng.choice(n, size=4, replace=False, p=self.weights)  # 2 burst + 2 distractors
            slots = rng.permutation(np.array([0, 0, 0, 1, 1, 1, 2, 3]))
            query = rng.integers(2)  # one of the two burst classes
            labels = np.append(four[slots], four[query])
        else:
            labels = rng.choice(n, size=SEQ_LEN, replace=True, p=self.weights)
        classes = self.train_classes[labels]
        exemplars = np.empty(SEQ_LEN, dtype=np.int64)
        for c in np.unique(classes):  # exemplars of one class are distinct
            where = np.flatnonzero(classes == c)
            exemplars[where] = rng.choice(N_DRAWERS, size=len(where), replace=False)
        return classes, labels, exemplars

    def sequence_images(self, classes: np.ndarray, exemplars: np.ndarray) -> np.ndarray:
        if not self.augment:
            return self.images[classes, exemplars]
        chars, variants = classes // N_VARIANTS, classes % N_VARIANTS
        return np.stack([transform(self.images[c, e], v) for c, e, v in zip(chars, exemplars, variants)])

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        b, s = self.cfg.train.batch_size, self.images.shape[-1]
        raw = np.empty((b, SEQ_LEN, s, s), dtype=np.uint8)
        labels = np.empty((b, SEQ_LEN), dtype=np.int64)
        for i in range(b):
            classes, labels[i], exemplars = self.sample_sequence()
            raw[i] = self.sequence_images(classes, exemplars)
        images = raw.astype(np.float32) / 255.0
        return torch.from_numpy(images).to(self.device), torch.from_numpy(labels).to(self.device)

    def step(self) -> float:
        """One training step; returns the loss (a host float, as one would log it)."""
        self.steps_done += 1
        set_lr(self.optimizer, lr_at(self.steps_done, self.cfg.optim, self.cfg.train.steps))
        images, labels = self.batch()
        with autocast(self.cfg, self.device):
            logits = self.model(images, labels)
        loss = F.cross_entropy(logits.float(), labels[:, CONTEXT_LEN])
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return loss.item()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Train the naive baseline for a few steps and print its rate.")
    p.add_argument("--config", default="tiny")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=50)
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    base = NaiveBaseline(cfg, args.device)
    base.step()  # warm-up
    t0 = time.perf_counter()
    losses = [base.step() for _ in range(args.steps)]
    dt = time.perf_counter() - t0
    print(f"{args.config}: {args.steps / dt:.2f} steps/s on {args.device}; loss {losses[0]:.3f} -> {losses[-1]:.3f}")


if __name__ == "__main__":
    main()
