"""What a run needs on a machine, and building a model only where it fits.

Before any work starts, so an impossible run ends as one :class:`~icl.errors.UserError` with
the numbers, not as a traceback (or an attempt to allocate 128 TB) minutes later:

- :func:`footprint`: the memory a run needs, estimated from the config alone. The model is
  built on PyTorch's ``meta`` device (shapes, no storage) and run on one sequence there, so
  the estimate follows the real architecture without duplicating it:
  parameters x 4 (weights, gradients, AdamW's two moments) + the image bank and evaluation
  sets + the larger of a training batch's activations (every layer's output, as autograd
  keeps them) and an evaluation batch's activations (the largest layer outputs and the
  attention patterns) plus an evaluation set's logits. An estimate in fp32, meant to catch
  configs that are off by orders of magnitude, not to plan memory to the megabyte.
- :func:`check_fits`: the footprint against the device's memory (:mod:`icl.machine`).
- :func:`check_model_fits_host`: the parameters alone against the host memory; what
  :func:`build_model` checks before it allocates anything.

Why here and not in :mod:`icl.model.transformer` or :mod:`icl.machine`: the check needs both
the model and the machine, and neither of those needs the other.
"""

from __future__ import annotations

import functools
from dataclasses import astuple, dataclass

import torch

from icl import machine  # by module attribute: the tests replace host_memory
from icl.config import N_CHARACTERS, N_DRAWERS, SEQ_LEN, Config, ModelConfig
from icl.errors import UserError
from icl.machine import gib
from icl.model.hooks import run_with_cache
from icl.model.transformer import SequenceModel

FLOAT_BYTES = 4  # fp32: the estimate does not count on bf16 savings
STATE_COPIES = 5  # weights, gradients, AdamW exp_avg and exp_avg_sq, decay compensation (at most one per weight)
N_EVAL_SETS = 3  # icl, iwl, icl_train
SIZE_KEYS = "model.layers, model.d_model, model.mlp, train.batch_size, eval.batch_size, eval.n_sequences"


@dataclass(frozen=True)
class Footprint:
    """Estimated bytes of one run (``models`` runs for a pack) on its device."""

    parameters: int  # weights and buffers of one model
    state: int  # weights, gradients and AdamW moments of every model
    data: int  # image bank and evaluation sets
    training: int  # activations of a training batch (every model)
    evaluation: int  # activations of an evaluation batch plus one evaluation set's logits

    @property
    def total(self) -> int:
        return self.state + self.data + max(self.training, self.evaluation)

    def describe(self) -> str:
        return (f"about {gib(self.total)}: model state {gib(self.state)}, data {gib(self.data)}, "
                f"training activations {gib(self.training)}, evaluation {gib(self.evaluation)}")


def _meta_model(cfg: Config) -> torch.nn.Module:
    """The model of ``cfg`` with shapes but no storage; the global RNG is left untouched (the
    trainer seeds the real model from it)."""
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        return SequenceModel(cfg.model, cfg.data.image_size, cfg.data.num_classes)


@functools.lru_cache(maxsize=64)
def _architecture_bytes(model: tuple, image_size: int, num_classes: int) -> int:
    """Parameter and buffer bytes of one architecture (``model``: ``astuple(cfg.model)``), built
    once per process: a sweep's grid checks the same few architectures for every model."""
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        return _parameter_bytes(SequenceModel(ModelConfig(*model), image_size, num_classes))


def _parameter_bytes(model: torch.nn.Module) -> int:
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def _activations_per_sequence(model: torch.nn.Module, image_size: int) -> tuple[int, int]:
    """Bytes per sequence of (every layer's output, what an evaluation holds at once), from a
    forward pass on the meta device. Training keeps every output for the backward pass; an
    evaluation (no gradients) holds about the largest layer's input and output at a time, plus the
    attention patterns of every layer, which it returns."""
    sizes: list[int] = []

    def record(module: torch.nn.Module, inputs: object, output: object) -> None:
        for t in output if isinstance(output, tuple) else (output,):
            if isinstance(t, torch.Tensor):
                sizes.append(t.numel())

    leaves = [m for m in model.modules() if not any(True for _ in m.children())]
    hooks = [m.register_forward_hook(record) for m in leaves]
    try:
        with torch.no_grad():
            images = torch.zeros(1, SEQ_LEN, image_size, image_size, device="meta")
            labels = torch.zeros(1, SEQ_LEN, dtype=torch.long, device="meta")
            _, cache = run_with_cache(model, images, labels, names_filter=lambda n: n.endswith("attn.hook_pattern"))
    finally:
        for h in hooks:
            h.remove()
    patterns = sum(t.numel() for t in cache.values())
    every = sum(sizes) + patterns
    at_once = 2 * max(sizes) + patterns
    return every * FLOAT_BYTES, at_once * FLOAT_BYTES


def footprint(cfg: Config, models: int = 1) -> Footprint:
    """The memory ``cfg`` needs on its device (``models``: a pack of that many models)."""
    model = _meta_model(cfg)
    params = _parameter_bytes(model)
    every, at_once = _activations_per_sequence(model, cfg.data.image_size)
    d, e = cfg.data, cfg.eval
    images = N_CHARACTERS * N_DRAWERS * d.image_size**2  # uint8
    eval_sets = N_EVAL_SETS * e.n_sequences * SEQ_LEN * 3 * 8  # classes, labels, exemplars: int64
    logits = 2 * e.n_sequences * d.num_classes * FLOAT_BYTES  # the chunks, then their concatenation
    return Footprint(
        parameters=params,
        state=STATE_COPIES * params * models,
        data=images + eval_sets,
        training=cfg.train.batch_size * every * models,
        evaluation=(min(e.batch_size, e.n_sequences) * at_once + logits) * models,
    )


def check_fits(cfg: Config, device: torch.device | str, models: int = 1) -> Footprint:
    """:class:`UserError` with the estimate and the limit if the run cannot fit on ``device``."""
    device = torch.device(device)
    need, have = footprint(cfg, models), machine.device_memory(device)
    if need.total > have:
        raise UserError(
            f"this config needs {need.describe()}; {device} has {gib(have)}; make it smaller ({SIZE_KEYS})"
        )
    return need


def check_model_fits_host(cfg: Config) -> int:
    """:class:`UserError` if the model's training state alone exceeds this machine's memory
    (where a model is built before it moves to its device); returns the parameter bytes."""
    params = _architecture_bytes(astuple(cfg.model), cfg.data.image_size, cfg.data.num_classes)
    need, have = STATE_COPIES * params, machine.host_memory()
    if need > have:
        n = params // FLOAT_BYTES
        raise UserError(
            f"the model has about {n:,} parameters: training it needs {gib(need)} (weights, gradients, "
            f"AdamW moments), more than this machine's {gib(have)}; make model.mlp, model.d_model or "
            "model.layers smaller"
        )
    return params


def build_model(cfg: Config, vocab: int | None = None) -> SequenceModel:
    """The model for a config; parameters are initialised from ``torch``'s global RNG, which
    the trainer seeds from ``cfg.seed`` first. A model whose training state cannot fit in
    this machine's memory is refused before anything is allocated."""
    check_model_fits_host(cfg)
    return SequenceModel(cfg.model, cfg.data.image_size, vocab or cfg.data.num_classes)


__all__ = ["Footprint", "footprint", "check_fits", "check_model_fits_host", "build_model"]
