"""``icl-train`` given what a careless or hostile user gives: an empty or looping --out, an
--out inside the dataset, bf16 on a CPU. Each is one ``error:`` line, exit 2, before any file
is written."""

from __future__ import annotations

from pathlib import Path

import pytest

from train_cli_helpers import run_cli, one_error_line


@pytest.fixture
def cwd(tmp_path, monkeypatch) -> Path:
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    return here


def test_an_empty_out_is_refused_not_the_working_directory(cwd, capsys):
    code, err = run_cli(["--config", "tiny", "--out", ""], capsys)
    assert "--out ''" in one_error_line(code, err)
    assert list(cwd.iterdir()) == []


def test_a_symlink_loop_as_out_is_one_error_line(cwd, capsys):
    (cwd / "loop").symlink_to(cwd / "loop")
    code, err = run_cli(["--config", "tiny", "--out", "loop"], capsys)
    assert "cannot be resolved" in one_error_line(code, err)
    assert [p.name for p in cwd.iterdir()] == ["loop"]


@pytest.mark.parametrize("where", ["data root", "image cache"])
def test_out_inside_the_dataset_or_its_cache_is_refused(tmp_path, capsys, monkeypatch, where):
    folder = tmp_path / where.replace(" ", "-")
    folder.mkdir()
    (folder / "keep").write_text("x")
    monkeypatch.setenv("ICL_DATA_DIR" if where == "data root" else "ICL_CACHE_DIR", str(folder))
    code, err = run_cli(["--config", "tiny", "--out", str(folder / "run")], capsys)
    assert f"is inside the {where}" in one_error_line(code, err)
    assert sorted(p.name for p in folder.iterdir()) == ["keep"]


def test_bf16_on_a_cpu_is_refused_rather_than_recorded_wrongly(tmp_path, capsys):
    """bf16 autocast runs on CUDA only: a run that trained in fp32 must not say bf16 (chosen:
    refuse, with how to train here; see the README)."""
    out = tmp_path / "run"
    code, err = run_cli(["--config", "tiny", "--set", "train.precision=bf16", "--out", str(out)], capsys)
    line = one_error_line(code, err)
    assert "train.precision=bf16 needs a GPU" in line and "train.precision=fp32" in line
    assert not out.exists()
