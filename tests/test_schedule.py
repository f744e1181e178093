"""The schedule's sums and the effective strength of decoupled weight decay (icl/schedule.py)."""

from __future__ import annotations

import math

import pytest

from icl.config import load_config
from icl.schedule import decay_exponent, lr_at, lr_sum, shrink_factor, shrink_text


def test_lr_sum_is_the_sum_of_the_schedule() -> None:
    cfg = load_config("tiny")
    total = cfg.train.steps
    assert lr_sum(cfg.optim, total) == pytest.approx(sum(lr_at(t, cfg.optim, total) for t in range(1, total + 1)))
    assert lr_sum(cfg.optim, total, upto=10) == pytest.approx(sum(lr_at(t, cfg.optim, total) for t in range(1, 11)))


def test_demo_schedule_sums_to_warmup_half_plus_constant() -> None:
    cfg = load_config("demo")  # lr 1e-3, 1000 warmup steps, constant, 10k steps
    warm = cfg.optim.warmup_steps
    expected = cfg.optim.lr * (warm + 1) / 2 + cfg.optim.lr * (cfg.train.steps - warm)
    assert lr_sum(cfg.optim, cfg.train.steps) == pytest.approx(expected, rel=1e-12)


def test_paper_schedule_sums_to_about_25() -> None:
    """STUDY.md: on the reference schedule the learning rates of 500k steps sum to about 25,
    so its strongest decay (1e-2) shrinks weights by only about e^-0.25."""
    cfg = load_config("paper")
    assert lr_sum(cfg.optim, cfg.train.steps) == pytest.approx(25.03, abs=0.01)
    cfg.optim.weight_decay = 1e-2
    assert shrink_factor(cfg) == pytest.approx(math.exp(-0.2503), rel=1e-3)


def test_no_decay_and_coupled_decay() -> None:
    cfg = load_config("tiny")
    assert decay_exponent(cfg) == 0.0 and shrink_factor(cfg) == 1.0
    cfg.optim.weight_decay = 0.1
    cfg.optim.l2 = "coupled"
    assert math.isnan(decay_exponent(cfg))  # coupled L2's pull depends on the weights: no fixed factor


def test_shrink_text_is_short_and_says_when_there_is_no_fixed_factor() -> None:
    cfg = load_config("paper")
    assert shrink_text(cfg) == "1"
    for wd, text in ((3e-4, "e^-0.0075"), (1e-2, "e^-0.25"), (0.04, "e^-1"), (0.2, "e^-5"), (1.0, "e^-25")):
        cfg.optim.weight_decay = wd
        assert shrink_text(cfg) == text
        assert float(text[3:]) == pytest.approx(decay_exponent(cfg), rel=0.02)
    cfg.optim.decay_modules = "none"  # nothing decays
    assert shrink_text(cfg) == "1" and shrink_factor(cfg) == 1.0
    cfg.optim.decay_modules, cfg.optim.l2 = "mlp", "coupled"
    assert shrink_text(cfg) == "coupled"
    cfg.optim.weight_decay = 0.0
    assert shrink_text(cfg) == "1"  # coupled without a penalty: no decay at all
