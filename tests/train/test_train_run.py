"""A run: learns, resumes exactly, refuses what it must, and never loses what is on disk."""

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from icl.config import load_config
from icl.layout import EVENTS_GLOB, RunLayout
from icl.metrics import ATTN_STATS, EVALUATION, STEP, TIMING, TRAIN, attn_column, is_metric
from icl.train import TrainingDiverged, train
from train_cli_helpers import run_cli
from icl.train.step import PackedTrainer
from icl.train.tensorboard import read_events, tag


def science(path: Path) -> pd.DataFrame:
    return pd.read_csv(path / "metrics.csv").drop(columns=list(TIMING))


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def final_state(path: Path) -> dict:
    return torch.load(sorted((path / "checkpoints").iterdir())[-1] / "state.pt", weights_only=True)


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """One uninterrupted tiny run (200 steps, eval every 50, checkpoints at 100 and 200)."""
    out = tmp_path_factory.mktemp("runs") / "full"
    train(load_config("tiny"), out)
    return out


def test_a_few_hundred_steps_of_tiny_lower_the_loss(finished):
    m = pd.read_csv(finished / "metrics.csv")
    assert list(m["step"]) == [50, 100, 150, 200]
    assert m["train_loss"].iloc[-1] < m["train_loss"].iloc[0] - 0.3
    assert {"sequences", "lr", "icl_acc", "icl_acc_all", "iwl_acc", "ece", "steps_per_s"} <= set(m.columns)
    assert any(c.startswith("attn_L1_") for c in m.columns)
    with np.load(finished / "attention.npz") as z:
        assert z["heads"].shape == (4, 2, 4, 5)  # evaluations x layers x heads x stats
        assert list(z["step"]) == [50, 100, 150, 200]


def test_every_column_and_file_is_one_icl_metrics_and_icl_layout_name(finished):
    """The names the readers use are the ones the trainer writes: training columns first, then
    every evaluation and attention column, timing last; no column icl.metrics does not know."""
    header = list(pd.read_csv(finished / "metrics.csv", nrows=0).columns)
    assert header[:5] == [STEP, *TRAIN] and header[-4:] == list(TIMING)
    attention = [attn_column(layer, stat) for layer in range(2) for stat in ATTN_STATS]
    assert set(EVALUATION) | set(attention) <= set(header[5:-4]) and all(is_metric(c) for c in header)
    run = RunLayout(finished)
    assert run.config.is_file() and run.metrics.is_file() and run.attention.is_file() and run.holds_run()
    assert run.checkpoints() == [run.checkpoint_dir(100), run.checkpoint_dir(200)] and len(run.event_files()) == 1


def test_written_config_is_fully_resolved(finished):
    again = load_config(str(finished / "config.yaml"))
    assert again == load_config("tiny")


class Stop(Exception):
    pass


def stop_after_150(row, checkpoint):
    """An ``on_eval`` callback: interrupt the run after its step-150 evaluation (checkpoint at 100)."""
    if row["step"] == 150:
        raise Stop


def test_resumed_run_equals_uninterrupted(finished, tmp_path):
    out = tmp_path / "part"
    with pytest.raises(Stop):
        train(load_config("tiny"), out, on_eval=stop_after_150)
    assert list(pd.read_csv(out / "metrics.csv")["step"]) == [50, 100, 150]
    train(load_config("tiny"), out)  # resumes from the step-100 checkpoint
    pd.testing.assert_frame_equal(science(out), science(finished))
    a, b = final_state(out), final_state(finished)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    with np.load(out / "attention.npz") as x, np.load(finished / "attention.npz") as y:
        assert np.array_equal(x["heads"], y["heads"])
    assert_events_equal_metrics(out)  # step 150 was dropped and trained again: once in the events


