"""Fault injection for the sweep tests: make chosen models' trials raise at chosen steps.

A wrapper only tests install: :class:`Faults` is the trainable's ``after_eval`` hook
(:func:`sweeps.trainable.train_pack`), given to the driver by ``tests/sweeps/faulty_sweep.py``
(``icl-sweep`` with ``ICL_SWEEP_FAULTS="t001@100,t002@50x*"`` read there); ``icl-sweep``
itself never reads that variable. The hook travels to the trials inside the trainable (it
is picklable), so it works on any cluster.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Sequence

from icl.errors import UserError
from icl.io import atomic_write
from icl.layout import FAULT_COUNTER
from sweeps.spec import PackSpec

FAULTS_ENV = "ICL_SWEEP_FAULTS"  # read by tests/sweeps/faulty_sweep.py


@dataclass(frozen=True)
class Fault:
    """A model's trial raises right after reporting the model's first evaluation at or after
    ``step`` (in each attempt), until it has done so ``times`` times."""

    step: int
    times: int | None  # None = every attempt


@dataclass(frozen=True)
class Faults:
    """The trainable's ``after_eval`` hook: raises where :class:`Fault` says, counting the
    faults injected in the model's directory (so a retried trial knows how many it had)."""

    by_model: Mapping[str, Fault]

    def __call__(self, pack: PackSpec, k: int, row: Mapping[str, float]) -> None:
        model = pack.models[k]
        fault, step = self.by_model.get(model.trial_id), int(row["step"])
        if fault is None or step < fault.step:
            return
        counter = pack.exp.model_dir(model) / FAULT_COUNTER
        done = int(counter.read_text()) if counter.exists() else 0
        if fault.times is not None and done >= fault.times:
            return
        atomic_write(counter, str(done + 1))
        raise RuntimeError(f"injected fault #{done + 1} in trial {model.trial_id} at step {step} ({FAULTS_ENV})")


def parse_faults(text: str | None, model_ids: Sequence[str]) -> Faults:
    """``"t001@100,t002@50x*"``: t001 fails once, at step 100; t002 fails in every attempt (at
    step 50, or at the first evaluation after the checkpoint it resumed from)."""
    faults: dict[str, Fault] = {}
    for item in text.split(",") if text else []:
        m = re.fullmatch(r"\s*(\w+)@(\d+)(?:x(\d+|\*))?\s*", item)
        if not m:
            raise UserError(f"{FAULTS_ENV} item {item!r} must look like TRIAL@STEP or TRIAL@STEPxTIMES (x* = always)")
        trial_id, step, times = m.group(1), int(m.group(2)), m.group(3)
        if trial_id not in model_ids:
            raise UserError(f"{FAULTS_ENV} names trial {trial_id!r}, which this sweep does not have")
        faults[trial_id] = Fault(step, None if times == "*" else int(times or 1))
    return Faults(faults)
