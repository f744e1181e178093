"""Packed sweeps (spec ``pack: K``): the grid points that differ only in seed and weight
decay train together in one Tune trial (``icl.train.train_packed``), and the experiment
looks exactly like one with a trial per grid point: one run directory per grid point,
results.csv and trials.csv with the same trial ids and grid columns.

Real Ray (the session's shared head), real trainer and data; the spec checks need no Ray.
The grid: the smoke spec (tiny with the ResNet embedder, the study's: here 40 steps,
evaluated and checkpointed every 20) over weight decay {0, 0.01} x seeds {0, 1} at 16
classes; ``pack: 3`` makes a pack of three and a pack of one. On the CPU a pack runs its
models one by one (``train.pack_forward=auto``), so packs of any size compute the same bits
and the sweeps here must agree exactly; that the GPU's batched forward equals a model alone
is tests/train/test_packed.py's business.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from sweep_helpers import cli_error, read_results, run_cli, start_cli, wait_for, without_timing

from icl.train import train
from icl.train.checkpoint import step_of
from sweeps import results as res
from sweeps.cli import main
from sweeps.experiment import Experiment
from sweeps.spec import expand, load_spec, make_packs, parse_spec, saved_yaml, shrink_of

GRID = {"data.num_classes": [16], "optim.weight_decay": [0.0, 0.01], "seed": [0, 1]}
STEPS = 40
EVERY = 20  # evaluation and checkpoint
TOL = 0.0  # the CPU's packs run model by model: the same bits whatever the pack


def smoke_doc(**changes) -> dict:
    doc = yaml.safe_load(Path(load_spec("smoke").source).read_text())
    doc["grid"] = dict(GRID)
    doc["overrides"].update({"train.steps": STEPS, "train.eval_every": EVERY, "train.checkpoint_every": EVERY,
                             "model.embedder": "resnet"})
    doc.update(changes)
    return doc


def write_spec(path: Path, doc: dict) -> Path:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def assert_close_results(got: pd.DataFrame, want: pd.DataFrame) -> None:
    """Equal non-timing columns: text columns exactly, numbers within TOL."""
    got, want = without_timing(got), without_timing(want)
    assert list(got.columns) == list(want.columns)
    assert len(got) == len(want)
    numeric = [c for c in got.columns if pd.api.types.is_numeric_dtype(want[c])]
    exact = [c for c in got.columns if c not in numeric]
    pd.testing.assert_frame_equal(got[exact], want[exact])
    np.testing.assert_allclose(got[numeric].to_numpy(float), want[numeric].to_numpy(float), rtol=0, atol=TOL)


# --------------------------------------------------------------------------- spec (no Ray)


def test_packs_group_seeds_and_weight_decays_in_grid_order() -> None:
    doc = smoke_doc(grid={"seed": [0, 1], "data.num_classes": [16, 64], "optim.weight_decay": [0.0, 0.01]})
    trials = expand(parse_spec(doc))
    assert [p.trial_ids for p in make_packs(parse_spec({**doc, "pack": 4}), trials)] == [
        ("t000", "t001", "t004", "t005"),  # 16 classes: both seeds x both weight decays
        ("t002", "t003", "t006", "t007"),  # 64 classes
    ]
    packs = make_packs(parse_spec({**doc, "pack": 2}), trials)  # numbered by first member: seed 0 first
    assert [(p.pack_id, p.trial_ids) for p in packs] == [
        ("p000", ("t000", "t001")),
        ("p001", ("t002", "t003")),
        ("p002", ("t004", "t005")),
        ("p003", ("t006", "t007")),
    ]
    assert packs[0].dirname == "p000_t000+t001"
    one = make_packs(parse_spec(doc), trials)  # pack: 1 (default): a Tune trial per grid point
    assert [(p.pack_id, p.dirname, p.trial_ids) for p in one] == [
        (t.trial_id, t.dirname, (t.trial_id,)) for t in trials
    ]


@pytest.mark.parametrize("pack", [0, -1, 1.5, "2", True])
def test_bad_pack_values_exit_2(pack, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    spec = write_spec(tmp_path / "bad.yaml", smoke_doc(pack=pack))
    line = cli_error(capsys, [str(spec), "--dry-run", "--storage", str(tmp_path)])
    assert "pack must be an integer >= 1" in line


@pytest.mark.slow  # builds the study's 30 paper-sized models
def test_the_study_runs_each_class_count_as_one_pack_of_15(capsys: pytest.CaptureFixture) -> None:
    spec = load_spec("study")
    packs = make_packs(spec, expand(spec))
    assert spec.base_config["model.embedder"] == "resnet"  # the faithful preset packs, BatchNorm and all
    assert [len(p.trial_ids) for p in packs] == [15, 15]
    by_id = {t.trial_id: t for t in expand(spec)}
    for p in packs:
        assert len({by_id[m].grid["data.num_classes"] for m in p.trial_ids}) == 1
    assert main(["study", "--dry-run", "--storage", "/nonexistent-icl-storage"]) == 0
    assert "30 models in 2 trials of up to 15 models (30 to run)" in capsys.readouterr().out


def test_grid_keys_that_change_the_model_split_packs() -> None:
    doc = smoke_doc(pack=4, grid={"model.layers": [1, 2], "seed": [0, 1]})
    spec = parse_spec(doc)
    assert [p.trial_ids for p in make_packs(spec, expand(spec))] == [("t000", "t001"), ("t002", "t003")]


def test_dry_run_shows_the_packs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    spec = write_spec(tmp_path / "packed.yaml", smoke_doc(pack=3))
    assert main([str(spec), "--dry-run", "--storage", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "per trial:  1 CPU, 0 GPU" in out
    assert "packing:    up to 3 models per trial, trained as one pack (train_packed)" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(("model ", "t0"))}
    assert rows["model"] == ["model", "trial", "data.num_classes", "optim.weight_decay", "seed", "shrink", "status"]
    shrink = shrink_of(expand(parse_spec(smoke_doc(pack=3)))[2])  # wd 0.01 over STEPS of `tiny`'s schedule
    assert shrink.startswith("e^-0.000")
    assert rows["t002"] == ["t002", "p000", "16", "0.01", "0", shrink, "to", "run"]
    assert rows["t003"] == ["t003", "p001", "16", "0.01", "1", shrink, "to", "run"]
    assert "4 models in 2 trials of up to 3 models (4 to run); dry run: nothing started" in out
    assert not (tmp_path / "smoke").exists()


def test_changing_pack_of_an_existing_experiment_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`pack` is part of the experiment's identity: Tune's saved state names packs (or
    trials), so an experiment continues only with the `pack` it was started with."""
    spec = write_spec(tmp_path / "packed.yaml", smoke_doc(pack=2))
    exp = tmp_path / "smoke"
    exp.mkdir()
    (exp / "spec.yaml").write_text(saved_yaml(load_spec(str(spec), storage=str(tmp_path))))
    assert main([str(spec), "--dry-run", "--storage", str(tmp_path)]) == 0
    assert "exists: would resume" in capsys.readouterr().out
    write_spec(spec, smoke_doc(pack=3))
    line = cli_error(capsys, [str(spec), "--dry-run", "--storage", str(tmp_path)])
    assert "already exists with a different spec (pack: 2 -> 3)" in line


