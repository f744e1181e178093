"""One sweep, parsed once: :class:`Experiment` (its spec, its models, their packs, its identity
and its directory), and the directory's life: whether it may be (re)used, its lock, Ray Tune's
state in it and the pruning of Ray's checkpoint copies.

Everything downstream (the dry run, the estimate, the driver, the trainable, the tables, the
live table, the trackers) takes the models and packs from the one :class:`Experiment` the
command line built: the grid is expanded and every config built and validated once.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import fcntl
import os
import shutil
import socket
import uuid
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Any, Sequence

from icl.config import cache_dir, data_roots, read_yaml, set_key
from icl.errors import UserError
from icl.io import remove_stale_temporaries, writing_to
from icl.layout import (LOCK, RAY_CHECKPOINT, SPEC, STAGING_PREFIX, TUNE_STATE_GLOBS, TUNE_TRIAL_STATE, ExperimentDir,
                        storage_probe)
from icl.train.rundir import RunDir
from sweeps.spec import (ModelSpec, PackSpec, SweepSpec, differences, expand, identity, load_spec, make_packs,
                         parse_spec, saved_yaml)

# Ray Tune's own state in an experiment directory (icl.layout.TUNE_STATE_GLOBS) holds pickles,
# and a pickle runs whatever code it names when loaded, so the sweep never loads one (no
# Tuner.restore): every run of the command builds a new Tune run from the run directories,
# and removes these first.


@dataclass(frozen=True)
class Experiment:
    """A sweep as the command line gave it: the spec, its models (grid points, configs built and
    validated) and packs (Tune's trials), its identity (what a resume must match) and its
    directory. Built once (:meth:`build`); :meth:`with_runtime_paths` gives the copy whose
    configs run here and on Ray's workers."""

    spec: SweepSpec
    models: tuple[ModelSpec, ...]
    packs: tuple[PackSpec, ...]
    identity: dict[str, Any]

    @classmethod
    def build(cls, spec: SweepSpec) -> "Experiment":
        """Expand the grid, build and check every model's config, pack them: UserError now,
        before Ray, for anything that cannot be trained or packed."""
        models = expand(spec)
        return cls(spec, tuple(models), tuple(make_packs(spec, models)), identity(spec))

    @property
    def dir(self) -> ExperimentDir:
        return ExperimentDir(self.spec.exp_dir)

    @property
    def path(self) -> Path:
        return self.spec.exp_dir

    @cached_property
    def members(self) -> dict[str, tuple[str, ...]]:
        """Pack id -> its models' ids (the tables' ``pack`` column, Tune's view)."""
        return {p.pack_id: p.trial_ids for p in self.packs}

    @cached_property
    def pack_of(self) -> dict[str, PackSpec]:
        return {m: p for p in self.packs for m in p.trial_ids}

    def run_dir(self, model: ModelSpec) -> RunDir:
        return RunDir(self.dir.run_dir(model))

    def saved_yaml(self) -> str:
        return saved_yaml(self.spec, self.identity)

    def state(self) -> str:
        """'new' or 'resume'; refuses a directory holding another experiment or a different spec."""
        exp = self.path
        if not exp.exists():
            return "new"
        if not exp.is_dir():
            raise UserError(f"{exp} exists and is not a directory; choose another --name or --storage")
        saved = self.dir.spec
        if not saved.is_file():
            if any(p.name != LOCK for p in exp.iterdir()):
                raise UserError(
                    f"{exp} exists but holds no icl-sweep experiment (no {SPEC}); it is never "
                    "overwritten: choose another --name or --storage"
                )
            return "new"
        try:
            old = parse_spec(read_yaml(saved, "saved sweep spec"), source=saved, storage=self.spec.storage,
                             name=self.spec.name)
            old_id = identity(old)
        except UserError as e:
            raise UserError(f"cannot compare with the saved spec {saved}: {e}") from None
        diffs = differences(old_id, self.identity)
        if diffs:
            shown = "; ".join(diffs[:6]) + (f"; and {len(diffs) - 6} more" if len(diffs) > 6 else "")
            raise UserError(
                f"experiment {exp} already exists with a different spec ({shown}); results are never "
                "overwritten: re-run with the saved spec to resume, or choose another --name"
            )
        return "resume"

    def finished(self) -> list[str]:
        """Models whose run reached its last step (from the trainer's own metrics.csv). A run
        directory whose ``config.yaml`` is not its model's (edited after it finished, or copied
        from elsewhere) is refused, finished or not: its results would be another run's."""
        done = []
        for m in self.models:
            run = self.run_dir(m)
            advice = (f"it is not model {m.trial_id}'s: put its config.yaml back, or move it away to train the "
                      "model again")
            run.check_config(m.config, advice)
            if run.finished(m.config.train.steps):
                done.append(m.trial_id)
        return done

    def with_runtime_paths(self) -> "Experiment":
        """The experiment with absolute data/cache paths, a thread count and the TensorBoard
        HParams keys (the grid's) in each model's config; missing or corrupt data refused now.

        Why: Ray runs trials in other working directories and, on a cluster, in other
        environments (the raylet's, not this shell's), so relative paths and ``ICL_DATA_DIR``
        would not resolve there. These are runtime keys: they do not change the science.
        """
        from icl.data.omniglot import find_source, locate_root  # cheap: looks for the files, checks SHA256SUMS

        found: dict[tuple[Path, ...], Path] = {}
        models: dict[str, ModelSpec] = {}
        for m in self.models:
            cfg = copy.deepcopy(m.config)
            roots = tuple(data_roots(cfg))
            if roots not in found:  # the first root holding Omniglot, or where it was downloaded to
                found[roots] = locate_root(cfg)
            runtime = {"data.root": str(found[roots]), "data.cache_dir": str(cache_dir(cfg))}
            if not cfg.train.threads:
                runtime["train.threads"] = max(1, int(self.spec.resources.cpu))
            if not cfg.train.hparams:  # TensorBoard's HParams: the grid's keys
                runtime["train.hparams"] = ",".join(self.spec.grid)
            for key, value in runtime.items():
                set_key(cfg, key, value)
            models[m.trial_id] = replace(m, config=cfg)
        for root in sorted(set(found.values())):
            find_source(root)  # missing or corrupt data: one error now, not one per trial
        packs = tuple(replace(p, models=tuple(models[m.trial_id] for m in p.models)) for p in self.packs)
        return replace(self, models=tuple(models.values()), packs=packs)


def load_experiment(name_or_path: str, **options: Any) -> Experiment:
    """The experiment of a spec file or shipped spec (``options``: :func:`sweeps.spec.load_spec`'s)."""
    return Experiment.build(load_spec(name_or_path, **options))


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



def clear_tune_state(exp: Experiment, to_run: Sequence[PackSpec]) -> list[str]:
    """Before a new Tune run: remove the state an earlier Tune run left (never read; see
    ``TUNE_STATE_GLOBS``), after taking what is useful from it without unpickling: each model
    of the packs ``to_run`` whose run directory lost its newer checkpoints (a moved or deleted
    run directory) gets the newest of Tune's copies (``checkpoint_*/<trial id>/``, plain
    checkpoint directories, verified when the trainer loads them). Returns the ids of the
    models restored that way. Call while holding the experiment's lock."""
    from icl.train.checkpoint import step_of

    running = {p.pack_id for p in to_run}
    restored = []
    for pack in exp.packs:
        tune_dir = exp.dir.pack_dir(pack)
        for name in TUNE_TRIAL_STATE:
            (tune_dir / name).unlink(missing_ok=True)
        if pack.pack_id not in running:
            continue  # finished: Tune's latest copies stay, as the sweep leaves them
        copies = sorted(p for p in tune_dir.glob("checkpoint_*") if p.is_dir() and not p.is_symlink())
        for model in pack.models:
            found = [(step, c / model.trial_id) for c in copies if (c / model.trial_id).is_dir()
                     and not (c / model.trial_id).is_symlink() and (step := step_of(c / model.trial_id)) is not None]
            if found and exp.run_dir(model).install(max(found)[1]) is not None:
                restored.append(model.trial_id)
        for old in copies:
            shutil.rmtree(old, ignore_errors=True)
    for pattern in TUNE_STATE_GLOBS:
        for old in exp.path.glob(pattern):
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
