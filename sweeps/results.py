"""The experiment's tables, rebuilt from the trainer's own run directories.

Why rebuild from the run directories instead of collecting the rows Ray Tune streams to the
driver: the run directories survive a killed driver, and the trainer restores each run's
``metrics.csv`` from the checkpoint it resumes, so the table is complete and the same after
any interruption. Cells are copied verbatim from the trainer's files (no float round trip).

``results.csv``: tidy long table, one row per model (grid point) and evaluation:
``trial_id``, one column per grid key (named by its dotted key), ``step``, then every metric
column of the trainer; ``results.parquet`` beside it holds the same table. ``trials.csv``: one row per grid point: id, grid values, status, last
step, attempts, run directory, the pack that trains it, error.

Every Tune trial is a pack of one or more grid points (``sweeps.spec.make_packs``): Tune's
status is per pack, and :func:`member_status` turns it into each member's.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from icl.io import all_or_nothing, atomic_write
from icl.layout import TRIAL_ID, TRIALS_COLUMNS, ExperimentDir
from icl.metrics import STEP
from icl.train.rundir import RunDir
from sweeps.spec import ModelSpec, format_value

Packs = Mapping[str, Sequence[str]]  # pack id (Tune's trial) -> its members' trial ids


def run_dir(exp_dir: Path, trial: ModelSpec) -> RunDir:
    return RunDir(ExperimentDir(exp_dir).run_dir(trial))


def collect(exp_dir: Path, trials: Sequence[ModelSpec]) -> tuple[list[str], list[list[str]]]:
    """All trials' evaluations as one table (columns, rows), trials in grid order."""
    grid_keys = list(trials[0].grid) if trials else []
    metric_cols: list[str] = []
    per_trial: list[tuple[ModelSpec, list[str], list[list[str]]]] = []
    for trial in trials:
        header, rows = run_dir(exp_dir, trial).metrics_table()
        for col in header:
            if col != STEP and col not in metric_cols:
                metric_cols.append(col)
        per_trial.append((trial, header, rows))
    columns = [TRIAL_ID, *grid_keys, STEP, *metric_cols]
    out: list[list[str]] = []
    for trial, header, rows in per_trial:
        index = {c: i for i, c in enumerate(header)}
        fixed = [trial.trial_id, *(format_value(trial.grid[k]) for k in grid_keys)]
        for r in rows:
            step = r[index[STEP]] if STEP in index else ""
            out.append(fixed + [step] + [r[index[c]] if c in index else "" for c in metric_cols])
    return columns, out


def to_csv(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(rows)
    return buf.getvalue()


def write_results(exp_dir: Path, trials: Sequence[ModelSpec]) -> int:
    """Rewrite ``results.csv`` and ``results.parquet`` atomically and together; returns the
    number of rows."""
    columns, rows = collect(exp_dir, trials)
    text = to_csv(columns, rows)
    files = ExperimentDir(exp_dir)
    with all_or_nothing():
        atomic_write(files.results, text)
        atomic_write(files.results_parquet, to_parquet(text))
    return len(rows)


def to_parquet(csv_text: str) -> bytes:
    """The table as Parquet, equal to what reading the CSV gives (``pandas.read_csv``: the
    same columns, numbers as numbers, empty cells as NaN); for readers that want types and
    speed (pandas, polars, DuckDB, Arrow)."""
    import pandas as pd

    buf = io.BytesIO()
    pd.read_csv(io.StringIO(csv_text)).to_parquet(buf, index=False)
    return buf.getvalue()


def attempts(exp_dir: Path, trial: ModelSpec | str) -> list[dict[str, Any]]:
    """A model's attempt log (one JSON object per start of its pack's trainable); ``trial``:
    the model, or its directory name."""
    path = ExperimentDir(exp_dir).attempts(trial)
    try:
        lines = path.read_bytes().decode("utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a torn line from a killed process
    return out


def error_line(text: str) -> str:
    """The last non-empty line of an error text (where Python puts the exception), at most
    300 characters; '' if none."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


def last_line(path: Path | str | None) -> str:
    """:func:`error_line` of a file (an error file); '' if there is none."""
    try:
        return error_line(Path(path).read_bytes().decode("utf-8", errors="replace")) if path else ""
    except OSError:
        return ""


def member_status(
    exp_dir: Path,
    trials: Sequence[ModelSpec],
    packs: Packs,
    status: Mapping[str, tuple[str, str]],
) -> dict[str, tuple[str, str]]:
    """Tune's (status, error) per pack -> (status, error) per member.

    A member shares its pack's status, except when the pack ended in ERROR: a member whose
    run reached its last step is TERMINATED (a diverged or crashed sibling does not undo
    it); the others are ERROR with their own error (``diverged.txt`` in their trial
    directory, written when a model diverges), else the pack's.
    """
    by_id = {t.trial_id: t for t in trials}
    out: dict[str, tuple[str, str]] = {}
    for pack_id, (state, error) in status.items():
        for trial_id in packs.get(pack_id, ()):
            t = by_id[trial_id]
            if state != "ERROR":
                out[trial_id] = (state, "")
            elif run_dir(exp_dir, t).finished(t.config.train.steps):
                out[trial_id] = ("TERMINATED", "")
            else:
                out[trial_id] = ("ERROR", last_line(ExperimentDir(exp_dir).diverged(t)) or error)
    return out


def write_trials(
    exp_dir: Path,
    trials: Sequence[ModelSpec],
    status: Mapping[str, tuple[str, str]],
    packs: Packs,
) -> None:
    """Rewrite ``trials.csv``: ``status`` maps trial id -> (status, one-line error)."""
    grid_keys = list(trials[0].grid) if trials else []
    pack_of = {m: p for p, members in packs.items() for m in members}
    columns = [TRIAL_ID, *grid_keys, *TRIALS_COLUMNS]
    exp = ExperimentDir(exp_dir)
    rows = []
    for t in trials:
        last = run_dir(exp_dir, t).last_logged_step()
        state, error = status.get(t.trial_id, ("PENDING", ""))
        rows.append(
            [
                t.trial_id,
                *(format_value(t.grid[k]) for k in grid_keys),
                state,
                "" if last is None else last,
                len(attempts(exp_dir, t)),
                exp.run_dir_entry(t),
                pack_of.get(t.trial_id, ""),
                error,
            ]
        )
    atomic_write(exp.trials, to_csv(columns, rows))
