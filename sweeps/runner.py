"""Run a sweep on Ray Tune: embedded Ray or a cluster, the trainable, resume, the summary.

Layout of an experiment (``STORAGE/NAME``)::

    spec.yaml          the resolved spec (checked on every resume)
    results.csv        tidy long table, refreshed while the sweep runs (sweeps.results)
    trials.csv         one row per trial: status, last step, attempts, error
    report/            the analysis report (once the analysis package is installed)
    tNNN_<grid>/       one directory per trial, named by Tune's trial_dirname_creator
        run/           the trainer's run directory: config.yaml, metrics.csv, checkpoints/
        checkpoint_*/  Ray Tune's copies of the trainer checkpoints it was sent
        attempts.jsonl one line per start of the trial (node, pid, step resumed from)
    tuner.pkl, experiment_state-*.json, ...   Ray Tune's own state (Tuner.restore)

Why the trainer writes its run directory into the experiment (storage) rather than into
Ray's node-local trial working directory: the run survives anything that kills the driver
or a node, and the trainer resumes from its own newest checkpoint even when Ray's
experiment state is older (Tune saves it only every few seconds). Every evaluation is still
reported with ``tune.report`` and the checkpoint written at that step; Ray's checkpoint,
from ``tune.get_checkpoint()``, is installed into the run directory when it is newer than
what is there (a run directory moved or lost). Ray's copies are all kept while the sweep
runs and pruned to the latest when it ends (see :func:`prune_ray_checkpoints` for why).
Like Ray Tune itself, a multi-node cluster needs ``STORAGE`` on a filesystem every node
shares; that is checked before any trial starts.

Packed sweeps (spec ``pack: K > 1``): a Tune trial is a *pack* of up to K grid points that
differ only in seed and weight decay, trained together by ``icl.train.train_packed``
(:func:`run_pack`). Every member still writes its run directory to ``tNNN_<grid>/run``, as
an unpacked sweep would, so results.csv, trials.csv, the resume from run directories and
the analysis are unchanged; the pack's Tune directory ``pNNN_<members>/`` holds Ray's
checkpoint copies (one sub-directory per member) and Tune's error file.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from icl.config import build_config, cache_dir, data_root, read_yaml
from icl.errors import UserError
from icl.io import atomic_write
from sweeps import results as res
from sweeps.spec import (
    PackSpec,
    SweepSpec,
    TrialSpec,
    differences,
    format_value,
    identity,
    make_packs,
    parse_spec,
    saved_yaml,
)

SPEC_FILE = "spec.yaml"
LOCK_FILE = ".icl-sweep.lock"
REPORT_DIR = "report"
FAULTS_ENV = "ICL_SWEEP_FAULTS"
FAULT_COUNTER = "faults_injected"
CONNECT_TIMEOUT_S = 5.0
JOIN_ATTEMPTS = 5  # seconds-ish ray.init spends on a cluster that answers but refuses
# Ray Tune settings for the driver (an explicit value in the environment wins):
TUNE_ENV = {
    # results.csv / trials.csv are the experiment's tables; Tune's per-trial result.json,
    # progress.csv and TensorBoard files would only duplicate them.
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
    # a spec's checkpoint.num_to_keep makes Tune save its experiment state every
    # num_to_keep checkpoints, which is what a resume wants; do not warn about it.
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
}
_CKPT_RE = re.compile(r"^step_(\d+)$")
STAGING_PREFIX = ".tune-checkpoint-"  # a pack's checkpoint for tune.report, being assembled


# --------------------------------------------------------------------------- options


@dataclass
class RayOptions:
    """Where trials run: ``address`` of a cluster, else an embedded Ray of this size."""

    address: str | None = None
    num_cpus: int | None = None
    num_gpus: int | None = None


def machine_cpus() -> int:
    """CPUs this process may use (a SLURM or taskset CPU set, not the whole machine)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# --------------------------------------------------------------------------- fault injection


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


def _maybe_inject(trial_dir: Path, trial_id: str, fault: Fault | None, step: int) -> None:
    if fault is None or step < fault.step:
        return
    counter = trial_dir / FAULT_COUNTER
    done = int(counter.read_text()) if counter.exists() else 0
    if fault.times is not None and done >= fault.times:
        return
    atomic_write(counter, str(done + 1))
    raise RuntimeError(f"injected fault #{done + 1} in trial {trial_id} at step {step} ({FAULTS_ENV})")


# --------------------------------------------------------------------------- the trainable


