"""Per-trial and per-cell numbers on curves whose answers are known by construction."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from analysis import cell_keys, missing_cells, summarize, trial_summary
from analysis.summary import STATS

CLASSES, WD, SEED = "data.num_classes", "optim.weight_decay", "seed"


def test_trial_numbers_of_a_known_curve(rows):
    # rises to 0.9 at step 400, fades to 0.62 at the last evaluation (step 700)
    icl = [0.50, 0.55, 0.61, 0.90, 0.85, 0.70, 0.62]
    iwl = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, math.nan]  # last IWL missing: final = last value present
    train = [0.2, 0.4, 0.6, 0.8, 0.9, 0.95, 0.97]
    df = rows(100, 0.0, 0, icl, iwl=iwl, train=train)
    t = trial_summary(df, threshold=0.6).iloc[0]
    assert t["peak_icl"] == 0.90
    assert t["peak_step"] == 400
    assert t["final_icl"] == 0.62
    assert t["icl_drop"] == pytest.approx(0.28)
    assert t["icl_onset_step"] == 300  # first evaluation with icl >= 0.6
    assert t["final_iwl"] == 0.6
    assert t["final_train_acc"] == 0.97
    assert t["last_step"] == 700 and t["n_evals"] == 7
    # a higher threshold moves the onset; one never reached gives NaN
    assert trial_summary(df, threshold=0.85).iloc[0]["icl_onset_step"] == 400
    assert math.isnan(trial_summary(df, threshold=0.95).iloc[0]["icl_onset_step"])


def test_peak_step_is_first_occurrence_and_unsorted_input(rows):
    df = rows(100, 0.0, 0, [0.5, 0.8, 0.7, 0.8, 0.6])
    t = trial_summary(df.iloc[::-1]).iloc[0]  # row order must not matter
    assert t["peak_step"] == 200 and t["final_icl"] == 0.6 and t["icl_drop"] == pytest.approx(0.2)


def test_cell_mean_and_std_over_seeds(rows, curve):
    df = pd.concat([rows(100, 1e-3, 0, curve(0.80, 0.70)), rows(100, 1e-3, 1, curve(0.90, 0.60)),
                    rows(100, 0.0, 0, curve(0.70)), rows(100, 0.0, 1, curve(0.70))], ignore_index=True)
    s = summarize(df)
    assert list(s.columns[:3]) == [CLASSES, WD, "n_seeds"]
    for stat in STATS:
        assert f"{stat}_mean" in s.columns and f"{stat}_std" in s.columns
    cell = s[s[WD] == 1e-3].iloc[0]
    assert cell["n_seeds"] == 2 and bool(cell["seeds_complete"])
    assert cell["peak_icl_mean"] == pytest.approx(0.85)
    assert cell["peak_icl_std"] == pytest.approx(math.sqrt(0.005))  # sample sd of 0.8, 0.9
    assert cell["final_icl_mean"] == pytest.approx(0.65)
    assert cell["icl_drop_mean"] == pytest.approx(0.20)
    assert cell["icl_drop_std"] == pytest.approx(math.sqrt(0.02))  # drops 0.1 and 0.3
    assert cell["peak_step_mean"] == 300 and cell["peak_step_std"] == 0
    # onset 0.6: curve(0.8) = 0.5, 0.65, 0.8 -> step 200; curve(0.9) = 0.5, 0.7, 0.9 -> step 200
    assert cell["icl_onset_step_mean"] == 200 and cell["icl_onset_n"] == 2
    assert cell["final_iwl_mean"] == pytest.approx(0.3) and cell["final_train_acc_mean"] == pytest.approx(0.99)
    flat = s[s[WD] == 0.0].iloc[0]
    assert flat["peak_icl_std"] == pytest.approx(0.0) and flat["icl_drop_mean"] == pytest.approx(0.0)


def test_missing_seeds_are_flagged_not_hidden(rows, curve):
    frames = [rows(100, wd, seed, curve(0.8)) for wd in (0.0, 1e-3) for seed in (0, 1, 2)
              if not (wd == 1e-3 and seed == 1)]
    df = pd.concat(frames, ignore_index=True)
    s = summarize(df)
    short = s[s[WD] == 1e-3].iloc[0]
    assert short["n_seeds"] == 2 and short["missing_seeds"] == "1" and not short["seeds_complete"]
    assert short["seeds"] == "0,2"
    full = s[s[WD] == 0.0].iloc[0]
    assert full["n_seeds"] == 3 and full["seeds_complete"] and full["missing_seeds"] == ""
    # the spec's seed list counts even when every cell lacks a seed
    s4 = summarize(df, expected_seeds=[0, 1, 2, 3])
    assert not s4["seeds_complete"].any()
    assert s4[s4[WD] == 0.0].iloc[0]["missing_seeds"] == "3"


def test_single_seed_has_no_std(rows, curve):
    s = summarize(rows(100, 0.0, 0, curve(0.8)))
    assert s.iloc[0]["n_seeds"] == 1 and math.isnan(s.iloc[0]["peak_icl_std"])


def test_onset_mean_over_seeds_that_reach_it(rows, curve):
    df = pd.concat([rows(10, 0.0, 0, curve(0.9)), rows(10, 0.0, 1, curve(0.55))], ignore_index=True)
    cell = summarize(df).iloc[0]
    assert cell["icl_onset_n"] == 1 and cell["icl_onset_step_mean"] == 200


def test_rerun_seed_counts_once_and_running_trials_are_behind(rows, curve):
    df = pd.concat([
        rows(100, 0.0, 0, curve(0.8), trial_id="a"),
        rows(100, 0.0, 0, curve(0.9)[:3], trial_id="a_retry_short"),  # the same seed again, not as far
        rows(100, 0.0, 1, curve(0.7)),
        rows(100, 1e-3, 0, curve(0.8)[:3]),  # still running: 3 of 5 evaluations
        rows(100, 1e-3, 1, curve(0.8)),
    ], ignore_index=True)
    s = summarize(df)
    base = s[s[WD] == 0.0].iloc[0]
    assert base["n_trials"] == 3 and base["n_seeds"] == 2
    assert base["peak_icl_mean"] == pytest.approx(0.75)  # 0.8 (furthest trial of seed 0) and 0.7
    assert not base["behind"]
    running = s[s[WD] == 1e-3].iloc[0]
    assert running["behind"] and running["last_step_min"] == 300 and running["last_step_max"] == 500


def test_experiment_is_a_cell_key_only_when_grid_points_collide(rows, curve):
    a = rows(100, 0.0, 0, curve(0.8)).assign(experiment="a")
    b = rows(100, 0.0, 1, curve(0.8)).assign(experiment="b")
    assert cell_keys(pd.concat([a, b])) == [CLASSES, WD]  # two halves of one grid: pooled
    b0 = rows(100, 0.0, 0, curve(0.6)).assign(experiment="b")
    assert cell_keys(pd.concat([a, b0])) == [CLASSES, WD, "experiment"]
    assert len(summarize(pd.concat([a, b0]))) == 2


def test_missing_cells_from_the_spec_grid(rows, curve):
    s = summarize(pd.concat([rows(100, 0.0, 0, curve(0.8)), rows(1600, 0.0, 0, curve(0.8))]))
    grid = {CLASSES: [100, 1600], WD: ["0", "1e-3"], SEED: [0]}  # YAML may give 1e-3 as a string
    assert missing_cells(s, grid) == [{CLASSES: 100, WD: 0.001}, {CLASSES: 1600, WD: 0.001}]
    assert missing_cells(s, None) == []


def test_peak_is_cross_fitted_on_the_two_halves(rows):
    """The step is chosen on one half of the ICL set and read on the other, both ways; the raw
    maximum of the whole set stays beside it, and its step is the peak step."""
    from analysis.intervals import binomial_se
    from icl.metrics import N_EVAL

    even = [0.50, 0.70, 0.90, 0.80]
    odd = [0.50, 0.80, 0.70, 0.85]
    icl = [(e + o) / 2 for e, o in zip(even, odd)]  # 0.5, 0.75, 0.8, 0.825
    df = rows(100, 0.0, 0, icl).assign(icl_acc_even=even, icl_acc_odd=odd, **{N_EVAL: 1000})
    t = trial_summary(df).iloc[0]
    assert t["peak_method"] == "cross-fit"
    assert t["peak_icl"] == pytest.approx((0.70 + 0.80) / 2)  # even peaks at 300 (odd 0.7), odd at 400 (even 0.8)
    assert t["peak_icl_raw"] == pytest.approx(0.825) and t["peak_step"] == 400
    assert t["icl_drop"] == pytest.approx(0.75 - 0.825)  # no fade; the unbiased peak can sit below the final value
    assert t["peak_icl_se"] == pytest.approx(0.5 * math.hypot(binomial_se(0.7, 500), binomial_se(0.8, 500)))
    assert t["final_icl_se"] == pytest.approx(binomial_se(0.825, 1000))
    old = trial_summary(rows(100, 0.0, 0, icl)).iloc[0]  # logged before the halves existed: the raw maximum
    assert old["peak_method"] == "raw max" and old["peak_icl"] == old["peak_icl_raw"] == pytest.approx(0.825)
    assert math.isnan(old["peak_icl_se"])  # and no set size known: no binomial error


def test_cell_intervals_combine_seeds_and_the_evaluation_set(rows, curve):
    from analysis.intervals import Z95, binomial_se, t95
    from icl.metrics import N_EVAL

    peaks = (0.80, 0.84, 0.88)
    df = pd.concat([rows(100, 0.0, s, curve(p)).assign(**{N_EVAL: 1024}) for s, p in enumerate(peaks)],
                   ignore_index=True)
    cell = summarize(df).iloc[0]
    rms = math.sqrt(sum(binomial_se(p, 1024) ** 2 for p in peaks) / 3)
    half = math.hypot(t95(2) * 0.04 / math.sqrt(3), Z95 * rms)
    assert (cell["peak_icl_lo"], cell["peak_icl_hi"]) == pytest.approx((0.84 - half, 0.84 + half))
    assert cell["interval"] == "t over 3 seeds + binomial error of the evaluation set"
    assert cell["peak_method"] == "raw max" and cell["peak_icl_se"] == pytest.approx(rms)
    one = summarize(df[df[SEED] == 0]).iloc[0]
    assert (one["peak_icl_lo"], one["peak_icl_hi"]) == pytest.approx((0.80 - Z95 * binomial_se(0.8, 1024),
                                                                      0.80 + Z95 * binomial_se(0.8, 1024)))
    assert one["final_icl_lo"] < 0.80 < one["final_icl_hi"] and one["icl_drop_lo"] < 0 < one["icl_drop_hi"]
