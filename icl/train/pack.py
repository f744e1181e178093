"""A pack: K models of one architecture trained as one, one step at a time.

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
- **data**: ``StudyData.train_batch(step)`` of its own seed, a pure function of (seed,
  step); the pack makes all K batches in one call (``train_batch(step, seeds=[...])``);
- **BatchNorm** (the ResNet embedder): batch statistics per model (vmap's batch-norm rule
  normalises each model's slice of the batch on its own) and running statistics per model,
  updated in place in a stacked ``[K, C]`` buffer exactly as ``nn.BatchNorm2d`` updates its own;
- **optimiser**: AdamW for stacked parameters (:class:`~icl.train.adamw.PackedAdamW`): the update of
  ``torch.optim.AdamW`` with one weight decay per model, on exactly the decay group of
  :func:`icl.train.optim.decay_groups`;
- **state**: model ``k``'s parameters and buffers *are* views into the stack, so
  ``models[k]`` is a working ``SequenceModel`` (for evaluation, ``state_dict``,
  ``load_state_dict``), and its optimiser state converts to and from a plain
  ``torch.optim.AdamW`` ``state_dict`` (plus the compensation of its small decay, see
  :mod:`icl.train.adamw`): a checkpoint does not depend on the pack it came from.

Layout. All parameters of the pack live in one ``[K, N]`` tensor (model ``k``'s parameters
are row ``k``, decayed ones first), gradients are concatenated into one ``[K, N]`` tensor,
and the AdamW update is a handful of element-wise kernels over whole ``[K, N]`` buffers,
whatever the number of layers. A step never synchronises with the device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from icl.config import Config, flatten
from icl.data import StudyData
from icl.errors import UserError
from icl.model import SequenceModel, build_model
from icl.train.adamw import PackedAdamW, adam_update
from icl.train.evaluate import autocast, mixed_precision, param_dtype
from icl.schedule import lr_at
from icl.train.optim import decay_groups, make_optimizer, set_lr

# Keys in which the models of one pack may differ; every other config key must be equal.
PER_MODEL_KEYS = ("seed", "optim.weight_decay")
# In a model's AdamW state (beside exp_avg), for its decayed tensors: what rounding has left of
# their decoupled decay (icl.train.adamw.decay_); absent from checkpoints made before it: zero.
COMPENSATION = "decay_compensation"


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
    the 12-layer step: 493 kernels against vmap's 1,090, the ResNet preset's 743 against 1,576)."""
    mode = cfg.train.pack_forward
    return mode == "vmap" or (mode == "auto" and device.type == "cuda" and k > 1)


def check_packable(cfgs: Sequence[Config]) -> None:
    """UserError unless ``cfgs`` can train as one pack: at least one config, all equal in
    every key but ``seed`` and ``optim.weight_decay``."""
    if not cfgs:
        raise UserError("a pack needs at least one config")
    first = flatten(cfgs[0].to_dict())
    for i, cfg in enumerate(cfgs[1:], start=1):
        other = flatten(cfg.to_dict())
        diff = [k for k in first if k not in PER_MODEL_KEYS and first[k] != other[k]]
        if diff:
            shown = "; ".join(f"{k}: {first[k]!r} in config 0, {other[k]!r} in config {i}" for k in diff[:4])
            raise UserError(
                f"configs of one pack may differ only in {' and '.join(PER_MODEL_KEYS)}; they differ in "
                f"{shown}: pack them separately"
            )


def data_for(cfg: Config, shared: StudyData) -> StudyData:
    """Model ``cfg``'s data (its own training stream) over the pack's one copy of the images,
    class split and evaluation sets (equal for every model of a pack)."""
    data = StudyData(cfg, shared.source, shared.split, shared.bank)
    for name in ("train_classes", "class_dist", "eval_sets"):  # equal for every model of a pack
        data.__dict__[name] = getattr(shared, name)
    return data


# --------------------------------------------------------------------------- the stack


@dataclass(frozen=True)
class Slot:
    name: str
    shape: torch.Size
    start: int  # column range in the [K, N] buffers
    stop: int


