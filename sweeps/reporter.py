"""The live table of a running sweep: Ray Tune's ``CLIReporter`` with the study's columns,
one row per model (a grid point), also for a packed trial, so every model's cell is in its row::

    Sweep: 0/4 models finished, 15,000/40,000 model-steps (38%), 98.0 model-steps/s, ETA 0:04:41 (2 trials at a time)
    Number of trials: 4/4 (2 PENDING, 2 RUNNING)
    +--------------+----------+-----------------+---------------+----------------+----------+--------+------------+-------+-------+-------------+-----------------+---------+
    | Trial name   | status   | loc             |   num_classes |   weight_decay | shrink   |   seed | step       |   ICL |   IWL |   train acc |   model-steps/s | ETA     |
    ...

That is the **full table**, printed to logs (a SLURM job's, any stdout that is not a terminal)
and to terminals wide enough for it. A narrower terminal (``shutil.get_terminal_size()``:
``$COLUMNS``, else the terminal's own width) gets the **compact table**, which fits 80
columns: the model, its status, its cell as one column (the grid values joined by ``/``, in
the grid's order, named once above the table), and the must-have columns (``COMPACT``: step,
ICL, IWL, ETA), then as many of the others (``COMPACT_MORE``: shrink, the rest of
``icl.metrics.LIVE``, the rate, the pack, the location) as still fit, in that order; the
text lines above and below it are wrapped to the width::

    cell: num_classes/weight_decay/seed
    +---------+----------+------------+----------+-------+-------+---------+
    | model   | status   | cell       | step     |   ICL |   IWL | ETA     |
    |---------+----------+------------+----------+-------+-------+---------|
    | t002    | RUNNING  | 1600/0/0   | 4500/10k | 0.783 | 0.262 | 0:01:06 |
    ...

``Trial name`` is the model's trial id; ``pack`` (packed sweeps only) the Tune trial that
trains it; one column per grid key, by its short name (``spec.short_names``); ``shrink``, what
the model's weight decay amounts to over its schedule (``exp(-wd * sum lr_t)``, e.g.
``e^-0.25``: the factor a weight without gradient ends at); ``step`` as
done/total; the latest holdout ICL, IWL and training accuracies (and the peer evaluators'
when the trainer reports them); the trial's rate in model-steps/s and its ETA. Above the
table, Ray's status lines and one line for the whole sweep (``sweeps.progress``).

How: each Tune trial (a pack) becomes one :class:`ModelRow` per member, an object Ray's own
table code reads like a trial (status, location and error file are the Tune trial's; the
id, cell and metrics the model's, from its pack's ``per_model`` report).

Why the legacy output engine (``RAY_AIR_NEW_OUTPUT=0``, :mod:`sweeps.ray_adapter`): Ray 2.60's
default engine ignores ``RunConfig(progress_reporter=...)`` and chooses its table's columns
itself (every config parameter, ``iter``, ``total time (s)`` and the first four numeric
metrics), the table that said neither which cell a trial is nor when it ends. The pieces of
Ray's own table code it draws with are private in Ray; the adapter holds them.
"""

from __future__ import annotations

import os
import shutil
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Mapping, Sequence

from ray.tune import CLIReporter

from icl.layout import ExperimentDir
from icl.metrics import ICL, IWL, LIVE, STEP
from icl.train.progress import format_duration
from icl.train.rundir import RunDir
from sweeps.progress import PER_MODEL, RATE, SweepTally
from sweeps.ray_adapter import no_location, tabulate, time_passed, trial_counts, trial_location
from sweeps.spec import ModelSpec, format_value, short_names, shrink_of

COLUMNS = {STEP: "step", **LIVE, "rate": "model-steps/s", "eta": "ETA"}
SHRINK = "shrink"  # each model's exp(-wd * sum lr_t), as e^-0.25 (sweeps.spec.shrink_of)
# The compact table (a terminal narrower than the full table): model, status and cell, these
# always, then the others in this order while the table still fits the terminal.
COMPACT = (STEP, ICL, IWL, "eta")
COMPACT_MORE = (SHRINK, *(k for k in LIVE if k not in COMPACT), "rate", "pack", "loc")
COMPACT_ORDER = ("model", "status", "cell", "pack", SHRINK, STEP, *LIVE, "rate", "eta", "loc")  # left to right
COMPACT_HEADERS = {"model": "model", "status": "status", "cell": "cell", "pack": "pack", SHRINK: SHRINK,
                   "loc": "loc", **COLUMNS}
