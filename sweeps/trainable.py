"""The Ray Tune trainable: one Tune trial trains one pack of models.

A pack is one or more grid points that differ only in seed and weight decay
(``sweeps.spec.make_packs``; ``pack: 1`` makes every pack a single grid point); Tune receives
each as a frozen :class:`~sweeps.spec.PackSpec` (its models' configs and run directories).
Its trial trains them together with ``icl.train.train_packed``, each into its own run
directory ``STORAGE/NAME/<model dirname>/run``, and reports every evaluation step to Tune with
a checkpoint holding one sub-directory per model.

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
import os
import shutil
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Sequence

from icl.config import Config
from icl.io import atomic_write, writing_to
from icl.layout import STAGING_PREFIX
from icl.metrics import EVAL_S, STEP, STEPS_PER_S
from icl.train.rundir import RunDir
from sweeps import results as res
from sweeps.progress import pack_progress
from sweeps.ray_adapter import quiet_trial_logs
from sweeps.spec import PackSpec

# Called after each model's evaluation has been reported, with the pack, the model's index
# and its row; only tests install one (sweeps.faults).
AfterEval = Callable[[PackSpec, int, dict[str, float]], None]


class PackReporter:
    """One ``tune.report`` per evaluation step of a pack, from ``train_packed``'s per-model
    ``on_eval`` calls.

    A step is reported once every member expected at it has evaluated it (those whose run
    started this attempt below that step: a member brought level in a catch-up, or already
    finished, is not), or when a row of another step arrives (a model that diverged stops
    evaluating), or at the end. The metrics are the step, the number of models in the row
    and each metric's mean over them (the per-model rows are in the run directories and
    results.csv), and for the live table (``sweeps.progress``) every member's latest step
    and accuracies and the trial's rate in model-steps/s; the checkpoint is a directory with
    one sub-directory per member, a copy of its run's checkpoint of that step (those that have
    one), so a restored trial can install each member's checkpoint into its run directory.
    """

    def __init__(self, pack: PackSpec, runs: Sequence[RunDir], starts: Sequence[int]) -> None:
        self.trial_ids = list(pack.trial_ids)
        self.runs = list(runs)
        self.starts = list(starts)
        self.staging = pack.exp.pack_dir(pack)
        self.staging.mkdir(parents=True, exist_ok=True)
        for old in self.staging.glob(f"{STAGING_PREFIX}*"):  # left by an attempt killed while reporting
            shutil.rmtree(old, ignore_errors=True)
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

    def finish(self, final: Sequence[dict[str, float]]) -> None:
        """The last step's report; where the runs were all complete already (the driver died
        as the trial finished), the final checkpoints, so Tune's view ends where the runs did."""
        self.flush()
        if self.reported:
            return
        last = {m: run.latest_checkpoint() for m, run in zip(self.trial_ids, self.runs)}
        step = max((int(r.get(STEP, 0)) for r in final), default=0)
        metrics = pack_metrics(step, [r for r in final if r])
        metrics.update(pack_progress({m: r for m, r in zip(self.trial_ids, final) if r}, None))
        self.report(metrics, {m: p for m, p in last.items() if p})

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


def train_pack(pack: PackSpec, heads: bool = False, after_eval: AfterEval | None = None) -> None:
    """Body of one Tune trial: train the pack's models together, each into its own run
    directory; report every evaluation step to Tune. A model that diverges does not stop the
    others; the trial then fails with a message naming it (each diverged model's own error
    is written to ``diverged.txt`` in its directory), so Tune retries it as it retries a
    crashed trial (a retry trains only what is unfinished) and reports it at the end. With
    ``heads`` (the spec's ``heads: true``) every new checkpoint's heads are attributed
    (``icl.circuits.update_run``) as it is written: runs keep only their newest checkpoints."""
    from icl.train import PackTrainingDiverged, train_packed

    quiet_trial_logs()
    runs = [RunDir(d) for d in pack.run_dirs]
    starts = install_tune_checkpoint(pack, runs)
    record_attempt(pack, starts)
    reporter = PackReporter(pack, runs, starts)

    def on_eval(k: int, row: dict[str, float], checkpoint_dir: Path | None) -> None:
        reporter.add(k, row)
        if heads and checkpoint_dir is not None:
            attribute_heads(runs[k], pack.configs[k])
        if after_eval is not None:
            after_eval(pack, k, row)

    try:
        final = train_packed(pack.configs, pack.run_dirs, on_eval=on_eval, progress=False)
    except PackTrainingDiverged as e:
        reporter.flush()
        raise diverged(pack, e.diverged) from None
    reporter.finish(final)


