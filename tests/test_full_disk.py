"""A full disk, for each CLI, on a small tmpfs made by the test (tests/disk_helpers.py).

The promise: one ``error:`` line naming the path and what to do, exit status 2, nothing
half-written, what was there before intact; and after space is freed the same command
succeeds (a run resumes from its last checkpoint and ends as if never stopped). The sweep's
cases are in tests/sweeps/test_sweep_full_disk.py (they need the sweep tests' Ray cluster).
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Callable

import pandas as pd
import pytest
from disk_helpers import fill

pytestmark = pytest.mark.slow  # full disks

PROJECT = Path(__file__).resolve().parents[1]


def in_process(main: Callable[[list[str]], int], argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
    return int(code or 0), out.getvalue(), err.getvalue()


def full_disk_line(code: int, err: str, where: Path) -> str:
    """The one error line of a write refused for lack of space, naming a path under ``where``."""
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot write {where}"), err
    assert "No space left on device" in lines[0] and "free space" in lines[0] and "Traceback" not in err
    return lines[0]


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".filler"}


def temporaries(folder: Path) -> list[str]:
    return [str(p.relative_to(folder)) for p in folder.rglob("*") if p.name.endswith(".tmp") or ".tmp-" in p.name]


# --------------------------------------------------------------------------- icl-data


def test_icl_data_sample_on_a_full_disk(tmpfs):
    from icl.data.cli import main

    disk = tmpfs("1m")
    out, png = disk / "s.npz", disk / "s.png"
    out.write_bytes(b"precious")
    filler = fill(disk)
    argv = ["sample", "--config", "tiny", "--split", "train", "-n", "6", "--out", str(out), "--png", str(png)]
    code, _, err = in_process(main, argv)
    full_disk_line(code, err, disk)
    assert files(disk) == {"s.npz": b"precious"} and temporaries(disk) == []  # not half of the result
    filler.unlink()
    code, _, err = in_process(main, argv)
    assert code == 0, err
    assert out.read_bytes().startswith(b"PK") and png.read_bytes().startswith(b"\x89PNG") and temporaries(disk) == []


def test_icl_data_cache_on_a_full_disk(tmpfs, omniglot_subset):
    from icl.data.cli import main

    disk = tmpfs("1m")
    filler = fill(disk)
    argv = ["info", "--config", "tiny", "--set", f"data.cache_dir={disk / 'cache'}",
            "--set", f"data.root={omniglot_subset(6, 2)}", "--set", "data.custom=true",
            "--set", "data.n_holdout=4", "--set", "data.num_classes=4"]
    code, _, err = in_process(main, argv)
    assert code == 2 and err.count("\n") == 1 and str(disk / "cache") in err and "No space left" in err, err
    assert temporaries(disk) == []
    filler.unlink()
    code, out, err = in_process(main, argv)
    assert code == 0 and "8 x 20 drawers" in out, err


# --------------------------------------------------------------------------- icl-analyze


def test_icl_analyze_on_a_full_disk(tmpfs):
    from analysis.cli import main
    from analysis.synthetic import make_sweep

    disk = tmpfs("2m")
    exp = disk / "exp"
    exp.mkdir()
    df = make_sweep(classes=(100, 1600), weight_decays=(0.0, 1e-3), seeds=(0,), steps=[100, 200])
    df[[c for c in df.columns if not c.startswith("attn_")]].to_csv(exp / "results.csv", index=False)
    argv = [str(exp), "--dpi", "20"]
    assert in_process(main, argv)[0] == 0  # a report exists: a failed refresh must leave it whole
    before = files(disk)
    filler = fill(disk)
    code, _, err = in_process(main, argv)
    full_disk_line(code, err, exp / "report")
    assert files(disk) == before and temporaries(disk) == []
    filler.unlink()
    code, out, err = in_process(main, argv)
    assert code == 0 and "report:" in out, err
    assert files(disk)["exp/results.csv"] == before["exp/results.csv"] and temporaries(disk) == []


# --------------------------------------------------------------------------- icl-train

TRAIN = ["--config", "tiny", "--set", "train.steps=400", "--set", "train.threads=1"]  # eval 50, checkpoint 100


def icl_train(out: Path, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(PROJECT)}
    return subprocess.Popen([sys.executable, "-m", "icl.train.cli", *TRAIN, "--out", str(out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def science(run: Path) -> pd.DataFrame:
    from icl.metrics import TIMING

    return pd.read_csv(run / "metrics.csv").drop(columns=list(TIMING))


def test_icl_train_on_a_full_disk_keeps_its_checkpoint_and_resumes_exactly(tmpfs, tmp_path):
    from icl.config import load_config
    from icl.train.rundir import RunDir

    reference = icl_train(tmp_path / "reference")
    disk = tmpfs("4m")
    run = disk / "run"
    proc = icl_train(run)
    try:
        deadline = time.monotonic() + 240
        while not (run / "checkpoints" / "step_000000100").is_dir():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.01)
        proc.send_signal(signal.SIGSTOP)  # the disk fills up while the run is between two evaluations
        filler = fill(disk)
        proc.send_signal(signal.SIGCONT)
        _, err = proc.communicate(timeout=240)
    finally:
        proc.kill()
    line = full_disk_line(proc.returncode, err, run)
    assert "run the same command again" in line
    kept = RunDir(run).restore(load_config(str(run / "config.yaml")))
    assert kept is not None and kept.state.step >= 100  # the last checkpoint is intact
    assert temporaries(run) == []

    filler.unlink()
    for name in ("metrics.csv", "attention.npz", "config.yaml"):  # as if killed while writing them
        (run / f".{name}.k1ll3d00.tmp").write_bytes(b"half")
    again = icl_train(run)
    _, err = again.communicate(timeout=240)
    assert again.returncode == 0, err
    _, err = reference.communicate(timeout=240)
    assert reference.returncode == 0, err
    pd.testing.assert_frame_equal(science(run), science(tmp_path / "reference"))
    assert temporaries(run) == []
