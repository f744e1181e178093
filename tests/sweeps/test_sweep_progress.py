"""The live table (no Ray cluster): a pack's report for it, concurrency, the sweep's ETA, and
the rows Ray's own CLIReporter code renders from Tune trials of packs (stand-ins carrying
exactly what Tune's trials carry for the table)."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from icl.config import build_config
from icl.schedule import shrink_text
from sweeps.progress import PER_MODEL, RATE, concurrency, finish_time, pack_progress
from sweeps.reporter import SweepReporter
from sweeps.spec import ModelSpec, Resources

GRID = [(100, 0.0, 0), (100, 0.1, 0), (1600, 0.0, 0), (1600, 0.1, 0)]
TRIALS = [
    ModelSpec(f"t00{i}", f"t00{i}_cell", {"data.num_classes": c, "optim.weight_decay": wd, "seed": s},
              build_config({}, {"train.steps": 10000, "data.num_classes": c, "optim.weight_decay": wd, "seed": s}))
    for i, (c, wd, s) in enumerate(GRID)
]


def tune_trial(pack_id: str, status: str, result: dict | None = None, error_file: str | None = None):
    """What Ray's table code reads from a Tune trial."""
    return SimpleNamespace(
        trial_id=f"tune-{pack_id}", config={"trial": pack_id}, status=status, last_result=result or {},
        error_file=error_file, run_metadata=SimpleNamespace(num_failures=1 if error_file else 0),
        temporary_state=SimpleNamespace(location=""), local_experiment_path="/ray/staging", evaluated_params={},
    )


def report(per_model: dict[str, tuple[int, float, float]], rate: float | None, now: float, age: float = 0.0) -> dict:
    rows = {m: {"step": s, "icl_acc": icl, "iwl_acc": iwl, "train_acc": 0.5, "train_loss": 1.0}
            for m, (s, icl, iwl) in per_model.items()}
    return {**pack_progress(rows, rate), "timestamp": now - age, "node_ip": "10.0.0.5", "pid": 4121,
            "training_iteration": 3}


def table_rows(text: str) -> dict[str, list[str]]:
    """The psql table's body rows, by their first cell."""
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("| t")]
    return {r[0]: r[1:] for r in rows}


def test_a_pack_reports_each_member_and_its_rate() -> None:
    out = pack_progress({"t000": {"step": 500, "icl_acc": 0.5, "lr": 1e-3, "attn_L0_induction": 0.1}}, 42.0)
    assert out == {PER_MODEL: {"t000": {"step": 500.0, "icl_acc": 0.5}}, RATE: 42.0}
    assert RATE not in pack_progress({}, None)


def test_concurrency_is_what_every_resource_allows() -> None:
    assert concurrency(Resources(cpu=1, gpu=0), 2, 0, None) == 2
    assert concurrency(Resources(cpu=2, gpu=0.5), 16, 1, None) == 2  # the study on one GPU
    assert concurrency(Resources(cpu=2, gpu=0.5), 16, 4, 3) == 3  # max_concurrent
    assert concurrency(Resources(cpu=4, gpu=0), 2, 0, None) == 1  # never below one


def test_finish_time_schedules_pending_trials_on_the_first_free_slot() -> None:
    assert finish_time([10, 30], [20, 20], slots=2) == 50  # 10+20, then 30+20
    assert finish_time([], [5, 5, 5], slots=2) == 10
    assert finish_time([7], [], slots=4) == 7
    assert finish_time([], [], slots=1) == 0


