"""Sweep overhead: the wall time of ``icl-sweep SPEC`` against its trials' own training time.

    python benchmarks/sweep_overhead.py [SPEC] [--address ADDR] [--num-cpus N] [--keep DIR]

Runs the sweep (default: the shipped ``smoke`` spec, embedded Ray, no analysis report) in a
fresh storage directory and prints:
- the sweep's wall time, from starting the command to its exit (Python and Ray start-up,
  worker processes, data loading, Tune's bookkeeping, the tables);
- the trials' own time: each Tune trial's (pack's) final ``wall_s``, the trainer's training +
  evaluation time, which excludes its start-up (the models of a pack share theirs), summed,
  and that sum divided by the number of trials that can run at once (the best a perfect
  scheduler could do on this machine);
- the overhead: wall time minus that ideal, absolute and as a factor.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from icl.layout import TRIAL_ID, ExperimentDir
from icl.metrics import WALL_S
from sweeps.progress import concurrency
from sweeps.ray_session import machine_cpus
from sweeps.experiment import load_experiment


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("spec", nargs="?", default="smoke")
    p.add_argument("--address", help="join this Ray cluster instead of starting an embedded Ray")
    p.add_argument("--num-cpus", type=int, help="size of the embedded Ray (default: this machine's)")
    p.add_argument("--keep", help="storage directory to use and keep (default: a temporary one, deleted)")
    args = p.parse_args()

    storage = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="icl-sweep-bench-"))
    try:
        return measure(args, storage)
    finally:
        if not args.keep:
            shutil.rmtree(storage, ignore_errors=True)


def measure(args: argparse.Namespace, storage: Path) -> int:
    exp = load_experiment(args.spec, storage=str(storage))
    spec, packs = exp.spec, exp.packs
    cmd = [sys.executable, "-m", "sweeps.cli", args.spec, "--storage", str(storage), "--no-analysis"]
    if args.address:
        cmd += ["--address", args.address]
    elif args.num_cpus:
        cmd += ["--num-cpus", str(args.num_cpus)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        return proc.returncode

    df = pd.read_csv(ExperimentDir(spec.exp_dir).results)
    per_model = df.groupby(TRIAL_ID)[WALL_S].max()
    own = pd.Series({pk.pack_id: per_model[list(pk.trial_ids)].max() for pk in packs})
    cpus = args.num_cpus or machine_cpus()
    slots = min(concurrency(spec.resources, cpus, 0.0, spec.max_concurrent), len(own))
    ideal = own.sum() / slots
    print(f"spec {args.spec}: {len(per_model)} models in {len(own)} trials, {slots} at a time "
          f"({cpus} CPUs, {spec.resources.cpu:g} per trial)")
    print(f"sweep wall time:                  {wall:7.1f} s")
    print(f"trials' own time (sum of wall_s): {own.sum():7.1f} s  (per trial: "
          + ", ".join(f"{v:.1f}" for v in own) + ")")
    print(f"ideal wall time on {slots} slot(s):     {ideal:7.1f} s")
    print(f"overhead:                         {wall - ideal:7.1f} s  (wall / ideal = {wall / ideal:.1f}x)")
    if args.keep:
        print(f"experiment kept in {spec.exp_dir}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
