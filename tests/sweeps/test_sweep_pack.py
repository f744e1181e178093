"""Packed sweeps (spec ``pack: K``): the grid points that differ only in seed and weight
decay train together in one Tune trial (``icl.train.train_packed``), and the experiment
looks exactly like an unpacked one: one run directory per grid point where the unpacked
sweep puts it, results.csv and trials.csv with the same trial ids and grid columns.

Real Ray (the session's shared head), real trainer and data; the spec checks need no Ray.
The grid: the smoke spec (tiny; here 100 steps, evaluated and checkpointed every 50) over
weight decay {0, 0.01} x seeds {0, 1} at 16 classes; ``pack: 3`` makes a pack of three and a
pack of one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from sweep_helpers import cli_error, read_results, run_cli, without_timing

from icl.errors import UserError
from sweeps import results as res
from sweeps.cli import main
from sweeps.runner import checkpoint_step
from sweeps.spec import expand, load_spec, make_packs, parse_spec, saved_yaml

GRID = {"data.num_classes": [16], "optim.weight_decay": [0.0, 0.01], "seed": [0, 1]}
STEPS = 100
EVERY = 50  # evaluation and checkpoint
TOL = 1e-5  # packed and solo training agree to ~1e-7 (batched kernels round differently)


def smoke_doc(**changes) -> dict:
    doc = yaml.safe_load(Path(load_spec("smoke").source).read_text())
    doc["grid"] = dict(GRID)
    doc["overrides"].update({"train.steps": STEPS, "train.eval_every": EVERY, "train.checkpoint_every": EVERY})
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


def test_pack_with_the_resnet_embedder_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    spec = write_spec(tmp_path / "resnet.yaml", smoke_doc(pack=2))
    line = cli_error(capsys, [str(spec), "--set", "model.embedder=resnet", "--storage", str(tmp_path)])
    assert "model.embedder=resnet cannot be packed" in line and "BatchNorm" in line and "`pack: 1`" in line
    assert not (tmp_path / "smoke").exists()  # refused before anything was written
    with pytest.raises(UserError, match="cannot be packed"):
        doc = smoke_doc(pack=2)
        doc["overrides"]["model.embedder"] = "resnet"
        spec = parse_spec(doc)
        make_packs(spec, expand(spec))


def test_dry_run_shows_the_packs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    spec = write_spec(tmp_path / "packed.yaml", smoke_doc(pack=3))
    assert main([str(spec), "--dry-run", "--storage", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "per pack:   1 CPU, 0 GPU" in out
    assert "packing:    up to 3 models per trial (train_packed): 2 packs" in out
    assert "trial  pack  data.num_classes  optim.weight_decay  seed  status" in out
    assert "t002   p000  16                0.01                0     to run" in out
    assert "t003   p001  16                0.01                1     to run" in out
    assert "4 trials in 2 packs (4 to run); dry run: nothing started" in out
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
def unpacked(ray_head, driver_env: dict, tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    """The same grid as one trial per grid point (pack: 1): what the packed sweeps must equal."""
    tmp = tmp_path_factory.mktemp("unpacked")
    spec = write_spec(tmp / "unpacked.yaml", smoke_doc())
    proc = run_cli([str(spec), "--storage", str(tmp), "--address", ray_head.address, "--no-analysis"], driver_env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return read_results(tmp / "smoke")


@pytest.fixture(scope="module")
def packed(ray_head, driver_env: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """``pack: 3`` with t001 (in pack p000) raising once right after its step-50 evaluation:
    the pack is retried by Tune and continues from its members' checkpoints (t000 and t001
    at step 50, t002 from the start: train_packed brings it level first)."""
    tmp = tmp_path_factory.mktemp("packed")
    spec = write_spec(tmp / "packed.yaml", smoke_doc(pack=3))
    args = [str(spec), "--storage", str(tmp), "--address", ray_head.address, "--no-analysis"]
    proc = run_cli(args, dict(driver_env, ICL_SWEEP_FAULTS="t001@50"))
    return {"proc": proc, "exp": tmp / "smoke", "args": args, "spec": spec}


def test_packed_sweep_equals_the_unpacked_sweep(packed: dict, unpacked: pd.DataFrame) -> None:
    proc, exp = packed["proc"], packed["exp"]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "4 trials in 2 packs of up to 3" in proc.stdout and "4/4 trials finished, 0 failed" in proc.stdout
    got = read_results(exp)
    assert len(got) == 4 * 2 and list(got.trial_id.unique()) == ["t000", "t001", "t002", "t003"]
    assert_close_results(got, unpacked)
    # one run directory per grid point, where the unpacked sweep puts it
    trials = expand(load_spec(str(packed["spec"])))
    for t in trials:
        run = pd.read_csv(res.run_dir(exp, t) / "metrics.csv")
        assert list(run.step) == [50, 100]
    table = pd.read_csv(exp / "trials.csv")
    assert list(table.trial_id) == ["t000", "t001", "t002", "t003"]
    assert list(table.status) == ["TERMINATED"] * 4 and list(table.last_step) == [STEPS] * 4
    assert list(table.pack) == ["p000", "p000", "p000", "p001"]
    # the retry of p000 resumed each member from its own newest checkpoint
    tries = {t.trial_id: [a["resumed_from_step"] for a in res.attempts(exp / t.dirname)] for t in trials}
    assert tries == {"t000": [0, 50], "t001": [0, 50], "t002": [0, 0], "t003": [0]}
    # Tune's checkpoint of a pack holds every member's checkpoint of that step (the latest kept)
    (kept,) = (exp / "p000_t000+t001+t002").glob("checkpoint_*")
    assert sorted(p.name for p in kept.iterdir()) == ["t000", "t001", "t002"]
    assert all(checkpoint_step(p) == STEPS for p in kept.iterdir())


def test_rerun_of_a_finished_packed_sweep_trains_nothing(packed: dict, driver_env: dict) -> None:
    exp = packed["exp"]
    assert packed["proc"].returncode == 0
    trials = expand(load_spec(str(packed["spec"])))
    before = (exp / "results.csv").read_bytes(), [res.attempts(exp / t.dirname) for t in trials]
    proc = run_cli(packed["args"], driver_env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resuming" in proc.stdout and "4 already finished" in proc.stdout
    assert (exp / "results.csv").read_bytes() == before[0]
    assert [res.attempts(exp / t.dirname) for t in trials] == before[1]


def test_a_diverged_model_fails_alone(ray_head, driver_env: dict, unpacked: pd.DataFrame, tmp_path: Path) -> None:
    """Weight decay 5000 at lr 1e-3 multiplies the decayed weights by about -4 per step: that
    model's loss becomes non-finite; its pack-mate (weight decay 0) finishes, equal to the
    unpacked run. The diverged model is reported with its own error (no retries here: a
    retry would train only it, as the retried pack above trains only what is unfinished)."""
    grid = {"data.num_classes": [16], "optim.weight_decay": [0.0, 5000.0], "seed": [0]}
    doc = smoke_doc(pack=2, max_failures=0, grid=grid)
    spec = write_spec(tmp_path / "diverge.yaml", doc)
    proc = run_cli([str(spec), "--storage", str(tmp_path), "--address", ray_head.address, "--no-analysis"], driver_env)
    out = proc.stdout
    assert proc.returncode == 1, out[-3000:] + proc.stderr[-3000:]
    assert "1/2 trials finished, 1 failed" in out
    assert "FAILED t001 (data.num_classes=16, optim.weight_decay=5000, seed=0) in pack p000 after 1 attempt(s): " in out
    assert "TrainingDiverged: training loss became non-finite" in out
    exp = tmp_path / "smoke"
    table = pd.read_csv(exp / "trials.csv").set_index("trial_id")
    assert table.loc["t000", "status"] == "TERMINATED" and table.loc["t001", "status"] == "ERROR"
    assert "non-finite" in table.loc["t001", "error"]
    got = read_results(exp)
    first = [df[df.trial_id == "t000"].reset_index(drop=True) for df in (got, unpacked)]
    assert_close_results(*first)
    (t001,) = [t for t in expand(load_spec(str(spec))) if t.trial_id == "t001"]
    assert "TrainingDiverged: training loss became non-finite" in (exp / t001.dirname / "error.txt").read_text()
