"""SIGTERM and Ctrl-C at any moment of a sweep, Ray's start included: the driver stops with
exit 130 and one line saying how to resume, prints no traceback (nor Python's "Exception
ignored ... SystemExit"), stops the Ray it started, and leaves the experiment resumable.
Real driver, real embedded Ray (each test its own, under a temp dir of the test)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from sweep_helpers import STEPS, run_cli, start_cli, wait_for

from sweeps import results as res
from icl.layout import RAY_RECORD as RECORD
from sweeps.procs import pids_mentioning
from sweeps.spec import expand, load_spec

SMOKE_TRIALS = expand(load_spec("smoke"))


def trained(exp: Path) -> bool:
    return any(0 < (res.run_dir(exp, t).last_logged_step() or 0) < STEPS for t in SMOKE_TRIALS)


def ray_starting(ray_tmp: str) -> bool:
    """Ray's session directory exists: ``ray.init`` is under way (its processes starting)."""
    return any(Path(ray_tmp).glob("ray/session_2*"))


@pytest.mark.parametrize("when, signum", [
    ("while Ray starts", signal.SIGTERM),
    pytest.param("while Ray starts", signal.SIGINT, marks=pytest.mark.slow),
    pytest.param("while trials train", signal.SIGTERM, marks=pytest.mark.slow),
], ids=["SIGTERM-at-start", "Ctrl-C-at-start", "SIGTERM-while-training"])
def test_a_signal_at_any_moment_stops_cleanly_and_resumably(embedded_env: dict, tmp_path: Path, when: str,
                                                             signum: int) -> None:
    ray_tmp = embedded_env["RAY_TMPDIR"]
    exp = tmp_path / "smoke"
    log = tmp_path / "driver.log"
    args = ["smoke", "--storage", str(tmp_path), "--no-analysis", "--num-cpus", "2"]
    driver = start_cli(args, embedded_env, log)
    try:
        ready = (lambda: ray_starting(ray_tmp)) if when == "while Ray starts" else (lambda: trained(exp))
        assert wait_for(ready, 180, interval=0.02), log.read_text()[-3000:]
        if signum == signal.SIGINT:
            os.killpg(driver.pid, signum)  # as a terminal sends Ctrl-C: to the whole group
        else:
            driver.send_signal(signum)
        code = driver.wait(timeout=180)
    finally:
        driver.kill()
    text = log.read_text()
    assert code == 130, text[-3000:]
    assert "Traceback" not in text and "Exception ignored" not in text, text[-3000:]
    assert "run the same command again to resume" in text
    assert wait_for(lambda: not pids_mentioning(ray_tmp), 30), pids_mentioning(ray_tmp)  # its Ray is gone
    assert not (exp / RECORD).exists()
    # resumable: the same spec and name are accepted (the experiment is new or resumes)
    dry = run_cli(args[:3] + ["--dry-run"], embedded_env)
    assert dry.returncode == 0, dry.stderr
    assert ("exists: would resume" in dry.stdout) == exp.exists()
