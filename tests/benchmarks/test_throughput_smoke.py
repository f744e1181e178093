"""The throughput benchmark runs end to end with tiny settings and writes its JSON (no timing
assertions: this machine's speed is not under test), and the naive baseline samples the
study's sequences."""

import json

import numpy as np
import pytest
import torch
from bench_helpers import benchmark_module, load_benchmark

from icl.config import load_config

KEYS = {"baseline_steps_per_s", "trainer_steps_per_s", "baseline_sequences_per_s", "trainer_sequences_per_s",
        "ratio", "device", "pack", "config", "versions", "machine", "blocks_model_steps_per_s"}


@pytest.fixture(scope="module")
def throughput():
    with benchmark_module("throughput") as module:
        yield module


@pytest.mark.parametrize("pack", [1, 2])
def test_benchmark_writes_its_json(throughput, tmp_path, pack):
    out = tmp_path / "result.json"
    args = ["--config", "tiny", "--device", "cpu", "--pack", str(pack), "--steps", "2", "--repeats", "2",
            "--warmup", "1", "--threads", "1", "--quiet", "--json", str(out)]
    if pack > 1:
        args += ["--set", "model.embedder=frozen"]
    assert throughput.main(args) == 0
    r = json.loads(out.read_text())
    assert KEYS <= set(r)
    assert r["config"] == "tiny" and r["device"] == "cpu" and r["pack"] == pack and r["cuda_graph"] is False
    assert {"torch", "python", "numpy", "ray"} <= set(r["versions"]) and r["versions"]["torch"] == torch.__version__
    assert r["ratio"] == pytest.approx(r["trainer_steps_per_s"] / r["baseline_steps_per_s"])
    assert all(len(v) == 2 for v in r["blocks_model_steps_per_s"].values())
    if pack > 1:
        assert {"unpacked_steps_per_s", "packed_vs_unpacked"} <= set(r) and r["weight_decays"] == [0.0, 3e-4]


def test_a_cuda_device_that_is_not_there_is_a_clear_error(throughput, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert throughput.main(["--config", "tiny", "--device", "cuda", "--steps", "1", "--repeats", "1"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_baseline_samples_the_study_sequences():
    cfg = load_config("tiny", ["data.p_bursty=1.0"])
    base = load_benchmark("baseline").NaiveBaseline(cfg, "cpu")
    for _ in range(50):
        classes, labels, exemplars = base.sample_sequence()
        assert (base.train_classes[labels] == classes).all()
        counts = sorted(np.unique(classes[:8], return_counts=True)[1].tolist())
        assert counts == [1, 1, 3, 3] and (classes[:8] == classes[8]).sum() == 3  # query from a burst
        for c in np.unique(classes):
            assert len(set(exemplars[classes == c])) == (classes == c).sum()  # distinct exemplars
    images, labels = base.batch()
    assert images.shape == (cfg.train.batch_size, 9, 14, 14) and images.dtype == torch.float32
    assert 0.0 <= float(images.min()) and float(images.max()) <= 1.0
    assert np.isfinite(base.step())