STATE_ORDER = ("RUNNING", "PAUSED", "PENDING", "TERMINATED", "ERROR")  # rows in Ray's order
SHORT_STATUS = {"TERMINATED": "DONE"}
REPORT_PERIOD_S = {True: 10.0, False: 60.0}  # at most one table per period: a terminal, a log
PERIOD_ENV = "ICL_SWEEP_REPORT_S"  # overrides the period (seconds)


def with_shrink(params: dict[str, str]) -> dict[str, str]:
    """The table's parameter columns with ``shrink`` (each model's total shrink factor) after
    the weight decay's column, or last when the grid does not vary the decay."""
    if "optim.weight_decay" not in params:
        return {**params, SHRINK: SHRINK}
    out: dict[str, str] = {}
    for k, v in params.items():
        out[k] = v
        if k == "optim.weight_decay":
            out[SHRINK] = SHRINK
    return out


class ModelRow:
    """One model of a Tune trial, as a row of Ray's progress table: the model's id, cell and
    metrics; everything else (status, location, error file) is the Tune trial's."""

    def __init__(self, trial: Any, model_id: str, cell: dict[str, str], result: dict[str, Any], exp_dir: Path,
                 steps: tuple[int, int]) -> None:
        self._trial = trial
        self.local_experiment_path = str(exp_dir)  # Ray's "Result logdir" line: the experiment
        self.trial_id = model_id
        self.config = cell
        self.evaluated_params = cell
        self.last_result = result
        self.steps = steps  # (done, total): the step column, as numbers

    def __getattr__(self, name: str) -> Any:
        return getattr(self._trial, name)

    def __str__(self) -> str:
        return self.trial_id


def short_count(n: int) -> str:
    """A step count for the compact table: exact below 10,000, else in thousands (``500k``;
    ``12.3k`` rounded)."""
    if n < 10_000:
        return str(n)
    return f"{n // 1000}k" if n % 1000 == 0 else f"{n / 1000:.1f}k"


def widest(text: str) -> int:
    return max((len(line) for line in text.splitlines()), default=0)


def is_table_line(line: str) -> bool:
    return line[:1] in ("+", "|")


def wrap(text: str, width: int) -> str:
    """``text`` with every line that is not a table's wrapped to ``width`` (continuations
    indented): Ray's status lines, the sweep's line, long paths."""
    out: list[str] = []
    for line in text.split("\n"):
        if len(line) <= width or is_table_line(line):
            out.append(line)
        else:
            out += textwrap.wrap(line, max(width, 20), subsequent_indent="    ", break_on_hyphens=False)
    return "\n".join(out)


def compact_values(row: ModelRow, keys: Sequence[str], packed: bool) -> dict[str, Any]:
    """One model's values for the compact table, by column (``COMPACT_ORDER``)."""
    result = row.last_result
    values: dict[str, Any] = {
        "model": row.trial_id,
        "status": SHORT_STATUS.get(row.status, row.status),
        "cell": "/".join(row.config[k] for k in keys),
        SHRINK: row.config[SHRINK],
        STEP: "/".join(short_count(n) for n in row.steps),
        "loc": str(trial_location(row, result)),
        **{k: result.get(k) for k in (*LIVE, "rate", "eta")},
    }
    if packed:
        values["pack"] = row.config["pack"]
    return values


def render_compact(values: Sequence[Mapping[str, Any]], shown: Sequence[str], cell_width: int | None = None) -> str:
    cols = [c for c in COMPACT_ORDER if c in shown]
    text_cols = [i for i, c in enumerate(cols) if c not in (*LIVE, "rate")]  # never read as numbers
    return tabulate([[v.get(c) for c in cols] for v in values], headers=[COMPACT_HEADERS[c] for c in cols],
                    tablefmt="psql", showindex=False, disable_numparse=text_cols,
                    maxcolwidths=[cell_width if c == "cell" else None for c in cols] if cell_width else None)


