"""``icl-analyze PATH... [--out DIR]``: summary.csv, plots and report.md for sweeps or runs.
``icl-analyze heads PATH...``: head attribution and composition at every checkpoint of each run."""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path
from typing import Any

from analysis.summary import ONSET_THRESHOLD
from analysis.verdict import COLLAPSE_FRACTION, RATIO
from icl.errors import ArgumentParser, UserError, cli_entry
from icl.inputs import user_path
from icl.io import refuse_inputs
from icl.layout import CHECKPOINTS, CONFIG, METRICS, REPORT, RESULTS, RunLayout
from icl.metrics import STEP, X_LABELS

DESCRIPTION = """\
(`icl-analyze heads RUN...` runs head attribution at every checkpoint; see its --help.)
Analyse sweep results (STORAGE/NAME with results.csv), single runs (RUN with metrics.csv and
config.yaml), or CSV files; several paths are combined. Writes summary.csv (one row per cell:
its effective decay; mean over seeds, with 95% intervals, of the unbiased (cross-fitted) peak
ICL, final ICL and drop; final IWL and train accuracy, ICL onset), PNG plots and report.md with
the verdict on the study's two-part success criterion (reaches 90% of the many-class baseline,
and beats the same classes without decay), and report.html: the same report as one file with
the plots inside, to share. Works on a sweep that is still running (cells behind or short of
seeds are flagged)."""


def _check_out(out: Path, paths: list[str]) -> None:
    """The report never lands on top of its inputs: refuse an --out that holds an input CSV."""
    target = out.resolve()
    for p in map(Path, paths):
        for holder in (p, p.parent) if p.is_file() else (p,):
            if holder.resolve() == target and any((holder / n).exists() for n in (RESULTS, METRICS)) \
                    or (p.is_file() and p.parent.resolve() == target):
                raise UserError(f"--out {out} holds input results ({p}); write the report elsewhere, "
                                f"e.g. {out / REPORT}")


HEADS_DESCRIPTION = """\
Head attribution over training: for every saved checkpoint of each run (a run directory, or any
directory holding run directories, e.g. a sweep's experiment directory) not analysed yet, ablate
each attention head alone (by zero and by its mean over the evaluation set scored) and record
the change in every accuracy metric (RUN/heads.csv), name the ICL heads by causal effect and call
them induction / previous-token heads only where the observational attention scores agree
(RUN/circuit.csv), ablate groups
of heads together (each layer, the top-k heads by induction and previous-token score;
RUN/groups.csv), with paired standard errors for every change, compute the
K-composition of every earlier/later head pair (RUN/composition.csv), and draw RUN/circuits/*.png.
Runs keep only train.keep_checkpoints checkpoints: raise it, or analyse each checkpoint as it is
written (the sweep spec option `heads: true`)."""


def _device(name: str) -> Any:
    """``--device``, checked to exist here (``cuda`` on a machine without one is refused)."""
    from icl.machine import resolve_device

    if not re.fullmatch(r"cpu|auto|cuda(:\d+)?", name):
        raise UserError(f"--device must be cpu, auto, cuda or cuda:N, got {name!r}")
    try:
        return resolve_device(name)
    except UserError as e:
        raise UserError(str(e).replace(f"train.device={name}", f"--device {name}").replace("train.device=", "--device ")) from None


