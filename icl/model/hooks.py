"""Hook points with TransformerLens names: read or change any activation of the model.

A :class:`HookPoint` is an ``nn.Identity`` sitting on one activation (``blocks.1.attn.hook_z``,
``blocks.0.hook_resid_post``, ...). With nothing attached it is a plain Python call that
returns its input: no operator reaches the device, so training (also through
``torch.func.functional_call`` under ``torch.vmap`` on a weightless template) launches exactly
the kernels it launched before the hook points existed (``tests/train/test_kernels.py``).

Vocabulary as in TransformerLens: a hook function ``fn(activation, hook) -> activation | None``
(None keeps the activation); :func:`run_with_hooks` runs the model with hooks attached for one
call; :func:`run_with_cache` returns the logits and an :class:`ActivationCache` (name ->
tensor). Interventions are hooks: :func:`ablate_head` (zero, or a given mean) and
:func:`set_pattern`.

Shapes (``T`` = 17 tokens, ``e`` = d_model / heads):

- ``hook_embed`` ``[B, T, d]``: image and label tokens before the positional code;
- ``blocks.{l}.hook_resid_pre``, ``hook_resid_mid`` (models with an MLP), ``hook_resid_post``
  ``[B, T, d]``; ``hook_attn_out``, ``hook_mlp_out`` ``[B, T, d]``: what attention / the MLP add;
- ``blocks.{l}.attn.hook_q``, ``hook_k``, ``hook_v``, ``hook_z`` ``[B, T, H, e]``
  (``z``: each head's output before the output projection);
- ``blocks.{l}.attn.hook_attn_scores`` (scaled, causally masked, before softmax) and
  ``hook_pattern`` ``[B, H, T, T]`` (query position, key position). Attaching a hook to either
  makes that layer compute attention explicitly (einsum + softmax) instead of the fused kernel.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

HookFn = Callable[[Tensor, "HookPoint"], "Tensor | None"]
Hook = tuple[str, HookFn]
NamesFilter = None | str | Sequence[str] | Callable[[str], bool]


class HookPoint(nn.Identity):
    """An identity on one named activation; hooks added with :meth:`add_hook` see it (and may
    replace it). ``name`` is its path in the model, set when the model is built."""

    def __init__(self) -> None:
        super().__init__()
        self.name = ""

    @property
    def active(self) -> bool:
        """Whether any hook is attached (a plain Python check, no device work)."""
        return bool(self._forward_hooks)

    def add_hook(self, fn: HookFn) -> RemovableHandle:
        return self.register_forward_hook(lambda _module, _args, output: fn(output, self))


def name_hook_points(model: nn.Module) -> None:
    """Give every hook point its path in ``model`` (called at the end of the model's init)."""
    for name, module in model.named_modules():
        if isinstance(module, HookPoint):
            module.name = name


def hook_points(model: nn.Module) -> dict[str, HookPoint]:
    return {name: m for name, m in model.named_modules() if isinstance(m, HookPoint)}


def _selector(names: NamesFilter) -> Callable[[str], bool]:
    if names is None:
        return lambda _name: True
    if callable(names):
        return names
    wanted = {names} if isinstance(names, str) else set(names)
    return wanted.__contains__


@contextmanager
def hooks(model: nn.Module, fwd_hooks: Sequence[Hook]) -> Iterator[None]:
    """Attach ``(name, fn)`` hooks for the duration of the block; always detached after."""
    points = hook_points(model)
    handles = []
    try:
        for name, fn in fwd_hooks:
            if name not in points:
                raise KeyError(f"no hook point {name!r}; e.g. {', '.join(list(points)[:6])}, ...")
            handles.append(points[name].add_hook(fn))
        yield
    finally:
        for h in handles:
            h.remove()


class ActivationCache(dict):
    """Activation name -> tensor (detached), as TransformerLens's cache is indexed."""

    def stack(self, suffix: str) -> Tensor:
        """The activations of every layer named ``blocks.{l}.<suffix>``, stacked on dim 1
        (``"attn.hook_pattern"`` -> ``[B, L, H, T, T]``)."""
        layers = sorted(int(k.split(".")[1]) for k in self if k.startswith("blocks.") and k.endswith("." + suffix))
        return torch.stack([self[f"blocks.{l}.{suffix}"] for l in layers], dim=1)


@contextmanager
def capture(model: nn.Module, names_filter: NamesFilter = None) -> Iterator[ActivationCache]:
    """Record the selected activations of every forward run inside the block (the latest
    call's values; a caller that runs several batches reads the cache after each)."""
    cache = ActivationCache()
    keep = _selector(names_filter)

    def save(act: Tensor, hook: HookPoint) -> None:
        cache[hook.name] = act.detach()

    with hooks(model, [(name, save) for name in hook_points(model) if keep(name)]):
        yield cache


def run_with_hooks(model: nn.Module, *args: Tensor, fwd_hooks: Sequence[Hook] = ()) -> Tensor:
    with hooks(model, fwd_hooks):
        return model(*args)


def run_with_cache(model: nn.Module, *args: Tensor, names_filter: NamesFilter = None,
                   fwd_hooks: Sequence[Hook] = ()) -> tuple[Tensor, ActivationCache]:
    """The model's output and the selected activations (after ``fwd_hooks`` acted on them)."""
    with hooks(model, fwd_hooks), capture(model, names_filter) as cache:
        out = model(*args)
    return out, cache


# --------------------------------------------------------------------------- interventions


def ablate_head(layer: int, head: int, mean: Tensor | None = None) -> Hook:
    """Remove head ``(layer, head)``'s contribution: its ``z`` (output before the projection)
    becomes zero, or ``mean`` (``[T, e]``, e.g. its mean over the ICL set). Zeroing ``z`` is
    icl-dynamics' ``--opto_ablate_heads`` (``opto.make_fn_from_opts`` zeroes the head's values,
    hence its ``z``); the projection's bias stays, as there."""

    def fn(z: Tensor, _hook: HookPoint) -> Tensor:
        z = z.clone()
        z[:, :, head] = 0.0 if mean is None else mean.to(z.dtype)
        return z

    return f"blocks.{layer}.attn.hook_z", fn


def set_pattern(layer: int, head: int, pattern: Tensor) -> Hook:
    """Clamp head ``(layer, head)``'s attention pattern to ``pattern`` (``[T, T]`` or
    ``[B, T, T]``, rows summing to 1), as icl-dynamics' induction / previous-token clamps do."""

    def fn(p: Tensor, _hook: HookPoint) -> Tensor:
        p = p.clone()
        p[:, head] = pattern.to(p.dtype)
        return p

    return f"blocks.{layer}.attn.hook_pattern", fn
