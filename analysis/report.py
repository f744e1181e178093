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

from analysis.fmt import (cell_label, fmt_number, markdown_table, mean_std, seed_list, seed_spread, short_key,
                          step_mean_std)
from analysis.html import report_html
from analysis.load import load_results
from analysis.summary import ONSET_THRESHOLD, missing_cells, summarize, trial_summary
from analysis.verdict import COLLAPSE_FRACTION, RATIO, Verdict, summary_keys, verdict
from icl.errors import UserError
from icl.layout import REPORT, SUMMARY, ReportDir


@dataclass
class Report:
    """What :func:`write_report` produced, for callers that want more than the files."""

    path: Path
    summary: pd.DataFrame
    trials: pd.DataFrame
    verdict: Verdict
    plots: dict[str, Path]


def format_summary(summary: pd.DataFrame) -> pd.DataFrame:
    """The per-cell summary as strings (mean ± sd), one row per cell, for the report."""
    keys = summary_keys(summary)
    out = pd.DataFrame()
    for k in keys:
        out[short_key(k)] = [fmt_number(v) if k != "experiment" else str(v) for v in summary[k]]
    seeds = []
    for _, r in summary.iterrows():
        txt = str(int(r["n_seeds"]))
        if not r["seeds_complete"]:
            txt += f" (missing {r['missing_seeds']})"
        seeds.append(txt)
    out["seeds"] = seeds
    out["peak ICL"] = [mean_std(m, s) for m, s in zip(summary["peak_icl_mean"], summary["peak_icl_std"])]
    out["peak step"] = [step_mean_std(m, s) for m, s in zip(summary["peak_step_mean"], summary["peak_step_std"])]
    out["final ICL"] = [mean_std(m, s) for m, s in zip(summary["final_icl_mean"], summary["final_icl_std"])]
    out["drop"] = [mean_std(m, s) for m, s in zip(summary["icl_drop_mean"], summary["icl_drop_std"])]
    out["final IWL"] = [mean_std(m, s) for m, s in zip(summary["final_iwl_mean"], summary["final_iwl_std"])]
    out["final train acc"] = [mean_std(m, s) for m, s in zip(summary["final_train_acc_mean"],
                                                             summary["final_train_acc_std"])]
    for stat, title in (("final_ciwl", "final CIWL"), ("final_flip_ctx", "final flip: context"),
                        ("final_flip_iwl", "final flip: weights")):
        if summary[f"{stat}_mean"].notna().any():  # results logged before the evaluators existed lack them
            out[title] = [mean_std(m, s) for m, s in zip(summary[f"{stat}_mean"], summary[f"{stat}_std"])]
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
        f"*Criterion (STUDY.md):* in some few-class cell with weight decay > 0, peak ICL (mean over seeds) "
        f"reaches at least {ratio:.0%} of the peak ICL of the many-class, weight-decay-0 baseline, without "
        f"training accuracy collapsing. Baseline = the largest number of classes at weight decay 0; "
        f"*collapse* = the cell's final training accuracy (mean over seeds) below {collapse_fraction:.0%} of "
        f"that of the same number of classes at weight decay 0. Ratio spread: propagated sd of both means; "
        f"per-seed range: each seed's peak over the baseline mean.",
        "",
        v.to_markdown(),
        "",
        "## Data completeness",
        "",
    ]
    gaps = completeness(summary, grid, df.attrs.get("notes") or [])
    if gaps:
        lines += [f"- {g}" for g in gaps]
    else:
        lines.append(f"All {len(summary)} cells have every seed and every trial reached step {furthest:,.0f}.")
    lines += [
        "",
        "## Summary per cell",
        "",
        ("Mean ± sd over seeds (sample sd; none where a cell has one seed)." if summary["n_seeds"].max() >= 2
         else "One seed per cell: the values of that seed, no sd.")
        + f" Machine-readable: [`{SUMMARY}`]({SUMMARY}).",
        "",
        markdown_table(format_summary(summary)),
        "",
        f"*Peak ICL*: highest `icl_acc` over the evaluations; *peak step*: where it first occurs. *Final*: the "
        f"trial's last evaluation. *Drop*: peak − final (transience). *ICL onset step*: first evaluation with "
        f"`icl_acc` ≥ {threshold:g}; the mean is over the seeds that got there.",
        "",
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
                               "The peer code's evaluators (log step axis): CIWL = the query's class is absent from "
                               "the context but its trained label sits on another exemplar; flip ICL = training "
                               "classes with their trained labels swapped in context: following the context vs "
                               "following the weights. Pure IWL below for comparison.")
    if "peak_final" in named:
        lines += _plot_section("Peak and final ICL vs weight decay", [("peak and final ICL", named["peak_final"])],
                               out, f"Solid grey: the baseline's peak ICL; dashed: the success bar ({ratio:.0%}).")
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


def default_out(paths: Sequence[str | os.PathLike[str]]) -> Path:
    """``PATH/report`` for one experiment or run dir, ``DIR/report`` for a CSV file in DIR."""
    if len(paths) != 1:
        raise UserError("several paths given: choose where the combined report goes with --out DIR")
    p = Path(paths[0])
    return (p if p.is_dir() else p.parent) / REPORT


__all__ = ["Report", "analyze", "write_report", "summary_lines", "format_summary", "completeness", "default_out",
           "relative_paths"]
