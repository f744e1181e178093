"""Analysis of ICL vs IWL sweeps: load results, summarise cells, judge the hypothesis, plot, report.

Notebook use::

    from analysis import load_results, summarize, trial_summary, verdict
    df = load_results("experiments/study")          # tidy: one row per trial and evaluation
    summary = summarize(df)                         # one row per cell, mean/sd and 95% intervals over seeds
    print(verdict(summary, trial_summary(df)))      # the STUDY.md success criterion, both parts
    from analysis.plots import plot_curves
    plot_curves(df, logx=True)                      # a matplotlib Figure

The same from the shell: ``icl-analyze experiments/study`` (see ``analysis/README.md``).
"""

from analysis.load import CLASS_KEY, SEED_KEY, WD_KEY, load_results
from analysis.summary import ONSET_THRESHOLD, STATS, cell_keys, missing_cells, summarize, trial_summary
from analysis.verdict import COLLAPSE_FRACTION, RATIO, Verdict, verdict
from icl.metrics import ICL, IWL, TRAIN_ACC

__all__ = [
    "CLASS_KEY",
    "WD_KEY",
    "SEED_KEY",
    "ICL",
    "IWL",
    "TRAIN_ACC",
    "ONSET_THRESHOLD",
    "RATIO",
    "COLLAPSE_FRACTION",
    "STATS",
    "Verdict",
    "load_results",
    "cell_keys",
    "trial_summary",
    "summarize",
    "missing_cells",
    "verdict",
]
