"""The run configuration: plain dataclasses, YAML presets, ``--set a.b=value`` overrides.

The dataclass defaults are the faithful setup of STUDY.md (the ``paper`` preset). A preset
(``tiny``, ``demo``, ``paper``, shipped in ``icl/presets/``) or a YAML file overrides some
of them; ``--set`` overrides override the file. Every key is checked: an unknown key, a
wrong type or an out-of-range value raises :class:`~icl.errors.UserError` naming the key.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from icl.errors import UserError

PRESET_DIR = Path(__file__).parent / "presets"
PROJECT_ROOT = Path(__file__).resolve().parent.parent

# Omniglot: 1623 characters x 20 drawers; 8 variants per character with augmentation.
N_CHARACTERS = 1623
N_DRAWERS = 20
N_VARIANTS = 8
CONTEXT_LEN = 8  # (image, label) pairs before the query
SEQ_LEN = CONTEXT_LEN + 1  # items per sequence, query last
MAX_ROWS = 1_000_000  # sequences per batch or evaluation set (the sampler's counters: icl.data.rng)
DECAY_MODULES = ("embedder", "attn", "mlp", "head")  # what optim.decay_modules may name
L2_KINDS = ("decoupled", "coupled")


@dataclass
class DataConfig:
    root: str | None = None  # else env ICL_DATA_DIR, else data/ in the checkout
    cache_dir: str | None = None  # else env ICL_CACHE_DIR, else ~/.cache/icl
    num_classes: int = 1600
    n_holdout: int = 23  # holdout *characters* (x8 classes with augmentation)
    split_seed: int = 1337
    p_bursty: float = 0.9
    zipf_exponent: float = 0.0
    augment: bool = False
    image_size: int = 105


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
    precision: str = "fp32"  # fp32 | bf16 (autocast, GPU)
    threads: int = 0  # torch CPU threads; 0 = leave torch's default


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
RUNTIME_KEYS = frozenset({"data.root", "data.cache_dir", "train.device", "train.threads"})


# --------------------------------------------------------------------------- loading


def presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def read_yaml(path: Path, what: str = "config") -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as e:
        raise UserError(f"cannot read {what} {path}: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"{what} {path} is not valid YAML{where}: fix the syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{what} {path} must be a mapping of keys to values, got {type(data).__name__}")
    return data


def config_source(name_or_path: str) -> dict[str, Any]:
    """The raw mapping of a preset name or a YAML file path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
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
            out[key.strip()] = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError:
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
        return float(value)
    if base is str:
        if not isinstance(value, str):
            raise UserError(f"config key {key!r} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {hint} for {key}")