def latest_step(run: Path) -> int:
    """Step of the newest checkpoint directory in a trainer run directory (0: none)."""
    steps = [int(m.group(1)) for p in (run / "checkpoints").glob("step_*") if (m := _CKPT_RE.match(p.name))]
    return max(steps, default=0)


def checkpoint_step(ckpt: Path) -> int | None:
    """Step of a trainer checkpoint directory: its manifest, else its metrics' last row."""
    try:
        manifest = json.loads((ckpt / "manifest.json").read_text())
        if isinstance(manifest, dict) and isinstance(manifest.get("step"), int):
            return manifest["step"]
    except (OSError, ValueError):
        pass
    header, rows = res.read_metrics(ckpt / "metrics.csv")
    if rows and "step" in header:
        return int(float(rows[-1][header.index("step")]))
    return None


def run_trial(trial_id: str, exp_dir: str, table: dict[str, tuple[str, dict[str, Any]]], faults: dict[str, Fault]) -> None:
    """Body of one Tune trial: train one grid point, report every evaluation to Tune."""
    import ray
    from ray import tune

    from icl.train import install_checkpoint, train

    logging.getLogger("ray.train").setLevel(logging.WARNING)  # not a line per checkpoint copy

    dirname, flat = table[trial_id]
    trial_dir = Path(exp_dir) / dirname
    run = trial_dir / res.RUN
    cfg = build_config(flat)

    ckpt = tune.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as src:
            step = checkpoint_step(Path(src))
            if step is None or latest_step(run) < step:
                install_checkpoint(Path(src), run)
    start = latest_step(run)
    trial_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "attempt": len(res.attempts(trial_dir)) + 1,
        "resumed_from_step": start,
        "node_id": ray.get_runtime_context().get_node_id(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "time": _dt.datetime.now().isoformat(timespec="seconds"),
    }
    with open(trial_dir / res.ATTEMPTS, "a") as f:
        f.write(json.dumps(record) + "\n")

    reported = False
    fault = faults.get(trial_id)

    def on_eval(row: dict[str, float], checkpoint_dir: Path | None) -> None:
        nonlocal reported
        if checkpoint_dir is not None:
            tune.report(dict(row), checkpoint=tune.Checkpoint.from_directory(str(checkpoint_dir)))
        else:
            tune.report(dict(row))
        reported = True
        _maybe_inject(trial_dir, trial_id, fault, int(row["step"]))

    final = train(cfg, run, on_eval=on_eval, progress=False)
    if not reported:  # the run was already complete (e.g. the driver died as it finished):
        # hand Tune the final checkpoint, so its view of the trial ends where the run did
        last = run / "checkpoints" / f"step_{latest_step(run):09d}"
        if last.is_dir():
            tune.report(dict(final), checkpoint=tune.Checkpoint.from_directory(str(last)))
        else:
            tune.report(dict(final))


class PackReporter:
    """One ``tune.report`` per evaluation step of a pack, from ``train_packed``'s per-model
    ``on_eval`` calls.

    A step is reported once every member expected at it has evaluated it (those whose run
    started this attempt below that step: a member brought level in a catch-up, or already
    finished, is not), or when a row of another step arrives (a model that diverged stops
    evaluating), or at the end. The metrics are the step, the number of models in the row
    and each metric's mean over them (the per-model rows are in the run directories and
    results.csv); the checkpoint is a directory with one sub-directory per member, a copy of
    its run's checkpoint of that step (those that have one), so a restored pack can install
    each member's checkpoint as an unpacked trial installs its own.
    """

    def __init__(self, trial_ids: Sequence[str], runs: Sequence[Path], starts: Sequence[int], staging: Path) -> None:
        self.trial_ids = list(trial_ids)
        self.runs = list(runs)
        self.starts = list(starts)
        self.staging = staging
        self.step: int | None = None
        self.rows: dict[int, dict[str, float]] = {}
        self.reported = False

    def add(self, k: int, row: dict[str, float]) -> None:
        step = int(row["step"])
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
        ckpts = {
            self.trial_ids[k]: run / "checkpoints" / f"step_{step:09d}"
            for k, run in enumerate(self.runs)
        }
        self.report(pack_metrics(step, list(rows.values())), {k: v for k, v in ckpts.items() if v.is_dir()})

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


def pack_metrics(step: int, rows: Sequence[dict[str, float]]) -> dict[str, float]:
    """What a pack reports to Tune at one step: the step, the number of models and each
    metric's mean over them."""
    out: dict[str, float] = {"step": step, "models": len(rows)}
    for key in rows[0] if rows else ():
        if key != "step":
            values = [float(r[key]) for r in rows if key in r]
            out[key] = sum(values) / len(values)
    return out


