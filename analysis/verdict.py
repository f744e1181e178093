"""The study's success criterion (STUDY.md), evaluated on a per-cell summary.

The hypothesis is about what weight decay *does* with few classes, so "supported" needs two
parts, both in the same few-class cell with weight decay > 0 (a *candidate*):

1. **reaches the bar** (the original criterion): its peak ICL (mean over seeds) is at least
   ``ratio`` (90%) of the peak ICL of the many-class, weight-decay-0 *baseline*, and its
   training accuracy did not collapse;
2. **a decay effect** (the control): its peak ICL exceeds that of the *reference*, the cell
   with the same number of classes and weight decay 0, with a 95% interval that excludes 0.

Made concrete here:

- **peak ICL**: the unbiased (cross-fitted) peak of :mod:`analysis.summary`, with its 95%
  interval over seeds and the evaluation set's binomial error (:mod:`analysis.intervals`);
- **baseline**: the cell with the largest number of classes (in the data or the spec's grid)
  and weight decay 0 (:func:`baseline_cell`; the plots draw the same one);
- **ratio**: candidate / baseline peak ICL (raw accuracies, chance 0.5, as the criterion
  states), ``>= ratio``; reported with a delta-method interval and the per-seed range;
- **collapse**: the candidate's mean final training accuracy is below ``collapse_fraction``
  (0.8) of the reference's, i.e. decay cost more than a fifth of the training accuracy the
  model reaches without it. Without the reference neither collapse nor the effect can be
  judged, and the candidate is undetermined;
- **decay effect**: candidate minus reference peak ICL. The same seed means the same
  initialisation and the same data stream in both cells (only the decay differs), so seeds
  are *paired*: the interval is a t interval over the per-seed differences (seeds both cells
  have; at least 2), plus both cells' evaluation error in quadrature. Cells that share fewer
  than 2 seeds but have 2 or more each get an unpaired Welch interval; otherwise the effect is
  "too few seeds to tell".

A candidate passes when both parts hold. Otherwise the headline says which part failed:
"below 90%" (no candidate reaches the bar), "decay made no difference" (one reaches it, but
its effect's interval includes 0 with enough seeds), "decay lowered ICL" (the interval lies
below 0), "too few seeds to tell" (fewer than 2 seeds to estimate the effect: undetermined).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from analysis.fmt import cell_label, fmt_number, fmt_shrink, join_words, markdown_table, mean_ci
from analysis.intervals import Interval, combine, ratio_interval, welch
from analysis.load import CLASS_KEY, SEED_KEY, WD_KEY, is_missing
from analysis.summary import ONSET_THRESHOLD, as_numbers, per_seed, same_value
from icl.errors import UserError
from icl.metrics import CHANCE, DECAY_EXP

RATIO = 0.9
COLLAPSE_FRACTION = 0.8
MIN_PAIRS = 2  # seeds (pairs) needed to put an interval over seeds on the decay effect
_EPS = 1e-12  # 0.855 / 0.95 must count as 0.9


@dataclass
class Verdict:
    """The criterion's outcome: ``status`` is ``supported``, ``not supported`` or ``undetermined``.

    ``provisional`` is True when the cells involved lack seeds, are behind (sweep running) or
    the grid lacks cells, so the status may still change. ``table`` has one row per candidate
    (both parts of the criterion, with their intervals).
    """

    status: str
    provisional: bool
    headline: str
    details: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    table: pd.DataFrame = field(default_factory=pd.DataFrame)

    @property
    def passing(self) -> pd.DataFrame:
        """The candidate cells that pass (both parts)."""
        if self.table.empty:
            return self.table
        return self.table[[_is_true(v) for v in self.table["passes"]]]

    def to_markdown(self) -> str:
        """The verdict as report prose: headline, details, missing cells, the two parts' tables."""
        out = [f"**{self.headline}**", ""]
        out += [f"- {d}" for d in self.details]
        if self.missing:
            out.append(f"- Missing from the grid or without results: {'; '.join(self.missing)}.")
        if not self.table.empty:
            bar, effect = format_verdict_table(self.table)
            out += ["", "*Part 1: the few-class cells with weight decay against the baseline.*", "",
                    markdown_table(bar), "", "*Part 2: the decay effect, each cell against the same classes at "
                    "weight decay 0 (95% interval).*", "", markdown_table(effect)]
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