def heads_main(argv: list[str]) -> int:
    parser = ArgumentParser(prog="icl-analyze heads", description=HEADS_DESCRIPTION)
    parser.add_argument("paths", nargs="+", metavar="PATH", help="run dir, or a dir holding run dirs (a sweep)")
    parser.add_argument("--ablation", nargs="+", choices=("zero", "mean"), default=["zero", "mean"],
                        help="ablations to run (default both; heads are named by mean ablation when it is run)")
    parser.add_argument("--device", default="cpu", help="torch device for the models (default cpu)")
    parser.add_argument("--no-plots", action="store_true", help="write the CSV files only")
    parser.add_argument("--dpi", type=int, default=110, help="resolution of the PNG plots (default 110)")
    args = parser.parse_args(argv)
    if not 10 <= args.dpi <= 600:
        raise UserError(f"--dpi must be between 10 and 600, got {args.dpi}")
    device = _device(args.device)
    import matplotlib

    matplotlib.use("Agg")
    from analysis.heads import find_runs, named_heads, write_run_plots
    from icl.circuits import update_run

    runs = find_runs(args.paths)
    if not runs:
        raise UserError(f"no run directory ({CONFIG} + {CHECKPOINTS}/) at or below {', '.join(args.paths)}")
    for run in runs:  # runs of one sweep share their data (icl.circuits.over_training.data_for)
        t0 = time.perf_counter()
        done = update_run(run, ablations=args.ablation, device=device)
        plots = [] if args.no_plots else write_run_plots(run, dpi=args.dpi)
        line = f"{run}: {len(done)} checkpoint(s) analysed"
        if done:
            each = sum(a.seconds for a in done) / len(done)
            c = done[-1].circuit
            line += (f" ({each:.1f} s each, {time.perf_counter() - t0:.1f} s in all); step {done[-1].step:,}: "
                     f"ICL heads: {named_heads(c)}; circuit {'present' if c['circuit'] else 'absent'} "
                     f"(observationally top by induction score: {c['induction_obs_best']}, by previous-token "
                     f"score: {c['prev_obs_best']})")
        print(line + (f"; {len(plots)} plots in {RunLayout(run).plots}" if plots else ""), file=sys.stdout)
    return 0


@cli_entry
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["heads"]:
        return heads_main(argv[1:])
    parser = ArgumentParser(prog="icl-analyze", description=DESCRIPTION)
    parser.add_argument("paths", nargs="+", metavar="PATH",
                        help="experiment dir, run dir, dir of run dirs, or CSV file; several are combined")
    parser.add_argument("--out", metavar="DIR", help="output directory (default: PATH/report for one PATH)")
    parser.add_argument("--threshold", type=float, default=ONSET_THRESHOLD,
                        help=f"ICL onset threshold on icl_acc (default {ONSET_THRESHOLD}; chance is 0.5)")
    parser.add_argument("--ratio", type=float, default=RATIO,
                        help=f"success bar as a fraction of the baseline's peak ICL (default {RATIO})")
    parser.add_argument("--collapse-fraction", type=float, default=COLLAPSE_FRACTION,
                        help="training accuracy below this fraction of the same classes at weight decay 0 counts "
                             f"as collapse (default {COLLAPSE_FRACTION})")
    parser.add_argument("--x", choices=tuple(X_LABELS), default=STEP, help="time axis of the curves")
    parser.add_argument("--logx", action="store_true", help="log time axis for the attention plots "
                        "(the ICL/IWL curves are always drawn both ways)")
    parser.add_argument("--dpi", type=int, default=110, help="resolution of the PNG plots (default 110)")
    args = parser.parse_args(argv)
    if not 0 < args.threshold < 1:
        raise UserError(f"--threshold must be between 0 and 1 (an accuracy), got {args.threshold}")
    if not 0 < args.ratio <= 2:
        raise UserError(f"--ratio must be in (0, 2], got {args.ratio}")
    if not 0 < args.collapse_fraction <= 1:
        raise UserError(f"--collapse-fraction must be in (0, 1], got {args.collapse_fraction}")
    if not 10 <= args.dpi <= 600:
        raise UserError(f"--dpi must be between 10 and 600, got {args.dpi}")

    import matplotlib

    matplotlib.use("Agg")
    from analysis.report import analyze, default_out, summary_lines

    out = user_path(args.out, "--out") if args.out is not None else default_out(args.paths)  # '' is refused
    _check_out(out, args.paths)
    refuse_inputs(out, "--out", {f"input {p}": p for p in args.paths if Path(p).is_file()})
    rep = analyze(args.paths, out, threshold=args.threshold, ratio=args.ratio,
                  collapse_fraction=args.collapse_fraction, x=args.x, logx=args.logx, dpi=args.dpi)
    print("\n".join(summary_lines(rep)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
