"""Count what a piece of training code asks of the device: kernels and host synchronisations.

A tiny model on a GPU is bound by how many kernels the host launches per step and by every
point where the host waits for the device, not by arithmetic. Both can be counted on any
device, the CPU included, by watching the ATen operators that reach a kernel
(``TorchDispatchMode``, after ``vmap``'s batching rules): tests use this to hold the step
loop to "no synchronisation" and "sampling costs the same kernels for any pack size", and
``benchmarks/dispatch_count.py`` reports the counts.
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Operators whose result the host must read from the device (a synchronisation on a GPU).
SYNCING = frozenset({
    "aten._local_scalar_dense.default",  # .item(), int(t), float(t), bool(t)
    "aten.nonzero.default", "aten.masked_select.default", "aten.unique.default",
    "aten._unique2.default", "aten.equal.default", "aten.is_nonzero.default",
})


# Operators that only make a new view of existing memory but are not marked as views.
METADATA_ONLY = frozenset({"aten._unsafe_view.default"})


class KernelCounter(TorchDispatchMode):
    """``with KernelCounter() as k: ...`` -> ``k.kernels`` (operators that run a kernel; views,
    which launch none, are counted apart in ``k.views``) and ``k.syncs`` (operators that make
    the host wait for a device value, and copies between devices).

    ``host_tensors``: tensors that live on the host even when training runs on a GPU, whose
    reads are therefore no synchronisation (``torch.optim.AdamW`` keeps its ``step``
    counters on the CPU and reads them every update). On a CPU every tensor is on the host,
    so naming them is what lets a CPU test tell them from device values."""

    def __init__(self, host_tensors: Iterable[torch.Tensor] = ()):
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.views = 0
        self.syncs: list[str] = []
        self.host = {id(t) for t in host_tensors}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func)
        if func.is_view or name in METADATA_ONLY:
            self.views += 1
            return out
        self.ops[name] += 1
        if name in SYNCING and not (args and id(args[0]) in self.host):
            self.syncs.append(name)
        elif name in ("aten._to_copy.default", "aten.copy_.default"):
            src, dst = (args[1], args[0]) if name == "aten.copy_.default" else (args[0], out)
            if isinstance(src, torch.Tensor) and src.device != dst.device:
                self.syncs.append(f"{name} {src.device}->{dst.device}")
        return out

    @property
    def kernels(self) -> int:
        return sum(self.ops.values())
