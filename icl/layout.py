"""Where everything lives on disk: the one module that spells file and folder names. Torch-free.

A run directory (:class:`RunLayout`; :class:`icl.train.rundir.RunDir` keeps its books)::

    RUN/
      config.yaml            the fully resolved config (a resume must match it)
      metrics.csv            one row per evaluation (its columns: icl.metrics)
      attention.npz          per-head diagnostics per evaluation: step [E], heads [E, L, H, 5], stats
      events.out.tfevents.*  the same rows and per-head scores for TensorBoard (icl.train.tensorboard)
      checkpoints/
        step_000012000/      one checkpoint (icl.train.checkpoint), the newest N kept:
          state.pt             model and optimiser state_dicts, step, wall time, science config
          manifest.json        its step and the SHA-256 of every file in it
          metrics.csv, attention.npz   the run's logs up to that step
        .tmp-step_*          a checkpoint being built (a crash's leftover: never valid)
      heads.csv, groups.csv, circuit.csv, composition.csv   head attribution over training (icl.circuits)
      circuits/              its plots (analysis.heads)

An experiment directory (:class:`ExperimentDir`), ``STORAGE/NAME``::

    spec.yaml          the saved spec (SavedSpec): resolved, so it reproduces the experiment
    results.csv        one row per model and evaluation (sweeps.results)
    results.parquet    the same table, typed, written with it
    trials.csv         one row per model: grid values, status, last step, attempts, run dir, pack, error
    trackers.json      with --log-to: each model's tracker run and the last step sent (sweeps.trackers)
    report/            the analysis report (ReportDir)
    <model dirname>/   one per grid point (model), e.g. t000_num_classes=100_weight_decay=0_seed=0
      run/             its run directory
      attempts.jsonl   one line per start of its pack's trial (node, pid, step resumed from)
      diverged.txt     why its model diverged, if it did
    <pack dirname>/    Tune's trial directory of a pack: Ray's checkpoint copies (checkpoint_*),
                       the staging of the next one, Tune's error.txt; for a pack of one model it
                       is that model's directory
    tuner.pkl, experiment_state-*.json, ...   Ray Tune's own state of the last run (written,
                       never read: sweeps.experiment.clear_tune_state)
    .icl-sweep.lock, .icl-sweep-ray.json      the running driver's lock, its embedded Ray's record

What is written is read back through the same names: the analysis takes an experiment's run
directories from ``trials.csv`` (:meth:`ExperimentDir.run_dirs`) and its fixed config values
from the saved spec (:meth:`ExperimentDir.saved_spec`), never by searching.
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import yaml

from icl.config import build_config, flatten, get_key, valid_keys
from icl.errors import UserError
from icl.inputs import read_text, read_yaml

# --------------------------------------------------------------------------- a run directory
CONFIG = "config.yaml"
METRICS = "metrics.csv"
ATTENTION = "attention.npz"
CHECKPOINTS = "checkpoints"
EVENTS_PREFIX = "events"  # TensorBoard reads files named events.out.tfevents.*
EVENTS_GLOB = f"{EVENTS_PREFIX}.out.tfevents.*"
TB_REBUILD_PREFIX = ".tb-rebuild-"  # an event file being rebuilt (or a crash's leftover)
HEADS = "heads.csv"
GROUPS = "groups.csv"
CIRCUIT = "circuit.csv"
COMPOSITION = "composition.csv"
PLOTS = "circuits"
_STEP_DIR = re.compile(r"^step_(\d{9,})$")
# inside a checkpoint directory (icl.train.checkpoint)
STATE = "state.pt"
MANIFEST = "manifest.json"
CHECKPOINT_TEMP_PREFIX = ".tmp-"  # a checkpoint being built (or a crash's leftover: never valid)


def checkpoint_name(step: int) -> str:
    return f"step_{step:09d}"


def checkpoint_step(name: str) -> int | None:
    """The step a checkpoint directory's name says (None: not a checkpoint's name)."""
    m = _STEP_DIR.match(name)
    return int(m.group(1)) if m else None


class RunLayout:
    """The paths of one run directory (it need not exist)."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.config = self.path / CONFIG
        self.metrics = self.path / METRICS
        self.attention = self.path / ATTENTION
        self.checkpoints_dir = self.path / CHECKPOINTS
        self.heads = self.path / HEADS
        self.groups = self.path / GROUPS
        self.circuit = self.path / CIRCUIT
        self.composition = self.path / COMPOSITION
        self.plots = self.path / PLOTS

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"

    def checkpoint_dir(self, step: int) -> Path:
        return self.checkpoints_dir / checkpoint_name(step)

    def checkpoints(self) -> list[Path]:
        """Checkpoint directories, oldest first (temporaries excluded; not verified)."""
        if not self.checkpoints_dir.is_dir():
            return []
        return sorted(p for p in self.checkpoints_dir.iterdir() if p.is_dir() and checkpoint_step(p.name) is not None)

    def event_files(self) -> list[Path]:
        return sorted(self.path.glob(EVENTS_GLOB))

    def log_files(self) -> list[Path]:
        """What the run's logs take on disk: metrics, attention, events."""
        return [self.metrics, self.attention, *self.event_files()]

    def head_map_plot(self, step: int) -> Path:
        return self.plots / f"heads_{checkpoint_name(step)}.png"

    @property
    def top_heads_plot(self) -> Path:
        return self.plots / "heads_over_training.png"

    @property
    def groups_plot(self) -> Path:
        return self.plots / "groups_over_training.png"

    @property
    def composition_plot(self) -> Path:
        return self.plots / "composition.png"

    def holds_run(self) -> bool:
        """A config and a checkpoints folder: a run to analyse."""
        return self.config.is_file() and self.checkpoints_dir.is_dir()


