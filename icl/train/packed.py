"""Packed trials: one process trains K independent models at once.

    train_packed(cfgs, out_dirs, *, on_eval=None, progress=None) -> one last row per model

The study's model is tiny (width 64, 17 tokens, batch 32): one model leaves a GPU almost
idle, launching small kernels. A seeds x weight-decay grid is made of models with identical
shapes, so K of them can share every kernel: their parameters are stacked along a leading
``K`` axis and the ordinary :class:`~icl.model.SequenceModel` runs on all of them at once
through ``torch.func.functional_call`` under ``torch.vmap`` (a batched matmul per linear
layer instead of K matmuls).

Each model keeps everything that makes it *its own run*:

- **init**: model ``k`` starts exactly as ``icl.train.train`` starts it
  (:func:`~icl.train.loop.initial_model`), then is copied into the stack;
- **data**: ``StudyData.train_batch(step)`` of its own config, a pure function of
  (seed, step), so model ``k`` sees exactly the batches it would see alone (the pack makes
  all K batches in one call, ``train_batch(step, seeds=[...])``);
- **optimiser**: AdamW for stacked parameters (:class:`PackedAdamW`): the same update as
  ``torch.optim.AdamW`` (decoupled decay ``p *= 1 - lr * wd``, bias-corrected moments, same
  operation order), with a per-model weight-decay vector applied to exactly the decay group
  of :func:`icl.train.optim.decay_groups`; the learning rate follows
  :func:`icl.train.optim.lr_at`;
- **metrics and files**: at each evaluation the model's slice of the stack *is* the
  parameters of a plain ``SequenceModel`` (its parameters are views into the stack), which
  :func:`icl.train.evaluate.evaluate` scores on the fixed sets; its run directory gets the
  same ``config.yaml``, ``metrics.csv``, ``attention.npz`` and ``checkpoints/`` as
  ``icl.train.train`` writes, through the same helpers. Checkpoints hold a plain model
  ``state_dict`` and a ``torch.optim.AdamW`` ``state_dict``, so each run directory can be
  resumed alone by ``icl.train.train`` as well as by ``train_packed``.

A packed model equals the same model trained alone within floating-point tolerance (the
batched kernels round differently from the unbatched ones; tests/train/test_packed.py).

What can be packed: configs whose every key except ``seed`` and ``optim.weight_decay`` is
equal (:func:`check_packable`). The ``resnet`` embedder cannot be packed: its BatchNorm
layers update running statistics in place during training, which ``vmap`` cannot do per
model (``torch.func`` only offers to drop the running statistics, which would change what
the model computes at evaluation, so a packed model would no longer equal one trained
alone). ``linear`` and ``frozen`` embedders are supported.

Layout. All parameters of the pack live in one ``[K, N]`` tensor (model ``k``'s parameters
are row ``k``, decayed ones first), gradients are concatenated into one ``[K, N]`` tensor,
and the AdamW update is a handful of element-wise kernels over whole ``[K, N]`` buffers,
whatever the number of layers. The step loop never synchronises with the device:
per-step scalars (step size, bias correction, per-model decay factors) are precomputed on
the host for each evaluation interval and copied once; losses and accuracies accumulate on
the device and are read at evaluation. The K batches come from one sampling call
(``StudyData.train_batch(step, seeds=...)``: counter-based random words keyed by each
model's seed), so sampling costs the same kernels whatever K is.

Resuming. Each model resumes from its newest intact checkpoint. Models whose newest
checkpoints are at different steps (a crash between two models' saves, a model trained
alone before) are brought level first: the ones furthest behind train as a smaller pack up to
the next model's step, then all continue together.

Divergence. A model whose loss becomes non-finite stops being evaluated and saved (its last
good checkpoint stays); the others train to the end; then :class:`PackedTrainingDiverged`
(a :class:`~icl.train.loop.TrainingDiverged`) is raised, carrying the others' last rows.

Options (``compile=``, ``cuda_graphs=``): ``torch.compile`` the loss and the optimiser
update; ``cuda_graphs`` (CUDA only) compiles with ``mode="reduce-overhead"`` so the compiled
graphs replay as CUDA graphs. Both are off by default and not needed for correctness.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from icl.config import Config, flatten
from icl.data import StudyData, load_data
from icl.errors import UserError
from icl.model import SequenceModel, build_model
from icl.train import checkpoint as ckpt
from icl.train.evaluate import autocast, evaluate
from icl.train.loop import (
    RunState,
    TrainingDiverged,
    divergence_message,
    evaluation_row,
    initial_model,
    log_evaluation,
    prepare_run_dir,
    resolve_device,
    restore,
    save_checkpoint,
    write_logs,
)
from icl.train.optim import decay_groups, lr_at, make_optimizer, set_lr
from icl.train.progress import Progress

# on_eval(k, row, checkpoint_dir or None): model k's row, after its files are written.
PackedOnEval = Callable[[int, dict[str, float], "Path | None"], None]

# Keys in which the models of one pack may differ; every other config key must be equal.
PER_MODEL_KEYS = ("seed", "optim.weight_decay")
PACKABLE_EMBEDDERS = ("linear", "frozen")


class PackedTrainingDiverged(TrainingDiverged):
    """Some models of a pack diverged; the others finished. ``results[k]`` is model ``k``'s
    last row (None for a diverged model); ``diverged[k]`` says what happened to model ``k``."""

    def __init__(self, message: str, results: list[dict[str, float] | None], diverged: dict[int, str]):
        super().__init__(message)
        self.results = results
        self.diverged = diverged


# --------------------------------------------------------------------------- validation


def check_packable(cfgs: Sequence[Config]) -> None:
    """UserError unless ``cfgs`` can train as one pack: at least one config, equal in every
    key but ``seed`` and ``optim.weight_decay``, with a ``linear`` or ``frozen`` embedder."""
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
    embedder = cfgs[0].model.embedder
    if embedder not in PACKABLE_EMBEDDERS:
        raise UserError(
            f"model.embedder={embedder} cannot be packed: BatchNorm updates its running statistics in "
            "place during training, which torch.vmap cannot do per model, so a packed ResNet model "
            f"would not equal one trained alone; use pack 1 (icl.train.train) for it, or the "
            f"{' or '.join(PACKABLE_EMBEDDERS)} embedder"
        )


# --------------------------------------------------------------------------- the stack


@dataclass(frozen=True)
class Slot:
    name: str
    shape: torch.Size
    start: int  # column range in the [K, N] buffers
    stop: int


class PackedModels:
    """K models of one architecture as one ``[K, N]`` parameter tensor.

    After construction every model's parameters (and buffers) are views into the stack, so
    ``models[k]`` is a working ``SequenceModel`` holding model ``k``'s live weights (for
    evaluation, ``state_dict`` and ``load_state_dict``), while :meth:`logits` runs all K at
    once. Decayed parameters come first: columns ``[0, n_decay)``.
    """

    def __init__(self, models: list[SequenceModel], cfg: Config):
        self.models = models
        self.k = len(models)
        model = models[0]
        first = next(model.parameters())
        decay, no_decay = decay_groups(model)
        params = dict(model.named_parameters())
        slots, col = [], 0
        for name in decay + no_decay:
            n = params[name].numel()
            slots.append(Slot(name, params[name].shape, col, col + n))
            col += n
        self.slots = slots
        self.n_decay = sum(s.stop - s.start for s in slots[: len(decay)])
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
        self.buffers: dict[str, Tensor] = {}
        for name, _ in model.named_buffers():
            stacked = torch.stack([dict(m.named_buffers())[name] for m in models])
            self.buffers[name] = stacked
            owner, _, leaf = name.rpartition(".")
            for k, m in enumerate(models):
                setattr(m.get_submodule(owner) if owner else m, leaf, stacked[k])
        with torch.device("meta"):  # a weightless template for functional_call
            self.template = build_model(cfg)
        self.template.train()

    @property
    def n(self) -> int:
        return self.flat.shape[1]

    def logits(self, params: dict[str, Tensor], buffers: dict[str, Tensor], images: Tensor, labels: Tensor) -> Tensor:
        """``images [K, B, 9, S, S]``, ``labels [K, B, 9]`` -> logits ``[K, B, vocab]``."""

        def one(p, b, x, y):
            return torch.func.functional_call(self.template, (p, b), (x, y))

        # The math backend: it batches natively under vmap (forward and backward); the fused
        # CPU kernel has no batching rule and would run the K models one after another.
        with sdpa_kernel(SDPBackend.MATH):
            return torch.vmap(one)(params, buffers, images, labels)

    def grads_flat(self, grads: Sequence[Tensor]) -> Tensor:
        """Per-slot gradients (autograd's order = ``self.slots``) -> one ``[K, N]`` tensor."""
        return torch.cat([g.reshape(self.k, -1) for g in grads], dim=1)


class PackedAdamW:
    """``torch.optim.AdamW`` (non-amsgrad, non-maximize) for a ``[K, N]`` parameter tensor
    whose first ``n_decay`` columns form the decay group, with one weight decay per row.

    Per update ``t`` (1-based), in the order of torch's single-tensor AdamW::

        p[:, :n_decay] *= 1 - lr_t * wd_k          (decay group only; a factor 1 where wd_k = 0)
        m = lerp(m, g, 1 - beta1);  v = v * beta2 + (1 - beta2) g^2
        p += (-lr_t / (1 - beta1^t)) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

    The per-step scalars are computed in float64 on the host, as torch does with Python
    floats, for a whole range of updates at once (:meth:`schedule`); the per-model decay
    factors go to the device in one copy, so an update never synchronises.

    Eager, the update runs over column chunks of ~1 MB per buffer (on the CPU all seven
    element-wise passes then stay in cache: about 3x faster than whole-buffer passes, and
    faster than torch's per-parameter loop) with the shared scalars as Python numbers;
    on CUDA it is one chunk. With ``compiled`` (``torch.compile``, CUDA graphs) it is
    one fused function of device tensors only (:func:`adam_update`), so it can be captured.
    """

    CHUNK_ELEMENTS = 1 << 18

    def __init__(self, flat: Tensor, n_decay: int, cfgs: Sequence[Config], chunk_elements: int | None = None):
        self.flat = flat
        self.n_decay = n_decay
        o = cfgs[0].optim
        self.optim = o
        self.total_steps = cfgs[0].train.steps
        self.beta1, self.beta2, self.eps = o.beta1, o.beta2, o.eps
        self.weight_decay = [c.optim.weight_decay for c in cfgs]
        self.decays = any(wd != 0 for wd in self.weight_decay)
        self.exp_avg = torch.zeros_like(flat)
        self.exp_avg_sq = torch.zeros_like(flat)
        k, n = flat.shape
        chunk = chunk_elements or (k * n if flat.device.type == "cuda" else self.CHUNK_ELEMENTS)
        cols = max(1, chunk // k)
        self.chunks = [(a, min(a + cols, n)) for a in range(0, n, cols)]
        self.first = 1
        self.host: list[tuple[float, float]] = []
        self.table = torch.zeros(0, 2 + k, device=flat.device, dtype=flat.dtype)
        self.compiled: Callable | None = None

    def single_pass(self) -> None:
        """Update the whole pack in one pass of each kernel, as on CUDA (on the CPU the update
        is cache-blocked into chunks): for counting the kernels a GPU step launches."""
        self.chunks = [(0, self.flat.shape[1])]

    def schedule(self, first: int, last: int) -> None:
        """Precompute the scalars of updates ``first..last`` (1-based; one host->device copy)."""
        rows = []
        for t in range(first, last + 1):
            lr = lr_at(t, self.optim, self.total_steps)
            step_size = lr / (1 - self.beta1**t)
            bc2_sqrt = (1 - self.beta2**t) ** 0.5
            rows.append([-step_size, bc2_sqrt, *[1 - lr * wd if wd != 0 else 1.0 for wd in self.weight_decay]])
        self.host = [(r[0], r[1]) for r in rows]
        self.table = torch.tensor(rows, dtype=torch.float64).to(self.flat.dtype).to(self.flat.device)
        self.first = first

    @torch.no_grad()
    def step(self, t: int, grad: Tensor) -> None:
        """Update ``t`` (1-based; must lie in the scheduled range) with gradient ``[K, N]``."""
        i = t - self.first
        if not 0 <= i < len(self.host):
            raise RuntimeError(f"update {t} outside the scheduled range; call schedule() first")
        n_decay = self.n_decay if self.decays else 0
        if self.compiled is not None:
            self.compiled(self.flat, self.exp_avg, self.exp_avg_sq, grad, self.table[i], n_decay,
                          self.beta1, self.beta2, self.eps)
            return
        neg_step, bc2_sqrt = self.host[i]
        decay = self.table[i, 2:, None]
        b1, b2, eps = self.beta1, self.beta2, self.eps
        for a, b in self.chunks:
            p, m, v, g = self.flat[:, a:b], self.exp_avg[:, a:b], self.exp_avg_sq[:, a:b], grad[:, a:b]
            if a < n_decay:
                p[:, : min(b, n_decay) - a].mul_(decay)
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (v.sqrt() / bc2_sqrt).add_(eps)
            p.addcdiv_(m, denom, value=neg_step)


@torch.no_grad()
def adam_update(p: Tensor, m: Tensor, v: Tensor, g: Tensor, row: Tensor, n_decay: int,
                beta1: float, beta2: float, eps: float) -> None:
    """:class:`PackedAdamW`'s update with the per-step scalars as a device tensor ``row``
    (``-step_size, sqrt(1 - beta2^t), decay factors [K]``): for ``torch.compile``/CUDA graphs."""
    if n_decay:
        p[:, :n_decay].mul_(row[2:, None])
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    denom = (v.sqrt() / row[1]).add_(eps)
    p.add_(m.mul(row[0]).div_(denom))  # = p.addcdiv_(m, denom, value=-step_size)


# --------------------------------------------------------------------------- the trainer


class PackedTrainer:
    """K models (already initialised) + their data + AdamW, one packed step at a time.

    ``step(t)`` is update ``t`` (1-based) on batch ``t - 1`` of every model, as
    ``icl.train.train`` numbers them; it returns per-model (loss ``[K]``, number correct
    ``[K]``) on the device without synchronising. Call ``optimizer.schedule(a, b)`` before
    updates ``a..b``.
    """

    def __init__(self, models: list[SequenceModel], cfgs: Sequence[Config], datas: Sequence[StudyData],
                 *, compile: bool = False, cuda_graphs: bool = False):
        self.cfgs, self.datas = list(cfgs), list(datas)
        self.pack = PackedModels(models, cfgs[0])
        self.optimizer = PackedAdamW(self.pack.flat, self.pack.n_decay, cfgs)
        self.device = self.pack.flat.device
        self.cfg = cfgs[0]
        self._leaves = [self.pack.params[s.name] for s in self.pack.slots]
        self._losses = self._loss_fn
        self.seeds = [c.seed for c in self.cfgs]
        if cuda_graphs and self.device.type != "cuda":
            raise UserError(f"CUDA graphs need a CUDA device; this pack runs on {self.device} (drop cuda_graphs)")
        if compile or cuda_graphs:
            mode = "reduce-overhead" if cuda_graphs else None
            if cuda_graphs:
                for leaf in self._leaves:  # updated in place: the graphs may read them where they are
                    torch._dynamo.mark_static_address(leaf)
            self._losses = torch.compile(self._loss_fn, mode=mode)
            self.optimizer.compiled = torch.compile(adam_update, mode=mode)

    @classmethod
    def fresh(cls, cfgs: Sequence[Config], shared: StudyData, **options) -> "PackedTrainer":
        """A pack of untrained models (each as its run starts) over one copy of the data."""
        models = [initial_model(c, shared.device) for c in cfgs]
        return cls(models, cfgs, [data_for(c, shared) for c in cfgs], **options)

    @property
    def models(self) -> list[SequenceModel]:
        return self.pack.models

    def batch(self, index: int) -> tuple[Tensor, Tensor]:
        """Every model's training batch ``index``, made by one set of kernels for the whole
        pack: images ``[K, B, 9, S, S]``, labels ``[K, B, 9]``."""
        data = self.datas[0]  # the models differ only in seed and weight decay
        b = data.train_batch(index, seeds=self.seeds)
        images = data.bank.render(b.classes, b.exemplars)
        k = len(self.seeds)
        return rearrange(images, "(k b) ... -> k b ...", k=k), rearrange(b.labels, "(k b) n -> k b n", k=k)

    def _loss_fn(self, params: dict[str, Tensor], buffers: dict[str, Tensor], images: Tensor, labels: Tensor):
        with autocast(self.cfg, images.device):
            logits = self.pack.logits(params, buffers, images, labels)
        logits = logits.float()
        targets = labels[..., -1]
        k, b = targets.shape
        losses = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(k, b).mean(1)
        correct = (logits.detach().argmax(-1) == targets).sum(1)
        return losses, correct

    def step(self, t: int) -> tuple[Tensor, Tensor]:
        images, labels = self.batch(t - 1)
        losses, correct = self._losses(self.pack.params, self.pack.buffers, images, labels)
        grads = torch.autograd.grad(losses.sum(), self._leaves)  # sum: model k's grad is its own loss's
        self.optimizer.step(t, self.pack.grads_flat(grads))
        return losses.detach(), correct

    # ------------------------------------------------------------------ per-model state

    def optimizer_state(self, k: int, t: int, lr: float) -> dict:
        """Model ``k``'s optimiser as a ``torch.optim.AdamW`` ``state_dict`` after update ``t``
        (exactly what ``icl.train.train`` checkpoints)."""
        model = self.pack.models[k]
        opt = make_optimizer(model, self.cfgs[k].optim)
        set_lr(opt, lr)
        params = dict(model.named_parameters())
        for s in self.pack.slots:
            opt.state[params[s.name]] = {
                "step": torch.tensor(float(t)),
                "exp_avg": self.optimizer.exp_avg[k, s.start : s.stop].view(s.shape).clone(),
                "exp_avg_sq": self.optimizer.exp_avg_sq[k, s.start : s.stop].view(s.shape).clone(),
            }
        return opt.state_dict()

    def load_optimizer(self, k: int, opt: torch.optim.Optimizer, t: int) -> None:
        """Copy a loaded ``torch.optim.AdamW`` of model ``k`` (after ``t`` updates) into the pack."""
        params = dict(self.pack.models[k].named_parameters())
        with torch.no_grad():
            for s in self.pack.slots:
                state = opt.state.get(params[s.name])
                if not state:  # never updated (t == 0): zero moments, as a fresh AdamW
                    continue
                if int(state["step"]) != t:
                    raise UserError(f"checkpoint optimiser state of {s.name} is at step {int(state['step'])}, not {t}")
                self.optimizer.exp_avg[k, s.start : s.stop] = state["exp_avg"].reshape(-1)
                self.optimizer.exp_avg_sq[k, s.start : s.stop] = state["exp_avg_sq"].reshape(-1)

    def model_state(self, k: int) -> dict[str, Tensor]:
        """Model ``k``'s ``state_dict``, detached from the stack (a checkpoint must not hold
        the other models' weights)."""
        return {n: t.detach().clone() for n, t in self.pack.models[k].state_dict().items()}


# --------------------------------------------------------------------------- train_packed


def train_packed(
    cfgs: Sequence[Config],
    out_dirs: Sequence[Path | str],
    *,
    on_eval: PackedOnEval | None = None,
    progress: bool | None = None,
    compile: bool = False,
    cuda_graphs: bool = False,
) -> list[dict[str, float]]:
    """Train (or resume) K runs as one pack; model ``k`` writes ``out_dirs[k]`` exactly as
    ``icl.train.train(cfgs[k], out_dirs[k])`` would. Returns each model's last metrics row.

    ``on_eval(k, row, checkpoint_dir)`` is called for every model at every evaluation, after
    its files are written (``checkpoint_dir`` is None when no checkpoint was saved).
    Raises :class:`PackedTrainingDiverged` at the end if some models diverged.
    """
    cfgs = list(cfgs)
    out_dirs = [Path(d) for d in out_dirs]
    if len(out_dirs) != len(cfgs):
        raise UserError(f"train_packed got {len(cfgs)} configs but {len(out_dirs)} run directories")
    resolved = [d.resolve() for d in out_dirs]
    if len(set(resolved)) != len(resolved):
        raise UserError("every model of a pack needs its own run directory; some are repeated")
    check_packable(cfgs)
    t = cfgs[0].train
    device = resolve_device(t.device)
    if cuda_graphs and device.type != "cuda":
        raise UserError(f"CUDA graphs need a CUDA device; train.device={t.device} runs on {device} (drop cuda_graphs)")
    for cfg, d in zip(cfgs, out_dirs):
        prepare_run_dir(cfg, d)
    if t.threads:
        torch.set_num_threads(t.threads)
    shared = load_data(cfgs[0], device)
    datas = [data_for(cfg, shared) for cfg in cfgs]

    results: list[dict[str, float] | None] = [None] * len(cfgs)
    diverged: dict[int, str] = {}
    while True:
        steps = {}
        for k, d in enumerate(out_dirs):
            ckpt.remove_temporaries(d / "checkpoints")
            loaded = ckpt.load_latest(d / "checkpoints")
            steps[k] = loaded.step if loaded else 0
        todo = [k for k in steps if steps[k] < t.steps and k not in diverged]
        for k in steps:
            if steps[k] >= t.steps and results[k] is None:
                results[k] = _finished_row(cfgs[k], out_dirs[k], device)
        if not todo:
            break
        start = min(steps[k] for k in todo)
        group = [k for k in todo if steps[k] == start]
        ahead = [steps[k] for k in todo if steps[k] > start]
        stop = min(ahead) if ahead else t.steps
        rows, bad = _run_group(
            group, cfgs, out_dirs, datas, device, start, stop,
            on_eval=on_eval, progress=progress, compile=compile, cuda_graphs=cuda_graphs,
        )
        diverged.update(bad)
        for k, row in rows.items():
            if stop >= t.steps:
                results[k] = row
    if diverged:
        names = "; ".join(f"model {k} ({out_dirs[k]}): {msg}" for k, msg in sorted(diverged.items()))
        raise PackedTrainingDiverged(
            f"{len(diverged)} of {len(cfgs)} packed models diverged, the others finished: {names}",
            results, diverged,
        )
    return [r if r is not None else {} for r in results]


def data_for(cfg: Config, shared: StudyData) -> StudyData:
    """Model ``cfg``'s data (its own training stream) over the pack's one copy of the images,
    class split and evaluation sets (equal for every model of a pack)."""
    data = StudyData(cfg, shared.source, shared.split, shared.bank)
    for name in ("train_classes", "class_dist", "eval_sets"):  # equal for every model of a pack
        data.__dict__[name] = getattr(shared, name)
    return data


def _finished_row(cfg: Config, out_dir: Path, device: torch.device) -> dict[str, float]:
    """A finished run's last row; refreshes its logs from its checkpoint, as ``train`` does."""
    loaded = ckpt.load_latest(out_dir / "checkpoints")
    model = initial_model(cfg)
    state = restore(loaded, cfg, model, make_optimizer(model, cfg.optim))
    write_logs(out_dir, state)
    return state.rows[-1] if state.rows else {}


def _run_group(
    group: list[int],
    cfgs: list[Config],
    out_dirs: list[Path],
    datas: list[StudyData],
    device: torch.device,
    start: int,
    stop: int,
    *,
    on_eval: PackedOnEval | None,
    progress: bool | None,
    compile: bool,
    cuda_graphs: bool,
) -> tuple[dict[int, dict[str, float]], dict[int, str]]:
    """Train the models ``group`` (all with their newest checkpoint at ``start``) from
    ``start`` to ``stop`` as one pack. Returns each surviving model's last row, and the
    diverged ones' messages."""
    t = cfgs[0].train
    states = []
    models = [initial_model(cfgs[k], device) for k in group]  # exactly as icl.train.train starts model k
    trainer = PackedTrainer(models, [cfgs[k] for k in group], [datas[k] for k in group],
                            compile=compile, cuda_graphs=cuda_graphs)
    for i, k in enumerate(group):
        loaded = ckpt.load_latest(out_dirs[k] / "checkpoints")
        if loaded is not None:
            opt = make_optimizer(trainer.models[i], cfgs[k].optim)
            state = restore(loaded, cfgs[k], trainer.models[i], opt)  # weights land in the stack
            if state.step != start:
                raise RuntimeError(f"{out_dirs[k]}: checkpoint at step {state.step}, expected {start}")
            trainer.load_optimizer(i, opt, state.step)
        else:
            state = RunState()
        write_logs(out_dirs[k], state)
        states.append(state)

    kk = len(group)
    alive = list(range(kk))
    bad: dict[int, str] = {}
    last: dict[int, dict[str, float]] = {}
    bar = Progress(t.steps, enabled=sys.stderr.isatty() if progress is None else progress)
    bar.update(start, states[0].rows[-1] if states[0].rows else None, None)
    loss_sum = torch.zeros(kk, device=device)
    correct_sum = torch.zeros(kk, device=device, dtype=torch.long)
    since_eval, seg_start = 0, time.perf_counter()
    for m in trainer.models:
        m.train()
    step = start
    while step < stop:
        seg_end = min(stop, (step // t.eval_every + 1) * t.eval_every, t.steps)
        trainer.optimizer.schedule(step + 1, seg_end)
        for step in range(step + 1, seg_end + 1):
            loss, correct = trainer.step(step)
            loss_sum += loss
            correct_sum += correct
            since_eval += 1
            bar.tick(step)
        # evaluation (seg_end is an eval step, the last step, or a catch-up target)
        losses = [x / since_eval for x in loss_sum.tolist()]  # the one host sync per evaluation
        corrects = correct_sum.tolist()
        train_s = time.perf_counter() - seg_start
        lr = lr_at(step, cfgs[0].optim, t.steps)
        for i in list(alive):
            if not math.isfinite(losses[i]):
                k = group[i]
                bad[k] = divergence_message(out_dirs[k] / "checkpoints", step - since_eval, step)
                alive.remove(i)
        evals = {}
        for i in alive:
            t0 = time.perf_counter()
            metrics, heads = evaluate(trainer.models[i], datas[group[i]], cfgs[group[i]])
            evals[i] = (metrics, heads, time.perf_counter() - t0)
        total_eval = sum(e[2] for e in evals.values())
        save = step % t.checkpoint_every == 0 or step == t.steps or step == stop
        for i in alive:
            k, state = group[i], states[i]
            metrics, heads, eval_s = evals[i]
            state.wall_s += train_s + total_eval
            row = evaluation_row(cfgs[k], step, since_eval, losses[i], corrects[i], lr, metrics, train_s, eval_s,
                                 state.wall_s)
            files = log_evaluation(out_dirs[k], state, row, heads)
            saved = None
            if save:
                saved = save_checkpoint(out_dirs[k], cfgs[k], state, files, trainer.model_state(i),
                                        trainer.optimizer_state(i, step, lr))
            last[k] = row
            if i == alive[0]:
                bar.update(step, row, saved)
            if on_eval is not None:
                on_eval(k, row, saved)
        if not alive:
            break
        loss_sum.zero_()
        correct_sum.zero_()
        since_eval, seg_start = 0, time.perf_counter()
    bar.close()
    return last, bad


__all__ = [
    "train_packed",
    "check_packable",
    "PackedTrainer",
    "PackedModels",
    "PackedAdamW",
    "PackedTrainingDiverged",
    "PER_MODEL_KEYS",
    "data_for",
]
