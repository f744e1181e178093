"""The step of a pack: its K models' batches, forward, backward and AdamW update, one packed
step at a time, eager or replayed as a CUDA graph.

Each model keeps its own run: its training batch ``StudyData.train_batch(step)`` of its own
seed, a pure function of (seed, step) (the pack makes all K batches in one call,
``train_batch(step, seeds=[...])``), and its own AdamW state with its own weight decay
(:class:`~icl.train.adamw.PackedAdamW`: the update of ``torch.optim.AdamW`` on exactly the
decay group of :func:`icl.train.optim.decay_groups`) over the stack
(:class:`~icl.train.stack.PackedModels`). Gradients are concatenated into one ``[K, N]``
tensor and the AdamW update is a handful of element-wise kernels over whole ``[K, N]``
buffers, whatever the number of layers. A step never synchronises with the device.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from icl.config import Config
from icl.data import StudyData
from icl.model import SequenceModel
from icl.train.adamw import Moments, PackedAdamW, adam_update
from icl.train.precision import autocast, mixed_precision
from icl.train.stack import PackedModels, batched_forward, initial_model


def data_for(cfg: Config, shared: StudyData) -> StudyData:
    """Model ``cfg``'s data (its own training stream) over the pack's one copy of the images,
    class split and evaluation sets (equal for every model of a pack)."""
    data = StudyData(cfg, shared.source, shared.split, shared.bank)
    for name in ("train_classes", "class_dist", "eval_sets"):  # equal for every model of a pack
        data.__dict__[name] = getattr(shared, name)
    return data


class PackedTrainer:
    """K models (already initialised) + their data + AdamW, trained one packed step at a time.

    :meth:`run` performs updates ``first..last`` (1-based; update ``t`` trains on batch
    ``t - 1`` of every model, as the training loop numbers them) and returns the per-model
    sums of loss and of correct answers, on the device, without synchronising.

    On CUDA (``train.cuda_graph``, the default) one whole step is captured once as a CUDA graph
    (:meth:`static_step`: sampling, rendering, forward, loss, backward, AdamW, the sums) and
    replayed for every update: one launch per step instead of one per kernel (benchmarks/README.md
    counts a step's kernels). Everything the step reads lives in fixed device buffers: the
    weights and optimiser moments, the step counter ``t_dev`` (the batch index), the row counter
    ``i_dev`` into AdamW's scalar table (the learning-rate schedule), the sums. Evaluation and
    checkpoints stay eager, between runs, reading and writing the same buffers. Elsewhere (the CPU, or ``cuda_graph: false``)
    :meth:`step` runs eagerly with the step's scalars as host numbers.
    """

    def __init__(self, models: list[SequenceModel], cfgs: Sequence[Config], datas: Sequence[StudyData],
                 *, compile: bool | None = None, cuda_graph: bool | None = None, mixed: bool | None = None):
        self.cfgs, self.datas = list(cfgs), list(datas)
        self.cfg = cfg = cfgs[0]
        device = next(models[0].parameters()).device
        self.mixed = mixed_precision(cfg, device) if mixed is None else mixed
        self.pack = PackedModels(models, cfg, batched=batched_forward(cfg, device, len(models)),
                                 low_precision=self.mixed)
        self.optimizer = PackedAdamW.over(self.pack, cfgs)
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
        caches; benchmarks/README.md has the rates)."""
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
        """Model ``k``'s optimiser state after update ``t``, as a ``torch.optim.AdamW``
        ``state_dict`` (:meth:`icl.train.adamw.PackedAdamW.state_dict`)."""
        return self.optimizer.state_dict(k, t)

    def load_state(self, k: int, model_state: dict, optimizer_state: dict, t: int) -> None:
        """Put model ``k`` (weights, buffers, AdamW moments and decay compensation after update
        ``t``) into the pack, from a ``state_dict`` and a ``torch.optim.AdamW`` ``state_dict``."""
        self.pack.load_state_dict(k, model_state)
        self.optimizer.load_state_dict(k, optimizer_state, t)

    def carry(self, k: int) -> tuple[dict[str, Tensor], Moments]:
        """Model ``k`` as it stands (weights and buffers, moments), for another pack in this
        process (:meth:`put`): the numbers a checkpoint would hold, without the round trip."""
        return self.pack.state_dict(k), self.optimizer.moments(k)

    def put(self, k: int, carried: tuple[dict[str, Tensor], Moments]) -> None:
        weights, moments = carried
        self.pack.load_state_dict(k, weights)
        self.optimizer.set_moments(k, moments)


__all__ = ["PackedTrainer", "data_for"]
