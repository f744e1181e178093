"""The sweep driver: check everything, start or join Ray, run (or resume) the packs on Ray
Tune, then write the tables and the summary (and the analysis report).

Running the same command again after any interruption (Ctrl-C, SIGKILL, a lost node, a
preemption) continues the sweep: finished runs are kept, unfinished ones resume from their
checkpoints, and the results equal an uninterrupted sweep's. Each run of the command is a
new Tune run of the packs with unfinished models (Tune's state of an earlier run is never
read: ``sweeps.experiment.clear_tune_state``).
"""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from icl.errors import OutputError, UserError
from icl.io import atomic_write
from icl.layout import CHECKPOINTS, CONFIG, METRICS, ExperimentDir
from sweeps import results as res
from sweeps import signals
from sweeps.experiment import (
    Experiment,
    check_storage_writable,
    clear_tune_state,
    lock_experiment,
    prune_ray_checkpoints,
)
from sweeps.leftovers import forget, record, stop_leftovers
from sweeps.progress import concurrency
from sweeps.ray_adapter import UNREADABLE_STATE, loopback_only, tune_environment
from sweeps.ray_session import RayOptions, RaySession, check_resources, check_storage_shared
from sweeps.spec import PackSpec, format_value, lr_sums, shrink_of
from sweeps.trainable import AfterEval, TrialNames, make_trainable


@dataclass
class Outcome:
    """How the sweep ended, per model id: TERMINATED, ERROR or UNFINISHED, with errors."""

    status: dict[str, str]
    errors: dict[str, str]
    wall_s: float

    @property
    def failed(self) -> list[str]:
        return [k for k, v in self.status.items() if v == "ERROR"]

    @property
    def unfinished(self) -> list[str]:
        return [k for k, v in self.status.items() if v == "UNFINISHED"]


def run_sweep(exp: Experiment, opts: RayOptions, *, analysis: bool = True, out: Any = None,
              after_eval: AfterEval | None = None) -> int:
    """Everything that can be wrong is checked before Ray starts a trial; then the packs with
    unfinished models run on Tune. SIGINT, SIGTERM and SIGUSR1 stop it at any moment, Ray's
    start included, resumably and without a traceback (``sweeps.signals``). ``after_eval``:
    the trainable's hook after each evaluation (tests only: ``sweeps.faults``)."""
    with signals.install():
        try:
            return _run_sweep(exp, opts, analysis=analysis, out=out or sys.stdout, after_eval=after_eval)
        except BaseException as e:
            # a signal stopped it; or Ray failed because Ctrl-C reached its processes too (a
            # terminal signals the whole process group) while it started
            if not isinstance(e, KeyboardInterrupt) and (isinstance(e, SystemExit) or signals.pending() is None):
                raise
            print("icl-sweep: interrupted: run the same command again to resume", file=sys.stderr, flush=True)
            return 130


def _run_sweep(exp: Experiment, opts: RayOptions, *, analysis: bool, out: Any, after_eval: AfterEval | None) -> int:
    from sweeps.trackers import Trackers

    t0 = time.monotonic()
    exp.state()  # another experiment, or this one with another spec, in the directory: refused now
    exp = exp.with_runtime_paths()  # the data found, paths absolute (Ray's workers run elsewhere)
    check_storage_writable(exp.path.parent)
    trackers = Trackers(exp.spec.log_to, exp.spec.name, exp.path, exp.models, out)  # one it cannot use: refused now
    if not opts.address:
        loopback_only()  # before Ray is imported: it reads the setting then
    tune_environment()
    with contextlib.ExitStack() as held:  # the experiment's lock, once taken: released when the sweep returns
        try:
            with RaySession(opts) as session:  # stopped on leaving, signals deferred meanwhile
                check_resources(exp.spec)
                if opts.address:
                    check_storage_shared(exp.path.parent)
                to_run = take_experiment(exp, session, held, out)
                outcome = run_packs(exp, to_run, trackers, after_eval, out, t0)
                trackers.close(outcome.status)  # what is left sent; finished models' runs closed
        except BaseException:
            trackers.close()
            raise
        return write_tables_and_summary(exp, outcome, out, analysis=analysis)