def autocast_weights(model: nn.Module) -> set[str]:
    """The parameters bf16 autocast casts at every use: those of Linear and Conv layers."""
    return {
        f"{mod_name}.{name}" if mod_name else name
        for mod_name, module in model.named_modules() if isinstance(module, (nn.Linear, nn.Conv2d))
        for name, _ in module.named_parameters(recurse=False)
    }


class PackedModels:
    """K models of one architecture as one ``[K, N]`` parameter tensor and stacked buffers.

    After construction every model's parameters and buffers are views into the stack, so
    ``models[k]`` holds model ``k``'s live weights. Columns: decayed parameters first
    (``[0, n_decay)``), then the other parameters bf16 autocast would cast, then the rest
    (norms, embedding tables); under ``optim.l2_scope: all`` every column decays, and the
    castable ones still come first.

    :meth:`logits` runs the K models in one of two ways, with the same numbers:

    - ``batched`` (the GPU's): the weightless template under ``torch.func.functional_call``
      and ``torch.vmap`` over stacked parameter views: one set of kernels for the pack (a
      batched matmul per linear layer, a grouped convolution per conv layer, BatchNorm over
      ``K x C`` channels, so statistics stay per model);
    - not batched (the CPU's): each model's own module, one after the other. Without kernel
      launches to amortise, vmap's batching rules cost more than they save on the CPU (the
      ResNet at K = 3: 0.55x the per-model rate of a loop, benchmarks/README.md).

    With ``low_precision`` (bf16 training) the forward reads the castable columns
    from a bf16 copy, ``shadow``, refreshed from the fp32 weights in one kernel per step
    (:meth:`refresh`), and constant matmul buffers (the frozen projection) from bf16 copies
    made at construction and renewed only when weights are loaded (:meth:`refresh_constants`):
    autocast then finds its operands in bf16 already and casts no weight, where it would
    launch a cast per weight per step. The numbers are autocast's: the same rounding of
    the same fp32 weights, and their gradients come back in bf16 as autocast's cast returns them.
    """

    def __init__(self, models: list[SequenceModel], cfg: Config, *, batched: bool = True,
                 low_precision: torch.dtype | None = None):
        self.models = models
        self.k = len(models)
        self.batched = batched
        model = models[0]
        first = next(model.parameters())
        decay, no_decay = decay_groups(model, cfg.optim)
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
        self.n_cast = sum(s.stop - s.start for s in slots if s.name in castable) if low_precision else 0
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
        # What the forward reads: the fp32 leaves, or bf16 ones for the castable columns.
        self.shadow = self.flat.new_empty(self.k, self.n_cast, dtype=low_precision or self.flat.dtype)
        self.inputs = dict(self.params)
        self.forward_buffers = dict(self.buffers)
        self.n_cast_slots = sum(1 for s in slots if s.stop <= self.n_cast)
        # Model by model, model k runs its own module with its bf16 copies swapped in (``swaps[k]``).
        self.swaps: list[dict[str, Tensor]] = [{} for _ in models]
        self.low_buffers: list[str] = []  # constant buffers with a bf16 copy (refresh_constants)
        if low_precision:
            for s in slots[: self.n_cast_slots]:
                self.inputs[s.name] = self.shadow[:, s.start : s.stop].view(self.k, *s.shape).requires_grad_(True)
                for k in range(self.k):
                    self.swaps[k][s.name] = self.shadow[k, s.start : s.stop].view(s.shape).requires_grad_(True)
            for mod_name, module in model.named_modules():
                for leaf in getattr(module, "LOW_PRECISION_BUFFERS", ()):
                    name = f"{mod_name}.{leaf}" if mod_name else leaf
                    self.forward_buffers[name] = self.buffers[name].to(low_precision)
                    self.low_buffers.append(name)
                    for k in range(self.k):
                        self.swaps[k][name] = self.forward_buffers[name][k]
            self.refresh()
        # what gradients are taken with respect to: stacked views, or each model's own tensors
        if batched:
            self.leaves = [self.inputs[s.name] for s in slots]
        else:  # model by model: [model 0's tensors in slot order, model 1's, ...]
            self.leaves = [self.swaps[k].get(s.name, dict(m.named_parameters())[s.name])
                           for k, m in enumerate(models) for s in slots]
        with torch.device("meta"):  # a weightless template for functional_call
            self.template = build_model(cfg)
        self.template.train()

    @torch.no_grad()
    def refresh(self) -> None:
        """Bring the bf16 copy of the castable weights up to date (one kernel; none in fp32)."""
        if self.n_cast:
            self.shadow.copy_(self.flat[:, : self.n_cast])

    @torch.no_grad()
    def refresh_constants(self) -> None:
        """Bring the bf16 copies of constant buffers (the frozen projection) up to date: once
        made, they change only when weights are loaded into the pack, so never per step."""
        for name in self.low_buffers:
            self.forward_buffers[name].copy_(self.buffers[name])

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
        c = self.n_cast_slots if self.n_cast else 0
        if not c:
            return torch.cat(parts, dim=1)
        return torch.cat([torch.cat(parts[:c], dim=1).to(self.flat.dtype), *parts[c:]], dim=1)

    def state_dict(self, k: int) -> dict[str, Tensor]:
        """Model ``k``'s ``state_dict``, detached from the stack (a checkpoint must not hold
        the other models' weights)."""
        return {n: t.detach().clone() for n, t in self.models[k].state_dict().items()}


