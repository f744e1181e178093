"""Fault injection for the sweep tests: make chosen trials raise at chosen steps.

``ICL_SWEEP_FAULTS="t001@100,t002@50x*"`` is read on the driver and carried to the trials in
the trainable's closure, so it works on any cluster (a worker's environment is the raylet's,
not the driver's shell).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from icl.errors import UserError
from icl.io import atomic_write
from icl.layout import FAULT_COUNTER
from sweeps.spec import TrialSpec

FAULTS_ENV = "ICL_SWEEP_FAULTS"


@dataclass(frozen=True)
class Fault:
    """Testing hook: a trial raises right after reporting its first evaluation at or after
    ``step`` (in each attempt), until it has done so ``times`` times."""

    step: int
    times: int | None  # None = every attempt


def parse_faults(text: str | None, trials: Sequence[TrialSpec]) -> dict[str, Fault]:
    """``ICL_SWEEP_FAULTS="t001@100,t002@50x*"``: t001 fails once, at step 100; t002 fails in
    every attempt (at step 50, or at the first evaluation after the checkpoint it resumed
    from). Read on the driver and carried to the trials, so it works on any cluster."""
    if not text:
        return {}
    ids = {t.trial_id for t in trials}
    faults: dict[str, Fault] = {}
    for item in text.split(","):
        m = re.fullmatch(r"\s*(\w+)@(\d+)(?:x(\d+|\*))?\s*", item)
        if not m:
            raise UserError(f"{FAULTS_ENV} item {item!r} must look like TRIAL@STEP or TRIAL@STEPxTIMES (x* = always)")
        trial_id, step, times = m.group(1), int(m.group(2)), m.group(3)
        if trial_id not in ids:
            raise UserError(f"{FAULTS_ENV} names trial {trial_id!r}, which this sweep does not have")
        faults[trial_id] = Fault(step, None if times == "*" else int(times or 1))
    return faults


def maybe_inject(trial_dir: Path, trial_id: str, fault: Fault | None, step: int) -> None:
    if fault is None or step < fault.step:
        return
    counter = trial_dir / FAULT_COUNTER
    done = int(counter.read_text()) if counter.exists() else 0
    if fault.times is not None and done >= fault.times:
        return
    atomic_write(counter, str(done + 1))
    raise RuntimeError(f"injected fault #{done + 1} in trial {trial_id} at step {step} ({FAULTS_ENV})")
