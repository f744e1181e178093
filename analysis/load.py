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

CLASS_KEY = "data.num_classes"
WD_KEY = "optim.weight_decay"
SEED_KEY = "seed"
CORE_KEYS = (CLASS_KEY, WD_KEY, SEED_KEY)

ICL = "icl_acc"  # headline ICL: holdout classes, 2 labels in context, chance 0.5
IWL = "iwl_acc"  # in-weights accuracy, query class absent from the context
TRAIN_ACC = "train_acc"
CIWL = "ciwl_acc"  # context-constrained IWL: the query's trained label sits on another exemplar
FLIP_CTX = "flip_icl_ctx_acc"  # flip ICL (trained labels swapped in context): follows the context
FLIP_IWL = "flip_icl_iwl_acc"  # ... follows its weights
# The peers' definition beside each all-label one (icl.train.evaluate): argmax over the labels in context
ICL_ALL = "icl_acc_all"  # holdout ICL, argmax over every label
ICL_TRAIN = "icl_train_acc"  # ICL on training classes relabelled 0/1, over the 2 labels in context
ICL_TRAIN_ALL = "icl_train_acc_all"  # ... over every label
CIWL_INCTX = "ciwl_acc_inctx"
FLIP_CTX_INCTX = "flip_icl_ctx_acc_inctx"
FLIP_IWL_INCTX = "flip_icl_iwl_acc_inctx"
ICL_EVEN, ICL_ODD = "icl_acc_even", "icl_acc_odd"  # icl_acc on the ICL set's even / odd sequences
ICL_HALVES = (ICL_EVEN, ICL_ODD)
# Per-trial constants from each run's config (not metrics, not cell keys): the size of every
# evaluation set, and the effective decay wd * sum_t lr_t (icl.schedule.decay_exponent).
N_EVAL = "eval_sequences"
DECAY_EXP = "decay_exponent"
REQUIRED_METRICS = (ICL, IWL, TRAIN_ACC)
REQUIRED_COLUMNS = ("step", *REQUIRED_METRICS)
PEER_METRICS = (ICL_ALL, ICL_TRAIN, ICL_TRAIN_ALL, CIWL, CIWL_INCTX, FLIP_CTX, FLIP_CTX_INCTX, FLIP_IWL,
                FLIP_IWL_INCTX, *ICL_HALVES)
_NUMERIC_LOGS = ("sequences", "train_loss", "lr", "ece", "steps_per_s", "sequences_per_s", "eval_s",
                 "wall_s", *PEER_METRICS)  # the trainer's other numeric columns

MAX_TABLE_BYTES = 4 << 30  # a results table this large is not one this project wrote
RESULTS_CSV = "results.csv"  # a sweep's tidy table, STORAGE/NAME/results.csv
METRICS_CSV = "metrics.csv"  # a single run's evaluations, RUN/metrics.csv
CONFIG_YAML = "config.yaml"  # a run's resolved config
SPEC_YAML = "spec.yaml"  # a sweep's spec, with its grid

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
    spec: dict[str, Any] | None = None
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
            raise UserError(f"{path} is not a CSV file: give results.csv, metrics.csv or the directory holding it")
        if path.name == METRICS_CSV and (path.parent / CONFIG_YAML).is_file():
            return [_run_source(path.parent)]
        spec_path = path.parent / SPEC_YAML
        spec = read_yaml(spec_path, "sweep spec") if spec_path.is_file() else None
        return [Source(path=path, kind="csv", csv=path, spec=spec)]
    if (path / RESULTS_CSV).is_file():
        spec_path = path / SPEC_YAML
        spec = read_yaml(spec_path, "sweep spec") if spec_path.is_file() else None
        return [Source(path=path, kind="experiment", csv=path / RESULTS_CSV, spec=spec)]
    if (path / METRICS_CSV).is_file():
        return [_run_source(path)]
    runs = sorted(p for p in path.iterdir() if p.is_dir() and (p / METRICS_CSV).is_file())
    if runs:
        return [_run_source(p) for p in runs]
    raise UserError(
        f"no results in {path}: expected {RESULTS_CSV} (a sweep's STORAGE/NAME dir), {METRICS_CSV} "
        f"(a run dir) or run dirs inside it; wait for the first evaluation or check the path"
    )


