"""The run configuration: plain dataclasses, YAML presets, ``--set a.b=value`` overrides.

The dataclass defaults are the faithful setup of STUDY.md (the ``paper`` preset). A preset
(``tiny``, ``demo``, ``paper``, shipped in ``icl/presets/``) or a YAML file overrides some
of them; ``--set`` overrides override the file. Every key is checked: an unknown key, a
wrong type or an out-of-range value raises :class:`~icl.errors.UserError` naming the key.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence, get_type_hints

import yaml

from icl.errors import UserError
from icl.inputs import parse_yaml, read_yaml, user_path

PRESET_DIR = Path(__file__).parent / "presets"
PROJECT_ROOT = Path(__file__).resolve().parent.parent

# Omniglot: 1623 characters x 20 drawers; 8 variants per character with augmentation.
N_CHARACTERS = 1623
N_DRAWERS = 20
N_VARIANTS = 8
CONTEXT_LEN = 8  # (image, label) pairs before the query
SEQ_LEN = CONTEXT_LEN + 1  # items per sequence, query last
PRECISIONS = ("fp32", "bf16", "fp64")
MAX_ROWS = 1_000_000  # sequences per batch or evaluation set (the sampler's counters: icl.data.rng)
DECAY_MODULES = ("embedder", "attn", "mlp", "head")  # what optim.decay_modules may name
L2_KINDS = ("decoupled", "coupled")
L2_SCOPES = ("weights", "all")  # what weight decay covers: Linear/Conv weights, or every array (icl-dynamics)


@dataclass
class DataConfig:
    root: str | None = None  # else env ICL_DATA_DIR, else data/ or shared/data/omniglot by the checkout
    cache_dir: str | None = None  # else env ICL_CACHE_DIR, else ~/.cache/icl
    num_classes: int = 1600
    n_holdout: int = 23  # holdout *characters* (x8 classes with augmentation)
    split_seed: int = 1337
    p_bursty: float = 0.9
    zipf_exponent: float = 0.0
    augment: bool = False
    image_size: int = 105
    custom: bool = False  # true: the data root holds a dataset other than Omniglot's 964 + 659 characters


@dataclass
class EvalConfig:
    n_sequences: int = 1024  # per evaluation set
    seed: int = 2024  # the fixed evaluation sets depend only on this (and the split)
    batch_size: int = 1024  # sequences per forward pass during evaluation
    ece_bins: int = 10


@dataclass
class ModelConfig:
    embedder: str = "resnet"  # resnet | linear | frozen
    layers: int = 12
    d_model: int = 64
    heads: int = 8
    mlp: int = 256  # MLP width; 0 = attention-only blocks
    max_timescale: float = 30.0


@dataclass
class OptimConfig:
    lr: float = 3e-4
    weight_decay: float = 0.0
    # which modules' weight matrices weight_decay acts on: a comma-separated subset of
    # embedder, attn, mlp, head ("all", "none" accepted); biases, norms, tables never
    decay_modules: str = "embedder,attn,mlp,head"
    l2: str = "decoupled"  # decoupled (AdamW) | coupled (weight_decay * sum ||W|| added to the loss, through Adam)
    # weights (the Linear/Conv weights of decay_modules) | all (every trainable array, as icl-dynamics' penalty)
    l2_scope: str = "weights"
    schedule: str = "inverse_sqrt"  # inverse_sqrt | constant | cosine
    warmup_steps: int = 4000
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8


@dataclass
class TrainConfig:
    steps: int = 500_000
    batch_size: int = 32
    eval_every: int = 5000
    checkpoint_every: int = 25_000
    keep_checkpoints: int = 2
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "fp32"  # fp32 | bf16 (autocast, GPU) | fp64 (numerical checks)
    threads: int = 0  # torch CPU threads; 0 = leave torch's default
    cuda_graph: bool = True  # CUDA: replay each training step as one captured CUDA graph
    compile: bool = False  # torch.compile the step's forward/backward and AdamW (minutes to compile)
    pack_forward: str = "auto"  # vmap (one batched forward per pack) | loop (model by model) | auto
    hparams: str = ""  # config keys shown as TensorBoard HParams (comma list); "" = classes, weight decay, seed


@dataclass
class Config:
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# Keys that may differ between a run directory's saved config and a resumed run's config:
# where the data lives and which device runs it do not change the science.
RUNTIME_KEYS = frozenset({
    "data.root", "data.cache_dir", "data.custom", "train.device", "train.threads", "train.cuda_graph",
    "train.compile", "train.pack_forward", "train.hparams",
})


# --------------------------------------------------------------------------- loading


def presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def config_source(name_or_path: str) -> dict[str, Any]:
    """The raw mapping of a preset name or a YAML file path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if path.exists() and not path.is_file():
            raise UserError(f"config file {path} is not a regular file (a folder, device or pipe); give a .yaml file")
        if not path.is_file():
            raise UserError(f"config file {path} does not exist (presets: {', '.join(presets())})")
        return read_yaml(path)
    preset = PRESET_DIR / f"{name_or_path}.yaml"
    if not preset.is_file():
        raise UserError(
            f"unknown config {name_or_path!r}: give a preset ({', '.join(presets())}) or a .yaml file path"
        )
    return read_yaml(preset)


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """``["a.b=1", "seed=3"]`` -> ``{"a.b": 1, "seed": 3}`` (values parsed as YAML scalars)."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set {item!r} must look like key=value, e.g. --set data.num_classes=100")
        try:
            out[key.strip()] = parse_yaml(value, f"--set {key.strip()}") if value.strip() else None
        except UserError:  # not YAML: the text itself (the key's type check decides)
            out[key.strip()] = value
    return out


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mapping -> ``{"a.b": value}``."""
    flat: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            flat.update(flatten(v, key + "."))
        else:
            flat[key] = v
    return flat


