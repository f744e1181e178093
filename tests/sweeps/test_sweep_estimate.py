"""``icl-sweep SPEC --dry-run --estimate``: the arithmetic of a plan, a benchmark JSON checked
against the spec, and the real measurement of the smoke sweep's first pack here (no Ray)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from sweep_helpers import cli_error

from icl.config import build_config
from icl.errors import UserError
from sweeps.cli import main
from sweeps.estimate import Measured, counts, from_benchmark, plan
from sweeps.experiment import Experiment
from sweeps.spec import load_spec, parse_spec


def spec_doc(**changes) -> dict:
    doc = yaml.safe_load(Path(load_spec("smoke").source).read_text())
    doc.update(changes)
    return doc


def measured(step_s: float = 0.01, device: str = "cpu", linear: bool = True) -> Measured:
    return Measured("test", device, step_s, 1, linear, eval_s=0.5, checkpoint_s=0.1, checkpoint_bytes=1000,
                    log_bytes_per_eval=10)


def test_counts_include_the_last_step() -> None:
    cfg = build_config(load_spec("smoke").base_config, {"train.steps": 230, "train.eval_every": 50,
                                                      "train.checkpoint_every": 100})
    assert counts(cfg) == (5, 3)  # evaluations at 50..200 and 230; checkpoints at 100, 200, 230


def test_a_plan_of_the_smoke_sweep() -> None:
    exp = Experiment.build(parse_spec(spec_doc()))  # 4 trials of 200 steps: 4 evaluations, 2 checkpoints each
    p = plan(exp, measured(), cpus=2, gpus=0)
    assert p.model_steps == 800
    assert p.trial_s == [pytest.approx(200 * 0.01 + 4 * 0.5 + 2 * 0.1)] * 4  # 4.2 s each
    assert p.slots == 2 and p.wall_s == pytest.approx(2 * 4.2)  # 1 CPU each on 2 CPUs
    assert p.gpu_hours is None
    # per model: 2 kept + 2 Ray copies while running, 2 + 1 after; logs 4 x 10 bytes
    assert (p.disk_peak, p.disk_after, p.logs) == (4 * 4000 + 160, 4 * 3000 + 160, 160)


def test_a_packed_gpu_plan_counts_gpu_hours_and_shared_gpus() -> None:
    exp = Experiment.build(parse_spec(spec_doc(pack=2, resources={"cpu": 1, "gpu": 0.5}, max_concurrent=None)))
    p = plan(exp, measured(step_s=0.02, device="cuda", linear=False), 8, 1)  # 2 packs of 2 models
    assert p.trial_s == [pytest.approx(200 * 0.02 + 2 * 4 * 0.5 + 2 * 2 * 0.1)] * 2  # 8.4 s per pack
    assert p.slots == 2 and p.wall_s == pytest.approx(8.4)
    assert p.wall_turns_s == pytest.approx(16.8)  # both on the one GPU, taking turns
    assert p.gpu_hours == pytest.approx(2 * 8.4 * 0.5 / 3600)


def test_a_benchmark_json_must_match_the_pack(tmp_path: Path) -> None:
    cfg = build_config(load_spec("smoke").base_config, {"train.device": "auto"})
    bench = {"trainer_steps_per_s": 300.0, "device": "cuda", "pack": 3, "batch_size": cfg.train.batch_size,
             "precision": cfg.train.precision, "machine": {"gpu": "NVIDIA H100"},
             "model": {"embedder": cfg.model.embedder, "layers": cfg.model.layers, "d_model": cfg.model.d_model,
                       "image_size": cfg.data.image_size, "num_classes": 16}}
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(bench))
    m = from_benchmark(path, cfg, 3, measured())
    assert (m.device, m.step_s, m.eval_s, m.checkpoint_bytes) == ("cuda", pytest.approx(3 / 300), None, 1000)
    assert "NVIDIA H100" in m.source and "training steps only" in m.source
    path.write_text(json.dumps(dict(bench, pack=1, model=dict(bench["model"], layers=12))))
    with pytest.raises(UserError, match="layers 12 there, 2 here; pack 1 there, 3 here"):
        from_benchmark(path, cfg, 3, measured())
    path.write_text(json.dumps(bench))
    pinned = build_config(load_spec("smoke").base_config)  # tiny: train.device=cpu
    with pytest.raises(UserError, match=r"device cuda there, train.device=cpu here"):
        from_benchmark(path, pinned, 3, measured())


def test_estimate_of_the_smoke_sweep_measured_here(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["smoke", "--dry-run", "--estimate", "--storage", str(tmp_path), "--num-cpus", "2"]) == 0
    out = capsys.readouterr().out
    assert "estimate:   rate measured here: " in out and "of the whole pack t000 on cpu, 1 thread" in out
    assert "model-steps  800 (4 models x 200 steps) in 4 trials" in out
    assert "at 2 trials at a time (this machine: 2 CPUs, 0 GPUs, trials on the CPU)" in out
    assert "GPU-hours    none (resources.gpu is 0)" in out
    assert "a checkpoint is " in out and "4 evaluations x " in out
    assert not (tmp_path / "smoke").exists()  # a dry run writes nothing


def test_estimate_needs_the_dry_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    line = cli_error(capsys, ["smoke", "--estimate", "--storage", str(tmp_path)])
    assert "--estimate and --rate-from go with --dry-run" in line


RATES = Path(__file__).resolve().parents[2] / "benchmarks" / "rates"


@pytest.mark.parametrize("name, rate_file", [("study", "paper_pack15_cpu.json"),
                                             ("study_strong", "paper_pack15_cpu.json"),
                                             ("demo", "demo_pack1_cpu.json")])
def test_the_shipped_rate_files_fit_the_shipped_specs(name: str, rate_file: str) -> None:
    """benchmarks/rates/ measured the model, batch, precision and pack of the spec it is for:
    --rate-from takes it (a preset or spec changed since would be refused)."""
    exp = Experiment.build(load_spec(name))
    k = len(exp.packs[0].trial_ids)
    bench = json.loads((RATES / rate_file).read_text())
    m = from_benchmark(RATES / rate_file, exp.models[0].config, k, measured())
    assert m.step_s == pytest.approx(k / bench["trainer_steps_per_s"])
    assert bench["device"] == "cpu" and m.device == "cpu"
    assert bench["machine"]["load_average"] and bench["versions"]["torch"]  # where it was measured, said


@pytest.mark.parametrize("rate, words", [
    (0, "must be a positive number, got 0.0"),
    ("NaN", "must be a positive number, got nan"),
    (-5, "must be a positive number, got -5.0"),
    ("fast", "not a benchmarks/throughput.py --json file"),
    (None, "not a benchmarks/throughput.py --json file"),
])
def test_a_benchmark_json_with_a_rate_no_benchmark_gives_is_one_error_line(
        tmp_path: Path, capsys: pytest.CaptureFixture, rate, words) -> None:
    cfg = build_config(load_spec("smoke").base_config)
    bench = {"trainer_steps_per_s": rate, "device": "cpu", "pack": 1, "batch_size": cfg.train.batch_size,
             "model": {"embedder": cfg.model.embedder, "layers": cfg.model.layers, "d_model": cfg.model.d_model,
                       "image_size": cfg.data.image_size}}
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(bench).replace('"NaN"', "NaN"))
    line = cli_error(capsys, ["smoke", "--dry-run", "--rate-from", str(path), "--storage", str(tmp_path)])
    assert words in line and str(path) in line


@pytest.mark.parametrize("content", ["[1, 2]", '{"trainer_steps_per_s": 5, "device": "cpu", "pack": 1, '
                                     '"batch_size": 16, "model": "tiny"}', "\xff"], ids=["list", "model", "bytes"])
def test_a_rate_from_file_of_another_shape_is_one_error_line(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                            content: str) -> None:
    path = tmp_path / "bench.json"
    path.write_bytes(content.encode("latin-1"))
    assert "--rate-from" in cli_error(capsys, ["smoke", "--dry-run", "--rate-from", str(path), "--storage",
                                               str(tmp_path)])
