"""load_results on experiment dirs, CSV files, run dirs and combinations; bad input is a UserError."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import yaml

from analysis import load_results, summarize
from icl.config import Config
from icl.errors import UserError
from icl.layout import ExperimentDir

CLASSES, WD, SEED = "data.num_classes", "optim.weight_decay", "seed"


def _experiment(path, df, spec=None):
    path.mkdir(parents=True, exist_ok=True)
    df.to_csv(path / "results.csv", index=False)
    if spec is not None:
        (path / "spec.yaml").write_text(yaml.safe_dump(spec))
    return path


def _run(path, df, classes, wd, seed, **extra):
    path.mkdir(parents=True)
    df.drop(columns=["trial_id", CLASSES, WD, SEED]).to_csv(path / "metrics.csv", index=False)
    cfg = Config().to_dict()
    cfg["seed"] = seed
    cfg["data"]["num_classes"] = classes
    cfg["optim"]["weight_decay"] = wd
    for k, v in extra.items():
        section, key = k.split("__")
        cfg[section][key] = v
    (path / "config.yaml").write_text(yaml.safe_dump(cfg))
    return path


def test_experiment_dir_with_spec(tmp_path, rows, curve):
    df = pd.concat([rows(100, wd, s, curve(0.8)) for wd in (0.0, 1e-3) for s in (0, 1)], ignore_index=True)
    spec = {"base": "tiny", "grid": {CLASSES: [100], WD: [0.0, 1.0e-3], SEED: [0, 1, 2]}}
    exp = _experiment(tmp_path / "study", df, spec)
    out = load_results(exp)
    assert list(out.columns[:6]) == ["experiment", "trial_id", CLASSES, WD, SEED, "step"]
    assert (out["experiment"] == "study").all() and len(out) == len(df)
    assert out.attrs["expected_seeds"] == [0, 1, 2] and out.attrs["grid"][WD] == [0.0, 1e-3]
    s = summarize(out)  # the spec's third seed is expected: every cell lacks it
    assert (s["missing_seeds"] == "2").all()
    # the results.csv path itself works too (the spec next to it is still found)
    assert load_results(exp / "results.csv").attrs["expected_seeds"] == [0, 1, 2]


def test_missing_core_key_comes_from_the_spec(tmp_path, rows, curve):
    df = rows(100, 1e-3, 0, curve(0.8)).drop(columns=[CLASSES])
    exp = _experiment(tmp_path / "e", df, {"base": "tiny", "overrides": {"data": {"num_classes": 50}}, "grid": {}})
    assert (load_results(exp)[CLASSES] == 50).all()
    exp2 = _experiment(tmp_path / "e2", df, {"base": "tiny"})  # the tiny preset says 64 classes
    assert (load_results(exp2)[CLASSES] == 64).all()
    exp3 = _experiment(tmp_path / "e3", df)  # nothing says: the column exists, values missing, noted
    out = load_results(exp3)
    assert out[CLASSES].isna().all() and any(CLASSES in n for n in out.attrs["notes"])


def test_missing_keys_come_from_the_spec_the_sweep_saved(tmp_path, rows, curve):
    """The saved spec as icl-sweep writes it: its resolved config says every fixed key, its
    grid the seeds expected."""
    from sweeps.spec import parse_spec, saved_yaml

    spec = parse_spec({"base": "tiny", "overrides": {"data.num_classes": 50, "optim.weight_decay": 0.01},
                       "grid": {SEED: [0, 1]}}, storage=str(tmp_path), name="e")
    exp = _experiment(tmp_path / "e", rows(100, 1e-3, 0, curve(0.8)).drop(columns=[CLASSES, WD]))
    ExperimentDir(exp).spec.write_text(saved_yaml(spec))
    out = load_results(exp)
    assert (out[CLASSES] == 50).all() and (out[WD] == 0.01).all() and out.attrs["expected_seeds"] == [0, 1]
    assert any(f"{CLASSES} = 50" in n and "spec.yaml" in n for n in out.attrs["notes"])


def test_run_dirs_fill_keys_from_config_and_combine(tmp_path, rows, curve):
    r0 = _run(tmp_path / "runs" / "r0", rows(100, 1e-3, 0, curve(0.8)), 100, 1e-3, 0)
    _run(tmp_path / "runs" / "r1", rows(100, 1e-3, 1, curve(0.9)), 100, 1e-3, 1)
    one = load_results(r0)
    assert (one[CLASSES] == 100).all() and (one[WD] == 1e-3).all() and (one[SEED] == 0).all()
    assert (one["trial_id"] == "r0").all()
    both = load_results(tmp_path / "runs")  # a directory of run dirs
    assert set(both["trial_id"]) == {"r0", "r1"}
    s = summarize(both)
    assert len(s) == 1 and s.iloc[0]["n_seeds"] == 2 and s.iloc[0]["peak_icl_mean"] == pytest.approx(0.85)


def test_runs_differing_in_another_knob_are_different_cells(tmp_path, rows, curve):
    a = _run(tmp_path / "a", rows(100, 0.0, 0, curve(0.8)), 100, 0.0, 0, data__p_bursty=0.9)
    b = _run(tmp_path / "b", rows(100, 0.0, 0, curve(0.6)), 100, 0.0, 0, data__p_bursty=0.5, train__steps=7)
    df = load_results([a, b])
    assert "data.p_bursty" in df.columns and "train.steps" not in df.columns  # steps is bookkeeping
    assert len(summarize(df)) == 2


def test_several_experiments_are_combined(tmp_path, rows, curve):
    e1 = _experiment(tmp_path / "x" / "study", rows(100, 0.0, 0, curve(0.8)))
    e2 = _experiment(tmp_path / "y" / "study", rows(100, 0.0, 1, curve(0.6)))
    df = load_results([e1, e2])
    assert set(df["experiment"]) == {"x/study", "y/study"}  # same dir names: widened to stay unique
    s = summarize(df)
    assert len(s) == 1 and s.iloc[0]["n_seeds"] == 2  # two halves of one grid are pooled


def test_repeated_steps_keep_the_last_row(tmp_path, rows, curve):
    df = rows(100, 0.0, 0, curve(0.8))
    again = df.iloc[[2]].assign(icl_acc=0.99)  # a resumed trial re-reported step 300
    out = load_results(_experiment(tmp_path / "e", pd.concat([df, again])))
    assert len(out) == 5 and out.loc[out["step"] == 300, "icl_acc"].item() == 0.99


@pytest.mark.parametrize(
    "setup, message",
    [
        ("nothing", "does not exist"),
        ("empty_dir", "no results in"),
        ("empty_file", "is empty"),
        ("header_only", "no rows"),
        ("missing_cols", "lacks required column(s) icl_acc, iwl_acc"),
        ("all_nan", "metric train_acc is empty"),
        ("text_metric", "column icl_acc has non-numeric values"),
        ("not_csv", "is not a CSV file"),
    ],
)
def test_bad_input_is_a_user_error(tmp_path, rows, curve, setup, message):
    exp = tmp_path / "e"
    exp.mkdir()
    df = rows(100, 0.0, 0, curve(0.8))
    target = exp
    if setup == "nothing":
        target = tmp_path / "nope"
    elif setup == "empty_file":
        (exp / "results.csv").write_text("")
    elif setup == "header_only":
        (exp / "results.csv").write_text(",".join(df.columns) + "\n")
    elif setup == "missing_cols":
        df.drop(columns=["icl_acc", "iwl_acc"]).to_csv(exp / "results.csv", index=False)
    elif setup == "all_nan":
        df.assign(train_acc=float("nan")).to_csv(exp / "results.csv", index=False)
    elif setup == "text_metric":
        df.assign(icl_acc="high").to_csv(exp / "results.csv", index=False)
    elif setup == "not_csv":
        target = exp / "notes.txt"
        target.write_text("hello")
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_results(target)


def test_each_trial_gets_its_evaluation_size_and_effective_decay(tmp_path, rows, curve):
    """From a run's config.yaml, or a sweep's resolved spec with the row's grid values on top:
    the ICL set's size (the binomial part of the intervals) and wd * sum_t lr_t of the schedule."""
    from icl.metrics import DECAY_EXP, N_EVAL
    from icl.config import build_config
    from icl.schedule import decay_exponent

    run = _run(tmp_path / "runs" / "a", rows(100, 1e-2, 0, curve(0.8)), 100, 1e-2, 0, eval__n_sequences=512,
               train__steps=3000)
    out = load_results(run)
    want = build_config(Config().to_dict(), {WD: 1e-2, "eval.n_sequences": 512, "train.steps": 3000})
    assert (out[N_EVAL] == 512).all() and out[DECAY_EXP].iloc[0] == pytest.approx(decay_exponent(want))
    assert 0 < out[DECAY_EXP].iloc[0] < 1e-2 * 3000 * Config().optim.lr

    resolved = build_config("demo").to_dict()
    df = pd.concat([rows(100, wd, 0, curve(0.8)) for wd in (0.0, 0.1)], ignore_index=True)
    exp = _experiment(tmp_path / "sweep", df, {"resolved": resolved, "grid": {CLASSES: [100], WD: [0.0, 0.1]}})
    out = load_results(exp)
    by_wd = out.groupby(WD)[DECAY_EXP].first()
    assert by_wd[0.0] == 0.0 and by_wd[0.1] == pytest.approx(decay_exponent(build_config("demo", {WD: 0.1})))
    assert (out[N_EVAL] == build_config("demo").eval.n_sequences).all()
    shrink = summarize(out).set_index(WD)["shrink_factor"]
    assert shrink[0.0] == 1.0 and shrink[0.1] == pytest.approx(math.exp(-by_wd[0.1]))

    bare = load_results(_experiment(tmp_path / "bare", df))  # no spec, no config: unknown, and said so
    assert bare[N_EVAL].isna().all() and bare[DECAY_EXP].isna().all()
    assert any("effective decay are unknown" in n for n in bare.attrs["notes"])
