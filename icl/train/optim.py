"""Weight decay (decoupled or coupled, on chosen modules), AdamW, and the learning-rate schedules.

**Which parameters decay.** The ``weight`` of every ``nn.Linear`` and ``nn.Conv2d`` in the
modules named by ``optim.decay_modules`` (any subset of ``embedder`` — the image embedder —,
``attn`` — every block's qkv and output projections —, ``mlp``, ``head`` — the output layer;
default all four); never biases, LayerNorm/BatchNorm parameters or embedding tables:
shrinking those changes nothing about how much the model memorises, only its normalisation
and offsets. Singh et al. 2023 report that decay on the MLPs (or the embedder) alone keeps ICL
from fading, and decay on attention alone does not; this is the knob that tests it.

**How they decay** (``optim.l2``):

- ``decoupled`` (default): PyTorch's AdamW (Loshchilov & Hutter), ``p -= lr * weight_decay * p``
  separately from the Adam step, as optax's ``adamw`` (the packed engine applies small decay
  exactly, where fp32 would round it away: :mod:`icl.train.adamw`).
- ``coupled``: the papers' "L2", a penalty ``weight_decay * sum_W ||W||_F`` (an *unsquared*
  Frobenius norm per weight tensor) added to the loss, whose gradient ``weight_decay * W / ||W||``
  then passes through Adam's moments (icl-dynamics ``main.compute_loss``: ``query_ce.mean() +
  weight_decay * weight_norm``, optimised by ``scale_by_adam``). Because Adam normalises the
  gradient, a coupled strength and a decoupled one are not comparable without calibration.
  :func:`l2_penalty` is the pure penalty (for a loss under ``functional_call``/``vmap``, with a
  per-model strength); :func:`make_optimizer` adds its gradient to the decayed parameters'
  gradients just before each step, which is the same update as adding it to the loss (the logged
  ``train_loss`` stays the cross-entropy alone).

**What they cover** (``optim.l2_scope``): ``weights`` (default) is the set above, for either
kind; ``all`` is every trainable array (the label table, LayerNorm and BatchNorm gains and
biases, every bias), as icl-dynamics sums ``||W||`` over all of ``params``: with ``coupled``, the
peers' penalty over this model's arrays. Under ``weights`` the label table, which the penalty
does not reach, keeps its norm; under ``all`` it shrinks as in their runs.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from icl.config import DECAY_MODULES, OptimConfig, decay_module_set

DECAYED_MODULES = (nn.Linear, nn.Conv2d)


def module_of(param_name: str) -> str | None:
    """The ``optim.decay_modules`` group a parameter belongs to (None: the label table,
    positions, final LayerNorm)."""
    parts = param_name.split(".")
    if parts[0] in ("embedder", "head"):
        return parts[0]
    if parts[0] == "blocks" and len(parts) > 2 and parts[2] in ("attn", "mlp"):
        return parts[2]
    return None


def decay_groups(model: nn.Module, cfg: OptimConfig | None = None) -> tuple[list[str], list[str]]:
    """Names of the trainable parameters that are decayed, and of those that are not: the
    Linear/Conv weights of ``cfg.decay_modules`` (all four modules without ``cfg``), or every
    one under ``optim.l2_scope: all``. The same set for decoupled and coupled decay."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if cfg is not None and cfg.l2_scope == "all":
        return names, []
    modules = set(decay_module_set(cfg.decay_modules)) if cfg is not None else set(DECAY_MODULES)
    decayed = {
        f"{mod_name}.weight" if mod_name else "weight"
        for mod_name, module in model.named_modules()
        if isinstance(module, DECAYED_MODULES) and getattr(module, "weight", None) is not None
    }

    def decays(name: str) -> bool:
        return name in decayed and module_of(name) in modules

    return [n for n in names if decays(n)], [n for n in names if not decays(n)]


def safe_norm(w: Tensor) -> Tensor:
    """``||w||_F`` with gradient ``w / ||w||``, and 0 (not NaN) for an all-zero tensor."""
    sq = (w * w).sum()
    return torch.where(sq > 0, sq.clamp_min(torch.finfo(w.dtype).tiny).sqrt(), torch.zeros_like(sq))


def l2_penalty(params: Mapping[str, Tensor], names: Iterable[str], strength: float | Tensor) -> Tensor:
    """The coupled penalty ``strength * sum_n ||params[n]||_F``. Pure (no in-place work, no host
    reads), so a packed loss can call it inside ``functional_call`` under ``vmap`` with a
    per-model ``strength``; its gradient is ``strength * W / ||W||`` per tensor."""
    return strength * torch.stack([safe_norm(params[n]) for n in names]).sum()


def add_l2_gradient(params: Sequence[Tensor], strength: float) -> None:
    """``p.grad += strength * p / ||p||`` for every parameter with a gradient: the gradient of
    :func:`l2_penalty`, added in a few multi-tensor kernels (no host synchronisation)."""
    with torch.no_grad():
        live = [p for p in params if p.grad is not None]
        if not live:
            return
        norms = torch._foreach_clamp_min(torch._foreach_norm(live), torch.finfo(live[0].dtype).tiny)
        torch._foreach_add_([p.grad for p in live], torch._foreach_div(live, norms), alpha=strength)


def make_optimizer(model: nn.Module, cfg: OptimConfig, fused: bool = True) -> torch.optim.AdamW:
    """AdamW over the two decay groups. ``fused``: PyTorch's fused implementation (CPU and
    CUDA), the same update in a few kernels instead of about nine per parameter tensor
    (``tests/train/test_optim.py`` holds it to the plain one within rounding); it reads no
    step counter on the host either. With ``optim.l2: coupled`` no decoupled decay is applied;
    a step pre-hook adds the penalty's gradient instead (see the module docstring)."""
    params = dict(model.named_parameters())
    decay, no_decay = decay_groups(model, cfg)
    coupled = cfg.l2 == "coupled"
    groups = [
        {"params": [params[n] for n in decay], "weight_decay": 0.0 if coupled else cfg.weight_decay},
        {"params": [params[n] for n in no_decay], "weight_decay": 0.0},
    ]
    device = next(iter(params.values())).device.type if params else "cpu"
    use_fused = fused and device in ("cpu", "cuda")
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                            fused=True if use_fused else None)
    if coupled and cfg.weight_decay > 0:
        decayed = [params[n] for n in decay]
        opt.register_step_pre_hook(lambda _opt, _args, _kwargs: add_l2_gradient(decayed, cfg.weight_decay))
    return opt


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
