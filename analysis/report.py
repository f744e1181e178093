"""``report.md`` (+ ``summary.csv``, the PNG plots and ``report.html``, all of it in one file)
for one or several experiments.

:func:`analyze` (load, check the output folder, :func:`write_report`) is what ``icl-analyze``
runs and what a sweep calls when it finishes; every file is written atomically and the files
appear together (or, when a write fails, not at all), so a reader (or a sweep refreshing the report while it runs) never sees a
half-written report.
"""

from __future__ import annotations

import datetime as _dt
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from icl.io import all_or_nothing, atomic_write, check_writable, remove_stale_temporaries

from analysis.fmt import (cell_label, fmt_number, fmt_shrink, markdown_table, mean_ci, mean_std, seed_list,
                          seed_spread, short_key, step_mean_std)
from analysis.html import report_html
from analysis.load import is_missing, load_results
from analysis.summary import CROSS_FIT, ONSET_THRESHOLD, missing_cells, summarize, trial_summary
from analysis.verdict import COLLAPSE_FRACTION, RATIO, Verdict, summary_keys, verdict
from icl.errors import UserError
from icl.layout import REPORT, SUMMARY, ReportDir
from icl.metrics import DECAY_EXP, N_EVAL


@dataclass
class Report:
    """What :func:`write_report` produced, for callers that want more than the files."""

    path: Path
    summary: pd.DataFrame
    trials: pd.DataFrame
    verdict: Verdict
    plots: dict[str, Path]


def format_summary(summary: pd.DataFrame) -> pd.DataFrame:
    """The per-cell summary as strings, one row per cell, for the report: ICL figures as mean
    [95% interval], the others as mean ± sd, the peers' evaluators as all labels / in context."""
    keys = summary_keys(summary)
    out = pd.DataFrame()
    for k in keys:
        out[short_key(k)] = [fmt_number(v) if k != "experiment" else str(v) for v in summary[k]]
    out["shrink"] = [fmt_shrink(v) for v in summary[DECAY_EXP]]
    seeds = []
    for _, r in summary.iterrows():
        txt = str(int(r["n_seeds"]))
        if not r["seeds_complete"]:
            txt += f" (missing {r['missing_seeds']})"
        seeds.append(txt)
    out["seeds"] = seeds

    def ci(stat: str) -> list[str]:
        return [mean_ci(m, lo, hi) for m, lo, hi in zip(summary[f"{stat}_mean"], summary[f"{stat}_lo"],
                                                         summary[f"{stat}_hi"])]

    def sd(stat: str) -> list[str]:
        return [mean_std(m, s) for m, s in zip(summary[f"{stat}_mean"], summary[f"{stat}_std"])]

    out["peak ICL"] = [txt + ("" if m == CROSS_FIT else " (raw max)") for txt, m in
                       zip(ci("peak_icl"), summary["peak_method"])]
    out["raw max (biased)"] = [mean_std(m, None) for m in summary["peak_icl_raw_mean"]]
    out["peak step"] = [step_mean_std(m, s) for m, s in zip(summary["peak_step_mean"], summary["peak_step_std"])]
    out["final ICL"] = ci("final_icl")
    out["drop"] = ci("icl_drop")
    out["final IWL"] = sd("final_iwl")
    out["final train acc"] = sd("final_train_acc")
    for stat, title in (("final_ciwl", "final CIWL"), ("final_flip_ctx", "final flip: context"),
                        ("final_flip_iwl", "final flip: weights")):
        both = [summary[f"{x}_mean"] for x in (stat, f"{stat}_inctx")]
        if any(b.notna().any() for b in both):  # results logged before the evaluators existed lack them
            out[f"{title} (all / in ctx)"] = [" / ".join("–" if is_missing(v) else f"{v:.3f}" for v in pair)
                                              for pair in zip(*both)]
    out["ICL onset step"] = [
        "never" if n == 0 else step_mean_std(m, s) + ("" if n == ns else f" ({n} of {ns} seeds)")
        for m, s, n, ns in zip(summary["icl_onset_step_mean"], summary["icl_onset_step_std"], summary["icl_onset_n"],
                               summary["n_seeds"])
    ]
    out["last step"] = [
        f"{lo:,.0f}" if lo == hi else f"{lo:,.0f}–{hi:,.0f}" for lo, hi in zip(summary["last_step_min"],
                                                                               summary["last_step_max"])
    ]
    return out


