"""Plots of ICL rising and fading, cell by cell; each function returns a matplotlib Figure.

Figures are built without pyplot (``matplotlib.figure.Figure``), so they work headless (Agg)
and in notebooks alike and never pile up in pyplot's global state; seaborn supplies the theme,
palettes and heatmaps. Curves show the mean over seeds with a band of +-1 standard deviation
(where a step has at least two seeds). Weight decay 0 is black; larger decay is lighter/warmer.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib.lines as mlines
import numpy as np
import pandas as pd

from icl.io import atomic_write
from icl.layout import ReportDir
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from analysis.fmt import cell_label, cell_slug, fmt_number, fmt_shrink, seed_spread
from analysis.load import CLASS_KEY, SEED_KEY, WD_KEY, is_missing
from analysis.summary import same_value, with_ids, cell_keys
from analysis.verdict import RATIO, baseline_cell, summary_keys
from icl.metrics import (
    ATTN_NAMES,
    ATTN_RE,
    AXIS_LABELS,
    CHANCE,
    CIWL,
    CIWL_INCTX,
    DECAY_EXP,
    FLIP_CTX,
    FLIP_CTX_INCTX,
    FLIP_IWL,
    FLIP_IWL_INCTX,
    ICL,
    ICL_ACCURACIES,
    ICL_ALL,
    ICL_TRAIN,
    ICL_TRAIN_ALL,
    IWL,
    TITLES,
    TRAIN_ACC,
    X_LABELS,
    attn_max_column,
)

DPI = 110
# The evaluators plot: each row the peers' definition (argmax over the labels in context; for
# IWL over every label, as their pure_iwl) drawn solid, beside its all-label twin, dashed.
EVALUATOR_ROWS = {ICL: ICL_ALL, ICL_TRAIN: ICL_TRAIN_ALL, CIWL_INCTX: CIWL, FLIP_CTX_INCTX: FLIP_CTX,
                  FLIP_IWL_INCTX: FLIP_IWL, IWL: None}


def _short_number(v: float, _pos: Any = None) -> str:
    """Tick label for steps and sequences: 20k, 1.5M."""
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:g}{suffix}"
    return f"{v:g}"


def _time_axis(ax: Any, logx: bool, xs: Any = None) -> None:
    """Log or linear time axis with ticks reading 20k rather than 20000.

    On a log axis spanning under ~2.5 decades (``xs``: the data's x values), ticks at 1, 2 and
    5 per decade, so a short run still gets several labelled ticks.
    """
    if logx:
        ax.set_xscale("log")
        decades = 10.0
        if xs is not None:
            pos = np.asarray(xs, dtype=float)
            pos = pos[np.isfinite(pos) & (pos > 0)]
            if len(pos):
                decades = float(np.log10(pos.max() / pos.min()))
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0) if decades <= 2.5 else (1.0,)))
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.xaxis.set_major_formatter(FuncFormatter(_short_number))


def _theme() -> None:
    sns.set_theme(style="whitegrid", context="notebook", font_scale=0.95)


def wd_palette(values: Sequence[Any]) -> dict[Any, Any]:
    """Weight decay -> colour: 0 black, positive values along plasma (dark purple to orange)."""
    vals = sorted({float(v) for v in values if not is_missing(v)})
    pos = [v for v in vals if v > 0]
    cmap = sns.color_palette("plasma", as_cmap=True)
    colours = {v: cmap(x) for v, x in zip(pos, np.linspace(0.15, 0.8, len(pos)) if len(pos) > 1 else [0.5])}
    if 0.0 in vals:
        colours[0.0] = (0.1, 0.1, 0.1, 1.0)
    return colours


def _colour(palette: Mapping[Any, Any], wd: Any) -> Any:
    return (0.5, 0.5, 0.5, 1.0) if is_missing(wd) else palette.get(float(wd), (0.5, 0.5, 0.5, 1.0))


def attention_columns(df: pd.DataFrame) -> dict[str, list[str]]:
    """Attention columns by kind, ordered by layer: ``{"induction": ["attn_L0_induction", ...]}``."""
    found: dict[str, list[tuple[int, str]]] = {}
    for col in df.columns:
        m = ATTN_RE.match(str(col))
        if m:
            found.setdefault(m.group(2), []).append((int(m.group(1)), col))
    return {k: [c for _, c in sorted(v)] for k, v in found.items()}


def with_attention_summary(df: pd.DataFrame) -> pd.DataFrame:
    """Add ``attn_max_<kind>`` columns: the maximum over layers of each per-layer (max-over-heads) score."""
    out = df.copy()
    for kind, cols in attention_columns(df).items():
        out[attn_max_column(kind)] = df[cols].max(axis=1, skipna=True)
    return out


def _facets(df: pd.DataFrame, keys: list[str]) -> list[dict[str, Any]]:
    """Panel = cell without its weight decay (classes plus any other grid key), in sorted order."""
    fkeys = [k for k in keys if k != WD_KEY]
    if not fkeys:
        return [{}]
    combos = df[fkeys].drop_duplicates()
    combos = combos.sort_values(fkeys, na_position="last", kind="stable")
    return [dict(zip(fkeys, row)) for row in combos.itertuples(index=False)]


def _select(df: pd.DataFrame, where: Mapping[str, Any]) -> pd.DataFrame:
    """Rows whose keys equal ``where`` (floats compared with a relative tolerance, NaN equals NaN)."""
    mask = np.ones(len(df), dtype=bool)
    for k, v in where.items():
        col = df[k]
        if pd.api.types.is_numeric_dtype(col) and not isinstance(v, str):
            values = col.to_numpy(dtype=float)
            if is_missing(v):
                mask &= np.isnan(values)
            else:
                mask &= np.isclose(values, float(v), rtol=1e-9, atol=0.0)
        else:
            mask &= np.array([same_value(x, v) for x in col], dtype=bool)
    return df[mask]


def seed_curves(df: pd.DataFrame, metric: str, x: str = "step") -> pd.DataFrame:
    """Mean, sd and seed count of ``metric`` at each ``x`` for each cell (the data behind the curves)."""
    df = with_ids(df)
    keys = cell_keys(df)
    d = df[[*keys, SEED_KEY, x, metric]].dropna(subset=[x, metric])
    g = d.groupby([*keys, x], dropna=False, sort=True)[metric]
    return g.agg(mean="mean", sd="std", n="count").reset_index()


def _draw_curve(ax: Any, stats: pd.DataFrame, x: str, colour: Any, style: str, logx: bool) -> None:
    if logx:
        stats = stats[stats[x] > 0]
    if stats.empty:
        return
    xs, mean = stats[x].to_numpy(float), stats["mean"].to_numpy(float)
    ax.plot(xs, mean, color=colour, linestyle=style, linewidth=1.8)
    sd = stats["sd"].to_numpy(float)
    ok = (stats["n"].to_numpy() >= 2) & np.isfinite(sd)
    if ok.any():
        ax.fill_between(xs, mean - np.where(ok, sd, 0), mean + np.where(ok, sd, 0), where=ok, color=colour,
                        alpha=0.18, linewidth=0)


def _has(df: pd.DataFrame, metric: str | None) -> bool:
    return metric is not None and metric in df.columns and bool(df[metric].notna().any())


def plot_curves(
    df: pd.DataFrame,
    metrics: Sequence[str] = (ICL, IWL, TRAIN_ACC),
    x: str = "step",
    logx: bool = False,
    title: str | None = None,
    twins: Mapping[str, str | None] | None = None,
) -> Figure:
    """Metrics over training: one row per metric, one column per number of classes, colour = weight decay.

    Seed mean with a +-1 sd band. ``x`` is ``step`` or ``sequences``; ``logx`` puts it on a log
    scale (evaluations at step 0 are dropped there), which shows early rises and late fades.
    ``twins`` maps a row's metric to a second one drawn dashed in the same panels (another
    definition of the same accuracy); a row is kept when either has values.
    """
    _theme()
    df = with_ids(df)
    twins = dict(twins or {})
    metrics = [m for m in metrics if _has(df, m) or _has(df, twins.get(m))]
    if not metrics:
        raise ValueError("none of the requested metrics has values")
    keys = cell_keys(df)
    facets = _facets(df, keys)
    palette = wd_palette(df[WD_KEY]) if WD_KEY in keys else {}
    wds = sorted(palette) if palette else [None]
    fig = Figure(figsize=(1.2 + 4.3 * len(facets), 0.6 + 2.5 * len(metrics)), layout="constrained")
    axes = fig.subplots(len(metrics), len(facets), sharex=True, sharey="row", squeeze=False)
    n_seeds = df.groupby(keys, dropna=False)[SEED_KEY].nunique() if keys else pd.Series([df[SEED_KEY].nunique()])
    for r, metric in enumerate(metrics):
        drawn = [(m, style) for m, style in ((metric, "-"), (twins.get(metric), "--")) if _has(df, m)]
        all_stats = [(seed_curves(df, m, x), style) for m, style in drawn]
        low = min(float(st["mean"].min()) for st, _ in all_stats)
        for c, facet in enumerate(facets):
            ax = axes[r][c]
            for stats, style in all_stats:
                sub = _select(stats, facet)
                for wd in wds:
                    cell = sub if wd is None else _select(sub, {WD_KEY: wd})
                    if cell.empty:
                        continue
                    _draw_curve(ax, cell, x, _colour(palette, wd), style, logx)
            if metric in ICL_ACCURACIES:
                ax.axhline(CHANCE, color="0.45", linestyle=":", linewidth=1)
                ax.set_ylim(min(0.4, low - 0.02), 1.0)
            elif metric.endswith(("_acc", "_inctx")):
                ax.set_ylim(-0.02, 1.02)
            _time_axis(ax, logx, df[x])
            if r == 0:
                ax.set_title(cell_label(facet) or "all runs")
            if c == 0:
                ax.set_ylabel(AXIS_LABELS.get(metric, metric))
            if r == len(metrics) - 1:
                ax.set_xlabel(X_LABELS.get(x, x) + (" (log scale)" if logx else ""))
    handles = [mlines.Line2D([], [], color=_colour(palette, wd), linewidth=2.5, label=fmt_number(wd)) for wd in wds
               if wd is not None]
    if any(m in ICL_ACCURACIES for m in metrics):
        handles.append(mlines.Line2D([], [], color="0.45", linestyle=":", label="chance"))
    if twins:
        handles += [mlines.Line2D([], [], linestyle="none", label="\nargmax over"),
                    mlines.Line2D([], [], color="0.3", linestyle="-", label="labels in context\n(peers' definition)"),
                    mlines.Line2D([], [], color="0.3", linestyle="--", label="every label")]
    if handles:
        fig.legend(handles=handles, title="weight decay", loc="outside right center", frameon=False)
    seeds = int(n_seeds.max()) if len(n_seeds) else 0
    title = title or "Accuracy over training"
    sep = "\n" if "\n" in title else ": "  # a title of several lines gets the seeds on a line of its own
    fig.suptitle(f"{title}{sep}{seed_spread(seeds, band=True)}", fontsize=13)
    return fig


def plot_evaluators(df: pd.DataFrame, x: str = "step", logx: bool = False) -> Figure | None:
    """ICL beside the peer code's evaluators (ICL on training classes, CIWL, flip ICL: context
    vs weights) and pure IWL, each by both definitions: solid, the peers' (argmax over the
    labels in context, icl-dynamics ``in_context_acc``; IWL over every label, their
    ``pure_iwl``), dashed, over every label.

    None when the results have neither CIWL nor flip columns (logged before they existed)."""
    if not any(_has(df, m) for m in (CIWL, CIWL_INCTX, FLIP_CTX, FLIP_CTX_INCTX, FLIP_IWL, FLIP_IWL_INCTX)):
        return None
    return plot_curves(df, tuple(EVALUATOR_ROWS), x=x, logx=logx, twins=EVALUATOR_ROWS,
                       title="ICL into IWL or CIWL? The peer evaluators over training\nsolid: argmax over the labels "
                             "in context (the peers' definition), dashed: over every label")


def plot_attention_overview(df: pd.DataFrame, x: str = "step", logx: bool = False) -> Figure | None:
    """Holdout ICL above the attention scores (max over layers) for every cell, aligned in time.

    None when the results have no attention columns.
    """
    kinds = attention_columns(df)
    if not kinds:
        return None
    d = with_attention_summary(df)
    metrics = [ICL] + [attn_max_column(k) for k in ("induction", "match_lbl", "prev_tok") if k in kinds]
    return plot_curves(d, metrics, x=x, logx=logx,
                       title="ICL and the attention circuit over training")


def plot_attention(df: pd.DataFrame, cell: Mapping[str, Any], x: str = "step", logx: bool = False) -> Figure | None:
    """One cell in detail: accuracy curves; each attention score (max over layers); induction per layer.

    ``cell`` maps grid keys to values (e.g. ``{"data.num_classes": 100, "optim.weight_decay": 1e-3}``).
    All three panels share the time axis, so the circuit can be read against the ICL curve. None
    when there are no attention columns or no rows for the cell.
    """
    _theme()
    kinds = attention_columns(df)
    sub = _select(with_ids(df), cell)
    if not kinds or sub.empty:
        return None
    sub = with_attention_summary(sub)
    if logx:
        sub = sub[sub[x] > 0]
    n_seeds = sub[SEED_KEY].nunique()
    heat_kind = "induction" if "induction" in kinds else "match_lbl" if "match_lbl" in kinds else next(iter(kinds))
    layer_cols = kinds[heat_kind]
    fig = Figure(figsize=(11, 8.4), layout="constrained")
    grid_axes = fig.subplots(3, 2, gridspec_kw={"height_ratios": [1, 1, 0.35 + 0.07 * len(layer_cols)],
                                                "width_ratios": [1, 0.32]})
    axes, side = grid_axes[:, 0], grid_axes[:, 1]
    for a in axes[1:]:
        a.sharex(axes[0])
    for a in side:
        a.axis("off")
    mean = sub.groupby(x, sort=True).mean(numeric_only=True)
    sd = sub.groupby(x, sort=True).std(numeric_only=True)
    count = sub.groupby(x, sort=True)[SEED_KEY].nunique()
    xs = mean.index.to_numpy(float)

    def line(ax: Any, col: str, colour: Any, label: str, style: str = "-") -> None:
        m = mean[col].to_numpy(float)
        ax.plot(xs, m, color=colour, linestyle=style, linewidth=1.8, label=label)
        s = sd[col].to_numpy(float)
        ok = (count.to_numpy() >= 2) & np.isfinite(s)
        if ok.any():
            ax.fill_between(xs, m - np.where(ok, s, 0), m + np.where(ok, s, 0), where=ok, color=colour, alpha=0.18,
                            linewidth=0)

    acc = sns.color_palette("deep")
    ax = axes[0]
    line(ax, ICL, acc[0], TITLES[ICL])
    if ICL_TRAIN in sub.columns and sub[ICL_TRAIN].notna().any():
        line(ax, ICL_TRAIN, acc[0], TITLES[ICL_TRAIN], ":")
    line(ax, IWL, acc[3], TITLES[IWL])
    line(ax, TRAIN_ACC, acc[2], TITLES[TRAIN_ACC], "--")
    ax.axhline(CHANCE, color="0.45", linestyle="--", linewidth=1, label="chance (ICL)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("accuracy")
    side[0].legend(*ax.get_legend_handles_labels(), loc="center left", frameon=False)
    ax.set_title("accuracy" + (" (band = ±1 sd over seeds)" if n_seeds >= 2 else ""))

    ax = axes[1]
    att = sns.color_palette("colorblind")
    for i, kind in enumerate(k for k in ATTN_NAMES if k in kinds):
        line(ax, attn_max_column(kind), att[i], ATTN_NAMES[kind], "--" if kind == "other" else "-")
    ax.set_ylabel("score (fraction of\nattention, max over layers)")
    side[1].legend(*ax.get_legend_handles_labels(), loc="center left", frameon=False)
    ax.set_title("attention scores, max over heads and layers")

    ax = axes[2]
    grid = mean[layer_cols].to_numpy(float).T  # layers x steps
    edges = _edges(xs, logx)
    everywhere = df[layer_cols].to_numpy(dtype=float)  # one colour scale for every cell's page
    vmax = float(np.nanmax(np.abs(everywhere))) if np.isfinite(everywhere).any() else 1.0
    diverging = heat_kind == "induction"  # can be negative: attention to the wrong label
    mesh = ax.pcolormesh(edges, np.arange(len(layer_cols) + 1) - 0.5, grid, cmap="vlag" if diverging else "mako_r",
                         vmin=-vmax if diverging else 0, vmax=vmax or 1.0, shading="flat")
    ax.grid(False)
    ax.set_yticks(range(len(layer_cols)))
    ax.set_yticklabels([f"L{ATTN_RE.match(c).group(1)}" for c in layer_cols])  # type: ignore[union-attr]
    ax.set_ylabel("layer")
    ax.set_title(f"{ATTN_NAMES[heat_kind]} per layer (max over heads)")
    fig.colorbar(mesh, cax=side[2].inset_axes([0.0, 0.0, 0.08, 1.0]), label=heat_kind + " score")
    ax.set_xlabel(X_LABELS.get(x, x) + (" (log scale)" if logx else ""))
    for a in axes:
        _time_axis(a, logx, xs)
    for a in axes[:-1]:
        a.tick_params(labelbottom=False)
    axes[0].set_xlim(edges[0], edges[-1])
    fig.suptitle(f"{cell_label(cell)}: ICL and the attention circuit, mean over {n_seeds} seed(s)", fontsize=13)
    return fig


def _edges(xs: np.ndarray, logx: bool) -> np.ndarray:
    """Cell edges around evaluation points for pcolormesh (geometric midpoints on a log axis)."""
    if len(xs) == 1:
        return np.array([xs[0] * 0.9, xs[0] * 1.1]) if logx else np.array([xs[0] - 0.5, xs[0] + 0.5])
    if logx:
        lx = np.log(xs)
        mid = (lx[1:] + lx[:-1]) / 2
        return np.exp(np.concatenate([[lx[0] - (mid[0] - lx[0])], mid, [lx[-1] + (lx[-1] - mid[-1])]]))
    mid = (xs[1:] + xs[:-1]) / 2
    return np.concatenate([[xs[0] - (mid[0] - xs[0])], mid, [xs[-1] + (xs[-1] - mid[-1])]])


def _shrink_labels(wds: Sequence[float], summary: pd.DataFrame | None) -> list[str]:
    """Weight decay values, each with its total shrink factor below it where the summary knows
    it (a range where cells differ, e.g. in their schedule)."""
    labels = [fmt_number(w) for w in wds]
    if summary is None or DECAY_EXP not in summary.columns:
        return labels
    for i, w in enumerate(wds):
        exps = sorted({round(float(e), 12) for e in _select(summary, {WD_KEY: w})[DECAY_EXP].dropna()})
        if exps:
            shrink = fmt_shrink(exps[0]) if len(exps) == 1 else f"{fmt_shrink(exps[0])}…{fmt_shrink(exps[-1])[3:]}"
            labels[i] += "\n" + ("none" if shrink == fmt_shrink(0) else shrink)
    return labels


def _wd_axis(ax: Any, wds: list[float], summary: pd.DataFrame | None = None) -> None:
    """Weight decay on evenly spaced categories, labelled with their shrink factors."""
    ax.set_xticks(range(len(wds)))
    ax.set_xticklabels(_shrink_labels(wds, summary), fontsize=8.5)
    ax.set_xlim(-0.5, len(wds) - 0.5)


def plot_peak_final(summary: pd.DataFrame, ratio: float = RATIO, grid: Mapping[str, Sequence[Any]] | None = None
                    ) -> Figure:
    """Peak and final ICL (mean over seeds with its 95% interval) against weight decay, one
    panel per number of classes.

    The grey line and band are the verdict's baseline (:func:`analysis.verdict.baseline_cell`:
    the most classes, in the data or the spec's ``grid``, at weight decay 0) with its interval,
    the dashed line the success bar (``ratio`` x baseline), so cells that reach it stand out.
    Peak ICL is the unbiased (cross-fitted) peak where the results allow it. Weight decay is
    drawn on evenly spaced categories (0 has no place on a log axis), each labelled with its
    total shrink factor; ``n=`` marks cells short of seeds.
    """
    _theme()
    keys = summary_keys(summary)
    grid = grid if grid is not None else summary.attrs.get("grid") or {}
    facets = _facets(summary, keys)
    wds = sorted({float(w) for w in summary[WD_KEY] if not is_missing(w)}) if WD_KEY in keys else []
    wds = wds or [None]  # no known weight decay: one point per panel
    fig = Figure(figsize=(3.6 + 4.0 * len(facets), 4.6), layout="constrained")
    axes = fig.subplots(1, len(facets), sharey=True, squeeze=False)[0]
    pal = sns.color_palette("deep")
    for ax, facet in zip(axes, facets):
        base = _baseline(summary, keys, facet, grid)
        sub = _select(summary, facet)
        if wds != [None]:
            sub = sub.assign(_pos=[wds.index(float(w)) if not is_missing(w) else np.nan for w in sub[WD_KEY]])
        else:
            sub = sub.assign(_pos=0)
        sub = sub.dropna(subset=["_pos"]).sort_values("_pos")
        for stat, colour, marker, label, shift in (("peak_icl", pal[0], "o", peak_label(summary), -0.06),
                                                     ("final_icl", pal[1], "s", "final ICL (last eval.)", 0.06)):
            mean = sub[f"{stat}_mean"].to_numpy(float)
            err = np.vstack([mean - sub[f"{stat}_lo"].to_numpy(float), sub[f"{stat}_hi"].to_numpy(float) - mean])
            ax.errorbar(sub["_pos"] + shift, mean, yerr=np.nan_to_num(err), color=colour, marker=marker,
                        markersize=7, capsize=4, linewidth=1.6, label=label)
        for _, r in sub.iterrows():
            if not r["seeds_complete"]:
                ax.annotate(f"n={int(r['n_seeds'])}", (r["_pos"], r["peak_icl_mean"]), textcoords="offset points",
                            xytext=(0, 10), ha="center", fontsize=9, color="firebrick")
        if base is not None:
            ax.axhline(base["peak_icl_mean"], color="0.35", linewidth=1.2,
                       label=f"baseline peak ({cell_label({CLASS_KEY: base[CLASS_KEY], WD_KEY: 0})}), 95% band")
            if not is_missing(base["peak_icl_lo"]):
                ax.axhspan(base["peak_icl_lo"], base["peak_icl_hi"], color="0.35", alpha=0.12, linewidth=0)
            ax.axhline(ratio * base["peak_icl_mean"], color="0.35", linestyle="--", linewidth=1.2,
                       label=f"success bar ({ratio:.0%} of baseline)")
        ax.axhline(CHANCE, color="0.6", linestyle=":", linewidth=1.2, label="chance")
        if wds != [None]:
            _wd_axis(ax, wds, summary)
        else:
            ax.set_xticks([0])
            ax.set_xticklabels(["?"])
            ax.set_xlim(-0.5, 0.5)
        ax.set_xlabel("AdamW weight decay\n(total shrink factor)")
        ax.set_title(cell_label(facet) or "all runs")
        low = np.nanmin(summary[["peak_icl_lo", "final_icl_lo", "peak_icl_mean", "final_icl_mean"]].to_numpy(float))
        ax.set_ylim(min(0.4, float(low) - 0.03), 1.0)
    axes[0].set_ylabel("ICL accuracy, holdout (chance 0.5)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", frameon=False)
    fig.suptitle("Peak and final ICL vs weight decay (mean over seeds, bars = 95% interval)", fontsize=13)
    return fig


def peak_label(summary: pd.DataFrame) -> str:
    """What the summary's peak ICL is: cross-fitted (unbiased) or, for results logged before
    the ICL set's halves existed, the raw maximum (biased upward)."""
    methods = set(summary.get("peak_method", pd.Series(dtype=str)).dropna()) - {""}
    if methods == {"cross-fit"}:
        return "peak ICL (cross-fitted)"
    if methods <= {"raw max"}:
        return "peak ICL (raw max., biased up)"
    return "peak ICL (some raw max., biased up)"


