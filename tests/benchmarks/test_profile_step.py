"""The step profiler runs on the CPU with tiny settings and reports what it promises (no
timing assertions: this machine's speed is not under test)."""

import json

import pytest
from bench_helpers import benchmark_module


@pytest.fixture(scope="module")
def profile_step():
    with benchmark_module("profile_step") as module:
        yield module


def test_profile_reports_busy_time_launches_and_top_kernels(profile_step, tmp_path):
    out = tmp_path / "profile.json"
    assert profile_step.main(["--config", "tiny", "--device", "cpu", "--pack", "2", "--steps", "2", "--warmup", "1",
                              "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["pack"] == 2 and r["graph"] is False and r["steps"] == 2
    assert 0 < r["device_busy_ms_per_step"] <= r["wall_ms_per_step"] * 1.05
    assert r["launches_per_step"] > 10 and r["top_kernels"] and abs(sum(r["families_share"].values()) - 1) < 1e-6
    assert {"matmul", "adamw"} <= set(r["families_share"])


def test_union_of_intervals(profile_step):
    assert profile_step.union_ms([(0, 1000), (500, 1500), (3000, 4000)]) == pytest.approx(2.5)
    assert profile_step.family("void at::native::batch_norm_collect_statistics_kernel") == "batchnorm"