def test_one_row_per_model_with_its_cell_in_a_packed_sweep(tmp_path: Path) -> None:
    packs = {"p000": ("t000", "t001"), "p001": ("t002", "t003")}
    reporter = SweepReporter(TRIALS, packs, tmp_path, slots=1, period_s=0)
    reporter.setup(start_time=time.time(), total_samples=2)
    now = time.time() + 60  # the table's time; the results are this driver's
    trials = [
        tune_trial("p000", "RUNNING", report({"t000": (4000, 0.52, 0.99), "t001": (4000, 0.51, 0.98)}, 100.0, now)),
        tune_trial("p001", "PENDING"),
    ]
    assert reporter.should_report(trials)
    rows, line = reporter.rows(trials, now)
    text = reporter._progress_str(rows, False, line)

    header = next(line for line in text.splitlines() if line.startswith("| Trial name"))
    assert [c.strip() for c in header.strip("|").split("|")] == [
        "Trial name", "status", "loc", "pack", "num_classes", "weight_decay", "shrink", "seed", "step", "ICL", "IWL",
        "train acc", "model-steps/s", "ETA"]
    body = table_rows(text)
    # the pack's 2 x 6000 model-steps left at 100 model-steps/s: 2 minutes
    assert body["t000"] == ["RUNNING", "10.0.0.5:4121", "p000", "100", "0", "1", "0", "4000/10000", "0.52", "0.99",
                            "0.5", "100", "0:02:00"]
    # wd 0.1 over these trials' schedule (the default one, 10k steps): its total shrink factor
    shrink = shrink_text(build_config({"train.steps": 10000, "optim.weight_decay": 0.1}))
    assert shrink.startswith("e^-0.")
    assert body["t001"][2:8] == ["p000", "100", "0.1", shrink, "0", "4000/10000"]
    assert body["t003"][:8] == ["PENDING", "", "p001", "1600", "0.1", shrink, "0", "0/10000"]
    # p001 waits for the only slot: 2 min, then its 20000 model-steps at p000's rate
    assert "Sweep: 0/4 models finished, 8,000/40,000 model-steps (20%), 100.0 model-steps/s, " \
           "ETA 0:05:20 (1 trial at a time)" in text
    assert "Number of trials: 4/4 (2 PENDING, 2 RUNNING)" in text
    assert f"Result logdir: {tmp_path}" in text
    assert not reporter.should_report(trials)  # nothing new: no second table


def test_finished_models_errors_and_resumed_models(tmp_path: Path) -> None:
    packs = {t.trial_id: (t.trial_id,) for t in TRIALS}
    ckpt = tmp_path / "t003_cell" / "run" / "checkpoints" / "step_000002500"
    ckpt.mkdir(parents=True)  # t003 resumes from step 2500
    reporter = SweepReporter(TRIALS, packs, tmp_path, slots=2, period_s=0)
    now = time.time() + 60
    trials = [
        tune_trial("t000", "TERMINATED", report({"t000": (10000, 0.53, 1.0)}, 50.0, now)),
        tune_trial("t001", "ERROR", report({"t001": (500, 0.5, 0.01)}, 50.0, now), error_file="/exp/t001/error.txt"),
        tune_trial("t002", "RUNNING", report({"t002": (9000, 0.8, 0.3)}, 50.0, now, age=5)),
        tune_trial("t003", "PENDING"),
    ]
    rows, line = reporter.rows(trials, now)
    text = reporter._progress_str(rows, False, line)
    body = table_rows(text)
    assert "| pack" not in text  # a pack of one is its model: no pack column
    assert body["t000"][-6:] == ["10000/10000", "0.53", "1", "0.5", "50", ""]  # finished: no ETA
    assert body["t002"][-1] == "0:00:15"  # 1000 model-steps at 50/s, reported 5 s ago
    assert body["t003"][6] == "2500/10000"
    assert "Number of errored trials: 1" in text and "/exp/t001/error.txt" in text
    # t002's 15 s, and t003's 7500 model-steps at 50/s on the free slot; the failed t001 is not waited for
    assert "Sweep: 1/4 models finished, 22,000/40,000 model-steps (55%), 50.0 model-steps/s, ETA 0:02:30" in line


@pytest.mark.parametrize("seconds, text", [(0, "0:00:00"), (3725, "1:02:05"), (2 * 86400 + 60, "2d 00:01:00")])
def test_durations(seconds: float, text: str) -> None:
    from icl.train.progress import format_duration

    assert format_duration(seconds) == text


