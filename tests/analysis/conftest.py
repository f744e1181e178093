"""Builders of small results tables whose summary numbers and verdict are known by construction."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import pytest

CLASSES, WD, SEED = "data.num_classes", "optim.weight_decay", "seed"


def trial_rows(
    classes: int,
    wd: float,
    seed: int,
    icl: Sequence[float],
    iwl: Sequence[float] | None = None,
    train: Sequence[float] | None = None,
    steps: Sequence[int] | None = None,
    trial_id: str | None = None,
) -> pd.DataFrame:
    """One trial's evaluations in the sweep's results.csv layout (2 attention layers)."""
    n = len(icl)
    steps = list(steps) if steps is not None else [100 * (i + 1) for i in range(n)]
    df = pd.DataFrame({
        "trial_id": trial_id or f"t_c{classes}_wd{wd:g}_s{seed}",
        CLASSES: classes,
        WD: wd,
        SEED: seed,
        "step": steps,
        "sequences": [32 * s for s in steps],
        "train_loss": [1.0] * n,
        "train_acc": list(train) if train is not None else [0.99] * n,
        "lr": [3e-4] * n,
        "icl_acc": list(icl),
        "icl_acc_all": list(icl),
        "icl_train_acc": list(icl),
        "iwl_acc": list(iwl) if iwl is not None else [0.3] * n,
        "ece": [0.05] * n,
    })
    for layer in range(2):
        for kind, value in (("match_img", 0.2), ("match_lbl", 0.4), ("other", 0.4), ("induction", 0.3),
                            ("prev_tok", 0.6)):
            df[f"attn_L{layer}_{kind}"] = [value * (layer + 1) / 2 * (0.5 + i / (2 * n)) for i in range(n)]
    for col, value in (("steps_per_s", 100.0), ("sequences_per_s", 3200.0)):
        df[col] = value
    df["wall_s"] = [s / 100 for s in steps]
    return df


def peak_curve(peak: float, final: float | None = None, n: int = 5) -> list[float]:
    """0.5 ... up to ``peak`` at the middle evaluation, then down to ``final`` (default: peak)."""
    final = peak if final is None else final
    mid = n // 2
    return [0.5 + (peak - 0.5) * i / mid for i in range(mid)] + [peak] + \
        [peak + (final - peak) * (i + 1) / (n - mid - 1) for i in range(n - mid - 1)]


def one_pass_grid() -> pd.DataFrame:
    """classes {10, 100} x wd {0, 1e-3, 1e-2, 1e-1} x seeds {0, 1}; exactly (10, 1e-2) passes.

    Baseline (100, 0): peaks 0.90, 0.94 (mean 0.92). Bar 0.9 x 0.92 = 0.828.
    (10, 0): peaks 0.55, 0.57; train 0.99 (the collapse reference).
    (10, 1e-3): peaks 0.80, 0.82 -> 0.81 / 0.92 = 0.8804 < 0.9: fails.
    (10, 1e-2): peaks 0.85, 0.87 -> 0.86 / 0.92 = 0.9348: passes; train 0.90 / 0.99 = 0.909.
    (10, 1e-1): peaks 0.95, 0.95 -> 1.0326 but train 0.50 / 0.99 = 0.505 < 0.8: collapsed.
    """
    peaks = {
        (100, 0.0): (0.90, 0.94), (100, 1e-3): (0.93, 0.93), (100, 1e-2): (0.93, 0.93), (100, 1e-1): (0.9, 0.9),
        (10, 0.0): (0.55, 0.57), (10, 1e-3): (0.80, 0.82), (10, 1e-2): (0.85, 0.87), (10, 1e-1): (0.95, 0.95),
    }
    trains = {(10, 1e-2): 0.90, (10, 1e-1): 0.50}
    frames = []
    for (c, wd), pair in peaks.items():
        for seed, p in enumerate(pair):
            frames.append(trial_rows(c, wd, seed, peak_curve(p, p - 0.05), train=[trains.get((c, wd), 0.99)] * 5))
    return pd.concat(frames, ignore_index=True)


@pytest.fixture
def rows():
    return trial_rows


@pytest.fixture
def curve():
    return peak_curve


@pytest.fixture
def grid_one_pass() -> pd.DataFrame:
    return one_pass_grid()
