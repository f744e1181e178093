"""The study's success criterion (STUDY.md), evaluated on a per-cell summary.

Criterion: in some *few-class* cell with weight decay > 0, peak ICL (mean over seeds) reaches at
least 90% of the peak ICL of the many-class, weight-decay-0 *baseline*, without training
accuracy collapsing. Made concrete here:

- **baseline**: the cell with the largest number of classes (in the data or the spec's grid)
  and weight decay 0;
- **candidates**: every cell with fewer classes and weight decay > 0;
- **ratio**: candidate ``peak_icl_mean`` / baseline ``peak_icl_mean`` (raw accuracies, chance
  0.5, as the criterion states); it must be ``>= ratio`` (default 0.9). Its seed spread is the
  propagated standard deviation of the two means, and the range of the candidate's per-seed
  peaks over the baseline mean when per-trial numbers are given;
- **collapse**: the candidate's ``final_train_acc_mean`` is below ``collapse_fraction``
  (default 0.8) times the ``final_train_acc_mean`` of the cell with the *same* number of
  classes and weight decay 0, i.e. weight decay cost more than a fifth of the training
  accuracy the model reaches without it. Without that reference cell collapse cannot be
  judged and the candidate is undetermined.

A candidate passes when its ratio reaches the bar and its training accuracy did not collapse.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from analysis.fmt import cell_label, fmt_number, join_words, markdown_table, mean_std
from analysis.load import CLASS_KEY, SEED_KEY, WD_KEY, is_missing
from analysis.summary import ONSET_THRESHOLD, as_numbers, same_value
from icl.errors import UserError
from icl.metrics import CHANCE

RATIO = 0.9
COLLAPSE_FRACTION = 0.8
_EPS = 1e-12  # 0.855 / 0.95 must count as 0.9


@dataclass
class Verdict:
    """The criterion's outcome: ``status`` is ``supported``, ``not supported`` or ``undetermined``.

    ``provisional`` is True when the cells involved lack seeds, are behind (sweep running) or
    the grid lacks cells, so the status may still change. ``table`` has one row per candidate.
    """

    status: str
    provisional: bool
    headline: str
    details: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    table: pd.DataFrame = field(default_factory=pd.DataFrame)

    @property
    def passing(self) -> pd.DataFrame:
        """The candidate cells that pass."""
        if self.table.empty:
            return self.table
        return self.table[[_is_true(v) for v in self.table["passes"]]]

    def to_markdown(self) -> str:
        """The verdict as report prose: headline, details, missing cells, candidate table."""
        out = [f"**{self.headline}**", ""]
        out += [f"- {d}" for d in self.details]
        if self.missing:
            out.append(f"- Missing from the grid or without results: {'; '.join(self.missing)}.")
        if not self.table.empty:
            out += ["", markdown_table(format_verdict_table(self.table))]
        return "\n".join(out)

    def __str__(self) -> str:
        return self.to_markdown()


def _is_true(v: Any) -> bool:
    return not is_missing(v) and bool(v)


def summary_keys(summary: pd.DataFrame) -> list[str]:
    """The cell-key columns of a :func:`analysis.summary.summarize` table (those before ``n_seeds``)."""
    if "n_seeds" not in summary.columns:
        raise UserError("not a per-cell summary (no n_seeds column): pass the output of summarize()")
    return list(summary.columns[: summary.columns.get_loc("n_seeds")])


def _find(sl: pd.DataFrame, classes: Any, wd: Any) -> pd.Series | None:
    hit = sl[[same_value(c, classes) and same_value(w, wd) for c, w in zip(sl[CLASS_KEY], sl[WD_KEY])]]
    hit = hit[hit["n_seeds"] > 0]
    return None if hit.empty else hit.iloc[0]


def _rel_sd(mean: float, std: float) -> float:
    return math.nan if is_missing(std) or not mean else float(std) / float(mean)


def verdict(
    summary: pd.DataFrame,
    trials: pd.DataFrame | None = None,
    ratio: float = RATIO,
    collapse_fraction: float = COLLAPSE_FRACTION,
    grid: dict[str, Sequence[Any]] | None = None,
) -> Verdict:
    """Evaluate the success criterion (see the module docstring) on a per-cell ``summary``.

    ``trials`` (:func:`analysis.summary.trial_summary`) adds the per-seed ratio range; ``grid``
    (default ``summary.attrs["grid"]``, set by the CLI from the spec) lets the verdict name cells
    the sweep should have but has no results for yet. Cells are split by any grid key other
    than classes and weight decay; each slice gets its own baseline.
    """
    keys = summary_keys(summary)
    for k in (CLASS_KEY, WD_KEY):
        if k not in keys:
            headline = f"Undetermined: the results have no {k} column to judge the criterion by."
            return Verdict("undetermined", True, headline, missing=[f"a {k} dimension"])
    grid = grid if grid is not None else summary.attrs.get("grid") or {}
    other = [k for k in keys if k not in (CLASS_KEY, WD_KEY)]
    slices = summary.groupby(other, dropna=False, sort=True) if other else [((), summary)]
    results = []
    for slice_vals, sl in slices:
        slice_vals = slice_vals if isinstance(slice_vals, tuple) else (slice_vals,)
        results.append(_judge_slice(dict(zip(other, slice_vals)), sl, trials, ratio, collapse_fraction, grid))
    if len(results) == 1:
        return results[0]
    statuses = [r.status for r in results]
    status = next(s for s in ("supported", "not supported", "undetermined") if s in statuses)
    headline = f"{status.capitalize()} in {statuses.count(status)} of {len(results)} slices of the grid."
    details = [r.headline for r in results] + [d for r in results for d in r.details]
    tables = [r.table for r in results if not r.table.empty]
    table = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()
    return Verdict(status, any(r.provisional for r in results), headline, details,
                   [m for r in results for m in r.missing], table)


def _judge_slice(
    where: dict[str, Any],
    sl: pd.DataFrame,
    trials: pd.DataFrame | None,
    ratio: float,
    collapse_fraction: float,
    grid: dict[str, Sequence[Any]],
) -> Verdict:
    prefix = f"[{cell_label(where)}] " if where else ""
    known = sl[[not (is_missing(c) or is_missing(w)) for c, w in zip(sl[CLASS_KEY], sl[WD_KEY])]]
    classes = sorted({float(c) for c in known[CLASS_KEY]} | {float(c) for c in as_numbers(grid.get(CLASS_KEY, []))})
    wds = sorted({float(w) for w in known[WD_KEY]} | {float(w) for w in as_numbers(grid.get(WD_KEY, []))})
    missing: list[str] = []
    details: list[str] = []
    if not classes:
        return Verdict("undetermined", True, prefix + "Undetermined: no cell has a known number of classes.")
    many = classes[-1]
    base = _find(known, many, 0.0)
    if base is None:
        missing.append(f"the baseline {cell_label({CLASS_KEY: many, WD_KEY: 0.0})}")
    few = [c for c in classes if c < many]
    decays = [w for w in wds if w > 0]
    if not few:
        missing.append(f"any cell with fewer than {fmt_number(many)} classes")
    if not decays:
        missing.append("any cell with weight decay > 0")
    rows = []
    reasons: dict[str, str] = {}  # why the outcome may still change, by cell
    for c, w in itertools.product(few, decays):
        cell = {CLASS_KEY: c, WD_KEY: w}
        cand = _find(known, c, w)
        if cand is None:
            missing.append(cell_label(cell))
            continue
        ref = _find(known, c, 0.0)
        if ref is None:
            ref_label = cell_label({CLASS_KEY: c, WD_KEY: 0.0})
            if ref_label + " (reference for collapse)" not in missing:
                missing.append(ref_label + " (reference for collapse)")
        rows.append(_candidate_row(where, cand, base, ref, trials, ratio, collapse_fraction))
        for x in (cand, base, ref):
            if x is None:
                continue
            name = cell_label({CLASS_KEY: x[CLASS_KEY], WD_KEY: x[WD_KEY]})
            if not bool(x["seeds_complete"]):
                reasons.setdefault(name, f"{name} lacks seed(s) {x['missing_seeds']}")
            elif bool(x["behind"]):
                reasons.setdefault(name, f"{name} has trials still behind (latest step {x['last_step_min']:,.0f})")
    table = pd.DataFrame(rows)
    provisional = bool(missing) or bool(reasons)

    if base is None:
        status = "undetermined"
        headline = (f"Undetermined: the grid lacks the baseline cell ({cell_label({CLASS_KEY: many, WD_KEY: 0.0})}) "
                    "that the criterion compares against.")
    elif table.empty:
        status = "undetermined"
        headline = "Undetermined: there is no few-class cell with weight decay > 0 with results to test."
    else:
        base_txt = (f"baseline's peak ICL ({cell_label({CLASS_KEY: many, WD_KEY: 0.0})}: "
                    f"{mean_std(base['peak_icl_mean'], base['peak_icl_std'])})")
        passing = table[[_is_true(v) for v in table["passes"]]]
        if len(passing):
            status = "supported"
            names = [f"{cell_label({CLASS_KEY: r[CLASS_KEY], WD_KEY: r[WD_KEY]})} (peak ICL "
                     f"{mean_std(r['peak_icl_mean'], r['peak_icl_std'])}, {_ratio_txt(r)} of baseline)"
                     for _, r in passing.iterrows()]
            headline = (f"Supported: {len(passing)} of {len(table)} few-class cells with weight decay > 0 reach at "
                        f"least {ratio:.0%} of the {base_txt} without training accuracy collapsing: "
                        f"{join_words(names)}.")
        else:
            best = table.sort_values("ratio", ascending=False).iloc[0]
            undecided = table[table["passes"].isna()]
            status = "undetermined" if len(undecided) == len(table) else "not supported"
            word = "Undetermined" if status == "undetermined" else "Not supported"
            best_name = cell_label({CLASS_KEY: best[CLASS_KEY], WD_KEY: best[WD_KEY]})
            headline = (f"{word}: no few-class cell with weight decay > 0 reaches {ratio:.0%} of the {base_txt} "
                        f"without collapsing; the best is {best_name} at {_ratio_txt(best)} of baseline "
                        f"(peak ICL {mean_std(best['peak_icl_mean'], best['peak_icl_std'])}).")
        for _, r in table.iterrows():
            details.append(_detail(r, ratio, collapse_fraction))
        if base["peak_icl_mean"] < ONSET_THRESHOLD:
            details.append(
                f"Caution: the baseline itself barely shows ICL (peak {base['peak_icl_mean']:.3f}, chance {CHANCE}), "
                f"so the {ratio:.0%} bar ({ratio * base['peak_icl_mean']:.3f}) is close to chance; the column "
                "`ratio_above_chance` compares the gains over chance instead."
            )
    if provisional:
        why = list(reasons.values()) + (["cells the criterion needs have no results (below)"] if missing else [])
        details.append(f"Provisional, may change with more results: {'; '.join(why)}.")
    return Verdict(status, provisional, prefix + headline, details, missing, table)


def _ratio_txt(r: pd.Series) -> str:
    txt = f"{r['ratio']:.3f}"
    if not is_missing(r["ratio_std"]):
        txt += f" ± {r['ratio_std']:.3f}"
    return txt


def _detail(r: pd.Series, ratio: float, collapse_fraction: float) -> str:
    name = cell_label({CLASS_KEY: r[CLASS_KEY], WD_KEY: r[WD_KEY]})
    verdict_word = "undetermined" if is_missing(r["passes"]) else "passes" if r["passes"] else "fails"
    peak = mean_std(r["peak_icl_mean"], r["peak_icl_std"])
    txt = f"{name}: {verdict_word}; peak ICL {peak} = {_ratio_txt(r)} of baseline"
    if not is_missing(r.get("ratio_seed_min")):
        txt += (f" (per seed {r['ratio_seed_min']:.3f}–{r['ratio_seed_max']:.3f}, "
                f"{int(r['seeds_above'])} of {int(r['n_seeds'])} seeds at the bar)")
    txt += f", bar {ratio:.2f}"
    if is_missing(r["train_acc_ratio"]):
        txt += "; collapse not judged: no weight-decay-0 cell with the same classes"
    else:
        state = "collapsed" if r["collapsed"] else "no collapse"
        txt += (f"; final train acc {mean_std(r['final_train_acc_mean'], r['final_train_acc_std'])} vs "
                f"{r['ref_final_train_acc_mean']:.3f} at wd 0 = {r['train_acc_ratio']:.3f} "
                f"({state}, limit {collapse_fraction:.2f})")
    if not r["seeds_complete"]:
        txt += f"; only {int(r['n_seeds'])} seed(s)"
    return txt + "."


def _candidate_row(
    where: dict[str, Any],
    cand: pd.Series,
    base: pd.Series | None,
    ref: pd.Series | None,
    trials: pd.DataFrame | None,
    ratio: float,
    collapse_fraction: float,
) -> dict[str, Any]:
    row: dict[str, Any] = dict(where)
    row[CLASS_KEY] = cand[CLASS_KEY]
    row[WD_KEY] = cand[WD_KEY]
    row["n_seeds"] = int(cand["n_seeds"])
    row["seeds_complete"] = bool(cand["seeds_complete"])
    row["peak_icl_mean"] = cand["peak_icl_mean"]
    row["peak_icl_std"] = cand["peak_icl_std"]
    nan = math.nan
    row.update(baseline_peak_icl_mean=nan, baseline_peak_icl_std=nan, ratio=nan, ratio_std=nan,
               ratio_seed_min=nan, ratio_seed_max=nan, seeds_above=nan, ratio_above_chance=nan)
    if base is not None:
        b_mean, b_std = float(base["peak_icl_mean"]), base["peak_icl_std"]
        r = float(cand["peak_icl_mean"]) / b_mean
        rel = math.hypot(_rel_sd(cand["peak_icl_mean"], cand["peak_icl_std"]), _rel_sd(b_mean, b_std))
        row.update(baseline_peak_icl_mean=b_mean, baseline_peak_icl_std=b_std, ratio=r, ratio_std=r * rel)
        if b_mean != CHANCE:
            row["ratio_above_chance"] = (float(cand["peak_icl_mean"]) - CHANCE) / (b_mean - CHANCE)
        if trials is not None:
            mask = pd.Series(True, index=trials.index)
            for k, v in {**where, CLASS_KEY: cand[CLASS_KEY], WD_KEY: cand[WD_KEY]}.items():
                if k in trials.columns:
                    mask &= trials[k].map(lambda x, v=v: same_value(x, v))
            peaks = (trials.loc[mask].dropna(subset=["peak_icl"])
                     .sort_values("last_step", ascending=False).drop_duplicates(SEED_KEY)["peak_icl"])
            if len(peaks):
                row.update(ratio_seed_min=float(peaks.min()) / b_mean, ratio_seed_max=float(peaks.max()) / b_mean,
                           seeds_above=int((peaks >= ratio * b_mean - _EPS).sum()))
    row["final_train_acc_mean"] = cand["final_train_acc_mean"]
    row["final_train_acc_std"] = cand["final_train_acc_std"]
    row["ref_final_train_acc_mean"] = nan if ref is None else float(ref["final_train_acc_mean"])
    if ref is not None:
        row["train_acc_ratio"] = float(cand["final_train_acc_mean"]) / row["ref_final_train_acc_mean"]
    else:
        row["train_acc_ratio"] = nan
    row["collapsed"] = pd.NA if ref is None else bool(row["train_acc_ratio"] < collapse_fraction - _EPS)
    if base is None or ref is None:
        row["passes"] = pd.NA
    else:
        row["passes"] = bool(row["ratio"] >= ratio - _EPS and not row["collapsed"])
    return row


def format_verdict_table(table: pd.DataFrame) -> pd.DataFrame:
    """The candidate table as strings for the report."""

    def pairs(a: str, b: str) -> list[tuple[Any, Any]]:
        return list(zip(table[a], table[b]))

    def num(v: Any) -> str:
        return "–" if is_missing(v) else f"{v:.3f}"

    out = pd.DataFrame()
    names = {CLASS_KEY: "classes", WD_KEY: "weight decay"}
    for k in table.columns:
        if k in _VERDICT_NUMERIC or k in ("n_seeds", "seeds_complete", "collapsed", "passes"):
            continue
        out[names.get(k, k)] = [fmt_number(v) for v in table[k]]
    out["seeds"] = [f"{int(n)}" + ("" if ok else " (missing)") for n, ok in pairs("n_seeds", "seeds_complete")]
    out["peak ICL"] = [mean_std(m, s) for m, s in pairs("peak_icl_mean", "peak_icl_std")]
    out["baseline peak ICL"] = [mean_std(m, s) for m, s in pairs("baseline_peak_icl_mean", "baseline_peak_icl_std")]
    out["ratio"] = [mean_std(m, s) for m, s in pairs("ratio", "ratio_std")]
    out["per-seed ratio"] = ["–" if is_missing(a) else f"{a:.3f}–{b:.3f}"
                             for a, b in pairs("ratio_seed_min", "ratio_seed_max")]
    out["ratio above chance"] = [num(v) for v in table["ratio_above_chance"]]
    out["final train acc"] = [mean_std(m, s) for m, s in pairs("final_train_acc_mean", "final_train_acc_std")]
    out["vs wd 0"] = [num(v) for v in table["train_acc_ratio"]]
    out["collapsed"] = ["?" if is_missing(v) else ("yes" if v else "no") for v in table["collapsed"]]
    out["passes"] = ["?" if is_missing(v) else ("**yes**" if v else "no") for v in table["passes"]]
    return out


_VERDICT_NUMERIC = frozenset({
    "peak_icl_mean", "peak_icl_std", "baseline_peak_icl_mean", "baseline_peak_icl_std", "ratio", "ratio_std",
    "ratio_seed_min", "ratio_seed_max", "seeds_above", "ratio_above_chance", "final_train_acc_mean",
    "final_train_acc_std", "ref_final_train_acc_mean", "train_acc_ratio",
})
