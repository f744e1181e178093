"""``icl-sweep SPEC``: run (or resume) a grid of trainer runs on Ray Tune.

Exit status: 0 every trial finished; 1 some trial failed after its retries (each is listed
with its error); 2 bad input (one ``error:`` line, before any trial starts); 130
interrupted (run the same command again to resume).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from icl.errors import ArgumentParser, UserError, cli_entry
from sweeps.driver import dry_run_table, run_sweep
from sweeps.estimate import estimate
from sweeps.experiment import Experiment, load_experiment
from sweeps.ray_session import RayOptions
from sweeps.spec import shipped_specs
from sweeps.trainable import AfterEval


def build_parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="icl-sweep",
        description="Run a sweep spec (base config x grid) as Ray Tune trials; re-run the same command to resume.",
    )
    p.add_argument("spec", help=f"sweep spec: a .yaml path or a shipped spec ({', '.join(shipped_specs())})")
    p.add_argument("--storage", help="parent directory of the experiment (default: the spec's `storage`)")
    p.add_argument("--name", help="experiment name, i.e. directory under storage (default: the spec's `name`)")
    p.add_argument("--address", help="join a running Ray cluster (HOST:PORT or auto) instead of an embedded Ray")
    p.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key for every trial (repeatable), e.g. --set train.steps=1000",
    )
    p.add_argument("--log-to", action="append", default=[], metavar="TRACKER",
                   help="also send every model's config, cell and metrics to mlflow or wandb (repeatable, or "
                        "a comma list; adds to the spec's log_to); configured by their own environment variables")
    p.add_argument("--dry-run", action="store_true", help="print the trial table and exit; starts nothing")
    p.add_argument("--estimate", action="store_true",
                   help="with --dry-run: time a few steps of the first pack here and print the sweep's model-steps, "
                        "wall time, GPU-hours and disk")
    p.add_argument("--rate-from", type=Path, metavar="FILE.json",
                   help="with --dry-run: take the training rate for --estimate from a benchmarks/throughput.py --json file")
    p.add_argument("--no-analysis", action="store_true", help="do not write the analysis report at the end")
    p.add_argument("--num-cpus", type=int, help="CPUs of the embedded Ray (default: those this process may use)")
    p.add_argument("--num-gpus", type=int, help="GPUs of the embedded Ray (default: those Ray detects)")
    return p


def run(argv: list[str] | None = None, after_eval: Callable[[Experiment], AfterEval] | None = None) -> int:
    """The command; ``after_eval`` makes the trainable's hook for the experiment (tests only:
    tests/sweeps/faulty_sweep.py installs ``sweeps.faults``)."""
    args = build_parser().parse_args(argv)
    exp = load_experiment(args.spec, storage=args.storage, name=args.name, sets=args.sets, log_to=args.log_to)
    if (args.estimate or args.rate_from) and not args.dry_run:
        raise UserError("--estimate and --rate-from go with --dry-run (an estimate starts no sweep)")
    if args.dry_run:
        dry_run_table(exp)
        if args.estimate or args.rate_from:
            print("estimate:   measuring the first pack here ...", flush=True)
            for line in estimate(exp, rate_from=args.rate_from, num_cpus=args.num_cpus, num_gpus=args.num_gpus):
                print(line)
        return 0
    hook = after_eval(exp) if after_eval is not None else None
    return run_sweep(exp, RayOptions(args.address, args.num_cpus, args.num_gpus), analysis=not args.no_analysis,
                     after_eval=hook)


@cli_entry
def main(argv: list[str] | None = None) -> int:
    return run(argv)


if __name__ == "__main__":
    raise SystemExit(main())