def _baseline(summary: pd.DataFrame, keys: list[str], where: Mapping[str, Any] | None = None,
              grid: Mapping[str, Sequence[Any]] | None = None) -> pd.Series | None:
    """The verdict's baseline row for the slice of ``where`` (its keys other than classes and
    weight decay), or None."""
    if CLASS_KEY not in keys or WD_KEY not in keys:
        return None
    sl = _select(summary, {k: v for k, v in (where or {}).items() if k not in (CLASS_KEY, WD_KEY)})
    return baseline_cell(sl, dict(grid or {}))[1]


def plot_heatmap(summary: pd.DataFrame, stats: Sequence[str] = ("peak_icl", "final_icl")) -> Figure:
    """Classes x weight decay heatmaps of peak (and final) ICL, mean over seeds, with the 95%
    interval annotated (``[lo, hi]``; ``±sd`` for a stat without one).

    Colour runs from chance (0.5) to 1.0 on the same scale in every panel; ``*`` marks a cell
    missing seeds. Any other grid key (e.g. ``experiment``) gets its own row of panels.
    """
    _theme()
    keys = summary_keys(summary)
    if CLASS_KEY not in keys or WD_KEY not in keys:
        raise ValueError("the heatmap needs data.num_classes and optim.weight_decay columns")
    d = summary.dropna(subset=[CLASS_KEY, WD_KEY])
    slices = _facets(d, [k for k in keys if k != CLASS_KEY])  # one row per value of the other keys
    n_wd, n_cls = d[WD_KEY].nunique(), d[CLASS_KEY].nunique()
    fig = Figure(figsize=(1.8 + (1.0 + 0.9 * n_wd) * len(stats), 0.8 + len(slices) * (1.0 + 0.75 * n_cls)),
                 layout="constrained")
    axes = fig.subplots(len(slices), len(stats), squeeze=False)
    for r, where in enumerate(slices):
        part = _select(d, where)
        for i, stat in enumerate(stats):
            ax = axes[r][i]
            mean = part.pivot_table(index=CLASS_KEY, columns=WD_KEY, values=f"{stat}_mean", aggfunc="mean",
                                    dropna=False).sort_index(ascending=False)
            ci = f"{stat}_lo" in part.columns

            def table(col: str) -> pd.DataFrame:
                return part.pivot_table(index=CLASS_KEY, columns=WD_KEY, values=col, aggfunc="mean",
                                        dropna=False).reindex_like(mean)

            lo, hi = (table(f"{stat}_lo"), table(f"{stat}_hi")) if ci else (table(f"{stat}_std"), None)
            complete = part.assign(_c=part["seeds_complete"].astype(float)).pivot_table(
                index=CLASS_KEY, columns=WD_KEY, values="_c", aggfunc="min", dropna=False).reindex_like(mean)
            annot = np.empty(mean.shape, dtype=object)
            for a in range(mean.shape[0]):
                for b in range(mean.shape[1]):
                    m, ok = mean.iat[a, b], complete.iat[a, b]
                    if is_missing(m):
                        annot[a, b] = "no data"
                        continue
                    if hi is not None:
                        spread = "" if is_missing(lo.iat[a, b]) else f"\n[{lo.iat[a, b]:.2f}, {hi.iat[a, b]:.2f}]"
                    else:
                        spread = "" if is_missing(lo.iat[a, b]) else f"\n±{lo.iat[a, b]:.3f}"
                    txt = f"{m:.3f}" + spread
                    annot[a, b] = txt + (" *" if ok == 0 else "")
            sns.heatmap(mean.astype(float), ax=ax, annot=annot, fmt="", cmap="viridis", vmin=0.5, vmax=1.0,
                        linewidths=1, linecolor="white", cbar=i == len(stats) - 1,
                        cbar_kws={"label": "ICL accuracy (chance 0.5)"}, annot_kws={"fontsize": 10})
            ax.set_xticklabels(_shrink_labels([float(w) for w in mean.columns], part), fontsize=8.5)
            ax.set_yticklabels([fmt_number(c) for c in mean.index], rotation=0)
            ax.set_xlabel("AdamW weight decay\n(total shrink factor)")
            ax.set_ylabel("number of training classes")
            title = {"peak_icl": peak_label(summary), "final_icl": "final ICL (last evaluation)"}.get(stat, stat)
            ax.set_title(f"{title}\n{cell_label(where)}" if where else title)
    note = "  (* = missing seeds)" if not summary["seeds_complete"].all() else ""
    fig.suptitle(f"Holdout ICL by classes and weight decay: mean over seeds [95% interval]{note}", fontsize=13)
    return fig


