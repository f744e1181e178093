"""AdamW for a pack: one update over the ``[K, N]`` parameter stack, a weight decay per model.

The update of ``torch.optim.AdamW`` (tests/train/test_packed.py holds it to torch's), with the
decoupled decay of each model applied to exactly its decayed columns, or, under
``optim.l2: coupled``, the penalty's gradient added per model; its per-step scalars live in a
device table, so a captured CUDA graph can read them.

**Small decay, exactly.** torch's AdamW shrinks a weight by ``p *= 1 - lr_t * wd``. In fp32 the
factor ``1 - lr_t * wd`` is rounded to a multiple of 2^-24 first, so for ``lr_t * wd`` below
2^-25 it is exactly 1 and the step's decay is lost, and for a few times that it is off by a
large part of itself: on a long inverse-square-root schedule most of a weak decay never
happens (the README's weight-decay section has the figures). Here each step subtracts the
decay itself, ``p * (lr_t * wd)`` (a small number, accurate to fp32's relative precision),
with compensated (Kahan) summation (:func:`decay_`): a buffer ``compensation`` (one number per
decayed column) carries what rounding ``p - p * lr_t * wd`` to the weight's precision dropped,
and the next step subtracts it too. Over a run a weight without gradient thus ends at
``prod_t (1 - lr_t * wd)`` (about ``exp(-wd * sum lr_t)``, :mod:`icl.schedule`) to within a
rounding of the weight, however small each step's share. The Adam step is applied as torch
applies it.

**Its state** (:meth:`PackedAdamW.state_dict`, :meth:`PackedAdamW.load_state_dict`): model
``k``'s moments in the format of ``torch.optim.AdamW.state_dict()`` (parameters numbered over
the two groups of :func:`icl.train.optim.make_optimizer`, decayed first; each group's
hyperparameters as torch writes them), so a checkpoint loads into a plain torch AdamW and
does not depend on the pack it came from. The compensation of a model that decays is part of
its decayed tensors' states (``decay_compensation``, beside ``exp_avg``; torch's AdamW keeps
the key through ``load_state_dict`` and ignores it); a checkpoint without it resumes from zero.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from icl.config import Config
from icl.errors import UserError
from icl.schedule import lr_at

# In a model's AdamW state (beside exp_avg), for its decayed tensors: what rounding has left of
# their decoupled decay (decay_); absent from checkpoints made before it: zero.
COMPENSATION = "decay_compensation"
# A torch.optim.AdamW param group's settings besides lr, betas, eps and weight_decay, as torch
# 2.14's fused AdamW writes them (the optimiser checkpoints held before PackedAdamW wrote its own)
TORCH_GROUP = {"amsgrad": False, "maximize": False, "foreach": None, "capturable": False, "differentiable": False,
               "fused": True, "decoupled_weight_decay": True}
Moments = tuple[Tensor, Tensor, "Tensor | None"]  # one model's exp_avg, exp_avg_sq [N], compensation [n_decay]


class PackedAdamW:
    """``torch.optim.AdamW`` (non-amsgrad, non-maximize) for a ``[K, N]`` parameter tensor
    whose first ``n_decay`` columns form the decay group, with one weight decay per row.

    Per update ``t`` (1-based), in the order of torch's single-tensor AdamW::

        p[:, :n_decay] -= p * (lr_t * wd_k)        (decay group only, compensated: :func:`decay_`)
        m = lerp(m, g, 1 - beta1);  v = v * beta2 + (1 - beta2) g^2
        p += (-lr_t / (1 - beta1^t)) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

    The per-step scalars are computed in float64 on the host, as torch does with Python
    floats, for a whole range of updates at once (:meth:`schedule`); the per-model decay
    rates go to the device in one copy, so an update never synchronises.

    The scalars of a range live in ``table`` (``[rows, 2 + K]`` on the device: ``-step_size,
    sqrt(1 - beta2^t)``, the K decay rates ``lr_t * wd_k``), a buffer that stays where it is,
    so a captured CUDA graph can read row ``i`` through a device index (:meth:`step_at`).

    Eager (:meth:`step`), the update runs over column chunks of ``CHUNK_ELEMENTS`` columns x K
    per buffer (on the CPU all seven element-wise passes over a chunk then stay in cache, where
    whole-buffer passes would each go to memory) with the shared scalars as Python numbers; on
    CUDA it is one chunk. :meth:`step_at` and ``compiled`` (``torch.compile``) run
    one function of device tensors only (:func:`adam_update`).
    """

    CHUNK_ELEMENTS = 1 << 18
    MIN_ROWS = 8  # of the scalar table (a CUDA graph's warm-up reads a few rows past a short range)

    def __init__(self, flat: Tensor, n_decay: int, cfgs: Sequence[Config], chunk_elements: int | None = None,
                 decay_slots: Sequence[tuple[int, int]] = (), slots: Sequence[Any] = (),
                 groups: tuple[Sequence[str], Sequence[str]] = ((), ())):
        self.flat = flat
        self.n_decay = n_decay
        # for the state in torch's format: each tensor's columns (name, shape, start, stop) and
        # torch's two groups by name (icl.train.stack.PackedModels.slots and .groups)
        self.slots = list(slots)
        self.groups = (list(groups[0]), list(groups[1]))
        o = cfgs[0].optim
        self.optim = o
        self.total_steps = cfgs[0].train.steps
        self.beta1, self.beta2, self.eps = o.beta1, o.beta2, o.eps
        # optim.l2 is shared by a pack: decoupled decay shrinks the weights (the table's rates),
        # coupled decay adds the penalty's gradient instead (:meth:`add_l2_gradient`)
        self.coupled = o.l2 == "coupled"
        strengths = [c.optim.weight_decay for c in cfgs]
        self.weight_decay = [0.0] * len(cfgs) if self.coupled else strengths
        self.decays = any(wd != 0 for wd in self.weight_decay)
        self.l2_strength = torch.tensor(strengths, dtype=flat.dtype, device=flat.device)[:, None]
        # for the coupled gradient: which decayed tensor each decayed column belongs to
        self.n_l2 = len(decay_slots) if self.coupled and any(strengths) else 0
        self.slot_of = torch.cat([torch.full((b - a,), i, dtype=torch.long) for i, (a, b) in enumerate(decay_slots)]
                                 ).to(flat.device) if self.n_l2 else None
        self.exp_avg = torch.zeros_like(flat)
        self.exp_avg_sq = torch.zeros_like(flat)
        k, n = flat.shape
        # what rounding left of each decayed weight's decay, still to subtract (:func:`decay_`)
        self.compensation = flat.new_zeros(k, n_decay if self.decays else 0)
        chunk = chunk_elements or (k * n if flat.device.type == "cuda" else self.CHUNK_ELEMENTS)
        cols = max(1, chunk // k)
        self.chunks = [(a, min(a + cols, n)) for a in range(0, n, cols)]
        self.first = 1
        self.host: list[tuple[float, float]] = []
        rows = max(self.MIN_ROWS, cfgs[0].train.eval_every)  # the longest range the training loop asks for
        self.table = torch.zeros(rows, 2 + k, device=flat.device, dtype=flat.dtype)
        self.compiled: Callable | None = None

    @classmethod
    def over(cls, pack: Any, cfgs: Sequence[Config]) -> "PackedAdamW":
        """The optimiser of a :class:`~icl.train.stack.PackedModels` stack."""
        return cls(pack.flat, pack.n_decay, cfgs, decay_slots=pack.decay_slots, slots=pack.slots, groups=pack.groups)

    def single_pass(self) -> None:
        """Update the whole pack in one pass of each kernel, as on CUDA (on the CPU the update
        is cache-blocked into chunks): for counting the kernels a GPU step launches."""
        self.chunks = [(0, self.flat.shape[1])]

    def schedule(self, first: int, last: int) -> bool:
        """Precompute the scalars of updates ``first..last`` (1-based; one host->device copy) into
        ``table``; True if the table had to grow (it moved: a captured graph must be captured again)."""
        rows = []
        for t in range(first, last + 1):
            lr = lr_at(t, self.optim, self.total_steps)
            step_size = lr / (1 - self.beta1**t)
            bc2_sqrt = (1 - self.beta2**t) ** 0.5
            rows.append([-step_size, bc2_sqrt, *[lr * wd for wd in self.weight_decay]])
        self.host = [(r[0], r[1]) for r in rows]
        grew = len(rows) > self.table.shape[0]
        if grew:
            self.table = self.table.new_zeros(len(rows), self.table.shape[1])
        rows += [rows[-1]] * (self.table.shape[0] - len(rows))  # harmless rows past the range
        self.table.copy_(torch.tensor(rows, dtype=torch.float64).to(self.flat.dtype))
        self.first = first
        return grew

    @torch.no_grad()
    def step(self, t: int, grad: Tensor) -> None:
        """Update ``t`` (1-based; must lie in the scheduled range) with gradient ``[K, N]``."""
        i = t - self.first
        if not 0 <= i < len(self.host):
            raise RuntimeError(f"update {t} outside the scheduled range; call schedule() first")
        n_decay = self.n_decay if self.decays else 0
        self.add_l2_gradient(grad)
        if self.compiled is not None:
            self.compiled(self.flat, self.exp_avg, self.exp_avg_sq, grad, self.table[i], n_decay,
                          self.beta1, self.beta2, self.eps, self.compensation)
            return
        neg_step, bc2_sqrt = self.host[i]
        rate = self.table[i, 2:, None]
        b1, b2, eps = self.beta1, self.beta2, self.eps
        for a, b in self.chunks:
            p, m, v, g = self.flat[:, a:b], self.exp_avg[:, a:b], self.exp_avg_sq[:, a:b], grad[:, a:b]
            if a < n_decay:
                c = min(b, n_decay) - a
                decay_(p[:, :c], self.compensation[:, a : a + c], rate)
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (v.sqrt() / bc2_sqrt).add_(eps)
            p.addcdiv_(m, denom, value=neg_step)

    @torch.no_grad()
    def add_l2_gradient(self, grad: Tensor) -> None:
        """``optim.l2: coupled``: add the gradient of ``weight_decay_k * sum_W ||W||_F`` over the
        decayed tensors (:func:`icl.train.optim.l2_penalty`), ``wd_k * W / ||W||``, to each model's
        gradient: a few kernels for the whole pack (norms by a segment sum over the columns),
        none on the host. Nothing to do under decoupled decay."""
        if not self.n_l2:
            return
        w = self.flat[:, : self.n_decay]
        sums = w.new_zeros(w.shape[0], self.n_l2).index_add_(1, self.slot_of, w * w)
        norms = sums.clamp_min(torch.finfo(w.dtype).tiny).sqrt()  # an all-zero tensor: gradient 0
        grad[:, : self.n_decay].add_(self.l2_strength * w / norms[:, self.slot_of])

    @torch.no_grad()
    def step_at(self, index: Tensor, grad: Tensor) -> None:
        """The update of table row ``index`` (a ``[1]`` int64 device tensor): nothing read on the
        host, so a CUDA graph can capture it."""
        n_decay = self.n_decay if self.decays else 0
        self.add_l2_gradient(grad)
        update = self.compiled or adam_update
        update(self.flat, self.exp_avg, self.exp_avg_sq, grad, self.table.index_select(0, index)[0], n_decay,
               self.beta1, self.beta2, self.eps, self.compensation)


    # ------------------------------------------------------------------ per-model state

    def state_dict(self, k: int, t: int) -> dict[str, Any]:
        """Model ``k``'s state after update ``t`` as ``torch.optim.AdamW.state_dict()`` has it for
        the optimiser :func:`icl.train.optim.make_optimizer` builds (learning rate of step ``t``),
        the decayed tensors' states also holding their ``decay_compensation`` when the model
        decays (decoupled, ``weight_decay > 0``)."""
        decay, rest = self.groups
        index = {name: i for i, name in enumerate([*decay, *rest])}
        compensated = self.weight_decay[k] != 0
        state: dict[int, dict[str, Tensor]] = {}
        for s in self.slots:
            entry = {
                "step": torch.tensor(float(t)),
                "exp_avg": self.exp_avg[k, s.start : s.stop].view(s.shape).clone(),
                "exp_avg_sq": self.exp_avg_sq[k, s.start : s.stop].view(s.shape).clone(),
            }
            if compensated and s.stop <= self.n_decay:
                entry[COMPENSATION] = self.compensation[k, s.start : s.stop].view(s.shape).clone()
            state[index[s.name]] = entry
        lr = lr_at(max(t, 1), self.optim, self.total_steps)
        o = self.optim

        def group(weight_decay: float, ids: range) -> dict[str, Any]:
            return {"weight_decay": weight_decay, "lr": lr, "betas": (o.beta1, o.beta2), "eps": o.eps, **TORCH_GROUP,
                    "params": list(ids)}

        return {"state": state, "param_groups": [group(self.weight_decay[k], range(len(decay))),
                                                 group(0.0, range(len(decay), len(decay) + len(rest)))]}

    @torch.no_grad()
    def load_state_dict(self, k: int, state: dict[str, Any], t: int) -> None:
        """Model ``k``'s moments and decay compensation after update ``t`` from a
        ``torch.optim.AdamW`` ``state_dict`` (:meth:`state_dict`'s, or one of the same two
        groups); a tensor without state starts from zero, as in a fresh AdamW. ValueError if the
        state is not one of this model's, UserError if it is of another step."""
        decay, rest = self.groups
        groups, saved = state.get("param_groups"), state.get("state")
        sizes = [len(g["params"]) if isinstance(g, dict) and isinstance(g.get("params"), list) else None
                 for g in groups or ()] if isinstance(groups, list) else None
        if sizes != [len(decay), len(rest)] or not isinstance(saved, dict):
            raise ValueError(f"optimiser state has parameter groups of {sizes} tensors, not {[len(decay), len(rest)]}")
        saved_id = dict(zip([*decay, *rest], [*groups[0]["params"], *groups[1]["params"]]))
        for s in self.slots:
            entry = saved.get(saved_id[s.name])
            rows = (self.exp_avg[k, s.start : s.stop], self.exp_avg_sq[k, s.start : s.stop])
            kept = self.compensation[k, s.start : s.stop] if s.stop <= self.compensation.shape[1] else None
            if not entry:  # never updated (t == 0)
                for row in (*rows, *([kept] if kept is not None else [])):
                    row.zero_()
                continue
            step = _step(entry)
            if step != t:
                raise UserError(f"checkpoint optimiser state of {s.name} is at step {step}, not {t}")
            for row, key in zip(rows, ("exp_avg", "exp_avg_sq")):
                row.copy_(_flat(entry.get(key), s, key))
            if kept is not None:  # a checkpoint without it: zero
                c = entry.get(COMPENSATION)
                kept.copy_(0 if c is None else _flat(c, s, COMPENSATION))

    def moments(self, k: int) -> Moments:
        """Model ``k``'s moments and compensation (copies): what it carries to another pack in
        memory (:meth:`set_moments`), the same numbers as a checkpoint's round trip."""
        comp = self.compensation[k].clone() if self.compensation.shape[1] else None
        return self.exp_avg[k].clone(), self.exp_avg_sq[k].clone(), comp

    @torch.no_grad()
    def set_moments(self, k: int, moments: Moments) -> None:
        exp_avg, exp_avg_sq, comp = moments
        self.exp_avg[k] = exp_avg
        self.exp_avg_sq[k] = exp_avg_sq
        if self.compensation.shape[1]:  # none carried: its pack did not decay, nor did it
            self.compensation[k] = 0 if comp is None else comp


