"""The stack of a pack: K models of one architecture as one ``[K, N]`` parameter tensor.

Every run is a pack (``icl.train.train`` is a pack of one). The study's model is tiny
(width 64, 17 tokens, batch 32): one model leaves a GPU almost idle, launching small kernels.
A seeds x weight-decay grid is made of models with identical shapes, so K of them share
every kernel: their parameters are stacked along a leading ``K`` axis and the ordinary
:class:`~icl.model.SequenceModel` runs on all of them at once through
``torch.func.functional_call`` under ``torch.vmap`` (a batched matmul per linear layer, a
grouped convolution per conv layer, instead of K of each).

Each model keeps everything that makes it *its own run*:

- **init**: model ``k`` starts from :func:`initial_model` (seeded by its own config), then
  is copied into the stack;
- **BatchNorm** (the ResNet embedder): batch statistics per model (vmap's batch-norm rule
  normalises each model's slice of the batch on its own) and running statistics per model,
  updated in place in a stacked ``[K, C]`` buffer exactly as ``nn.BatchNorm2d`` updates its own;
- **state**: model ``k``'s parameters and buffers *are* views into the stack, so
  ``models[k]`` is a working ``SequenceModel`` (for evaluation, ``state_dict``,
  ``load_state_dict``): a checkpoint does not depend on the pack it came from.

Its data, the step and the optimiser are :mod:`icl.train.step`'s and :mod:`icl.train.adamw`'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from icl.config import Config
from icl.model import SequenceModel, build_model
from icl.train.optim import decay_groups
from icl.train.precision import LowPrecisionCopies, autocast_weights, low_precision_buffers, param_dtype


def initial_model(cfg: Config, device: torch.device | str = "cpu") -> SequenceModel:
    """The model run ``cfg`` starts from, seeded by ``cfg.seed`` alone: a run starts from the
    same weights whatever pack (or benchmark) it is trained in."""
    torch.manual_seed(cfg.seed)
    return build_model(cfg).to(device, param_dtype(cfg))


def batched_forward(cfg: Config, device: torch.device, k: int) -> bool:
    """``train.pack_forward``: ``vmap`` (batched) or ``loop`` (each model on its own); ``auto``
    batches a pack of several models on a GPU, where one set of kernels for the whole pack
    saves launches, and loops elsewhere: on the CPU there are no launches to save, and a model
    alone runs in fewer kernels as itself (fused attention, one BatchNorm kernel per layer;
    benchmarks/README.md counts them)."""
    mode = cfg.train.pack_forward
    return mode == "vmap" or (mode == "auto" and device.type == "cuda" and k > 1)


@dataclass(frozen=True)
class Slot:
    """One parameter tensor's columns in the ``[K, N]`` stack."""

    name: str
    shape: torch.Size
    start: int
    stop: int


