"""The sweep's trust boundary, tested as an attacker would: an experiment directory someone
sends you never runs code (a crafted ``tuner.pkl``, ``error.pkl`` or checkpoint copy), a
crafted record never makes the sweep kill a process that is not its own embedded Ray, the
embedded Ray listens on 127.0.0.1 alone with a private token, and a token file others can
read is refused. Real Ray, real processes, real files."""

from __future__ import annotations

import fcntl
import json
import os
import pickle
import shutil
import socket
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest
from sweep_helpers import cli_error, read_results, run_cli, short_tmpdir, without_timing

from icl.layout import RAY_RECORD as RECORD
from icl.train import train
from sweeps import leftovers
from sweeps import results as res
from sweeps.experiment import Experiment
from sweeps.leftovers import record, stop_leftovers
from sweeps.ray_session import check_token_private
from sweeps.spec import expand, load_spec

PROJECT_ROOT = Path(__file__).resolve().parents[2]
SMOKE_TRIALS = expand(load_spec("smoke"))


class Payload:
    """Unpickling this runs a shell command that creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# --------------------------------------------------------------------------- no code from files


def test_a_crafted_tune_state_never_runs_and_deleted_runs_come_back(
        smoke_run: dict, ray_head, driver_env: dict, reference: pd.DataFrame, tmp_path: Path) -> None:
    """A finished experiment, then tampered with: Tune's tuner.pkl, experiment state and an
    error.pkl replaced by payloads; one model's run directory deleted (Ray's checkpoint copy
    of it kept), another model's whole directory deleted. The same command runs no payload,
    restores the first from the copy, retrains the second, and ends with the uninterrupted
    sweep's results (a deleted finished run is trained again, not 'interrupted' forever)."""
    exp = tmp_path / "smoke"
    shutil.copytree(smoke_run["exp"], exp)
    marker = tmp_path / "PWNED"
    evil = pickle.dumps(Payload(marker))
    (exp / "tuner.pkl").write_bytes(evil)
    (exp / "experiment_state-2026-01-01_00-00-00.json").write_text(json.dumps({"runner_data": evil.hex()}))
    t0, t1, t2, t3 = (exp / t.dirname for t in SMOKE_TRIALS)
    (t0 / "error.pkl").write_bytes(evil)
    (t2 / "error.pkl").write_bytes(evil)
    shutil.rmtree(t1 / "run")  # its checkpoint_*/t001 copy remains
    shutil.rmtree(t3)  # everything of it is gone
    proc = run_cli(["smoke", "--storage", str(tmp_path), "--address", ray_head.address, "--no-analysis"], driver_env)
    assert not marker.exists()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "2 already finished" in proc.stdout and "restored the run directories of t001" in proc.stdout
    assert "4/4 models finished" in proc.stdout
    assert not (t0 / "error.pkl").exists() and not (t2 / "error.pkl").exists()
    assert not (exp / "experiment_state-2026-01-01_00-00-00.json").exists()
    pd.testing.assert_frame_equal(without_timing(read_results(exp)), without_timing(reference))
    assert [a["resumed_from_step"] for a in res.attempts(exp, t3.name)] == [0]  # trained again from scratch


def test_a_crafted_checkpoint_never_runs_in_a_ray_worker(ray_head, driver_env: dict, tmp_path: Path) -> None:
    """A sweep resumes a model whose newest checkpoint is a crafted pickle (manifest re-hashed):
    the trial's worker refuses it as damaged, resumes from the previous checkpoint, and the
    payload never runs."""
    import hashlib
    import io

    import torch
    import yaml

    spec = tmp_path / "one.yaml"
    spec.write_text(yaml.safe_dump({"name": "one", "base": "tiny", "grid": {"seed": [0]}, "max_failures": 0,
                                    "overrides": {"train.steps": 150, "train.eval_every": 50,
                                                  "train.checkpoint_every": 50, "train.threads": 1}}))
    args = [str(spec), "--storage", str(tmp_path), "--address", ray_head.address, "--no-analysis"]
    exp = Experiment.build(load_spec(str(spec), storage=str(tmp_path)))  # the experiment, as a first run leaves it:
    exp.dir.path.mkdir()  # its spec saved, its model stopped after its step-100 checkpoint
    exp.dir.spec.write_text(exp.saved_yaml())
    (trial,) = exp.models
    run = res.run_dir(tmp_path / "one", trial)

    def stop(row: dict, saved: Path | None) -> None:
        if saved is not None and row["step"] == 100:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(trial.config, run.path, on_eval=stop, progress=False)
    newest = run.checkpoints()[-1]
    assert newest.name == "step_000000100"
    marker = tmp_path / "PWNED"
    state = torch.load(newest / "state.pt", weights_only=True)
    state["wall_s"] = Payload(marker)
    buf = io.BytesIO()
    torch.save(state, buf)
    (newest / "state.pt").write_bytes(buf.getvalue())
    manifest = json.loads((newest / "manifest.json").read_text())
    manifest["files"]["state.pt"] = hashlib.sha256(buf.getvalue()).hexdigest()
    (newest / "manifest.json").write_text(json.dumps(manifest))
    again = run_cli(args, driver_env)
    assert not marker.exists()
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "is corrupt" in again.stdout + again.stderr and "it asks for posix.system" in again.stdout + again.stderr
    assert [int(r[0]) for r in run.metrics_table()[1]] == [50, 100, 150]  # step 100 trained again from 50


