"""Checkpoints from someone else: reading one never runs code, and a damaged or foreign one
ends in one ``error:`` line (or is skipped for the previous one), never in a traceback.

Written as a hostile user would: the attacker controls every byte of the run directory and
re-hashes the manifest, so the checksums prove nothing; the marker file a payload would
create must never appear.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from icl.config import load_config
from icl.train import train
from icl.train import checkpoint as ckpt
from icl.train.cli import main as train_main
from train_cli_helpers import one_error_line, run_cli

ARGS = ["--config", "tiny", "--set", "train.steps=30", "--set", "train.eval_every=10",
        "--set", "train.checkpoint_every=10"]  # checkpoints at 20 and 30 are kept


class Payload:
    """Unpickling this calls ``os.system``: the classic malicious pickle."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def rehash(checkpoint: Path) -> None:
    """What an attacker does after editing a checkpoint: make the manifest agree again."""
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    manifest["files"] = {name: hashlib.sha256((checkpoint / name).read_bytes()).hexdigest()
                         for name in manifest["files"] if (checkpoint / name).exists()}
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))


def poison(checkpoint: Path, marker: Path) -> None:
    state = torch.load(checkpoint / "state.pt", weights_only=True)
    state["wall_s"] = Payload(marker)
    buf = io.BytesIO()
    torch.save(state, buf)
    (checkpoint / "state.pt").write_bytes(buf.getvalue())
    rehash(checkpoint)


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory) -> Path:
    """A finished tiny run of 30 steps with its checkpoints at 20 and 30."""
    out = tmp_path_factory.mktemp("trust") / "run"
    assert train_main([*ARGS, "--out", str(out), "--no-progress"]) == 0
    return out


@pytest.fixture
def run(two_checkpoints: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(two_checkpoints, copy)
    return copy


def checkpoints(run: Path) -> list[Path]:
    return sorted((run / "checkpoints").glob("step_*"))


def test_a_malicious_state_pt_never_runs_and_the_previous_checkpoint_is_used(run, tmp_path, capsys):
    marker = tmp_path / "PWNED"
    poison(checkpoints(run)[-1], marker)
    code, err = run_cli([*ARGS, "--out", str(run), "--no-progress"], capsys)
    assert not marker.exists()
    assert code == 0, err
    assert "is corrupt" in err and "not a plain tensor checkpoint" in err and "posix.system" in err
    assert "Traceback" not in err
    assert ckpt.load(checkpoints(run)[-1]).step == 30  # retrained from step 20 and saved again


def test_only_malicious_checkpoints_end_in_one_error_line(run, tmp_path, capsys):
    marker = tmp_path / "PWNED"
    for c in checkpoints(run):
        poison(c, marker)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and "checkpoints" in p.parts}
    code, err = run_cli([*ARGS, "--out", str(run), "--no-progress"], capsys)
    assert not marker.exists()
    assert code == 2
    assert "no intact checkpoint" in one_error_line(code, err)
    assert {p: p.read_bytes() for p in before} == before  # nothing of the run is touched


def test_head_attribution_never_unpickles_a_malicious_checkpoint(run, tmp_path, capsys):
    from analysis.cli import main as analyze

    marker = tmp_path / "PWNED"
    for c in checkpoints(run):
        poison(c, marker)
    code = analyze(["heads", str(run), "--no-plots"])
    err = capsys.readouterr().err
    assert not marker.exists()
    assert code == 0 and err.count("unreadable") == 2 and "Traceback" not in err


def test_the_loader_refuses_any_global_but_the_numpy_allow_list(tmp_path):
    marker = tmp_path / "PWNED"
    for evil in (Payload(marker), {"step": 1, "f": print}, [shutil.rmtree]):
        buf = io.BytesIO()
        torch.save(evil, buf)
        with pytest.raises(ValueError, match="not a plain tensor checkpoint"):
            ckpt.read_state(buf.getvalue())
    assert not marker.exists()


