"""Per-trial and per-cell numbers that say how ICL rises and fades: peak, final, drop, onset.

A *cell* is a grid point without the seed (e.g. 100 classes, weight decay 1e-3); its numbers
are the mean and sample standard deviation (ddof=1; NaN with one seed) over its seeds of the
per-trial numbers below, and, for the ICL figures, a 95% interval (``<stat>_lo``/``_hi``:
:mod:`analysis.intervals`, over seeds and the evaluation set's binomial error). Definitions,
used everywhere in the package:

- ``peak_icl``: the peak of holdout ICL (``icl_acc``, chance 0.5) *without the max-of-noise
  bias*: the step is chosen on one half of the ICL set and the value read on the other, both
  ways, averaged (:func:`analysis.intervals.cross_fit_peak` on ``icl_acc_even`` /
  ``icl_acc_odd``; ``peak_method`` "cross-fit"). Results logged before the halves existed fall
  back to the raw maximum (``peak_method`` "raw max", biased upward). ``peak_icl_raw``: the
  raw maximum over evaluations, always (biased upward: a chance-level curve of 100
  evaluations of 1,024 sequences reads about 0.54). ``peak_step``: the step of the first
  occurrence of the raw maximum of ``icl_acc``.
- ``final_*``: the value at the trial's *last* evaluation that has one (the largest step). For
  a sweep that is still running this is the latest evaluation so far, so cells whose trials
  are behind the others are flagged (``behind``).
- ``icl_drop``: ``peak_icl - final_icl``, the transience (about 0 when ICL never fades; with the
  unbiased peak it can read slightly below 0).
- ``final_ciwl``, ``final_flip_ctx``, ``final_flip_iwl``: the last ``ciwl_acc``,
  ``flip_icl_ctx_acc`` and ``flip_icl_iwl_acc`` (argmax over every label); ``*_inctx``: the
  same evaluators scored as the peer code scores them (argmax over the labels in context; NaN
  for results logged before these columns existed). ICL that fades into CIWL rather than into
  pure IWL (the coopetition paper's 2-layer runs) shows as a high ``final_ciwl_inctx`` beside a
  low ``final_iwl``.
- ``icl_onset_step``: the first step at which ``icl_acc >= threshold`` (default
  :data:`ONSET_THRESHOLD` = 0.6, i.e. 10 points above chance, well above the noise of a
  1,024-sequence evaluation, about +-0.016); NaN for a trial that never gets there. The cell
  mean is over the seeds that got there; ``icl_onset_n`` says how many did.
- ``decay_exponent``: ``wd * sum_t lr_t`` over the run's schedule (:mod:`icl.schedule`), so
  ``shrink_factor = exp(-decay_exponent)`` is the factor decoupled weight decay scales a weight
  with no gradient by over the whole run (NaN where the config is unknown or the L2 coupled).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from analysis.intervals import binomial_se, combine, cross_fit_peak, rms
from analysis.load import SEED_KEY, is_missing, order_keys
from icl.config import valid_keys
from icl.errors import UserError
from icl.metrics import (CIWL, CIWL_INCTX, DECAY_EXP, FLIP_CTX, FLIP_CTX_INCTX, FLIP_IWL, FLIP_IWL_INCTX, ICL,
                         ICL_EVEN, ICL_ODD, IWL, N_EVAL, TRAIN_ACC)

ONSET_THRESHOLD = 0.6
STATS = ("peak_icl", "peak_icl_raw", "peak_step", "final_icl", "icl_drop", "final_iwl", "final_train_acc",
         "icl_onset_step", "final_ciwl", "final_ciwl_inctx", "final_flip_ctx", "final_flip_ctx_inctx",
         "final_flip_iwl", "final_flip_iwl_inctx")
FINAL_METRICS = {"final_iwl": IWL, "final_train_acc": TRAIN_ACC, "final_ciwl": CIWL, "final_ciwl_inctx": CIWL_INCTX,
                 "final_flip_ctx": FLIP_CTX, "final_flip_ctx_inctx": FLIP_CTX_INCTX, "final_flip_iwl": FLIP_IWL,
                 "final_flip_iwl_inctx": FLIP_IWL_INCTX}
# The ICL figures that get a 95% interval (<stat>_lo, <stat>_hi), each with its per-trial
# binomial standard error from the evaluation set (<stat>_se).
INTERVAL_STATS = ("peak_icl", "peak_icl_raw", "final_icl", "icl_drop")
CROSS_FIT, RAW_MAX = "cross-fit", "raw max"


def cell_keys(df: pd.DataFrame) -> list[str]:
    """The columns that identify a cell: grid-key columns (valid config keys) except ``seed``.

    ``experiment`` joins them only when two experiments hold the same grid point and seed
    (e.g. two sweeps of different presets); otherwise experiments that split one grid between
    them (more seeds later, a second sweep for new weight decays) are pooled.
    """
    known = set(valid_keys())
    keys = order_keys(c for c in df.columns if c in known and c != SEED_KEY)
    if "experiment" in df.columns and df["experiment"].nunique(dropna=False) > 1:
        ids = df[[*keys, SEED_KEY, "experiment"]].drop_duplicates()
        if ids.duplicated(subset=[*keys, SEED_KEY], keep=False).any():
            keys.append("experiment")
    return keys


def _require(df: pd.DataFrame, columns: Iterable[str]) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise UserError(f"the results table lacks column(s) {', '.join(missing)}; load it with load_results()")
    if df.empty:
        raise UserError("the results table has no rows: nothing to summarise")


def with_ids(df: pd.DataFrame) -> pd.DataFrame:
    """A hand-made frame may lack ``experiment``/``trial_id``: one experiment; trial = keys + seed."""
    if "experiment" in df.columns and "trial_id" in df.columns:
        return df
    df = df.copy()
    if "experiment" not in df.columns:
        df["experiment"] = ""
    if "trial_id" not in df.columns:
        known = set(valid_keys())
        cols = [c for c in df.columns if c in known]
        df["trial_id"] = df[cols].astype(str).agg("_".join, axis=1) if cols else "trial"
    return df


def _last_valid(g: pd.DataFrame, col: str) -> float:
    if col not in g.columns:
        return math.nan
    vals = g[col].dropna()
    return float(vals.iloc[-1]) if len(vals) else math.nan


def _first(g: pd.DataFrame, col: str) -> float:
    vals = g[col].dropna() if col in g.columns else ()
    return float(vals.iloc[0]) if len(vals) else math.nan


def _peak(g: pd.DataFrame, n: float) -> dict[str, Any]:
    """The trial's peak ICL (cross-fitted on the two halves where it has them, else the raw
    maximum) and its binomial standard error; the raw maximum and its step."""
    icl = g[["step", ICL]].dropna()
    values = icl[ICL].to_numpy(dtype=float)
    i = int(np.argmax(values))  # first occurrence of the maximum
    raw = values[i]
    out: dict[str, Any] = dict(peak_icl_raw=raw, peak_icl_raw_se=binomial_se(raw, n),
                               peak_step=icl["step"].to_numpy(dtype=float)[i])
    halves = g[[ICL_EVEN, ICL_ODD]].dropna() if {ICL_EVEN, ICL_ODD} <= set(g.columns) else pd.DataFrame()
    if len(halves):
        even, odd = halves[ICL_EVEN].to_numpy(dtype=float), halves[ICL_ODD].to_numpy(dtype=float)
        peak, a, b = cross_fit_peak(even, odd)  # step chosen on even, read on odd; and the reverse
        n_even, n_odd = (math.ceil(n / 2), math.floor(n / 2)) if n > 0 else (math.nan, math.nan)
        se = 0.5 * math.hypot(binomial_se(odd[a], n_odd), binomial_se(even[b], n_even))
        out.update(peak_icl=peak, peak_icl_se=se, peak_method=CROSS_FIT)
    else:
        out.update(peak_icl=raw, peak_icl_se=out["peak_icl_raw_se"], peak_method=RAW_MAX)
    return out


def trial_summary(df: pd.DataFrame, threshold: float = ONSET_THRESHOLD) -> pd.DataFrame:
    """One row per trial: the cell keys, ``seed``, the :data:`STATS`, ``peak_method``, the
    binomial standard errors ``<stat>_se`` of the :data:`INTERVAL_STATS` (NaN where the
    evaluation set's size is unknown), ``eval_sequences``, ``decay_exponent``, ``last_step``
    and ``n_evals``.

    ``df`` is a tidy results frame (:func:`analysis.load.load_results`). See the module
    docstring for the definitions of peak, final, drop and onset.
    """
    _require(df, [SEED_KEY, "step", ICL, IWL, TRAIN_ACC])
    df = with_ids(df)
    keys = cell_keys(df)
    id_cols = ["experiment", "trial_id"]
    rows: list[dict[str, Any]] = []
    for (experiment, trial_id), g in df.groupby(id_cols, sort=True, dropna=False):
        g = g.sort_values("step", kind="stable")
        row: dict[str, Any] = {"experiment": experiment, "trial_id": trial_id}
        row.update({k: g[k].iloc[0] for k in keys if k != "experiment"})
        row[SEED_KEY] = g[SEED_KEY].iloc[0]
        n = _first(g, N_EVAL)
        icl = g[["step", ICL]].dropna()
        if len(icl):
            values = icl[ICL].to_numpy(dtype=float)
            steps = icl["step"].to_numpy(dtype=float)
            reached = np.nonzero(values >= threshold)[0]
            row.update(_peak(g, n))
            row.update(
                final_icl=values[-1],
                final_icl_se=binomial_se(values[-1], n),
                icl_onset_step=steps[reached[0]] if len(reached) else math.nan,
            )
            row["icl_drop"] = row["peak_icl"] - row["final_icl"]
            row["icl_drop_se"] = math.hypot(row["peak_icl_se"], row["final_icl_se"])
        else:
            row.update({c: math.nan for c in ("peak_icl", "peak_icl_raw", "peak_step", "final_icl", "icl_drop",
                                              "icl_onset_step", *(f"{s}_se" for s in INTERVAL_STATS))})
            row["peak_method"] = ""
        for stat, metric in FINAL_METRICS.items():
            row[stat] = _last_valid(g, metric)
        row[N_EVAL] = n
        row[DECAY_EXP] = _first(g, DECAY_EXP)
        row["last_step"] = float(g["step"].max())
        row["n_evals"] = int(len(g))
        rows.append(row)
    cols = ["experiment", "trial_id", *[k for k in keys if k != "experiment"], SEED_KEY, *STATS, "peak_method",
            *(f"{s}_se" for s in INTERVAL_STATS), N_EVAL, DECAY_EXP, "last_step", "n_evals"]
    return pd.DataFrame(rows, columns=cols)


def per_seed(trials: pd.DataFrame) -> pd.DataFrame:
    """One trial per seed: the one that got furthest (a re-run seed must not count twice)."""
    g = trials[trials["peak_icl"].notna()].sort_values(["last_step", "n_evals"], ascending=False, kind="stable")
    return g.drop_duplicates(subset=[SEED_KEY], keep="first")


def _method(methods: Iterable[str]) -> str:
    found = sorted({m for m in methods if m})
    return found[0] if len(found) == 1 else "mixed" if found else ""


def _fmt_seeds(seeds: Iterable[Any]) -> str:
    return ",".join(str(int(s)) if float(s).is_integer() else str(s) for s in seeds)


def summarize(
    df: pd.DataFrame,
    threshold: float = ONSET_THRESHOLD,
    expected_seeds: Sequence[Any] | None = None,
) -> pd.DataFrame:
    """One row per cell: the cell keys, ``n_seeds``, ``<stat>_mean`` and ``<stat>_std`` per stat.

    Seeds are counted, not assumed: ``expected_seeds`` (default: the spec's seed list kept by
    ``load_results`` in ``df.attrs``, else every seed seen in any cell) against the seeds with
    ICL data gives ``missing_seeds`` and ``seeds_complete``, so a cell averaged over fewer seeds
    is visible as such. Extra columns: ``decay_exponent`` and ``shrink_factor`` (the effective
    decay, see the module docstring), ``<stat>_lo``/``<stat>_hi`` (95% interval) for the
    :data:`INTERVAL_STATS` with ``interval`` (which errors it covers), ``peak_method``
    (cross-fit, raw max or mixed), ``icl_onset_n`` (seeds that reached the onset
    threshold), ``seeds``, ``n_trials`` (> ``n_seeds`` when one seed ran twice in a cell; the
    trial that got furthest is kept), ``last_step_min``/``last_step_max`` and ``behind``
    (some trial of the cell has not reached the furthest step of any trial: a running sweep,
    so its "final" numbers are provisional).
    """
    trials = trial_summary(df, threshold)
    keys = cell_keys(with_ids(df))
    if expected_seeds is None:
        expected_seeds = df.attrs.get("expected_seeds")
    have_icl = trials[trials["peak_icl"].notna()]
    if have_icl.empty:
        raise UserError(f"metric {ICL} has no values in any trial: nothing to summarise")
    if expected_seeds is None:
        expected = sorted(set(have_icl[SEED_KEY].dropna().tolist()))
    else:
        expected = sorted(set(as_numbers(expected_seeds)))
    furthest = trials["last_step"].max()

    rows: list[dict[str, Any]] = []
    groups = trials.groupby(keys, dropna=False, sort=True) if keys else [((), trials)]
    for key_vals, all_g in groups:
        key_vals = key_vals if isinstance(key_vals, tuple) else (key_vals,)
        g = per_seed(all_g)
        row: dict[str, Any] = dict(zip(keys, key_vals))
        seeds = sorted(set(g[SEED_KEY].dropna().tolist()))
        row["n_seeds"] = len(seeds)
        decay = all_g[DECAY_EXP].dropna()
        row[DECAY_EXP] = float(decay.mean()) if len(decay) else math.nan
        row["shrink_factor"] = math.exp(-row[DECAY_EXP])
        for stat in STATS:
            n = int(g[stat].notna().sum())
            row[f"{stat}_mean"] = float(g[stat].mean()) if n else math.nan
            row[f"{stat}_std"] = float(g[stat].std(ddof=1)) if n > 1 else math.nan
        for stat in INTERVAL_STATS:
            bounds = None if stat == "icl_drop" else (0.0, 1.0)
            ci = combine(g[stat].to_numpy(float), g[f"{stat}_se"].to_numpy(float), bounds)
            row[f"{stat}_lo"], row[f"{stat}_hi"] = ci.lo, ci.hi
            if stat == "peak_icl":
                row["interval"] = ci.how
                row["peak_icl_half"] = ci.half  # before clipping to [0, 1]: for ratios of peaks
                row["peak_icl_se"] = rms(g["peak_icl_se"])  # the evaluation set's error of the cell
        row["peak_method"] = _method(g["peak_method"])
        row["icl_onset_n"] = int(g["icl_onset_step"].notna().sum())
        row["seeds"] = _fmt_seeds(seeds)
        missing = [s for s in expected if s not in seeds]
        row["missing_seeds"] = _fmt_seeds(missing)
        row["seeds_complete"] = not missing
        row["n_trials"] = int(len(all_g))
        if g.empty:
            g = all_g
        row["last_step_min"] = float(g["last_step"].min())
        row["last_step_max"] = float(g["last_step"].max())
        row["behind"] = bool(g["last_step"].min() < furthest)
        rows.append(row)
    cols = [*keys, "n_seeds", DECAY_EXP, "shrink_factor", *[f"{s}_{a}" for s in STATS for a in ("mean", "std")],
            *[f"{s}_{a}" for s in INTERVAL_STATS for a in ("lo", "hi")], "interval", "peak_icl_half", "peak_icl_se",
            "peak_method", "icl_onset_n",
            "seeds", "missing_seeds", "seeds_complete", "n_trials", "last_step_min", "last_step_max", "behind"]
    out = pd.DataFrame(rows, columns=cols)
    out.attrs["expected_seeds"] = expected
    out.attrs["threshold"] = threshold
    return out


def as_numbers(values: Iterable[Any]) -> list[Any]:
    """Spec values as numbers (YAML reads ``1e-3`` as a string); whole numbers as int."""
    out = []
    for v in values:
        try:
            f = float(v)
        except (TypeError, ValueError):
            out.append(v)
            continue
        out.append(int(f) if f.is_integer() else f)
    return out


def same_value(a: Any, b: Any) -> bool:
    """Grid values equal up to float noise (``0.001`` from a CSV vs ``1e-3`` from a spec)."""
    if is_missing(a) or is_missing(b):
        return is_missing(a) and is_missing(b)
    try:
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0)
    except (TypeError, ValueError):
        return str(a) == str(b)


def missing_cells(summary: pd.DataFrame, grid: dict[str, Sequence[Any]] | None) -> list[dict[str, Any]]:
    """Grid points of a sweep spec's ``grid`` (seed aside) with no results in ``summary``.

    Only keys that are columns of ``summary`` count; with no grid, nothing is known to be missing.
    """
    if not grid:
        return []
    keys = [k for k in order_keys(grid) if k != SEED_KEY and k in summary.columns]
    if not keys:
        return []
    present = summary[keys].to_numpy(dtype=object).tolist()
    out = []
    for combo in itertools.product(*(as_numbers(grid[k]) for k in keys)):
        if not any(all(same_value(a, b) for a, b in zip(combo, row)) for row in present):
            out.append(dict(zip(keys, combo)))
    return out
