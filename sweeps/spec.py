"""The sweep spec: one YAML file that names a base config, overrides, a grid and how to run it.

Why a file and not flags: a sweep is an experiment that must be resumable and comparable
later. The spec, resolved (every config default filled in), is saved next to the results as
``STORAGE/NAME/spec.yaml`` and checked on every resume, so an experiment directory always
holds one experiment. Schema (every key is checked; unknown keys are errors)::

    name: smoke                # experiment name; default: the spec file's stem; --name overrides
    description: free text     # optional
    base: tiny                 # preset name, or a config YAML path (relative to this file)
    overrides:                 # dotted config keys (or nested mappings) applied on top of base
      train.steps: 100
    grid:                      # dotted config key -> list of values; the trials are the cross
      data.num_classes: [16, 64]   # product, in this key order (the last key varies fastest)
      seed: [0, 1]
    resources: {cpu: 1, gpu: 0}    # per trial; gpu may be fractional (0.25 = 4 trials per GPU)
    max_concurrent: null       # trials at once; null = as many as the resources allow
    max_failures: 2            # retries of a crashed trial (each resumes from its checkpoint)
    checkpoint: {num_to_keep: null}  # Ray Tune's copies kept per trial while running (null =
                               # all; older ones are pruned when the sweep ends, see
                               # sweeps.experiment.prune_ray_checkpoints)
    pack: 1                    # models trained together in one Tune trial (icl.train.train_packed):
                               # grid points differing only in seed / optim.weight_decay are
                               # grouped into packs of at most this many; 1 = one model per trial
    heads: false               # head attribution (icl.circuits.update_run) on every trial's run
                               # directory at each checkpoint, as it is written; analysis only
    log_to: []                 # trackers each model is also sent to: mlflow, wandb (sweeps.trackers;
                               # --log-to adds to these); not part of the experiment's identity
    storage: experiments       # parent directory of the experiment; --storage overrides
    resolved: {...}            # written by icl-sweep into the saved spec.yaml only: the exact
                               # base config, so a saved spec reproduces its experiment even if
                               # the preset changes later (takes precedence over `base`)
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import Any, Iterable, Sequence

from icl.config import (
    PER_MODEL_KEYS,
    Config,
    build_config,
    check_packable,
    config_source,
    flatten,
    get_key,
    parse_overrides,
    presets,
    read_yaml,
    science_dict,
    set_key,
    valid_keys,
)
from icl.errors import UserError
from icl.inputs import user_path
from icl.layout import ExperimentDir, saved_spec_text
from icl.schedule import lr_sum, shrink_text

SPEC_DIR = Path(__file__).resolve().parent
DEFAULT_STORAGE = "experiments"
SPEC_KEYS = (
    "name",
    "description",
    "base",
    "overrides",
    "grid",
    "resources",
    "max_concurrent",
    "max_failures",
    "checkpoint",
    "pack",
    "heads",
    "log_to",
    "storage",
    "resolved",
)
RESOURCE_KEYS = ("cpu", "gpu")
TRACKERS = ("mlflow", "wandb")  # what log_to / --log-to may name (sweeps.trackers)
CHECKPOINT_KEYS = ("num_to_keep",)
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
MAX_NAME = 100  # an experiment's directory name (trial directories add ~60 characters to it)
# Config keys added after icl-sweep first wrote `resolved:` into saved specs: an older saved
# spec lacks them, and gets their defaults (what its runs trained with). Every other key must
# be in `resolved` (extend this set when a config key is added).
ADDED_AFTER_RESOLVED = frozenset({"data.custom", "optim.decay_modules", "optim.l2", "optim.l2_scope", "train.compile",
                                  "train.cuda_graph", "train.pack_forward", "train.hparams"})
MAX_COUNT = 1_000_000  # every count and resource of a spec is finite and at most this
# A trial runs on one node: no node has more (the largest GPU servers have 16 GPUs, 8 x 96 cores).
MAX_TRIAL_CPUS, MAX_TRIAL_GPUS = 1024, 64


@dataclass(frozen=True)
class Resources:
    """What one trial reserves on one node; Ray packs trials onto nodes by these numbers."""

    cpu: float = 1.0
    gpu: float = 0.0

    def as_ray(self) -> dict[str, float]:
        return {"cpu": self.cpu, "gpu": self.gpu}


@dataclass
class SweepSpec:
    """A validated spec; ``base_config`` is the flat base mapping (preset, file or ``resolved``)."""

    name: str
    base: str | None
    base_config: dict[str, Any]
    overrides: dict[str, Any]
    grid: dict[str, list[Any]]
    resources: Resources = field(default_factory=Resources)
    max_concurrent: int | None = None
    max_failures: int = 2
    checkpoint_keep: int | None = None
    pack: int = 1  # models per Tune trial (train_packed); 1 = one model per trial
    heads: bool = False  # head attribution at each checkpoint (not part of the identity: analysis only)
    log_to: tuple[str, ...] = ()  # trackers (sweeps.trackers); not part of the identity either
    storage: str = DEFAULT_STORAGE
    description: str = ""
    source: str = ""

    @property
    def exp_dir(self) -> Path:
        """``STORAGE/NAME``, absolute (trials run in other working directories)."""
        return (Path(self.storage).expanduser() / self.name).resolve()


@dataclass(frozen=True)
class ModelSpec:
    """One grid point, a model: a stable id (its position in the grid; ``trial_id`` in the
    tables), its directory, its grid values and its config (built and validated once)."""

    trial_id: str
    dirname: str
    grid: dict[str, Any]
    config: Config

    def flat_config(self) -> dict[str, Any]:
        """The config as dotted keys -> values (what a tracker logs as parameters)."""
        return flatten(self.config.to_dict())


@dataclass(frozen=True)
class PackSpec:
    """One Tune trial: up to ``pack`` models trained as one pack by ``icl.train.train_packed``,
    everything its trainable needs (frozen and picklable: Tune ships it to a worker). Each
    model keeps its own id and run directory (``STORAGE/NAME/<model dirname>/run``);
    ``dirname`` is the Tune trial directory of the pack (Ray's checkpoint copies, Tune's error
    file)."""

    pack_id: str
    dirname: str
    models: tuple[ModelSpec, ...]
    exp_dir: Path  # the experiment directory, absolute

    @property
    def trial_ids(self) -> tuple[str, ...]:
        return tuple(m.trial_id for m in self.models)

    @property
    def configs(self) -> list[Config]:
        return [m.config for m in self.models]

    @property
    def exp(self) -> ExperimentDir:
        return ExperimentDir(self.exp_dir)

    @property
    def run_dirs(self) -> list[Path]:
        return [self.exp.run_dir(m) for m in self.models]


# --------------------------------------------------------------------------- loading


def shipped_specs() -> list[str]:
    return sorted(p.stem for p in SPEC_DIR.glob("*.yaml"))


def resolve_spec_path(name_or_path: str) -> Path:
    """A path to a YAML file, or the name of a spec shipped in ``sweeps/`` (``smoke``)."""
    path = user_path(name_or_path, "sweep spec")
    if path.suffix in (".yaml", ".yml") or path.exists() or "/" in name_or_path:
        if path.exists() and not path.is_file():
            raise UserError(f"sweep spec {path} is not a regular file (a folder, device or pipe); give a .yaml file")
        if not path.is_file():
            raise UserError(f"sweep spec {path} does not exist (shipped specs: {', '.join(shipped_specs())})")
        return path.resolve()
    shipped = SPEC_DIR / f"{name_or_path}.yaml"
    if not shipped.is_file():
        raise UserError(
            f"unknown sweep spec {name_or_path!r}: give a .yaml path or a shipped spec "
            f"({', '.join(shipped_specs())})"
        )
    return shipped


def load_spec(
    name_or_path: str,
    *,
    storage: str | None = None,
    name: str | None = None,
    sets: list[str] | None = None,
    log_to: list[str] | None = None,
) -> SweepSpec:
    """Read and validate a spec; command-line ``--storage``, ``--name``, ``--set`` win over it,
    ``--log-to`` adds trackers to its ``log_to``."""
    path = resolve_spec_path(name_or_path)
    raw = read_yaml(path, "sweep spec")
    return parse_spec(raw, source=path, storage=storage, name=name, sets=sets, log_to=log_to)


def parse_spec(
    raw: dict[str, Any],
    *,
    source: Path | None = None,
    storage: str | None = None,
    name: str | None = None,
    sets: list[str] | None = None,
    log_to: list[str] | None = None,
) -> SweepSpec:
    """Validate a raw spec mapping; every message names the key and says how to fix it."""
    where = f"sweep spec {source}" if source else "sweep spec"
    unknown = sorted(set(raw) - set(SPEC_KEYS))
    if unknown:
        raise UserError(f"{where}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(SPEC_KEYS)}")

    spec_name = name if name is not None else raw.get("name", source.stem if source else None)
    if not isinstance(spec_name, str) or not _NAME_RE.match(spec_name) or len(spec_name) > MAX_NAME:
        shown = spec_name if not isinstance(spec_name, str) or len(spec_name) <= 60 else spec_name[:40] + "..."
        raise UserError(
            f"{where}: name {shown!r} must be a plain directory name (letters, digits, . _ -) of at most "
            f"{MAX_NAME} characters; set `name:` in the spec or pass --name"
        )

    description = raw.get("description") or ""
    if not isinstance(description, str):
        raise UserError(f"{where}: description must be text")

    try:
        base, base_config = _base(raw, source, where)
    except UserError as e:
        msg = str(e)
        raise UserError(msg if msg.startswith(where) else f"{where}: base: {msg}") from None

    overrides = _mapping(raw.get("overrides"), f"{where}: overrides")
    cli = parse_overrides(sets)
    grid_raw = _mapping(raw.get("grid"), f"{where}: grid")
    keys = set(valid_keys())
    for key in list(overrides) + list(cli):
        if key not in keys:
            raise UserError(f"{where}: unknown config key {key!r} in overrides/--set; {_near(key, keys)}")
    for key in cli:
        if key in grid_raw:
            raise UserError(f"--set {key}=... conflicts with the grid over {key!r}; drop one of them")
    overrides.update(cli)

    grid = _grid(grid_raw, overrides, keys, where)

    resources = _resources(raw.get("resources"), where)
    max_concurrent = raw.get("max_concurrent")
    if max_concurrent is not None and not _is_int(max_concurrent, minimum=1):
        raise UserError(f"{where}: max_concurrent must be an integer >= 1 (at most {MAX_COUNT}) or null, "
                        f"got {max_concurrent!r}")
    max_failures = raw.get("max_failures", 2)
    if not _is_int(max_failures, minimum=0):
        raise UserError(f"{where}: max_failures (retries per trial) must be an integer >= 0 (at most {MAX_COUNT}), "
                        f"got {max_failures!r}")
    ckpt = _mapping(raw.get("checkpoint"), f"{where}: checkpoint", flat=False)
    bad = sorted(set(ckpt) - set(CHECKPOINT_KEYS))
    if bad:
        raise UserError(f"{where}: unknown checkpoint key(s) {', '.join(bad)}; valid: {', '.join(CHECKPOINT_KEYS)}")
    keep = ckpt.get("num_to_keep")
    if keep is not None and not _is_int(keep, minimum=1):
        raise UserError(f"{where}: checkpoint.num_to_keep must be an integer >= 1 (at most {MAX_COUNT}) or null "
                        f"(all), got {keep!r}")
    pack = raw.get("pack", 1)
    if not _is_int(pack, minimum=1):
        raise UserError(
            f"{where}: pack must be an integer >= 1 (models trained together in one trial; 1 = one "
            f"model per trial; at most {MAX_COUNT}), got {pack!r}"
        )

    heads = raw.get("heads", False)
    if not isinstance(heads, bool):
        raise UserError(f"{where}: heads must be true or false (head attribution at each checkpoint), got {heads!r}")

    spec_log_to = raw.get("log_to") or []
    if not isinstance(spec_log_to, list):
        raise UserError(f"{where}: log_to must be a list of trackers, e.g. [mlflow, wandb], got {spec_log_to!r}")
    trackers = parse_trackers([*spec_log_to, ",".join(parse_trackers(log_to or [], "--log-to"))], f"{where}: log_to")

    spec_storage = storage if storage is not None else raw.get("storage", DEFAULT_STORAGE)
    if not isinstance(spec_storage, str) or not spec_storage.strip():
        raise UserError(f"{where}: storage must be a directory path, got {spec_storage!r}")
    if "://" in spec_storage:
        raise UserError(
            f"storage {spec_storage!r} is a URI; the trainer writes run directories with plain file "
            "I/O, so give a (shared) filesystem path"
        )
    user_path(spec_storage, f"{where}: storage")  # refused now if it cannot name a folder

    spec = SweepSpec(
        name=spec_name,
        base=base,
        base_config=base_config,
        overrides=overrides,
        grid=grid,
        resources=resources,
        max_concurrent=max_concurrent,
        max_failures=int(max_failures),
        checkpoint_keep=keep,
        pack=int(pack),
        heads=heads,
        log_to=trackers,
        storage=spec_storage,
        description=description,
        source=str(source) if source else "",
    )
    _check_device(spec, where)
    return spec


def parse_trackers(values: Iterable[Any], where: str) -> tuple[str, ...]:
    """``["mlflow,wandb"]``, ``["mlflow", "wandb"]`` ... -> the trackers named, once each, in a
    fixed order; UserError naming ``where`` for anything else."""
    names: list[str] = []
    for value in values:
        if not isinstance(value, str):
            raise UserError(f"{where}: {value!r} is not a tracker name; choose from {', '.join(TRACKERS)}")
        for name in (v.strip().lower() for v in value.split(",")):
            if name and name not in TRACKERS:
                raise UserError(f"{where}: unknown tracker {name!r}; choose from {', '.join(TRACKERS)}")
            if name:
                names.append(name)
    return tuple(t for t in TRACKERS if t in names)


def _base(raw: dict[str, Any], source: Path | None, where: str) -> tuple[str | None, dict[str, Any]]:
    """The base config mapping: ``resolved`` (saved specs) wins, else a preset or a file."""
    base = raw.get("base")
    if base is not None and not isinstance(base, str):
        raise UserError(f"{where}: base must be a preset name ({', '.join(presets())}) or a config file path")
    if raw.get("resolved") is not None:
        resolved = _mapping(raw["resolved"], f"{where}: resolved")
        missing = sorted(set(flatten(Config().to_dict())) - set(flatten(resolved)) - ADDED_AFTER_RESOLVED)
        if missing:  # not written by icl-sweep: `resolved: {}` would silently mean the paper defaults
            shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
            raise UserError(f"{where}: resolved lacks {len(missing)} config key(s) ({shown}); icl-sweep writes the "
                            "whole config there: remove `resolved:` to build the config from `base:`")
        return base, resolved
    if base is None:
        raise UserError(f"{where}: missing `base:` (a preset: {', '.join(presets())}; or a config .yaml path)")
    if base.endswith((".yaml", ".yml")) or "/" in base:
        path = Path(base)
        if not base.startswith("~") and not path.is_absolute() and source is not None:
            path = source.parent / path
        path = user_path(path, f"{where}: base config file")
        if not path.is_file():
            raise UserError(f"{where}: base config file {path} does not exist")
        base = str(path.resolve())
        return base, flatten(read_yaml(path))
    return base, flatten(config_source(base))


def _grid(grid_raw: dict[str, Any], overrides: dict[str, Any], keys: set[str], where: str) -> dict[str, list[Any]]:
    if not grid_raw:
        raise UserError(f"{where}: grid is empty; give at least one key, e.g. `grid: {{seed: [0, 1]}}`")
    grid: dict[str, list[Any]] = {}
    for key, values in grid_raw.items():
        if key not in keys:
            raise UserError(f"{where}: grid key {key!r} is not a config key; {_near(key, keys)}")
        if key in overrides:
            raise UserError(f"{where}: {key!r} is both in overrides and in the grid; keep it in one place")
        if not isinstance(values, list) or not values:
            raise UserError(f"{where}: grid.{key} must be a non-empty list of values, e.g. [0, 1], got {values!r}")
        for v in values:
            if isinstance(v, (dict, list)):
                raise UserError(f"{where}: grid.{key} values must be single values, got {v!r}")
        grid[key] = list(values)
    return grid


def _resources(raw: Any, where: str) -> Resources:
    res = _mapping(raw, f"{where}: resources", flat=False)
    bad = sorted(set(res) - set(RESOURCE_KEYS))
    if bad:
        raise UserError(f"{where}: unknown resources key(s) {', '.join(bad)}; valid: cpu, gpu")
    cpu, gpu = res.get("cpu", 1), res.get("gpu", 0)
    if not _is_number(cpu) or cpu <= 0:
        raise UserError(f"{where}: resources.cpu must be a number > 0 (CPUs per trial, at most {MAX_COUNT}), "
                        f"got {cpu!r}")
    if not _is_number(gpu) or gpu < 0:
        raise UserError(f"{where}: resources.gpu must be a number >= 0 (GPUs per trial, at most {MAX_COUNT}), "
                        f"got {gpu!r}")
    if cpu > MAX_TRIAL_CPUS or gpu > MAX_TRIAL_GPUS:
        raise UserError(f"{where}: resources {{cpu: {cpu}, gpu: {gpu}}} is what one trial reserves on one node; no "
                        f"node has more than {MAX_TRIAL_CPUS} CPUs or {MAX_TRIAL_GPUS} GPUs: lower it")
    if gpu > 1 and not float(gpu).is_integer():
        raise UserError(f"{where}: resources.gpu above 1 must be a whole number (Ray's rule), got {gpu!r}")
    return Resources(cpu=float(cpu), gpu=float(gpu))


def _check_device(spec: SweepSpec, where: str) -> None:
    """A trial pinned to CUDA, or in bf16 (a GPU's), without a GPU reservation would fail
    inside Ray: say so now."""
    if spec.resources.gpu > 0:
        return
    precisions = spec.grid.get("train.precision") or [merged_flat(spec).get("train.precision", "fp32")]
    if "bf16" in precisions:
        raise UserError(f"{where}: train.precision=bf16 needs a GPU (bf16 autocast runs on CUDA only) but "
                        "resources.gpu is 0; set resources.gpu, or train.precision=fp32 to train on CPUs")
    devices = spec.grid.get("train.device") or [merged_flat(spec).get("train.device", "auto")]
    for device in devices:
        if isinstance(device, str) and device.startswith("cuda"):
            raise UserError(
                f"{where}: train.device={device} needs a GPU but resources.gpu is 0; "
                "set resources.gpu (e.g. 0.25) or train.device=auto/cpu"
            )


def _mapping(value: Any, what: str, *, flat: bool = True) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UserError(f"{what} must be a mapping of keys to values, got {value!r}")
    return flatten(value) if flat else dict(value)


def _near(key: str, keys: set[str]) -> str:
    section = key.split(".")[0]
    near = sorted(k for k in keys if k.startswith(section + "."))
    return "valid keys: " + ", ".join(near or sorted(keys))


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and abs(v) <= MAX_COUNT


def _is_int(v: Any, *, minimum: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and minimum <= v <= MAX_COUNT


# --------------------------------------------------------------------------- trials


def merged_flat(spec: SweepSpec) -> dict[str, Any]:
    """Base + overrides, flat and unvalidated (validation happens per trial)."""
    return {**spec.base_config, **spec.overrides}


def expand(spec: SweepSpec) -> list[ModelSpec]:
    """The models in grid order; builds and validates every model's config now, before Ray,
    with the checks a trial makes when it starts (config ranges, the model fitting in memory)."""
    from icl.model.footprint import check_model_fits_host  # imports torch: only once there are trials

    keys = list(spec.grid)
    points = list(product(*(spec.grid[k] for k in keys)))
    width = max(3, len(str(len(points) - 1)))
    short = short_names(keys)
    trials: list[ModelSpec] = []
    seen: dict[tuple[Any, ...], str] = {}
    for index, values in enumerate(points):
        point = dict(zip(keys, values))
        trial_id = f"t{index:0{width}d}"
        try:
            cfg = build_config(spec.base_config, {**spec.overrides, **point})
            check_model_fits_host(cfg)
        except UserError as e:
            raise UserError(f"trial {trial_id} ({_fmt_point(point)}): {e}") from None
        coerced = {k: get_key(cfg, k) for k in keys}
        signature = tuple(coerced.values())
        if signature in seen:
            raise UserError(
                f"grid has duplicate values: trials {seen[signature]} and {trial_id} are both "
                f"{_fmt_point(coerced)}; remove the duplicate"
            )
        seen[signature] = trial_id
        label = "_".join(f"{short[k]}={format_value(v)}" for k, v in coerced.items())
        dirname = re.sub(r"[^A-Za-z0-9._=+-]", "-", f"{trial_id}_{label}")[:120]
        trials.append(ModelSpec(trial_id, dirname, coerced, cfg))
    return trials


def make_packs(spec: SweepSpec, trials: Sequence[ModelSpec]) -> list[PackSpec]:
    """The Tune trials of a sweep: every trial is a pack. The grid points that differ only in
    keys ``train_packed`` lets vary per model (seed, optim.weight_decay) are grouped, in grid
    order, into packs of at most ``spec.pack`` models, numbered by their first member (so
    the grid's order, e.g. seed first, is kept). With ``pack: 1`` a pack is one grid point
    and takes its trial id and directory. UserError when configs cannot be packed."""
    groups: dict[tuple[Any, ...], list[ModelSpec]] = {}
    for t in trials:
        shared = tuple(t.grid[k] for k in spec.grid if k not in PER_MODEL_KEYS)
        groups.setdefault(shared, []).append(t)
    order = {t.trial_id: i for i, t in enumerate(trials)}
    chunks = [g[i : i + spec.pack] for g in groups.values() for i in range(0, len(g), spec.pack)]
    chunks.sort(key=lambda c: order[c[0].trial_id])
    width = max(3, len(str(len(chunks) - 1)))
    packs = []
    for index, members in enumerate(chunks):
        try:
            check_packable([t.config for t in members])
        except UserError as e:
            names = [t.trial_id for t in members]
            shown = ", ".join(names) if len(names) <= 4 else f"{names[0]}, {names[1]}, ..., {names[-1]}"
            raise UserError(
                f"pack: {spec.pack} cannot pack trials {shown}: {e}; "
                "set `pack: 1` in the spec to train one model per trial"
            ) from None
        ids = tuple(t.trial_id for t in members)
        if spec.pack == 1:  # named as the grid point it trains
            packs.append(PackSpec(ids[0], members[0].dirname, tuple(members), spec.exp_dir))
            continue
        pack_id = f"p{index:0{width}d}"
        dirname = re.sub(r"[^A-Za-z0-9._=+-]", "-", f"{pack_id}_{'+'.join(ids)}")[:120]
        packs.append(PackSpec(pack_id, dirname, tuple(members), spec.exp_dir))
    return packs


def short_names(keys: list[str]) -> dict[str, str]:
    """Last component of each dotted key, unless two keys share it."""
    last = [k.split(".")[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


def shrink_of(model: ModelSpec) -> str:
    """The model's total shrink factor ``exp(-wd * sum lr_t)`` as text (``e^-0.25``; see
    :func:`icl.schedule.shrink_text`): what its weight decay amounts to over its schedule."""
    return shrink_text(model.config)


def lr_sums(trials: Sequence[ModelSpec]) -> list[float]:
    """The distinct ``sum lr_t`` of the models' schedules, in order of appearance."""
    out: list[float] = []
    for t in trials:
        o = t.config
        total = lr_sum(o.optim, o.train.steps)
        if not any(math.isclose(total, x, rel_tol=1e-12) for x in out):
            out.append(total)
    return out


def format_value(v: Any) -> str:
    """Short, stable text for a grid value (0.0003, 1e-05, 100, true)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:g}" if v != 0 else "0"
    return str(v)


def _fmt_point(point: dict[str, Any]) -> str:
    return ", ".join(f"{k}={format_value(v)}" for k, v in point.items())


# --------------------------------------------------------------------------- saving, comparing


def identity(spec: SweepSpec) -> dict[str, Any]:
    """What makes two specs the same experiment (where it is stored and its name do not,
    nor runtime-only config keys such as data.root or train.device): the base config with
    the overrides, each grid key's values as the config takes them, and how it runs. Needs no
    expansion of the grid (a saved spec is compared without building its models)."""
    cfg = build_config(spec.base_config, spec.overrides)
    return {
        "config": science_dict(cfg),
        "grid": {k: _unique([_as_taken(k, v) for v in values]) for k, values in spec.grid.items()},
        "resources": {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu},
        "max_concurrent": spec.max_concurrent,
        "max_failures": spec.max_failures,
        "checkpoint": {"num_to_keep": spec.checkpoint_keep},
        # part of the identity although packed and solo training give the same results (to
        # float tolerance): a packed experiment's Tune state names packs, not trials, so a
        # resume with another `pack` could not continue it
        "pack": spec.pack,
    }


def _as_taken(key: str, value: Any) -> Any:
    """A grid value as the config key takes it (``1`` for a float key is ``1.0``)."""
    cfg = Config()
    try:
        set_key(cfg, key, value)
    except UserError:  # refused where the models are built (expand); compared as given
        return value
    return get_key(cfg, key)


def _unique(values: list[Any]) -> list[Any]:
    out: list[Any] = []
    for v in values:
        if v not in out:
            out.append(v)
    return out


def saved_yaml(spec: SweepSpec, ident: dict[str, Any] | None = None) -> str:
    """The resolved spec as YAML (``ident``: its :func:`identity`, if known); itself a valid
    spec that reproduces this experiment."""
    cfg = build_config(spec.base_config, spec.overrides)
    ident = ident or identity(spec)
    doc: dict[str, Any] = {
        "name": spec.name,
        "description": spec.description,
        "base": spec.base,
        "overrides": dict(spec.overrides),
        "grid": ident["grid"],
        "resources": ident["resources"],
        "max_concurrent": spec.max_concurrent,
        "max_failures": spec.max_failures,
        "checkpoint": ident["checkpoint"],
        "pack": spec.pack,
        "heads": spec.heads,
        "log_to": list(spec.log_to),
        "storage": str(Path(spec.storage).expanduser().resolve()),
        "resolved": cfg.to_dict(),
    }
    return saved_spec_text(doc, spec.source)


def differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Human-readable differences between two identities, most specific first."""
    out: list[str] = []
    for section in current:
        a, b = saved.get(section), current.get(section)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict) and section == "config":
            for k in sorted(set(a) | set(b)):
                if a.get(k) != b.get(k):
                    out.append(f"{k}: {a.get(k)!r} -> {b.get(k)!r}")
        else:
            out.append(f"{section}: {a!r} -> {b!r}")
    return out

