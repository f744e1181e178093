"""The sweep driver: check everything, start or join Ray, run (or resume) the packs on Ray
Tune, then write the tables and the summary (and the analysis report).

Running the same command again after any interruption (Ctrl-C, SIGKILL, a lost node, a
preemption) continues the sweep: finished runs are kept, unfinished ones resume from their
checkpoints, and the results equal an uninterrupted sweep's.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from icl.errors import OutputError, UserError
from icl.io import atomic_write
from icl.layout import CHECKPOINTS, CONFIG, METRICS, ExperimentDir
from sweeps import results as res
from sweeps.experiment import (
    check_storage_writable,
    clear_tune_state,
    experiment_state,
    finished_trials,
    lock_experiment,
    prune_ray_checkpoints,
    with_runtime_paths,
)
from sweeps import signals
from sweeps.faults import FAULTS_ENV, parse_faults
from sweeps.leftovers import forget, record, session_dir, stop_leftovers
from sweeps.progress import concurrency
from sweeps.ray_session import RayOptions, check_resources, check_storage_shared, loopback_only, start_ray
from sweeps.spec import PackSpec, SweepSpec, TrialSpec, format_value, lr_sums, make_packs, saved_yaml, shrink_of
from sweeps.trainable import TrialNames, make_trainable

# What Tune raises when it cannot save or read back its own state (error files truncated on a
# full disk): the sweep then reports from the run directories, which are the record. (The
# only pickles Tune reads back are the error files this driver wrote in this run: the state
# of an earlier run is removed before Tune starts, see sweeps.experiment.clear_tune_state.)
UNREADABLE_STATE = (OSError, EOFError, pickle.UnpicklingError)

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


@dataclass
class Outcome:
    """How the sweep ended, per trial id: TERMINATED, ERROR or UNFINISHED, with errors."""

    status: dict[str, str]
    errors: dict[str, str]
    wall_s: float

    @property
    def failed(self) -> list[str]:
        return [k for k, v in self.status.items() if v == "ERROR"]

    @property
    def unfinished(self) -> list[str]:
        return [k for k, v in self.status.items() if v == "UNFINISHED"]


def run_sweep(
    spec: SweepSpec, trials: Sequence[TrialSpec], opts: RayOptions, *, analysis: bool = True, out: Any = None
) -> int:
    """Everything that can be wrong is checked before Ray starts a trial; then the packs with
    unfinished models run on Tune. SIGINT, SIGTERM and SIGUSR1 stop it at any moment, Ray's
    start included, resumably and without a traceback (``sweeps.signals``)."""
    with signals.install():
        try:
            return _run_sweep(spec, trials, opts, analysis=analysis, out=out)
        except BaseException as e:
            # a signal stopped it; or Ray failed because Ctrl-C reached its processes too (a
            # terminal signals the whole process group) while it started
            if not isinstance(e, KeyboardInterrupt) and (isinstance(e, SystemExit) or signals.pending() is None):
                raise
            print("icl-sweep: interrupted: run the same command again to resume", file=sys.stderr, flush=True)
            return 130


def _run_sweep(spec: SweepSpec, trials: Sequence[TrialSpec], opts: RayOptions, *, analysis: bool, out: Any) -> int:
    if not opts.address:
        loopback_only()  # before Ray is imported: it reads the setting then
    import ray
    from ray import tune

    from sweeps.callback import ResultsCallback, TrackerCallback
    from sweeps.reporter import SweepReporter
    from sweeps.trackers import Trackers

    out = out or sys.stdout
    t0 = time.monotonic()
    for var, value in TUNE_ENV.items():
        os.environ.setdefault(var, value)
    exp_dir = spec.exp_dir
    packs = make_packs(spec, trials)  # a spec that cannot be packed: refused now
    members = {p.pack_id: p.trial_ids for p in packs}
    state = experiment_state(spec)
    faults = parse_faults(os.environ.get(FAULTS_ENV), trials)
    trials = with_runtime_paths(trials, spec)
    check_storage_writable(exp_dir.parent)
    trackers = Trackers(spec.log_to, spec.name, exp_dir, trials, out)  # a tracker it cannot use: refused now

    held = contextlib.ExitStack()
    recorded = False
    token_dir = None

    def stop_ray() -> None:
        with signals.stopping():
            ray.shutdown()
            if recorded:
                forget(exp_dir)
            if token_dir is not None:
                shutil.rmtree(token_dir, ignore_errors=True)

    try:
        token_dir = start_ray(opts)
    except BaseException:
        with signals.stopping():
            if ray.is_initialized():
                ray.shutdown()
        raise
    # ResultGrid looks for Tune's per-trial result.json, which TUNE_ENV turns off
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    quiet_ray_logs()
    try:
        check_resources(spec)
        if opts.address:
            check_storage_shared(exp_dir.parent)

        exp_dir.mkdir(parents=True, exist_ok=True)
        held.callback(lock_experiment(exp_dir).close)  # released when run_sweep returns
        state = experiment_state(spec)  # again, under the lock
        if not ExperimentDir(exp_dir).spec.exists():
            atomic_write(ExperimentDir(exp_dir).spec, saved_yaml(spec))
        session = None if opts.address else session_dir()  # what a SIGKILL would leave
        stopped = stop_leftovers(exp_dir, own_session=session)  # what a killed driver's embedded Ray left running
        if stopped:
            print(f"icl-sweep: {stopped}", file=out, flush=True)
        if session:
            record(exp_dir, session)
            recorded = True
        done = finished_trials(exp_dir, trials)
        # Tune runs only the packs with an unfinished model: the run directories say what is
        # done (a deleted one is trained again); Tune's state of an earlier run is never read
        to_run = [p for p in packs if not set(p.trial_ids) <= set(done)]
        reinstalled = clear_tune_state(exp_dir, packs, trials, [p.pack_id for p in to_run])
        where = "cluster " + opts.address if opts.address else "embedded Ray"
        print(
            f"icl-sweep: {'resuming' if state == 'resume' else 'starting'} {exp_dir} on {where}: "
            f"{_models(len(trials))} in {len(packs)} trials of up to {_models(spec.pack)}, "
            f"{len(done)} already finished",
            file=out,
            flush=True,
        )
        if reinstalled:
            print(f"icl-sweep: restored the run directories of {', '.join(reinstalled)} from Ray's checkpoint copies",
                  file=out, flush=True)

        have = ray.cluster_resources()
        slots = concurrency(spec.resources, have.get("CPU", 0.0), have.get("GPU", 0.0), spec.max_concurrent)
        finished_packs = [p.pack_id for p in packs if p not in to_run]
        reporter = SweepReporter(trials, members, exp_dir, min(slots, max(len(to_run), 1)), finished=finished_packs)
        trainable = tune.with_resources(
            make_trainable(exp_dir, trials, packs, faults, heads=spec.heads), spec.resources.as_ray()
        )
        dirnames = {p.pack_id: p.dirname for p in packs}
        tuner = tune.Tuner(
            trainable,
            param_space={"trial": tune.grid_search([p.pack_id for p in to_run])},  # Tune's trials are the packs
            tune_config=tune.TuneConfig(
                max_concurrent_trials=spec.max_concurrent,
                # the next trial reuses a finished trial's worker process: no new Python,
                # no second `import torch` (seconds per trial on a small machine)
                reuse_actors=True,
                trial_name_creator=TrialNames(dirnames, dirs=False),
                trial_dirname_creator=TrialNames(dirnames, dirs=True),
            ),
            run_config=tune.RunConfig(
                name=spec.name,
                storage_path=str(exp_dir.parent),
                failure_config=tune.FailureConfig(max_failures=spec.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=spec.checkpoint_keep),
                callbacks=[ResultsCallback(trials, members), TrackerCallback(trackers)],
                progress_reporter=reporter,
                verbose=1,
            ),
        ) if to_run else None
        try:
            with signals.tune_phase():  # a signal noted so far stops here; during the run: Tune's graceful stop
                grid = tuner.fit() if tuner is not None else []
        except UNREADABLE_STATE as e:  # Tune could not write or read back its own state: the disk
            print(f"icl-sweep: Ray Tune stopped: {type(e).__name__}: {res.error_line(str(e))}", file=out)
            grid = []
        outcome = _outcome(grid, exp_dir, trials, time.monotonic() - t0, members)
        trackers.close(outcome.status)  # what is left sent; finished models' runs closed
        try:
            prune_ray_checkpoints(grid)
        except UNREADABLE_STATE:  # nothing pruned: Tune's copies are kept, which is safe
            pass
    except BaseException:
        trackers.close()
        stop_ray()
        held.close()
        raise
    stop_ray()

    with held:
        status = {k: (v, outcome.errors.get(k, "")) for k, v in outcome.status.items()}
        try:  # the tables may not fit on a full disk: the summary is printed all the same
            res.write_results(exp_dir, trials)
            res.write_trials(exp_dir, trials, status, members)
            unwritten = None
        except OutputError as e:
            unwritten = e
        code = _summarize(spec, trials, packs, outcome, len(res.collect(exp_dir, trials)[1]), out,
                          analysis=analysis and unwritten is None)
        if unwritten is not None:
            raise unwritten  # exit 2 with one error line naming the table and what to do
        return code


def _outcome(grid: Any, exp_dir: Path, trials: Sequence[TrialSpec], wall_s: float, packs: res.Packs) -> Outcome:
    """Per model: ERROR (Tune gave up on its trial), TERMINATED (its run reached its last step,
    read from the run directory) or UNFINISHED (interrupted: Tune marks the trials it stops
    on Ctrl-C as terminated too, so its status alone cannot tell). A failed trial fails only
    its models that did not finish."""
    from sweeps.callback import LAST_STATUS

    done = set(finished_trials(exp_dir, trials))
    status = {t.trial_id: "TERMINATED" if t.trial_id in done else "UNFINISHED" for t in trials}
    errors: dict[str, str] = {}
    for trial_id, (state, error) in LAST_STATUS.items():
        if trial_id in status and state == "ERROR":
            status[trial_id] = "ERROR"
            if error:
                errors[trial_id] = error
    for pack_id, error in _tune_errors(grid).items():  # the exception itself, where Tune kept it
        for trial_id, (state, own) in res.member_status(exp_dir, trials, packs, {pack_id: ("ERROR", error)}).items():
            if state == "ERROR":
                status[trial_id] = "ERROR"
                errors.setdefault(trial_id, own)
    return Outcome(status, errors, wall_s)


# Ray's loggers that report the storage failing (syncing Tune's state, deleting a copy), and the
# results callback's: a whole traceback, or the same line, again at every sync period.
QUIETED_LOGGERS = ("ray.tune.execution.experiment_state", "ray.train._internal.syncer", "ray.train._internal.storage",
                   "sweeps.callback")


def quiet_ray_logs() -> OneLineOnce:
    """Tune's failure to save or sync its state (a full disk: every few seconds) as one line,
    once, not a traceback each time: the run directories are the record, and the summary says
    what stopped. Tune's advice after a stop (``Tuner.restore``) is dropped: it is not how a
    sweep resumes (the summary says how)."""
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
            text = f"{text.strip()} {type(e).__name__}: {res.error_line(str(e))}"
        elif "Traceback (most recent call last)" in text:
            lines = [line for line in text.splitlines() if line.strip()]
            text = f"{lines[0].strip()} {lines[-1].strip()}"
        text = " ".join(text.split())
        record.msg, record.args, record.exc_info, record.exc_text = text, None, None, None
        if text in self.seen:
            return False
        self.seen.add(text)
        return True


def _tune_errors(grid: Any) -> dict[str, str]:
    """Pack id -> the one-line exception of each trial Tune gave up on. Tune unpickles them
    from its error files; one truncated by a full disk is reported as such."""
    found: dict[str, str] = {}
    try:
        for result in grid:
            pack_id = (result.config or {}).get("trial")
            try:
                error = result.error
            except UNREADABLE_STATE as e:
                found[pack_id] = f"Tune's error file is unreadable ({type(e).__name__}; a full disk?)"
                continue
            if error is not None:
                found[pack_id] = res.error_line(str(error)) or type(error).__name__
    except UNREADABLE_STATE:  # the whole result grid: the run directories and LAST_STATUS remain
        pass
    return found


def _summarize(spec: SweepSpec, trials: Sequence[TrialSpec], packs: Sequence[PackSpec], outcome: Outcome,
               n_rows: int, out: Any, *, analysis: bool) -> int:
    exp_dir = spec.exp_dir
    exp = ExperimentDir(exp_dir)
    n_ok = sum(v == "TERMINATED" for v in outcome.status.values())
    print(
        f"\nicl-sweep: {n_ok}/{len(trials)} models finished, {len(outcome.failed)} failed, "
        f"{len(outcome.unfinished)} unfinished ({outcome.wall_s:.1f} s)",
        file=out,
    )
    by_id = {t.trial_id: t for t in trials}
    pack_of = {m: p for p in packs for m in p.trial_ids}
    for trial_id in outcome.failed:
        t, pack = by_id[trial_id], pack_of[trial_id]
        point = ", ".join(f"{k}={format_value(v)}" for k, v in t.grid.items())
        log = exp.diverged(t)  # a diverged model's own error, else its trial's
        if not log.is_file():
            log = exp.tune_error(pack)
        where = f" in trial {pack.pack_id}" if len(pack.trial_ids) > 1 else ""
        print(
            f"  FAILED {trial_id} ({point}){where} after {len(res.attempts(exp_dir, t))} attempt(s): "
            f"{outcome.errors.get(trial_id, '?')}\n         log: {log}",
            file=out,
        )
    print(f"  experiment: {exp_dir}", file=out)
    print(f"  results:    {exp.results} ({n_rows} rows)", file=out)
    print(f"  trials:     {exp.trials}", file=out)
    print(f"  spec:       {exp.spec}", file=out)
    print(f"  runs:       {exp.run_dir('<model>')}/  ({CONFIG}, {METRICS}, {CHECKPOINTS})", file=out)
    if outcome.unfinished or signals.pending() is not None:
        print("  interrupted: run the same command again to resume", file=out, flush=True)
        return 130
    with signals.immediate():  # a report stopped half-way is never seen (written atomically)
        report = run_analysis(exp_dir, out) if analysis else f"skipped (--no-analysis); later: icl-analyze {exp_dir}"
    print(f"  analysis:   {report}", file=out, flush=True)
    return 1 if outcome.failed else 0


def run_analysis(exp_dir: Path, out: Any = None) -> str:
    """Write the experiment's report (:func:`analysis.report.analyze`) if the analysis package
    is installed, printing its lines to ``out``; the sweep's results stand either way."""
    try:
        import matplotlib

        from analysis.report import analyze, summary_lines  # type: ignore[import-not-found]
    except ImportError:
        return f"not available (the analysis package is not installed yet); later: icl-analyze {exp_dir}"
    out_dir = ExperimentDir(exp_dir).report
    retry = f"retry: icl-analyze {exp_dir} --out {out_dir}"
    matplotlib.use("Agg")
    try:
        rep = analyze(exp_dir, out_dir, what="report folder")
    except UserError as e:  # bad or missing results, an unwritable folder: one line, as the CLI says it
        return f"failed (error: {res.error_line(str(e))}); {retry}"
    except Exception as e:  # noqa: BLE001 - a broken report must not hide finished results
        return f"failed ({type(e).__name__}: {res.error_line(str(e))}); {retry}"
    print("\n".join(summary_lines(rep)), file=out or sys.stdout, flush=True)
    return str(out_dir)


