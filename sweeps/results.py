"""The experiment's tables, rebuilt from the trainer's own per-run ``metrics.csv`` files.

Why rebuild from the run directories instead of collecting the rows Ray Tune streams to the
driver: the run directories survive a killed driver, and the trainer restores each run's
``metrics.csv`` from the checkpoint it resumes, so the table is complete and the same after
any interruption. Cells are copied verbatim from the trainer's files (no float round trip).

``results.csv``: tidy long table, one row per trial and evaluation:
``trial_id``, one column per grid key (named by its dotted key), ``step``, then every metric
column of the trainer. ``trials.csv``: one row per trial: id, grid values, status, last
step, attempts, run directory, error (and, in a packed sweep, the pack that trains it).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Iterable, Sequence

from icl.io import atomic_write
from sweeps.spec import TrialSpec, format_value

RESULTS = "results.csv"
TRIALS = "trials.csv"
RUN = "run"  # the trainer's run directory inside each trial directory
ATTEMPTS = "attempts.jsonl"
ERROR_FILE = "error.txt"  # in a packed trial's directory: that model's own error (divergence)


def run_dir(exp_dir: Path, trial: TrialSpec) -> Path:
    return Path(exp_dir) / trial.dirname / RUN


def read_metrics(path: Path) -> tuple[list[str], list[list[str]]]:
    """Header and rows of a trainer ``metrics.csv``; missing file -> no rows; a torn last
    line (a file being appended to) is dropped."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return [], []
    reader = csv.reader(io.StringIO(text))
    rows = list(reader)
    if not rows:
        return [], []
    header, body = rows[0], rows[1:]
    complete = text.endswith("\n")
    body = [r for i, r in enumerate(body) if len(r) == len(header) and (complete or i < len(body) - 1)]
    return header, body


def collect(exp_dir: Path, trials: Sequence[TrialSpec]) -> tuple[list[str], list[list[str]]]:
    """All trials' evaluations as one table (columns, rows), trials in grid order."""
    grid_keys = list(trials[0].grid) if trials else []
    metric_cols: list[str] = []
    per_trial: list[tuple[TrialSpec, list[str], list[list[str]]]] = []
    for trial in trials:
        header, rows = read_metrics(run_dir(exp_dir, trial) / "metrics.csv")
        for col in header:
            if col != "step" and col not in metric_cols:
                metric_cols.append(col)
        per_trial.append((trial, header, rows))
    columns = ["trial_id", *grid_keys, "step", *metric_cols]
    out: list[list[str]] = []
    for trial, header, rows in per_trial:
        index = {c: i for i, c in enumerate(header)}
        fixed = [trial.trial_id, *(format_value(trial.grid[k]) for k in grid_keys)]
        for r in rows:
            step = r[index["step"]] if "step" in index else ""
            out.append(fixed + [step] + [r[index[c]] if c in index else "" for c in metric_cols])
    return columns, out


def to_csv(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(rows)
    return buf.getvalue()


def write_results(exp_dir: Path, trials: Sequence[TrialSpec]) -> int:
    """Rewrite ``results.csv`` atomically; returns the number of rows."""
    columns, rows = collect(exp_dir, trials)
    atomic_write(Path(exp_dir) / RESULTS, to_csv(columns, rows))
    return len(rows)


def attempts(trial_dir: Path) -> list[dict[str, Any]]:
    """A trial's attempt log (one JSON object per start of the trainable)."""
    path = Path(trial_dir) / ATTEMPTS
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a torn line from a killed process
    return out


def last_step(exp_dir: Path, trial: TrialSpec) -> int | None:
    """The last evaluated step in a trial's run directory (None: no evaluation yet)."""
    header, rows = read_metrics(run_dir(exp_dir, trial) / "metrics.csv")
    if not rows or "step" not in header:
        return None
    return int(float(rows[-1][header.index("step")]))


def last_line(path: Path) -> str:
    """Last non-empty line of a text file (an error file), at most 300 characters; '' if none."""
    try:
        lines = [ln.strip() for ln in Path(path).read_text().splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1][:300] if lines else ""


def member_status(
    exp_dir: Path,
    trials: Sequence[TrialSpec],
    packs: dict[str, Sequence[str]],
    status: dict[str, tuple[str, str]],
) -> dict[str, tuple[str, str]]:
    """Tune's (status, error) per pack -> (status, error) per packed trial.

    A member shares its pack's status, except when the pack ended in ERROR: a member whose
    run reached its last step is TERMINATED (a diverged or crashed sibling does not undo
    it); the others are ERROR with their own error (``error.txt`` in their trial directory,
    written when a model diverges), else the pack's.
    """
    by_id = {t.trial_id: t for t in trials}
    out: dict[str, tuple[str, str]] = {}
    for pack_id, (state, error) in status.items():
        for trial_id in packs.get(pack_id, ()):
            t = by_id[trial_id]
            if state != "ERROR":
                out[trial_id] = (state, "")
            elif (last_step(exp_dir, t) or 0) >= int(t.config["train.steps"]):
                out[trial_id] = ("TERMINATED", "")
            else:
                out[trial_id] = ("ERROR", last_line(Path(exp_dir) / t.dirname / ERROR_FILE) or error)
    return out


def write_trials(
    exp_dir: Path,
    trials: Sequence[TrialSpec],
    status: dict[str, tuple[str, str]],
    packs: dict[str, Sequence[str]] | None = None,
) -> None:
    """Rewrite ``trials.csv``: ``status`` maps trial id -> (Tune status, one-line error);
    ``packs`` (pack id -> its trial ids, packed sweeps only) adds a ``pack`` column."""
    grid_keys = list(trials[0].grid) if trials else []
    pack_of = {m: p for p, members in (packs or {}).items() for m in members}
    pack_col = ["pack"] if packs else []
    columns = ["trial_id", *grid_keys, "status", "last_step", "attempts", "run_dir", *pack_col, "error"]
    rows = []
    for t in trials:
        header, body = read_metrics(run_dir(exp_dir, t) / "metrics.csv")
        last = body[-1][header.index("step")] if body and "step" in header else ""
        state, error = status.get(t.trial_id, ("PENDING", ""))
        rows.append(
            [
                t.trial_id,
                *(format_value(t.grid[k]) for k in grid_keys),
                state,
                last,
                len(attempts(Path(exp_dir) / t.dirname)),
                f"{t.dirname}/{RUN}",
                *([pack_of.get(t.trial_id, "")] if packs else []),
                error,
            ]
        )
    atomic_write(Path(exp_dir) / TRIALS, to_csv(columns, rows))
