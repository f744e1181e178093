"""Kernel launches per training step, counted on any device: the GPU cost this project fights.

    python benchmarks/dispatch_count.py [--config tiny] [--set k=v ...] [--pack 1 4 16 64] [--json FILE]

A tiny model on a GPU is bound by how many kernels the host launches per step, not by
arithmetic (STUDY.md's model: 12 layers, width 64, batch 32). This script counts the
kernels the packed trainer launches per step (:class:`icl.train.kernels.KernelCounter`) for
several pack sizes K, split into *sampling* (making the K batches) and the *rest* (forward,
backward, AdamW, with AdamW in one pass over the pack as on CUDA), and lists every operator
in the step that makes the host wait for the device (``.item()``, ``nonzero``,
device-to-host copies). Counts are the same on CPU and GPU for the same code, so
they can be measured here. Ideal: counts that do not grow with K (one set of kernels for the
whole pack) and no synchronising operator at all. Also reported: CPU wall time per sampling
call (what the host spends building the K batches).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from throughput import pack_configs  # noqa: E402

from icl.config import load_config  # noqa: E402
from icl.data import load_data  # noqa: E402
from icl.train.kernels import KernelCounter  # noqa: E402
from icl.train.step import PackedTrainer  # noqa: E402


def count(fn) -> KernelCounter:
    with KernelCounter() as c:
        fn()
    return c


def measure(config: str, overrides: list[str], packs: list[int], repeats: int, bf16: bool = False) -> list[dict]:
    cfg = load_config(config, [*overrides, "train.device=cpu"])
    shared = load_data(cfg)
    rows = []
    for k in packs:
        trainer = PackedTrainer.fresh(pack_configs(cfg, k, [0.0, 1e-3]), shared, mixed=bf16)
        trainer.optimizer.schedule(1, 100)
        trainer.optimizer.single_pass()  # AdamW as on CUDA
        trainer.step(1)  # warm-up: caches, allocator (eager: on CUDA the graph replays this step)
        sampling = count(lambda: trainer.batch(1))
        step = count(lambda: trainer.step(2))
        t0 = time.perf_counter()
        for i in range(repeats):
            trainer.batch(i)
        ms = (time.perf_counter() - t0) / repeats * 1e3
        row = {"pack": k, "sampling_ops": sampling.kernels, "step_ops": step.kernels,
               "rest_ops": step.kernels - sampling.kernels, "casts_in_step": step.ops["aten._to_copy.default"],
               "syncs_in_step": step.syncs,
               "sampling_ms_cpu": round(ms, 3)}
        rows.append(row)
        print(f"K={k:3d}: sampling {row['sampling_ops']:5d} ops ({ms:7.2f} ms on CPU), "
              f"rest of the step {row['rest_ops']:5d} ops ({row['casts_in_step']} casts), "
              f"syncing ops in the step: {step.syncs or 'none'}")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="tiny")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--pack", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--repeats", type=int, default=20, help="sampling calls timed per pack size")
    p.add_argument("--bf16", action="store_true",
                   help="the bf16 step (weight copies), with CPU autocast standing in for CUDA's")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    torch.set_num_threads(1)
    rows = measure(args.config, args.overrides, args.pack, args.repeats, args.bf16)
    if args.json:
        args.json.write_text(json.dumps({"config": args.config, "overrides": args.overrides, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