def test_a_run_from_an_older_version_resumes_with_the_new_columns(finished, tmp_path, monkeypatch):
    """A checkpoint written before a metric existed: the resumed run appends the new columns,
    empty in the older rows, and everything else equals the uninterrupted run."""
    import icl.train.evaluate as evaluate
    from icl.metrics import ICL_HALVES

    new = {"icl_train_acc_all", "flip_icl_ctx_acc_inctx", "flip_icl_iwl_acc_inctx", "ciwl_acc_inctx", *ICL_HALVES}
    current = evaluate.set_metrics

    out = tmp_path / "old"
    with monkeypatch.context() as m:
        m.setattr(evaluate, "set_metrics", lambda *a: {k: v for k, v in current(*a).items() if k not in new})
        with pytest.raises(Stop):
            train(load_config("tiny"), out, on_eval=stop_after_150)
    assert new.isdisjoint(pd.read_csv(out / "metrics.csv").columns)
    train(load_config("tiny"), out)  # resumes from the step-100 checkpoint of the "older version"
    got, want = science(out), science(finished)
    assert set(got.columns[-len(new):]) == new  # appended after the columns the old rows have
    assert got.loc[got["step"] <= 100, list(new)].isna().all().all()
    pd.testing.assert_frame_equal(got.loc[got["step"] > 100, list(want.columns)].reset_index(drop=True),
                                  want.loc[want["step"] > 100].reset_index(drop=True))
    pd.testing.assert_frame_equal(got[list(want.columns.difference(new))], want[list(want.columns.difference(new))])


def assert_events_equal_metrics(run: Path) -> None:
    """The run's one event file holds every metrics.csv column at every evaluated step exactly
    once (float32, as TensorBoard keeps scalars) and the per-head attention histograms."""
    assert len(list(run.glob(EVENTS_GLOB))) == 1
    m = pd.read_csv(run / "metrics.csv")
    events = read_events(run)
    for column in m.columns.drop("step"):
        steps, values = zip(*events[tag(column)])
        assert list(steps) == list(m["step"]), column
        np.testing.assert_array_equal(np.float32(values), m[column].to_numpy(np.float32), err_msg=column)
    with np.load(run / "attention.npz") as z:
        layers, heads = z["heads"].shape[1:3]
    induction = events["heads/L1_induction"]
    assert [s for s, _ in induction] == list(m["step"]) and all(h.num == heads for _, h in induction)
    assert len([t for t in events if t.startswith("heads/")]) == layers * 5


