"""The STUDY.md success criterion on grids where the outcome is known by construction."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from analysis import summarize, trial_summary, verdict

CLASSES, WD, SEED = "data.num_classes", "optim.weight_decay", "seed"


def _row(v, classes, wd):
    t = v.table
    return t[(t[CLASSES] == classes) & (t[WD] == wd)].iloc[0]


def test_exactly_one_cell_passes(grid_one_pass):
    s = summarize(grid_one_pass)
    v = verdict(s, trial_summary(grid_one_pass))
    assert v.status == "supported" and not v.provisional and v.missing == []
    assert len(v.table) == 3  # few classes (10) x wd > 0 (1e-3, 1e-2, 1e-1)
    passing = v.passing
    assert len(passing) == 1
    assert (passing.iloc[0][CLASSES], passing.iloc[0][WD]) == (10, 1e-2)

    ok = _row(v, 10, 1e-2)
    assert ok["baseline_peak_icl_mean"] == pytest.approx(0.92)
    assert ok["ratio"] == pytest.approx(0.86 / 0.92)
    rel = math.hypot(math.sqrt(0.0002) / 0.86, math.sqrt(0.0008) / 0.92)  # sds of (0.85, 0.87) and (0.90, 0.94)
    assert ok["ratio_std"] == pytest.approx(0.86 / 0.92 * rel)
    assert ok["ratio_seed_min"] == pytest.approx(0.85 / 0.92) and ok["ratio_seed_max"] == pytest.approx(0.87 / 0.92)
    assert ok["seeds_above"] == 2
    assert ok["ratio_above_chance"] == pytest.approx(0.36 / 0.42)
    assert ok["train_acc_ratio"] == pytest.approx(0.90 / 0.99) and not bool(ok["collapsed"])

    low = _row(v, 10, 1e-3)
    assert low["ratio"] == pytest.approx(0.81 / 0.92) and not bool(low["passes"]) and not bool(low["collapsed"])

    collapsed = _row(v, 10, 1e-1)
    assert collapsed["ratio"] == pytest.approx(0.95 / 0.92)  # high ICL ...
    assert collapsed["train_acc_ratio"] == pytest.approx(0.50 / 0.99)  # ... but training accuracy collapsed
    assert bool(collapsed["collapsed"]) and not bool(collapsed["passes"])

    text = v.to_markdown()
    assert text.startswith("**Supported: 1 of 3")
    assert "10 classes, wd 1e-2" in v.headline and "0.935" in v.headline  # 0.86 / 0.92 = 0.9348
    assert "collapsed" in text


def test_stricter_bars_change_the_outcome(grid_one_pass):
    s = summarize(grid_one_pass)
    assert verdict(s, ratio=0.95).status == "not supported"
    # a looser collapse rule lets the high-ICL, low-training-accuracy cell pass too
    assert len(verdict(s, collapse_fraction=0.5).passing) == 2
    # a stricter one makes the 0.909 training-accuracy ratio a collapse: nothing passes
    v = verdict(s, collapse_fraction=0.95)
    assert v.status == "not supported" and "best is" in v.headline


def test_ratio_exactly_at_the_bar_passes(rows, curve):
    df = pd.concat([
        rows(100, 0.0, 0, curve(0.95)), rows(10, 0.0, 0, curve(0.6)), rows(10, 1e-2, 0, curve(0.855)),
    ], ignore_index=True)
    v = verdict(summarize(df))
    assert _row(v, 10, 1e-2)["ratio"] == pytest.approx(0.9) and v.status == "supported"


def test_missing_baseline_is_named(grid_one_pass):
    df = grid_one_pass[~((grid_one_pass[CLASSES] == 100) & (grid_one_pass[WD] == 0.0))]
    v = verdict(summarize(df))
    assert v.status == "undetermined"
    assert "100 classes, wd 0" in v.headline
    assert any("100 classes, wd 0" in m for m in v.missing)


def test_spec_grid_names_cells_without_results(grid_one_pass):
    s = summarize(grid_one_pass)
    grid = {CLASSES: [10, 100, 1600], WD: [0.0, 1e-3, 1e-2, 1e-1], SEED: [0, 1]}
    v = verdict(s, grid=grid)
    # the spec's largest class count has no results: the baseline is 1600 classes, wd 0, missing
    assert v.status == "undetermined" and v.provisional
    assert "1600 classes, wd 0" in v.headline
    assert "the baseline 1600 classes, wd 0" in v.missing
    assert "100 classes, wd 1e-3" not in v.missing  # 100 classes is now a few-class cell with results


def test_missing_collapse_reference_is_undetermined(grid_one_pass):
    df = grid_one_pass[~((grid_one_pass[CLASSES] == 10) & (grid_one_pass[WD] == 0.0))]
    v = verdict(summarize(df))
    assert v.status == "undetermined"
    assert v.table["passes"].isna().all()
    assert "10 classes, wd 0 (reference for collapse)" in v.missing


def test_single_class_count_cannot_judge(rows, curve):
    df = pd.concat([rows(100, 0.0, 0, curve(0.9)), rows(100, 1e-3, 0, curve(0.9))], ignore_index=True)
    v = verdict(summarize(df))
    assert v.status == "undetermined" and "any cell with fewer than 100 classes" in v.missing


def test_missing_seed_makes_the_verdict_provisional(grid_one_pass):
    df = grid_one_pass[~((grid_one_pass[CLASSES] == 10) & (grid_one_pass[WD] == 1e-2) & (grid_one_pass[SEED] == 1))]
    v = verdict(summarize(df), trial_summary(df))
    assert v.status == "supported" and v.provisional
    row = _row(v, 10, 1e-2)
    assert row["n_seeds"] == 1 and not row["seeds_complete"] and math.isnan(row["ratio_std"])
    assert "10 classes, wd 1e-2 lacks seed(s) 1" in v.to_markdown()


def test_weak_baseline_gets_a_caution(rows, curve):
    df = pd.concat([rows(100, 0.0, 0, curve(0.55)), rows(10, 0.0, 0, curve(0.52)), rows(10, 1e-2, 0, curve(0.53))],
                   ignore_index=True)
    v = verdict(summarize(df))
    assert v.status == "supported"  # 0.53 / 0.55 >= 0.9, as the criterion is written ...
    assert any(d.startswith("Caution: the baseline itself barely shows ICL") for d in v.details)  # ... flagged
