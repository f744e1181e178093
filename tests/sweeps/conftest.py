"""Fixtures for the sweep tests: one shared Ray cluster, and the drivers run as real CLIs.

- ``ray_head``: a head node started once per session with ``ray start`` (2 CPUs, token
  authentication with a session token file, fast node-death detection). Sweep drivers join
  it with ``--address``, so most tests pay for connecting to Ray instead of for starting one.
- ``driver_env``: the environment of a sweep driver: the session's data/cache variables,
  ``RAY_AUTH_TOKEN_PATH`` of the session token and no ``RAY_AUTH_MODE`` (icl-sweep picks
  token mode itself when a token is available), no ``RAY_ADDRESS``.
- ``smoke_run``: ``icl-sweep smoke`` end to end on an embedded Ray, with the analysis report;
  ``reference``: its results, which the resumed, retried and multi-node sweeps of the same
  spec must reproduce exactly.
Nothing here touches ``~/.ray`` or other Ray users of the machine: every process this
session starts is found by its own temporary directory and killed by pid; whatever an
interrupted test leaves is killed at the end of the session by its mark (tests/conftest.py).
"""

from __future__ import annotations

import os
import secrets
import shutil
import time
from pathlib import Path

import pandas as pd
import pytest

from sweep_helpers import read_results, run_cli, short_tmpdir
from sweep_raynodes import RayNode

from sweeps.procs import kill_pids, pids_mentioning, with_descendants


@pytest.fixture(scope="session")
def ray_token(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ray-auth") / "token"
    path.write_text(secrets.token_hex(32))
    path.chmod(0o600)  # icl-sweep refuses a token file others can read
    return path


@pytest.fixture(scope="session")
def driver_env(_icl_test_env, ray_token: Path) -> dict[str, str]:
    env = dict(os.environ)
    for key in ("RAY_AUTH_MODE", "RAY_ADDRESS", "ICL_SWEEP_FAULTS"):
        env.pop(key, None)
    env["RAY_AUTH_TOKEN_PATH"] = str(ray_token)
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture(scope="session")
def ray_head(driver_env: dict[str, str]):
    """The session's shared cluster: a head node with 2 CPUs."""
    root = short_tmpdir("icl-rayhead-")
    env = dict(
        driver_env,
        RAY_AUTH_MODE="token",
        # notice a killed node in ~3 s instead of ~30 s (the multi-node test kills one)
        RAY_health_check_period_ms="1000",
        RAY_health_check_failure_threshold="3",
    )
    head = RayNode(root / "head", env, num_cpus=2).start()
    head.env = env
    yield head
    head.stop()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture()
def embedded_env(driver_env: dict[str, str]):
    """Environment for a driver that starts its own Ray: its processes live under a temp
    dir of this test (RAY_TMPDIR), so whatever a SIGKILL orphans is found and killed."""
    tmp = short_tmpdir("icl-ray-")
    yield dict(driver_env, RAY_TMPDIR=str(tmp))
    kill_pids(with_descendants(pids_mentioning(str(tmp))))
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def smoke_run(driver_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory):
    """``icl-sweep smoke`` end to end on an embedded Ray (the default), report included."""
    storage = tmp_path_factory.mktemp("smoke-storage")
    raytmp = short_tmpdir("icl-ray-")
    env = dict(driver_env, RAY_TMPDIR=str(raytmp), ICL_SWEEP_REPORT_S="2")  # live tables while it runs
    t0 = time.monotonic()
    try:
        proc = run_cli(["smoke", "--storage", str(storage), "--num-cpus", "2"], env)
    finally:  # an interrupted run_cli kills the driver, not the Ray it started
        kill_pids(with_descendants(pids_mentioning(str(raytmp))))
        shutil.rmtree(raytmp, ignore_errors=True)
    wall = time.monotonic() - t0
    return {"proc": proc, "storage": storage, "exp": storage / "smoke", "wall": wall}


@pytest.fixture(scope="session")
def reference(smoke_run: dict) -> pd.DataFrame:
    """The uninterrupted smoke sweep's results: what resumed, retried and multi-node
    sweeps of the same spec must reproduce exactly (timing columns aside)."""
    assert smoke_run["proc"].returncode == 0, smoke_run["proc"].stdout[-3000:] + smoke_run["proc"].stderr[-3000:]
    return read_results(smoke_run["exp"])
