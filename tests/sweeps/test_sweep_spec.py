"""The sweep spec and the CLI's input checks: no Ray is started in this module."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from sweep_helpers import cli_error

from icl.config import presets
from icl.schedule import decay_exponent, shrink_factor
from icl.errors import UserError
from sweeps.cli import main
from sweeps.spec import differences, expand, identity, load_spec, parse_spec, saved_yaml, shipped_specs

SMOKE = {
    "name": "t",
    "base": "tiny",
    "overrides": {"train.steps": 100},
    "grid": {"data.num_classes": [16, 64], "optim.weight_decay": [0.0], "seed": [0, 1]},
}


def write_spec(tmp_path: Path, doc: dict, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


# --------------------------------------------------------------------------- shipped specs


@pytest.mark.parametrize("name", shipped_specs())
def test_shipped_specs_load_and_expand(name: str) -> None:
    spec = load_spec(name)
    if spec.base and spec.base not in presets() and not Path(spec.base).exists():
        pytest.skip(f"preset {spec.base} not in this checkout")
    trials = expand(spec)
    assert trials and spec.name == name


def test_study_is_the_study_grid() -> None:
    spec = load_spec("study")
    assert spec.base == "paper"
    assert sorted(spec.grid) == ["data.num_classes", "optim.weight_decay", "seed"]
    trials = expand(spec)
    assert len(trials) == 2 * 5 * 3
    assert {t.grid["data.num_classes"] for t in trials} == {100, 1600}
    assert {t.grid["optim.weight_decay"] for t in trials} == {0.0, 3e-4, 1e-3, 3e-3, 1e-2}
    assert {t.grid["seed"] for t in trials} == {0, 1, 2}
    assert all(t.config.data.p_bursty == 0.9 for t in trials)
    assert spec.resources.gpu > 0


def test_study_strong_is_the_study_with_decays_from_e_minus_a_quarter_to_e_minus_5() -> None:
    """STUDY.md's second grid: everything as study.yaml but the weight decays, whose total shrink
    factors exp(-wd * sum lr_t) on the `paper` schedule span about e^-0.25 to e^-5, with the wd-0
    control; study.yaml's own decays are weak (its strongest is about e^-0.25)."""
    study, strong = load_spec("study"), load_spec("study_strong")
    for field in ("base", "base_config", "overrides", "resources", "max_concurrent", "max_failures", "pack"):
        assert getattr(strong, field) == getattr(study, field), field
    assert {k: v for k, v in strong.grid.items() if k != "optim.weight_decay"} == \
        {k: v for k, v in study.grid.items() if k != "optim.weight_decay"}
    trials = expand(strong)
    assert len(trials) == 30
    exponents = {t.grid["optim.weight_decay"]: decay_exponent(t.config) for t in trials}
    assert exponents[0.0] == 0.0
    decayed = [x for wd, x in exponents.items() if wd > 0]
    assert min(decayed) <= 0.3 and max(decayed) >= 4.5 and len(decayed) == 4
    assert max(decay_exponent(t.config) for t in expand(study)) <= 0.3


def test_pilot_is_the_study_design_on_the_demo_preset() -> None:
    """The pilot: the study's grid shape (2 class counts x 5 decays x 3 seeds = 30 models in two
    packs of 15) on `demo`, its decays spanning study_strong's shrink factors on the demo's own
    schedule, with the wd-0 control in both class counts."""
    study, pilot = load_spec("study"), load_spec("pilot")
    assert pilot.base == "demo" and pilot.pack == study.pack == 15
    assert pilot.grid["seed"] == study.grid["seed"] and pilot.grid["data.num_classes"] == study.grid["data.num_classes"]
    trials = expand(pilot)
    assert len(trials) == 30
    exponents = sorted({decay_exponent(t.config) for t in trials})
    assert len(exponents) == 5 and exponents[0] == 0.0
    assert 0.2 <= exponents[1] <= 0.3 and exponents[-1] >= 4.5


@pytest.mark.parametrize("name", ["study", "study_strong", "demo", "pilot"])
def test_spec_files_say_what_each_cells_decay_amounts_to(name: str) -> None:
    """Each ``wd -> e^-x (x f)`` the spec file writes is the cell's computed total shrink
    factor, and every weight decay of its grid is written."""
    import re

    from sweeps.spec import resolve_spec_path, shrink_of

    text = resolve_spec_path(name).read_text()
    stated = {float(wd): (shrink, factor) for wd, shrink, factor in
              re.findall(r"(\d[\d.e-]*) -> (1|e\^-[\d.]+)(?: \([^)]*?x ([\d.]+)\))?", text)}
    trials = expand(load_spec(name))
    assert set(stated) == {t.grid["optim.weight_decay"] for t in trials}
    for t in trials:
        shrink, factor = stated[t.grid["optim.weight_decay"]]
        assert shrink == shrink_of(t), t.trial_id
        if factor:
            digits = len(factor.split(".")[1])
            assert float(factor) == round(shrink_factor(t.config), digits), t.trial_id


