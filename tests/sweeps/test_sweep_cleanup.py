"""An aborted test run leaves no process behind: a pytest run that has started a Ray cluster
(``sweep_abort_target.py``: the session's head node) is stopped by SIGTERM (``kill``, a CI
timeout) or Ctrl-C (SIGINT to its process group, as a terminal sends it), and no process
that run started survives it: a plain run, and one with xdist workers (the README's test
command), whose head node a worker started. (A SIGKILLed sweep driver's leftovers: test_sweep_e2e.py.)"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sweep_helpers import like_a_terminal_job, wait_for

from sweeps.procs import kill_pids, pids_mentioning, pids_with_env, with_descendants

pytestmark = pytest.mark.slow  # pytest runs that start Ray, stopped by signals

PROJECT_ROOT = Path(__file__).resolve().parents[2]
SESSION_ENV = "ICL_TEST_SESSION"


def ended(run: subprocess.Popen, timeout: float) -> int | None:
    """The run's exit status, or None (after it wrote its threads' stacks beside the marker)
    when it did not end within ``timeout`` seconds."""
    try:
        return run.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(run.pid, signal.SIGUSR1)  # sweep_abort_target.py (in pytest, or an xdist worker) dumps its threads
        time.sleep(2)
        return None


@pytest.mark.parametrize("workers", [[], ["-n", "2"]], ids=["pytest", "pytest -n 2"])
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_an_aborted_test_run_leaves_no_process(signum: int, workers: list[str], tmp_path: Path) -> None:
    marker, log = tmp_path / "cluster-up", tmp_path / "pytest.log"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *workers, "tests/sweeps/sweep_abort_target.py"]
    with open(log, "w") as out:
        run = subprocess.Popen(cmd, cwd=PROJECT_ROOT, env=dict(os.environ, ICL_ABORT_MARKER=str(marker)),
                               stdout=out, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=like_a_terminal_job)
    started: dict = {}

    def survivors() -> list[int]:
        return sorted(set(pids_with_env(SESSION_ENV, started["session"]) + pids_mentioning(started["root"])))

    try:
        assert wait_for(marker.exists, 180, interval=0.2), log.read_text()[-3000:]
        started = json.loads(marker.read_text())
        assert len(survivors()) >= 4, survivors()  # ray start, GCS, raylet, agents ...
        if signum == signal.SIGINT:
            os.killpg(run.pid, signum)
        else:
            run.send_signal(signum)
        stacks = Path(f"{marker}.stacks")
        assert ended(run, 60) not in (None, 0), log.read_text()[-3000:] + stacks.read_text()[-6000:]
        assert "KeyboardInterrupt" in log.read_text()
        assert wait_for(lambda: not survivors(), 10), survivors()
        assert not Path(started["root"]).exists()
    finally:  # a run that had to be killed cannot clean up: what it left is removed here
        run.kill()
        if started:
            kill_pids(with_descendants(survivors()))
            shutil.rmtree(Path(started["root"]).parent, ignore_errors=True)  # short_tmpdir's folder
