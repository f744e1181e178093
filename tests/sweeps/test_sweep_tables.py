"""results.csv / trials.csv from run directories, and the small driver helpers (no Ray)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pandas as pd
import pytest

from icl.errors import OutputError, UserError
from icl.layout import ExperimentDir
from sweeps import results as res
from icl.train.checkpoint import step_of
from icl.train.rundir import RunDir
from sweeps.faults import Fault, Faults, parse_faults
from sweeps.ray_session import check_reachable
from icl.config import build_config
from sweeps.spec import ModelSpec, PackSpec

TRIALS = [
    ModelSpec(f"t00{i}", f"t00{i}_num_classes={c}_seed={s}", cell, build_config({}, cell))
    for i, (c, s) in enumerate([(16, 0), (16, 1), (64, 0)]) if (cell := {"data.num_classes": c, "seed": s})
]


def write_run(exp: Path, trial: ModelSpec, text: str) -> None:
    run = res.run_dir(exp, trial).path
    run.mkdir(parents=True)
    (run / "metrics.csv").write_text(text)


def test_results_table_is_long_and_verbatim(tmp_path: Path) -> None:
    write_run(tmp_path, TRIALS[0], "step,train_loss,icl_acc,wall_s\n25,2.5,0.5,1.0\n50,2.25,0.625,2.0\n")
    # a run being appended to: the torn last line is not a row
    write_run(tmp_path, TRIALS[1], "step,train_loss,icl_acc,wall_s\n25,2.4000000000000004,0.5,1.5\n50,2.")
    # TRIALS[2] has not started: no rows
    n = res.write_results(tmp_path, TRIALS)
    rows = list(csv.reader((tmp_path / "results.csv").open()))
    assert rows[0] == ["trial_id", "data.num_classes", "seed", "step", "train_loss", "icl_acc", "wall_s"]
    assert rows[1:] == [
        ["t000", "16", "0", "25", "2.5", "0.5", "1.0"],
        ["t000", "16", "0", "50", "2.25", "0.625", "2.0"],
        ["t001", "16", "1", "25", "2.4000000000000004", "0.5", "1.5"],
    ]
    assert n == 3
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic write left no temporary


def test_results_parquet_is_the_csv_table_written_with_it(tmp_path: Path) -> None:
    write_run(tmp_path, TRIALS[0], "step,train_loss,icl_acc\n25,2.5,0.5\n50,2.25,\n")
    write_run(tmp_path, TRIALS[1], "step,train_loss,icl_acc,ciwl_acc\n25,2.4,0.5,0.75\n")
    res.write_results(tmp_path, TRIALS)
    table = pd.read_parquet(ExperimentDir(tmp_path).results_parquet)
    pd.testing.assert_frame_equal(table, pd.read_csv(ExperimentDir(tmp_path).results), check_exact=True)
    assert list(table["trial_id"]) == ["t000", "t000", "t001"] and table["icl_acc"].isna().tolist() == [
        False, True, False]
    assert table["step"].dtype.kind == "i" and table["ciwl_acc"].dtype.kind == "f"

    # the two appear together or not at all: a parquet that cannot be written keeps the old csv
    before = (ExperimentDir(tmp_path).results).read_bytes()
    write_run(tmp_path, TRIALS[2], "step,train_loss,icl_acc\n25,2.0,0.5\n")
    (ExperimentDir(tmp_path).results_parquet).unlink()
    (ExperimentDir(tmp_path).results_parquet).mkdir()
    with pytest.raises(OutputError):
        res.write_results(tmp_path, TRIALS)
    assert (ExperimentDir(tmp_path).results).read_bytes() == before
    assert not list(tmp_path.glob(".*.tmp"))


def test_results_columns_union_keeps_trainer_order(tmp_path: Path) -> None:
    write_run(tmp_path, TRIALS[0], "step,a,b\n1,1,2\n")
    write_run(tmp_path, TRIALS[1], "step,a,c,b\n1,1,3,2\n")
    columns, rows = res.collect(tmp_path, TRIALS)
    assert columns == ["trial_id", "data.num_classes", "seed", "step", "a", "b", "c"]
    assert rows[0][-1] == "" and rows[1][4:] == ["1", "2", "3"]


def test_trials_table(tmp_path: Path) -> None:
    write_run(tmp_path, TRIALS[0], "step,x\n25,1\n50,2\n")
    ExperimentDir(tmp_path).attempts(TRIALS[0]).write_text('{"attempt": 1}\n{"attempt": 2}\n{"attem')
    packs = {"p0": ("t000", "t001"), "t002": ("t002",)}
    res.write_trials(tmp_path, TRIALS, {"t000": ("TERMINATED", ""), "t001": ("ERROR", "RuntimeError: boom")}, packs)
    rows = list(csv.DictReader((tmp_path / "trials.csv").open()))
    assert [r["status"] for r in rows] == ["TERMINATED", "ERROR", "PENDING"]
    assert rows[0]["last_step"] == "50" and rows[0]["attempts"] == "2"
    assert rows[1]["error"] == "RuntimeError: boom"
    assert rows[2]["run_dir"] == "t002_num_classes=64_seed=0/run"
    assert [r["pack"] for r in rows] == ["p0", "p0", "t002"]
    # what the analysis reads back: each model's run directory, where the sweep wrote it
    assert ExperimentDir(tmp_path).run_dirs() == {t.trial_id: res.run_dir(tmp_path, t).path for t in TRIALS}


def test_checkpoint_steps(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    for name in ("step_000000100", "step_000000200", ".tmp-step_000000300-12", "notes"):
        (run.checkpoints_dir / name).mkdir(parents=True)
    assert run.latest_step() == 200 and run.latest_checkpoint() == run.checkpoint_dir(200)
    assert [p.name for p in run.checkpoints()] == ["step_000000100", "step_000000200"]
    assert RunDir(tmp_path / "nothing").latest_step() == 0
    (run.checkpoint_dir(200) / "manifest.json").write_text(json.dumps({"step": 200, "files": {}}))
    assert step_of(run.checkpoint_dir(200)) == 200
    assert step_of(run.checkpoint_dir(100)) is None  # no manifest: not a checkpoint


def test_faults_are_parsed_and_injected_where_they_say(tmp_path: Path) -> None:
    """The tests' fault wrapper (sweeps.faults, installed by tests/sweeps/faulty_sweep.py):
    parsed against the experiment's models, raising at a model's first evaluation at or after
    its step, as many times as it says, counted in the model's directory across attempts."""
    ids = [t.trial_id for t in TRIALS]
    faults = parse_faults("t000@100, t002@50x*,t001@25x3", ids)
    assert faults == Faults({"t000": Fault(100, 1), "t002": Fault(50, None), "t001": Fault(25, 3)})
    assert parse_faults("", ids) == Faults({})
    with pytest.raises(UserError, match="must look like TRIAL@STEP"):
        parse_faults("t000@", ids)
    with pytest.raises(UserError, match="which this sweep does not have"):
        parse_faults("t009@10", ids)
    pack = PackSpec("p0", "p0_t000+t001", tuple(TRIALS[:2]), tmp_path)
    faults(pack, 0, {"step": 50})  # before its step: nothing
    with pytest.raises(RuntimeError, match="injected fault #1 in trial t000 at step 150"):
        faults(pack, 0, {"step": 150})
    faults(pack, 0, {"step": 200})  # once only: the retry goes on
    for n in (1, 2, 3):
        with pytest.raises(RuntimeError, match=f"injected fault #{n} in trial t001 at step 25"):
            faults(pack, 1, {"step": 25})
    faults(pack, 1, {"step": 25})