def run_pack(
    pack_id: str,
    exp_dir: str,
    table: dict[str, tuple[str, dict[str, Any]]],
    packs: dict[str, tuple[str, tuple[str, ...]]],
    faults: dict[str, Fault],
) -> None:
    """Body of one Tune trial of a packed sweep: train the pack's grid points together with
    ``train_packed``, each into the run directory an unpacked sweep would give it; report
    every evaluation step to Tune. A model that diverges does not stop the others; the pack
    then fails with a message naming it (each diverged model's own error is written to
    ``error.txt`` in its trial directory), so Tune retries it as it retries a crashed trial
    (a retry trains only what is unfinished) and reports it at the end."""
    import ray
    from ray import tune

    from icl.train import TrainingDiverged, install_checkpoint, train_packed
    from icl.train.packed import PackedTrainingDiverged

    logging.getLogger("ray.train").setLevel(logging.WARNING)  # not a line per checkpoint copy

    pack_dirname, members = packs[pack_id]
    exp = Path(exp_dir)
    trial_dirs = [exp / table[m][0] for m in members]
    runs = [d / res.RUN for d in trial_dirs]
    cfgs = [build_config(table[m][1]) for m in members]

    ckpt = tune.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as src:
            for m, run in zip(members, runs):
                sub = Path(src) / m
                if sub.is_dir():
                    step = checkpoint_step(sub)
                    if step is None or latest_step(run) < step:
                        install_checkpoint(sub, run)
    starts = [latest_step(run) for run in runs]
    node = ray.get_runtime_context().get_node_id()
    for m, d, start in zip(members, trial_dirs, starts):
        d.mkdir(parents=True, exist_ok=True)
        (d / res.ERROR_FILE).unlink(missing_ok=True)  # a previous attempt's; this one may not fail
        record = {
            "attempt": len(res.attempts(d)) + 1,
            "resumed_from_step": start,
            "pack": pack_id,
            "node_id": node,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "time": _dt.datetime.now().isoformat(timespec="seconds"),
        }
        with open(d / res.ATTEMPTS, "a") as f:
            f.write(json.dumps(record) + "\n")

    staging = exp / pack_dirname
    staging.mkdir(parents=True, exist_ok=True)
    for old in staging.glob(f"{STAGING_PREFIX}*"):  # left by an attempt killed while reporting
        shutil.rmtree(old, ignore_errors=True)
    reporter = PackReporter(members, runs, starts, staging)

    def on_eval(k: int, row: dict[str, float], checkpoint_dir: Path | None) -> None:
        reporter.add(k, row)
        _maybe_inject(trial_dirs[k], members[k], faults.get(members[k]), int(row["step"]))

    try:
        final = train_packed(cfgs, runs, on_eval=on_eval, progress=False)
    except PackedTrainingDiverged as e:
        reporter.flush()
        for k, message in sorted(e.diverged.items()):
            atomic_write(trial_dirs[k] / res.ERROR_FILE, f"TrainingDiverged: {message}\n")
        names = "; ".join(f"{members[k]}: {msg}" for k, msg in sorted(e.diverged.items()))
        raise TrainingDiverged(
            f"{len(e.diverged)} of {len(members)} models of pack {pack_id} diverged (the others finished): {names}"
        ) from None
    reporter.flush()
    if not reporter.reported:  # every run was already complete (e.g. the driver died as the
        # pack finished): hand Tune the final checkpoints, so its view ends where the runs did
        last = {m: run / "checkpoints" / f"step_{latest_step(run):09d}" for m, run in zip(members, runs)}
        step = max((int(r.get("step", 0)) for r in final), default=0)
        reporter.report(pack_metrics(step, [r for r in final if r]), {m: p for m, p in last.items() if p.is_dir()})


def make_trainable(
    exp_dir: Path,
    trials: Sequence[TrialSpec],
    faults: dict[str, Fault],
    packs: Sequence[PackSpec] | None = None,
) -> Callable[[dict[str, Any]], None]:
    """A Tune function trainable closing over the trial table (config per trial id) and, in
    a packed sweep, the packs (``config["trial"]`` is then a pack id).

    Why a closure and not the configs in Tune's ``param_space``: Tune's saved state then
    holds only trial ids, and a restore gets the table rebuilt from the (identical, checked)
    spec with this machine's runtime paths.
    """
    table = {t.trial_id: (t.dirname, t.config) for t in trials}
    exp = str(exp_dir)
    if packs is not None:
        pack_table = {p.pack_id: (p.dirname, tuple(p.trial_ids)) for p in packs}

        def icl_pack(config: dict[str, Any]) -> None:
            run_pack(config["trial"], exp, table, pack_table, faults)

        return icl_pack

    def icl_trial(config: dict[str, Any]) -> None:
        run_trial(config["trial"], exp, table, faults)

    return icl_trial