def take_experiment(exp: Experiment, session: RaySession, held: contextlib.ExitStack, out: Any) -> list[PackSpec]:
    """Lock the experiment directory (released by ``held``), save its spec, stop what a killed
    driver's Ray left, clear Tune's state of an earlier run; returns the packs to run (those
    with an unfinished model: the run directories say what is done, a deleted one is trained
    again)."""
    exp.path.mkdir(parents=True, exist_ok=True)
    held.callback(lock_experiment(exp.path).close)
    state = exp.state()  # again, under the lock
    if not exp.dir.spec.exists():
        atomic_write(exp.dir.spec, exp.saved_yaml())
    own = session.session_dir()  # what a SIGKILL would leave
    stopped = stop_leftovers(exp.path, own_session=own)  # what a killed driver's embedded Ray left running
    if stopped:
        print(f"icl-sweep: {stopped}", file=out, flush=True)
    if own:
        record(exp.path, own)
        session.on_stop.append(lambda: forget(exp.path))
    done = set(exp.finished())
    to_run = [p for p in exp.packs if not set(p.trial_ids) <= done]
    reinstalled = clear_tune_state(exp, to_run)
    where = "cluster " + session.opts.address if session.opts.address else "embedded Ray"
    print(
        f"icl-sweep: {'resuming' if state == 'resume' else 'starting'} {exp.path} on {where}: "
        f"{_models(len(exp.models))} in {len(exp.packs)} trials of up to {_models(exp.spec.pack)}, "
        f"{len(done)} already finished",
        file=out,
        flush=True,
    )
    if reinstalled:
        print(f"icl-sweep: restored the run directories of {', '.join(reinstalled)} from Ray's checkpoint copies",
              file=out, flush=True)
    return to_run