def test_unreachable_address_fails_fast() -> None:
    with pytest.raises(UserError, match="cannot reach a Ray cluster at 127.0.0.1:1"):
        check_reachable("127.0.0.1:1", timeout=2)
    with pytest.raises(UserError, match="must look like HOST:PORT"):
        check_reachable("nohost")


@pytest.mark.slow  # a report with every plot
def test_the_sweep_writes_its_report_through_the_analysis_library(tmp_path: Path) -> None:
    """run_analysis calls analysis.report.analyze into the experiment's report folder and
    prints what icl-analyze prints; bad results are one line saying how to retry."""
    import io

    from analysis.synthetic import make_sweep, write_experiment
    from sweeps.driver import run_analysis

    out = io.StringIO()
    missing = run_analysis(tmp_path / "nothing", out)
    assert missing.startswith("failed (error: ") and "does not exist" in missing
    assert missing.endswith(f"retry: icl-analyze {tmp_path / 'nothing'} --out {tmp_path / 'nothing' / 'report'}")
    exp = write_experiment(tmp_path / "exp", make_sweep(classes=(100,), weight_decays=(0.0,), seeds=(0,),
                                                      steps=(1000, 2000)))
    report = ExperimentDir(exp).report
    assert run_analysis(exp, out) == str(report) and (report / "report.md").is_file()
    assert out.getvalue().startswith("verdict: ") and f"report:  {report / 'report.md'}\n" in out.getvalue()
