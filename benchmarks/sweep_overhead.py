"""Sweep overhead: the wall time of ``icl-sweep SPEC`` against its trials' own training time.

    python benchmarks/sweep_overhead.py [SPEC] [--address ADDR] [--num-cpus N] [--keep DIR]

Runs the sweep (default: the shipped ``smoke`` spec, embedded Ray, no analysis report) in a
fresh storage directory and prints:
- the sweep's wall time, from starting the command to its exit (Python and Ray start-up,
  worker processes, data loading, Tune's bookkeeping, the tables);
- the trials' own time: each trial's final ``wall_s`` (the trainer's training + evaluation
  time, which excludes its start-up), summed, and that sum divided by the number of trials
  that can run at once (the best a perfect scheduler could do on this machine);
- the overhead: wall time minus that ideal, absolute and as a factor.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from sweeps.runner import machine_cpus
from sweeps.spec import load_spec


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("spec", nargs="?", default="smoke")
    p.add_argument("--address", help="join this Ray cluster instead of starting an embedded Ray")
    p.add_argument("--num-cpus", type=int, help="size of the embedded Ray (default: this machine's)")
    p.add_argument("--keep", help="storage directory to use and keep (default: a temporary one, deleted)")
    args = p.parse_args()

    spec = load_spec(args.spec)
    storage = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="icl-sweep-bench-"))
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

    df = pd.read_csv(storage / spec.name / "results.csv")
    own = df.groupby("trial_id")["wall_s"].max()
    cpus = args.num_cpus or machine_cpus()
    slots = max(1, int(cpus // spec.resources.cpu))
    if spec.max_concurrent:
        slots = min(slots, spec.max_concurrent)
    slots = min(slots, len(own))
    ideal = own.sum() / slots
    print(f"spec {args.spec}: {len(own)} trials, {slots} at a time ({cpus} CPUs, {spec.resources.cpu:g} per trial)")
    print(f"sweep wall time:                 {wall:7.1f} s")
    print(f"trials' own time (sum of wall_s): {own.sum():7.1f} s  (per trial: " + ", ".join(f"{v:.1f}" for v in own) + ")")
    print(f"ideal wall time on {slots} slot(s):     {ideal:7.1f} s")
    print(f"overhead:                        {wall - ideal:7.1f} s  (wall / ideal = {wall / ideal:.1f}x)")
    if not args.keep:
        import shutil

        shutil.rmtree(storage, ignore_errors=True)
    else:
        print(f"experiment kept in {storage / spec.name}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
