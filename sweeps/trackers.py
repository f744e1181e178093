"""Every model of a sweep in the experiment trackers a lab already uses: MLflow and Weights &
Biases (``icl-sweep SPEC --log-to mlflow,wandb``, or the spec's ``log_to: [...]``).

One tracker run per model (grid point), named by its cell (its trial directory name, e.g.
``t003_num_classes=100_weight_decay=0.1_seed=0``), grouped by the experiment (an MLflow
experiment / a W&B group named as the sweep); its whole config as parameters, its cell as
tags; every row of its ``metrics.csv`` logged at its step.

Why the clients, from the driver, and not Ray Tune's ``MLflowLoggerCallback`` /
``WandbLoggerCallback``: those make one tracker run per Tune trial from what the trial
reports, and a trial here trains a pack of models and reports their mean; the driver
already reads every model's own rows from its run directory (:mod:`sweeps.results`).

What has been sent is kept in ``STORAGE/NAME/trackers.json`` (per tracker destination and
model: its tracker run and the last step sent), so a resumed sweep goes on in the same
tracker runs and sends each row once (a row re-trained after a resume is not sent again).
A tracker that fails while the sweep runs (a server gone) is reported once and left alone;
the sweep goes on, and the next run of the same command sends what is missing.

Each tracker is configured as its users already configure it: ``MLFLOW_TRACKING_URI``
(default: MLflow's own, ``sqlite:///mlflow.db`` in the working directory), ``WANDB_PROJECT``
(default ``icl-sweep``), ``WANDB_ENTITY``, ``WANDB_MODE`` (``offline``: no account, no
network; ``wandb sync`` uploads later), ``WANDB_DIR``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import sys
import threading
import time
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

from icl.errors import UserError
from icl.io import atomic_write
from icl.layout import TRACKERS as STATE_FILE, ExperimentDir  # each model's tracker run and the last step sent
from sweeps import results as res
from sweeps.spec import TRACKERS, ModelSpec, format_value

EXTRA = {"mlflow": "mlflow", "wandb": "wandb"}  # the pyproject extra that installs each
MODULE = {"mlflow": "mlflow", "wandb": "wandb"}
WANDB_DEFAULT_PROJECT = "icl-sweep"


def require(name: str) -> Any:
    """The tracker's client module; UserError naming the extra to install if it is missing."""
    try:
        return __import__(MODULE[name])
    except ImportError as e:
        raise UserError(f"--log-to {name} needs the {MODULE[name]} package ({e}): "
                        f"pip install 'icl-sweep[{EXTRA[name]}]'") from None


class Tracker(Protocol):
    """One destination (an MLflow tracking store, a W&B project) the sweep's models go to."""

    name: str
    destination: str  # where the runs go: the state file keeps runs per destination

    def open(self, model: ModelSpec, run_id: str | None) -> str: ...  # a run (new or resumed): its id

    def log(self, run_id: str, rows: Sequence[tuple[int, dict[str, float]]]) -> None: ...

    def close(self, run_id: str, finished: bool, failed: bool) -> None: ...


def model_name(model: ModelSpec) -> str:
    """A model's run name: its trial directory (trial id + its cell), as in TensorBoard."""
    return model.dirname


def cell_tags(model: ModelSpec) -> dict[str, str]:
    """The model's cell as tags: one per grid key, its value as in the trial table."""
    return {k: format_value(v) for k, v in model.grid.items()}


# --------------------------------------------------------------------------- MLflow