def install_tune_checkpoint(pack: PackSpec, runs: Sequence[RunDir]) -> list[int]:
    """Install each model's checkpoint from Tune's (a restored trial's) where it is newer than
    its run's; returns each run's newest checkpoint step, where it resumes."""
    from ray import tune

    ckpt = tune.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as src:
            for m, run in zip(pack.trial_ids, runs):
                if (Path(src) / m).is_dir():
                    run.install(Path(src) / m)
    return [run.latest_step() for run in runs]


def record_attempt(pack: PackSpec, starts: Sequence[int]) -> None:
    """One line per model in its ``attempts.jsonl``: this start of its pack's trial (the node,
    the process, the step it resumes from); a previous attempt's ``diverged.txt`` is removed."""
    import ray

    exp, node = pack.exp, ray.get_runtime_context().get_node_id()
    for model, start in zip(pack.models, starts):
        exp.model_dir(model).mkdir(parents=True, exist_ok=True)
        exp.diverged(model).unlink(missing_ok=True)  # a previous attempt's; this one may not diverge
        record = {
            "attempt": len(res.attempts(exp.path, model)) + 1,
            "resumed_from_step": start,
            "pack": pack.pack_id,
            "node_id": node,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "time": _dt.datetime.now().isoformat(timespec="seconds"),
        }
        with writing_to(exp.attempts(model)), open(exp.attempts(model), "a") as f:
            f.write(json.dumps(record) + "\n")


def diverged(pack: PackSpec, messages: dict[int, str]) -> Exception:
    """The trial's error for the models that diverged, each one's own written to its ``diverged.txt``."""
    from icl.train import TrainingDiverged

    for k, message in sorted(messages.items()):
        atomic_write(pack.exp.diverged(pack.models[k]), f"TrainingDiverged: {message}\n")
    names = "; ".join(f"{pack.trial_ids[k]}: {msg}" for k, msg in sorted(messages.items()))
    return TrainingDiverged(f"{len(messages)} of {len(pack.models)} models of pack {pack.pack_id} diverged: {names}")


def attribute_heads(run: RunDir, cfg: Config) -> None:
    """Head attribution of the run's new checkpoints; analysis only, so a failure is reported
    and training goes on (``icl-analyze heads`` can redo it later)."""
    from icl.circuits import update_run
    from icl.machine import resolve_device

    try:
        update_run(run.path, device=resolve_device(cfg.train.device))
    except Exception as e:  # noqa: BLE001 - analysis must never stop a trial
        print(f"warning: head attribution of {run.path} failed ({type(e).__name__}: {e}); "
              f"later: icl-analyze heads {run.path}", file=sys.stderr)


def make_trainable(packs: Sequence[PackSpec], heads: bool = False,
                   after_eval: AfterEval | None = None) -> Callable[[dict[str, Any]], None]:
    """A Tune function trainable over the packs: Tune's ``config["trial"]`` is a pack id, the
    closure holds the frozen pack specs Tune ships to the workers with it."""
    by_id = {p.pack_id: p for p in packs}

    def icl_pack(config: dict[str, Any]) -> None:
        train_pack(by_id[config["trial"]], heads, after_eval)

    return icl_pack


class TrialNames:
    """Tune trial name / directory name from our stable pack id (picklable for tuner.pkl)."""

    def __init__(self, dirnames: dict[str, str], *, dirs: bool) -> None:
        self.dirnames = dirnames
        self.dirs = dirs

    def __call__(self, trial: Any) -> str:
        pack_id = trial.config["trial"]
        return self.dirnames[pack_id] if self.dirs else pack_id
