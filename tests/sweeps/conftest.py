"""Fixtures for the sweep tests: one shared Ray cluster, and the drivers run as real CLIs.

- ``ray_head``: a head node started once per session with ``ray start`` (2 CPUs, token
  authentication with a session token file, fast node-death detection). Sweep drivers join
  it with ``--address``, so most tests pay ~3 s to connect instead of ~10 s for a Ray start.
- ``driver_env``: the environment of a sweep driver: the session's data/cache variables,
  ``RAY_AUTH_TOKEN_PATH`` of the session token and no ``RAY_AUTH_MODE`` (icl-sweep picks
  token mode itself when a token is available), no ``RAY_ADDRESS``.
- ``smoke_run``: ``icl-sweep smoke`` end to end on an embedded Ray, with the analysis report.
- ``long_reference``: the same grid with 300-step trials, uninterrupted, on ``ray_head``: the
  reference that the resumed, retried and multi-node sweeps must reproduce exactly.
Nothing here touches ``~/.ray`` or other Ray users of the machine: every process this
session starts is found by its own temporary directory and killed by pid.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import pandas as pd
import pytest

from icl.train import TIMING_COLUMNS
from raynodes import RayNode, kill_pids, pids_mentioning

# 300-step trials, evaluated every 50 steps, checkpointed every 100: long enough (a few
# seconds each on a core) to be interrupted between checkpoints.
STEPS = 300
LONG = ["--set", f"train.steps={STEPS}", "--set", "train.eval_every=50", "--set", "train.checkpoint_every=100"]
TIMING = list(TIMING_COLUMNS)


def short_tmpdir(prefix: str) -> Path:
    """Ray puts unix sockets under its temp dir: keep the path short (108-byte limit)."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def icl_sweep_cmd() -> list[str]:
    script = Path(sys.executable).with_name("icl-sweep")
    return [str(script)] if script.exists() else [sys.executable, "-m", "sweeps.cli"]


def run_cli(args: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(icl_sweep_cmd() + args, env=env, capture_output=True, text=True, timeout=timeout)


def start_cli(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """A driver in a process group of its own (so a Ctrl-C can be sent like a terminal's)."""
    with open(log, "w") as f:
        return subprocess.Popen(icl_sweep_cmd() + args, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


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


@pytest.fixture(scope="session")
def ray_token(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ray-auth") / "token"
    path.write_text(secrets.token_hex(32))
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
    kill_pids(pids_mentioning(str(tmp)))
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def smoke_run(driver_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory):
    """``icl-sweep smoke`` end to end on an embedded Ray (the default), report included."""
    storage = tmp_path_factory.mktemp("smoke-storage")
    raytmp = short_tmpdir("icl-ray-")
    env = dict(driver_env, RAY_TMPDIR=str(raytmp))
    t0 = time.monotonic()
    proc = run_cli(["smoke", "--storage", str(storage), "--num-cpus", "2"], env)
    wall = time.monotonic() - t0
    kill_pids(pids_mentioning(str(raytmp)))
    shutil.rmtree(raytmp, ignore_errors=True)
    return {"proc": proc, "storage": storage, "exp": storage / "smoke", "wall": wall}


@pytest.fixture(scope="session")
def long_reference(ray_head: RayNode, driver_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory):
    """The smoke grid with 300-step trials, uninterrupted, on the shared cluster."""
    storage = tmp_path_factory.mktemp("long-reference")
    proc = run_cli(["smoke", "--storage", str(storage), "--address", ray_head.address, "--no-analysis", *LONG], driver_env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return read_results(storage / "smoke")
