"""``icl-analyze PATH... [--out DIR]``: summary.csv, plots and report.md for sweeps or runs."""

from __future__ import annotations

from pathlib import Path

from analysis.load import METRICS_CSV, RESULTS_CSV, load_results
from analysis.report import default_out
from analysis.summary import ONSET_THRESHOLD
from analysis.verdict import COLLAPSE_FRACTION, RATIO
from icl.errors import ArgumentParser, UserError, cli_entry
from icl.inputs import user_path
from icl.io import check_writable, remove_stale_temporaries

DESCRIPTION = """\
Analyse sweep results (STORAGE/NAME with results.csv), single runs (RUN with metrics.csv and
config.yaml), or CSV files; several paths are combined. Writes summary.csv (one row per cell:
mean and sd over seeds of peak/final ICL, drop, final IWL and train accuracy, ICL onset), PNG
plots and report.md with the verdict on the study's success criterion. Works on a sweep that
is still running (cells behind or short of seeds are flagged)."""


def _check_out(out: Path, paths: list[str]) -> None:
    """The report never lands on top of its inputs: refuse an --out that holds an input CSV."""
    target = out.resolve()
    for p in map(Path, paths):
        for holder in (p, p.parent) if p.is_file() else (p,):
            if holder.resolve() == target and any((holder / n).exists() for n in (RESULTS_CSV, METRICS_CSV)) \
                    or (p.is_file() and p.parent.resolve() == target):
                raise UserError(f"--out {out} holds input results ({p}); write the report elsewhere, e.g. {out}/report")


@cli_entry
def main(argv: list[str] | None = None) -> int:
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
    parser.add_argument("--x", choices=("step", "sequences"), default="step", help="time axis of the curves")
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

    out = user_path(args.out, "--out") if args.out else default_out(args.paths)
    _check_out(out, args.paths)
    df = load_results(args.paths)
    check_writable(out, "--out", folder=True)  # before the plots: they are the slow part
    remove_stale_temporaries(out)  # left by a report killed while it was written

    import matplotlib

    matplotlib.use("Agg")
    from analysis.report import write_report

    rep = write_report(df, out, threshold=args.threshold, ratio=args.ratio,
                       collapse_fraction=args.collapse_fraction, x=args.x, logx=args.logx, dpi=args.dpi)
    print(f"verdict: {rep.verdict.headline}")
    if rep.verdict.provisional:
        print("(provisional: see 'Data completeness' in the report)")
    cells, trials = len(rep.summary), len(rep.trials)
    print(f"summary: {out / 'summary.csv'} ({cells} cell{'s' * (cells != 1)}, {trials} trial{'s' * (trials != 1)})")
    print(f"plots:   {len(rep.plots)} PNG files in {out}")
    print(f"report:  {rep.path}")
    return 0