def test_a_checkpoint_of_an_older_version_with_numpy_rng_state_still_loads(run, capsys):
    """Versions before the one engine saved ``rng`` (torch, numpy and Python generator
    states) in state.pt; numpy's state is an ndarray, allowed by name."""
    last = checkpoints(run)[-1]
    state = torch.load(last / "state.pt", weights_only=True)
    state["rng"] = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    buf = io.BytesIO()
    torch.save(state, buf)
    (last / "state.pt").write_bytes(buf.getvalue())
    rehash(last)
    loaded = ckpt.load(last)
    assert loaded.step == 30 and loaded.state["rng"]["numpy"][0] == "MT19937"
    code, err = run_cli([*ARGS, "--out", str(run), "--no-progress"], capsys)
    assert code == 0 and "corrupt" not in err, err


@pytest.mark.parametrize("damage, words", [
    ("drop metrics from the manifest", "lists no metrics.csv"),
    ("garbage metrics", "metrics.csv is not a table of numbers"),
    ("metrics of another step", "does not end at step"),
    ("attention of another shape", "attention.npz holds heads of shape"),
    ("step is text", "no valid step"),
    ("manifest names a file outside", "not a file of the checkpoint"),
])
def test_a_damaged_only_checkpoint_is_one_error_line(two_checkpoints, tmp_path, capsys, damage, words):
    run = tmp_path / "run"
    shutil.copytree(two_checkpoints, run)
    for c in checkpoints(run)[:-1]:
        shutil.rmtree(c)
    (last,) = checkpoints(run)
    manifest = json.loads((last / "manifest.json").read_text())
    if damage == "drop metrics from the manifest":
        del manifest["files"]["metrics.csv"]
    elif damage == "garbage metrics":
        (last / "metrics.csv").write_bytes(b"step,icl_acc\n20,\xff\xfe\n")
    elif damage == "metrics of another step":
        (last / "metrics.csv").write_text("step,icl_acc\n10,0.5\n")
    elif damage == "attention of another shape":
        buf = io.BytesIO()
        np.savez(buf, step=np.array([10]), heads=np.zeros((1, 2, 4, 3), np.float32))
        (last / "attention.npz").write_bytes(buf.getvalue())
    elif damage == "step is text":
        state = torch.load(last / "state.pt", weights_only=True)
        state["step"] = "20"
        torch.save(state, last / "state.pt")
    elif damage == "manifest names a file outside":
        manifest["files"]["../../config.yaml"] = "0" * 64
    (last / "manifest.json").write_text(json.dumps(manifest))
    if damage != "manifest names a file outside":
        rehash(last)
    code, err = run_cli([*ARGS, "--out", str(run), "--no-progress"], capsys)
    assert code == 2
    line = one_error_line(code, err)
    assert "no intact checkpoint" in line and words in line, line


def test_weights_of_another_architecture_are_one_error_line(two_checkpoints, tmp_path, capsys):
    """The science config in state.pt matches, the weights do not (a state.pt copied from
    another run, manifest re-hashed): refused before training, the run left as it was."""
    run = tmp_path / "run"
    shutil.copytree(two_checkpoints, run)
    shutil.rmtree(checkpoints(run)[-1])  # the run now resumes from step 20
    other = tmp_path / "wide"
    train(load_config("tiny", ["model.d_model=16", "model.heads=2", "train.steps=10", "train.eval_every=10"]), other)
    wide = torch.load(checkpoints(other)[-1] / "state.pt", weights_only=True)
    (last,) = checkpoints(run)
    state = torch.load(last / "state.pt", weights_only=True)
    state["model"], state["optimizer"] = wide["model"], wide["optimizer"]
    torch.save(state, last / "state.pt")
    rehash(last)
    before = {p: p.read_bytes() for p in (run / "checkpoints").rglob("*") if p.is_file()}
    code, err = run_cli([*ARGS, "--out", str(run), "--no-progress"], capsys)
    assert code == 2
    assert "does not fit the model of this config" in one_error_line(code, err)
    assert {p: p.read_bytes() for p in before} == before