def dry_run_table(spec: SweepSpec, trials: Sequence[TrialSpec], out: Any = None) -> None:
    """The model table (each model's Tune trial, its pack) and what a real run would do,
    without starting Ray or writing files."""
    out = out or sys.stdout
    exp_dir = spec.exp_dir
    packs = make_packs(spec, trials)
    pack_of = {m: p.pack_id for p in packs for m in p.trial_ids}
    state = experiment_state(spec)
    done = set(finished_trials(exp_dir, trials)) if state == "resume" else set()
    keys = list(spec.grid)
    rows = [["model", "trial", *keys, "shrink", "status"]]
    for t in trials:
        rows.append([t.trial_id, pack_of[t.trial_id], *(format_value(t.grid[k]) for k in keys), shrink_of(t),
                     "finished" if t.trial_id in done else "to run"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    base = spec.base or "resolved config"
    over = ", ".join(f"{k}={format_value(v)}" for k, v in spec.overrides.items())
    largest = max(len(p.trial_ids) for p in packs)
    print(f"experiment: {exp_dir} ({'exists: would resume' if state == 'resume' else 'new'})", file=out)
    print(f"base:       {base}" + (f" + {over}" if over else ""), file=out)
    r = spec.resources
    print(
        f"per trial:  {format_value(r.cpu)} CPU, {format_value(r.gpu)} GPU; max concurrent: "
        f"{spec.max_concurrent or 'as resources allow'}; retries: {spec.max_failures}",
        file=out,
    )
    print(f"packing:    up to {_models(spec.pack)} per trial, trained as one pack (train_packed)", file=out)
    sums = ", ".join(f"{x:.4g}" for x in lr_sums(trials))
    print(f"decay:      shrink = exp(-weight_decay * sum lr_t), the factor decoupled decay scales a weight by "
          f"over the run (sum lr_t = {sums})", file=out)
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip(), file=out)
    print(f"{_models(len(trials))} in {len(packs)} trials of up to {_models(largest)} ({len(trials) - len(done)} "
          "to run); dry run: nothing started", file=out)


def _models(n: int) -> str:
    return f"{n} model" + ("" if n == 1 else "s")
