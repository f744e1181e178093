"""95% intervals and the unbiased peak: the statistics behind every ICL figure the analysis reports.

Two sources of error, and how they are combined (``analysis/README.md``, "Intervals"):

- **over seeds**: a cell's figure is the mean of its seeds' estimates; the seeds' spread gives
  a Student-t interval, ``t_{0.975, k-1} * sd / sqrt(k)`` (``k >= 2`` seeds);
- **the evaluation set**: each estimate is an accuracy on a fixed, finite set of sequences, a
  binomial proportion with standard error ``sqrt(p (1 - p) / n)`` (normal approximation). Every
  run and seed is scored on the *same* set, so this error does not average out over seeds: the
  cell's evaluation error is the root-mean-square of its seeds' standard errors, not that over
  ``sqrt(k)``.

Both half-widths are added in quadrature, ``sqrt(h_seeds^2 + h_eval^2)``, which is conservative
where the seeds' spread already contains part of the evaluation noise. With one seed only the
evaluation term is left; with an unknown set size only the seeds' term.

**Peak without the max-of-noise bias** (:func:`cross_fit_peak`): the maximum of a noisy curve
over many evaluations is biased upward (a chance-level curve of 100 evaluations on 1,024
sequences reads about 0.54). The ICL set is split in two fixed halves (even and odd sequence
indices, ``icl_acc_even`` / ``icl_acc_odd``); the peak step is chosen on one half and its value
read on the other, both ways, and the two reads are averaged (cross-fitting). The value read
was not used to choose the step, so its noise has mean zero: the estimate is unbiased for the
true accuracy at the chosen step (which can only lie at or below the true peak).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

Z95 = 1.959963984540054  # two-sided 95% normal quantile
# t_{0.975, df} for df = 1..30 (beyond, the Cornish-Fisher expansion in t95 is exact to 1e-5)
_T95 = (12.7062047, 4.30265273, 3.18244631, 2.77644511, 2.57058184, 2.44691185, 2.36462425, 2.30600414,
        2.26215716, 2.22813885, 2.20098516, 2.17881283, 2.16036866, 2.14478669, 2.13144955, 2.11990530,
        2.10981558, 2.10092204, 2.09302405, 2.08596345, 2.07961384, 2.07387307, 2.06865761, 2.06389856,
        2.05953855, 2.05552944, 2.05183052, 2.04840714, 2.04522964, 2.04227246)


def t95(df: float) -> float:
    """The two-sided 95% Student-t quantile ``t_{0.975, df}`` (no scipy needed): tabulated for
    whole ``df`` up to 30, interpolated in ``1/df`` between them for Welch's fractional ``df``
    (never narrower than the exact quantile, wider by under 1% above ``df`` 4), the
    Cornish-Fisher expansion beyond."""
    if df < 1:
        return math.nan
    if df <= len(_T95):
        lo, hi = math.floor(df), math.ceil(df)
        if lo == hi:
            return _T95[lo - 1]
        w = (1 / df - 1 / hi) / (1 / lo - 1 / hi)  # t is close to linear in 1/df
        return w * _T95[lo - 1] + (1 - w) * _T95[hi - 1]
    z = Z95
    return (z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3))


def binomial_se(p: float, n: float) -> float:
    """Standard error of an accuracy ``p`` measured on ``n`` sequences (NaN if ``n`` is unknown),
    with the Agresti-Coull centre ``(p n + 2) / (n + 4)`` so that a perfect score still has one."""
    if not (n > 0) or not math.isfinite(p):
        return math.nan
    q = (p * n + 2) / (n + 4)
    return math.sqrt(q * (1.0 - q) / n)


@dataclass(frozen=True)
class Interval:
    """A figure with its 95% interval; ``how`` says which sources of error it covers."""

    mean: float
    lo: float
    hi: float
    n: int  # seeds (or seed pairs) behind the mean
    how: str
    half: float = math.nan  # the half-width before any clipping to bounds

    def excludes_zero(self) -> bool:
        return self.lo > 0 or self.hi < 0


def _how(k: int, seeds: bool, evals: bool, pairs: bool = False) -> str:
    unit = "paired seeds" if pairs else "seeds"
    parts = []
    if seeds:
        parts.append(f"t over {k} {unit}")
    if evals:
        parts.append("binomial error of the evaluation set")
    if not parts:
        return f"none ({k} {'seed pair' if pairs else 'seed'}, evaluation size unknown)"
    return " + ".join(parts) + ("" if seeds else f" only ({k} {'seed pair' if pairs else 'seed'})")


def combine(values: Sequence[float], eval_se: Sequence[float] | None = None, bounds: tuple[float, float] | None = None,
            pairs: bool = False) -> Interval:
    """The mean of per-seed ``values`` with its 95% interval: the seeds' t half-width and the
    evaluation set's (``eval_se``: each value's binomial standard error) in quadrature (see the
    module docstring). ``bounds`` clips the interval (``(0, 1)`` for an accuracy)."""
    v = np.asarray(values, dtype=float)
    ok = np.isfinite(v)
    v = v[ok]
    k = len(v)
    if k == 0:
        return Interval(math.nan, math.nan, math.nan, 0, "no data")
    mean = float(v.mean())
    seeds = k >= 2
    h_seeds = t95(k - 1) * float(v.std(ddof=1)) / math.sqrt(k) if seeds else 0.0
    se = rms(np.asarray(eval_se, dtype=float)[ok]) if eval_se is not None else math.nan
    evals = math.isfinite(se)
    h_eval = Z95 * se if evals else 0.0
    if not (seeds or evals):
        return Interval(mean, math.nan, math.nan, k, _how(k, False, False, pairs))
    half = math.hypot(h_seeds, h_eval)
    lo, hi = mean - half, mean + half
    if bounds is not None:
        lo, hi = max(lo, bounds[0]), min(hi, bounds[1])
    return Interval(mean, lo, hi, k, _how(k, seeds, evals, pairs), half)


def rms(se: Sequence[float]) -> float:
    """Root-mean-square of the finite standard errors (NaN if none): a cell's evaluation error."""
    x = np.asarray(se, dtype=float)
    x = x[np.isfinite(x)]
    return float(np.sqrt(np.mean(x**2))) if len(x) else math.nan


