"""The GPU's correctness checks (benchmarks/gpu_checks.py): their comparison finds a planted
difference and leaves the noise-only key-bias slice out, a broken check is a failure that does
not stop the others, and on the CPU what needs CUDA says so. (The whole script runs on the CPU
in test_gpu_session.py; on a GPU in the session's first phase.)"""

import json
import math

import pytest
from bench_helpers import load_benchmark
import torch


@pytest.fixture(scope="module")
def checks():
    return load_benchmark("gpu_checks")


def state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"blocks.0.attn.qkv.bias": torch.randn(12, generator=g), "head.weight": torch.randn(4, 3, generator=g)}


def test_the_comparison_finds_a_planted_difference_and_where(checks):
    a, b = checks.split_noise(state()), checks.split_noise(state())
    assert checks.difference(a, b) == (0.0, "")
    changed = state()
    changed["head.weight"][1, 2] += 1e-3 * changed["head.weight"].abs().max()
    d, where = checks.difference(a, checks.split_noise(changed))
    assert d == pytest.approx(1e-3, rel=1e-3) and where == "head.weight"
    broken = state()
    broken["head.weight"][0, 0] = float("nan")
    assert checks.difference(a, checks.split_noise(broken))[0] == math.inf


def test_the_key_third_of_a_qkv_bias_is_reported_not_judged(checks):
    noisy = state()
    noisy["blocks.0.attn.qkv.bias"][4:8] += 0.5  # the key third of 12 values
    a, b = checks.split_noise(state()), checks.split_noise(noisy)
    assert checks.difference(a, b) == (0.0, "") and checks.key_bias_drift(a, b) == pytest.approx(0.5)
    noisy["blocks.0.attn.qkv.bias"][0] += 0.5  # the query third is judged
    assert checks.difference(a, checks.split_noise(noisy))[1] == "blocks.0.attn.qkv.bias"


def test_columns_of_a_stack_are_split_the_same_way(checks):
    from icl.train.stack import Slot

    slots = [Slot("head.weight", torch.Size([2]), 0, 2), Slot("blocks.0.attn.qkv.bias", torch.Size([6]), 2, 8)]
    stack = torch.arange(16.0).reshape(2, 8)
    split = checks.split_noise({"weights": stack}, slots)
    assert split["weights"].tolist() == [[0, 1, 2, 3, 6, 7], [8, 9, 10, 11, 14, 15]]
    assert sorted(split["key bias"].tolist()) == [4, 5, 12, 13]


def test_a_broken_check_fails_and_the_others_still_run(checks, monkeypatch, tmp_path, capsys):
    def broken():
        raise RuntimeError("planted")

    plan = [("first", "a", broken), ("second", "b", lambda: checks.verdict(True, "fine")),
            ("third", "c", lambda: checks.skipped())]
    monkeypatch.setattr(checks, "plan", lambda device, n: plan)
    out = tmp_path / "checks.jsonl"
    assert checks.main(["--device", "cpu", "--jsonl", str(out)]) == 1
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["check"], r["status"]) for r in lines] == [("first", "fail"), ("second", "pass"), ("third", "skipped")]
    assert "error: RuntimeError: planted" in lines[0]["detail"]
    assert capsys.readouterr().out.splitlines()[2] == "third [c]: skipped: no CUDA"


@pytest.mark.slow  # every check that can run on the CPU, trained
def test_on_the_cpu_what_needs_cuda_says_so_and_the_rest_is_judged(checks):
    device = torch.device("cpu")
    extra, k = checks.CASES["linear fp32 K=3, decay on attn and head"]
    cfgs = checks.configs(device, extra, k)
    from icl.data import load_data

    data = load_data(cfgs[0], device)
    store = {}
    floor = checks.eager_vs_eager(cfgs, data, store)
    assert floor["status"] == "pass" and floor["floor"] == 0.0  # the CPU is deterministic
    assert checks.graph_vs_eager(cfgs, data, store) == checks.skipped()
    assert checks.bf16_copies(cfgs, data) == checks.skipped()
    assert checks.divergence(device)["status"] == "pass"
