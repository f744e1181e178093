"""The live table of a running sweep: Ray Tune's ``CLIReporter`` with the study's columns,
one row per model (a grid point), also for a packed trial, so every model's cell is in its row::

    Sweep: 0/4 models finished, 15,000/40,000 model-steps (38%), 98.0 model-steps/s, ETA 0:04:41 (2 trials at a time)
    Number of trials: 4/4 (2 PENDING, 2 RUNNING)
    +--------------+----------+-----------------+---------------+----------------+--------+------------+-------+-------+-------------+-----------------+---------+
    | Trial name   | status   | loc             |   num_classes |   weight_decay |   seed | step       |   ICL |   IWL |   train acc |   model-steps/s | ETA     |
    ...

``Trial name`` is the model's trial id; ``pack`` (packed sweeps only) the Tune trial that
trains it; one column per grid key, by its short name (``spec.short_names``); ``step`` as
done/total; the latest holdout ICL, IWL and training accuracies (and the peer evaluators'
when the trainer reports them); the trial's rate in model-steps/s and its ETA. Above the
table, Ray's status lines and one line for the whole sweep (``sweeps.progress``).

How: each Tune trial (a pack) becomes one :class:`ModelRow` per member, an object Ray's own
table code reads like a trial (status, location and error file are the Tune trial's; the
id, cell and metrics the model's, from its pack's ``per_model`` report).

Why the legacy output engine (``RAY_AIR_NEW_OUTPUT=0``, set by the driver): Ray 2.60's
default engine ignores ``RunConfig(progress_reporter=...)`` and chooses its table's columns
itself (every config parameter, ``iter``, ``total time (s)`` and the first four numeric
metrics), the table that said neither which cell a trial is nor when it ends.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Mapping, Sequence

from ray.tune import CLIReporter
from ray.tune.experiment.trial import _Location

from icl.train.progress import format_duration
from icl.train.rundir import RunDir
from sweeps.progress import ACCURACIES, PER_MODEL, RATE, SweepTally
from sweeps.results import RUN
from sweeps.spec import TrialSpec, format_value, short_names

COLUMNS = {"step": "step", **ACCURACIES, "rate": "model-steps/s", "eta": "ETA"}
REPORT_PERIOD_S = {True: 10.0, False: 60.0}  # at most one table per period: a terminal, a log
PERIOD_ENV = "ICL_SWEEP_REPORT_S"  # overrides the period (seconds)


class ModelRow:
    """One model of a Tune trial, as a row of Ray's progress table: the model's id, cell and
    metrics; everything else (status, location, error file) is the Tune trial's."""

    def __init__(self, trial: Any, model_id: str, cell: dict[str, str], result: dict[str, Any], exp_dir: Path) -> None:
        self._trial = trial
        self.local_experiment_path = str(exp_dir)  # Ray's "Result logdir" line: the experiment
        self.trial_id = model_id
        self.config = cell
        self.evaluated_params = cell
        self.last_result = result

    def __getattr__(self, name: str) -> Any:
        return getattr(self._trial, name)

    def __str__(self) -> str:
        return self.trial_id


class FinishedPack:
    """A pack finished before this driver started, as Ray's table code reads a trial."""

    def __init__(self, pack_id: str) -> None:
        self.config = {"trial": pack_id}
        self.trial_id = pack_id
        self.status = "TERMINATED"
        self.last_result: dict[str, Any] = {}
        self.error_file = None
        self.local_path = None
        self.temporary_state = SimpleNamespace(location=_Location())

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
    environment's ``ICL_SWEEP_REPORT_S`` wins), and at the end.
    """

    def __init__(self, trials: Sequence[TrialSpec], packs: Mapping[str, Sequence[str]], exp_dir: Path,
                 slots: int, period_s: float | None = None, finished: Sequence[str] = ()) -> None:
        keys = list(trials[0].grid)
        short = short_names(keys)
        params = {"pack": "pack"} if any(len(m) > 1 for m in packs.values()) else {}
        params.update({k: short[k] for k in keys})
        if period_s is None:
            period_s = float(os.environ.get(PERIOD_ENV) or REPORT_PERIOD_S[sys.stdout.isatty()])
        super().__init__(
            metric_columns=dict(COLUMNS),
            parameter_columns=params,
            max_progress_rows=max(20, len(trials)),
            max_report_frequency=period_s,  # type: ignore[arg-type]  # Ray compares it as seconds
            print_intermediate_tables=True,
        )
        self.packs = {p: tuple(m) for p, m in packs.items()}
        self.cells = {t.trial_id: {k: format_value(t.grid[k]) for k in keys} for t in trials}
        self.steps = {t.trial_id: int(t.config["train.steps"]) for t in trials}
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
        self._print(self._progress_str(rows, done, *sys_info, line))

    def _print(self, msg: str) -> None:
        print(msg, flush=True)  # a SLURM log is not a terminal: do not let it sit in a buffer

    # ---------------------------------------------------------------- the rows

    def started(self) -> dict[str, int]:
        """Each model's newest checkpoint step when this driver started (what a pending,
        partly trained model resumes from), read once."""
        if self._started is None:
            self._started = {m: RunDir(self.exp_dir / d / RUN).latest_step() for m, d in self.dirnames.items()}
        return self._started

    def rows(self, trials: Sequence[Any], now: float) -> tuple[list[ModelRow], str]:
        """One :class:`ModelRow` per model of ``trials`` (Tune's), and the sweep's line."""
        rows: list[ModelRow] = []
        sweep = SweepTally()
        for trial in [*trials, *self.finished]:
            members = self.packs.get(trial.config.get("trial"), ())
            result = trial.last_result or {}
            if isinstance(trial, FinishedPack) and not result:
                trial.last_result = result = {PER_MODEL: {m: _last_row(self.exp_dir / self.dirnames[m] / RUN)
                                                          for m in members}}
            per = result.get(PER_MODEL, {})
            at = {m: max(int(per[m]["step"]) if m in per else 0, self.started()[m]) for m in members}
            left = sum(self.steps[m] - at[m] for m in members)
            rate = result.get(RATE)
            stamp = result.get("timestamp", now)
            eta = sweep.add(trial.status, left, rate, now - stamp if stamp >= self._since else 0.0)
            sweep.steps += sum(at.values())
            sweep.models += sum(at[m] >= self.steps[m] for m in members)
            for m in members:
                shown: dict[str, Any] = {k: result[k] for k in ("node_ip", "pid") if k in result}
                shown["step"] = f"{at[m]}/{self.steps[m]}"
                shown.update({k: round(v, 3) for k, v in per.get(m, {}).items() if k in ACCURACIES})
                if rate:
                    shown["rate"] = round(rate, 1)
                if eta is not None:
                    shown["eta"] = format_duration(eta)
                rows.append(ModelRow(trial, m, dict(self.cells[m], pack=trial.config["trial"]), shown, self.exp_dir))
        return rows, sweep.line(len(self.steps), sum(self.steps.values()), self.slots)
