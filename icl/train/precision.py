"""Precision, in one place: the dtype of weights and pixels, bf16 autocast, and the bf16 copies
a pack's forward reads.

``train.precision``:

- ``fp32`` (default): float32 weights, pixels and arithmetic;
- ``fp64``: float64 throughout, for numerical checks (rounding differences then stay far below
  any tolerance, even where training dynamics amplify them);
- ``bf16``: float32 weights and optimiser state, the forward and backward under bf16 autocast,
  on CUDA only (autocast's bf16 on the CPU is another kernel set: a run that says bf16 and
  trained elsewhere would not be the run it says).

Under bf16 a pack keeps a bf16 copy of the weights autocast would cast (the Linear and Conv
weights, :func:`autocast_weights`) and of constant matmul buffers (a module's
``LOW_PRECISION_BUFFERS``: the frozen projection), :class:`LowPrecisionCopies`: autocast then
finds its operands in bf16 already and casts no weight, where it would launch a cast per weight
per step. The numbers are autocast's: the same rounding of the same fp32 weights.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from icl.config import Config
from icl.errors import UserError

LOW = torch.bfloat16  # the low precision of bf16 training


def param_dtype(cfg: Config) -> torch.dtype:
    """The dtype of parameters and pixels: float64 for ``fp64``, float32 otherwise (bf16 is
    autocast over float32 weights)."""
    return torch.float64 if cfg.train.precision == "fp64" else torch.float32


def mixed_precision(cfg: Config, device: torch.device) -> bool:
    """bf16 autocast: on CUDA when ``train.precision`` is bf16."""
    return cfg.train.precision == "bf16" and device.type == "cuda"


def check_precision(cfg: Config, device: torch.device) -> None:
    """UserError for bf16 on a device that is not CUDA: never a run that says bf16 and trained
    in fp32."""
    if cfg.train.precision == "bf16" and device.type != "cuda":
        raise UserError(f"train.precision=bf16 needs a GPU (bf16 autocast runs on CUDA only) but this run would "
                        f"train on {device.type} (train.device={cfg.train.device}); set train.precision=fp32 to "
                        "train here")


def autocast(cfg: Config, device: torch.device, enabled: bool | None = None):
    """bf16 autocast where :func:`mixed_precision` says (or ``enabled``). Its weight-cast cache is
    off: the trainer hands autocast bf16 weights already (nothing to cache), and a cache is
    unsafe under CUDA-graph capture."""
    on = mixed_precision(cfg, device) if enabled is None else enabled
    return torch.autocast(device_type=device.type, dtype=LOW, enabled=on, cache_enabled=False)


def autocast_weights(model: nn.Module) -> set[str]:
    """The parameters bf16 autocast casts at every use: those of Linear and Conv layers."""
    return {
        f"{mod_name}.{name}" if mod_name else name
        for mod_name, module in model.named_modules() if isinstance(module, (nn.Linear, nn.Conv2d))
        for name, _ in module.named_parameters(recurse=False)
    }


def low_precision_buffers(model: nn.Module) -> list[str]:
    """Constant buffers a matmul reads (a module's ``LOW_PRECISION_BUFFERS``: the frozen
    projection), which a bf16 pack keeps a copy of."""
    return [f"{mod_name}.{leaf}" if mod_name else leaf
            for mod_name, module in model.named_modules() for leaf in getattr(module, "LOW_PRECISION_BUFFERS", ())]


class LowPrecisionCopies:
    """The bf16 copies a bf16 pack's forward reads, over a ``[K, N]`` parameter stack whose
    first ``n_cast`` columns are the castable weights (``columns``: their ``(name, shape, start,
    stop)``), and over the stacked constant buffers named ``buffer_names``.

    ``shadow`` (``[K, n_cast]``) is refreshed from the fp32 weights in one kernel per step
    (:meth:`refresh`); the buffers' copies only when weights are loaded (:meth:`refresh_constants`).
    ``stacked`` holds, by name, the views the batched forward reads; ``per_model[k]`` model
    ``k``'s, which its own module reads through ``functional_call``.
    """

    def __init__(self, flat: Tensor, n_cast: int, columns: Sequence[tuple[str, torch.Size, int, int]],
                 buffers: dict[str, Tensor], buffer_names: Sequence[str]):
        self.flat, self.n_cast = flat, n_cast
        k = flat.shape[0]
        self.shadow = flat.new_empty(k, n_cast, dtype=LOW)
        self.stacked: dict[str, Tensor] = {}
        self.per_model: list[dict[str, Tensor]] = [{} for _ in range(k)]
        for name, shape, start, stop in columns:
            self.stacked[name] = self.shadow[:, start:stop].view(k, *shape).requires_grad_(True)
            for i in range(k):
                self.per_model[i][name] = self.shadow[i, start:stop].view(shape).requires_grad_(True)
        self.buffers = {name: buffers[name] for name in buffer_names}
        self.buffer_copies = {name: b.to(LOW) for name, b in self.buffers.items()}
        for name, copy in self.buffer_copies.items():
            for i in range(k):
                self.per_model[i][name] = copy[i]
        self.refresh()

    @torch.no_grad()
    def refresh(self) -> None:
        """Bring the copy of the castable weights up to date (one kernel)."""
        self.shadow.copy_(self.flat[:, : self.n_cast])

    @torch.no_grad()
    def refresh_constants(self) -> None:
        """Bring the copies of constant buffers (the frozen projection) up to date: once made,
        they change only when weights are loaded into the pack, so never per step."""
        for name, copy in self.buffer_copies.items():
            copy.copy_(self.buffers[name])
