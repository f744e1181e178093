"""This machine: the device a config names, and how much memory there is.

The config's own checks (:func:`icl.config.validate`) cannot know the machine; these can,
and they run before any work starts, so an impossible run ends as one
:class:`~icl.errors.UserError` with the numbers, not as a traceback minutes later:

- :func:`resolve_device`: ``auto``/``cpu``/``cuda[:N]`` -> a device that exists here.
- :func:`device_memory`: a GPU's total memory; on the CPU :func:`host_memory`, the machine's
  physical memory or its cgroup limit, whichever is smaller.

What a run needs, set against these, is :mod:`icl.model.footprint`'s (it knows the model;
this module knows only the machine, so the model can be built on top of both).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from icl.errors import UserError


def gib(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB" if n >= 2**30 / 10 else f"{n / 2**20:,.1f} MiB"


# --------------------------------------------------------------------------- devices


def resolve_device(name: str) -> torch.device:
    """The device ``train.device`` names (``auto``: CUDA if present, else the CPU), checked
    to exist on this machine."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)  # the config's pattern allows cpu, cuda and cuda:N only
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"train.device={name} but no CUDA device is available; use train.device=auto or cpu")
        count = torch.cuda.device_count()
        if (device.index or 0) >= count:
            raise UserError(
                f"train.device={name} but this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}; "
                "choose one of them or train.device=auto"
            )
    return device


def synchronize(device: torch.device) -> None:
    """Wait until ``device`` has done the work queued on it, so that a clock read next counts
    that work (a GPU runs behind the host; the CPU's operators finish as they are called)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def host_memory() -> int:
    """Bytes of memory this process may use: physical memory, or a smaller cgroup limit."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit_file).read_text().strip()
        except (OSError, ValueError):
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def device_memory(device: torch.device) -> int:
    """Bytes of memory on ``device``: a GPU's total memory, or :func:`host_memory`."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device.index or 0).total_memory
    return host_memory()


__all__ = ["resolve_device", "synchronize", "host_memory", "device_memory", "gib"]