def completeness(summary: pd.DataFrame, grid: dict[str, Any] | None, notes: Sequence[str] = ()) -> list[str]:
    """Plain lines on what the data lacks: seeds, cells, trials still running, double runs."""
    keys = summary_keys(summary)
    expected = summary.attrs.get("expected_seeds") or []
    lines: list[str] = []
    short = summary[~summary["seeds_complete"].astype(bool)]
    for _, r in short.iterrows():
        cell = cell_label({k: r[k] for k in keys})
        lines.append(f"{cell}: {int(r['n_seeds'])} of {len(expected)} seeds (missing seed {r['missing_seeds']}); "
                     "its mean and sd are over the seeds present only.")
    for cell in missing_cells(summary, grid):
        lines.append(f"{cell_label(cell)}: in the spec's grid but no results yet.")
    furthest = summary["last_step_max"].max()
    behind = summary[summary["behind"].astype(bool)]
    if len(behind):
        names = ", ".join(cell_label({k: r[k] for k in keys}) + f" (from step {r['last_step_min']:,.0f})"
                          for _, r in behind.iterrows())
        lines.append(f"Trials not yet at step {furthest:,.0f} (sweep still running, or stopped early): {names}. "
                     "Their \"final\" values are their latest evaluation.")
    twice = summary[summary["n_trials"] > summary["n_seeds"]]
    for _, r in twice.iterrows():
        lines.append(f"{cell_label({k: r[k] for k in keys})}: {int(r['n_trials'])} trials for {int(r['n_seeds'])} "
                     "seed(s); per seed the trial that got furthest is used.")
    lines += list(notes)
    return lines


def estimator_notes(trials: pd.DataFrame) -> list[str]:
    """What the data allows of the peak estimator and the intervals: trials whose peak is the
    raw maximum (no ICL halves: logged before they existed) and trials of unknown set size."""
    lines = []
    raw = trials[(trials["peak_method"] != CROSS_FIT) & trials["peak_icl"].notna()]
    if len(raw):
        lines.append(f"{len(raw)} of {len(trials)} trials have no `icl_acc_even`/`icl_acc_odd` columns (logged before "
                     "the ICL set's halves existed): their peak ICL is the raw maximum over the evaluations, biased "
                     "upward by the evaluation noise (marked \"raw max\" below).")
    unknown = trials[trials[N_EVAL].isna()]
    if len(unknown):
        lines.append(f"{len(unknown)} of {len(trials)} trials have no known evaluation-set size (no run config or "
                     "resolved spec): their intervals cover the spread over seeds only, and a cell with one seed has "
                     "none; their effective decay is shown as ?.")
    return lines


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def _plot_section(title: str, paths: Sequence[tuple[str, Path]], out: Path, text: str = "") -> list[str]:
    lines = [f"## {title}", ""]
    if text:
        lines += [text, ""]
    for alt, p in paths:
        lines += [f"![{alt}]({os.path.relpath(p, out)})", ""]
    return lines