def compact_table(rows: Sequence[ModelRow], keys: Sequence[str], packed: bool, width: int) -> str:
    """The compact table of ``rows`` (in Ray's order: running, paused, pending, finished,
    failed): model, status, cell and ``COMPACT``, then ``COMPACT_MORE`` in order while the
    table fits ``width`` (a column no model has a value for is left out). Where even the
    first do not fit, the cell column is wrapped."""
    ordered = sorted(rows, key=lambda r: STATE_ORDER.index(r.status) if r.status in STATE_ORDER else len(STATE_ORDER))
    values = [compact_values(r, keys, packed) for r in ordered]
    shown = ["model", "status", "cell", *COMPACT]
    for column in COMPACT_MORE:
        if not any(v.get(column) not in (None, "") for v in values):
            continue
        if widest(render_compact(values, [*shown, column])) > width:
            break
        shown.append(column)
    text = render_compact(values, shown)
    cell = max(len(v["cell"]) for v in values)
    while widest(text) > width and cell > 4:
        cell = max(4, cell - (widest(text) - width))
        text = render_compact(values, shown, cell_width=cell)
    return text


class FinishedPack:
    """A pack finished before this driver started, as Ray's table code reads a trial."""

    def __init__(self, pack_id: str) -> None:
        self.config = {"trial": pack_id}
        self.trial_id = pack_id
        self.status = "TERMINATED"
        self.last_result: dict[str, Any] = {}
        self.error_file = None
        self.local_path = None
        self.temporary_state = SimpleNamespace(location=no_location())

    def __str__(self) -> str:
        return self.trial_id


def _last_row(run: Path) -> dict[str, float]:
    """A finished run's last evaluation (step and accuracies), from its metrics.csv."""
    header, rows = RunDir(run).metrics_table()
    out = {}
    for c, v in zip(header, rows[-1] if rows else ()):
        try:
            out[c] = float(v)
        except ValueError:
            continue
    return out