class TrialNames:
    """Tune trial name / directory name from our stable trial id (picklable for tuner.pkl)."""

    def __init__(self, dirnames: dict[str, str], *, dirs: bool) -> None:
        self.dirnames = dirnames
        self.dirs = dirs

    def __call__(self, trial: Any) -> str:
        trial_id = trial.config["trial"]
        return self.dirnames[trial_id] if self.dirs else trial_id


# --------------------------------------------------------------------------- helpers


def _error_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


# --------------------------------------------------------------------------- checks before any trial


def check_storage_writable(storage: Path) -> None:
    """Create the storage directory and write a probe file, so a bad path fails now."""
    try:
        storage.mkdir(parents=True, exist_ok=True)
        probe = storage / f".icl-sweep-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        reason = e.strerror or str(e)
        raise UserError(f"storage {storage} is not writable ({reason}); choose another --storage") from None


def experiment_state(spec: SweepSpec) -> str:
    """'new' or 'resume'; refuses a directory holding another experiment or a different spec."""
    exp = spec.exp_dir
    if not exp.exists():
        return "new"
    if not exp.is_dir():
        raise UserError(f"{exp} exists and is not a directory; choose another --name or --storage")
    saved = exp / SPEC_FILE
    if not saved.is_file():
        if any(p.name != LOCK_FILE for p in exp.iterdir()):
            raise UserError(
                f"{exp} exists but holds no icl-sweep experiment (no {SPEC_FILE}); it is never "
                "overwritten: choose another --name or --storage"
            )
        return "new"
    try:
        old = parse_spec(read_yaml(saved, "saved sweep spec"), source=saved, storage=spec.storage, name=spec.name)
        old_id = identity(old)
    except UserError as e:
        raise UserError(f"cannot compare with the saved spec {saved}: {e}") from None
    diffs = differences(old_id, identity(spec))
    if diffs:
        shown = "; ".join(diffs[:6]) + (f"; and {len(diffs) - 6} more" if len(diffs) > 6 else "")
        raise UserError(
            f"experiment {exp} already exists with a different spec ({shown}); results are never "
            "overwritten: re-run with the saved spec to resume, or choose another --name"
        )
    return "resume"


def finished_trials(exp_dir: Path, trials: Sequence[TrialSpec]) -> list[str]:
    """Trials whose run reached its last step (from the trainer's own metrics.csv)."""
    done = []
    for t in trials:
        header, rows = res.read_metrics(res.run_dir(exp_dir, t) / "metrics.csv")
        if rows and "step" in header and int(float(rows[-1][header.index("step")])) >= int(t.config["train.steps"]):
            done.append(t.trial_id)
    return done


def with_runtime_paths(trials: Sequence[TrialSpec], spec: SweepSpec) -> list[TrialSpec]:
    """Absolute data/cache paths and a thread count in each trial's config.

    Why: Ray runs trials in other working directories and, on a cluster, in other
    environments (the raylet's, not this shell's), so relative paths and ``ICL_DATA_DIR``
    would not resolve there. These are runtime keys: they do not change the science.
    """
    out = []
    for t in trials:
        cfg = build_config(t.config)
        flat = dict(t.config)
        flat["data.root"] = str(data_root(cfg))
        flat["data.cache_dir"] = str(cache_dir(cfg))
        if not flat.get("train.threads"):
            flat["train.threads"] = max(1, int(spec.resources.cpu))
        out.append(TrialSpec(t.trial_id, t.dirname, t.grid, flat))
    from icl.data.omniglot import find_source  # cheap: looks for the files, checks SHA256SUMS

    for root in sorted({t.config["data.root"] for t in out}):
        find_source(Path(root))  # missing or corrupt data: one error now, not one per trial
    return out


# --------------------------------------------------------------------------- Ray


def _token_available() -> bool:
    if os.environ.get("RAY_AUTH_TOKEN"):
        return True
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path:
        return Path(path).expanduser().is_file()
    return (Path.home() / ".ray" / "auth_token").is_file()