class MlflowTracker:
    """Runs in the MLflow experiment named as the sweep, through ``MlflowClient`` (no active
    run, no global state: several runs are open at once)."""

    name = "mlflow"

    def __init__(self, experiment: str, exp_dir: Path) -> None:
        mlflow = require("mlflow")
        from mlflow.tracking import MlflowClient

        for noisy in ("mlflow", "alembic"):  # a line per database migration and per store opened
            logging.getLogger(noisy).setLevel(logging.WARNING)

        self.uri = mlflow.get_tracking_uri()
        self.destination = f"mlflow {self.uri}"  # the experiment is the sweep's name
        try:
            self.client = MlflowClient(self.uri)
            found = self.client.get_experiment_by_name(experiment)
            if found is not None and found.lifecycle_stage == "deleted":
                raise UserError(f"MLflow experiment {experiment!r} at {self.uri} is deleted: restore it "
                                "(mlflow experiments restore) or choose another --name")
            self.experiment_id = found.experiment_id if found else self.client.create_experiment(
                experiment, tags={"icl.experiment_dir": str(exp_dir)})
        except UserError:
            raise
        except Exception as e:  # a store that cannot be opened: a bad URI, a server that is down
            raise UserError(f"cannot use the MLflow tracking store {self.uri} ({type(e).__name__}: "
                            f"{_line(e)}): set MLFLOW_TRACKING_URI to a reachable store") from None
        self.exp_dir = exp_dir

    def open(self, model: ModelSpec, run_id: str | None) -> str:
        from mlflow.entities import Param, RunTag

        if run_id is not None:
            try:
                self.client.update_run(run_id, status="RUNNING")
                return run_id
            except Exception:  # noqa: BLE001 - gone from this store: start the model's run again
                pass
        tags = {"icl.trial_id": model.trial_id, "icl.run_dir": str(ExperimentDir(self.exp_dir).run_dir(model)),
                **{f"cell.{k}": v for k, v in cell_tags(model).items()}}
        run = self.client.create_run(self.experiment_id, run_name=model_name(model), tags=tags)
        params = [Param(k, _text(v)) for k, v in sorted(model.flat_config().items())]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(run.info.run_id, params=params[i : i + 100],
                                  tags=[RunTag("icl.cell", _cell_text(model))] if i == 0 else [])
        return run.info.run_id

    def log(self, run_id: str, rows: Sequence[tuple[int, dict[str, float]]]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for step, row in rows for k, v in row.items()]
        for i in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics per batch
            self.client.log_batch(run_id, metrics=metrics[i : i + 1000])

    def close(self, run_id: str, finished: bool, failed: bool) -> None:
        self.client.set_terminated(run_id, status="FINISHED" if finished else "FAILED" if failed else "KILLED")


# --------------------------------------------------------------------------- Weights & Biases


class WandbTracker:
    """Runs in the W&B project ``$WANDB_PROJECT`` (default ``icl-sweep``), grouped by the
    sweep's name; each model's run id is derived from the experiment directory and its trial
    id, so a resumed sweep resumes the same runs."""

    name = "wandb"

    def __init__(self, experiment: str, exp_dir: Path) -> None:
        self.wandb = require("wandb")
        self.project = os.environ.get("WANDB_PROJECT") or WANDB_DEFAULT_PROJECT
        entity = os.environ.get("WANDB_ENTITY")
        self.destination = f"wandb project {entity + '/' if entity else ''}{self.project}"
        self.group = experiment
        self.exp_dir = exp_dir
        self.runs: dict[str, Any] = {}

    def run_id(self, model: ModelSpec) -> str:
        digest = hashlib.sha256(f"{self.exp_dir}\0{model.trial_id}".encode()).hexdigest()[:12]
        return re.sub(r"[^A-Za-z0-9_-]", "-", f"{self.group}-{model.trial_id}")[:48] + f"-{digest}"

    def open(self, model: ModelSpec, run_id: str | None) -> str:
        run_id = run_id or self.run_id(model)
        config = {**model.flat_config(), "cell": dict(model.grid), "trial_id": model.trial_id,
                  "run_dir": str(ExperimentDir(self.exp_dir).run_dir(model))}
        self.runs[run_id] = self.wandb.init(
            project=self.project, group=self.group, name=model_name(model), id=run_id, resume="allow",
            job_type="train", config=config, tags=[f"{k}={v}"[:64] for k, v in cell_tags(model).items()],
            reinit="create_new",
            # the driver's console is the live table, not a run's log; no sampler thread per run
            settings=self.wandb.Settings(silent=True, console="off", x_disable_stats=True),
        )
        return run_id

    def log(self, run_id: str, rows: Sequence[tuple[int, dict[str, float]]]) -> None:
        run = self.runs[run_id]
        for step, row in rows:
            run.log(row, step=step)

    def close(self, run_id: str, finished: bool, failed: bool) -> None:
        self.runs.pop(run_id).finish(exit_code=0 if finished else 1)


MAKERS = {"mlflow": MlflowTracker, "wandb": WandbTracker}


# --------------------------------------------------------------------------- the sweep's trackers


