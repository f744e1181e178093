"""The learning-rate schedule and what it means for weight decay, without torch.

Torch-free on purpose: the analysis, the sweep's dry run and the live table report each cell's
*effective* decay, and none of them should import torch to do so.

Decoupled AdamW shrinks a decayed weight by ``(1 - lr_t * wd)`` per update, so the strength
of weight decay over a run is ``wd * sum_t lr_t``, not ``wd`` alone: the same ``wd`` means
little on a short or low-learning-rate schedule. :func:`shrink_factor` is the total factor,
``exp(-wd * sum_t lr_t)``, that a weight with no gradient ends at.
"""

from __future__ import annotations

import functools
import math

from icl.config import Config, OptimConfig


def lr_at(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Learning rate for update number ``step`` (1-based): linear warmup to ``lr`` over
    ``warmup_steps``, then inverse square root (the reference), constant, or cosine to 0."""
    warmup = cfg.warmup_steps
    if warmup > 0 and step <= warmup:
        return cfg.lr * step / warmup
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "inverse_sqrt":
        return cfg.lr * math.sqrt(max(warmup, 1) / step)
    if cfg.schedule == "cosine":
        progress = (step - warmup) / max(total_steps - warmup, 1)
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    raise ValueError(f"unknown schedule {cfg.schedule!r}")


def lr_sum(cfg: OptimConfig, total_steps: int, upto: int | None = None) -> float:
    """``sum_t lr_t`` over updates ``1..upto`` (default: the whole run of ``total_steps``)."""
    return _lr_sum(cfg.lr, cfg.schedule, cfg.warmup_steps, total_steps, total_steps if upto is None else upto)


@functools.lru_cache(maxsize=256)
def _lr_sum(lr: float, schedule: str, warmup: int, total_steps: int, upto: int) -> float:
    cfg = OptimConfig(lr=lr, schedule=schedule, warmup_steps=warmup)
    return math.fsum(lr_at(t, cfg, total_steps) for t in range(1, upto + 1))


def decay_exponent(cfg: Config, upto: int | None = None) -> float:
    """``wd * sum_t lr_t``: how many e-folds decoupled decay shrinks a weight by over the run
    (0 without decay; NaN under ``optim.l2: coupled``, whose pull depends on the weights)."""
    if cfg.optim.weight_decay == 0 or cfg.optim.decay_modules == "none":
        return 0.0
    if cfg.optim.l2 == "coupled":
        return math.nan
    return cfg.optim.weight_decay * lr_sum(cfg.optim, cfg.train.steps, upto)


def shrink_factor(cfg: Config, upto: int | None = None) -> float:
    """The total factor ``exp(-wd * sum_t lr_t)`` decoupled decay scales a weight by (1 = none)."""
    return math.exp(-decay_exponent(cfg, upto))


def shrink_text(cfg: Config) -> str:
    """The total shrink factor, short: ``e^-0.25`` (the exponent to two significant digits),
    ``1`` without decay, ``coupled`` under coupled L2 (no fixed factor)."""
    x = decay_exponent(cfg)
    if math.isnan(x):
        return "coupled"
    if x == 0:
        return "1"
    return f"e^-{x:.0f}" if x >= 10 else f"e^-{x:.2g}"