# --------------------------------------------------------------------------- on Ray


@pytest.fixture(scope="module")
def unpacked(tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    """The same grid one model at a time, as ``pack: 1`` trains it (each model alone, with
    ``icl.train.train`` into its run directory; a sweep of single models on Ray is the smoke
    tests' business), and its results table: what the packed sweeps must equal."""
    exp = Experiment.build(parse_spec(smoke_doc(), storage=str(tmp_path_factory.mktemp("unpacked"))))
    for model in exp.models:
        train(model.config, exp.dir.run_dir(model), progress=False)
    res.write_results(exp.path, exp.models)
    return read_results(exp.path)


@pytest.fixture(scope="module")
def packed(ray_head, driver_env: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """``pack: 3`` with t001 (in pack p000) raising once right after its step-20 evaluation:
    the pack is retried by Tune and continues from its members' checkpoints (t000 and t001
    at step 20, t002 from the start: train_packed brings it level first)."""
    tmp = tmp_path_factory.mktemp("packed")
    spec = write_spec(tmp / "packed.yaml", smoke_doc(pack=3))
    args = [str(spec), "--storage", str(tmp), "--address", ray_head.address, "--no-analysis"]
    proc = run_cli(args, driver_env, faults="t001@20")
    return {"proc": proc, "exp": tmp / "smoke", "args": args, "spec": spec}


def test_packed_sweep_equals_the_unpacked_sweep(packed: dict, unpacked: pd.DataFrame) -> None:
    proc, exp = packed["proc"], packed["exp"]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "4 models in 2 trials of up to 3 models" in proc.stdout and "4/4 models finished, 0 failed" in proc.stdout
    got = read_results(exp)
    assert len(got) == 4 * 2 and list(got.trial_id.unique()) == ["t000", "t001", "t002", "t003"]
    assert_close_results(got, unpacked)
    # one run directory per grid point, where the unpacked sweep puts it
    trials = expand(load_spec(str(packed["spec"])))
    for t in trials:
        run = pd.read_csv(res.run_dir(exp, t).path / "metrics.csv")
        assert list(run.step) == [20, 40]
    table = pd.read_csv(exp / "trials.csv")
    assert list(table.trial_id) == ["t000", "t001", "t002", "t003"]
    assert list(table.status) == ["TERMINATED"] * 4 and list(table.last_step) == [STEPS] * 4
    assert list(table.pack) == ["p000", "p000", "p000", "p001"]
    # the retry of p000 resumed each member from its own newest checkpoint
    tries = {t.trial_id: [a["resumed_from_step"] for a in res.attempts(exp, t)] for t in trials}
    assert tries == {"t000": [0, 20], "t001": [0, 20], "t002": [0, 0], "t003": [0]}
    # Tune's checkpoint of a pack holds every member's checkpoint of that step (the latest kept)
    (kept,) = (exp / "p000_t000+t001+t002").glob("checkpoint_*")
    assert sorted(p.name for p in kept.iterdir()) == ["t000", "t001", "t002"]
    assert all(step_of(p) == STEPS for p in kept.iterdir())


def test_rerun_of_a_finished_packed_sweep_trains_nothing(packed: dict, driver_env: dict) -> None:
    exp = packed["exp"]
    assert packed["proc"].returncode == 0
    trials = expand(load_spec(str(packed["spec"])))
    before = (exp / "results.csv").read_bytes(), [res.attempts(exp, t) for t in trials]
    proc = run_cli(packed["args"], driver_env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resuming" in proc.stdout and "4 already finished" in proc.stdout
    assert (exp / "results.csv").read_bytes() == before[0]
    assert [res.attempts(exp, t) for t in trials] == before[1]


def test_a_diverged_model_fails_alone(ray_head, driver_env: dict, tmp_path: Path) -> None:
    """Weight decay 1e6 at lr 1e-3 multiplies the decayed weights by about -1000 per step: that
    model's loss becomes non-finite (in fp32, with the linear embedder); its pack-mate
    (weight decay 0) finishes, equal to the same model trained alone. The diverged model is
    reported with its own error (no retries here: a retry would train only it, as the
    retried pack above trains only what is unfinished)."""
    grid = {"data.num_classes": [16], "optim.weight_decay": [0.0, 1.0e6], "seed": [0]}
    doc = smoke_doc(pack=2, max_failures=0, grid=grid)
    doc["overrides"].update({"model.embedder": "linear", "train.precision": "fp32"})
    spec = write_spec(tmp_path / "diverge.yaml", doc)
    proc = run_cli([str(spec), "--storage", str(tmp_path), "--address", ray_head.address, "--no-analysis"], driver_env)
    out = proc.stdout
    assert proc.returncode == 1, out[-3000:] + proc.stderr[-3000:]
    assert "1/2 models finished, 1 failed" in out
    assert "FAILED t001 (data.num_classes=16, optim.weight_decay=1e+06, seed=0) in trial p000 after 1 attempt(s): " in out
    assert "TrainingDiverged: training loss became non-finite" in out
    exp = tmp_path / "smoke"
    table = pd.read_csv(exp / "trials.csv").set_index("trial_id")
    assert table.loc["t000", "status"] == "TERMINATED" and table.loc["t001", "status"] == "ERROR"
    assert "non-finite" in table.loc["t001", "error"]
    t000, t001 = expand(load_spec(str(spec)))
    train(t000.config, tmp_path / "alone")
    got = without_timing(pd.read_csv(res.run_dir(exp, t000).path / "metrics.csv"))
    pd.testing.assert_frame_equal(got, without_timing(pd.read_csv(tmp_path / "alone" / "metrics.csv")),
                                  check_exact=False, rtol=1e-4, atol=1e-6)
    assert "TrainingDiverged: training loss became non-finite" in (exp / t001.dirname / "diverged.txt").read_text()


def test_a_packed_resnet_sweep_resumes_after_sigkill(ray_head, driver_env: dict, unpacked: pd.DataFrame,
                                                     tmp_path: Path) -> None:
    """``pack: 3`` on the shared cluster, its driver SIGKILLed once a model has a checkpoint
    (mid-sweep), then the same command to the end: the results equal the uninterrupted
    sweep's. (What a SIGKILL leaves of an embedded Ray is test_sweep_e2e.py's business.)"""
    spec = write_spec(tmp_path / "packed.yaml", smoke_doc(pack=3))
    args = [str(spec), "--storage", str(tmp_path), "--address", ray_head.address, "--no-analysis"]
    exp = tmp_path / "smoke"
    trials = expand(load_spec(str(spec)))
    driver = start_cli(args, driver_env, tmp_path / "run1.log")

    def checkpointed() -> bool:
        steps = [res.run_dir(exp, t).latest_step() for t in trials]
        return any(steps) and not all(s == STEPS for s in steps)

    assert wait_for(checkpointed, 240), (tmp_path / "run1.log").read_text()[-3000:]
    driver.kill()
    driver.wait(timeout=30)
    # Ray ends a dead driver's trials with it: their processes go before the same command runs again
    workers = {a["pid"] for t in trials for a in res.attempts(exp, t)}
    assert wait_for(lambda: not any(alive(pid) for pid in workers), 60), workers
    assert not all(res.run_dir(exp, t).finished(STEPS) for t in trials)
    proc = run_cli(args, driver_env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resuming" in proc.stdout and "4/4 models finished, 0 failed" in proc.stdout
    assert_close_results(read_results(exp), unpacked)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