def configure_auth(address: str | None) -> str:
    """Set ``RAY_AUTH_MODE`` deliberately (an explicit value in the environment wins).

    Embedded Ray: ``token`` (Ray 2.59+'s own default for local clusters; Ray generates
    ``~/.ray/auth_token`` once). Joining a cluster: ``token`` when a token is available
    (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``; what ``ray start``
    itself does), else ``disabled``: ``ray.init(address=...)`` never guesses.
    """
    mode = os.environ.get("RAY_AUTH_MODE")
    if mode is None:
        mode = "token" if (address is None or _token_available()) else "disabled"
        os.environ["RAY_AUTH_MODE"] = mode
        if "ray._raylet" in sys.modules:
            # Ray reads the mode into its C++ config when first imported; refresh it the way
            # Ray's own token-auth setup does, or this process and its raylet would disagree.
            from ray._raylet import Config

            Config.initialize("")
    return mode


def _host_port(address: str) -> tuple[str, int] | None:
    addr = address.split("://", 1)[-1]
    m = re.fullmatch(r"\[?([^\]]+?)\]?:(\d+)", addr)
    return (m.group(1), int(m.group(2))) if m else None


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """A plain TCP connect first: ``ray.init`` retries an unreachable address for a minute."""
    if address in ("auto", "local"):
        return
    hp = _host_port(address)
    if hp is None:
        raise UserError(f"--address {address!r} must look like HOST:PORT (e.g. 10.0.0.5:6379) or auto")
    try:
        with socket.create_connection(hp, timeout=timeout):
            pass
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise UserError(
            f"cannot reach a Ray cluster at {address} ({reason}); start one with `ray start --head` "
            "or fix --address"
        ) from None


@contextlib.contextmanager
def _captured_stderr() -> Iterator[list[str]]:
    """Collect what this process (C++ included) writes to fd 2 meanwhile; the yielded list
    holds the text once the block is left."""
    captured: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile("w+") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield captured
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            captured.append(tmp.read())


def start_ray(opts: RayOptions) -> None:
    """Join the cluster at ``opts.address``, or start an embedded Ray sized to this machine."""
    import ray

    quiet = dict(logging_level=logging.WARNING, log_to_driver=True)
    if opts.address:
        if opts.num_cpus is not None or opts.num_gpus is not None:
            raise UserError("--num-cpus/--num-gpus size an embedded Ray; a cluster (--address) has its own sizes")
        mode = configure_auth(opts.address)
        check_reachable(opts.address)
        # A reachable cluster that refuses us (wrong token) would be retried 20 times, one
        # C++ warning line a second; try a few times and keep the noise for the error.
        os.environ.setdefault("RAY_gcs_server_port_wait_time_s", str(JOIN_ATTEMPTS))
        with _captured_stderr() as noise:
            try:
                ray.init(address=opts.address, **quiet)
                failure = None
            except Exception as e:  # noqa: BLE001 - any failure to join is the user's address/auth
                failure = e
        if failure is None:
            sys.stderr.write("".join(noise))
            return
        text = "".join(noise) + str(failure)
        if "Unauthenticated" in text or "AuthToken" in text or "authentication" in text.lower():
            hint = (
                f"authentication failed (RAY_AUTH_MODE={mode}): give the cluster's token with RAY_AUTH_TOKEN "
                "or RAY_AUTH_TOKEN_PATH and RAY_AUTH_MODE=token"
            )
        else:
            hint = _error_line(str(failure))
        raise UserError(f"cannot join the Ray cluster at {opts.address}: {hint}")
    if opts.num_cpus is not None and opts.num_cpus < 1:
        raise UserError(f"--num-cpus must be >= 1, got {opts.num_cpus}")
    if opts.num_gpus is not None and opts.num_gpus < 0:
        raise UserError(f"--num-gpus must be >= 0, got {opts.num_gpus}")
    configure_auth(None)
    ray.init(
        address="local",  # never RAY_ADDRESS: an embedded Ray was asked for
        num_cpus=opts.num_cpus if opts.num_cpus is not None else machine_cpus(),
        num_gpus=opts.num_gpus,  # None: Ray detects the GPUs it can see (CUDA_VISIBLE_DEVICES)
        include_dashboard=False,
        **quiet,
    )


def check_resources(spec: SweepSpec) -> None:
    """A trial (a pack, in a packed sweep) runs on one node: some alive node must hold its
    CPUs and GPUs."""
    import ray

    need = spec.resources
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    have = [(n["Resources"].get("CPU", 0.0), n["Resources"].get("GPU", 0.0)) for n in nodes]
    if any(cpu + 1e-9 >= need.cpu and gpu + 1e-9 >= need.gpu for cpu, gpu in have):
        return
    best = ", ".join(f"{format_value(c)} CPU + {format_value(g)} GPU" for c, g in have) or "no nodes"
    unit = "pack" if spec.pack > 1 else "trial"
    raise UserError(
        f"each {unit} needs {format_value(need.cpu)} CPU + {format_value(need.gpu)} GPU (spec `resources`) "
        f"but no node of the Ray cluster has that much (nodes: {best}); lower `resources` or give "
        "--num-cpus/--num-gpus / a bigger cluster"
    )