class SweepReporter(CLIReporter):
    """Ray Tune's command-line reporter over the sweep's models (see the module docstring).

    A table is printed when something changed (a report, a status), at most every
    ``period_s`` seconds (10 on a terminal, 60 in a log such as a SLURM job's; the
    environment's ``ICL_SWEEP_REPORT_S`` wins), and at the end: the full table in a log and
    where it fits, else the compact one (``width``: the columns to fit; by default the
    terminal's, read at every report).
    """

    def __init__(self, trials: Sequence[ModelSpec], packs: Mapping[str, Sequence[str]], exp_dir: Path,
                 slots: int, period_s: float | None = None, width: int | None = None,
                 finished: Sequence[str] = ()) -> None:
        keys = list(trials[0].grid)
        short = short_names(keys)
        params = {"pack": "pack"} if any(len(m) > 1 for m in packs.values()) else {}
        params.update({k: short[k] for k in keys})
        params = with_shrink(params)
        if period_s is None:
            period_s = float(os.environ.get(PERIOD_ENV) or REPORT_PERIOD_S[sys.stdout.isatty()])
        super().__init__(
            metric_columns=dict(COLUMNS),
            parameter_columns=params,
            max_progress_rows=max(20, len(trials)),
            max_report_frequency=period_s,  # type: ignore[arg-type]  # Ray compares it as seconds
            print_intermediate_tables=True,
        )
        self.keys = keys
        self.legend = "cell: " + "/".join(short[k] for k in keys)  # the compact table's cell column
        self.packed = "pack" in params
        self.width = width
        self.packs = {p: tuple(m) for p, m in packs.items()}
        self.cells = {t.trial_id: {**{k: format_value(t.grid[k]) for k in keys}, SHRINK: shrink_of(t)} for t in trials}
        self.steps = {t.trial_id: t.config.train.steps for t in trials}
        self.dirnames = {t.trial_id: t.dirname for t in trials}
        self.exp_dir = Path(exp_dir)
        self.slots = slots
        # packs whose models all finished before this driver started: not Tune trials of this
        # run (sweeps.driver), shown as finished rows all the same
        self.finished = [FinishedPack(p) for p in finished]
        self._started: dict[str, int] | None = None  # each model's step when this driver started
        self._seen: tuple = ()
        self._since = time.time()  # older results come from a previous driver's run (a resume)

    # ---------------------------------------------------------------- Ray's hooks

    def set_total_samples(self, total_samples: int) -> None:
        """Tune counts its trials (packs); the table's rows are models."""
        self._total_samples = len(self.steps)

    def should_report(self, trials: list[Any], done: bool = False) -> bool:
        seen = tuple((t.trial_id, t.status, (t.last_result or {}).get("training_iteration")) for t in trials)
        if done:
            return True
        if seen == self._seen or not super().should_report(trials, done):
            return False
        self._seen = seen
        return True

    def report(self, trials: list[Any], done: bool, *sys_info: str) -> None:
        rows, line = self.rows(trials, time.time())
        self._print(self.render(rows, done, *sys_info, line, width=self.columns()))

    def _print(self, msg: str) -> None:
        print(msg, flush=True)  # a SLURM log is not a terminal: do not let it sit in a buffer

    # ---------------------------------------------------------------- the layout

    def columns(self) -> int | None:
        """The width to fit: the one given, else the terminal's (``$COLUMNS`` first); None
        (the full table, never wrapped) when stdout is not a terminal, e.g. a SLURM log."""
        if self.width is not None:
            return self.width
        return shutil.get_terminal_size().columns if sys.stdout.isatty() else None

    def render(self, rows: Sequence[ModelRow], done: bool, *sys_info: str, width: int | None) -> str:
        """The report: Ray's full table when ``width`` is None or the table fits it, else the
        compact one; with a width, every other line wrapped to it."""
        full = self._progress_str(rows, done, *sys_info)
        if width is None:
            return full
        if all(len(line) <= width for line in full.splitlines() if is_table_line(line)):
            return wrap(full, width)
        return wrap(self._compact_str(rows, *sys_info, width=width), width)

    def _compact_str(self, rows: Sequence[ModelRow], *sys_info: str, width: int) -> str:
        """Ray's status lines, the compact table, and the failed models with their error files."""
        counts = trial_counts(list(rows), metric_columns=self._metric_columns,
                              parameter_columns=self._parameter_columns, total_samples=self._total_samples)
        lines = ["== Status ==", time_passed(self._start_time, time.time()), *sys_info, counts, self.legend,
                 compact_table(rows, self.keys, self.packed, width)]
        failed = [r for r in rows if r.error_file]
        if failed:
            lines.append(f"Number of errored trials: {len(failed)}")
            for r in failed:
                n = r.run_metadata.num_failures
                lines.append(f"  {r} ({n} failure{'s' if n != 1 else ''}{'' if r.status == 'ERROR' else ', retried'}): "
                             f"{r.error_file}")
        return "\n".join(lines) + "\n"

    # ---------------------------------------------------------------- the rows

    def started(self) -> dict[str, int]:
        """Each model's newest checkpoint step when this driver started (what a pending,
        partly trained model resumes from), read once."""
        if self._started is None:
            exp = ExperimentDir(self.exp_dir)
            self._started = {m: RunDir(exp.run_dir(d)).latest_step() for m, d in self.dirnames.items()}
        return self._started

    def rows(self, trials: Sequence[Any], now: float) -> tuple[list[ModelRow], str]:
        """One :class:`ModelRow` per model of ``trials`` (Tune's), and the sweep's line."""
        rows: list[ModelRow] = []
        sweep = SweepTally()
        for trial in [*trials, *self.finished]:
            members = self.packs.get(trial.config.get("trial"), ())
            result = trial.last_result or {}
            if isinstance(trial, FinishedPack) and not result:
                exp = ExperimentDir(self.exp_dir)
                trial.last_result = result = {PER_MODEL: {m: _last_row(exp.run_dir(self.dirnames[m])) for m in members}}
            per = result.get(PER_MODEL, {})
            at = {m: max(int(per[m][STEP]) if m in per else 0, self.started()[m]) for m in members}
            left = sum(self.steps[m] - at[m] for m in members)
            rate = result.get(RATE)
            stamp = result.get("timestamp", now)
            eta = sweep.add(trial.status, left, rate, now - stamp if stamp >= self._since else 0.0)
            sweep.steps += sum(at.values())
            sweep.models += sum(at[m] >= self.steps[m] for m in members)
            for m in members:
                shown: dict[str, Any] = {k: result[k] for k in ("node_ip", "pid") if k in result}
                shown[STEP] = f"{at[m]}/{self.steps[m]}"
                shown.update({k: round(v, 3) for k, v in per.get(m, {}).items() if k in LIVE})
                if rate:
                    shown["rate"] = round(rate, 1)
                if eta is not None:
                    shown["eta"] = format_duration(eta)
                rows.append(ModelRow(trial, m, dict(self.cells[m], pack=trial.config["trial"]), shown, self.exp_dir,
                                     (at[m], self.steps[m])))
        return rows, sweep.line(len(self.steps), sum(self.steps.values()), self.slots)