class PackedModels:
    """K models of one architecture as one ``[K, N]`` parameter tensor and stacked buffers.

    After construction every model's parameters and buffers are views into the stack, so
    ``models[k]`` holds model ``k``'s live weights. Columns: decayed parameters first
    (``[0, n_decay)``), then the other parameters bf16 autocast would cast, then the rest
    (norms, embedding tables); under ``optim.l2_scope: all`` every column decays, and the
    castable ones still come first. ``groups`` names the parameters of torch's two AdamW
    groups (decayed, not), in the order a ``torch.optim.AdamW`` ``state_dict`` numbers them.

    :meth:`logits` runs the K models in one of two ways, with the same numbers:

    - ``batched`` (the GPU's): the weightless template under ``torch.func.functional_call``
      and ``torch.vmap`` over stacked parameter views: one set of kernels for the pack (a
      batched matmul per linear layer, a grouped convolution per conv layer, BatchNorm over
      ``K x C`` channels, so statistics stay per model);
    - not batched (the CPU's): each model's own module, one after the other. Without kernel
      launches to amortise, vmap's batching rules cost more than they save on the CPU
      (benchmarks/README.md has the ratio).

    With ``low_precision`` (bf16 training) the forward reads the castable columns and constant
    matmul buffers from bf16 copies (:class:`~icl.train.precision.LowPrecisionCopies`, ``low``).
    """

    def __init__(self, models: list[SequenceModel], cfg: Config, *, batched: bool = True,
                 low_precision: bool = False):
        self.models = models
        self.k = len(models)
        self.batched = batched
        model = models[0]
        first = next(model.parameters())
        decay, no_decay = decay_groups(model, cfg.optim)
        self.groups = (decay, no_decay)
        castable = autocast_weights(model)
        # decayed columns first, castable ones first: the decayed set is either within the castable
        # one (optim.l2_scope: weights) or everything (all), so both are leading column ranges
        order = ([n for n in decay if n in castable] + [n for n in no_decay if n in castable]
                 + [n for n in decay if n not in castable] + [n for n in no_decay if n not in castable])
        assert order[: len(decay)] == [n for n in order if n in decay], "decayed columns must lead"
        params = dict(model.named_parameters())
        slots, col = [], 0
        for name in order:
            n = params[name].numel()
            slots.append(Slot(name, params[name].shape, col, col + n))
            col += n
        self.slots = slots
        self.n_decay = sum(s.stop - s.start for s in slots[: len(decay)])
        self.decay_slots = [(s.start, s.stop) for s in slots[: len(decay)]]
        self.flat = torch.empty(self.k, col, device=first.device, dtype=first.dtype)
        with torch.no_grad():
            for k, m in enumerate(models):
                mp = dict(m.named_parameters())
                for s in slots:
                    self.flat[k, s.start : s.stop] = mp[s.name].detach().reshape(-1)
                    mp[s.name].data = self.flat[k, s.start : s.stop].view(s.shape)
        # Stacked leaves for the batched forward: views of the same storage.
        self.params: dict[str, Tensor] = {
            s.name: self.flat[:, s.start : s.stop].view(self.k, *s.shape).requires_grad_(True) for s in slots
        }
        # Buffers (BatchNorm running statistics, positions, a frozen projection) stacked the
        # same way; each model's buffer is its row, so in-place updates land in the stack.
        self.buffers: dict[str, Tensor] = {}
        for name, _ in model.named_buffers():
            stacked = torch.stack([dict(m.named_buffers())[name] for m in models])
            self.buffers[name] = stacked
            owner, _, leaf = name.rpartition(".")
            for k, m in enumerate(models):
                setattr(m.get_submodule(owner) if owner else m, leaf, stacked[k])
        # the castable columns lead: their slots are the first n_cast_slots
        self.n_cast_slots = sum(1 for s in slots if s.name in castable) if low_precision else 0
        self.n_cast = slots[self.n_cast_slots - 1].stop if self.n_cast_slots else 0
        self.low = LowPrecisionCopies(self.flat, self.n_cast, [(s.name, s.shape, s.start, s.stop)
                                                               for s in slots[: self.n_cast_slots]],
                                      self.buffers, low_precision_buffers(model)) if low_precision else None
        # What the forward reads: the fp32 leaves and buffers, or their bf16 copies where there are any.
        self.inputs = {**self.params, **(self.low.stacked if self.low else {})}
        self.forward_buffers = {**self.buffers, **(self.low.buffer_copies if self.low else {})}
        # model by model, model k runs its own module with its bf16 copies swapped in
        self.swaps: list[dict[str, Tensor]] = self.low.per_model if self.low else [{} for _ in models]
        # what gradients are taken with respect to: stacked views, or each model's own tensors
        if batched:
            self.leaves = [self.inputs[s.name] for s in slots]
        else:  # model by model: [model 0's tensors in slot order, model 1's, ...]
            self.leaves = [self.swaps[k].get(s.name, dict(m.named_parameters())[s.name])
                           for k, m in enumerate(models) for s in slots]
        with torch.device("meta"):  # a weightless template for functional_call
            self.template = build_model(cfg)
        self.template.train()

    def refresh(self) -> None:
        """Bring the bf16 copy of the castable weights up to date (one kernel; none in fp32)."""
        if self.low is not None:
            self.low.refresh()

    def model_logits(self, k: int, images: Tensor, labels: Tensor) -> Tensor:
        """Model ``k`` alone on its batch (``[B, 9, S, S]``, ``[B, 9]``): its own module, with
        its bf16 copies swapped in when there are any."""
        if self.swaps[k]:
            return torch.func.functional_call(self.models[k], self.swaps[k], (images, labels), strict=False)
        return self.models[k](images, labels)

    def logits(self, images: Tensor, labels: Tensor) -> Tensor:
        """``images [K, B, 9, S, S]``, ``labels [K, B, 9]`` -> logits ``[K, B, vocab]``, batched."""

        def model(p, b, x, y):
            return torch.func.functional_call(self.template, (p, b), (x, y))

        # The math backend: it batches natively under vmap (forward and backward); the fused
        # kernels have no batching rule and would run the K models one after another.
        with sdpa_kernel(SDPBackend.MATH):
            return torch.vmap(model)(self.inputs, self.forward_buffers, images, labels)

    def grads_flat(self, grads: Sequence[Tensor]) -> Tensor:
        """Gradients in the order of ``leaves`` -> one ``[K, N]`` tensor in the parameters' dtype."""
        if self.batched:
            return self._join([g.reshape(self.k, -1) for g in grads])
        n = len(self.slots)  # model k's gradients are grads[k * n : (k + 1) * n]
        return torch.cat([self._join([g.reshape(1, -1) for g in grads[k * n : (k + 1) * n]]) for k in range(self.k)])

    def _join(self, parts: Sequence[Tensor]) -> Tensor:
        """Slot-ordered ``[rows, n_slot]`` gradients -> ``[rows, N]``: the bf16 ones of the castable
        columns are joined first and widened in one kernel (a concatenation of mixed dtypes would
        cast them one by one)."""
        c = self.n_cast_slots
        if not c:
            return torch.cat(parts, dim=1)
        return torch.cat([torch.cat(parts[:c], dim=1).to(self.flat.dtype), *parts[c:]], dim=1)

    def state_dict(self, k: int) -> dict[str, Tensor]:
        """Model ``k``'s ``state_dict``, detached from the stack (a checkpoint must not hold
        the other models' weights)."""
        return {n: t.detach().clone() for n, t in self.models[k].state_dict().items()}

    def load_state_dict(self, k: int, state: dict[str, Tensor]) -> None:
        """Model ``k``'s weights and buffers from a ``state_dict`` (copied into the stack's views;
        the bf16 copies of constants follow, the castable weights' at the next step)."""
        self.models[k].load_state_dict(state)
        if self.low is not None:
            self.low.refresh_constants()
