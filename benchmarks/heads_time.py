"""Seconds of head attribution (+ composition) per checkpoint, for a preset, on this machine.

    python benchmarks/heads_time.py --config demo [--config paper] [--device cpu] [--repeats 3]

Times :func:`icl.circuits.over_training.analyse` (what ``icl-analyze heads`` and the sweep's
``heads: true`` run per checkpoint: both ablations of every head and every group of heads on
every fixed evaluation set, the naming, the composition) on an untrained model of each preset (the
cost does not depend on the weights). Loading the data (image bank, fixed evaluation sets) is timed apart: it happens once
per process and is shared by every run of a sweep. Reports the fastest and the median of
``--repeats`` (on a shared machine the fastest is the cost; the median shows the contention) and
the process CPU seconds of the fastest.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from icl.circuits.over_training import analyse, data_for
from icl.config import load_config
from icl.train.loop import initial_model


def time_preset(config: str, device: str, ablations: list[str], repeats: int) -> dict[str, float]:
    cfg = load_config(config, [f"train.device={device}"])
    t0 = time.perf_counter()
    data = data_for(cfg, device)
    data.eval_sets  # noqa: B018 - built lazily: part of loading
    load_s = time.perf_counter() - t0
    model = initial_model(cfg, device)
    runs = []
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        analyse(model, data, cfg, ablations)
        runs.append((time.perf_counter() - w0, time.process_time() - c0))
    fastest = min(runs)
    return {"layers": cfg.model.layers, "heads": cfg.model.heads, "sequences": cfg.eval.n_sequences,
            "data_s": load_s, "fastest_s": fastest[0], "cpu_s": fastest[1],
            "median_s": statistics.median(r[0] for r in runs)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", action="append", default=None, help="preset (repeatable; default demo)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--ablation", nargs="+", default=["zero", "mean"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")
    for config in args.config or ["demo"]:
        r = time_preset(config, args.device, args.ablation, args.repeats)
        print(f"{config}: {r['layers']} layers x {r['heads']} heads, {len(args.ablation)} ablation(s), 5 sets x "
              f"{r['sequences']} sequences: {r['fastest_s']:.1f} s per checkpoint (fastest of {args.repeats}; "
              f"median {r['median_s']:.1f} s; {r['cpu_s']:.1f} CPU s), + {r['data_s']:.1f} s loading the data once")


if __name__ == "__main__":
    main()