def _run_source(run: Path) -> Source:
    src = Source(path=run, kind="run", csv=run / METRICS_CSV)
    cfg_path = run / CONFIG_YAML
    if cfg_path.is_file():
        src.config = flatten(read_yaml(cfg_path, "run config"))
    return src


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


def _is_metric(col: str) -> bool:
    return col in REQUIRED_COLUMNS or col.startswith("attn_") or col in _NUMERIC_LOGS


def _probabilities(col: str) -> bool:
    return col.endswith(("_acc", "_acc_all", "_acc_inctx")) or col in ICL_HALVES or col == "ece"


def check_values(df: pd.DataFrame, where: str, first_line: int | None = None) -> pd.DataFrame:
    """Refuse values no trainer writes, before they reach the arithmetic and the plots: every
    numeric column finite; ``step`` a whole number in [0, 2^32); accuracies and ECE in [0, 1];
    a config key's column (``data.num_classes``, ...) within that key's range
    (:func:`icl.config.check_value`). Missing values stay missing. ``first_line``: the file
    line of row 0, to name the offending line."""

    def at(i: int) -> str:
        return f"{where} line {first_line + i}" if first_line is not None else where

    for col in df.columns:
        if not (_is_metric(col) or col == "step" or col in RANGES):
            continue
        values = pd.to_numeric(df[col], errors="coerce").astype(float)
        bad = df[col].notna() & values.isna()
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise UserError(f"{at(i)}: column {col} has non-numeric values (e.g. {df[col].iloc[i]!r}); fix the file")
        problem = ~np.isfinite(values) & values.notna()
        if col == "step":
            problem |= (values < 0) | (values >= 2**32) | (values % 1 != 0)
        elif _probabilities(col):
            problem |= (values < 0) | (values > 1)
        if problem.any():
            i = int(np.flatnonzero(problem)[0])
            what = "a whole number in [0, 2^32)" if col == "step" else "in [0, 1]" if _probabilities(col) else "finite"
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


def _spec_grid(spec: dict[str, Any] | None) -> dict[str, list[Any]]:
    """The spec's ``grid:`` mapping, every value as a list (a scalar is a one-value grid)."""
    if not spec:
        return {}
    grid = spec.get("grid")
    if not isinstance(grid, dict):
        return {}
    return {str(k): (list(v) if isinstance(v, (list, tuple)) else [v]) for k, v in grid.items()}


def _spec_value(spec: dict[str, Any] | None, key: str) -> Any:
    """A key's fixed value in a sweep spec: its overrides on top of its base config or preset.

    The spec format is the sweep's; accept the likely spellings and give up quietly (``None``).
    """
    if not spec:
        return None
    resolved = spec.get("resolved")  # icl-sweep saves the fully resolved base config
    if isinstance(resolved, dict):
        flat = flatten(resolved)
        if key in flat:
            return flat[key]
    overrides = _spec_overrides(spec)
    if key in overrides:
        return overrides[key]
    full = _spec_config(spec)
    return None if full is None else full.get(key)


def _spec_overrides(spec: dict[str, Any]) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for name in ("overrides", "set", "config_overrides"):
        block = spec.get(name)
        if isinstance(block, dict):
            overrides.update(flatten(block))
    return overrides


def _spec_config(spec: dict[str, Any] | None) -> dict[str, Any] | None:
    """A sweep spec's base config, flat and complete: ``resolved`` (what icl-sweep saves), else
    its base preset or file with its overrides; None where neither resolves."""
    if not spec:
        return None
    resolved = spec.get("resolved")
    if isinstance(resolved, dict):
        return flatten(resolved)
    base = next((spec[n] for n in ("base", "preset", "config") if isinstance(spec.get(n), (str, dict))), None)
    if base is None:
        return None
    try:
        cfg = build_config(base, {k: v for k, v in _spec_overrides(spec).items() if k in _config_keys()})
    except (UserError, TypeError):
        return None
    return flatten(cfg.to_dict())


def _plain(v: Any) -> Any:
    """A table cell as a config value: whole numbers as int (``1600.0`` -> ``1600``)."""
    if isinstance(v, (float, np.floating)) and float(v).is_integer():
        return int(v)
    return v.item() if isinstance(v, np.generic) else v