def test_smoke_is_small() -> None:
    trials = expand(load_spec("smoke"))
    assert len(trials) == 4
    assert all(t.config.train.steps <= 200 for t in trials)


def test_decay_modules_sweeps_one_module_group_at_a_time() -> None:
    spec = load_spec("decay_modules")
    trials = expand(spec)
    assert [t.grid["optim.decay_modules"] for t in trials] == ["none", "embedder,attn,mlp,head", "attn", "mlp",
                                                               "embedder", "head"]
    assert all(t.config.optim.weight_decay > 0 and t.config.data.num_classes == 1600 for t in trials)
    assert all(t.config.train.keep_checkpoints * t.config.train.checkpoint_every >= t.config.train.steps
               for t in trials)  # every checkpoint kept, for head attribution over training


def test_decay_options_pack_and_grid_keys_of_decay_split_packs() -> None:
    """Per-module and coupled decay train in packs (the packed AdamW applies them per model);
    their keys are not per-model keys, so a grid over them separates packs."""
    from sweeps.spec import make_packs

    doc = {**SMOKE, "pack": 4, "overrides": {**SMOKE["overrides"], "optim.l2": "coupled"},
           "grid": {"optim.decay_modules": ["mlp", "attn"], "seed": [0, 1]}}
    spec = parse_spec(doc)
    assert [p.trial_ids for p in make_packs(spec, expand(spec))] == [("t000", "t001"), ("t002", "t003")]


# --------------------------------------------------------------------------- expansion


def test_expand_order_ids_dirs_and_coercion(tmp_path: Path) -> None:
    doc = dict(SMOKE, grid={"optim.weight_decay": ["1e-3", 0], "seed": [0, 1]})
    trials = expand(parse_spec(doc))
    assert [t.trial_id for t in trials] == ["t000", "t001", "t002", "t003"]
    assert [(t.grid["optim.weight_decay"], t.grid["seed"]) for t in trials] == [(0.001, 0), (0.001, 1), (0.0, 0), (0.0, 1)]
    assert trials[0].dirname == "t000_weight_decay=0.001_seed=0"
    assert trials[0].config.optim.weight_decay == 0.001 and trials[0].config.train.steps == 100
    assert len({t.dirname for t in trials}) == 4


def test_set_overrides_and_cli_names(tmp_path: Path) -> None:
    spec = parse_spec(SMOKE, storage=str(tmp_path), name="other", sets=["train.steps=7", "model.layers=1"])
    assert spec.name == "other" and spec.exp_dir == (tmp_path / "other").resolve()
    assert all(t.config.train.steps == 7 and t.config.model.layers == 1 for t in expand(spec))


def test_relative_base_path_is_relative_to_the_spec(tmp_path: Path) -> None:
    (tmp_path / "cfgs").mkdir()
    (tmp_path / "cfgs" / "mine.yaml").write_text("train:\n  steps: 11\n")
    path = write_spec(tmp_path, dict(SMOKE, base="cfgs/mine.yaml", overrides={}))
    trials = expand(load_spec(str(path)))
    assert trials[0].config.train.steps == 11