def _known(sl: pd.DataFrame) -> pd.DataFrame:
    return sl[[not (is_missing(c) or is_missing(w)) for c, w in zip(sl[CLASS_KEY], sl[WD_KEY])]]


def class_counts(sl: pd.DataFrame, grid: dict[str, Sequence[Any]] | None = None) -> list[float]:
    """The numbers of classes of a slice of the summary, with those of the spec's grid."""
    extra = as_numbers((grid or {}).get(CLASS_KEY, []))
    return sorted({float(c) for c in _known(sl)[CLASS_KEY]} | {float(c) for c in extra})


def baseline_cell(sl: pd.DataFrame, grid: dict[str, Sequence[Any]] | None = None) -> tuple[float | None,
                                                                                            pd.Series | None]:
    """The baseline of a slice of the summary (one value of every grid key other than classes
    and weight decay): ``(its number of classes, its summary row)``, the row None when the
    largest number of classes (in the data or the spec's ``grid``) has no results at wd 0."""
    classes = class_counts(sl, grid)
    if not classes:
        return None, None
    return classes[-1], _find(_known(sl), classes[-1], 0.0)


def verdict(
    summary: pd.DataFrame,
    trials: pd.DataFrame | None = None,
    ratio: float = RATIO,
    collapse_fraction: float = COLLAPSE_FRACTION,
    grid: dict[str, Sequence[Any]] | None = None,
) -> Verdict:
    """Evaluate the two-part criterion (see the module docstring) on a per-cell ``summary``.

    ``trials`` (:func:`analysis.summary.trial_summary`) pairs the decay effect by seed and adds
    the per-seed ratio range; without it the effect is unpaired (Welch, from the summary's
    means and sds). ``grid`` (default ``summary.attrs["grid"]``, set by the CLI from the spec)
    lets the verdict name cells the sweep should have but has no results for yet. Cells are
    split by any grid key other than classes and weight decay; each slice gets its own baseline.
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


def _name(r: pd.Series | dict[str, Any]) -> str:
    return cell_label({CLASS_KEY: r[CLASS_KEY], WD_KEY: r[WD_KEY]})


def _judge_slice(
    where: dict[str, Any],
    sl: pd.DataFrame,
    trials: pd.DataFrame | None,
    ratio: float,
    collapse_fraction: float,
    grid: dict[str, Sequence[Any]],
) -> Verdict:
    prefix = f"[{cell_label(where)}] " if where else ""
    known = _known(sl)
    wds = sorted({float(w) for w in known[WD_KEY]} | {float(w) for w in as_numbers(grid.get(WD_KEY, []))})
    missing: list[str] = []
    details: list[str] = []
    many, base = baseline_cell(sl, grid)
    if many is None:
        return Verdict("undetermined", True, prefix + "Undetermined: no cell has a known number of classes.")
    if base is None:
        missing.append(f"the baseline {cell_label({CLASS_KEY: many, WD_KEY: 0.0})}")
    few = [c for c in class_counts(sl, grid) if c < many]
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
            ref_label = cell_label({CLASS_KEY: c, WD_KEY: 0.0}) + " (reference for collapse and the decay effect)"
            if ref_label not in missing:
                missing.append(ref_label)
        rows.append(_candidate_row(where, cand, base, ref, trials, ratio, collapse_fraction))
        for x in (cand, base, ref):
            if x is None:
                continue
            name = _name(x)
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
    elif no_icl(base):
        status = "undetermined"
        headline = (f"Undetermined (the baseline shows no ICL): the baseline's peak ICL "
                    f"({cell_label({CLASS_KEY: many, WD_KEY: 0.0})}: {_peak_txt(base)}) cannot be told from chance "
                    f"({CHANCE}), so reaching {ratio:.0%} of it says nothing; train longer, or check the baseline.")
        details += [_detail(r, ratio, collapse_fraction) for _, r in table.iterrows()]
    else:
        status, headline = _outcome(table, base, many, ratio)
        details += [_detail(r, ratio, collapse_fraction) for _, r in table.iterrows()]
        if base["peak_icl_mean"] < ONSET_THRESHOLD:
            details.append(
                f"Caution: the baseline itself barely shows ICL (peak {base['peak_icl_mean']:.3f}, chance {CHANCE}), "
                f"so the {ratio:.0%} bar ({ratio * base['peak_icl_mean']:.3f}) is close to chance; the column "
                "`ratio_above_chance` compares the gains over chance instead."
            )
        judged = [base] + [x for x in (_find(known, r[CLASS_KEY], v) for _, r in table.iterrows()
                                       for v in (r[WD_KEY], 0.0)) if x is not None]
        raw = list(dict.fromkeys(_name(x) for x in judged if x["peak_method"] != "cross-fit"))
        if raw:
            details.append(f"Peak ICL of {'; '.join(raw)} is the raw maximum over the evaluations (some or all of "
                           "their results lack the ICL set's two halves, logged before they existed): biased upward "
                           "by the evaluation noise.")
    if provisional:
        why = list(reasons.values()) + (["cells the criterion needs have no results (below)"] if missing else [])
        details.append(f"Provisional, may change with more results: {'; '.join(why)}.")
    return Verdict(status, provisional, prefix + headline, details, missing, table)


def no_icl(cell: pd.Series) -> bool:
    """A cell whose peak ICL cannot be told from chance: its 95% interval reaches down to 0.5
    (without an interval, its mean lies below the onset threshold)."""
    lo = cell["peak_icl_lo"]
    return bool(lo <= CHANCE) if not is_missing(lo) else bool(cell["peak_icl_mean"] < ONSET_THRESHOLD)


def _peak_txt(r: pd.Series, prefix: str = "") -> str:
    return mean_ci(r[f"{prefix}peak_icl_mean"], r[f"{prefix}peak_icl_lo"], r[f"{prefix}peak_icl_hi"])


def _ratio_txt(r: pd.Series) -> str:
    return mean_ci(r["ratio"], r["ratio_lo"], r["ratio_hi"])


def _effect_txt(r: pd.Series) -> str:
    if is_missing(r["effect"]):
        return "not measurable (no reference cell)"
    txt = f"{r['effect']:+.3f}"
    if not is_missing(r["effect_lo"]):
        txt += f" (95% CI {r['effect_lo']:+.3f} to {r['effect_hi']:+.3f}, {r['effect_how']})"
    else:
        txt += f" ({r['effect_how']})"
    return txt


def _outcome(table: pd.DataFrame, base: pd.Series, many: float, ratio: float) -> tuple[str, str]:
    """The status and headline of one slice from its candidate table."""
    base_txt = f"the baseline's peak ICL ({cell_label({CLASS_KEY: many, WD_KEY: 0.0})}: {_peak_txt(base)})"
    passing = table[[_is_true(v) for v in table["passes"]]]
    if len(passing):
        names = [f"{_name(r)} (peak ICL {_peak_txt(r)} = {_ratio_txt(r)} of the baseline; above "
                 f"{cell_label({CLASS_KEY: r[CLASS_KEY], WD_KEY: 0.0})} by {_effect_txt(r)})"
                 for _, r in passing.iterrows()]
        return "supported", (f"Supported: {len(passing)} of {len(table)} few-class cells with weight decay > 0 reach "
                             f"at least {ratio:.0%} of {base_txt} without training accuracy collapsing, and beat the "
                             f"same classes at weight decay 0: {join_words(names)}.")
    reach = table[[_is_true(v) for v in table["reaches"]]]
    if reach.empty:
        best = table.sort_values("ratio", ascending=False).iloc[0]
        if table["reaches"].isna().all():
            return "undetermined", ("Undetermined: no few-class cell with weight decay > 0 can be judged: the same "
                                    "classes at weight decay 0 have no results (collapse and the decay effect need "
                                    "them).")
        return "not supported", (f"Not supported (below {ratio:.0%}): no few-class cell with weight decay > 0 reaches "
                                 f"{ratio:.0%} of {base_txt} without collapsing; the best is {_name(best)} at "
                                 f"{_ratio_txt(best)} of the baseline (peak ICL {_peak_txt(best)}).")
    few_seeds = reach[reach["decay_effect"].isna()]
    if len(few_seeds):
        r = few_seeds.iloc[0]
        return "undetermined", (f"Undetermined (too few seeds to tell): {_name(r)} reaches {_ratio_txt(r)} of "
                                f"{base_txt}, but whether decay made the difference needs at least {MIN_PAIRS} seeds "
                                f"in it and in {cell_label({CLASS_KEY: r[CLASS_KEY], WD_KEY: 0.0})}: effect "
                                f"{_effect_txt(r)}.")
    best = reach.sort_values("effect_lo", ascending=False).iloc[0]
    ref = cell_label({CLASS_KEY: best[CLASS_KEY], WD_KEY: 0.0})
    what = "decay lowered ICL" if best["effect_hi"] < 0 else "decay made no difference"
    return "not supported", (f"Not supported ({what}): {join_words([_name(r) for _, r in reach.iterrows()])} "
                             f"reach{'es' if len(reach) == 1 else ''} {ratio:.0%} of {base_txt}, but none beats the "
                             f"same classes at weight decay 0: the best, {_name(best)} (peak ICL {_peak_txt(best)}), "
                             f"differs from {ref} ({_peak_txt(best, 'ref_')}) by {_effect_txt(best)}, an interval "
                             f"that {'lies below' if best['effect_hi'] < 0 else 'includes'} 0.")


def _detail(r: pd.Series, ratio: float, collapse_fraction: float) -> str:
    part1 = "undetermined" if is_missing(r["reaches"]) else "reaches the bar" if r["reaches"] else "below the bar"
    part2 = ("too few seeds" if is_missing(r["decay_effect"]) else "a decay effect" if r["decay_effect"]
             else "no decay effect")
    txt = (f"{_name(r)} (shrink {fmt_shrink(r[DECAY_EXP])}): {part1}, {part2}; peak ICL {_peak_txt(r)} = "
           f"{_ratio_txt(r)} of the baseline")
    if not is_missing(r.get("ratio_seed_min")):
        txt += (f" (per seed {r['ratio_seed_min']:.3f}–{r['ratio_seed_max']:.3f}, "
                f"{int(r['seeds_above'])} of {int(r['n_seeds'])} seeds at the bar)")
    txt += f", bar {ratio:.2f}"
    if is_missing(r["train_acc_ratio"]):
        txt += "; collapse not judged: no weight-decay-0 cell with the same classes"
    else:
        state = "collapsed" if r["collapsed"] else "no collapse"
        txt += (f"; final train acc {r['final_train_acc_mean']:.3f} vs {r['ref_final_train_acc_mean']:.3f} at wd 0 = "
                f"{r['train_acc_ratio']:.3f} ({state}, limit {collapse_fraction:.2f}); decay effect {_effect_txt(r)}")
    if not r["seeds_complete"]:
        txt += f"; only {int(r['n_seeds'])} seed(s)"
    return txt + "."


def _interval(cell: pd.Series) -> Interval:
    return Interval(float(cell["peak_icl_mean"]), float(cell["peak_icl_lo"]), float(cell["peak_icl_hi"]),
                    int(cell["n_seeds"]), str(cell["interval"]), float(cell["peak_icl_half"]))


def _seed_peaks(trials: pd.DataFrame | None, where: dict[str, Any], cell: pd.Series) -> pd.DataFrame | None:
    """The cell's per-seed peaks (one trial per seed, as in the summary), indexed by seed."""
    if trials is None:
        return None
    mask = pd.Series(True, index=trials.index)
    for k, v in {**where, CLASS_KEY: cell[CLASS_KEY], WD_KEY: cell[WD_KEY]}.items():
        if k in trials.columns:
            mask &= trials[k].map(lambda x, v=v: same_value(x, v))
    return per_seed(trials.loc[mask]).set_index(SEED_KEY)[["peak_icl", "peak_icl_se"]]


