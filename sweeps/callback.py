"""Ray Tune callbacks on the driver: one keeps ``results.csv`` and ``trials.csv`` current, one
sends every model's rows to the sweep's trackers (MLflow, W&B).

Separate from :mod:`sweeps.driver` so that importing the driver (for ``--dry-run`` and the
checks that run before Ray) does not pay for importing Ray Tune.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Sequence

from ray import tune

from sweeps import results as res
from sweeps import signals
from sweeps.spec import ModelSpec

REFRESH_PERIOD_S = 2.0

# Trial id (a grid point, a member of a pack) -> (status, one-line error), as last
# seen by any ResultsCallback of this process. The driver reads it after ``Tuner.fit()``
# (Tune may hold a copy of the callback rather than the driver's own instance).
LAST_STATUS: dict[str, tuple[str, str]] = {}


class ResultsCallback(tune.Callback):
    """Rewrites the tables atomically while trials run (throttled to every few seconds, and
    at every trial's end), so a half-finished sweep can already be analysed.

    It keeps no state but the trial table and the packs (Tune's trials): the experiment
    directory comes from the trials' own paths.
    """

    def __init__(self, trials: Sequence[ModelSpec], packs: res.Packs, period_s: float = REFRESH_PERIOD_S) -> None:
        self.trials = list(trials)
        self.packs = {k: tuple(v) for k, v in packs.items()}
        self.period_s = period_s
        self._last = 0.0

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._last = 0.0

    def refresh(self, trials: list[Any], force: bool = False) -> None:
        now = time.monotonic()
        if not trials or (not force and now - self._last < self.period_s):
            return
        self._last = now
        exp_dir = Path(trials[0].path).parent
        status = {t.config["trial"]: (t.status, res.last_line(getattr(t, "error_file", None))) for t in trials}
        status = res.member_status(exp_dir, self.trials, self.packs, status)
        LAST_STATUS.clear()
        LAST_STATUS.update(status)
        try:
            res.write_results(exp_dir, self.trials)
            res.write_trials(exp_dir, self.trials, status, self.packs)
        except OSError as e:  # a full disk must not kill the sweep; the final write retries
            logging.getLogger(__name__).warning("could not refresh the results tables: %s", e)

    def on_step_begin(self, iteration: int, trials: list[Any], **info: Any) -> None:
        signals.poll()  # a stop signal that came before Tune could take it

    def on_trial_result(self, iteration: int, trials: list[Any], trial: Any, result: dict, **info: Any) -> None:
        self.refresh(trials)

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self.refresh(trials, force=True)

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self.refresh(trials, force=True)

    def on_experiment_end(self, trials: list[Any], **info: Any) -> None:
        self.refresh(trials, force=True)


class TrackerCallback(tune.Callback):
    """Sends every model's new rows to the sweep's trackers (:class:`sweeps.trackers.Trackers`)
    while trials run, throttled like the tables; the driver's final sync closes the runs.

    Tune pickles its callbacks into ``tuner.pkl``: the copy it unpickles on a resume holds no
    tracker (clients do not pickle), and the driver puts a live one in its place."""

    def __init__(self, trackers: Any, period_s: float = REFRESH_PERIOD_S) -> None:
        self.trackers = trackers
        self.period_s = period_s
        self._last = 0.0

    def __getstate__(self) -> dict[str, Any]:
        return {"trackers": None, "period_s": self.period_s, "_last": 0.0}

    def refresh(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.trackers is None or (not force and now - self._last < self.period_s):
            return
        self._last = now
        self.trackers.sync_soon()

    def on_trial_result(self, iteration: int, trials: list[Any], trial: Any, result: dict, **info: Any) -> None:
        self.refresh()

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self.refresh(force=True)

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self.refresh(force=True)
