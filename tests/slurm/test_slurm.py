"""The SLURM scripts against a real SLURM: munged + slurmctld + two slurmd on localhost.

Selected with ``python -m pytest -m slurm tests/slurm`` (the default run deselects them).
The cluster (``slurm/tests/cluster.py``) is started once for this module and torn down by
its daemons' process ids. SLURM and MUNGE are installed with apt when missing; where that
cannot happen (not root, no apt-get) the tests skip with the reason, or fail when
``ICL_REQUIRE_SLURM=1`` (CI: a skip there would hide a broken setup).

The sweeps are the real ``icl-sweep`` on ``sweeps/smoke.yaml`` (4 tiny trials). Each test
checks the results are complete: every trial has every evaluation step up to its last,
once, even after the job was interrupted and requeued mid-sweep.
"""

from __future__ import annotations

import csv
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slurm

ROOT = Path(__file__).resolve().parents[2]
SUBMIT = ROOT / "slurm" / "submit"
SMOKE = ROOT / "sweeps" / "smoke.yaml"
JOB_TIMEOUT = 240  # one smoke sweep takes ~60-80 s on 2 cores; a requeued one twice that


def _load_harness():
    spec = importlib.util.spec_from_file_location("icl_slurm_harness", ROOT / "slurm" / "tests" / "cluster.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


harness = _load_harness()


@pytest.fixture(scope="module")
def slurm(omniglot_dir, session_cache_dir):
    """A running localhost SLURM cluster (2 nodes, 2 fake GPUs each) for this module."""
    try:
        harness.ensure_slurm(install=True)
    except harness.SlurmUnavailable as e:
        if os.environ.get("ICL_REQUIRE_SLURM") == "1":
            pytest.fail(f"SLURM required (ICL_REQUIRE_SLURM=1) but unavailable: {e}")
        pytest.skip(f"no SLURM test cluster: {e}")
    if shutil.which("icl-sweep") is None:
        pytest.fail("icl-sweep is not on PATH: install the project (pip install -e .)")
    cluster = harness.LocalSlurm(nodes=2, gpus_per_node=2)
    try:
        cluster.start()
    except Exception as e:  # noqa: BLE001 - report why, then clean up
        cluster.stop()
        if os.environ.get("ICL_REQUIRE_SLURM") == "1":
            raise
        pytest.skip(f"the SLURM test cluster did not start here: {e}")
    try:
        yield cluster
    finally:
        cluster.stop()


def submit(slurm, *args: str) -> subprocess.CompletedProcess:
    return slurm.run([sys.executable, str(SUBMIT), *args], check=False, timeout=120)


def submitted_job(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stderr + proc.stdout
    m = re.search(r"submitted job (\d+)", proc.stdout)
    assert m, proc.stdout
    return m.group(1)


def gpu_spec(where: Path, gpu: float, pack: int) -> Path:
    """The smoke sweep (4 models) with each trial reserving ``gpu`` GPUs, ``pack`` models a trial."""
    spec = yaml.safe_load(SMOKE.read_text())
    spec.update(name=f"smoke-gpu{gpu:g}-pack{pack}", pack=pack)
    spec["resources"]["gpu"] = gpu
    path = where / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def storage(slurm, name: str) -> Path:
    d = slurm.root / "storage" / name
    d.mkdir(parents=True, exist_ok=True)
    return d


def job_log(store: Path, job: str) -> str:
    logs = list((store / "slurm-logs").glob(f"*-{job}.out"))
    return logs[0].read_text(errors="replace") if logs else "(no log yet)"


def expected_trials() -> tuple[int, list[int]]:
    """(number of trials, evaluation steps of each) of the smoke spec."""
    spec = yaml.safe_load(SMOKE.read_text())
    n = 1
    for values in spec["grid"].values():
        n *= len(values)
    steps, every = int(spec["overrides"]["train.steps"]), int(spec["overrides"]["train.eval_every"])
    return n, list(range(every, steps + 1, every))


def assert_complete(exp_dir: Path) -> None:
    """results.csv: every trial, every evaluation step up to the last, exactly once."""
    n_trials, steps = expected_trials()
    results = exp_dir / "results.csv"
    assert results.is_file(), f"no {results}"
    with results.open() as f:
        rows = list(csv.DictReader(f))
    seen: dict[str, list[int]] = {}
    for row in rows:
        seen.setdefault(row["trial_id"], []).append(int(float(row["step"])))
    assert len(seen) == n_trials, f"trials in results.csv: {sorted(seen)}"
    for trial, got in seen.items():
        assert sorted(got) == steps, f"{trial}: steps {sorted(got)}, want {steps} once each"


def wait_for_checkpoint(slurm, job: str, exp_dir: Path, timeout: float = 150) -> None:
    """Until some trial has written a checkpoint (so a restart has one to resume from)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(exp_dir.glob("*/checkpoint_*")):
            return
        state = slurm.job(job).get("JobState")
        assert state in ("PENDING", "RUNNING", "CONFIGURING"), f"job {job} {state} before any checkpoint"
        time.sleep(1)
    raise AssertionError(f"no checkpoint in {exp_dir} after {timeout}s")


def evaluations_done(exp_dir: Path) -> int:
    """Evaluations the trials have recorded so far (their own run/metrics.csv files)."""
    n = 0
    for metrics in exp_dir.glob("*/run/metrics.csv"):
        with metrics.open() as f:
            n += sum(1 for _ in csv.DictReader(f))
    return n


def assert_mid_sweep(exp_dir: Path) -> None:
    n_trials, steps = expected_trials()
    done = evaluations_done(exp_dir)
    assert done < n_trials * len(steps), f"the sweep already finished ({done} evaluations)"


def assert_no_leftovers(slurm) -> None:
    """Nothing a job started is still running (the scripts stop their own Ray)."""
    deadline = time.monotonic() + 20
    while slurm.leftover_pids() and time.monotonic() < deadline:
        time.sleep(1)
    left = slurm.leftover_pids()
    details = []
    for pid in left:
        try:
            details.append(f"{pid}: {Path(f'/proc/{pid}/cmdline').read_bytes()[:120]!r}")
        except OSError:
            pass
    assert not details, "processes left behind by a job: " + "; ".join(details)


def assert_job_ok(slurm, job: str, store: Path, info: dict) -> None:
    assert info.get("JobState") == "COMPLETED" and info.get("ExitCode") == "0:0", (
        f"job {job}: {info.get('JobState')} exit {info.get('ExitCode')}\n{job_log(store, job)[-4000:]}")


# ----------------------------------------------------------------------------- harness
def test_harness_runs_a_job_on_both_nodes(slurm):
    assert slurm.node_names == ["n1", "n2"], slurm.notes
    out = slurm.root / "jobs" / "hello-%j.out"
    job = slurm.sbatch(["--nodes=2", f"--output={out}", "--wrap",
                        "srun --ntasks-per-node=1 printenv SLURMD_NODENAME"])
    info = slurm.wait_job(job, timeout=60)
    text = Path(str(out).replace("%j", job)).read_text()
    assert info["JobState"] == "COMPLETED", text
    assert sorted(text.split()) == ["n1", "n2"]
    gres = slurm.run(["sinfo", "-h", "-N", "-o", "%N %G"]).stdout.split()
    assert gres.count("gpu:2") == 2, gres


# ----------------------------------------------------------------------------- submit
@pytest.mark.parametrize(
    "case",
    ["missing spec", "unknown shipped spec", "missing storage", "storage not a directory",
     "unwritable storage", "more GPUs than a node has", "more nodes than the partition",
     "more CPUs than a node has", "unknown partition", "spec error", "bad time limit",
     "more GPUs than the sweep can use", "GPUs for a sweep that uses none", "no GPU for a sweep that needs one"],
)
def test_submit_refuses_bad_input_before_submitting(slurm, case, tmp_path):
    good = str(storage(slurm, "bad-input"))
    afile = tmp_path / "file.txt"
    afile.write_text("x")
    half = str(gpu_spec(tmp_path, gpu=0.5, pack=2))  # 2 trials x 0.5 GPU: 1 GPU at once
    args = {
        "missing spec": [str(tmp_path / "nope.yaml"), "--storage", good],
        "unknown shipped spec": ["no-such-spec", "--storage", good],
        "missing storage": ["smoke", "--storage", str(tmp_path / "not-there")],
        "storage not a directory": ["smoke", "--storage", str(afile)],
        "unwritable storage": ["smoke", "--storage", "/proc"],
        "more GPUs than a node has": ["smoke", "--storage", good, "--gpus-per-node", "3"],
        "more nodes than the partition": ["smoke", "--storage", good, "--nodes", "3"],
        "more CPUs than a node has": ["smoke", "--storage", good, "--cpus-per-node", "64"],
        "unknown partition": ["smoke", "--storage", good, "--partition", "gpu-nope"],
        "spec error": ["smoke", "--storage", good, "--set", "train.no_such_key=1"],
        "bad time limit": ["smoke", "--storage", good, "--time", "soon"],
        "more GPUs than the sweep can use": [half, "--storage", good, "--gpus-per-node", "2"],
        "GPUs for a sweep that uses none": ["smoke", "--storage", good, "--gpus-per-node", "1"],
        "no GPU for a sweep that needs one": [half, "--storage", good, "--gpus-per-node", "0"],
    }[case]
    before = slurm.run(["squeue", "-h", "-o", "%i"]).stdout.split()
    proc = submit(slurm, *args)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    assert slurm.run(["squeue", "-h", "-o", "%i"]).stdout.split() == before, "a job was submitted"


def test_submit_fills_the_sbatch_options(slurm):
    store = storage(slurm, "dry")
    one = submit(slurm, "smoke", "--storage", str(store), "--gpus-per-node", "2", "--allow-idle-gpus",
                 "--time", "1:00:00", "--set", "train.steps=50", "--dry-run")
    assert one.returncode == 0, one.stderr
    cmd = one.stdout
    for piece in ["--nodes=1", "--ntasks-per-node=1", "--cpus-per-task=2", "--gres=gpu:2",
                  "--time=1:00:00", "--partition=debug", "--requeue", "--signal=B:USR1@120",
                  "--open-mode=append", "sweep_one_node.sbatch", "--set train.steps=50",
                  f"--storage {store}"]:
        assert piece in cmd, (piece, cmd)
    two = submit(slurm, "smoke", "--storage", str(store), "--nodes", "2", "--cpus-per-node", "1",
                 "--no-requeue", "--signal-lead", "300", "--grace", "200", "--dry-run")
    assert two.returncode == 0, two.stderr
    for piece in ["--nodes=2", "--cpus-per-task=1", "--no-requeue", "--signal=B:USR1@300",
                  "ICL_SLURM_GRACE=200", "sweep_ray_cluster.sbatch"]:
        assert piece in two.stdout, (piece, two.stdout)
    assert "--gres" not in two.stdout


def test_submit_asks_for_the_gpus_the_sweep_can_use_at_once(slurm, tmp_path):
    """The GPUs the dry run says the sweep can use at once (trials at a time x resources.gpu):
    the default, and the most a job may ask for without --allow-idle-gpus."""
    store = str(storage(slurm, "gpus"))
    half = str(gpu_spec(tmp_path, gpu=0.5, pack=2))  # the study's shape: 2 trials x 0.5 GPU = 1 GPU

    def sbatch_line(*args: str) -> str:
        proc = submit(slurm, *args, "--storage", store, "--dry-run")
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    assert "--gres=gpu:1 " in sbatch_line(half)
    assert "--gres" not in sbatch_line("smoke")  # resources.gpu 0
    unpacked = str(gpu_spec(tmp_path, gpu=0.5, pack=1))  # 4 trials x 0.5 GPU = 2 GPUs, one per node on 2 nodes
    line = sbatch_line(unpacked, "--nodes", "2")
    assert "--nodes=2" in line and "--gres=gpu:1 " in line
    assert "--gres=gpu:2 " in sbatch_line(half, "--gpus-per-node", "2", "--allow-idle-gpus")

    refused = submit(slurm, half, "--storage", store, "--gpus-per-node", "2", "--dry-run")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert ("--gpus-per-node 2 on 1 node(s) = 2 GPU(s), but the sweep can use at most 1 at once (2 trials at a "
            "time x 0.5 GPU" in refused.stderr), refused.stderr
    assert "so 1 would sit idle: ask for 1 in all (--gpus-per-node 1), or pass --allow-idle-gpus" in refused.stderr
    on_two = submit(slurm, half, "--storage", store, "--nodes", "2", "--dry-run")  # the default can't spread 1 GPU
    assert on_two.returncode == 2 and "(--nodes 1 --gpus-per-node 1)" in on_two.stderr, on_two.stderr


@pytest.mark.parametrize("script", ["sweep_one_node.sbatch", "sweep_ray_cluster.sbatch"])
def test_job_fails_clearly_when_storage_is_missing_on_the_node(slurm, script):
    """Straight to sbatch (submit would refuse): the job checks the storage on its node."""
    out = slurm.root / "jobs" / f"nostorage-{script}-%j.out"
    missing = "/nonexistent/shared/experiments"
    job = slurm.sbatch([f"--output={out}", "--nodes=1", "--cpus-per-task=1",
                        str(ROOT / "slurm" / script), "smoke", "--storage", missing])
    info = slurm.wait_job(job, timeout=60)
    text = Path(str(out).replace("%j", job)).read_text()
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", (info, text)
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"storage directory {missing} does not exist on" in errors[0], text


# ----------------------------------------------------------------------------- sweeps
def test_one_node_sweep_completes_with_allocated_cpus_and_gpus(slurm):
    store = storage(slurm, "one")
    job = submitted_job(submit(slurm, "smoke", "--storage", str(store), "--name", "one",
                               "--cpus-per-node", "2", "--gpus-per-node", "1", "--allow-idle-gpus"))
    info = slurm.wait_job(job, timeout=JOB_TIMEOUT)
    log = job_log(store, job)
    assert_job_ok(slurm, job, store, info)
    # Ray was sized to the allocation, not to the machine.
    assert "--num-cpus 2 --num-gpus 1" in log, log[-3000:]
    # the live table goes to the job's log too (the last one: every model finished)
    assert "| Trial name" in log and "Sweep: 4/4 models finished, 800/800 model-steps (100%)" in log, log[-3000:]
    assert_complete(store / "one")
    assert_no_leftovers(slurm)
    assert not Path(f"/tmp/ray_{job}").exists(), "the job's Ray temp dir was not removed"


def test_one_node_sweep_checkpoints_requeues_and_resumes_on_usr1(slurm):
    """The time-limit path: USR1 to the batch script (what --signal=B:USR1@120 sends) makes
    it stop the sweep gracefully and requeue the job; the requeued job resumes."""
    store = storage(slurm, "usr1")
    exp = store / "usr1"
    job = submitted_job(submit(slurm, "smoke", "--storage", str(store), "--name", "usr1",
                               "--cpus-per-node", "2"))
    wait_for_checkpoint(slurm, job, exp)
    assert_mid_sweep(exp)
    # The embedded Ray lives in the job's short temp dir.
    assert list(Path(f"/tmp/ray_{job}").glob("ray/session_*")), list(Path("/tmp").glob("ray*"))
    slurm.run(["scancel", "--batch", "--signal=USR1", job])
    info = slurm.wait_job(job, timeout=JOB_TIMEOUT)
    log = job_log(store, job)
    assert "USR1: time limit or preemption ahead" in log, log[-3000:]
    assert f"requeueing job {job}" in log, log[-3000:]
    assert int(info.get("Restarts", 0)) >= 1, info
    assert "restart 1:" in log and "icl-sweep: resuming" in log, log[-3000:]
    assert_job_ok(slurm, job, store, info)
    assert_complete(exp)
    assert_no_leftovers(slurm)


def test_ray_cluster_on_two_nodes_survives_a_requeue(slurm):
    """Two SLURM nodes (one host): Ray head on n1, worker on n2 with its own port block (the
    two share a host, as two jobs on one node would); `scontrol requeue` kills the job
    mid-sweep, SLURM restarts it, the sweep resumes."""
    store = storage(slurm, "cluster")
    exp = store / "cluster"
    job = submitted_job(submit(slurm, "smoke", "--storage", str(store), "--name", "cluster",
                               "--nodes", "2", "--cpus-per-node", "1", "--gpus-per-node", "1",
                               "--allow-idle-gpus"))
    wait_for_checkpoint(slurm, job, exp)
    log = job_log(store, job)
    # Both nodes joined with exactly their allocation (1 CPU + 1 GPU each), each node's
    # Ray in its own short temp dir.
    assert "ray cluster: 2/2 nodes, 2 CPUs, 2 GPUs" in log, log[-3000:]
    for i in (0, 1):
        assert list(Path(f"/tmp/ray_{job}_{i}").glob("session_*")), f"no Ray session of node {i}"
    ports = re.findall(r"node (\d)\] ray start .*?--node-manager-port=(\d+)", log)
    assert len({n for n, _ in ports}) == 2 and len({p for _, p in ports}) == 2, ports
    assert_mid_sweep(exp)
    slurm.run(["scontrol", "requeue", job])
    info = slurm.wait_job(job, timeout=JOB_TIMEOUT + 60)
    log = job_log(store, job)
    assert int(info.get("Restarts", 0)) >= 1, info
    assert "restart 1:" in log and "icl-sweep: resuming" in log, log[-3000:]
    assert_job_ok(slurm, job, store, info)
    assert_complete(exp)
    assert_no_leftovers(slurm)
    assert not list(Path("/tmp").glob(f"ray_{job}_*")), "the job's Ray temp dirs were not removed"