@pytest.mark.parametrize(
    "change, message",
    [
        ({"bogus": 1}, "unknown key(s) bogus"),
        ({"grid": {"model.nope": [1, 2]}}, "grid key 'model.nope' is not a config key"),
        ({"grid": {}}, "grid is empty"),
        ({"grid": {"seed": 3}}, "grid.seed must be a non-empty list"),
        ({"grid": {"seed": [0, 0]}}, "duplicate values"),
        ({"grid": {"data.num_classes": [2]}}, "trial t000 (data.num_classes=2): data.num_classes must be in"),
        ({"overrides": {"train.stepz": 3}}, "unknown config key 'train.stepz'"),
        ({"overrides": {"seed": 3}}, "'seed' is both in overrides and in the grid"),
        ({"resources": {"gpu": 1.5}}, "resources.gpu above 1 must be a whole number"),
        ({"resources": {"cpu": 0}}, "resources.cpu must be a number > 0"),
        ({"resources": {"tpu": 1}}, "unknown resources key(s) tpu"),
        ({"max_failures": -1}, "max_failures"),
        ({"max_concurrent": 0}, "max_concurrent"),
        ({"checkpoint": {"keep": 1}}, "unknown checkpoint key(s) keep"),
        ({"name": "../x"}, "must be a plain directory name"),
        ({"base": "nonexistent_preset"}, "unknown config 'nonexistent_preset'"),
        ({"base": None}, "missing `base:`"),
        ({"overrides": {"train.device": "cuda"}}, "needs a GPU but resources.gpu is 0"),
        ({"storage": "s3://bucket/x"}, "is a URI"),
        # what used to pass silently
        ({"resolved": {}}, "resolved lacks 35 config key(s)"),  # would have been the paper defaults
        ({"resolved": {"train": {"steps": 5}}}, "resolved lacks 34 config key(s)"),
        ({"resources": {"gpu": 1000}}, "no node has more than 1024 CPUs or 64 GPUs"),
        ({"resources": {"cpu": 100000}}, "no node has more than 1024 CPUs or 64 GPUs"),
        ({"name": "n" * 300}, "of at most 100 characters"),
        ({"overrides": {"train.precision": "bf16"}}, "train.precision=bf16 needs a GPU (bf16 autocast runs on CUDA"),
    ],
)
def test_spec_errors(change: dict, message: str) -> None:
    doc = {**SMOKE, **change}
    if "base" in change and change["base"] is None:
        doc.pop("base")
    with pytest.raises(UserError) as exc:
        expand(parse_spec(doc))
    assert message in str(exc.value)


def test_set_on_a_grid_key_is_refused() -> None:
    with pytest.raises(UserError, match="conflicts with the grid"):
        parse_spec(SMOKE, sets=["seed=3"])


# --------------------------------------------------------------------------- saved spec


def test_saved_spec_reproduces_the_experiment(tmp_path: Path) -> None:
    spec = parse_spec(SMOKE, storage=str(tmp_path), sets=["train.eval_every=20"])
    saved = tmp_path / "spec.yaml"
    saved.write_text(saved_yaml(spec))
    again = load_spec(str(saved))
    assert identity(again) == identity(spec)
    assert [t.config for t in expand(again)] == [t.config for t in expand(spec)]
    assert again.exp_dir == spec.exp_dir


def test_saved_spec_survives_a_changed_preset(tmp_path: Path) -> None:
    """`resolved` pins the base config: editing the preset later does not change it."""
    (tmp_path / "base.yaml").write_text("train:\n  steps: 11\n")
    spec = load_spec(str(write_spec(tmp_path, dict(SMOKE, base="base.yaml", overrides={}))))
    (tmp_path / "saved.yaml").write_text(saved_yaml(spec))
    (tmp_path / "base.yaml").write_text("train:\n  steps: 99\n")
    assert expand(load_spec(str(tmp_path / "saved.yaml")))[0].config.train.steps == 11


def test_differences_name_the_keys() -> None:
    a = identity(parse_spec(SMOKE))
    b = identity(parse_spec(SMOKE, sets=["train.steps=50"]))
    c = identity(parse_spec({**SMOKE, "grid": {**SMOKE["grid"], "seed": [0, 1, 2]}}))
    d = identity(parse_spec(SMOKE, sets=["train.device=cpu", "data.root=/elsewhere"]))  # runtime keys
    assert differences(a, b) == ["train.steps: 100 -> 50"]
    assert differences(a, c) and differences(a, c)[0].startswith("grid:")
    assert differences(a, d) == []


# --------------------------------------------------------------------------- CLI (no Ray)