def _number(key: str, text: str, what: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise UserError(f"config key {key!r} must be {what}, got {text!r}") from None


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


def validate(cfg: Config) -> None:
    """Range checks that make a run impossible or meaningless; messages say how to fix."""
    d, m, o, t, e = cfg.data, cfg.model, cfg.optim, cfg.train, cfg.eval
    _require(0 <= cfg.seed < 2**32, f"seed must be in [0, 2^32), got {cfg.seed}")
    _require(0 <= e.seed < 2**32, f"eval.seed must be in [0, 2^32), got {e.seed}")
    _require(0.0 <= d.p_bursty <= 1.0, f"data.p_bursty must be in [0, 1], got {d.p_bursty}")
    _require(d.zipf_exponent >= 0.0, f"data.zipf_exponent must be >= 0, got {d.zipf_exponent}")
    _require(
        1 <= d.n_holdout <= N_CHARACTERS - 4,
        f"data.n_holdout must be in [1, {N_CHARACTERS - 4}] characters, got {d.n_holdout}",
    )
    available = (N_CHARACTERS - d.n_holdout) * (N_VARIANTS if d.augment else 1)
    _require(
        4 <= d.num_classes <= available,
        f"data.num_classes must be in [4, {available}] (classes left after {d.n_holdout} holdout "
        f"characters{' with' if d.augment else ' without'} augmentation), got {d.num_classes}"
        + ("" if d.augment else "; set data.augment=true for up to 12800"),
    )
    _require(8 <= d.image_size <= 105, f"data.image_size must be in [8, 105] pixels, got {d.image_size}")
    _require(1 <= e.n_sequences <= MAX_ROWS, f"eval.n_sequences must be in [1, {MAX_ROWS}], got {e.n_sequences}")
    _require(e.batch_size >= 1, f"eval.batch_size must be >= 1, got {e.batch_size}")
    _require(e.ece_bins >= 1, f"eval.ece_bins must be >= 1, got {e.ece_bins}")
    embedders = ("resnet", "linear", "frozen")
    _require(m.embedder in embedders, f"model.embedder must be one of {', '.join(embedders)}, got {m.embedder!r}")
    _require(m.layers >= 1, f"model.layers must be >= 1, got {m.layers}")
    _require(m.d_model >= 2 and m.d_model % 2 == 0, f"model.d_model must be even and >= 2, got {m.d_model}")
    _require(
        m.heads >= 1 and m.d_model % m.heads == 0,
        f"model.heads ({m.heads}) must divide model.d_model ({m.d_model})",
    )
    _require(m.mlp >= 0, f"model.mlp must be >= 0 (0 = attention-only blocks), got {m.mlp}")
    _require(m.max_timescale > 0, f"model.max_timescale must be > 0, got {m.max_timescale}")
    _require(o.lr > 0 and math.isfinite(o.lr), f"optim.lr must be a positive number, got {o.lr}")
    _require(o.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {o.weight_decay}")
    o.decay_modules = canonical_decay_modules(o.decay_modules)
    _require(o.l2 in L2_KINDS, f"optim.l2 must be one of {', '.join(L2_KINDS)}, got {o.l2!r}")
    schedules = ("inverse_sqrt", "constant", "cosine")
    _require(o.schedule in schedules, f"optim.schedule must be one of {', '.join(schedules)}, got {o.schedule!r}")
    _require(o.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {o.warmup_steps}")
    _require(0 <= o.beta1 < 1 and 0 <= o.beta2 < 1, "optim.beta1 and optim.beta2 must be in [0, 1)")
    _require(o.eps > 0, f"optim.eps must be > 0, got {o.eps}")
    _require(1 <= t.steps < 2**32, f"train.steps must be in [1, 2^32), got {t.steps}")
    _require(1 <= t.batch_size <= MAX_ROWS, f"train.batch_size must be in [1, {MAX_ROWS}], got {t.batch_size}")
    _require(t.eval_every >= 1, f"train.eval_every must be >= 1, got {t.eval_every}")
    _require(t.checkpoint_every >= 1, f"train.checkpoint_every must be >= 1, got {t.checkpoint_every}")
    _require(
        t.checkpoint_every % t.eval_every == 0,
        f"train.checkpoint_every ({t.checkpoint_every}) must be a multiple of train.eval_every ({t.eval_every}): "
        "a checkpoint is saved with the evaluation of its step",
    )
    _require(t.keep_checkpoints >= 1, f"train.keep_checkpoints must be >= 1, got {t.keep_checkpoints}")
    _require(
        t.device == "auto" or t.device == "cpu" or t.device.startswith("cuda"),
        f"train.device must be auto, cpu, cuda or cuda:N, got {t.device!r}",
    )
    _require(t.precision in ("fp32", "bf16"), f"train.precision must be fp32 or bf16, got {t.precision!r}")
    _require(t.threads >= 0, f"train.threads must be >= 0, got {t.threads}")


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
    """``data.root``, else ``$ICL_DATA_DIR``, else ``data/`` in the checkout; absolute."""
    root = cfg.data.root or os.environ.get("ICL_DATA_DIR") or str(PROJECT_ROOT / "data")
    return Path(root).expanduser().resolve()


def cache_dir(cfg: Config) -> Path:
    """``data.cache_dir``, else ``$ICL_CACHE_DIR``, else ``~/.cache/icl``; absolute.

    Not under the data root: a shared dataset folder is often read-only.
    """
    d = cfg.data.cache_dir or os.environ.get("ICL_CACHE_DIR") or "~/.cache/icl"
    return Path(d).expanduser().resolve()


def science_dict(cfg: Config) -> dict[str, Any]:
    """The flattened config without the runtime-only keys: two runs with equal science dicts
    compute the same thing."""
    return {k: v for k, v in flatten(cfg.to_dict()).items() if k not in RUNTIME_KEYS}


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
    "load_config",
    "config_from_dict",
    "parse_overrides",
    "flatten",
    "get_key",
    "valid_keys",
    "data_root",
    "cache_dir",
    "science_dict",
    "replace",
]