@pytest.mark.slow
def test_a_run_killed_with_sigkill_resumes_exactly(tmp_path):
    overrides = ["train.steps=400", "train.checkpoint_every=100"]
    reference = tmp_path / "reference"
    train(load_config("tiny", overrides), reference)
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "icl.train.cli", "--config", "tiny", "--out", str(out)]
    cmd += [arg for o in overrides for arg in ("--set", o)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not (out / "checkpoints" / "step_000000100").exists():  # killed mid-run, after a checkpoint
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL  # it was still running: the kill interrupted it
    assert len(pd.read_csv(out / "metrics.csv")) < 8
    subprocess.run(cmd, check=True, capture_output=True)
    pd.testing.assert_frame_equal(science(out), science(reference))


def test_completed_run_is_not_retrained(finished, capsys):
    before = snapshot(finished)
    code, _ = run_cli(["--config", "tiny", "--out", str(finished)], capsys)
    assert code == 0
    assert snapshot(finished)["metrics.csv"] == before["metrics.csv"]
    assert snapshot(finished)["checkpoints/step_000000200/state.pt"] == before["checkpoints/step_000000200/state.pt"]


def test_a_different_config_in_the_out_dir_is_refused_untouched(finished, capsys):
    before = snapshot(finished)
    code, err = run_cli(["--config", "tiny", "--set", "optim.weight_decay=0.1", "--out", str(finished)], capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and "optim.weight_decay" in err
    assert snapshot(finished) == before


def test_a_non_empty_directory_without_a_run_is_refused(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    code, err = run_cli(["--config", "tiny", "--out", str(tmp_path)], capsys)
    assert code == 2 and "holds no run" in err
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize(
    "override, words",
    [
        ("model.heads=5", "must divide model.d_model"),
        ("optim.weight_decay=-0.1", "optim.weight_decay must be >= 0"),
        ("optim.lr=-1", "optim.lr must be a positive"),
        ("train.steps=0", "train.steps must be in [1, 2^32)"),
        ("train.checkpoint_every=75", "multiple of train.eval_every"),
        ("model.embedder=vit", "model.embedder must be one of"),
        ("model.layers=two", "must be an integer"),
        ("data.root=/nonexistent-icl-data", "no Omniglot data under"),  # checked before a run directory is made
    ],
)
def test_bad_model_and_optim_values_exit_2_with_one_line(tmp_path, capsys, override, words):
    code, err = run_cli(["--config", "tiny", "--set", override, "--out", str(tmp_path / "r")], capsys)
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and words in err
    assert not (tmp_path / "r").exists()


def test_cli_error_has_no_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "icl.train.cli", "--config", "tiny", "--set", "train.steps=0",
                        "--out", str(tmp_path / "r")], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr


def test_corrupt_checkpoint_falls_back_to_the_previous_good_one(finished, tmp_path, capsys):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(finished, out)
    state = out / "checkpoints" / "step_000000200" / "state.pt"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF
    state.write_bytes(bytes(data))
    code, err = run_cli(["--config", "tiny", "--out", str(out)], capsys)
    assert code == 0
    assert "step_000000200 is corrupt" in err and "fails its checksum" in err
    pd.testing.assert_frame_equal(science(out), science(finished))  # 100 -> 200 recomputed


def test_no_intact_checkpoint_is_an_error(finished, tmp_path, capsys):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(finished, out)
    for ckpt in (out / "checkpoints").iterdir():
        (ckpt / "state.pt").write_bytes(b"truncated")
    before = snapshot(out)
    code, err = run_cli(["--config", "tiny", "--out", str(out)], capsys)
    assert code == 2 and "no intact checkpoint" in err.splitlines()[-1]
    assert snapshot(out) == before


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    real_step = PackedTrainer.step

    def diverging_step(self, t):
        if t == 131:  # the weights blow up between the checkpoint at 100 and the eval at 150
            with torch.no_grad():
                self.models[0].head.weight.fill_(float("nan"))
        return real_step(self, t)

    monkeypatch.setattr(PackedTrainer, "step", diverging_step)
    out = tmp_path / "nan"
    code, err = run_cli(["--config", "tiny", "--out", str(out)], capsys)
    assert code == 2 and "non-finite between steps 100 and 150" in err and "step_000000100" in err
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_000000100"]
    assert list(pd.read_csv(out / "metrics.csv")["step"]) == [50, 100]
    with pytest.raises(TrainingDiverged):
        train(load_config("tiny"), out)


def test_the_training_clock_waits_for_the_device_once_per_segment(tmp_path, monkeypatch):
    """On a GPU the host queues steps ahead of the device; the training time of a segment must
    include the queued work. Here a wait of 0.3 s stands in for the device finishing it: it is
    asked for once per segment (never per step), and the rows' training rate counts it."""
    from icl.train import loop

    calls = []

    def device_finishing(device):
        calls.append(device)
        time.sleep(0.3)

    monkeypatch.setattr(loop, "synchronize", device_finishing)
    cfg = load_config("tiny", ["train.steps=40", "train.eval_every=20"])
    train(cfg, tmp_path / "run")
    m = pd.read_csv(tmp_path / "run" / "metrics.csv")
    assert calls == [torch.device("cpu")] * 2  # two segments of 20 steps
    assert (m["steps_per_s"] <= 20 / 0.3).all()  # each segment's 20 steps took the wait too
    assert (m["wall_s"].diff().fillna(m["wall_s"]) >= 0.3).all()
