"""Formatting shared by the report, the verdict and the plots, so a cell reads the same everywhere."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from analysis.load import CLASS_KEY, SEED_KEY, WD_KEY, is_missing


def fmt_number(v: Any) -> str:
    """Compact number: ``3e-4`` rather than ``0.0003``, ``100`` rather than ``100.0``."""
    if is_missing(v):
        return "?"
    if isinstance(v, (bool, str)):
        return str(v)
    f = float(v)
    if f == 0:
        return "0"
    if f.is_integer() and abs(f) < 1e7:
        return str(int(f))
    exp = math.floor(math.log10(abs(f)))
    if -1 <= exp <= 4:
        return f"{f:.4g}"
    mantissa, e = f"{f:.2e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(e)}"


def short_key(key: str) -> str:
    """Human name of a grid key for labels."""
    return {CLASS_KEY: "classes", WD_KEY: "weight decay", SEED_KEY: "seed"}.get(key, key)


def cell_label(cell: Mapping[str, Any]) -> str:
    """``100 classes, wd 1e-3`` (+ ``key=value`` for any other grid key)."""
    parts = []
    for key, value in cell.items():
        if key == CLASS_KEY:
            parts.append(f"{fmt_number(value)} classes")
        elif key == WD_KEY:
            parts.append(f"wd {fmt_number(value)}")
        else:
            parts.append(f"{key}={fmt_number(value)}")
    return ", ".join(parts)


def cell_slug(cell: Mapping[str, Any]) -> str:
    """A file-name-safe form of a cell: ``c100_wd1e-3``."""
    parts = []
    for key, value in cell.items():
        v = fmt_number(value).replace("/", "-").replace(" ", "")
        if key == CLASS_KEY:
            parts.append(f"c{v}")
        elif key == WD_KEY:
            parts.append(f"wd{v}")
        else:
            parts.append(f"{key.split('.')[-1]}{v}")
    slug = "_".join(parts) or "all"
    return "".join(ch if ch.isalnum() or ch in "-_.+" else "-" for ch in slug)


def mean_std(mean: Any, std: Any, digits: int = 3) -> str:
    """``0.912 ± 0.013``; with no spread (one seed) just the mean."""
    if is_missing(mean):
        return "–"
    if is_missing(std):
        return f"{float(mean):.{digits}f}"
    return f"{float(mean):.{digits}f} ± {float(std):.{digits}f}"


def seed_spread(n_max: int, band: bool = False) -> str:
    """How a figure or table aggregates seeds, for its title: "± sd" only when some cell has
    two or more seeds (``n_max``: the most seeds of any cell); ``band``: curves with a band."""
    if n_max < 2:
        return "one seed per cell"
    return f"mean over up to {n_max} seeds, band = ±1 sd" if band else f"mean ± sd over up to {n_max} seeds"


def seed_list(seeds: Sequence[Any]) -> str:
    """``1 (seed 0)``, ``3 (seeds 0, 1, 2)``, ``not given``: how many and which."""
    if not seeds:
        return "not given"
    return f"{len(seeds)} ({'seed' if len(seeds) == 1 else 'seeds'} {', '.join(fmt_number(s) for s in seeds)})"


def step_mean_std(mean: Any, std: Any) -> str:
    """Steps as integers: ``12,000 ± 2,000``."""
    if is_missing(mean):
        return "–"
    if is_missing(std):
        return f"{float(mean):,.0f}"
    return f"{float(mean):,.0f} ± {float(std):,.0f}"


def markdown_table(df: pd.DataFrame) -> str:
    """A GitHub-flavoured markdown table of ``df`` as strings (no tabulate dependency)."""
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in df.itertuples(index=False):
        cells = [str(v).replace("|", "\\|").replace("\n", " ") for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def join_words(items: Sequence[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    items = list(items)
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def fmt_ci(lo: Any, hi: Any, digits: int = 3) -> str:
    """A 95% interval: ``[0.812, 0.884]``; ``(no interval)`` where there is none."""
    if is_missing(lo) or is_missing(hi):
        return "(no interval)"
    return f"[{float(lo):.{digits}f}, {float(hi):.{digits}f}]"


def mean_ci(mean: Any, lo: Any, hi: Any, digits: int = 3) -> str:
    """``0.850 [0.812, 0.884]``; ``–`` without a mean."""
    if is_missing(mean):
        return "–"
    return f"{float(mean):.{digits}f} " + fmt_ci(lo, hi, digits)


def fmt_shrink(exponent: Any) -> str:
    """The total shrink factor of decoupled decay, ``exp(-wd * sum lr)``, as ``e^-0.25``;
    ``1 (none)`` without decay; ``?`` where unknown (no config, or coupled L2)."""
    if is_missing(exponent):
        return "?"
    x = float(exponent)
    if x == 0:
        return "1 (none)"
    text = f"{x:.2g}"  # 0.0075, 0.25, 1.5, 12; 9.7e-05 below 1e-4
    if "e" in text:
        mantissa, e = text.split("e")
        text = f"{mantissa}e{int(e)}"
    return f"e^-{text}"