def write_report(
    df: pd.DataFrame,
    out: str | os.PathLike[str],
    threshold: float = ONSET_THRESHOLD,
    ratio: float = RATIO,
    collapse_fraction: float = COLLAPSE_FRACTION,
    x: str = "step",
    logx: bool = False,
    expected_seeds: Sequence[Any] | None = None,
    dpi: int = 110,
) -> Report:
    """Summarise ``df`` (from :func:`analysis.load.load_results`) into ``out``.

    Writes ``summary.csv`` (one row per cell), the PNG plots, ``report.md`` embedding them
    with the summary table, the data's completeness and the verdict on the study's criterion,
    and ``report.html``: the same report as one file with the plots inside, to share.
    """
    from analysis.plots import write_plots  # matplotlib only when plotting

    if x not in df.columns:
        raise UserError(f"cannot put {x!r} on the time axis: the results have no {x} column")
    out = Path(out)
    summary = summarize(df, threshold, expected_seeds)
    trials = trial_summary(df, threshold)
    grid = df.attrs.get("grid") or {}
    v = verdict(summary, trials, ratio=ratio, collapse_fraction=collapse_fraction, grid=grid)
    files = ReportDir(out)
    with all_or_nothing():  # a failed write (a full disk) leaves the previous report whole
        atomic_write(files.summary, summary.to_csv(index=False))
        plots = write_plots(df, summary, out, x=x, logx=logx, ratio=ratio, dpi=dpi)
        text = relative_paths(_render(df, summary, trials, v, plots, out, grid, threshold, ratio, collapse_fraction),
                              df.attrs.get("sources") or [], out)
        atomic_write(files.report, text)
        atomic_write(files.html, report_html(text, out))
    return Report(files.report, summary, trials, v, plots)


def analyze(
    paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    threshold: float = ONSET_THRESHOLD,
    ratio: float = RATIO,
    collapse_fraction: float = COLLAPSE_FRACTION,
    x: str = "step",
    logx: bool = False,
    dpi: int = 110,
    what: str = "--out",
) -> Report:
    """The report of ``paths`` (see :func:`analysis.load.load_results`) written into ``out``:
    what ``icl-analyze`` runs, and a sweep when it finishes. ``out`` is checked to be writable
    before the plots (the slow part; ``what`` names it in the error) and cleared of the
    temporaries of a report killed while it was written. Bad input: :class:`UserError`."""
    df = load_results(paths)
    out = Path(out)
    check_writable(out, what, folder=True)
    remove_stale_temporaries(out)
    return write_report(df, out, threshold=threshold, ratio=ratio, collapse_fraction=collapse_fraction, x=x,
                        logx=logx, dpi=dpi)


def summary_lines(rep: Report) -> list[str]:
    """What ``icl-analyze`` prints about a report it wrote (and a sweep, after its own summary)."""
    cells, trials = len(rep.summary), len(rep.trials)
    files = ReportDir(rep.path.parent)
    lines = [f"verdict: {rep.verdict.headline}"]
    if rep.verdict.provisional:
        lines.append("(provisional: see 'Data completeness' in the report)")
    return lines + [
        f"summary: {files.summary} ({cells} cell{'s' * (cells != 1)}, {trials} trial{'s' * (trials != 1)})",
        f"plots:   {len(rep.plots)} PNG files in {rep.path.parent}",
        f"report:  {rep.path}",
        f"share:   {files.html} (the report in one file, plots inside)",
    ]


