"""An experiment directory (``STORAGE/NAME``, laid out in :mod:`icl.layout`): whether it may
be (re)used, its lock, and the pruning of Ray's checkpoint copies.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import socket
import uuid
from pathlib import Path
from typing import Any, Sequence

from icl.config import build_config, cache_dir, data_roots, read_yaml
from icl.errors import UserError
from icl.io import remove_stale_temporaries, writing_to
from icl.layout import (LOCK, RAY_CHECKPOINT, SPEC, STAGING_PREFIX, TUNE_STATE_GLOBS, TUNE_TRIAL_STATE, ExperimentDir,
                        storage_probe)
from icl.train.checkpoint import step_of as ckpt_step
from sweeps import results as res
from sweeps.spec import PackSpec, SweepSpec, TrialSpec, differences, identity, parse_spec

# Ray Tune's own state in an experiment directory (icl.layout.TUNE_STATE_GLOBS) holds pickles,
# and a pickle runs whatever code it names when loaded, so the sweep never loads one (no
# Tuner.restore): every run of the command builds a new Tune run from the run directories,
# and removes these first.


def check_storage_writable(storage: Path) -> None:
    """Create the storage directory and write a probe file, so a bad path fails now."""
    try:
        storage.mkdir(parents=True, exist_ok=True)
        probe = storage_probe(storage, f"{os.getpid()}-{uuid.uuid4().hex[:8]}")
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
    saved = ExperimentDir(exp).spec
    if not saved.is_file():
        if any(p.name != LOCK for p in exp.iterdir()):
            raise UserError(
                f"{exp} exists but holds no icl-sweep experiment (no {SPEC}); it is never "
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
    """Trials whose run reached its last step (from the trainer's own metrics.csv). A run
    directory whose ``config.yaml`` is not its trial's (edited after the trial finished, or
    copied from elsewhere) is refused, finished or not: its results would be another run's."""
    done = []
    for t in trials:
        run = res.run_dir(exp_dir, t)
        advice = f"it is not model {t.trial_id}'s: put its config.yaml back, or move it away to train the model again"
        run.check_config(build_config(t.config), advice)
        if run.finished(int(t.config["train.steps"])):
            done.append(t.trial_id)
    return done


def with_runtime_paths(trials: Sequence[TrialSpec], spec: SweepSpec) -> list[TrialSpec]:
    """Absolute data/cache paths, a thread count and the TensorBoard HParams keys (the grid's)
    in each trial's config.

    Why: Ray runs trials in other working directories and, on a cluster, in other
    environments (the raylet's, not this shell's), so relative paths and ``ICL_DATA_DIR``
    would not resolve there. These are runtime keys: they do not change the science.
    """
    from icl.data.omniglot import find_source, locate_root  # cheap: looks for the files, checks SHA256SUMS

    out = []
    found: dict[tuple[Path, ...], Path] = {}
    for t in trials:
        cfg = build_config(t.config)
        flat = dict(t.config)
        roots = tuple(data_roots(cfg))
        if roots not in found:  # the first root holding Omniglot, or where it was downloaded to
            found[roots] = locate_root(cfg)
        flat["data.root"] = str(found[roots])
        flat["data.cache_dir"] = str(cache_dir(cfg))
        if not flat.get("train.threads"):
            flat["train.threads"] = max(1, int(spec.resources.cpu))
        if not flat.get("train.hparams"):  # TensorBoard's HParams: the grid's keys
            flat["train.hparams"] = ",".join(spec.grid)
        out.append(TrialSpec(t.trial_id, t.dirname, t.grid, flat))

    for root in sorted({t.config["data.root"] for t in out}):
        find_source(Path(root))  # missing or corrupt data: one error now, not one per trial
    return out



def lock_experiment(exp_dir: Path) -> Any:
    """One driver per experiment at a time; the lock dies with its process (even SIGKILL).
    Taking it also clears the temporaries of the experiment's tables that a killed driver left."""
    path = ExperimentDir(exp_dir).lock
    with writing_to(path):  # a full disk names the lock file
        f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES):
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise UserError(f"experiment {exp_dir} is being run by {holder}; wait for it or stop it first") from None
        return f  # a filesystem without locks: carry on unprotected
    try:
        with writing_to(path):
            f.seek(0)
            f.truncate()
            f.write(f"icl-sweep pid {os.getpid()} on {socket.gethostname()}\n")
            f.flush()
    except BaseException:
        with contextlib.suppress(OSError):  # closing flushes the same unwritable bytes again
            f.close()
        raise
    remove_stale_temporaries(exp_dir)
    return f



def clear_tune_state(exp_dir: Path, packs: Sequence[PackSpec], trials: Sequence[TrialSpec],
                     to_run: Sequence[str]) -> list[str]:
    """Before a new Tune run in ``exp_dir``: remove the state an earlier Tune run left (never
    read; see ``TUNE_STATE_GLOBS``), after taking what is useful from it without unpickling:
    each model of the packs ``to_run`` (ids) whose run directory lost its newer checkpoints (a
    moved or deleted run directory) gets the newest of Tune's copies (``checkpoint_*/<trial
    id>/``, plain checkpoint directories, verified when the trainer loads them). Returns the
    trial ids whose run was restored that way. Call while holding the experiment's lock."""
    by_id = {t.trial_id: t for t in trials}
    restored = []
    for pack in packs:
        tune_dir = Path(exp_dir) / pack.dirname
        for name in TUNE_TRIAL_STATE:
            (tune_dir / name).unlink(missing_ok=True)
        if pack.pack_id not in to_run:
            continue  # finished: Tune's latest copies stay, as the sweep leaves them
        copies = sorted(p for p in tune_dir.glob("checkpoint_*") if p.is_dir() and not p.is_symlink())
        for member in pack.trial_ids:
            found = [(step, c / member) for c in copies if (c / member).is_dir()
                     and not (c / member).is_symlink() and (step := ckpt_step(c / member)) is not None]
            if found and res.run_dir(exp_dir, by_id[member]).install(max(found)[1]) is not None:
                restored.append(member)
        for old in copies:
            shutil.rmtree(old, ignore_errors=True)
    for pattern in TUNE_STATE_GLOBS:
        for old in Path(exp_dir).glob(pattern):
            if old.is_file() or old.is_symlink():
                old.unlink(missing_ok=True)
    return restored


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
        for old in Path(result.path).iterdir():
            if old.name != keep_name and RAY_CHECKPOINT.fullmatch(old.name):
                shutil.rmtree(old, ignore_errors=True)