def check_storage_shared(storage: Path, timeout: float = 60.0) -> None:
    """On a multi-node cluster every node must see the storage directory (as Ray Tune
    requires): write a marker here, look for it from a task pinned to each node."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) < 2:
        return
    marker = storage / f".icl-sweep-shared-{uuid.uuid4().hex}"
    marker.write_text("")
    try:
        probe = ray.remote(num_cpus=0)(_exists)
        refs = [
            probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(str(marker))
            for n in nodes
        ]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout)
        seen = {ref: ray.get(ref) for ref in ready}
        missing = [n.get("NodeManagerAddress", n["NodeID"]) for n, ref in zip(nodes, refs) if not seen.get(ref)]
    finally:
        marker.unlink(missing_ok=True)
    if missing:
        raise UserError(
            f"storage {storage} is not visible from Ray node(s) {', '.join(missing)}; on a cluster, "
            "--storage must be a filesystem every node shares (NFS, Lustre, ...)"
        )


def _exists(path: str) -> bool:
    return os.path.exists(path)


# --------------------------------------------------------------------------- lock


def lock_experiment(exp_dir: Path) -> Any:
    """One driver per experiment at a time; the lock dies with its process (even SIGKILL)."""
    f = open(exp_dir / LOCK_FILE, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES):
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise UserError(f"experiment {exp_dir} is being run by {holder}; wait for it or stop it first") from None
        return f  # a filesystem without locks: carry on unprotected
    f.seek(0)
    f.truncate()
    f.write(f"icl-sweep pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    return f


# --------------------------------------------------------------------------- the sweep


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
    """Everything that can be wrong is checked before Ray starts a trial; then fit or resume."""
    import ray
    from ray import tune

    from sweeps.callback import ResultsCallback

    out = out or sys.stdout
    t0 = time.monotonic()
    for var, value in TUNE_ENV.items():
        os.environ.setdefault(var, value)
    exp_dir = spec.exp_dir
    packs = make_packs(spec, trials)  # a spec that cannot be packed: refused now
    packed = spec.pack > 1
    members = {p.pack_id: p.trial_ids for p in packs} if packed else None
    state = experiment_state(spec)
    faults = parse_faults(os.environ.get(FAULTS_ENV), trials)
    trials = with_runtime_paths(trials, spec)
    check_storage_writable(exp_dir.parent)

    held = contextlib.ExitStack()
    start_ray(opts)
    # ResultGrid looks for Tune's per-trial result.json, which TUNE_ENV turns off
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    try:
        check_resources(spec)
        if opts.address:
            check_storage_shared(exp_dir.parent)

        exp_dir.mkdir(parents=True, exist_ok=True)
        held.callback(lock_experiment(exp_dir).close)  # released when run_sweep returns
        state = experiment_state(spec)  # again, under the lock
        if not (exp_dir / SPEC_FILE).exists():
            atomic_write(exp_dir / SPEC_FILE, saved_yaml(spec))
        done = finished_trials(exp_dir, trials)
        where = "cluster " + opts.address if opts.address else "embedded Ray"
        print(
            f"icl-sweep: {'resuming' if state == 'resume' else 'starting'} {exp_dir} on {where}: "
            f"{len(trials)} trials{f' in {len(packs)} packs of up to {spec.pack}' if packed else ''}, "
            f"{len(done)} already finished",
            file=out,
            flush=True,
        )

        trainable = tune.with_resources(
            make_trainable(exp_dir, trials, faults, packs if packed else None), spec.resources.as_ray()
        )
        # the same param space on a restore too: Tune's tuner.pkl does not keep it, and it is
        # what Tune falls back to if its experiment state was never written. In a packed
        # sweep Tune's trials are the packs (pack ids instead of trial ids).
        param_space = {"trial": tune.grid_search([p.pack_id for p in packs])}
        if tune.Tuner.can_restore(str(exp_dir)):
            tuner = tune.Tuner.restore(
                str(exp_dir), trainable=trainable, param_space=param_space, resume_unfinished=True, resume_errored=True
            )
        else:
            dirnames = {p.pack_id: p.dirname for p in packs}
            tuner = tune.Tuner(
                trainable,
                param_space=param_space,
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
                    callbacks=[ResultsCallback(trials, packs=members)],
                    verbose=1,
                ),
            )
        previous = signal.signal(signal.SIGTERM, _sigterm_to_tune)
        try:
            grid = tuner.fit()
        finally:
            signal.signal(signal.SIGTERM, previous)
        outcome = _outcome(grid, exp_dir, trials, time.monotonic() - t0, members)
        prune_ray_checkpoints(grid)
    except BaseException:
        held.close()
        raise
    finally:
        ray.shutdown()

    with held:
        status = {k: (v, outcome.errors.get(k, "")) for k, v in outcome.status.items()}
        n_rows = res.write_results(exp_dir, trials)
        res.write_trials(exp_dir, trials, status, members)
        return _summarize(spec, trials, outcome, n_rows, out, analysis=analysis, packs=packs if packed else None)


def prune_ray_checkpoints(grid: Any) -> None:
    """Delete Ray Tune's copies of checkpoints other than each trial's latest.

    Why here and not through ``CheckpointConfig(num_to_keep)``: Tune deletes an old copy as
    soon as a new one arrives but saves its experiment state to storage only a little
    later; a driver killed in between leaves a state naming a deleted checkpoint, and that
    trial can then never be restored ("does not exist on storage anymore"; seen in this
    project's SIGKILL test). After ``fit()`` returns, Tune has saved its final state and
    waited for it, and that state names exactly these latest checkpoints (others are older,
    or leftovers of a killed driver that no state names).
    """
    for result in grid:
        if getattr(result, "path", None):  # a packed trial's staging left by a killed attempt
            for old in Path(result.path).glob(f"{STAGING_PREFIX}*"):
                shutil.rmtree(old, ignore_errors=True)
        keep = getattr(result, "checkpoint", None)
        if keep is None or not getattr(result, "path", None):
            continue
        keep_name = Path(keep.path).name
        for old in Path(result.path).glob("checkpoint_*"):
            if old.name != keep_name and re.fullmatch(r"checkpoint_\d+", old.name):
                shutil.rmtree(old, ignore_errors=True)


def _sigterm_to_tune(signum: int, frame: Any) -> None:
    """SLURM preemption sends SIGTERM: stop like Ctrl-C (Tune saves its state), resume later."""
    signal.raise_signal(signal.SIGUSR1 if hasattr(signal, "SIGUSR1") else signal.SIGINT)


def _outcome(
    grid: Any,
    exp_dir: Path,
    trials: Sequence[TrialSpec],
    wall_s: float,
    packs: dict[str, tuple[str, ...]] | None = None,
) -> Outcome:
    """Per trial: ERROR (Tune gave up on it), TERMINATED (its run reached its last step, read
    from the run directory) or UNFINISHED (interrupted: Tune marks the trials it stops on
    Ctrl-C as terminated too, so its status alone cannot tell). In a packed sweep (``packs``:
    pack id -> trial ids) a failed pack fails only its members that did not finish."""
    from sweeps.callback import LAST_STATUS

    done = set(finished_trials(exp_dir, trials))
    status = {t.trial_id: "TERMINATED" if t.trial_id in done else "UNFINISHED" for t in trials}
    errors: dict[str, str] = {}
    for trial_id, (state, error) in LAST_STATUS.items():
        if trial_id in status and state == "ERROR":
            status[trial_id] = "ERROR"
            if error:
                errors[trial_id] = error
    for result in grid:  # the exception itself, where Tune kept it
        unit = (result.config or {}).get("trial")
        if result.error is None:
            continue
        error = _error_line(str(result.error)) or type(result.error).__name__
        if packs is None:
            if unit in status:
                status[unit] = "ERROR"
                errors.setdefault(unit, error)
            continue
        for trial_id, (state, own) in res.member_status(exp_dir, trials, packs, {unit: ("ERROR", error)}).items():
            if state == "ERROR":
                status[trial_id] = "ERROR"
                errors.setdefault(trial_id, own)
    return Outcome(status, errors, wall_s)


def _summarize(
    spec: SweepSpec,
    trials: Sequence[TrialSpec],
    outcome: Outcome,
    n_rows: int,
    out: Any,
    *,
    analysis: bool,
    packs: Sequence[PackSpec] | None = None,
) -> int:
    exp_dir = spec.exp_dir
    n_ok = sum(v == "TERMINATED" for v in outcome.status.values())
    print(
        f"\nicl-sweep: {n_ok}/{len(trials)} trials finished, {len(outcome.failed)} failed, "
        f"{len(outcome.unfinished)} unfinished ({outcome.wall_s:.1f} s)",
        file=out,
    )
    by_id = {t.trial_id: t for t in trials}
    pack_of = {m: p for p in packs or () for m in p.trial_ids}
    for trial_id in outcome.failed:
        t = by_id[trial_id]
        point = ", ".join(f"{k}={format_value(v)}" for k, v in t.grid.items())
        log = exp_dir / t.dirname / "error.txt"
        where = ""
        if trial_id in pack_of:  # Tune's error file is the pack's; a diverged model has its own
            where = f" in pack {pack_of[trial_id].pack_id}"
            if not log.is_file():
                log = exp_dir / pack_of[trial_id].dirname / "error.txt"
        print(
            f"  FAILED {trial_id} ({point}){where} after {len(res.attempts(exp_dir / t.dirname))} attempt(s): "
            f"{outcome.errors.get(trial_id, '?')}\n         log: {log}",
            file=out,
        )
    print(f"  experiment: {exp_dir}", file=out)
    print(f"  results:    {exp_dir / res.RESULTS} ({n_rows} rows)", file=out)
    print(f"  trials:     {exp_dir / res.TRIALS}", file=out)
    print(f"  spec:       {exp_dir / SPEC_FILE}", file=out)
    print(f"  runs:       {exp_dir}/<trial>/{res.RUN}/  (config.yaml, metrics.csv, checkpoints)", file=out)
    if outcome.unfinished:
        print("  interrupted: run the same command again to resume", file=out, flush=True)
        return 130
    report = run_analysis(exp_dir) if analysis else f"skipped (--no-analysis); later: icl-analyze {exp_dir}"
    print(f"  analysis:   {report}", file=out, flush=True)
    return 1 if outcome.failed else 0


def run_analysis(exp_dir: Path) -> str:
    """Call the analysis package if it is installed; the sweep's results stand either way."""
    try:
        from analysis.cli import main as analyze  # type: ignore[import-not-found]
    except ImportError:
        return f"not available (the analysis package is not installed yet); later: icl-analyze {exp_dir}"
    out_dir = exp_dir / REPORT_DIR
    try:
        code = analyze([str(exp_dir), "--out", str(out_dir)])
    except SystemExit as e:  # cli_entry reports bad input as exit 2
        code = e.code if isinstance(e.code, int) else 1
    except Exception as e:  # noqa: BLE001 - a broken report must not hide finished results
        return f"failed ({type(e).__name__}: {_error_line(str(e))}); retry: icl-analyze {exp_dir} --out {out_dir}"
    if code:
        return f"failed (exit {code}); retry: icl-analyze {exp_dir} --out {out_dir}"
    return str(out_dir)


def dry_run_table(spec: SweepSpec, trials: Sequence[TrialSpec], out: Any = None) -> None:
    """The trial table and what a real run would do, without starting Ray or writing files."""
    out = out or sys.stdout
    exp_dir = spec.exp_dir
    packs = make_packs(spec, trials)
    packed = spec.pack > 1
    pack_of = {m: p.pack_id for p in packs for m in p.trial_ids}
    state = experiment_state(spec)
    done = set(finished_trials(exp_dir, trials)) if state == "resume" else set()
    keys = list(spec.grid)
    rows = [["trial", *(["pack"] if packed else []), *keys, "status"]]
    for t in trials:
        rows.append(
            [
                t.trial_id,
                *([pack_of[t.trial_id]] if packed else []),
                *(format_value(t.grid[k]) for k in keys),
                "finished" if t.trial_id in done else "to run",
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    base = spec.base or "resolved config"
    over = ", ".join(f"{k}={format_value(v)}" for k, v in spec.overrides.items())
    print(f"experiment: {exp_dir} ({'exists: would resume' if state == 'resume' else 'new'})", file=out)
    print(f"base:       {base}" + (f" + {over}" if over else ""), file=out)
    r = spec.resources
    unit = "pack" if packed else "trial"
    print(
        f"per {unit}:{' ' * (7 - len(unit))}{format_value(r.cpu)} CPU, {format_value(r.gpu)} GPU; max concurrent: "
        f"{spec.max_concurrent or 'as resources allow'}; retries: {spec.max_failures}",
        file=out,
    )
    if packed:
        print(f"packing:    up to {spec.pack} models per trial (train_packed): {len(packs)} packs", file=out)
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip(), file=out)
    in_packs = f" in {len(packs)} packs" if packed else ""
    print(f"{len(trials)} trials{in_packs} ({len(trials) - len(done)} to run); dry run: nothing started", file=out)