def _render(
    df: pd.DataFrame,
    summary: pd.DataFrame,
    trials: pd.DataFrame,
    v: Verdict,
    plots: dict[str, Path],
    out: Path,
    grid: dict[str, Any],
    threshold: float,
    ratio: float,
    collapse_fraction: float,
) -> str:
    keys = summary_keys(summary)
    sources = df.attrs.get("sources") or []
    expected = summary.attrs.get("expected_seeds") or []
    furthest = trials["last_step"].max()
    running = bool(summary["behind"].any())
    now = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    lines = [
        "# In-context vs in-weights learning: analysis report",
        "",
        f"Generated {now} by `icl-analyze` from {', '.join(f'`{s}`' for s in sources) or 'a DataFrame'} "
        "(paths relative to this report's folder).",
        "",
        f"- {_n(len(trials), 'trial')} in {_n(len(summary), 'cell')} "
        f"(grid keys: {', '.join(f'`{k}`' for k in keys) or 'none'}; "
        f"seeds expected per cell: {seed_list(expected)}).",
        f"- Evaluations up to step {furthest:,.0f}"
        + (" — some trials are behind (sweep still running?): numbers may change." if running else "."),
        "- Headline ICL metric: `icl_acc` (2-way 4-shot on holdout classes, restricted to the 2 labels in "
        "context; chance 0.5).",
        "",
        "## Verdict",
        "",
        f"*Criterion (STUDY.md), two parts that must both hold in one few-class cell with weight decay > 0:* "
        f"(1) its peak ICL (mean over seeds) reaches at least {ratio:.0%} of the peak ICL of the many-class, "
        f"weight-decay-0 baseline, without training accuracy collapsing; (2) it exceeds the peak ICL of the same "
        f"number of classes at weight decay 0, with a 95% interval that excludes 0. Baseline = the largest number "
        f"of classes at weight decay 0; *collapse* = the cell's final training accuracy (mean over seeds) below "
        f"{collapse_fraction:.0%} of that of the same number of classes at weight decay 0.",
        "",
        "*Peak ICL* is estimated without the max-of-noise bias: the peak step is chosen on one half of the ICL set "
        "(even sequences) and its value read on the other (odd), both ways, averaged (cross-fitting); the raw "
        "maximum is kept for reference and is biased upward. *Intervals* (95%): a t interval over seeds plus the "
        "evaluation set's binomial error, in quadrature (the set is shared by every seed, so its error does not "
        "shrink with more seeds); with one seed the binomial error alone. The *decay effect* pairs the two cells by "
        "seed (same seed = same initialisation and data stream; only the decay differs) and needs at least 2 "
        "seeds, else the verdict is \"too few seeds to tell\". *Shrink* = exp(-wd x sum of the learning rates): "
        "the factor decoupled decay scales a weight with no gradient by over the run.",
        "",
        v.to_markdown(),
        "",
        "## Data completeness",
        "",
    ]
    gaps = completeness(summary, grid, df.attrs.get("notes") or [])
    notes = [f"- {g}" for g in gaps + estimator_notes(trials)]
    if not gaps:
        lines.append(f"All {len(summary)} cells have every seed and every trial reached step {furthest:,.0f}.")
        lines += [""] + notes if notes else []
    else:
        lines += notes
    lines += [
        "",
        "## Summary per cell",
        "",
        ("ICL figures: mean over seeds [95% interval]; the others mean ± sd over seeds (sample sd; none where a "
         "cell has one seed)." if summary["n_seeds"].max() >= 2
         else "One seed per cell: ICL figures with their 95% interval (the evaluation set's binomial error), the "
              "others the values of that seed.")
        + f" Machine-readable: [`{SUMMARY}`]({SUMMARY}).",
        "",
        markdown_table(format_summary(summary)),
        "",
        f"*Shrink*: exp(-wd x sum of the learning rates) of the cell's schedule. *Peak ICL*: cross-fitted on the "
        f"two halves of the ICL set (unbiased); *raw max*: the highest `icl_acc` over the evaluations (biased "
        f"upward); *peak step*: where the raw maximum first occurs. *Final*: the trial's last evaluation. *Drop*: "
        f"peak − final (transience). *ICL onset step*: first evaluation with `icl_acc` ≥ {threshold:g}; the mean "
        f"is over the seeds that got there. *all / in ctx*: argmax over every label / over the labels in context.",
        "",
        *metric_definitions(),
    ]
    named = {k: p for k, p in plots.items()}
    if "curves" in named:
        lines += _plot_section("ICL and IWL over training", [("curves", named["curves"]),
                                                             ("curves, log step", named["curves_logx"])], out,
                               "Rows: holdout ICL, in-weights accuracy, training accuracy; columns: number of "
                               f"classes; colour: weight decay; {seed_spread(int(summary['n_seeds'].max()), band=True)}. "
                               "Linear then log steps.")
    if "evaluators" in named:
        lines += _plot_section("ICL, CIWL and flip ICL", [("evaluators", named["evaluators"])], out,
                               "The peer code's evaluators (log step axis), each by the peers' definition (solid: "
                               "argmax over the labels in context) and over every label (dashed): ICL on holdout and "
                               "on training classes; CIWL = the query's class is absent from the context but its "
                               "trained label sits on another exemplar; flip ICL = training classes with their trained "
                               "labels swapped in context: following the context vs following the weights. Pure IWL "
                               "(all labels, as the peers score it) below for comparison.")
    if "peak_final" in named:
        lines += _plot_section("Peak and final ICL vs weight decay", [("peak and final ICL", named["peak_final"])],
                               out, f"Bars: 95% intervals. Solid grey line and band: the verdict's baseline peak ICL "
                               f"with its interval; dashed: the success bar ({ratio:.0%}). Below each weight decay, "
                               "its total shrink factor.")
    if "heatmap" in named:
        lines += _plot_section("Classes x weight decay", [("heatmap of ICL", named["heatmap"])], out)
    if "attention" in named:
        lines += _plot_section("Attention diagnostics", [("attention overview", named["attention"])], out,
                               "Holdout ICL above the attention scores (max over heads and layers) of every cell.")
        for name, p in named.items():
            if name.startswith("attention:"):
                lines += [f"### {name.split(':', 1)[1]}", "", f"![{name}]({os.path.relpath(p, out)})", ""]
    else:
        lines += ["## Attention diagnostics", "", "The results have no `attn_L*` columns: nothing to show.", ""]
    from analysis.heads import circuits_section  # matplotlib only when reporting

    lines += circuits_section(df, keys, out)
    return "\n".join(lines).rstrip() + "\n"


