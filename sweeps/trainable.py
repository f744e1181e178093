"""The Ray Tune trainable: one Tune trial trains one pack of grid points.

A pack is one or more grid points that differ only in seed and weight decay
(``sweeps.spec.make_packs``; ``pack: 1`` makes every pack a single grid point). Its trial
trains them together with ``icl.train.train_packed``, each into its own run directory
``STORAGE/NAME/<trial dirname>/run`` (:class:`~icl.train.rundir.RunDir`), and reports every
evaluation step to Tune with a checkpoint holding one sub-directory per member.

Why the trainer writes its run directories into the experiment (storage) rather than into
Ray's node-local trial working directory: a run survives anything that kills the driver or a
node, and the trainer resumes from its own newest checkpoint even when Ray's experiment
state is older (Tune saves it only every few seconds). Ray's checkpoint, from
``tune.get_checkpoint()``, is installed into a run directory when it is newer than what is
there (a run directory moved or lost).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import shutil
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Sequence

from icl.config import build_config
from icl.io import atomic_write, writing_to
from icl.layout import STAGING_PREFIX, ExperimentDir
from icl.metrics import EVAL_S, STEP, STEPS_PER_S
from icl.train.rundir import RunDir
from sweeps import results as res
from sweeps.faults import Fault, maybe_inject
from sweeps.progress import pack_progress
from sweeps.spec import PackSpec, TrialSpec


class PackReporter:
    """One ``tune.report`` per evaluation step of a pack, from ``train_packed``'s per-model
    ``on_eval`` calls.

    A step is reported once every member expected at it has evaluated it (those whose run
    started this attempt below that step: a member brought level in a catch-up, or already
    finished, is not), or when a row of another step arrives (a model that diverged stops
    evaluating), or at the end. The metrics are the step, the number of models in the row
    and each metric's mean over them (the per-model rows are in the run directories and
    results.csv), and for the live table (``sweeps.progress``) every member's latest step
    and accuracies and the trial's rate in model-steps/s; the checkpoint is a directory with one sub-directory per member, a copy of
    its run's checkpoint of that step (those that have one), so a restored trial can install
    each member's checkpoint into its run directory.
    """

    def __init__(self, trial_ids: Sequence[str], runs: Sequence[RunDir], starts: Sequence[int], staging: Path) -> None:
        self.trial_ids = list(trial_ids)
        self.runs = list(runs)
        self.starts = list(starts)
        self.staging = staging
        self.step: int | None = None
        self.rows: dict[int, dict[str, float]] = {}
        self.reported = False
        # for the progress table: every member's latest row (a finished member is not evaluated
        # again) and the model-steps trained this attempt over the time they took
        self.latest = {k: row for k, run in enumerate(self.runs) if (row := _last_row(run))}
        self.at = dict(enumerate(self.starts))  # each member's step as last counted
        self.trained = 0
        self.seconds = 0.0
        self.clock: float | None = None

    def add(self, k: int, row: dict[str, float]) -> None:
        step = int(row[STEP])
        if self.step is not None and step != self.step:
            self.flush()
        self.step = step
        self.rows[k] = row
        expected = {i for i, start in enumerate(self.starts) if start < step}
        if expected <= set(self.rows):
            self.flush()

    def flush(self) -> None:
        if self.step is None:
            return
        step, rows = self.step, self.rows
        self.step, self.rows = None, {}
        ckpts = {self.trial_ids[k]: run.checkpoint_dir(step) for k, run in enumerate(self.runs)}
        metrics = pack_metrics(step, list(rows.values()))
        rate = self.rate(step, rows)
        self.latest.update(rows)
        metrics.update(pack_progress({self.trial_ids[k]: r for k, r in self.latest.items()}, rate))
        self.report(metrics, {k: v for k, v in ckpts.items() if v.is_dir()})

    def rate(self, step: int, rows: dict[int, dict[str, float]]) -> float | None:
        """Model-steps per second of wall time since training started in this attempt. Until
        the first report the time comes from the rows (the training rate and the evaluation
        times), so that loading the data and building the models do not count; then the clock."""
        trained = sum(step - self.at[k] for k in rows)
        now = time.monotonic()
        if self.clock is None:
            first = next(iter(rows.values()))
            self.seconds = (step - min(self.at[k] for k in rows)) / max(float(first.get(STEPS_PER_S, 0.0)), 1e-9)
            self.seconds += sum(float(r.get(EVAL_S, 0.0)) for r in rows.values())
        else:
            self.seconds += now - self.clock
        self.clock = now
        self.trained += trained
        self.at.update({k: step for k in rows})
        return self.trained / self.seconds if self.seconds > 0 else None

    def report(self, metrics: dict[str, float], ckpts: dict[str, Path]) -> None:
        from ray import tune

        self.reported = True
        if not ckpts:
            tune.report(metrics)
            return
        tmp = self.staging / f"{STAGING_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            for trial_id, src in ckpts.items():
                shutil.copytree(src, tmp / trial_id, copy_function=_link_or_copy)
            # Tune copies the directory to its checkpoint_* on storage before it returns
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(tmp)))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _link_or_copy(src: str, dst: str) -> None:
    """Checkpoint files are never rewritten in place: a hard link is a safe, free copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _last_row(run: RunDir) -> dict[str, float]:
    """A run's last metrics row (numbers), or {} if it has none yet."""
    header, rows = run.metrics_table()
    try:
        return {c: float(v) for c, v in zip(header, rows[-1])} if rows else {}
    except ValueError:  # a cell that is not a number: the table will show none
        return {}