def valid_keys() -> list[str]:
    return list(flatten(Config().to_dict()))


def build_config(
    source: str | dict[str, Any] | None = None, overrides: dict[str, Any] | list[str] | None = None
) -> Config:
    """Defaults <- preset/file/mapping <- overrides; checked and validated."""
    raw = config_source(source) if isinstance(source, str) else dict(source or {})
    flat = flatten(raw)
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    flat.update(overrides or {})
    cfg = Config()
    keys = set(valid_keys())
    for key, value in flat.items():
        if key not in keys:
            section = key.split(".")[0]
            near = sorted(k for k in keys if k.startswith(section + ".")) or sorted(keys)
            raise UserError(f"unknown config key {key!r}; valid keys: {', '.join(near)}")
        set_key(cfg, key, value)
    validate(cfg)
    return cfg


def load_config(name_or_path: str, overrides: list[str] | None = None) -> Config:
    return build_config(name_or_path, overrides)


def config_from_dict(d: dict[str, Any]) -> Config:
    return build_config(d)


def get_key(cfg: Config, key: str) -> Any:
    obj: Any = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def set_key(cfg: Config, key: str, value: Any) -> None:
    *parents, name = key.split(".")
    obj: Any = cfg
    for part in parents:
        obj = getattr(obj, part)
    hint = get_type_hints(type(obj))[name]
    setattr(obj, name, coerce(key, value, hint))


def coerce(key: str, value: Any, hint: Any) -> Any:
    """Check ``value`` against the field's type; accept ints for floats and '3e-4' strings."""
    allows_none = hint in (str | None,)
    if value is None:
        if allows_none:
            return None
        raise UserError(f"config key {key!r} needs a value")
    base = str if allows_none else hint
    if base is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"config key {key!r} must be true or false, got {value!r}")
    if base is int:
        if isinstance(value, str):
            value = _number(key, value, "an integer")
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"config key {key!r} must be an integer, got {value!r}")
        return value
    if base is float:
        if isinstance(value, str):
            value = _number(key, value, "a number")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"config key {key!r} must be a number, got {value!r}")
        try:
            value = float(value)
        except OverflowError:  # an integer beyond any float
            value = math.inf
        if not math.isfinite(value):
            raise UserError(f"config key {key!r} must be a finite number, got {value!r}")
        return value
    if base is str:
        if not isinstance(value, str):
            raise UserError(f"config key {key!r} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {hint} for {key}")