def save_figure(fig: Figure, path: str | os.PathLike[str], dpi: int = DPI) -> Path:
    """Write ``fig`` as PNG atomically (temporary file in the same directory, then rename)."""
    path = Path(path)
    atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=dpi))
    return path


def write_plots(
    df: pd.DataFrame, summary: pd.DataFrame, out: str | os.PathLike[str], x: str = "step", logx: bool = False,
    ratio: float = RATIO, dpi: int = DPI,
) -> dict[str, Path]:
    """Write every plot into ``out``; returns ``{name: path}`` in report order.

    Curves are written on both a linear and a log step axis (the rise is early, the fade late);
    ``logx`` chooses the axis of the attention plots.
    """
    report = ReportDir(out)
    written: dict[str, Path] = {}

    def save(name: str, fig: Figure, path: Path | None = None) -> None:
        written[name] = save_figure(fig, path or report.plot(name), dpi)

    save("curves", plot_curves(df, x=x, logx=False))
    save("curves_logx", plot_curves(df, x=x, logx=True))
    evaluators = plot_evaluators(df, x=x, logx=True)
    if evaluators is not None:
        save("evaluators", evaluators)
    save("peak_final", plot_peak_final(summary, ratio, df.attrs.get("grid") or {}))
    keys = summary_keys(summary)
    if CLASS_KEY in keys and WD_KEY in keys and summary[[CLASS_KEY, WD_KEY]].notna().all(axis=1).any():
        save("heatmap", plot_heatmap(summary))
    overview = plot_attention_overview(df, x=x, logx=logx)
    if overview is not None:
        save("attention", overview)
        for _, row in summary.iterrows():
            cell = {k: row[k] for k in keys}
            fig = plot_attention(df, cell, x=x, logx=logx)
            if fig is not None:
                save(f"attention:{cell_label(cell)}", fig, report.cell_attention_plot(cell_slug(cell)))
    return written