def decay_effect(cand: pd.Series, ref: pd.Series, cand_seeds: pd.DataFrame | None,
                 ref_seeds: pd.DataFrame | None) -> tuple[Interval, str]:
    """Candidate minus reference peak ICL with its 95% interval, and how it was paired: by seed
    over the seeds both cells have (at least :data:`MIN_PAIRS`, or all of them), else unpaired
    (Welch, from the summary's means and sds)."""
    if cand_seeds is not None and ref_seeds is not None:
        common = sorted(set(cand_seeds.index) & set(ref_seeds.index))
        if len(common) >= MIN_PAIRS or (common and set(cand_seeds.index) == set(ref_seeds.index)):
            a, b = cand_seeds.loc[common], ref_seeds.loc[common]
            diff = a["peak_icl"].to_numpy(float) - b["peak_icl"].to_numpy(float)
            se = (a["peak_icl_se"].to_numpy(float) ** 2 + b["peak_icl_se"].to_numpy(float) ** 2) ** 0.5
            dropped = sorted((set(cand_seeds.index) | set(ref_seeds.index)) - set(common))
            note = f"; seed(s) {', '.join(fmt_number(s) for s in dropped)} unpaired, left out" if dropped else ""
            return combine(diff, se, pairs=True), "paired by seed " + ",".join(fmt_number(s) for s in common) + note
    ci = welch(float(cand["peak_icl_mean"]), float(cand["peak_icl_std"]), int(cand["n_seeds"]),
               float(ref["peak_icl_mean"]), float(ref["peak_icl_std"]), int(ref["n_seeds"]),
               float(cand["peak_icl_se"]), float(ref["peak_icl_se"]))
    return ci, "unpaired"


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
    nan = math.nan
    row[CLASS_KEY] = cand[CLASS_KEY]
    row[WD_KEY] = cand[WD_KEY]
    row[DECAY_EXP] = cand[DECAY_EXP]
    row["n_seeds"] = int(cand["n_seeds"])
    row["seeds_complete"] = bool(cand["seeds_complete"])
    row["peak_method"] = cand["peak_method"]
    for s in ("mean", "std", "lo", "hi"):
        row[f"peak_icl_{s}"] = cand[f"peak_icl_{s}"]
    row.update(baseline_peak_icl_mean=nan, baseline_peak_icl_lo=nan, baseline_peak_icl_hi=nan, ratio=nan,
               ratio_lo=nan, ratio_hi=nan, ratio_seed_min=nan, ratio_seed_max=nan, seeds_above=nan,
               ratio_above_chance=nan)
    cand_seeds = _seed_peaks(trials, where, cand)
    if base is not None:
        b_mean = float(base["peak_icl_mean"])
        r, lo, hi = ratio_interval(_interval(cand), _interval(base))
        row.update(baseline_peak_icl_mean=b_mean, baseline_peak_icl_lo=base["peak_icl_lo"],
                   baseline_peak_icl_hi=base["peak_icl_hi"], ratio=r, ratio_lo=lo, ratio_hi=hi)
        if b_mean != CHANCE:
            row["ratio_above_chance"] = (float(cand["peak_icl_mean"]) - CHANCE) / (b_mean - CHANCE)
        if cand_seeds is not None and len(cand_seeds):
            peaks = cand_seeds["peak_icl"]
            row.update(ratio_seed_min=float(peaks.min()) / b_mean, ratio_seed_max=float(peaks.max()) / b_mean,
                       seeds_above=int((peaks >= ratio * b_mean - _EPS).sum()))
    row["final_train_acc_mean"] = cand["final_train_acc_mean"]
    row["final_train_acc_std"] = cand["final_train_acc_std"]
    row.update(ref_peak_icl_mean=nan, ref_peak_icl_lo=nan, ref_peak_icl_hi=nan, ref_final_train_acc_mean=nan,
               train_acc_ratio=nan, effect=nan, effect_lo=nan, effect_hi=nan, effect_n=0, effect_how="")
    if ref is not None:
        row.update(ref_peak_icl_mean=ref["peak_icl_mean"], ref_peak_icl_lo=ref["peak_icl_lo"],
                   ref_peak_icl_hi=ref["peak_icl_hi"], ref_final_train_acc_mean=float(ref["final_train_acc_mean"]))
        row["train_acc_ratio"] = float(cand["final_train_acc_mean"]) / row["ref_final_train_acc_mean"]
        ci, pairing = decay_effect(cand, ref, cand_seeds, _seed_peaks(trials, where, ref))
        row.update(effect=ci.mean, effect_lo=ci.lo, effect_hi=ci.hi, effect_n=ci.n, effect_how=f"{pairing}: {ci.how}")
    row["collapsed"] = pd.NA if ref is None else bool(row["train_acc_ratio"] < collapse_fraction - _EPS)
    row["reaches"] = pd.NA if base is None or ref is None else \
        bool(row["ratio"] >= ratio - _EPS and not row["collapsed"])
    enough = ref is not None and row["effect_n"] >= MIN_PAIRS and not is_missing(row["effect_lo"])
    row["decay_effect"] = bool(row["effect_lo"] > 0) if enough else pd.NA
    if is_missing(row["reaches"]):
        row["passes"] = pd.NA
    elif not row["reaches"] or (not is_missing(row["decay_effect"]) and not row["decay_effect"]):
        row["passes"] = False
    else:
        row["passes"] = pd.NA if is_missing(row["decay_effect"]) else True
    return row


