"""summary.txt's lines put each result against its target (benchmarks/gpu_summary.py), on planted
figures: a target met, one missed, and the CPU's figures, which no GPU target judges."""

import json

import pytest
from bench_helpers import load_benchmark


@pytest.fixture(scope="module")
def summary():
    return load_benchmark("gpu_summary")


def throughput_json(tmp_path, device="cuda", pack=512, alone=600.0, packed=9000.0) -> str:
    r = {"config": "paper", "overrides": ["model.embedder=frozen"], "device": device, "pack": pack,
         "machine": {"gpu": "NVIDIA H200"} if device == "cuda" else {}, "versions": {"torch": "2.11.0"},
         "cuda_graph": device == "cuda", "repeats": 3, "steps_per_block": 30, "baseline_steps_per_s": 50.0,
         "trainer_steps_per_s": packed, "unpacked_steps_per_s": alone, "packed_vs_unpacked": packed / alone,
         "eager_steps_per_s": 900.0, "graph_vs_eager": 10.0}
    path = tmp_path / "r.json"
    path.write_text(json.dumps(r))
    return str(path)


def test_a_throughput_run_gives_a_line_for_one_model_and_one_for_the_pack(summary, tmp_path):
    k1, pack = summary.throughput("frozen", throughput_json(tmp_path))
    assert k1.startswith("frozen K=1: 600.0 model-steps/s (target >= 500: met); 8.3x the published")
    assert "NVIDIA H200" in k1
    assert pack.startswith("frozen K=512: 9,000 model-steps/s (target >= 10,000: NOT met)")
    assert "graph/eager 10.00" in pack
    (cpu,) = summary.throughput("resnet", throughput_json(tmp_path, "cpu", pack=1, packed=30.0))
    assert cpu.startswith("resnet K=1: 30.0 model-steps/s (target >= 200 is a GPU's)")


def test_icl_train_end_to_end_is_put_against_the_benchmark(summary, tmp_path):
    csv = tmp_path / "metrics.csv"
    csv.write_text("step,eval_s,wall_s\n2500,1.0,12.0\n5000,1.0,25.0\n")
    bench = throughput_json(tmp_path, pack=15, alone=220.0, packed=2000.0)
    (line,) = summary.train(str(csv), "100.0", "130.0", bench)
    assert "5,000 steps, 2 evaluations (2.0 s): 200.0 steps/s by its wall_s (25.0 s)" in line
    assert "166.7 from outside (30.0 s" in line and "0.91 of the benchmark's K=1 220.0 (target >= 0.9: met)" in line
    (line,) = summary.train(str(csv), "100.0", "130.0", str(tmp_path / "missing.json"))
    assert line.endswith("no benchmark figure to compare with")


def test_the_tests_line_is_pytests_own_count(summary, tmp_path):
    log = tmp_path / "tests.log"
    log.write_text("....F.\n=== 1 failed, 5 passed, 70 deselected in 31.20s ===\n")
    assert summary.tests(str(log)) == ["tests (pytest -m cuda): 1 failed, 5 passed, 70 deselected in 31.20s"]
    log.write_text("...\n")
    assert summary.tests(str(log)) == ["tests (pytest -m cuda): no result line (cut short?)"]
