"""Read results into one tidy DataFrame: a sweep's ``results.csv``, a run's ``metrics.csv``, or both.

One row per trial and evaluation, with ``experiment``, ``trial_id``, one column per grid key
(named by its dotted config key, e.g. ``data.num_classes``), ``seed``, ``step`` and the
trainer's metric columns. Every later function (summary, verdict, plots) works on this frame,
so a notebook user can filter it with pandas before passing it on.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from icl.config import RANGES, RUNTIME_KEYS, build_config, check_value, flatten, read_yaml, valid_keys
from icl.errors import UserError
from icl.inputs import read_text
from icl.layout import CONFIG, METRICS, RESULTS, SPEC, TRIAL_ID, ExperimentDir, RunLayout, SavedSpec
from icl.metrics import DECAY_EXP, N_EVAL, PROBABILITIES, REQUIRED, STEP, is_metric

CLASS_KEY = "data.num_classes"
WD_KEY = "optim.weight_decay"
SEED_KEY = "seed"
CORE_KEYS = (CLASS_KEY, WD_KEY, SEED_KEY)
REQUIRED_COLUMNS = (STEP, *REQUIRED)

MAX_TABLE_BYTES = 4 << 30  # a results table this large is not one this project wrote

# Config keys that may differ between runs without making them different cells: where the run
# lives and bookkeeping (how often it evaluates or checkpoints, how long it was planned to run).
_BOOKKEEPING_KEYS = frozenset(RUNTIME_KEYS) | {
    "train.eval_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.steps",
    "eval.batch_size",
}


@dataclass
class Source:
    """One path given by the user, classified; ``notes`` collects what a reader should know."""

    path: Path
    kind: str  # "experiment" | "csv" | "run"
    csv: Path
    spec: SavedSpec | None = None  # the experiment's saved spec (or the one beside a CSV)
    config: dict[str, Any] | None = None  # flattened config.yaml of a run
    notes: list[str] = field(default_factory=list)


def _config_keys() -> set[str]:
    return set(valid_keys())


def _sources_for(path: Path) -> list[Source]:
    """Classify a user path; a directory of run directories yields one source per run."""
    if not path.exists():
        raise UserError(f"{path} does not exist: give a sweep experiment dir, a run dir or a results CSV")
    if path.is_file():
        if path.suffix.lower() != ".csv":
            raise UserError(f"{path} is not a CSV file: give {RESULTS}, {METRICS} or the directory holding it")
        if path.name == METRICS and RunLayout(path.parent).config.is_file():
            return [_run_source(path.parent)]
        return [Source(path=path, kind="csv", csv=path, spec=ExperimentDir(path.parent).saved_spec())]
    exp = ExperimentDir(path)
    if exp.results.is_file():
        return [Source(path=path, kind="experiment", csv=exp.results, spec=exp.saved_spec())]
    if RunLayout(path).metrics.is_file():
        return [_run_source(path)]
    runs = sorted(p for p in path.iterdir() if p.is_dir() and RunLayout(p).metrics.is_file())
    if runs:
        return [_run_source(p) for p in runs]
    raise UserError(
        f"no results in {path}: expected {RESULTS} (a sweep's STORAGE/NAME dir), {METRICS} "
        f"(a run dir) or run dirs inside it; wait for the first evaluation or check the path"
    )


def _run_source(run: Path) -> Source:
    layout = RunLayout(run)
    src = Source(path=run, kind="run", csv=layout.metrics)
    if layout.config.is_file():
        src.config = _run_config(layout)
    return src


def _run_config(run: RunLayout) -> dict[str, Any]:
    return flatten(read_yaml(run.config, "run config"))


def _read_csv(path: Path) -> pd.DataFrame:
    text = read_text(path, "results table", limit=MAX_TABLE_BYTES)
    try:
        df = pd.read_csv(io.StringIO(text))
    except pd.errors.EmptyDataError:
        raise UserError(f"{path} is empty: no evaluations recorded yet; wait for the first evaluation") from None
    except (pd.errors.ParserError, ValueError) as e:
        raise UserError(f"{path} is not a readable CSV ({str(e).splitlines()[0]}); check the file") from None
    if df.empty:
        raise UserError(f"{path} has a header but no rows: no evaluations recorded yet")
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise UserError(
            f"{path} lacks required column(s) {', '.join(missing)}; expected the trainer's metric columns "
            f"({', '.join(REQUIRED_COLUMNS)}, ...)"
        )
    return check_values(df, str(path), first_line=2)


def _probabilities(col: str) -> bool:
    return col in PROBABILITIES


def check_values(df: pd.DataFrame, where: str, first_line: int | None = None) -> pd.DataFrame:
    """Refuse values no trainer writes, before they reach the arithmetic and the plots: every
    numeric column finite; ``step`` a whole number in [0, 2^32); accuracies and ECE in [0, 1];
    a config key's column (``data.num_classes``, ...) within that key's range
    (:func:`icl.config.check_value`). Missing values stay missing. ``first_line``: the file
    line of row 0, to name the offending line."""

    def at(i: int) -> str:
        return f"{where} line {first_line + i}" if first_line is not None else where

    for col in df.columns:
        if not (is_metric(col) or col in RANGES):
            continue
        values = pd.to_numeric(df[col], errors="coerce").astype(float)
        bad = df[col].notna() & values.isna()
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise UserError(f"{at(i)}: column {col} has non-numeric values (e.g. {df[col].iloc[i]!r}); fix the file")
        problem = ~np.isfinite(values) & values.notna()
        if col == STEP:
            problem |= (values < 0) | (values >= 2**32) | (values % 1 != 0)
        elif _probabilities(col):
            problem |= (values < 0) | (values > 1)
        if problem.any():
            i = int(np.flatnonzero(problem)[0])
            what = "a whole number in [0, 2^32)" if col == STEP else "in [0, 1]" if _probabilities(col) else "finite"
            raise UserError(f"{at(i)}: column {col} holds {values.iloc[i]:g}; it must be {what}; fix the file")
        if col in RANGES:
            for v in values.dropna().unique():
                try:
                    if v not in RANGES[col]:
                        raise UserError(RANGES[col].problem(col, float(v)))
                    check_value(col, int(v) if v.is_integer() else float(v))  # whole numbers for integer keys
                except UserError as e:
                    i = int(np.flatnonzero(values == v)[0])
                    raise UserError(f"{at(i)}: {e}; fix the file") from None
        if not pd.api.types.is_numeric_dtype(df[col]):
            df[col] = values
    return df


def _trial_configs(src: Source) -> list[dict[str, Any]]:
    """Flattened ``config.yaml`` of every run of an experiment, found where its ``trials.csv``
    says its run directories are."""
    found = []
    for run in ExperimentDir(src.path).run_dirs().values():
        layout = RunLayout(run)
        if layout.config.is_file():
            try:
                found.append(_run_config(layout))
            except UserError:
                continue
    return found


def _plain(v: Any) -> Any:
    """A table cell as a config value: whole numbers as int (``1600.0`` -> ``1600``)."""
    if isinstance(v, (float, np.floating)) and float(v).is_integer():
        return int(v)
    return v.item() if isinstance(v, np.generic) else v


def add_run_constants(src: Source, df: pd.DataFrame) -> None:
    """Add :data:`~icl.metrics.N_EVAL` and :data:`~icl.metrics.DECAY_EXP` to one source's rows,
    from each trial's config: a run's ``config.yaml``, or a sweep's saved base config (its spec)
    with the row's grid values on top. Missing (NaN) where no config says; a table that has the
    columns already keeps them."""
    if N_EVAL in df.columns and DECAY_EXP in df.columns:
        return
    from icl.schedule import decay_exponent  # torch-free

    base = src.config if src.kind == "run" else (src.spec.config() if src.spec is not None else None)
    known = _config_keys()
    if base is None:
        df[N_EVAL], df[DECAY_EXP] = math.nan, math.nan
        src.notes.append(f"{src.path}: no run config or resolved spec, so the evaluation set's size (for the binomial "
                         "part of the intervals) and the effective decay are unknown")
        return
    base = {k: v for k, v in base.items() if k in known}
    keys = [] if src.kind == "run" else [c for c in df.columns if c in known and c != SEED_KEY]
    groups = df.groupby(keys, dropna=False, sort=False).groups.items() if keys else [((), df.index)]
    n_eval = pd.Series(math.nan, index=df.index)
    decay = pd.Series(math.nan, index=df.index)
    for values, index in groups:
        values = values if isinstance(values, tuple) else (values,)
        overrides = {k: _plain(v) for k, v in zip(keys, values) if not is_missing(v)}
        try:
            cfg = build_config(base, overrides)
        except (UserError, TypeError, ValueError):
            continue
        n_eval[index] = cfg.eval.n_sequences
        decay[index] = decay_exponent(cfg)
    df[N_EVAL], df[DECAY_EXP] = n_eval, decay


def _resolve_constant(src: Source, key: str) -> Any:
    """The value a key had for every trial of a source that has no column for it, or None."""
    if src.config is not None:
        return src.config.get(key)
    value = src.spec.value(key) if src.spec is not None else None
    if value is not None:
        src.notes.append(f"{key} = {value} for {src.path} taken from its {SPEC}")
        return value
    if src.kind == "experiment":
        configs = [c.get(key) for c in _trial_configs(src) if c.get(key) is not None]
        if configs and len({repr(v) for v in configs}) == 1:
            src.notes.append(f"{key} = {configs[0]} for {src.path} taken from its trials' {CONFIG}")
            return configs[0]
    if key == SEED_KEY:  # a seed must exist to count seeds; one unnamed run is one seed
        src.notes.append(f"the seed of {src.path} is unknown (no column, spec or config): taken as 0")
        return 0
    src.notes.append(f"{key} is unknown for {src.path} (not a column, not in a spec or {CONFIG}): shown as ?")
    return None


def _experiment_names(sources: Sequence[Source]) -> list[str]:
    """Short, unique names: the directory name, widened with parents where names collide."""

    def base(src: Source) -> Path:
        return src.path if src.path.is_dir() else src.path.parent

    paths = [base(s).resolve() for s in sources]
    depth = 1
    while True:
        names = ["/".join(p.parts[-depth:]) for p in paths]
        if len(set(names)) == len(names) or depth > max(len(p.parts) for p in paths):
            break
        depth += 1
    if len(set(names)) != len(names):  # the same path given twice
        seen: dict[str, int] = {}
        out = []
        for n in names:
            seen[n] = seen.get(n, 0) + 1
            out.append(n if seen[n] == 1 else f"{n}#{seen[n]}")
        names = out
    return names


def _as_paths(paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]]) -> list[Path]:
    if isinstance(paths, (str, os.PathLike)):
        return [Path(paths)]
    out = [Path(p) for p in paths]
    if not out:
        raise UserError("no path given: pass a sweep experiment dir, a run dir or a results CSV")
    return out


def load_results(paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]]) -> pd.DataFrame:
    """Load one or several experiments/runs into one tidy frame (one row per trial and evaluation).

    ``paths``: a sweep experiment dir (``STORAGE/NAME`` with ``results.csv``), a CSV file, a run
    dir (``metrics.csv`` + ``config.yaml``), a dir of run dirs, or a list of these (combined; the
    ``experiment`` column tells them apart). ``data.num_classes``, ``optim.weight_decay`` and
    ``seed`` always exist as columns: a run's come from its ``config.yaml``, a sweep's from its
    columns, else its saved ``spec.yaml``, else the ``config.yaml`` of its runs (where its
    ``trials.csv`` says they are; missing values if none says).
    Several run dirs also get a column for every other config key whose value differs between
    them, so runs that differ in a knob fall in different cells.

    Where a trial reports the same step twice (a resumed run), the last row wins. The frame's
    ``attrs`` keep hints for later steps: ``grid`` (the specs' grids), ``expected_seeds``,
    ``sources``, ``source_dirs`` (experiment name -> (kind, path)) and ``notes``. Raises
    :class:`UserError` on unusable input.
    """
    sources = [s for p in _as_paths(paths) for s in _sources_for(p)]
    names = _experiment_names(sources)
    keys_known = _config_keys()
    frames: list[pd.DataFrame] = []
    for src, name in zip(sources, names):
        df = _read_csv(src.csv)
        if src.kind == "run":
            if TRIAL_ID not in df.columns:
                df[TRIAL_ID] = src.path.name
            for key in CORE_KEYS:
                if key not in df.columns:
                    df[key] = _resolve_constant(src, key)
        else:
            for key in CORE_KEYS:
                if key not in df.columns:
                    df[key] = _resolve_constant(src, key)
        add_run_constants(src, df)
        df.insert(0, "experiment", name)
        frames.append(df)

    # Several runs: every config key that differs between them is a grid dimension.
    run_srcs = [(s, f) for s, f in zip(sources, frames) if s.kind == "run" and s.config is not None]
    if len(run_srcs) > 1:
        all_keys = sorted(set().union(*(s.config.keys() for s, _ in run_srcs)) - _BOOKKEEPING_KEYS)
        for key in all_keys:
            vals = {repr(s.config.get(key)) for s, _ in run_srcs}
            if len(vals) > 1:
                for s, f in run_srcs:
                    if key not in f.columns:
                        f[key] = s.config.get(key)

    df = pd.concat(frames, ignore_index=True, sort=False)
    # A grid key one experiment has as a column and another lacks: fill it from the other's spec/config.
    grid_cols = [c for c in df.columns if c in keys_known]
    for src, name, frame in zip(sources, names, frames):
        for key in grid_cols:
            if key not in frame.columns:
                value = _resolve_constant(src, key)
                df.loc[df["experiment"] == name, key] = value

    if TRIAL_ID not in df.columns:
        df[TRIAL_ID] = pd.NA
    missing_id = df[TRIAL_ID].isna()
    if missing_id.any():
        id_cols = [c for c in grid_cols if c in df.columns]
        rows = df.loc[missing_id, id_cols].itertuples(index=False)
        ids = [("_".join(str(v) for v in row) or "trial") for row in rows]
        df[TRIAL_ID] = df[TRIAL_ID].astype(object)  # an all-text column may be Arrow-backed: no mixed writes
        df.loc[missing_id, TRIAL_ID] = ids
    df[TRIAL_ID] = df[TRIAL_ID].astype(str)
    for key in (CLASS_KEY, WD_KEY, SEED_KEY):
        df[key] = pd.to_numeric(df[key], errors="coerce")
    check_values(df, ", ".join(str(s.path) for s in sources))  # values that came from configs and specs

    for metric in REQUIRED:
        if df[metric].notna().sum() == 0:
            where = ", ".join(str(s.csv) for s in sources)
            raise UserError(f"metric {metric} is empty (all values missing) in {where}: nothing to analyse")
    if df[STEP].isna().any():
        raise UserError(f"column step has missing values in {', '.join(str(s.csv) for s in sources)}; fix the file")

    df = df.drop_duplicates(subset=["experiment", TRIAL_ID, STEP], keep="last")
    ordered = ["experiment", TRIAL_ID] + order_keys([c for c in grid_cols if c != SEED_KEY]) + [SEED_KEY, STEP]
    rest = [c for c in df.columns if c not in ordered]
    df = df[ordered + rest].sort_values(["experiment", TRIAL_ID, STEP], kind="stable").reset_index(drop=True)

    grid: dict[str, list[Any]] = {}
    for src in sources:
        for key, values in (src.spec.grid if src.spec is not None else {}).items():
            for v in values if key in RANGES else ():
                try:
                    check_value(key, v)
                except UserError as e:
                    raise UserError(f"the grid of {src.spec.path}: {e}; fix the spec") from None
            merged = grid.setdefault(key, [])
            merged.extend(v for v in values if v not in merged)
    df.attrs["grid"] = grid
    df.attrs["expected_seeds"] = sorted(grid[SEED_KEY]) if SEED_KEY in grid else None
    df.attrs["sources"] = [str(s.path) for s in sources]
    df.attrs["source_dirs"] = {name: (s.kind, str(s.path)) for s, name in zip(sources, names)}
    df.attrs["notes"] = [n for s in sources for n in s.notes]
    return df


def order_keys(keys: Iterable[str]) -> list[str]:
    """Grid keys in a stable, readable order: classes, weight decay, then the rest alphabetically."""
    keys = list(dict.fromkeys(keys))
    head = [k for k in (CLASS_KEY, WD_KEY) if k in keys]
    return head + sorted(k for k in keys if k not in head)


def is_missing(value: Any) -> bool:
    """True for None/NaN/NA (pandas' missing markers), False for anything else."""
    if value is None or value is pd.NA:
        return True
    return isinstance(value, float) and math.isnan(value)