def add_run_constants(src: Source, df: pd.DataFrame) -> None:
    """Add :data:`N_EVAL` and :data:`DECAY_EXP` to one source's rows, from each trial's config:
    a run's ``config.yaml``, or a sweep's base config (its spec) with the row's grid values on
    top. Missing (NaN) where no config says; a table that has the columns already keeps them."""
    if N_EVAL in df.columns and DECAY_EXP in df.columns:
        return
    from icl.schedule import decay_exponent  # torch-free

    base = src.config if src.kind == "run" else _spec_config(src.spec)
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


def _configs_below(root: Path, max_depth: int = 3) -> list[dict[str, Any]]:
    """Flattened ``config.yaml`` files of trial directories under an experiment dir (shallow walk)."""
    found: list[dict[str, Any]] = []
    root_depth = len(root.parts)
    for dirpath, dirnames, filenames in os.walk(root):
        depth = len(Path(dirpath).parts) - root_depth
        if depth >= max_depth:
            dirnames[:] = []
        if depth > 0 and CONFIG_YAML in filenames:
            try:
                found.append(flatten(read_yaml(Path(dirpath) / CONFIG_YAML)))
            except UserError:
                continue
    return found


def _resolve_constant(src: Source, key: str) -> Any:
    """The value a key had for every trial of a source that has no column for it, or None."""
    if src.config is not None:
        return src.config.get(key)
    value = _spec_value(src.spec, key)
    if value is not None:
        src.notes.append(f"{key} = {value} for {src.path} taken from its {SPEC_YAML}")
        return value
    if src.kind == "experiment":
        configs = [c.get(key) for c in _configs_below(src.path) if c.get(key) is not None]
        if configs and len({repr(v) for v in configs}) == 1:
            src.notes.append(f"{key} = {configs[0]} for {src.path} taken from its trials' {CONFIG_YAML}")
            return configs[0]
    if key == SEED_KEY:  # a seed must exist to count seeds; one unnamed run is one seed
        src.notes.append(f"the seed of {src.path} is unknown (no column, spec or config): taken as 0")
        return 0
    src.notes.append(f"{key} is unknown for {src.path} (not a column, not in a spec or {CONFIG_YAML}): shown as ?")
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
    columns, else its ``spec.yaml``, else its trials' config files (missing values if none says).
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
            if "trial_id" not in df.columns:
                df["trial_id"] = src.path.name
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

    if "trial_id" not in df.columns:
        df["trial_id"] = pd.NA
    missing_id = df["trial_id"].isna()
    if missing_id.any():
        id_cols = [c for c in grid_cols if c in df.columns]
        rows = df.loc[missing_id, id_cols].itertuples(index=False)
        ids = [("_".join(str(v) for v in row) or "trial") for row in rows]
        df["trial_id"] = df["trial_id"].astype(object)  # an all-text column may be Arrow-backed: no mixed writes
        df.loc[missing_id, "trial_id"] = ids
    df["trial_id"] = df["trial_id"].astype(str)
    for key in (CLASS_KEY, WD_KEY, SEED_KEY):
        df[key] = pd.to_numeric(df[key], errors="coerce")
    check_values(df, ", ".join(str(s.path) for s in sources))  # values that came from configs and specs

    for metric in REQUIRED_METRICS:
        if df[metric].notna().sum() == 0:
            where = ", ".join(str(s.csv) for s in sources)
            raise UserError(f"metric {metric} is empty (all values missing) in {where}: nothing to analyse")
    if df["step"].isna().any():
        raise UserError(f"column step has missing values in {', '.join(str(s.csv) for s in sources)}; fix the file")

    df = df.drop_duplicates(subset=["experiment", "trial_id", "step"], keep="last")
    ordered = ["experiment", "trial_id"] + order_keys([c for c in grid_cols if c != SEED_KEY]) + [SEED_KEY, "step"]
    rest = [c for c in df.columns if c not in ordered]
    df = df[ordered + rest].sort_values(["experiment", "trial_id", "step"], kind="stable").reset_index(drop=True)

    grid: dict[str, list[Any]] = {}
    for src in sources:
        for key, values in _spec_grid(src.spec).items():
            for v in values if key in RANGES else ():
                try:
                    check_value(key, v)
                except UserError as e:
                    raise UserError(f"the grid of {src.path / SPEC_YAML if src.path.is_dir() else src.path.parent / SPEC_YAML}"
                                    f": {e}; fix the spec") from None
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