def run_packs(exp: Experiment, to_run: Sequence[PackSpec], trackers: Any, after_eval: AfterEval | None, out: Any,
              t0: float) -> Outcome:
    """One Tune run of the packs ``to_run`` (Tune's trials are the packs), with the live table
    and the callbacks that keep the tables and trackers current; how each model ended."""
    import ray
    from ray import tune

    from sweeps.callback import ResultsCallback, TrackerCallback
    from sweeps.reporter import SweepReporter

    spec = exp.spec
    have = ray.cluster_resources()
    slots = concurrency(spec.resources, have.get("CPU", 0.0), have.get("GPU", 0.0), spec.max_concurrent)
    running = {p.pack_id for p in to_run}
    finished = [p.pack_id for p in exp.packs if p.pack_id not in running]
    reporter = SweepReporter(exp.models, exp.members, exp.path, min(slots, max(len(to_run), 1)), finished=finished)
    dirnames = {p.pack_id: p.dirname for p in exp.packs}
    tuner = tune.Tuner(
        tune.with_resources(make_trainable(to_run, spec.heads, after_eval), spec.resources.as_ray()),
        param_space={"trial": tune.grid_search([p.pack_id for p in to_run])},
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
            storage_path=str(exp.path.parent),
            failure_config=tune.FailureConfig(max_failures=spec.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=spec.checkpoint_keep),
            callbacks=[ResultsCallback(exp.models, exp.members), TrackerCallback(trackers)],
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
    outcome = _outcome(grid, exp, time.monotonic() - t0)
    try:
        prune_ray_checkpoints(grid)
    except UNREADABLE_STATE:  # nothing pruned: Tune's copies are kept, which is safe
        pass
    return outcome


def write_tables_and_summary(exp: Experiment, outcome: Outcome, out: Any, *, analysis: bool) -> int:
    """``results.csv`` and ``trials.csv`` from the run directories, the summary, and (the sweep
    complete) the analysis report. The tables may not fit on a full disk: the summary is
    printed all the same, then the error (exit 2, one line naming the table)."""
    status = {k: (v, outcome.errors.get(k, "")) for k, v in outcome.status.items()}
    try:
        n_rows = res.write_results(exp.path, exp.models)
        res.write_trials(exp.path, exp.models, status, exp.members)
        unwritten = None
    except OutputError as e:
        n_rows, unwritten = len(res.collect(exp.path, exp.models)[1]), e
    code = _summarize(exp, outcome, n_rows, out, analysis=analysis and unwritten is None)
    if unwritten is not None:
        raise unwritten
    return code


def _outcome(grid: Any, exp: Experiment, wall_s: float) -> Outcome:
    """Per model: ERROR (Tune gave up on its trial), TERMINATED (its run reached its last step,
    read from the run directory) or UNFINISHED (interrupted: Tune marks the trials it stops
    on Ctrl-C as terminated too, so its status alone cannot tell). A failed trial fails only
    its models that did not finish."""
    from sweeps.callback import LAST_STATUS

    done = set(exp.finished())
    status = {m.trial_id: "TERMINATED" if m.trial_id in done else "UNFINISHED" for m in exp.models}
    errors: dict[str, str] = {}
    for trial_id, (state, error) in LAST_STATUS.items():
        if trial_id in status and state == "ERROR":
            status[trial_id] = "ERROR"
            if error:
                errors[trial_id] = error
    for pack_id, error in _tune_errors(grid).items():  # the exception itself, where Tune kept it
        for trial_id, (state, own) in res.member_status(exp.path, exp.models, exp.members,
                                                        {pack_id: ("ERROR", error)}).items():
            if state == "ERROR":
                status[trial_id] = "ERROR"
                errors.setdefault(trial_id, own)
    return Outcome(status, errors, wall_s)


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


def _summarize(exp: Experiment, outcome: Outcome, n_rows: int, out: Any, *, analysis: bool) -> int:
    files = exp.dir
    n_ok = sum(v == "TERMINATED" for v in outcome.status.values())
    print(
        f"\nicl-sweep: {n_ok}/{len(exp.models)} models finished, {len(outcome.failed)} failed, "
        f"{len(outcome.unfinished)} unfinished ({outcome.wall_s:.1f} s)",
        file=out,
    )
    by_id = {m.trial_id: m for m in exp.models}
    for trial_id in outcome.failed:
        m, pack = by_id[trial_id], exp.pack_of[trial_id]
        point = ", ".join(f"{k}={format_value(v)}" for k, v in m.grid.items())
        log = files.diverged(m)  # a diverged model's own error, else its trial's
        if not log.is_file():
            log = files.tune_error(pack)
        where = f" in trial {pack.pack_id}" if len(pack.trial_ids) > 1 else ""
        print(
            f"  FAILED {trial_id} ({point}){where} after {len(res.attempts(exp.path, m))} attempt(s): "
            f"{outcome.errors.get(trial_id, '?')}\n         log: {log}",
            file=out,
        )
    print(f"  experiment: {exp.path}", file=out)
    print(f"  results:    {files.results} ({n_rows} rows)", file=out)
    print(f"  trials:     {files.trials}", file=out)
    print(f"  spec:       {files.spec}", file=out)
    print(f"  runs:       {files.run_dir('<model>')}/  ({CONFIG}, {METRICS}, {CHECKPOINTS})", file=out)
    if outcome.unfinished or signals.pending() is not None:
        print("  interrupted: run the same command again to resume", file=out, flush=True)
        return 130
    with signals.immediate():  # a report stopped half-way is never seen (written atomically)
        report = run_analysis(exp.path, out) if analysis else f"skipped (--no-analysis); later: icl-analyze {exp.path}"
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


def dry_run_table(exp: Experiment, out: Any = None) -> None:
    """The model table (each model's Tune trial, its pack) and what a real run would do,
    without starting Ray or writing files."""
    out = out or sys.stdout
    spec, trials, packs = exp.spec, exp.models, exp.packs
    state = exp.state()
    done = set(exp.finished()) if state == "resume" else set()
    keys = list(spec.grid)
    rows = [["model", "trial", *keys, "shrink", "status"]]
    for t in trials:
        rows.append([t.trial_id, exp.pack_of[t.trial_id].pack_id, *(format_value(t.grid[k]) for k in keys),
                     shrink_of(t), "finished" if t.trial_id in done else "to run"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    base = spec.base or "resolved config"
    over = ", ".join(f"{k}={format_value(v)}" for k, v in spec.overrides.items())
    largest = max(len(p.trial_ids) for p in packs)
    print(f"experiment: {exp.path} ({'exists: would resume' if state == 'resume' else 'new'})", file=out)
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
