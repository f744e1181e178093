"""Every way the sweep bends Ray, in one place: settings, private imports and patches, each with
its reason. Checked on Ray ``RAY_CHECKED`` (constraints.txt pins it); after an upgrade, this is
the file to check again (tests/sweeps/test_sweep_ray_adapter.py says which Ray it runs on).

Nothing here imports Ray when this module is imported: :func:`loopback_only` must run before
Ray's first import, and ``--dry-run`` never pays for importing Ray Tune.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import signal
import sys
from typing import Any, Iterator, Sequence

from sweeps.results import error_line

RAY_CHECKED = "2.60.0"

# --------------------------------------------------------------------------- settings

# Ray Tune settings for the driver (an explicit value in the environment wins):
TUNE_ENV = {
    # results.csv / trials.csv are the experiment's tables; Tune's per-trial result.json,
    # progress.csv and TensorBoard files would only duplicate them.
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
    # a spec's checkpoint.num_to_keep makes Tune save its experiment state every
    # num_to_keep checkpoints, which is what a resume wants; do not warn about it.
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
    # a failed trial is listed in the summary with its error and the file holding its
    # traceback (error.txt); Tune would also print the whole traceback into the live output
    "TUNE_PRINT_ALL_TRIAL_ERRORS": "0",
    # the live table is our RunConfig(progress_reporter=...) (sweeps.reporter); Ray 2.60's
    # default output engine ignores it and picks its own columns.
    "RAY_AIR_NEW_OUTPUT": "0",
}


def tune_environment() -> None:
    """Set ``TUNE_ENV`` (where the environment does not already say otherwise)."""
    for var, value in TUNE_ENV.items():
        os.environ.setdefault(var, value)


def loopback_only() -> None:
    """Make an embedded Ray listen on 127.0.0.1 alone. Ray 2.60 has no bind-address option:
    its GCS, raylet, object manager, agents and workers listen on every interface unless the
    node's own address is the loopback one, which Ray picks only when "cluster mode" is off
    (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, read when Ray is imported, so set before that;
    on a driver that already imported Ray the private constant is set too). Never for a
    cluster (``--address``)."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:
        constants.ENABLE_RAY_CLUSTER = False


# --------------------------------------------------------------------------- authentication


def reset_token_cache() -> None:
    """Ray caches the first token it read (``ray._raylet.AuthenticationTokenLoader``, private):
    after the driver points ``RAY_AUTH_TOKEN_PATH`` at a fresh token, forget the old one."""
    if "ray._raylet" in sys.modules:
        from ray._raylet import AuthenticationTokenLoader

        AuthenticationTokenLoader.instance().reset_cache()


def reload_auth_mode() -> None:
    """Ray reads ``RAY_AUTH_MODE`` into its C++ config when first imported; after the driver
    sets it, refresh that config the way Ray's own token-auth setup does (``ray._raylet.Config``,
    private), or this process and its raylet would disagree."""
    if "ray._raylet" in sys.modules:
        from ray._raylet import Config

        Config.initialize("")


# --------------------------------------------------------------------------- signals and the session


@contextlib.contextmanager
def keep_handlers(signals: Sequence[int]) -> Iterator[None]:
    """Inside (``ray.init``): Ray may not replace the driver's SIGTERM handler with its own
    (``ray._private.utils.set_sigterm_handler``, private), which raises ``SystemExit`` wherever
    the main thread is; afterwards the driver's handlers for ``signals`` are installed again at
    the C level: Ray's C++ core installs its own crash handler for SIGTERM (abseil's, which
    prints and aborts) behind Python's back."""
    import ray._private.utils as ray_utils

    original = ray_utils.set_sigterm_handler
    ray_utils.set_sigterm_handler = lambda _handler: None
    saved = {s: signal.getsignal(s) for s in signals}
    try:
        yield
    finally:
        ray_utils.set_sigterm_handler = original
        for s, h in saved.items():  # again, even if Python believes they are in place
            if h is not None:
                signal.signal(s, h)


def session_dir() -> str | None:
    """The session directory of the Ray this process started (None: not known). No public
    API names it: ``ray._private.worker._global_node``."""
    import ray

    node = getattr(ray._private.worker, "_global_node", None)
    return node.get_session_dir_path() if node is not None else None