def relative_paths(text: str, paths: Sequence[str], out: Path) -> str:
    """``text`` with every one of ``paths`` (the sources, absolute) written relative to the
    report's folder ``out``: a report names no absolute path, so it reads the same when the
    experiment is moved, copied or shared."""
    for p in sorted({str(p) for p in paths}, key=len, reverse=True):
        if os.path.isabs(p):
            text = re.sub(re.escape(p) + r"(?![\w.-])", lambda _: os.path.relpath(p, out), text)
    return text


def metric_definitions() -> list[str]:
    """The report's section on what each metric is and whose definition it follows."""
    rows = [
        ("`icl_acc` (headline)", "2-way 4-shot on holdout classes, labels 0/1; argmax over the 2 labels in context",
         "Chan et al. 2022's holdout few-shot evaluation, scored as icl-dynamics' `in_context_acc`"),
        ("`icl_acc_all`", "the same sequences, argmax over every label", "all-label accuracy (`acc`)"),
        ("`icl_acc_even`, `icl_acc_odd`", "`icl_acc` on the even / odd sequences of the set",
         "this project: the halves of the cross-fitted peak"),
        ("`icl_train_acc` / `_all`", "2-way 4-shot on training classes relabelled 0/1; in context / all labels",
         "icl-dynamics' `icl` evaluator (`pe_fs_relabel_scheme 01`, the transience paper's ICL), `in_context_acc`"),
        ("`iwl_acc`", "query class never in the context, trained labels; argmax over every label",
         "icl-dynamics `acc` on `pure_iwl`/`iwl`"),
        ("`ciwl_acc` / `_inctx`", "query class absent, its trained label on another exemplar; all labels / in context",
         "icl-dynamics `iwl_copy_avail`, scored with `in_context_acc` (the `_inctx` column)"),
        ("`flip_icl_ctx_acc` / `_inctx`", "trained labels swapped within the sequence: answer = the context's label",
         "icl-dynamics `flip_icl`, scored with `in_context_acc` (the `_inctx` column)"),
        ("`flip_icl_iwl_acc` / `_inctx`", "same sequences: answer = the query's own trained label (the weights')",
         "this project's complement of `flip_icl` (in context it is 1 − the context's)"),
    ]
    table = pd.DataFrame(rows, columns=["metric", "what", "definition it follows"])
    return ["## Metric definitions", "",
            "Each accuracy and the peer definition it follows (README, *Evaluation sets*; `in_context_acc`: "
            "icl-dynamics `main.eval_step`, the argmax restricted to the labels present in the context).", "",
            markdown_table(table), ""]


def default_out(paths: Sequence[str | os.PathLike[str]]) -> Path:
    """``PATH/report`` for one experiment or run dir, ``DIR/report`` for a CSV file in DIR."""
    if len(paths) != 1:
        raise UserError("several paths given: choose where the combined report goes with --out DIR")
    p = Path(paths[0])
    return (p if p.is_dir() else p.parent) / REPORT


__all__ = ["Report", "analyze", "write_report", "summary_lines", "format_summary", "completeness", "default_out",
           "relative_paths"]
