"""Helpers of the sweep tests (a module of its own: test modules import it by name, which
would be ambiguous for ``conftest`` with several conftest.py files in the tree)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import pandas as pd
import pytest

from icl import metrics
from sweeps.faults import FAULTS_ENV

TIMING = list(metrics.TIMING)
STEPS = 200  # smoke.yaml: 200-step trials, evaluated every 50 steps, checkpointed every 100


def short_tmpdir(prefix: str) -> Path:
    """Ray puts unix sockets under its temp dir: keep the path short (108-byte limit). The
    folder is marked as this test session's (tests/conftest.py stops what runs in it when
    the session ends, however it ends)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    (path / ".icl-test-session").write_text(os.environ.get("ICL_TEST_SESSION", ""))
    return path


FAULTY_SWEEP = Path(__file__).with_name("faulty_sweep.py")


def icl_sweep_cmd() -> list[str]:
    script = Path(sys.executable).with_name("icl-sweep")
    return [str(script)] if script.exists() else [sys.executable, "-m", "sweeps.cli"]


def run_cli(args: list[str], env: dict[str, str], timeout: float = 300, faults: str | None = None
            ) -> subprocess.CompletedProcess:
    """``icl-sweep ARGS``; with ``faults`` (``"t001@100,t003@100x*"``, sweeps.faults), the same
    command with those faults injected (tests/sweeps/faulty_sweep.py)."""
    if faults is not None:
        cmd, env = [sys.executable, str(FAULTY_SWEEP)], dict(env, **{FAULTS_ENV: faults})
    else:
        cmd = icl_sweep_cmd()
    return subprocess.run(cmd + args, env=env, capture_output=True, text=True, timeout=timeout)


def like_a_terminal_job() -> None:
    """``preexec_fn`` of a process the tests will Ctrl-C: Ctrl-C at its default, as for a job a
    terminal runs. A suite started in the background by a non-interactive shell (``pytest &``)
    ignores SIGINT, and every process it starts would inherit that, and never hear a Ctrl-C."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_cli(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """A driver in a process group of its own (so a Ctrl-C can be sent like a terminal's)."""
    with open(log, "w") as f:
        return subprocess.Popen(icl_sweep_cmd() + args, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=like_a_terminal_job)


def wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


def read_results(exp_dir: Path) -> pd.DataFrame:
    return pd.read_csv(exp_dir / "results.csv")


def without_timing(df: pd.DataFrame) -> pd.DataFrame:
    return df.drop(columns=[c for c in TIMING if c in df.columns]).reset_index(drop=True)


def cli_error(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    """Run ``icl-sweep``'s main(argv) expecting exit 2 with exactly one ``error:`` line and no
    traceback; returns that line."""
    from sweeps.cli import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]
