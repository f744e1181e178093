"""AdamW with decoupled weight decay on weight matrices only, and the learning-rate schedules.

Decay applies to the ``weight`` of every ``nn.Linear`` and ``nn.Conv2d`` (the head included);
never to biases, LayerNorm/BatchNorm parameters or embedding tables: shrinking those
changes nothing about how much the model memorises, only its normalisation and offsets.
PyTorch's AdamW is decoupled (Loshchilov & Hutter): ``p -= lr * weight_decay * p``
separately from the Adam step, as in optax's ``adamw`` used by the reference code.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from icl.config import OptimConfig

DECAYED_MODULES = (nn.Linear, nn.Conv2d)


def decay_groups(model: nn.Module) -> tuple[list[str], list[str]]:
    """Names of the trainable parameters that are decayed, and of those that are not."""
    decayed = {
        f"{mod_name}.weight" if mod_name else "weight"
        for mod_name, module in model.named_modules()
        if isinstance(module, DECAYED_MODULES) and getattr(module, "weight", None) is not None
    }
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    return [n for n in names if n in decayed], [n for n in names if n not in decayed]


def make_optimizer(model: nn.Module, cfg: OptimConfig, fused: bool = True) -> torch.optim.AdamW:
    """AdamW over the two decay groups. ``fused``: PyTorch's fused implementation (CPU and
    CUDA), the same update in a few kernels instead of about nine per parameter tensor
    (``tests/train/test_optim.py`` holds it to the plain one within rounding); it reads no
    step counter on the host either."""
    params = dict(model.named_parameters())
    decay, no_decay = decay_groups(model)
    groups = [
        {"params": [params[n] for n in decay], "weight_decay": cfg.weight_decay},
        {"params": [params[n] for n in no_decay], "weight_decay": 0.0},
    ]
    device = next(iter(params.values())).device.type if params else "cpu"
    use_fused = fused and device in ("cpu", "cuda")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             fused=True if use_fused else None)


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


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
