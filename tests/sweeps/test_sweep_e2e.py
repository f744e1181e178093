"""End to end on real Ray: the smoke sweep, resume after Ctrl-C and SIGKILL, retries of a
failing trial, errors found before any trial starts. Real trainer, real data, no mocks.

Failing trials come from the tests' fault wrapper (``sweeps.faults``, installed by
``tests/sweeps/faulty_sweep.py``, carried to the trials in the trainable): ``t001@200`` makes
model t001's trial raise right after it reported step 200, once; ``x*`` on every attempt.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from sweep_helpers import STEPS, read_results, run_cli, start_cli, wait_for, without_timing

from sweeps import results as res
from sweeps.procs import pids_mentioning
from icl.train.checkpoint import step_of
from icl.layout import EVENTS_GLOB, ExperimentDir
from icl.train.tensorboard import read_events
from sweeps.spec import expand, load_spec

SMOKE_TRIALS = expand(load_spec("smoke"))


def attempts(exp: Path) -> dict[str, list[dict]]:
    return {t.trial_id: res.attempts(exp, t) for t in SMOKE_TRIALS}


def progress(exp: Path) -> dict[str, tuple[int, int]]:
    """Per trial: (last evaluated step, newest checkpoint step) from the run directories."""
    out = {}
    for t in SMOKE_TRIALS:
        run = res.run_dir(exp, t)
        out[t.trial_id] = (run.last_logged_step() or 0, run.latest_step())
    return out


def assert_same_results(exp: Path, reference: pd.DataFrame) -> None:
    got = read_results(exp)
    pd.testing.assert_frame_equal(without_timing(got), without_timing(reference))


# --------------------------------------------------------------------------- the smoke sweep


def test_smoke_sweep_end_to_end(smoke_run: dict) -> None:
    proc, exp = smoke_run["proc"], smoke_run["exp"]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "4/4 models finished, 0 failed" in proc.stdout
    for line in ("experiment: ", "results:    ", "trials:     ", "spec:       ", "analysis:   "):
        assert line in proc.stdout
    df = read_results(exp)
    grid = ["data.num_classes", "optim.weight_decay", "seed"]
    assert list(df.columns[:5]) == ["trial_id", *grid, "step"]
    for col in ("train_loss", "train_acc", "icl_acc", "iwl_acc", "ece", "attn_L0_induction", "steps_per_s", "wall_s"):
        assert col in df.columns
    assert len(df) == 4 * 4  # 4 trials x evaluations at 50, 100, 150, 200
    assert sorted(df.trial_id.unique()) == ["t000", "t001", "t002", "t003"]
    assert set(df.step) == {50, 100, 150, 200}
    assert df.set_index("trial_id")[grid].drop_duplicates().shape[0] == 4
    # every trial's rows are exactly its trainer's metrics.csv
    for t in SMOKE_TRIALS:
        run = pd.read_csv(res.run_dir(exp, t).path / "metrics.csv")
        mine = df[df.trial_id == t.trial_id].drop(columns=["trial_id", *grid]).reset_index(drop=True)
        pd.testing.assert_frame_equal(mine, run[mine.columns])
    saved = yaml.safe_load((exp / "spec.yaml").read_text())
    assert saved["grid"]["data.num_classes"] == [16, 64] and saved["resolved"]["train"]["steps"] == STEPS
    trials = pd.read_csv(exp / "trials.csv")
    assert list(trials.status) == ["TERMINATED"] * 4 and list(trials.last_step) == [STEPS] * 4
    # the analysis package wrote its report into the experiment, or the sweep said why not
    assert (exp / "report").is_dir() or "analysis:   not available" in proc.stdout


def test_the_live_table_shows_each_model_by_cell(smoke_run: dict) -> None:
    out = smoke_run["proc"].stdout
    tables = out.split("== Status ==")[1:]
    assert len(tables) >= 2  # the first (all pending) and the last
    final = tables[-1]
    header = next(line for line in final.splitlines() if line.startswith("| Trial name"))
    assert [c.strip() for c in header.strip("|").split("|")] == [
        "Trial name", "status", "loc", "num_classes", "weight_decay", "shrink", "seed", "step", "ICL", "IWL",
        "train acc", "CIWL", "CIWL in ctx", "flip ctx", "flip ctx in ctx", "flip IWL",
        "model-steps/s"]  # (no ETA column once every model is finished)
    for t in SMOKE_TRIALS:
        row = next(line for line in final.splitlines() if line.startswith(f"| {t.trial_id} "))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1] == "TERMINATED" and cells[3:8] == [str(t.grid["data.num_classes"]), "0", "1",
                                                          str(t.grid["seed"]), "200/200"]
    assert "Sweep: 4/4 models finished, 800/800 model-steps (100%)" in final
    # (the tables in between, with each trial's and the sweep's ETA, depend on timing: see
    # test_sweep_progress.py)


def test_tensorboard_shows_one_run_per_model_with_its_metrics(smoke_run: dict) -> None:
    exp = smoke_run["exp"]
    runs = sorted(p.parent for p in exp.rglob(EVENTS_GLOB))  # TensorBoard's runs: folders of event files
    assert runs == sorted(res.run_dir(exp, t).path for t in SMOKE_TRIALS)
    for t in SMOKE_TRIALS:
        run = res.run_dir(exp, t).path
        m = pd.read_csv(run / "metrics.csv")
        icl = read_events(run)["eval/icl_acc"]
        assert [s for s, _ in icl] == list(m.step) == [50, 100, 150, 200]
        assert [v for _, v in icl] == pytest.approx(list(m.icl_acc), abs=1e-7)


def test_rerun_of_a_finished_sweep_reruns_nothing(smoke_run: dict, ray_head, driver_env: dict) -> None:
    exp = smoke_run["exp"]
    before = (exp / "results.csv").read_bytes(), attempts(exp)
    proc = run_cli(["smoke", "--storage", str(smoke_run["storage"]), "--address", ray_head.address, "--no-analysis"], driver_env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resuming" in proc.stdout and "4 already finished" in proc.stdout
    assert (exp / "results.csv").read_bytes() == before[0]
    assert attempts(exp) == before[1]  # no trial started again


def test_existing_name_with_another_spec_is_refused(smoke_run: dict, driver_env: dict) -> None:
    exp = smoke_run["exp"]
    before = sorted(p.name for p in exp.iterdir())
    proc = run_cli(["smoke", "--storage", str(smoke_run["storage"]), "--set", "train.steps=50"], driver_env)
    assert proc.returncode == 2
    assert proc.stderr.count("error:") == 1 and "Traceback" not in proc.stderr
    assert "already exists with a different spec (train.steps: 200 -> 50)" in proc.stderr
    assert sorted(p.name for p in exp.iterdir()) == before


# --------------------------------------------------------------------------- resume


def test_resume_after_ctrl_c_and_sigkill(
    ray_head, driver_env: dict, embedded_env: dict, reference: pd.DataFrame, tmp_path: Path
) -> None:
    """The same command three times: interrupted by Ctrl-C, then killed with SIGKILL, then
    to the end; the results equal those of the uninterrupted sweep. The first two use the
    default embedded Ray: Ctrl-C stops it entirely, and what the SIGKILL leaves of it (Ray's
    agents) is stopped by the third, which joins the shared cluster (cheaper, and a resume on
    another cluster is allowed)."""
    args = ["smoke", "--storage", str(tmp_path), "--no-analysis"]
    on_cluster = args + ["--address", ray_head.address]
    exp = tmp_path / "smoke"
    log = [tmp_path / f"run{i}.log" for i in (1, 2, 3)]

    embedded = args + ["--num-cpus", "2"]
    ray_tmp = embedded_env["RAY_TMPDIR"]

    # 1. Ctrl-C (SIGINT to the driver's process group, as a terminal sends it) while a trial
    #    is between two checkpoints: the driver stops its Ray
    driver = start_cli(embedded, embedded_env, log[0])
    assert wait_for(lambda: any(0 < c < STEPS and s < STEPS for s, c in progress(exp).values()), 180), log[0].read_text()[-3000:]
    os.killpg(driver.pid, signal.SIGINT)
    assert driver.wait(timeout=120) == 130, log[0].read_text()[-3000:]
    text = log[0].read_text()
    assert "interrupted: run the same command again to resume" in text
    assert "Traceback" not in text and "Exception ignored" not in text, text[-3000:]
    assert wait_for(lambda: not pids_mentioning(ray_tmp), 30), pids_mentioning(ray_tmp)
    assert not ExperimentDir(exp).ray_record.exists()
    after1, rows1 = progress(exp), len(read_results(exp))

    # 2. the same command on an embedded Ray, killed with SIGKILL once it made progress and
    #    results.csv shows it (the table is refreshed while the sweep runs)
    driver = start_cli(embedded, embedded_env, log[1])

    def grown() -> bool:
        more = sum(s for s, _ in progress(exp).values()) >= sum(s for s, _ in after1.values()) + 100
        return more and len(read_results(exp)) > rows1

    assert wait_for(grown, 180), log[1].read_text()[-3000:]
    driver.kill()
    driver.wait(timeout=30)
    session = json.loads(ExperimentDir(exp).ray_record.read_text())["session_dir"]
    assert session.startswith(ray_tmp) and pids_mentioning(session)  # Ray's agents outlive a SIGKILLed driver
    finished = [k for k, (s, _) in progress(exp).items() if s == STEPS]
    tries_before = attempts(exp)

    # 3. the same command, to the end: it first stops what the killed driver's Ray left
    driver = start_cli(on_cluster, driver_env, log[2])
    assert driver.wait(timeout=240) == 0, log[2].read_text()[-3000:]
    assert "4/4 models finished" in log[2].read_text()
    assert "left by the embedded Ray of a killed driver" in log[2].read_text()
    assert not pids_mentioning(session) and not pids_mentioning(ray_tmp)

    assert_same_results(exp, reference)
    for t in SMOKE_TRIALS:  # each model's TensorBoard events: every step once, after 2 interruptions
        assert [s for s, _ in read_events(res.run_dir(exp, t).path)["eval/icl_acc"]] == [50, 100, 150, 200]
    tries = attempts(exp)
    for trial_id in finished:  # finished trials are not trained again: at most Tune, whose
        # saved state may predate their end (SIGKILL), starts them to learn they are done
        assert all(a["resumed_from_step"] == STEPS for a in tries[trial_id][len(tries_before[trial_id]) :])
    resumed = [a for trial in tries.values() for a in trial if a["resumed_from_step"] > 0]
    assert resumed, tries  # some trial continued from its checkpoint
    assert all(a["resumed_from_step"] % 100 == 0 for a in resumed)
    assert list(pd.read_csv(exp / "trials.csv").status) == ["TERMINATED"] * 4
    for t in SMOKE_TRIALS:  # Ray's older checkpoint copies are pruned at the end
        (kept,) = (exp / t.dirname).glob("checkpoint_*")  # a pack of one: one member sub-directory
        assert [p.name for p in kept.iterdir()] == [t.trial_id] and step_of(kept / t.trial_id) == STEPS


# --------------------------------------------------------------------------- failures


def test_failing_trials_are_retried_and_reported(ray_head, driver_env: dict, reference: pd.DataFrame, tmp_path: Path) -> None:
    proc = run_cli(["smoke", "--storage", str(tmp_path), "--address", ray_head.address, "--no-analysis"], driver_env,
                   faults="t001@100,t003@100x*")
    out = proc.stdout
    assert proc.returncode == 1, out[-3000:] + proc.stderr[-3000:]
    assert "3/4 models finished, 1 failed" in out
    assert "FAILED t003 (data.num_classes=64, optim.weight_decay=0, seed=1) after 3 attempt(s)" in out
    assert "injected fault #3 in trial t003 at step 150" in out

    exp = tmp_path / "smoke"
    tries = attempts(exp)
    # t001 failed once, right after its step-100 checkpoint; the retry continued from it
    assert [a["resumed_from_step"] for a in tries["t001"]] == [0, 100]
    # t003 kept failing (at 100, then at 150 after each resume from the step-100 checkpoint):
    # 1 + max_failures (2) attempts
    assert [a["resumed_from_step"] for a in tries["t003"]] == [0, 100, 100]
    got, ref = without_timing(read_results(exp)), without_timing(reference)
    done = got.trial_id != "t003"
    pd.testing.assert_frame_equal(got[done].reset_index(drop=True), ref[ref.trial_id != "t003"].reset_index(drop=True))
    partial = got[~done].reset_index(drop=True)
    assert list(partial.step) == [50, 100, 150]  # the failed trial's evaluations are kept
    pd.testing.assert_frame_equal(partial, ref[ref.trial_id == "t003"].head(3).reset_index(drop=True))
    trials = pd.read_csv(exp / "trials.csv").set_index("trial_id")
    assert trials.loc["t003", "status"] == "ERROR" and "injected fault" in trials.loc["t003", "error"]
    assert trials.loc["t001", "status"] == "TERMINATED" and trials.loc["t001", "attempts"] == 2


def test_heads_true_attributes_every_checkpoint_as_it_is_written(ray_head, driver_env: dict, tmp_path: Path) -> None:
    """``heads: true``: the trial analyses each checkpoint when it is saved, so runs that keep
    only their newest checkpoint still get attribution at every checkpoint step."""
    spec = yaml.safe_load((Path(load_spec("smoke").source)).read_text())
    spec.update(heads=True, grid={"seed": [0]})
    spec["overrides"].update({"train.steps": 100, "train.checkpoint_every": 50, "train.keep_checkpoints": 1})
    path = tmp_path / "heads.yaml"
    path.write_text(yaml.safe_dump(spec))
    proc = run_cli([str(path), "--storage", str(tmp_path), "--address", ray_head.address, "--no-analysis"], driver_env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (trial,) = expand(load_spec(str(path)))
    run = res.run_dir(tmp_path / "smoke", trial)
    assert [p.name for p in run.checkpoints()] == ["step_000000100"]  # only the newest is kept ...
    heads = pd.read_csv(run.path / "heads.csv")
    assert sorted(heads.step.unique()) == [50, 100]  # ... yet every checkpoint was analysed


# --------------------------------------------------------------------------- errors before any trial


def test_impossible_resources_are_refused(ray_head, driver_env: dict, tmp_path: Path) -> None:
    spec = yaml.safe_load((Path(load_spec("smoke").source)).read_text())
    spec["resources"] = {"cpu": 1, "gpu": 1}
    path = tmp_path / "gpu.yaml"
    path.write_text(yaml.safe_dump(spec))
    proc = run_cli([str(path), "--storage", str(tmp_path / "s"), "--address", ray_head.address], driver_env)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stderr.count("error:") == 1 and "Traceback" not in proc.stderr
    assert "each trial needs 1 CPU + 1 GPU" in proc.stderr
    assert not (tmp_path / "s" / "smoke").exists()  # nothing started, nothing written


@pytest.mark.slow  # the sweep's CLI in a subprocess
def test_unreachable_address_exits_2_quickly(driver_env: dict, tmp_path: Path) -> None:
    t0 = time.monotonic()
    proc = run_cli(["smoke", "--storage", str(tmp_path), "--address", "127.0.0.1:1"], driver_env, timeout=60)
    assert proc.returncode == 2 and time.monotonic() - t0 < 30
    assert proc.stderr.strip().startswith("error: cannot reach a Ray cluster at 127.0.0.1:1")
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "smoke").exists()


def test_wrong_token_is_a_clear_error(ray_head, driver_env: dict, tmp_path: Path) -> None:
    bad = tmp_path / "token"
    bad.write_text("0" * 64)
    bad.chmod(0o600)
    proc = run_cli(
        ["smoke", "--storage", str(tmp_path), "--address", ray_head.address], dict(driver_env, RAY_AUTH_TOKEN_PATH=str(bad)), timeout=120
    )
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot join the Ray cluster"), proc.stderr
    assert "authentication failed" in lines[0]
