"""The run configuration: presets, YAML files, --set overrides, type and range checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from icl.config import (
    RUNTIME_KEYS,
    Config,
    build_config,
    cache_dir,
    config_from_dict,
    data_root,
    flatten,
    get_key,
    load_config,
    parse_overrides,
    presets,
    replace,
    science_dict,
    valid_keys,
)
from icl.errors import UserError


def err(source, overrides=None) -> str:
    with pytest.raises(UserError) as e:
        build_config(source, overrides)
    return str(e.value)


# --------------------------------------------------------------------------- presets and files


def test_defaults_are_the_paper_setup():
    cfg = Config()
    assert cfg.data.num_classes == 1600 and cfg.data.n_holdout == 23 and cfg.data.split_seed == 1337
    assert cfg.data.p_bursty == 0.9 and cfg.data.zipf_exponent == 0.0 and cfg.data.image_size == 105
    assert cfg.train.batch_size == 32 and cfg.optim.lr == 3e-4 and cfg.model.max_timescale == 30.0
    assert cfg.eval.n_sequences == 1024


def test_presets_shipped_and_valid():
    names = presets()
    assert {"tiny", "demo", "paper"} <= set(names)
    for name in names:
        cfg = load_config(name)
        assert isinstance(cfg, Config)
    paper, default = load_config("paper"), Config()  # paper = the dataclass defaults = STUDY.md
    assert (paper.data, paper.model, paper.optim, paper.eval) == (default.data, default.model, default.optim, default.eval)


def test_preset_by_name_sets_keys():
    cfg = load_config("tiny")
    assert cfg.data.num_classes == 64 and cfg.data.image_size == 14 and cfg.model.embedder == "linear"
    assert cfg.train.device == "cpu"
    # keys the preset does not name keep the dataclass defaults
    assert cfg.data.n_holdout == 23 and cfg.data.p_bursty == 0.9


def test_preset_by_path(tmp_path: Path):
    p = tmp_path / "mine.yaml"
    p.write_text("seed: 7\ndata:\n  num_classes: 100\n  p_bursty: 0.5\noptim:\n  weight_decay: 3e-4\n")
    cfg = load_config(str(p))
    assert cfg.seed == 7 and cfg.data.num_classes == 100 and cfg.data.p_bursty == 0.5
    # YAML 1.1 reads 3e-4 (no dot) as a string; the config still takes it as a float
    assert cfg.optim.weight_decay == pytest.approx(3e-4) and isinstance(cfg.optim.weight_decay, float)
    # a path without the .yaml suffix works too when the file exists
    q = tmp_path / "mine.cfg"
    q.write_text(p.read_text())
    assert load_config(str(q)) == cfg


def test_empty_yaml_file_is_the_defaults(tmp_path: Path):
    p = tmp_path / "empty.yaml"
    p.write_text("")
    assert load_config(str(p)) == Config()


def test_unknown_preset_lists_presets():
    msg = err("no_such_preset")
    assert "no_such_preset" in msg and "tiny" in msg and "paper" in msg


def test_missing_yaml_file(tmp_path: Path):
    msg = err(str(tmp_path / "absent.yaml"))
    assert "does not exist" in msg and "absent.yaml" in msg


def test_invalid_yaml(tmp_path: Path):
    p = tmp_path / "bad.yaml"
    p.write_text("data:\n  num_classes: [1, 2\n")
    msg = err(str(p))
    assert "not valid YAML" in msg and "bad.yaml" in msg


def test_yaml_not_a_mapping(tmp_path: Path):
    p = tmp_path / "list.yaml"
    p.write_text("- 1\n- 2\n")
    assert "mapping" in err(str(p))


# --------------------------------------------------------------------------- --set parsing


def test_parse_overrides_values():
    got = parse_overrides(
        ["data.num_classes=100", "optim.lr=3e-4", "data.augment=true", "data.root=/a=b", "seed = 3",
         "model.embedder=linear", "data.root2="]
    )
    assert got["data.num_classes"] == 100
    assert got["optim.lr"] == "3e-4"  # YAML 1.1 string; coerced to float by the config
    assert got["data.augment"] is True
    assert got["data.root"] == "/a=b"  # only the first '=' splits
    assert got["seed"] == 3  # whitespace around the key is stripped
    assert got["model.embedder"] == "linear"
    assert got["data.root2"] is None  # empty value
    assert parse_overrides(None) == {} and parse_overrides([]) == {}


@pytest.mark.parametrize("item", ["data.num_classes", "=3", " =3", ""])
def test_parse_overrides_malformed(item):
    with pytest.raises(UserError, match="key=value"):
        parse_overrides([item])


def test_overrides_beat_the_file():
    cfg = load_config("tiny", ["data.num_classes=100", "optim.lr=3e-4", "data.augment=true"])
    assert cfg.data.num_classes == 100 and cfg.data.augment is True
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.lr, float)
    # a dict of overrides (already parsed) works the same
    assert build_config("tiny", {"data.num_classes": 100, "optim.lr": "3e-4", "data.augment": True}) == cfg


@pytest.mark.parametrize(
    "text, value",
    [("3e-4", 3e-4), ("3.0e-4", 3e-4), ("1", 1.0), ("0", 0.0), (".5", 0.5), ("1E-2", 1e-2)],
)
def test_float_strings(text, value):
    cfg = load_config("tiny", [f"optim.weight_decay={text}"])
    assert cfg.optim.weight_decay == pytest.approx(value) and type(cfg.optim.weight_decay) is float


def test_int_from_integral_float_or_string():
    assert load_config("tiny", ["train.steps=1e3"]).train.steps == 1000
    assert build_config("tiny", {"train.steps": 2000.0}).train.steps == 2000
    assert type(build_config("tiny", {"train.steps": 2000.0}).train.steps) is int


def test_optional_string_can_be_cleared():
    assert load_config("tiny", ["data.root=/x"]).data.root == "/x"
    assert load_config("tiny", ["data.root="]).data.root is None


# --------------------------------------------------------------------------- unknown keys, types


def test_unknown_key_names_the_valid_ones():
    msg = err("tiny", ["data.num_clases=5"])
    assert "data.num_clases" in msg
    for key in ("data.num_classes", "data.p_bursty", "data.zipf_exponent", "data.augment", "data.image_size"):
        assert key in msg


def test_unknown_section_lists_all_keys():
    msg = err("tiny", ["foo.bar=1"])
    assert "foo.bar" in msg and "seed" in msg and "data.num_classes" in msg and "eval.seed" in msg


def test_unknown_key_in_yaml_file(tmp_path: Path):
    p = tmp_path / "c.yaml"
    p.write_text("data:\n  n_holdouts: 10\n")
    msg = err(str(p))
    assert "data.n_holdouts" in msg and "data.n_holdout" in msg


def test_knobs_named_by_the_issue_exist():
    keys = set(valid_keys())
    for key in ("seed", "data.num_classes", "data.n_holdout", "data.p_bursty", "data.zipf_exponent",
                "data.augment", "data.image_size", "eval.n_sequences", "eval.seed", "data.root"):
        assert key in keys


@pytest.mark.parametrize(
    "key, value, words",
    [
        ("data.num_classes", "abc", "integer"),
        ("data.num_classes", 10.5, "integer"),
        ("data.num_classes", True, "integer"),
        ("seed", "1.5", "integer"),
        ("data.p_bursty", "high", "number"),
        ("data.p_bursty", True, "number"),
        ("data.p_bursty", [0.5], "number"),
        ("data.augment", "yes", "true or false"),
        ("data.augment", 1, "true or false"),
        ("model.embedder", 3, "string"),
        ("data.root", 5, "string"),
        ("data.num_classes", None, "needs a value"),
    ],
)
def test_wrong_types(key, value, words):
    msg = err("tiny", {key: value})
    assert key in msg and words in msg


def test_section_given_a_scalar_is_unknown_key():
    # `data: 5` is not a mapping of data keys
    assert "data" in err({"data": 5})


# --------------------------------------------------------------------------- ranges


@pytest.mark.parametrize("p", [-0.1, 1.1, 1.0000001, float("nan")])
def test_p_bursty_out_of_range(p):
    assert "data.p_bursty" in err("tiny", {"data.p_bursty": p})


@pytest.mark.parametrize("p", [0, 0.0, 0.5, 1, 1.0])
def test_p_bursty_edges_ok(p):
    assert build_config("tiny", {"data.p_bursty": p}).data.p_bursty == p


def test_num_classes_limits_without_augmentation():
    assert build_config("tiny", {"data.num_classes": 1600}).data.num_classes == 1600
    msg = err("tiny", {"data.num_classes": 1601})
    assert "data.num_classes" in msg and "1600" in msg and "augment" in msg
    assert "3" in err("tiny", {"data.num_classes": 3})  # at least 4 classes
    # fewer holdout characters leave more training classes
    assert build_config("tiny", {"data.num_classes": 1613, "data.n_holdout": 10}).data.num_classes == 1613
    assert "1523" in err("tiny", {"data.num_classes": 1600, "data.n_holdout": 100})


def test_num_classes_limits_with_augmentation():
    cfg = build_config("tiny", {"data.num_classes": 12800, "data.augment": True})
    assert cfg.data.num_classes == 12800
    msg = err("tiny", {"data.num_classes": 12801, "data.augment": True})
    assert "data.num_classes" in msg and "12800" in msg


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"model.heads": 6}, "model.heads"),  # 6 does not divide 32
        ({"model.d_model": 64, "model.heads": 5}, "model.heads"),
        ({"model.heads": 0}, "model.heads"),
        ({"optim.lr": -1e-3}, "optim.lr"),
        ({"optim.lr": 0}, "optim.lr"),
        ({"optim.lr": float("inf")}, "optim.lr"),
        ({"optim.weight_decay": -1e-4}, "optim.weight_decay"),
        ({"train.steps": 0}, "train.steps"),
        ({"train.batch_size": 0}, "train.batch_size"),
        ({"data.zipf_exponent": -1}, "data.zipf_exponent"),
        ({"data.n_holdout": 0}, "data.n_holdout"),
        ({"data.image_size": 4}, "data.image_size"),
        ({"data.image_size": 106}, "data.image_size"),
        ({"eval.n_sequences": 0}, "eval.n_sequences"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**32}, "seed"),  # the data's random words are keyed by 32-bit seeds and steps
        ({"eval.seed": 2**32}, "eval.seed"),
        ({"train.steps": 2**32}, "train.steps"),
        ({"train.batch_size": 1_000_001}, "train.batch_size"),
        ({"eval.n_sequences": 1_000_001}, "eval.n_sequences"),
        ({"model.embedder": "vit"}, "model.embedder"),
        ({"optim.schedule": "linear"}, "optim.schedule"),
        ({"train.device": "tpu"}, "train.device"),
    ],
)
def test_out_of_range(overrides, key):
    assert key in err("tiny", overrides)


def test_heads_dividing_width_ok():
    cfg = build_config("tiny", {"model.d_model": 64, "model.heads": 8})
    assert cfg.model.d_model % cfg.model.heads == 0


# --------------------------------------------------------------------------- helpers


def test_round_trip_and_flatten():
    cfg = load_config("tiny", ["data.num_classes=100", "optim.weight_decay=1e-3"])
    assert config_from_dict(cfg.to_dict()) == cfg
    assert config_from_dict(__import__("yaml").safe_load(cfg.to_yaml())) == cfg
    flat = flatten(cfg.to_dict())
    assert list(flat) == valid_keys()
    assert get_key(cfg, "data.num_classes") == 100 == flat["data.num_classes"]


def test_replace_validates_and_copies():
    cfg = load_config("tiny")
    new = replace(cfg, **{"data.num_classes": 100})
    assert new.data.num_classes == 100 and cfg.data.num_classes == 64
    with pytest.raises(UserError):
        replace(cfg, **{"data.p_bursty": 2.0})


def test_science_dict_drops_runtime_keys():
    a = load_config("tiny", ["data.root=/x", "train.device=cpu"])
    b = load_config("tiny", ["data.root=/y", "data.cache_dir=/z", "train.device=cuda", "train.threads=2"])
    assert science_dict(a) == science_dict(b)
    assert not RUNTIME_KEYS & set(science_dict(a))
    assert science_dict(a) != science_dict(load_config("tiny", ["optim.weight_decay=1e-3"]))


def test_data_root_and_cache_dir_precedence(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("ICL_DATA_DIR", str(tmp_path / "env-data"))
    monkeypatch.setenv("ICL_CACHE_DIR", str(tmp_path / "env-cache"))
    cfg = load_config("tiny")
    assert data_root(cfg) == tmp_path / "env-data" and cache_dir(cfg) == tmp_path / "env-cache"
    cfg = load_config("tiny", [f"data.root={tmp_path}/cfg-data", f"data.cache_dir={tmp_path}/cfg-cache"])
    assert data_root(cfg) == tmp_path / "cfg-data" and cache_dir(cfg) == tmp_path / "cfg-cache"
    monkeypatch.delenv("ICL_DATA_DIR")
    monkeypatch.delenv("ICL_CACHE_DIR")
    cfg = load_config("tiny")
    assert data_root(cfg).name == "data" and data_root(cfg).parent == Path(__file__).resolve().parents[1]
    assert cache_dir(cfg) == (Path.home() / ".cache" / "icl").resolve()
    # relative paths come back absolute
    monkeypatch.chdir(tmp_path)
    assert data_root(load_config("tiny", ["data.root=rel"])) == tmp_path / "rel"


# --------------------------------------------------------------------------- every key's range


def _numeric_keys() -> dict[str, type]:
    from typing import get_type_hints

    cfg, out = Config(), {}
    for key in valid_keys():
        *parents, name = key.split(".")
        obj = cfg
        for part in parents:
            obj = getattr(obj, part)
        hint = get_type_hints(type(obj))[name]
        if hint in (int, float):
            out[key] = hint
    return out


def test_every_numeric_key_has_a_range_documented_in_the_readme():
    from icl.config import RANGES

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert set(_numeric_keys()) == set(RANGES)
    for key, rng in RANGES.items():
        assert f"| `{key}` | {rng}" in readme, f"README lacks the range of {key} ({rng})"


def test_the_decay_choices_are_checked_and_listed_in_the_readme():
    from icl.config import CHOICES

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for key in ("optim.l2", "optim.l2_scope"):
        leaf = key.split(".")[-1]
        assert f"`{leaf}` ({', '.join(CHOICES[key])})" in readme, key
        assert f"{key} must be one of {', '.join(CHOICES[key])}, got 'x'" in err("tiny", {key: "x"})
    assert build_config("tiny").optim.l2_scope == "weights"  # today's coverage by default
    assert build_config("tiny", {"optim.l2_scope": "all", "optim.l2": "coupled"}).optim.l2_scope == "all"
    assert "optim.l2_scope=all" in err("tiny", {"optim.l2_scope": "all", "optim.decay_modules": "attn,mlp"})


@pytest.mark.parametrize("key", [k for k, t in _numeric_keys().items() if t is float])
@pytest.mark.parametrize("value", ["inf", "-inf", "nan", ".inf", "1e400", "1" + "0" * 400])
def test_no_float_key_takes_a_non_finite_value(key, value):
    msg = err("tiny", [f"{key}={value}"])
    assert key in msg and "finite" in msg


@pytest.mark.parametrize("key", sorted(_numeric_keys()))
def test_values_just_outside_each_range_are_refused(key):
    from icl.config import RANGES

    rng, step = RANGES[key], (1 if _numeric_keys()[key] is int else 1e-9)
    below = rng.low if rng.low_open else rng.low - step
    above = rng.high if rng.high_open else rng.high + max(step, abs(rng.high) * 1e-9)
    for value in (below, above):
        assert key in err("tiny", {key: value})


def test_issue_examples_are_refused():
    assert "optim.eps" in err("tiny", ["optim.eps=.inf"])
    assert "model.max_timescale" in err("tiny", ["model.max_timescale=inf"])
    assert "data.zipf_exponent" in err("tiny", ["data.zipf_exponent=inf"])
    assert "model.mlp" in err("tiny", ["model.mlp=1000000000000"])


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:12"])
def test_device_names_accepted(device):
    assert build_config("tiny", {"train.device": device}).train.device == device


@pytest.mark.parametrize("device", ["cudaX", "cuda:-1", "cuda:01", "cuda:", "CPU", "cuda:1000", "mps", " cpu"])
def test_device_names_refused(device):
    assert "train.device" in err("tiny", {"train.device": device})


def test_path_with_a_nul_byte_is_refused():
    assert "data.root" in err("tiny", {"data.root": "/a\0b"})


def test_sweep_grid_values_are_checked_before_any_trial():
    from sweeps.spec import expand, parse_spec

    spec = parse_spec({"name": "x", "base": "tiny", "grid": {"optim.weight_decay": [float("inf"), 0.0]}}, storage="/tmp")
    with pytest.raises(UserError) as e:
        expand(spec)
    assert "trial t000" in str(e.value) and "optim.weight_decay" in str(e.value) and "finite" in str(e.value)
