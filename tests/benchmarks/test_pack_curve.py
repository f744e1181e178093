"""A preset trained as a pack of the study's weight decays until a deadline (benchmarks/pack_curve.py):
it stops at the last evaluation that fits, keeps every model's rows of every evaluation, and
draws the curve."""

import pandas as pd
import pytest
from bench_helpers import benchmark_module


@pytest.fixture(scope="module")
def pack_curve():
    with benchmark_module("pack_curve") as module:
        yield module


@pytest.mark.parametrize("seconds, stopped", [pytest.param(600, "the preset's last step", marks=pytest.mark.slow),
                                              (0.001, "the deadline")])
def test_the_curve_holds_whole_evaluations_until_the_deadline(pack_curve, tmp_path, capsys, seconds, stopped):
    csv, png = tmp_path / "curve.csv", tmp_path / "curve.png"
    args = ["--config", "tiny", "--set", "train.steps=40", "--device", "cpu", "--eval-every", "20",
            "--seconds", str(seconds), "--out", str(tmp_path / "runs"), "--csv", str(csv), "--png", str(png)]
    assert pack_curve.main(args) == 0
    df = pd.read_csv(csv)
    steps = [20, 40] if stopped == "the preset's last step" else [20]
    assert sorted(df["step"].unique()) == steps
    assert len(df) == 5 * len(steps) and sorted(df["optim.weight_decay"].unique()) == list(pack_curve.WEIGHT_DECAYS)
    assert {"icl_acc", "iwl_acc", "data.num_classes", "seed"} <= set(df.columns)
    assert png.stat().st_size > 10_000
    line = capsys.readouterr().out.splitlines()[-1]
    assert line.startswith("science: tiny (64 classes) as a pack of 5 weight decays") and f"stopped by {stopped}" in line