def pack_metrics(step: int, rows: Sequence[dict[str, float]]) -> dict[str, float]:
    """What a pack reports to Tune at one step: the step, the number of models and each
    metric's mean over them."""
    out: dict[str, float] = {STEP: step, "models": len(rows)}
    for key in rows[0] if rows else ():
        if key != STEP:
            values = [float(r[key]) for r in rows if key in r]
            out[key] = sum(values) / len(values)
    return out


def run_pack(
    pack_id: str,
    exp_dir: str,
    table: dict[str, tuple[str, dict[str, Any]]],
    packs: dict[str, tuple[str, tuple[str, ...]]],
    faults: dict[str, Fault],
    heads: bool = False,
) -> None:
    """Body of one Tune trial: train the pack's grid points together, each into its own run
    directory; report every evaluation step to Tune. A model that diverges does not stop the
    others; the trial then fails with a message naming it (each diverged model's own error
    is written to ``diverged.txt`` in its trial directory), so Tune retries it as it retries
    a crashed trial (a retry trains only what is unfinished) and reports it at the end. With
    ``heads`` (the spec's ``heads: true``) every new checkpoint's heads are attributed
    (``icl.circuits.update_run``) as it is written: runs keep only their newest checkpoints."""
    import ray
    from ray import tune

    from icl.train import PackTrainingDiverged, TrainingDiverged, train_packed

    logging.getLogger("ray.train").setLevel(logging.WARNING)  # not a line per checkpoint copy

    pack_dirname, members = packs[pack_id]
    exp = ExperimentDir(exp_dir)
    dirnames = [table[m][0] for m in members]
    trial_dirs = [exp.model_dir(d) for d in dirnames]
    runs = [RunDir(exp.run_dir(d)) for d in dirnames]
    cfgs = [build_config(table[m][1]) for m in members]

    ckpt = tune.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as src:
            for m, run in zip(members, runs):
                if (Path(src) / m).is_dir():
                    run.install(Path(src) / m)
    starts = [run.latest_step() for run in runs]
    node = ray.get_runtime_context().get_node_id()
    for m, d, start in zip(members, dirnames, starts):
        exp.model_dir(d).mkdir(parents=True, exist_ok=True)
        exp.diverged(d).unlink(missing_ok=True)  # a previous attempt's; this one may not diverge
        record = {
            "attempt": len(res.attempts(exp.path, d)) + 1,
            "resumed_from_step": start,
            "pack": pack_id,
            "node_id": node,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "time": _dt.datetime.now().isoformat(timespec="seconds"),
        }
        with writing_to(exp.attempts(d)), open(exp.attempts(d), "a") as f:
            f.write(json.dumps(record) + "\n")

    staging = exp.pack_dir(pack_dirname)
    staging.mkdir(parents=True, exist_ok=True)
    for old in staging.glob(f"{STAGING_PREFIX}*"):  # left by an attempt killed while reporting
        shutil.rmtree(old, ignore_errors=True)
    reporter = PackReporter(members, runs, starts, staging)

    def on_eval(k: int, row: dict[str, float], checkpoint_dir: Path | None) -> None:
        reporter.add(k, row)
        if heads and checkpoint_dir is not None:
            attribute_heads(runs[k], cfgs[k])
        maybe_inject(trial_dirs[k], members[k], faults.get(members[k]), int(row[STEP]))

    try:
        final = train_packed(cfgs, [run.path for run in runs], on_eval=on_eval, progress=False)
    except PackTrainingDiverged as e:
        reporter.flush()
        for k, message in sorted(e.diverged.items()):
            atomic_write(exp.diverged(dirnames[k]), f"TrainingDiverged: {message}\n")
        names = "; ".join(f"{members[k]}: {msg}" for k, msg in sorted(e.diverged.items()))
        raise TrainingDiverged(
            f"{len(e.diverged)} of {len(members)} models of pack {pack_id} diverged: {names}"
        ) from None
    reporter.flush()
    if not reporter.reported:  # every run was already complete (e.g. the driver died as the
        # trial finished): hand Tune the final checkpoints, so its view ends where the runs did
        last = {m: run.latest_checkpoint() for m, run in zip(members, runs)}
        step = max((int(r.get(STEP, 0)) for r in final), default=0)
        metrics = pack_metrics(step, [r for r in final if r])
        metrics.update(pack_progress({m: r for m, r in zip(members, final) if r}, None))
        reporter.report(metrics, {m: p for m, p in last.items() if p})