# --------------------------------------------------------------------------- kill only what is ours


@pytest.fixture
def sleeper(tmp_path: Path):
    """A sleeping process of ours that a crafted record tries to get killed: it names the
    'session' directory in its arguments and environment and holds a file in it open (all
    that the old cleanup went by)."""
    session = tmp_path / "ray" / "session_2026-01-01_00-00-00_000001_1"
    session.mkdir(parents=True)
    (session / "logs").mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; f = open(sys.argv[1] + '/logs/raylet.out', 'a'); time.sleep(300)",
         str(session)], env=dict(os.environ, RAY_SESSION=str(session)))
    time.sleep(0.5)
    yield proc, session
    proc.kill()
    proc.wait()


def alive(proc: subprocess.Popen) -> bool:
    return proc.poll() is None


@pytest.mark.parametrize("crafted", ["session dir", "broad path", "pid 1 by a path it holds", "forged owner mark",
                                     "another experiment's mark", "not a dict"])
def test_a_crafted_ray_record_kills_nothing(sleeper, tmp_path: Path, crafted: str) -> None:
    proc, session = sleeper
    exp = tmp_path / "exp"
    exp.mkdir()
    host = socket.gethostname()
    content: object = {"session_dir": str(session), "host": host, "driver_pid": proc.pid, "nonce": "n"}
    if crafted == "broad path":
        content = {"session_dir": "/", "host": host, "nonce": "n"}
    elif crafted == "pid 1 by a path it holds":
        content = {"session_dir": "/proc/1/session_", "host": host, "pids": [1, proc.pid]}
    elif crafted in ("forged owner mark", "another experiment's mark"):
        # the attacker controls the directory they send, marks included; what they cannot
        # make is a Ray program of this user holding that directory open
        owner = {"experiment": str(exp.resolve() if crafted == "forged owner mark" else tmp_path / "other"),
                 "nonce": "n"}
        (session / leftovers.OWNER).write_text(json.dumps(owner))
    elif crafted == "not a dict":
        content = [str(session)]
    (exp / RECORD).write_text(json.dumps(content))
    said = stop_leftovers(exp)
    time.sleep(0.3)
    assert alive(proc), said
    assert not said.startswith("stopped")
    assert not (exp / RECORD).exists()  # read once, then forgotten


def test_the_record_of_our_own_driver_is_never_acted_on(sleeper, tmp_path: Path) -> None:
    proc, session = sleeper
    exp = tmp_path / "exp"
    exp.mkdir()
    record(exp, str(session))  # a genuine record and owner mark of this experiment
    said = stop_leftovers(exp, own_session=str(session))
    assert alive(proc) and "this driver's own Ray" in said


# --------------------------------------------------------------------------- ports and tokens


def non_loopback_ipv4() -> str | None:
    """An IPv4 address of this machine other than 127.x (from the interfaces; no traffic)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))  # SIOCGIFADDR
            except OSError:
                continue
            ip = socket.inet_ntoa(packed[20:24])
            if not ip.startswith("127."):
                return ip
    return None


EMBEDDED = textwrap.dedent("""
    import json, os, stat, sys
    import ray
    from sweeps.ray_session import RayOptions, start_ray
    from sweeps.procs import ray_processes_of
    from sweeps.ray_adapter import session_dir

    token_dir = start_ray(RayOptions(num_cpus=1))
    ray.get(ray.remote(lambda: 1).remote())  # a worker process too
    session = session_dir()
    pids = ray_processes_of(session) + [os.getpid()]
    sockets = set()
    for pid in pids:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                sockets.add(link[8:-1])
    listening = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in open(table).read().splitlines()[1:]:
            f = line.split()
            if f[3] == "0A" and f[9] in sockets:  # LISTEN
                listening.append(f[1])
    token = os.environ["RAY_AUTH_TOKEN_PATH"]
    print(json.dumps({"gcs": ray.get_runtime_context().gcs_address, "listening": listening, "pids": len(pids),
                      "token_mode": stat.S_IMODE(os.stat(token).st_mode),
                      "dir_mode": stat.S_IMODE(os.stat(os.path.dirname(token)).st_mode),
                      "token_dir": str(token_dir)}), flush=True)
    sys.stdin.read()  # keep Ray up until the test is done
    ray.shutdown()
    import shutil; shutil.rmtree(token_dir)