def format_verdict_table(table: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The candidate table as strings for the report: part 1 (the bar) and part 2 (the effect)."""

    def pairs(*cols: str) -> list[tuple[Any, ...]]:
        return list(zip(*(table[c] for c in cols)))

    def num(v: Any) -> str:
        return "–" if is_missing(v) else f"{v:.3f}"

    def peak(prefix: str) -> list[str]:
        return [mean_ci(m, lo, hi) for m, lo, hi in pairs(f"{prefix}_mean", f"{prefix}_lo", f"{prefix}_hi")]

    def yes_no(v: Any, yes: str = "**yes**") -> str:
        return "?" if is_missing(v) else (yes if v else "no")

    cells = pd.DataFrame()
    names = {CLASS_KEY: "classes", WD_KEY: "weight decay"}
    for k in table.columns:
        if k in _VERDICT_COLUMNS:
            continue
        cells[names.get(k, k)] = [fmt_number(v) for v in table[k]]
    cells["shrink"] = [fmt_shrink(v) for v in table[DECAY_EXP]]
    cells["seeds"] = [f"{int(n)}" + ("" if ok else " (missing)") for n, ok in pairs("n_seeds", "seeds_complete")]
    bar, effect = cells.copy(), cells.copy()
    bar["peak ICL"] = peak("peak_icl")
    bar["baseline peak ICL"] = peak("baseline_peak_icl")
    bar["ratio"] = [mean_ci(r, lo, hi) for r, lo, hi in pairs("ratio", "ratio_lo", "ratio_hi")]
    bar["per-seed ratio"] = ["–" if is_missing(a) else f"{a:.3f}–{b:.3f}" for a, b in
                             pairs("ratio_seed_min", "ratio_seed_max")]
    bar["ratio above chance"] = [num(v) for v in table["ratio_above_chance"]]
    bar["final train acc vs wd 0"] = [num(v) for v in table["train_acc_ratio"]]
    bar["collapsed"] = [yes_no(v, "yes") for v in table["collapsed"]]
    bar["reaches the bar"] = [yes_no(v) for v in table["reaches"]]
    effect["peak ICL"] = bar["peak ICL"]
    effect["same classes, wd 0"] = peak("ref_peak_icl")
    effect["effect"] = [num(m) if is_missing(lo) else f"{m:+.3f} [{lo:+.3f}, {hi:+.3f}]"
                        for m, lo, hi in pairs("effect", "effect_lo", "effect_hi")]
    effect["interval"] = list(table["effect_how"])
    effect["decay effect"] = [yes_no(v) for v in table["decay_effect"]]
    effect["passes (both parts)"] = [yes_no(v) for v in table["passes"]]
    return bar, effect


_VERDICT_COLUMNS = frozenset({
    DECAY_EXP, "n_seeds", "seeds_complete", "peak_method", "peak_icl_mean", "peak_icl_std", "peak_icl_lo",
    "peak_icl_hi", "baseline_peak_icl_mean", "baseline_peak_icl_lo", "baseline_peak_icl_hi", "ratio", "ratio_lo",
    "ratio_hi", "ratio_seed_min", "ratio_seed_max", "seeds_above", "ratio_above_chance", "final_train_acc_mean",
    "final_train_acc_std", "ref_peak_icl_mean", "ref_peak_icl_lo", "ref_peak_icl_hi", "ref_final_train_acc_mean",
    "train_acc_ratio", "effect", "effect_lo", "effect_hi", "effect_n", "effect_how", "collapsed", "reaches",
    "decay_effect", "passes",
})