# --------------------------------------------------------------------------- an experiment directory
SPEC = "spec.yaml"
RESULTS = "results.csv"
RESULTS_PARQUET = "results.parquet"
TRACKERS = "trackers.json"
TRIALS = "trials.csv"
REPORT = "report"
LOCK = ".icl-sweep.lock"
RAY_RECORD = ".icl-sweep-ray.json"
STORAGE_PROBE_PREFIX = ".icl-sweep-probe-"  # in STORAGE: a write probe, removed at once
RUN = "run"  # a model's run directory inside its directory
ATTEMPTS = "attempts.jsonl"
DIVERGED = "diverged.txt"
FAULT_COUNTER = "faults_injected"  # in a model's directory: faults the tests injected (sweeps.faults)
TUNE_ERROR = "error.txt"  # Ray Tune's name for a failed trial's error, in the pack's directory
STAGING_PREFIX = ".tune-checkpoint-"  # a pack's checkpoint for tune.report, being assembled
RAY_CHECKPOINT = re.compile(r"checkpoint_\d+")  # Ray Tune's names for its checkpoint copies
# Ray Tune's own state in an experiment directory (Ray 2.60): pickles (tuner.pkl, a trial's
# error.pkl, searcher state) and JSON documents holding pickles; never read (sweeps.experiment)
TUNE_STATE_GLOBS = ("*.pkl", "experiment_state-*.json", "basic-variant-state-*.json")
TUNE_TRIAL_STATE = ("error.pkl",)
RAY_OWNER_MARK = "icl-sweep-owner.json"  # in an embedded Ray's session directory (sweeps.leftovers)

# results.csv: TRIAL_ID, one column per grid key, step, the metric columns (icl.metrics)
# trials.csv: TRIAL_ID, one column per grid key, then TRIALS_COLUMNS
TRIAL_ID = "trial_id"
RUN_DIR = "run_dir"  # trials.csv: a model's run directory, relative to the experiment
TRIALS_COLUMNS = ("status", "last_step", "attempts", RUN_DIR, "pack", "error")


class Named(Protocol):
    dirname: str


def _dirname(model: str | Named) -> str:
    return model if isinstance(model, str) else model.dirname


class ExperimentDir:
    """The paths of one sweep's experiment directory (it need not exist). A model (grid point)
    or a pack is given by its directory name or anything with a ``dirname``."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.spec = self.path / SPEC
        self.results = self.path / RESULTS
        self.results_parquet = self.path / RESULTS_PARQUET
        self.trackers = self.path / TRACKERS
        self.trials = self.path / TRIALS
        self.report = self.path / REPORT
        self.lock = self.path / LOCK
        self.ray_record = self.path / RAY_RECORD

    def __repr__(self) -> str:
        return f"ExperimentDir({str(self.path)!r})"

    def model_dir(self, model: str | Named) -> Path:
        return self.path / _dirname(model)

    def run_dir(self, model: str | Named) -> Path:
        return self.model_dir(model) / RUN

    def run_dir_entry(self, model: str | Named) -> str:
        """A model's run directory as ``trials.csv`` records it (relative to the experiment)."""
        return f"{_dirname(model)}/{RUN}"

    def attempts(self, model: str | Named) -> Path:
        return self.model_dir(model) / ATTEMPTS

    def diverged(self, model: str | Named) -> Path:
        return self.model_dir(model) / DIVERGED

    def pack_dir(self, pack: str | Named) -> Path:
        """Tune's trial directory of a pack."""
        return self.path / _dirname(pack)

    def tune_error(self, pack: str | Named) -> Path:
        return self.pack_dir(pack) / TUNE_ERROR

    def holds_experiment(self) -> bool:
        return self.spec.is_file()

    def saved_spec(self) -> SavedSpec | None:
        """The spec as the sweep saved it (None: there is none)."""
        return read_saved_spec(self.spec) if self.spec.is_file() else None

    def run_dirs(self) -> dict[str, Path]:
        """Model id -> its run directory, as ``trials.csv`` records them ({} before the sweep
        has written it). A ``trials.csv`` that is not the sweep's is a :class:`UserError`."""
        if not self.trials.is_file():
            return {}
        rows = list(csv.DictReader(io.StringIO(read_text(self.trials, "trials table"))))
        if rows and not {TRIAL_ID, RUN_DIR} <= set(rows[0]):
            raise UserError(f"{self.trials} lacks the columns {TRIAL_ID} and {RUN_DIR}: it is not a sweep's "
                            "trials table; check the path")
        return {r[TRIAL_ID]: self.path / r[RUN_DIR] for r in rows if r.get(TRIAL_ID) and r.get(RUN_DIR)}