""")


def loopback(addr: str) -> bool:
    """Whether a /proc/net/tcp{,6} local address (hex ip:port) is a loopback one."""
    ip = addr.split(":")[0]
    if len(ip) == 8:  # IPv4, little-endian
        return ip.endswith("7F")
    return ip in ("00000000000000000000000001000000",) or ip.startswith("0000000000000000FFFF0000") and ip.endswith("7F")


@pytest.mark.slow  # starts its own Ray
def test_the_embedded_ray_listens_on_loopback_only_and_refuses_another_address(driver_env: dict) -> None:
    ip = non_loopback_ipv4()
    if ip is None:
        pytest.skip("this machine has no non-loopback IPv4 address to try from")
    tmp = short_tmpdir("icl-ray-")
    home = tmp / "home"  # a fresh home: Ray 2.60.0 writes ~/.ray/auth_token readable by all when it makes one
    home.mkdir()
    env = dict(driver_env, RAY_TMPDIR=str(tmp), PYTHONPATH=str(PROJECT_ROOT), HOME=str(home))
    env.pop("RAY_AUTH_TOKEN_PATH")  # the embedded Ray makes its own private token
    proc = subprocess.Popen([sys.executable, "-c", EMBEDDED], env=env, cwd=PROJECT_ROOT, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        line = proc.stdout.readline()
        assert line, proc.stderr.read()[-3000:]
        got = json.loads(line)
        port = int(got["gcs"].rsplit(":", 1)[1])
        assert got["gcs"].startswith("127.0.0.1:")
        assert got["listening"] and all(loopback(a) for a in got["listening"]), got
        assert any(int(a.rsplit(":", 1)[1], 16) == port for a in got["listening"])  # the GCS is one of them
        assert got["token_mode"] == 0o600 and got["dir_mode"] == 0o700
        assert not (home / ".ray" / "auth_token").exists()  # Ray wrote no token file of its own
        with pytest.raises(ConnectionRefusedError):  # a second address cannot reach it
            socket.create_connection((ip, port), timeout=5).close()
        join = subprocess.run([sys.executable, "-c", "from sweeps.cli import main; main()", "smoke", "--address",
                               f"{ip}:{port}", "--storage", str(tmp / "s")], cwd=PROJECT_ROOT,
                              env=dict(env, RAY_AUTH_MODE="disabled"),  # whatever ~/.ray holds: the port is shut
                              capture_output=True, text=True, timeout=60)
        assert join.returncode == 2 and join.stderr.startswith(f"error: cannot reach a Ray cluster at {ip}:{port}")
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)
        shutil.rmtree(tmp, ignore_errors=True)


def test_a_token_file_others_can_read_is_refused(tmp_path: Path, monkeypatch, capsys) -> None:
    token = tmp_path / "token"
    token.write_text("0" * 64)
    token.chmod(0o644)
    with pytest.raises(Exception, match="can be read by other users .* chmod 600"):
        check_token_private(token)
    token.chmod(0o600)
    check_token_private(token)  # private: accepted
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    (shared / "token").write_text("0" * 64)
    (shared / "token").chmod(0o600)
    with pytest.raises(Exception, match="writable by other users"):
        check_token_private(shared / "token")
    token.chmod(0o640)
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token))
    line = cli_error(capsys, ["smoke", "--storage", str(tmp_path / "s"), "--address", "127.0.0.1:1"])
    assert "can be read by other users" in line and not (tmp_path / "s" / "smoke").exists()


# --------------------------------------------------------------------------- a full disk, quietly


def test_ray_storage_tracebacks_become_one_line_once() -> None:
    """What Ray logs at every sync period when the storage is full (a whole traceback each
    time, 39 of them in a 7-minute sweep) reaches the terminal as one line, once."""
    import io
    import logging
    import traceback

    from sweeps.ray_adapter import quiet_ray_logs

    quiet_ray_logs()
    terminal = io.StringIO()
    handler = logging.StreamHandler(terminal)
    loggers = [logging.getLogger(n) for n in ("ray.train._internal.syncer", "ray.tune.execution.experiment_state")]
    saved = [(log.propagate, log.handlers[:]) for log in loggers]
    for log in loggers:
        log.propagate, log.handlers = False, [handler]  # only what this test sees
    try:
        for _ in range(3):
            try:
                raise OSError(28, "No space left on device")
            except OSError:
                loggers[0].warning(f"Last sync command failed with the following error:\n{traceback.format_exc()}")
        try:
            raise OSError(28, "No space left on device")
        except OSError:
            loggers[1].error("Saving experiment state to storage failed with exception: ", exc_info=True)
    finally:
        for log, (propagate, handlers) in zip(loggers, saved):
            log.propagate, log.handlers = propagate, handlers
    text = terminal.getvalue()
    assert "Traceback" not in text and len(text.strip().splitlines()) == 2, text
    assert text.count("No space left on device") == 2
