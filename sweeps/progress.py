"""What the live table of a running sweep knows, without Ray: what a pack reports for it,
how many trials run at once, and the sweep's ETA.

A pack reports one ``tune.report`` per evaluation step (``sweeps.trainable.PackReporter``);
:func:`pack_progress` adds each member's latest step and accuracies under ``per_model`` and
the trial's measured rate (model-steps/s). The driver's reporter (``sweeps.reporter``) turns
each Tune trial into one row per model and sums the sweep up with :class:`SweepTally`: models
finished, model-steps done, the rate, and the sweep's ETA (:func:`finish_time`: the pending
trials at the mean rate of the trials that reported one, as many at a time as
:func:`concurrency` allows). ``sweeps.estimate`` plans a whole sweep with the same two
functions.

Kept apart from ``sweeps.reporter`` because the trainable imports it and ``--dry-run`` must
not pay for importing Ray Tune.
"""

from __future__ import annotations

import heapq
import math
from typing import Any, Mapping, Sequence

from icl.train.progress import format_duration
from sweeps.spec import Resources

PER_MODEL = "per_model"  # in a pack's report: model id -> its latest step and accuracies
RATE = "model_steps_per_s"  # in a pack's report: the trial's measured rate
# The accuracies shown, metric -> column; a metric the trainer does not report is not shown
# (the peer evaluators' columns appear once the trainer has them). "in ctx": the argmax over
# the labels in context (the peers' in_context_acc) beside the all-label one; flip IWL in ctx
# is 1 - flip ctx in ctx, so it is left out.
ACCURACIES = {
    "icl_acc": "ICL",
    "iwl_acc": "IWL",
    "train_acc": "train acc",
    "ciwl_acc": "CIWL",
    "ciwl_acc_inctx": "CIWL in ctx",
    "flip_icl_ctx_acc": "flip ctx",
    "flip_icl_ctx_acc_inctx": "flip ctx in ctx",
    "flip_icl_iwl_acc": "flip IWL",
}


def pack_progress(rows: Mapping[str, Mapping[str, float]], rate: float | None) -> dict[str, Any]:
    """What a pack adds to its report for the table: each member's latest step and
    accuracies (``rows``: model id -> its latest metrics row) and the trial's rate."""
    keep = ("step", *ACCURACIES)
    out: dict[str, Any] = {PER_MODEL: {m: {k: float(r[k]) for k in keep if k in r} for m, r in rows.items()}}
    if rate is not None:
        out[RATE] = rate
    return out


def concurrency(need: Resources, cpus: float, gpus: float, max_concurrent: int | None) -> int:
    """How many trials run at once on ``cpus`` + ``gpus`` (one node's view: every trial's
    reservation must fit), at least 1."""
    fits = [math.floor(cpus / need.cpu + 1e-9)]
    if need.gpu > 0:
        fits.append(math.floor(gpus / need.gpu + 1e-9))
    if max_concurrent:
        fits.append(max_concurrent)
    return max(1, min(fits))


def finish_time(running: Sequence[float], pending: Sequence[float], slots: int) -> float:
    """When the last trial ends: the running ones end after ``running`` seconds; each pending
    one (``pending``: its duration, in start order) starts on the first slot to free up."""
    free = sorted(list(running) + [0.0] * max(0, slots - len(running)))
    heapq.heapify(free)
    end = max(free, default=0.0)
    for duration in pending:
        start = heapq.heappop(free)
        heapq.heappush(free, start + duration)
        end = max(end, start + duration)
    return end


class SweepTally:
    """The sweep's line, gathered trial by trial: models finished, model-steps done, and what
    is left of the running and pending trials."""

    def __init__(self) -> None:
        self.models = 0
        self.steps = 0
        self.running: list[tuple[float, int, float]] = []  # (seconds left or nan, model-steps left, rate)
        self.pending: list[int] = []  # model-steps left per trial yet to (re)start
        self.rates: list[float] = []

    def add(self, status: str, left: int, rate: float | None, age: float) -> float | None:
        """Count one Tune trial; returns its ETA in seconds if it is running and has a rate."""
        eta = None
        if rate:
            self.rates.append(rate)
            if status == "RUNNING":
                eta = max(0.0, left / rate - age)
        if status == "RUNNING":
            self.running.append((math.nan if eta is None else eta, left, rate or 0.0))
        elif status in ("PENDING", "PAUSED") and left:
            self.pending.append(left)
        return eta

    def line(self, n_models: int, total: int, slots: int) -> str:
        text = (f"Sweep: {self.models}/{n_models} models finished, {self.steps:,}/{total:,} model-steps "
                f"({100 * self.steps / max(total, 1):.0f}%)")
        speed = sum(rate for _, _, rate in self.running)
        if speed:
            text += f", {speed:.1f} model-steps/s"
        if not self.running and not self.pending:
            return text
        if not self.rates:
            return text + ", ETA after the first evaluations"
        mean = sum(self.rates) / len(self.rates)
        running = [eta if not math.isnan(eta) else left / mean for eta, left, _ in self.running]
        slots = max(slots, len(running))
        end = finish_time(running, [left / mean for left in self.pending], slots)
        return text + f", ETA {format_duration(end)} ({slots} trial{'s' if slots > 1 else ''} at a time)"