# --------------------------------------------------------------------------- the trainer


class PackedTrainer:
    """K models (already initialised) + their data + AdamW, trained one packed step at a time.

    :meth:`run` performs updates ``first..last`` (1-based; update ``t`` trains on batch
    ``t - 1`` of every model, as the training loop numbers them) and returns the per-model
    sums of loss and of correct answers, on the device, without synchronising.

    On CUDA (``train.cuda_graph``, the default) one whole step is captured once as a CUDA graph
    (:meth:`static_step`: sampling, rendering, forward, loss, backward, AdamW, the sums) and
    replayed for every update: one launch per step instead of ~1,000 kernels. Everything the
    step reads lives in fixed device buffers: the weights and optimiser moments, the step
    counter ``t_dev`` (the batch index), the row counter ``i_dev`` into AdamW's scalar table
    (the learning-rate schedule), the sums. Evaluation and checkpoints stay eager, between
    runs, reading and writing the same buffers. Elsewhere (the CPU, or ``cuda_graph: false``)
    :meth:`step` runs eagerly with the step's scalars as host numbers.
    """

    def __init__(self, models: list[SequenceModel], cfgs: Sequence[Config], datas: Sequence[StudyData],
                 *, compile: bool | None = None, cuda_graph: bool | None = None, mixed: bool | None = None):
        self.cfgs, self.datas = list(cfgs), list(datas)
        self.cfg = cfg = cfgs[0]
        device = next(models[0].parameters()).device
        self.mixed = mixed_precision(cfg, device) if mixed is None else mixed
        self.pack = PackedModels(models, cfg, batched=batched_forward(cfg, device, len(models)),
                                 low_precision=torch.bfloat16 if self.mixed else None)
        self.optimizer = PackedAdamW(self.pack.flat, self.pack.n_decay, cfgs, decay_slots=self.pack.decay_slots)
        self.device = device
        self.seeds = [c.seed for c in self.cfgs]
        self._losses = self._loss_fn
        if cfg.train.compile if compile is None else compile:
            self._losses = torch.compile(self._loss_fn)
            self.optimizer.compiled = torch.compile(adam_update)
        self.graphed = device.type == "cuda" and (cfg.train.cuda_graph if cuda_graph is None else cuda_graph)
        self.graph: torch.cuda.CUDAGraph | None = None
        k = self.pack.k
        self.loss_sum = torch.zeros(k, device=device, dtype=self.pack.flat.dtype)
        self.correct_sum = torch.zeros(k, device=device, dtype=torch.long)
        self.t_dev = torch.zeros((), device=device, dtype=torch.long)  # the update a static step makes
        self.i_dev = torch.zeros(1, device=device, dtype=torch.long)  # its row in the optimiser's table

    @classmethod
    def fresh(cls, cfgs: Sequence[Config], shared: StudyData, **options) -> "PackedTrainer":
        """A pack of untrained models (each as its run starts) over one copy of the data."""
        models = [initial_model(c, shared.device) for c in cfgs]
        return cls(models, cfgs, [data_for(c, shared) for c in cfgs], **options)

    @property
    def models(self) -> list[SequenceModel]:
        return self.pack.models

    @property
    def k(self) -> int:
        return self.pack.k

    def batch(self, index: int | Tensor) -> tuple[Tensor, Tensor]:
        """Every model's training batch ``index`` (an int, or a 0-d device tensor), made by one
        set of kernels for the whole pack: images ``[K, B, 9, S, S]``, labels ``[K, B, 9]``."""
        data = self.datas[0]  # the models differ only in seed and weight decay
        b = data.train_batch(index, seeds=self.seeds)
        images = data.bank.render(b.classes, b.exemplars, self.pack.flat.dtype)
        k = len(self.seeds)
        return rearrange(images, "(k b) ... -> k b ...", k=k), rearrange(b.labels, "(k b) n -> k b n", k=k)

    def _loss_fn(self, images: Tensor, labels: Tensor, k: int | None = None) -> tuple[Tensor, Tensor]:
        """Per-model mean loss (with its graph) and number correct: of the whole pack, batched
        (``k`` None), or of model ``k`` on its own batch (``[1]`` each)."""
        with autocast(self.cfg, images.device, enabled=self.mixed):
            if k is None:
                logits = self.pack.logits(images, labels)
            else:
                logits = self.pack.model_logits(k, images[k], labels[k])[None]
                labels = labels[k : k + 1]
        logits = logits.to(self.pack.flat.dtype)  # the loss in fp32 (fp64) even under bf16 autocast
        targets = labels[..., -1]
        n, b = targets.shape
        losses = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(n, b).mean(1)
        correct = (logits.detach().argmax(-1) == targets).sum(1)
        return losses, correct

    def forward_backward(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per-model mean loss ``[K]``, number correct ``[K]`` and gradient ``[K, N]``. Batched,
        one forward and one backward for the pack (the gradient of the losses' sum with respect
        to model k's parameters is its own loss's); model by model, each model's forward and
        backward in turn, so that only one model's activations are alive at a time (the CPU's
        caches: a pack of 3 ResNets holding all their activations ran at 0.88x per model)."""
        self.pack.refresh()
        if self.pack.batched:
            losses, correct = self._losses(images, labels)
            return losses.detach(), correct, self.pack.grads_flat(torch.autograd.grad(losses.sum(), self.pack.leaves))
        n = len(self.pack.slots)
        losses, correct, grads = [], [], []
        for k in range(self.k):
            loss, right = self._losses(images, labels, k)
            grads += torch.autograd.grad(loss.sum(), self.pack.leaves[k * n : (k + 1) * n])
            losses.append(loss.detach())
            correct.append(right)
        return torch.cat(losses), torch.cat(correct), self.pack.grads_flat(grads)

    def step(self, t: int) -> tuple[Tensor, Tensor]:
        """Update ``t`` of every model, eagerly (``optimizer.schedule`` must cover ``t``); per-model
        (loss, number correct) on the device."""
        images, labels = self.batch(t - 1)
        losses, correct, grad = self.forward_backward(images, labels)
        self.optimizer.step(t, grad)
        return losses, correct

    def static_step(self) -> None:
        """Update ``t_dev`` of every model with the scalars of table row ``i_dev``, adding loss and
        correct answers to the sums and advancing both counters: a step that reads nothing on the
        host and keeps every tensor it touches where it is, so a CUDA graph can capture it."""
        images, labels = self.batch(self.t_dev - 1)
        losses, correct, grad = self.forward_backward(images, labels)
        self.optimizer.step_at(self.i_dev, grad)
        with torch.no_grad():
            self.loss_sum += losses
            self.correct_sum += correct
            self.t_dev += 1
            self.i_dev += 1

    def run(self, first: int, last: int, tick: Callable[[int], None] | None = None) -> tuple[Tensor, Tensor]:
        """Updates ``first..last`` of every model (``tick(t)`` after each, for progress); returns
        the per-model sums of loss and of correct answers ``[K]`` over them, on the device (the
        trainer's own buffers: read them before the next run)."""
        grew = self.optimizer.schedule(first, last)
        self.loss_sum.zero_()
        self.correct_sum.zero_()
        if self.graphed:
            self.t_dev.fill_(first)
            self.i_dev.fill_(0)
            if self.graph is None or grew:
                self._capture()
        for t in range(first, last + 1):
            if self.graph is not None:
                self.graph.replay()
            else:
                loss, correct = self.step(t)
                self.loss_sum += loss
                self.correct_sum += correct
            if tick is not None:
                tick(t)
        return self.loss_sum, self.correct_sum

    def _capture(self) -> None:
        """Capture :meth:`static_step` as a CUDA graph. Capturing needs a few eager steps first
        (on a side stream: lazy initialisation, allocator pools); they change the weights, the
        moments, the decay compensation, BatchNorm statistics, counters and sums, which are put
        back afterwards, so capturing leaves the run where it was."""
        opt = self.optimizer
        state = [self.pack.flat, opt.exp_avg, opt.exp_avg_sq, opt.compensation, *self.pack.buffers.values(),
                 self.loss_sum, self.correct_sum, self.t_dev, self.i_dev]
        saved = [x.clone() for x in state]
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(3):
                self.static_step()
        torch.cuda.current_stream(self.device).wait_stream(side)
        with torch.no_grad():
            for x, y in zip(state, saved):
                x.copy_(y)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_step()

    # ------------------------------------------------------------------ per-model state

    def optimizer_state(self, k: int, t: int) -> dict:
        """Model ``k``'s optimiser as a ``torch.optim.AdamW`` ``state_dict`` after update ``t``, its
        decayed tensors' states also holding their ``decay_compensation`` (under decoupled decay
        with ``weight_decay > 0``; a key torch's AdamW keeps through ``load_state_dict`` and ignores)."""
        model, cfg = self.pack.models[k], self.cfgs[k]
        opt = make_optimizer(model, cfg.optim)
        set_lr(opt, lr_at(max(t, 1), cfg.optim, cfg.train.steps))
        params = dict(model.named_parameters())
        compensated = self.optimizer.weight_decay[k] != 0  # this model's decay runs compensated
        for s in self.pack.slots:
            opt.state[params[s.name]] = {
                "step": torch.tensor(float(t)),
                "exp_avg": self.optimizer.exp_avg[k, s.start : s.stop].view(s.shape).clone(),
                "exp_avg_sq": self.optimizer.exp_avg_sq[k, s.start : s.stop].view(s.shape).clone(),
            }
            if compensated and s.stop <= self.pack.n_decay:
                opt.state[params[s.name]][COMPENSATION] = \
                    self.optimizer.compensation[k, s.start : s.stop].view(s.shape).clone()
        return opt.state_dict()

    def load_state(self, k: int, model_state: dict, optimizer_state: dict, t: int) -> None:
        """Put model ``k`` (weights, buffers, AdamW moments and decay compensation after update
        ``t``) into the pack, from a ``state_dict`` and a ``torch.optim.AdamW`` ``state_dict``."""
        model = self.pack.models[k]
        model.load_state_dict(model_state)  # copies into the stack's views
        self.pack.refresh_constants()  # (the castable weights' copy is refreshed at every step)
        opt = make_optimizer(model, self.cfgs[k].optim)
        opt.load_state_dict(optimizer_state)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for s in self.pack.slots:
                state = opt.state.get(params[s.name])
                if not state:  # never updated (t == 0): zero moments, as a fresh AdamW
                    continue
                if int(state["step"]) != t:
                    raise UserError(f"checkpoint optimiser state of {s.name} is at step {int(state['step'])}, not {t}")
                self.optimizer.exp_avg[k, s.start : s.stop] = state["exp_avg"].reshape(-1)
                self.optimizer.exp_avg_sq[k, s.start : s.stop] = state["exp_avg_sq"].reshape(-1)
                if s.stop <= self.optimizer.compensation.shape[1]:  # a checkpoint without it: zero
                    kept = state.get(COMPENSATION)
                    self.optimizer.compensation[k, s.start : s.stop] = 0 if kept is None else kept.reshape(-1)


__all__ = [
    "PackedTrainer",
    "PackedModels",
    "PER_MODEL_KEYS",
    "check_packable",
    "data_for",
    "initial_model",
]