class Trackers:
    """The trackers of one sweep and what each has been sent. Made on the driver before Ray
    starts (a tracker that cannot be used is one ``error:`` line then); :meth:`sync` sends
    every model's new rows, and closes a model's run when it finished (``final``: all)."""

    def __init__(self, names: Sequence[str], experiment: str, exp_dir: Path, trials: Sequence[ModelSpec],
                 out: Any = None) -> None:
        self.exp_dir = Path(exp_dir)
        self.trials = list(trials)
        self.out = out or sys.stderr
        self.trackers: list[Tracker] = [MAKERS[n](experiment, self.exp_dir) for n in names]
        self.state: dict[str, dict[str, dict[str, Any]]] = self._read_state()
        self.open: set[tuple[str, str]] = set()  # (destination, trial id) opened by this process
        self.broken: set[str] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._again = False
        if self.trackers:
            print(f"icl-sweep: every model also goes to {', '.join(t.destination for t in self.trackers)}",
                  file=self.out, flush=True)

    def __bool__(self) -> bool:
        return bool(self.trackers)

    def _read_state(self) -> dict[str, dict[str, dict[str, Any]]]:
        try:
            state = json.loads((self.exp_dir / STATE_FILE).read_text())
        except (OSError, ValueError):  # none yet, or torn: everything is sent again (once)
            return {}
        return state if isinstance(state, dict) else {}

    def sync(self, status: Mapping[str, str] | None = None, final: bool = False) -> None:
        """Send every model's rows after the last step sent; close the runs of finished models
        (``final``: every open run, as ``status`` says: TERMINATED, ERROR or UNFINISHED)."""
        status = status or {}
        changed = False
        for tracker in self.trackers:
            if tracker.destination in self.broken:
                continue
            sent = self.state.setdefault(tracker.destination, {})
            try:
                for model in self.trials:
                    changed |= self._sync_model(tracker, sent, model, status.get(model.trial_id), final)
            except Exception as e:  # noqa: BLE001 - a tracker must never stop the sweep
                self.broken.add(tracker.destination)
                print(f"icl-sweep: warning: {tracker.name} failed ({type(e).__name__}: {_line(e)}); nothing more "
                      "goes to it in this run (results.csv has everything); run the same command again to send "
                      "the rest", file=self.out, flush=True)
        if changed:
            try:
                atomic_write(self.exp_dir / STATE_FILE, json.dumps(self.state, indent=1, sort_keys=True))
            except OSError as e:  # a full disk: rows may be sent twice after a resume, never lost
                print(f"icl-sweep: warning: {e}", file=self.out, flush=True)

    def _sync_model(self, tracker: Tracker, sent: dict[str, dict[str, Any]], model: ModelSpec,
                    status: str | None, final: bool) -> bool:
        record = sent.get(model.trial_id) or {}
        if record.get("closed"):
            return False
        run = res.run_dir(self.exp_dir, model)
        last = record.get("step", -1)
        rows = [r for r in numeric_rows(*run.metrics_table()) if r[0] > last]
        finished = run.finished(model.config.train.steps)
        key = (tracker.destination, model.trial_id)
        if not rows and key not in self.open and not (finished and record):
            return False  # nothing new, nothing open: not even a run to start
        if key not in self.open:
            record["run"] = tracker.open(model, record.get("run"))
            self.open.add(key)
        if rows:
            tracker.log(record["run"], rows)
            record["step"] = rows[-1][0]
        if finished or final:
            tracker.close(record["run"], finished, status == "ERROR")
            self.open.discard(key)
            record["closed"] = finished  # an unfinished model's run is resumed by the next driver
        sent[model.trial_id] = record
        return True

    def sync_soon(self) -> None:
        """:meth:`sync` on a thread of its own, so that opening runs or a slow tracking server
        never holds up Ray Tune's loop; a request while one runs makes it run once more."""
        if not self.trackers:
            return
        with self._lock:
            if self._thread is not None:
                self._again = True
                return
            self._thread = threading.Thread(target=self._sync_until_done, name="icl-trackers", daemon=True)
            self._thread.start()

    def _sync_until_done(self) -> None:
        while True:
            self.sync()
            with self._lock:
                if not self._again:
                    self._thread = None
                    return
                self._again = False

    def close(self, status: Mapping[str, str] | None = None) -> None:
        """The final sync, after the one running (if any): what is left sent, every run this
        process opened closed."""
        with self._lock:
            thread, self._again = self._thread, False
        if thread is not None:
            thread.join()
        self.sync(status, final=True)


def numeric_rows(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[tuple[int, dict[str, float]]]:
    """``metrics.csv`` rows as (step, {column: value}) with every cell that is a number."""
    out = []
    for row in rows:
        values: dict[str, float] = {}
        for column, cell in zip(header, row):
            try:
                values[column] = float(cell)
            except ValueError:
                continue
        step = values.pop("step", None)
        if step is not None and math.isfinite(step):
            out.append((int(step), values))
    return out


def _text(value: Any) -> str:
    return "null" if value is None else format_value(value)


def _cell_text(model: ModelSpec) -> str:
    return ", ".join(f"{k}={v}" for k, v in cell_tags(model).items())


def _line(e: BaseException) -> str:
    return res.error_line(str(e)) or type(e).__name__


__all__ = ["TRACKERS", "Trackers", "MlflowTracker", "WandbTracker", "require", "numeric_rows",
           "STATE_FILE"]
