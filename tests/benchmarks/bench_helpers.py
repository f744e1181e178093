"""Loading a script of benchmarks/ as a module (the scripts are not a package), for its tests."""
from __future__ import annotations

import contextlib
import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def load_benchmark(name: str) -> ModuleType:
    """benchmarks/NAME.py, loaded as the module ``bench_NAME``."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def benchmark_module(name: str) -> Iterator[ModuleType]:
    """load_benchmark(NAME), undoing afterwards what the scripts change in this process: torch's
    thread count (they pin it) and sys.path."""
    import torch

    threads, path = torch.get_num_threads(), list(sys.path)
    try:
        yield load_benchmark(name)
    finally:
        torch.set_num_threads(threads)
        sys.path[:] = path
