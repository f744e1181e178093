"""Synthetic sweep results shaped like the real ones, to try the analysis without training.

The curves follow the study's story, not a model: with many classes ICL rises early and fades
slowly (transience, Singh et al. 2023) while in-weights accuracy climbs; with few classes the
model memorises (IWL) and ICL stays near chance unless weight decay holds memorisation back.
The attention columns rise and fall with ICL. Used by the tests and for looking at the plots.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from analysis.load import CLASS_KEY, SEED_KEY, WD_KEY
from icl.config import build_config
from icl.layout import TRIAL_ID, ExperimentDir, RunLayout, saved_spec_text
from icl.metrics import (
    CIWL,
    CIWL_INCTX,
    ECE,
    FLIP_CTX,
    FLIP_CTX_INCTX,
    FLIP_IWL,
    FLIP_IWL_INCTX,
    ICL,
    ICL_ALL,
    ICL_EVEN,
    ICL_ODD,
    ICL_TRAIN,
    ICL_TRAIN_ALL,
    IWL,
    LR,
    N_EVAL,
    SEQUENCES,
    SEQUENCES_PER_S,
    STEP,
    STEPS_PER_S,
    TRAIN_ACC,
    TRAIN_LOSS,
    WALL_S,
    attn_column,
)


def _cell_shape(classes: float, wd: float) -> dict[str, float]:
    """Peak height, onset and decay of ICL, and the IWL/training level, for one cell."""
    many = classes >= 1000
    strength = 0.0 if wd <= 0 else min(1.0, math.log10(wd / 1e-4) / 2)  # 0 at 1e-4, 1 at 1e-2
    if many:
        peak = 0.93
        decay = 0.35 * (1 - strength)  # how much of the peak gain is lost by the end
        iwl = 0.55 - 0.25 * strength
        train = 0.99 - 0.05 * strength
        onset = 8_000
    else:
        peak = 0.55 + 0.33 * strength
        decay = 0.9 * (1 - strength)
        iwl = 0.97 - 0.3 * strength
        train = 0.995 - 0.12 * strength
        onset = 15_000
    return {"peak": peak, "decay": decay, "iwl": iwl, "train": train, "onset": onset}


def make_sweep(
    classes: Sequence[int] = (100, 1600),
    weight_decays: Sequence[float] = (0.0, 1e-3, 1e-2),
    seeds: Sequence[int] = (0, 1, 2),
    steps: Sequence[int] | None = None,
    layers: int = 2,
    noise: float = 0.01,
    batch_size: int = 32,
    rng_seed: int = 0,
) -> pd.DataFrame:
    """A tidy ``results.csv``-shaped frame for the grid classes x weight decay x seeds."""
    steps = np.asarray(steps if steps is not None else np.arange(1000, 100_001, 1000), dtype=float)
    rng = np.random.default_rng(rng_seed)
    frames = []
    for c in classes:
        for wd in weight_decays:
            shape = _cell_shape(c, wd)
            for s in seeds:
                jitter = 1 + 0.1 * rng.standard_normal()
                rise = 1 / (1 + np.exp(-(np.log(steps) - math.log(shape["onset"] * jitter)) / 0.25))
                fade = 1 - shape["decay"] * (1 - np.exp(-steps / 40_000))
                gain = (shape["peak"] - 0.5) * rise * fade
                # the two halves of the ICL set, each with twice the variance of the whole
                even, odd = (np.clip(0.5 + gain + math.sqrt(2) * noise * rng.standard_normal(len(steps)), 0, 1)
                             for _ in range(2))
                icl = (even + odd) / 2
                learn = 1 - np.exp(-steps / 12_000)
                iwl = np.clip(shape["iwl"] * learn + noise * rng.standard_normal(len(steps)), 0, 1)
                train = np.clip(0.5 * rise * fade + (shape["train"] - 0.5 * rise * fade) * learn
                                + noise * rng.standard_normal(len(steps)), 0, 1)
                circuit = np.clip(gain / 0.45, 0, 1)
                # the peers' evaluators, in context (inctx; flip: context vs weights between the two
                # labels shown) and over every label (lower: other labels take a share)
                flip_ctx = np.clip(icl - 0.5 * iwl, 0, 1)
                ciwl = np.clip(np.maximum(iwl, 1 - 2 * (icl - 0.5)), 0, 1)
                df = pd.DataFrame({
                    TRIAL_ID: f"trial_c{c}_wd{wd:g}_s{s}",
                    CLASS_KEY: c,
                    WD_KEY: wd,
                    SEED_KEY: s,
                    STEP: steps.astype(int),
                    SEQUENCES: (steps * batch_size).astype(int),
                    TRAIN_LOSS: -np.log(np.clip(train, 1e-3, 1)),
                    TRAIN_ACC: train,
                    LR: 3e-4 / np.sqrt(np.maximum(steps, 4000) / 4000),
                    ICL: icl,
                    ICL_ALL: icl * 0.98,
                    ICL_EVEN: even,
                    ICL_ODD: odd,
                    ICL_TRAIN: np.clip(icl + 0.02, 0, 1),
                    ICL_TRAIN_ALL: np.clip(icl * 0.98 + 0.02, 0, 1),
                    IWL: iwl,
                    FLIP_CTX: flip_ctx * (1 - 0.3 * iwl),
                    FLIP_CTX_INCTX: flip_ctx,
                    FLIP_IWL: (1 - flip_ctx) * (1 - 0.3 * (1 - iwl)),
                    FLIP_IWL_INCTX: 1 - flip_ctx,
                    CIWL: ciwl * (0.6 + 0.4 * learn),
                    CIWL_INCTX: ciwl,
                    ECE: np.abs(0.1 - 0.05 * circuit),
                })
                for layer in range(layers):
                    depth = (layer + 1) / layers
                    col = lambda stat: attn_column(layer, stat)  # noqa: E731
                    df[col("match_img")] = 0.1 + 0.2 * circuit * (1 - depth / 2)
                    df[col("match_lbl")] = 0.1 + 0.6 * circuit * depth
                    df[col("other")] = 1 - df[col("match_img")] - df[col("match_lbl")]
                    df[col("induction")] = 0.5 * circuit * depth
                    df[col("prev_tok")] = (0.2 + 0.7 * learn) * (1 - depth / 2)
                df[STEPS_PER_S] = 900.0
                df[SEQUENCES_PER_S] = 900.0 * batch_size
                df[WALL_S] = steps / 900.0
                frames.append(df)
    return pd.concat(frames, ignore_index=True)


def write_experiment(directory: str | Path, results: pd.DataFrame, grid: dict[str, Any] | None = None) -> Path:
    """Write ``results.csv`` (and the saved ``spec.yaml``, on the ``tiny`` preset, with ``grid``
    if given) as a sweep would."""
    exp = ExperimentDir(directory)
    exp.path.mkdir(parents=True, exist_ok=True)
    results.to_csv(exp.results, index=False)
    if grid is not None:
        spec = {"name": exp.path.name, "base": "tiny", "overrides": {},
                "grid": {k: list(vals) for k, vals in grid.items()}, "resolved": build_config("tiny").to_dict()}
        exp.spec.write_text(saved_spec_text(spec, "analysis.synthetic"))
    return exp.path


def write_run(directory: str | Path, metrics: pd.DataFrame, config: dict[str, Any]) -> Path:
    """Write a run dir as the trainer would: ``metrics.csv`` and a nested ``config.yaml``."""
    run = RunLayout(directory)
    run.path.mkdir(parents=True, exist_ok=True)
    drop = [c for c in (TRIAL_ID, CLASS_KEY, WD_KEY, SEED_KEY) if c in metrics.columns]
    metrics.drop(columns=drop).to_csv(run.metrics, index=False)
    run.config.write_text(yaml.safe_dump(config, sort_keys=False))
    return run.path


def binomial_halves(true: Sequence[float], n: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """An accuracy curve as an evaluation on ``n`` fixed sequences measures it: each half of the
    set (even / odd indices, ``ceil(n/2)`` / ``floor(n/2)`` sequences) a binomial draw around the
    ``true`` accuracy at every evaluation, and the whole set their pooled mean. Returns
    ``(whole, even, odd)``."""
    p = np.clip(np.asarray(true, dtype=float), 0, 1)
    n_even, n_odd = (n + 1) // 2, n // 2
    even = rng.binomial(n_even, p) / n_even
    odd = rng.binomial(n_odd, p) / n_odd
    return (even * n_even + odd * n_odd) / n, even, odd


def planted_sweep(peaks: dict[tuple[int, float], Sequence[float]], n_sequences: int = 1024, evals: int = 20,
                  train: dict[tuple[int, float], float] | None = None, rng_seed: int = 0) -> pd.DataFrame:
    """Results whose true peak ICL is planted, per cell and seed: ``peaks[(classes, wd)][s]`` is
    seed ``s``'s true peak. Each true curve rises from chance to its peak at the middle
    evaluation and fades by a tenth of its gain; what the table holds is that curve measured on
    ``n_sequences`` (binomial halves, :func:`binomial_halves`), as a real evaluation measures
    it, with ``eval_sequences`` = ``n_sequences`` (as :func:`analysis.load.load_results` adds
    from the runs' configs). ``train``: final training accuracy per cell (default 0.99)."""
    rng = np.random.default_rng(rng_seed)
    steps = np.arange(1, evals + 1) * 500
    mid = evals // 2
    frames = []
    for (c, wd), seed_peaks in peaks.items():
        for s, peak in enumerate(seed_peaks):
            rise = np.minimum(np.arange(evals) / mid, 1.0)
            fade = 1 - 0.1 * np.maximum(np.arange(evals) - mid, 0) / max(evals - 1 - mid, 1)
            true = 0.5 + (peak - 0.5) * rise * fade
            icl, even, odd = binomial_halves(true, n_sequences, rng)
            frames.append(pd.DataFrame({
                TRIAL_ID: f"planted_c{c}_wd{wd:g}_s{s}", CLASS_KEY: c, WD_KEY: wd, SEED_KEY: s, STEP: steps,
                TRAIN_ACC: (train or {}).get((c, wd), 0.99), ICL: icl, ICL_EVEN: even,
                ICL_ODD: odd, IWL: 0.3, N_EVAL: n_sequences,
            }))
    return pd.concat(frames, ignore_index=True)