def _step(entry: Any) -> int | None:
    """The step a saved tensor state is at (None: it says none)."""
    try:
        return int(entry["step"])
    except (TypeError, KeyError, ValueError, RuntimeError):
        return None


def _flat(value: Any, slot: Any, key: str) -> Tensor:
    """A saved state tensor of ``slot``, flattened; ValueError if it is not one of its shape."""
    if not isinstance(value, Tensor) or value.numel() != slot.stop - slot.start:
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"optimiser state {key} of {slot.name} is {shape}, not of shape {tuple(slot.shape)}")
    return value.reshape(-1)


def decay_(p: Tensor, compensation: Tensor, rate: Tensor) -> None:
    """``p -= p * rate`` (``rate = lr_t * wd``, ``[K, 1]``), compensated: ``compensation`` (as
    ``p``) holds what earlier steps' rounding left to subtract and is updated in place.

    Kahan summation of the decrements: ``y`` = this step's decrement plus the leftover;
    ``s = p - y`` rounded to ``p``'s precision; ``(s - p) + y`` is then exactly what the rounding
    left out (``s - p`` is exact while ``y`` is small against ``p``), carried to the next step.
    A row with rate 0 leaves its weights and zero compensation exactly as they are. Five
    element-wise kernels, no host scalar: capturable in a CUDA graph. Run it under
    ``torch.no_grad()`` (the updates do)."""
    y = torch.addcmul(compensation, p, rate)
    s = p - y
    torch.sub(s, p, out=compensation).add_(y)
    p.copy_(s)


@torch.no_grad()
def adam_update(p: Tensor, m: Tensor, v: Tensor, g: Tensor, row: Tensor, n_decay: int,
                beta1: float, beta2: float, eps: float, compensation: Tensor) -> None:
    """:class:`PackedAdamW`'s update with the per-step scalars as a device tensor ``row``
    (``-step_size, sqrt(1 - beta2^t), decay rates [K]``): for ``torch.compile``/CUDA graphs."""
    if n_decay:
        decay_(p[:, :n_decay], compensation, row[2:, None])
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    denom = (v.sqrt() / row[1]).add_(eps)
    p.add_(m.mul(row[0]).div_(denom))  # = p.addcdiv_(m, denom, value=-step_size)
