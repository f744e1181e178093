"""SIGINT (Ctrl-C), SIGTERM (SLURM preemption, ``kill``) and SIGUSR1 (the SLURM scripts' time
limit) in the sweep driver: a stop at any moment, Ray's start included, that leaves the
experiment resumable and prints no traceback.

Why not Python's default (KeyboardInterrupt wherever the main thread happens to be) or Ray's
(``ray.init`` installs a SIGTERM handler that raises ``SystemExit`` wherever the main thread
is): an exception raised inside Ray's start, inside ``ray.shutdown`` or inside a lock held by
``logging`` leaves Ray half started or half stopped, was swallowed (the sweep then ran to the
end and exited 0), or came out as "Exception ignored ... SystemExit" tracebacks. So the
driver's handler (:func:`install`) acts in one of two ways:

- **deferred** (setting up, starting and stopping Ray, writing the tables): the signal is
  noted and acted on at the next safe point (:func:`check` raises ``KeyboardInterrupt``
  there, which the driver turns into a clean stop, exit 130); a second signal does not wait;
- **during Tune's run** (:func:`tune_phase`): it asks Tune for its graceful stop (Tune's own
  SIGUSR1 handler: Tune stops the trials and returns), also for a signal that came just
  before Tune installed that handler (:func:`poll`, from the results callback's first step).

While Ray starts, Ray must not install its own SIGTERM handler (``sweeps.ray_adapter.keep_handlers``).
"""

from __future__ import annotations

import contextlib
import signal
import sys
from typing import Any, Iterator

# SIGUSR1: the SLURM scripts' "time limit ahead" (Tune's own graceful stop while it runs)
SIGNALS = (signal.SIGINT, signal.SIGTERM, *((signal.SIGUSR1,) if hasattr(signal, "SIGUSR1") else ()))
_pending: int | None = None  # the signal noted, not acted on yet
_forwarded = False  # Tune was asked to stop
_in_tune = False
_immediate = False  # safe to interrupt anywhere (the analysis at the end): no deferring
_stopping = False  # Ray is being shut down: more signals are only noted


def handler(signum: int, frame: Any) -> None:
    global _pending, _forwarded
    if _stopping:
        _pending = signum if _pending is None else _pending
        return
    if _in_tune:
        stop = _tune_stop()
        if signum == signal.SIGINT and stop is not None:
            raise KeyboardInterrupt  # Tune took the first Ctrl-C (and gave SIGINT back): stop now
        if stop is not None and not _forwarded:
            stop(signal.SIGUSR1, frame)
            _pending, _forwarded = signum, True
            return
        if _forwarded:
            raise KeyboardInterrupt  # a second signal: stop now
    if _pending is not None or _immediate:
        raise KeyboardInterrupt
    _pending = signum  # acted on at the next safe point (check, or poll once Tune runs)


def _tune_stop() -> Any:
    """Tune's graceful-stop handler (its SIGUSR1 handler), once its run has installed it."""
    stop = signal.getsignal(signal.SIGUSR1) if hasattr(signal, "SIGUSR1") else None
    return stop if callable(stop) and stop is not handler else None


def poll() -> None:
    """Forward a signal noted before Tune could take it (called from within Tune's loop)."""
    global _forwarded
    stop = _tune_stop()
    if _in_tune and _pending is not None and not _forwarded and stop is not None:
        stop(signal.SIGUSR1, None)
        _forwarded = True


def pending() -> int | None:
    return _pending


def check() -> None:
    """At a safe point: a signal noted meanwhile stops the sweep now."""
    if _pending is not None:
        raise KeyboardInterrupt


@contextlib.contextmanager
def install() -> Iterator[None]:
    """The driver's handler for ``SIGNALS`` while inside; the previous ones after."""
    global _pending, _forwarded, _in_tune, _immediate, _stopping
    _pending, _forwarded, _in_tune, _immediate, _stopping = None, False, False, False, False
    if sys.platform == "win32":  # pragma: no cover - the driver runs on Linux
        yield
        return
    previous = {s: signal.signal(s, handler) for s in SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextlib.contextmanager
def tune_phase() -> Iterator[None]:
    """Tune's run: SIGTERM (and SIGINT, until Tune takes it over) asks Tune to stop
    gracefully. Afterwards the driver's handler is back for both (Tune leaves its own
    installed, which would swallow a Ctrl-C during the analysis)."""
    global _in_tune
    _in_tune = True
    if _pending is not None:
        raise KeyboardInterrupt
    try:
        yield
    finally:
        _in_tune = False
        for s in SIGNALS:
            signal.signal(s, handler)


@contextlib.contextmanager
def immediate() -> Iterator[None]:
    """Inside (work that may stop anywhere: the analysis writes its report atomically), a
    signal raises ``KeyboardInterrupt`` at once; one noted before does so on entry."""
    global _immediate
    check()
    _immediate = True
    try:
        yield
    finally:
        _immediate = False


@contextlib.contextmanager
def stopping() -> Iterator[None]:
    """Inside (``ray.shutdown``: interrupted, it leaves Ray half stopped), signals are only noted."""
    global _stopping
    was, _stopping = _stopping, True
    try:
        yield
    finally:
        _stopping = was