def storage_probe(storage: Path, unique: str) -> Path:
    return storage / f"{STORAGE_PROBE_PREFIX}{unique}"


# --------------------------------------------------------------------------- the saved spec
# The sweep saves its spec resolved (sweeps.spec.saved_yaml): the keys of a spec (name,
# description, base, overrides, grid, resources, ...) plus ``resolved``, the whole base config
# with the overrides applied, so the file is itself a spec that reproduces the experiment.
SPEC_HEADER = (
    "# Written by icl-sweep from {source}: the resolved sweep spec of this\n"
    "# experiment. Re-running the same command resumes it; so does `icl-sweep <this file>`.\n"
)


def saved_spec_text(doc: dict[str, Any], source: str) -> str:
    """The saved spec's text: the header, then ``doc`` as YAML in its key order."""
    return SPEC_HEADER.format(source=source or "a spec") + yaml.safe_dump(doc, sort_keys=False)


@dataclass(frozen=True)
class SavedSpec:
    """An experiment's ``spec.yaml``, read back for what the analysis needs."""

    path: Path
    raw: dict[str, Any]

    @property
    def grid(self) -> dict[str, list[Any]]:
        """The ``grid:`` mapping, every value as a list (a scalar is a one-value grid)."""
        grid = self.raw.get("grid")
        if not isinstance(grid, dict):
            return {}
        return {str(k): (list(v) if isinstance(v, (list, tuple)) else [v]) for k, v in grid.items()}

    def value(self, key: str) -> Any:
        """A config key's value for every model (None: not known). As the sweep resolves a
        spec: ``resolved`` (what it saves) holds every key; else ``overrides`` on ``base``."""
        resolved = self.raw.get("resolved")
        if isinstance(resolved, dict):
            flat = flatten(resolved)
            if key in flat:
                return flat[key]
        overrides = self._overrides()
        if key in overrides:
            return overrides[key]
        cfg = self._base_config(overrides)
        try:
            return None if cfg is None else get_key(cfg, key)
        except (UserError, AttributeError):
            return None

    def config(self) -> dict[str, Any] | None:
        """The config every model starts from (before its grid values), flattened: ``resolved``,
        else ``overrides`` on ``base``; None where neither resolves."""
        resolved = self.raw.get("resolved")
        if isinstance(resolved, dict):
            return flatten(resolved)
        cfg = self._base_config(self._overrides())
        return None if cfg is None else flatten(cfg.to_dict())

    def _overrides(self) -> dict[str, Any]:
        return flatten(self.raw["overrides"]) if isinstance(self.raw.get("overrides"), dict) else {}

    def _base_config(self, overrides: dict[str, Any]) -> Any:
        base = self.raw.get("base")
        if not isinstance(base, str):
            return None
        keys = set(valid_keys())
        try:
            return build_config(base, {k: v for k, v in overrides.items() if k in keys})
        except (UserError, TypeError, AttributeError):
            return None


def read_saved_spec(path: Path) -> SavedSpec:
    return SavedSpec(Path(path), read_yaml(path, "sweep spec"))


# --------------------------------------------------------------------------- the report
SUMMARY = "summary.csv"
REPORT_MD = "report.md"
REPORT_HTML = "report.html"  # report.md as one self-contained page (analysis.html)
PLOTS_PNG = {  # analysis.plots.write_plots: a plot's name -> its file in the report
    "curves": "curves.png",
    "curves_logx": "curves_logx.png",
    "evaluators": "evaluators.png",
    "peak_final": "peak_final_vs_wd.png",
    "heatmap": "heatmap_icl.png",
    "attention": "attention.png",
}


class ReportDir:
    """The paths of an analysis report (``icl-analyze --out``; a sweep's ``report/``)."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.summary = self.path / SUMMARY
        self.report = self.path / REPORT_MD
        self.html = self.path / REPORT_HTML

    def __repr__(self) -> str:
        return f"ReportDir({str(self.path)!r})"

    def plot(self, name: str) -> Path:
        """One of the report's plots, by its name in ``PLOTS_PNG``."""
        return self.path / PLOTS_PNG[name]

    def cell_attention_plot(self, slug: str) -> Path:
        """The attention plot of one cell of the grid (``slug``: the cell as a file name)."""
        return self.path / f"attention_{slug}.png"