def test_dry_run_prints_the_table(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["smoke", "--dry-run", "--storage", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "model  trial  data.num_classes  optim.weight_decay  seed  shrink  status" in out
    assert "t003   t003   64                0                   1     1       to run" in out
    assert "4 models in 4 trials of up to 1 model (4 to run); dry run: nothing started" in out
    assert not (tmp_path / "smoke").exists()


def test_dry_run_lists_the_strong_study_with_each_models_shrink_factor(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    from sweeps.spec import shrink_of

    assert main(["study_strong", "--dry-run", "--storage", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "30 models in 2 trials of up to 15 models (30 to run); dry run: nothing started" in out
    assert "shrink = exp(-weight_decay * sum lr_t)" in out and "(sum lr_t = 25.03)" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith("t0")}
    trials = expand(load_spec("study_strong"))
    assert len(rows) == 30
    assert all(rows[t.trial_id][-3] == shrink_of(t) for t in trials)
    assert {rows[t.trial_id][-3] for t in trials} == {"1", "e^-0.25", "e^-1", "e^-2.5", "e^-5"}


def test_cli_spec_errors_exit_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = write_spec(tmp_path, {**SMOKE, "grid": {"optim.wd": [0, 1]}})
    assert "grid key 'optim.wd' is not a config key" in cli_error(capsys, [str(bad), "--dry-run"])
    assert "unknown sweep spec 'nope'" in cli_error(capsys, ["nope"])
    assert "does not exist" in cli_error(capsys, [str(tmp_path / "missing.yaml")])
    assert "must look like key=value" in cli_error(capsys, ["smoke", "--set", "train.steps"])
    assert "unrecognized arguments" in cli_error(capsys, ["smoke", "--frobnicate"])
    (tmp_path / "broken.yaml").write_text("grid: [\n")
    assert "not valid YAML" in cli_error(capsys, [str(tmp_path / "broken.yaml")])


def test_storage_not_writable(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "afile").write_text("")
    line = cli_error(capsys, ["smoke", "--storage", str(tmp_path / "afile" / "sub")])
    assert "is not writable" in line and "--storage" in line


def test_num_cpus_with_address_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    line = cli_error(capsys, ["smoke", "--storage", str(tmp_path), "--address", "127.0.0.1:1", "--num-cpus", "2"])
    assert "--num-cpus/--num-gpus size an embedded Ray" in line


def test_foreign_directory_is_never_used(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "smoke").mkdir()
    (tmp_path / "smoke" / "notes.txt").write_text("someone else's")
    assert "holds no icl-sweep experiment" in cli_error(capsys, ["smoke", "--storage", str(tmp_path), "--dry-run"])


def test_missing_data_dir(tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ICL_DATA_DIR", str(tmp_path / "no-data"))
    assert "no Omniglot data under" in cli_error(capsys, ["smoke", "--storage", str(tmp_path)])


def test_heads_option_is_parsed_saved_and_not_part_of_the_identity(tmp_path: Path) -> None:
    assert parse_spec(SMOKE).heads is False
    spec = parse_spec({**SMOKE, "heads": True})
    assert spec.heads is True
    assert identity(spec) == identity(parse_spec(SMOKE))  # analysis only: a resume may switch it
    saved = yaml.safe_load(saved_yaml(spec))
    assert saved["heads"] is True and parse_spec(saved).heads is True
    with pytest.raises(UserError, match="heads must be true or false"):
        parse_spec({**SMOKE, "heads": "yes"})


def test_what_used_to_pass_the_dry_run_is_one_error_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for change, words in (({"resources": {"cpu": 1, "gpu": 1000}}, "64 GPUs"), ({"name": "x" * 300}, "at most 100"),
                          ({"resolved": {}}, "resolved lacks")):
        path = write_spec(tmp_path, {**SMOKE, **change})
        assert words in cli_error(capsys, [str(path), "--dry-run", "--storage", str(tmp_path / "s")])
    assert not (tmp_path / "s").exists()
    (tmp_path / "loop").symlink_to(tmp_path / "loop")  # a symbolic-link loop as the storage
    path = write_spec(tmp_path, SMOKE)
    assert "cannot be resolved" in cli_error(capsys, [str(path), "--storage", str(tmp_path / "loop")])


def test_a_run_config_edited_after_its_trial_finished_is_noticed(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A finished model's run directory whose config.yaml no longer is its trial's (edited by
    hand, or copied from another experiment): the sweep refuses to count it as finished."""
    from icl.config import build_config
    from icl.train.rundir import RunDir
    from sweeps import results as res
    from sweeps.spec import saved_yaml

    spec = parse_spec(SMOKE, storage=str(tmp_path))
    spec.exp_dir.mkdir(parents=True)
    (spec.exp_dir / "spec.yaml").write_text(saved_yaml(spec))
    first = expand(spec)[0]
    run = res.run_dir(spec.exp_dir, first).path
    run.mkdir(parents=True)
    edited = build_config(first.config.to_dict(), {"optim.lr": 0.5})
    (run / "config.yaml").write_text(edited.to_yaml())
    (run / "metrics.csv").write_text("step,icl_acc\n100,0.9\n")  # "finished"
    assert RunDir(run).finished(100)
    line = cli_error(capsys, [str(write_spec(tmp_path, SMOKE)), "--dry-run",
                              "--storage", str(tmp_path)])
    assert "holds a run with a different config (optim.lr" in line and "it is not model t000's" in line