def welch(mean_a: float, sd_a: float, n_a: int, mean_b: float, sd_b: float, n_b: int,
          se_a: float = math.nan, se_b: float = math.nan) -> Interval:
    """``mean_a - mean_b`` of two cells whose seeds cannot be paired: a Welch t interval (both
    cells need >= 2 seeds) and both cells' evaluation error (``se_*``: :func:`rms` of each
    cell's seeds' binomial errors) in quadrature."""
    if not (n_a and n_b) or not (math.isfinite(mean_a) and math.isfinite(mean_b)):
        return Interval(math.nan, math.nan, math.nan, 0, "no data")
    diff = float(mean_a - mean_b)
    seeds = n_a >= 2 and n_b >= 2 and math.isfinite(sd_a) and math.isfinite(sd_b)
    h_seeds = 0.0
    if seeds:
        va, vb = sd_a**2 / n_a, sd_b**2 / n_b
        df = (va + vb) ** 2 / (va**2 / (n_a - 1) + vb**2 / (n_b - 1)) if va + vb > 0 else n_a + n_b - 2
        h_seeds = t95(df) * math.sqrt(va + vb)
    evals = math.isfinite(se_a) and math.isfinite(se_b)
    h_eval = Z95 * math.hypot(se_a, se_b) if evals else 0.0
    if seeds:
        how = f"Welch t over {n_a} and {n_b} unpaired seeds"
        how += " + binomial error of the evaluation set" if evals else ""
    else:
        how = f"{n_a} and {n_b} seed(s)" + (": binomial error of the evaluation set only" if evals else "")
    k = min(n_a, n_b)
    if not (seeds or evals):
        return Interval(diff, math.nan, math.nan, k, how + " (no interval)")
    half = math.hypot(h_seeds, h_eval)
    return Interval(diff, diff - half, diff + half, k, how, half)


def cross_fit_peak(first: Sequence[float], second: Sequence[float]) -> tuple[float, int, int]:
    """The peak of a curve measured on two halves of one set, without the max-of-noise bias:
    the step of ``first``'s maximum read on ``second`` and the step of ``second``'s maximum read
    on ``first``, averaged. Returns ``(estimate, i, j)``: the chosen indices (first maxima)."""
    a, b = np.asarray(first, float), np.asarray(second, float)
    i, j = int(np.argmax(a)), int(np.argmax(b))
    return (float(b[i]) + float(a[j])) / 2, i, j


def ratio_interval(num: Interval, den: Interval) -> tuple[float, float, float]:
    """``num / den`` with a delta-method 95% interval from the two intervals' half-widths
    (relative half-widths in quadrature, before any clipping; the two cells' errors treated as
    independent)."""
    if not (den.mean and math.isfinite(den.mean) and math.isfinite(num.mean)):
        return math.nan, math.nan, math.nan
    r = num.mean / den.mean
    if not (math.isfinite(num.half) and math.isfinite(den.half)) or not num.mean:
        return r, math.nan, math.nan  # one side has no interval: neither has the ratio
    half = abs(r) * math.hypot(num.half / abs(num.mean), den.half / abs(den.mean))
    return r, r - half, r + half