def test_a_report_from_a_previous_driver_is_not_counted_down(tmp_path: Path) -> None:
    """A resumed sweep's Tune trials carry their last result from before this driver started:
    its age says nothing about the trial now (it has not restarted yet)."""
    reporter = SweepReporter(TRIALS, {t.trial_id: (t.trial_id,) for t in TRIALS}, tmp_path, slots=4, period_s=0)
    old = time.time() - 3600
    trials = [tune_trial("t000", "RUNNING", report({"t000": (9000, 0.8, 0.3)}, 50.0, old))]
    rows, _ = reporter.rows(trials, time.time())
    assert rows[0].last_result["eta"] == "0:00:20"  # 1000 model-steps at 50/s, not 0


def test_the_shrink_column_follows_the_weight_decay_or_comes_last() -> None:
    from sweeps.reporter import with_shrink

    assert list(with_shrink({"pack": "pack", "optim.weight_decay": "weight_decay", "seed": "seed"})) == [
        "pack", "optim.weight_decay", "shrink", "seed"]
    assert list(with_shrink({"data.num_classes": "num_classes", "seed": "seed"})) == [
        "data.num_classes", "seed", "shrink"]


def test_peer_evaluators_show_both_definitions_side_by_side(tmp_path: Path) -> None:
    """CIWL and flip ICL over every label, each beside its argmax over the labels in context."""
    reporter = SweepReporter(TRIALS, {t.trial_id: (t.trial_id,) for t in TRIALS}, tmp_path, slots=4, period_s=0)
    now = time.time() + 60
    peers = {"ciwl_acc": 0.46, "ciwl_acc_inctx": 0.78, "flip_icl_ctx_acc": 0.03, "flip_icl_ctx_acc_inctx": 0.08,
             "flip_icl_iwl_acc": 0.66, "flip_icl_iwl_acc_inctx": 0.92}
    result = {**pack_progress({"t000": {"step": 4000, "icl_acc": 0.8, "iwl_acc": 0.3, "train_acc": 0.9, **peers}},
                              50.0), "timestamp": now, "node_ip": "10.0.0.5", "pid": 1, "training_iteration": 1}
    rows, line = reporter.rows([tune_trial("t000", "RUNNING", result)], now)
    text = reporter._progress_str(rows, False, line)
    header = next(line for line in text.splitlines() if line.startswith("| Trial name"))
    cols = [c.strip() for c in header.strip("|").split("|")]
    assert cols[cols.index("train acc") + 1:cols.index("model-steps/s")] == [
        "CIWL", "CIWL in ctx", "flip ctx", "flip ctx in ctx", "flip IWL"]
    assert table_rows(text)["t000"][-7:-2] == ["0.46", "0.78", "0.03", "0.08", "0.66"]


def test_models_finished_before_this_driver_are_rows_too(tmp_path: Path) -> None:
    """A resumed sweep runs only the packs with unfinished models on Tune; the finished ones
    are still rows of the table (and count in the sweep's line), read from their runs."""
    run = tmp_path / "t000_cell" / "run"
    (run / "checkpoints" / "step_000010000").mkdir(parents=True)
    (run / "metrics.csv").write_text("step,icl_acc,iwl_acc,train_acc\n5000,0.6,0.5,0.7\n10000,0.55,1.0,1.0\n")
    packs = {t.trial_id: (t.trial_id,) for t in TRIALS}
    reporter = SweepReporter(TRIALS, packs, tmp_path, slots=2, period_s=0, finished=["t000"])
    now = time.time() + 60
    trials = [tune_trial(t, "PENDING") for t in ("t001", "t002", "t003")]
    rows, line = reporter.rows(trials, now)
    body = table_rows(reporter._progress_str(rows, False, line))
    assert body["t000"][:2] == ["TERMINATED", ""]
    assert body["t000"][6:10] == ["10000/10000", "0.55", "1", "1"]  # after the cell and shrink columns
    assert "Sweep: 1/4 models finished, 10,000/40,000 model-steps (25%)" in line