def attribute_heads(run: RunDir, cfg: Any) -> None:
    """Head attribution of the run's new checkpoints; analysis only, so a failure is reported
    and training goes on (``icl-analyze heads`` can redo it later)."""
    from icl.circuits import update_run
    from icl.machine import resolve_device

    try:
        update_run(run.path, device=resolve_device(cfg.train.device))
    except Exception as e:  # noqa: BLE001 - analysis must never stop a trial
        print(f"warning: head attribution of {run.path} failed ({type(e).__name__}: {e}); "
              f"later: icl-analyze heads {run.path}", file=sys.stderr)


def make_trainable(exp_dir: Path, trials: Sequence[TrialSpec], packs: Sequence[PackSpec],
                   faults: dict[str, Fault], heads: bool = False) -> Callable[[dict[str, Any]], None]:
    """A Tune function trainable closing over the trial table (config per trial id) and the
    packs (``config["trial"]`` is a pack id).

    Why a closure and not the configs in Tune's ``param_space``: Tune's saved state then
    holds only pack ids, and a restore gets the table rebuilt from the (identical, checked)
    spec with this machine's runtime paths.
    """
    table = {t.trial_id: (t.dirname, t.config) for t in trials}
    pack_table = {p.pack_id: (p.dirname, tuple(p.trial_ids)) for p in packs}
    exp = str(exp_dir)

    def icl_pack(config: dict[str, Any]) -> None:
        run_pack(config["trial"], exp, table, pack_table, faults, heads)

    return icl_pack


class TrialNames:
    """Tune trial name / directory name from our stable pack id (picklable for tuner.pkl)."""

    def __init__(self, dirnames: dict[str, str], *, dirs: bool) -> None:
        self.dirnames = dirnames
        self.dirs = dirs

    def __call__(self, trial: Any) -> str:
        pack_id = trial.config["trial"]
        return self.dirnames[pack_id] if self.dirs else pack_id
