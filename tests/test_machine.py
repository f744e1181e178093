"""What this machine can run (icl.machine, icl.model.footprint): devices that exist, runs that fit in memory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import icl.machine as machine
from icl.config import build_config
from icl.errors import UserError
from icl.machine import resolve_device
from icl.model import build_model
from icl.model.footprint import check_fits, check_model_fits_host, footprint
from icl.model.transformer import SequenceModel

HUGE = {"model.layers": 64, "model.d_model": 8192, "model.heads": 8, "model.mlp": 65536}  # ~86e9 parameters


def test_cpu_and_auto_resolve():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_cuda_without_cuda_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="no CUDA device"):
        resolve_device("cuda:0")


def test_cuda_index_beyond_the_devices_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(UserError) as e:
        resolve_device("cuda:2")
    assert "2 CUDA device(s)" in str(e.value) and "cuda:0 to cuda:1" in str(e.value)


def test_parameter_estimate_is_the_real_model():
    for name in ("tiny", "demo", "paper"):
        cfg = build_config(name)
        model = build_model(cfg)
        real = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
        assert footprint(cfg).parameters == real


def test_footprint_grows_with_every_size_key():
    base = build_config("tiny")
    f0 = footprint(base)
    assert f0.total > f0.state > 0 and f0.training > 0 and f0.evaluation > 0
    grown = {
        "model.mlp": ("state", 4096), "model.layers": ("state", 8), "train.batch_size": ("training", 512),
        "eval.n_sequences": ("evaluation", 100_000),
        "data.num_classes": ("evaluation", 1600),
    }
    for key, (part, value) in grown.items():
        f = footprint(build_config("tiny", {key: value}))
        assert getattr(f, part) > getattr(f0, part), key
    assert footprint(build_config("tiny", {"eval.batch_size": 16})).evaluation < f0.evaluation  # 128 at once
    assert footprint(base, models=4).state == 4 * f0.state


def test_a_run_that_cannot_fit_is_refused_with_estimate_and_limit(monkeypatch):
    cfg = build_config("tiny")
    need = footprint(cfg).total
    monkeypatch.setattr(machine, "host_memory", lambda: need - 1)
    with pytest.raises(UserError) as e:
        check_fits(cfg, "cpu")
    msg = str(e.value)
    assert "needs about" in msg and machine.gib(need - 1) in msg and "eval.batch_size" in msg
    monkeypatch.setattr(machine, "host_memory", lambda: need)
    assert check_fits(cfg, "cpu").total == need


def test_evaluation_logits_are_counted():
    """eval.n_sequences x num_classes logits: 1e6 x 12800 floats is about 95 GiB."""
    cfg = build_config("demo", {"eval.n_sequences": 1_000_000, "data.augment": True, "data.num_classes": 12800})
    assert footprint(cfg).evaluation > 90 * 2**30


def test_build_model_refuses_a_model_beyond_memory_before_allocating():
    cfg = build_config("paper", HUGE)
    with pytest.raises(UserError) as e:
        build_model(cfg)
    assert "parameters" in str(e.value) and "GiB" in str(e.value) and "model.mlp" in str(e.value)


def test_the_check_leaves_the_random_stream_alone():
    """The trainer seeds torch and builds: the check must not draw from the global RNG."""
    cfg = build_config("tiny", {"model.embedder": "frozen"})
    torch.manual_seed(3)
    checked = build_model(cfg)
    torch.manual_seed(3)
    plain = SequenceModel(cfg.model, cfg.data.image_size, cfg.data.num_classes)
    for a, b in zip(checked.state_dict().values(), plain.state_dict().values()):
        assert torch.equal(a, b)
    assert check_model_fits_host(cfg) > 0


def test_icl_train_refuses_a_huge_model_with_one_line(tmp_path: Path, capsys):
    from icl.train.cli import main

    argv = ["--config", "tiny", "--out", str(tmp_path / "r")] + [f"--set={k}={v}" for k, v in HUGE.items()]
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("error: this config needs about")
    assert "GiB" in err and "make it smaller" in err and not (tmp_path / "r").exists()  # refused before any file


def test_sweep_refuses_a_huge_model_in_its_grid_before_any_trial(tmp_path: Path, capsys):
    from sweeps.cli import main

    spec = tmp_path / "s.yaml"
    spec.write_text("base: tiny\nstorage: %s\noverrides: {model.d_model: 8192, model.heads: 8, model.mlp: 65536}\n"
                    "grid:\n  model.layers: [2, 64]\n" % tmp_path)
    with pytest.raises(SystemExit) as e:
        main([str(spec), "--dry-run"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "trial t000" in err and "parameters" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.yaml"]


def test_icl_train_refuses_a_run_beyond_device_memory(tmp_path: Path, capsys, monkeypatch):
    from icl.train.cli import main

    monkeypatch.setattr(machine, "host_memory", lambda: 8 << 20)  # tiny needs about 10 MiB
    with pytest.raises(SystemExit) as e:
        main(["--config", "tiny", "--set", "train.steps=2", "--set", "train.eval_every=1",
              "--set", "train.checkpoint_every=1", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "needs about" in err and "8.0 MiB" in err