# --------------------------------------------------------------------------- Tune's state and logs

# What Tune raises when it cannot save or read back its own state (error files truncated on a
# full disk): the sweep then reports from the run directories, which are the record. (The
# only pickles Tune reads back are the error files this driver wrote in this run: the state
# of an earlier run is removed before Tune starts, see sweeps.experiment.clear_tune_state.)
UNREADABLE_STATE = (OSError, EOFError, pickle.UnpicklingError)

# Ray's loggers that report the storage failing (syncing Tune's state, deleting a copy), and the
# results callback's: a whole traceback, or the same line, again at every sync period.
QUIETED_LOGGERS = ("ray.tune.execution.experiment_state", "ray.train._internal.syncer", "ray.train._internal.storage",
                   "sweeps.callback")


def quiet_ray_logs() -> "OneLineOnce":
    """Tune's failure to save or sync its state (a full disk: every few seconds) as one line,
    once, not a traceback each time: the run directories are the record, and the summary says
    what stopped. Tune's advice after a stop (``Tuner.restore``) is dropped: it is not how a
    sweep resumes (the summary says how). ResultGrid's warning that Tune's per-trial
    ``result.json`` is missing is dropped too: ``TUNE_ENV`` turns those files off."""
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    quiet = OneLineOnce()
    for name in QUIETED_LOGGERS:
        logger = logging.getLogger(name)
        for old in [f for f in logger.filters if isinstance(f, OneLineOnce)]:  # one per driver
            logger.removeFilter(old)
        logger.addFilter(quiet)
    tune_logger = logging.getLogger("ray.tune.tune")
    if _no_restore_advice not in tune_logger.filters:
        tune_logger.addFilter(_no_restore_advice)
    return quiet


def quiet_trial_logs() -> None:
    """In a trial: not a line per checkpoint copy from ``ray.train``."""
    logging.getLogger("ray.train").setLevel(logging.WARNING)


def _no_restore_advice(record: logging.LogRecord) -> bool:
    return "Tuner.restore" not in record.getMessage()


class OneLineOnce(logging.Filter):
    """A logging filter: a record with an exception, or with a traceback in its text, becomes
    its first line and the exception's last line; the same line again is dropped."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            e = record.exc_info[1]
            text = f"{text.strip()} {type(e).__name__}: {error_line(str(e))}"
        elif "Traceback (most recent call last)" in text:
            lines = [line for line in text.splitlines() if line.strip()]
            text = f"{lines[0].strip()} {lines[-1].strip()}"
        text = " ".join(text.split())
        record.msg, record.args, record.exc_info, record.exc_text = text, None, None, None
        if text in self.seen:
            return False
        self.seen.add(text)
        return True


# --------------------------------------------------------------------------- the live table's pieces of Ray
# sweeps.reporter draws its table with Ray's own table code, so that the full table is Ray's;
# these are private in Ray 2.60 (no public API renders a trial's row or Ray's status lines).


def tabulate(*args: Any, **kwargs: Any) -> str:
    """The tabulate Ray vendors (``ray._private.thirdparty.tabulate``), as Ray's table uses it."""
    from ray._private.thirdparty.tabulate.tabulate import tabulate as ray_tabulate

    return ray_tabulate(*args, **kwargs)


def trial_location(trial: Any, result: dict[str, Any]) -> Any:
    """Where a trial runs (``ip:pid``), as Ray's table shows it."""
    from ray.tune.progress_reporter import _get_trial_location

    return _get_trial_location(trial, result)


def time_passed(start: float, now: float) -> str:
    """Ray's "Current time ... running for ..." line."""
    from ray.tune.progress_reporter import _time_passed_str

    return _time_passed_str(start, now)


def trial_counts(trials: list[Any], **kwargs: Any) -> str:
    """Ray's "Number of trials: ... (... RUNNING)" lines."""
    from ray.tune.progress_reporter import _trial_progress_str

    return _trial_progress_str(trials, **kwargs)


def no_location() -> Any:
    """The location of a trial that runs nowhere (a pack finished before this driver)."""
    from ray.tune.experiment.trial import _Location

    return _Location()