def check_value(key: str, value: Any) -> Any:
    """``value`` as config key ``key`` takes it (type-checked, finite, in its range), for
    readers of values that come from elsewhere than a config (a results table's columns)."""
    cfg = Config()
    set_key(cfg, key, value)
    taken = get_key(cfg, key)
    rng = RANGES.get(key)
    if rng is not None and taken not in rng:
        raise UserError(rng.problem(key, taken))
    return taken


def _number(key: str, text: str, what: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise UserError(f"config key {key!r} must be {what}, got {text!r}") from None


@dataclass(frozen=True)
class Range:
    """The values a numeric key may take: ``[low, high]``, either end open if marked."""

    low: float
    high: float
    low_open: bool = False
    high_open: bool = False
    why: str = ""

    def __contains__(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def __str__(self) -> str:
        def fmt(x: float) -> str:
            return "2^32" if x == 2**32 else f"{x:g}" if isinstance(x, float) else str(x)

        return f"{'(' if self.low_open else '['}{fmt(self.low)}, {fmt(self.high)}{')' if self.high_open else ']'}"

    def problem(self, key: str, value: float) -> str:
        """Why ``value`` is refused, e.g. ``optim.lr must be a positive number in (0, 10], got -1.0``."""
        why = f" ({self.why})" if self.why else ""
        if self.low == 0 and value <= 0:  # the common slip: a sign
            need = "a positive number in" if self.low_open else ">= 0, in"
            return f"{key} must be {need} {self}{why}, got {value}"
        return f"{key} must be in {self}{why}, got {value}"


U32 = 2**32  # seeds and steps key the data's counter-based random words (icl.data.rng)

# Every numeric key and its range: a value from a file, --set or a sweep grid outside it is
# refused before any work starts. The README's configuration table lists the same ranges
# (a test keeps them in step). Cross-key rules (classes available, heads dividing the width,
# checkpoints on evaluations) are checked in validate() below.
RANGES: dict[str, Range] = {
    "seed": Range(0, U32, high_open=True),
    "data.num_classes": Range(4, (N_CHARACTERS - 1) * N_VARIANTS, why="at most the classes left after holdout"),
    "data.n_holdout": Range(1, N_CHARACTERS - 4, why="characters"),
    "data.split_seed": Range(0, U32, high_open=True),
    "data.p_bursty": Range(0.0, 1.0),
    "data.zipf_exponent": Range(0.0, 10.0, why="0 = uniform"),
    "data.image_size": Range(8, 105, why="pixels"),
    "model.layers": Range(1, 256),
    "model.d_model": Range(2, 8192, why="even"),
    "model.heads": Range(1, 1024, why="must divide model.d_model"),
    "model.mlp": Range(0, 65536, why="0 = attention-only blocks"),
    "model.max_timescale": Range(1.0, 1e6),
    "optim.lr": Range(0.0, 10.0, low_open=True),
    "optim.weight_decay": Range(0.0, 1e6),
    "optim.warmup_steps": Range(0, U32, high_open=True),
    "optim.beta1": Range(0.0, 1.0, high_open=True),
    "optim.beta2": Range(0.0, 1.0, high_open=True),
    "optim.eps": Range(0.0, 1.0, low_open=True),
    "train.steps": Range(1, U32, high_open=True),
    "train.batch_size": Range(1, MAX_ROWS),
    "train.eval_every": Range(1, U32, high_open=True),
    "train.checkpoint_every": Range(1, U32, high_open=True, why="a multiple of train.eval_every"),
    "train.keep_checkpoints": Range(1, 1000),
    "train.threads": Range(0, 1024, why="0 = torch's default"),
    "eval.n_sequences": Range(1, MAX_ROWS),
    "eval.seed": Range(0, U32, high_open=True),
    "eval.batch_size": Range(1, MAX_ROWS),
    "eval.ece_bins": Range(1, 1000),
}
CHOICES: dict[str, tuple[str, ...]] = {
    "model.embedder": ("resnet", "linear", "frozen"),
    "optim.schedule": ("inverse_sqrt", "constant", "cosine"),
    "train.precision": PRECISIONS,
    "train.pack_forward": ("auto", "vmap", "loop"),
    "optim.l2": L2_KINDS,
    "optim.l2_scope": L2_SCOPES,
}
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:(0|[1-9][0-9]{0,2}))?")  # cuda:N, N < 1000
PATH_KEYS = ("data.root", "data.cache_dir")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


def validate(cfg: Config) -> None:
    """Every key in its range or choices, then the rules between keys; messages say how to fix.

    Only what the config alone decides: whether a device exists, a path resolves or the run
    fits in memory is checked where the run starts (:mod:`icl.machine`, :mod:`icl.model.footprint`)."""
    for key, rng in RANGES.items():
        value = get_key(cfg, key)
        _require(value in rng, rng.problem(key, value))
    for key, choices in CHOICES.items():
        value = get_key(cfg, key)
        _require(value in choices, f"{key} must be one of {', '.join(choices)}, got {value!r}")
    t = cfg.train
    _require(
        DEVICE_PATTERN.fullmatch(t.device) is not None,
        f"train.device must be auto, cpu, cuda or cuda:N (N = 0, 1, ...), got {t.device!r}",
    )
    unknown = [k for k in (k.strip() for k in t.hparams.split(",")) if k and k not in valid_keys()]
    _require(not unknown, f"train.hparams names unknown config key(s) {', '.join(unknown)}: give a comma-separated "
                          "list of config keys (e.g. data.num_classes,optim.weight_decay,seed), or nothing")
    for key in PATH_KEYS:
        value = get_key(cfg, key)
        _require(value is None or "\0" not in value, f"{key} must be a path or null, got {value!r}")

    d, m = cfg.data, cfg.model
    available = (N_CHARACTERS - d.n_holdout) * (N_VARIANTS if d.augment else 1)
    _require(
        d.num_classes <= available,
        f"data.num_classes must be in [4, {available}] (classes left after {d.n_holdout} holdout "
        f"characters{' with' if d.augment else ' without'} augmentation), got {d.num_classes}"
        + ("" if d.augment else "; set data.augment=true for up to 12800"),
    )
    _require(m.d_model % 2 == 0, f"model.d_model must be even and >= 2, got {m.d_model}")
    _require(m.d_model % m.heads == 0, f"model.heads ({m.heads}) must divide model.d_model ({m.d_model})")
    o = cfg.optim
    o.decay_modules = canonical_decay_modules(o.decay_modules)
    _require(
        o.l2_scope == "weights" or o.decay_modules == ",".join(DECAY_MODULES),
        f"optim.l2_scope=all decays every array of the model, so optim.decay_modules cannot choose modules "
        f"(got {o.decay_modules}): set optim.decay_modules=all, or optim.l2_scope=weights to decay chosen modules",
    )
    _require(
        t.checkpoint_every % t.eval_every == 0,
        f"train.checkpoint_every ({t.checkpoint_every}) must be a multiple of train.eval_every ({t.eval_every}): "
        "a checkpoint is saved with the evaluation of its step",
    )


def canonical_decay_modules(text: str) -> str:
    """``optim.decay_modules`` in one spelling (the order of DECAY_MODULES; ``none`` for the empty
    set), so that equal choices compare equal in run directories and sweeps."""
    words = {w.strip() for w in text.replace("+", ",").split(",") if w.strip()}
    if words == {"all"}:
        words = set(DECAY_MODULES)
    if words == {"none"}:
        words = set()
    bad = sorted(words - set(DECAY_MODULES))
    _require(not bad, f"optim.decay_modules names unknown module(s) {', '.join(bad)}: give a comma-separated subset of "
                      f"{', '.join(DECAY_MODULES)}, or all, or none")
    return ",".join(m for m in DECAY_MODULES if m in words) or "none"


def decay_module_set(text: str) -> tuple[str, ...]:
    chosen = canonical_decay_modules(text)
    return () if chosen == "none" else tuple(chosen.split(","))


# --------------------------------------------------------------------------- paths


def data_root(cfg: Config) -> Path:
    """The configured data root (:func:`configured_data_root`), else ``data/`` in the
    checkout; absolute. Where Omniglot is downloaded to when it is found nowhere."""
    return data_roots(cfg)[0]


def configured_data_root(cfg: Config) -> Path | None:
    """``data.root``, else ``$ICL_DATA_DIR``; absolute. None when neither is set."""
    if cfg.data.root:
        return user_path(cfg.data.root, "data.root")
    if os.environ.get("ICL_DATA_DIR"):
        return user_path(os.environ["ICL_DATA_DIR"], "ICL_DATA_DIR")
    return None


def data_roots(cfg: Config) -> list[Path]:
    """Where to look for Omniglot, in order: the configured root alone if one is set (never
    a silent fallback from a root the user named); else ``data/`` in the checkout, then
    ``shared/data/omniglot`` inside or beside the checkout (one shared copy for a lab's
    checkouts and the tests), so a fresh checkout finds a copy that is already there."""
    configured = configured_data_root(cfg)
    if configured is not None:
        return [configured]
    shared = Path("shared") / "data" / "omniglot"
    return [PROJECT_ROOT / "data", PROJECT_ROOT / shared, PROJECT_ROOT.parent / shared]


def cache_dir(cfg: Config) -> Path:
    """``data.cache_dir``, else ``$ICL_CACHE_DIR``, else ``~/.cache/icl``; absolute.

    Not under the data root: a shared dataset folder is often read-only.
    """
    if cfg.data.cache_dir:
        return user_path(cfg.data.cache_dir, "data.cache_dir")
    return user_path(os.environ.get("ICL_CACHE_DIR") or "~/.cache/icl", "ICL_CACHE_DIR")


def science_dict(cfg: Config) -> dict[str, Any]:
    """The flattened config without the runtime-only keys: two runs with equal science dicts
    compute the same thing."""
    return {k: v for k, v in flatten(cfg.to_dict()).items() if k not in RUNTIME_KEYS}


# Keys in which the models of one pack (icl.train.train_packed) may differ; every other key
# must be equal: they share every kernel, the data and the evaluation sets.
PER_MODEL_KEYS = ("seed", "optim.weight_decay")


def check_packable(cfgs: Sequence[Config]) -> None:
    """UserError unless ``cfgs`` can train as one pack: at least one config, all equal in
    every key but ``PER_MODEL_KEYS``."""
    if not cfgs:
        raise UserError("a pack needs at least one config")
    first = flatten(cfgs[0].to_dict())
    for i, cfg in enumerate(cfgs[1:], start=1):
        other = flatten(cfg.to_dict())
        diff = [k for k in first if k not in PER_MODEL_KEYS and first[k] != other[k]]
        if diff:
            shown = "; ".join(f"{k}: {first[k]!r} in config 0, {other[k]!r} in config {i}" for k in diff[:4])
            raise UserError(
                f"configs of one pack may differ only in {' and '.join(PER_MODEL_KEYS)}; they differ in "
                f"{shown}: pack them separately"
            )


def replace(cfg: Config, **overrides: Any) -> Config:
    """A validated copy with dotted-key overrides: ``replace(cfg, **{"data.num_classes": 100})``."""
    return build_config(cfg.to_dict(), overrides)


__all__ = [
    "Config",
    "DataConfig",
    "EvalConfig",
    "ModelConfig",
    "OptimConfig",
    "TrainConfig",
    "build_config",
    "check_value",
    "load_config",
    "config_from_dict",
    "parse_overrides",
    "flatten",
    "get_key",
    "valid_keys",
    "data_root",
    "data_roots",
    "configured_data_root",
    "cache_dir",
    "science_dict",
    "replace",
    "PER_MODEL_KEYS",
    "check_packable",
]
