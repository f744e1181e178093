"""A real SLURM cluster on localhost, for tests: munged, slurmctld and one or two slurmd.

Everything lives under one temporary directory (config, MUNGE key and socket, state, spool,
logs); the daemons run in the foreground as children of this process and are stopped at
teardown by their own process ids, never by name. Nothing of the machine's own SLURM or
MUNGE setup (``/etc/slurm``, ``/etc/munge``, system services) is read, written or touched:
clients find this cluster through ``SLURM_CONF``, which :attr:`LocalSlurm.env` carries.

Two compute nodes on one host: both slurmd run here, told apart by ``slurmd -N NAME`` and
their own ``Port``, so a job can ask for ``--nodes 2`` and ``srun -w n2`` really lands on a
second slurmd. When this SLURM build cannot run two slurmd, the cluster falls back to one
node and says so (:attr:`LocalSlurm.notes`).

Usage from Python (the pytest fixture in ``tests/slurm/test_slurm.py`` does this)::

    with LocalSlurm() as slurm:
        job = slurm.sbatch(["--wrap", "hostname"])
        slurm.wait_job(job, timeout=60)

From the shell, a self-test (starts the cluster, runs a tiny ``sbatch --wrap`` job on each
node, tears down) or an interactive cluster (prints ``export SLURM_CONF=...``, stops on
Ctrl-C)::

    python slurm/tests/cluster.py selftest
    python slurm/tests/cluster.py up

:func:`ensure_slurm` installs SLURM and MUNGE with ``slurm/tests/install.sh`` when they
are missing, or raises :class:`SlurmUnavailable` with the reason (not root, no apt-get,
install failed) for the caller to skip on.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
INSTALL_SH = HERE / "install.sh"
SBIN = ("/usr/sbin", "/sbin")
# Job states after which a job will not run again on its own.
FINAL_STATES = {
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
    "BOOT_FAIL", "DEADLINE", "PREEMPTED",
}


class SlurmUnavailable(Exception):
    """SLURM cannot be set up on this machine; the message says why (a reason to skip)."""


def _which(exe: str) -> str | None:
    return shutil.which(exe) or shutil.which(exe, path=os.pathsep.join(SBIN))


def ensure_slurm(install: bool = True) -> None:
    """Make sure slurmctld, slurmd, the client commands and munged are installed.

    Installs them (``install.sh``: apt-get, as root) when missing and ``install`` is true.
    Raises :class:`SlurmUnavailable` when they are missing and cannot be installed.
    """
    needed = ["slurmctld", "slurmd", "sbatch", "srun", "scontrol", "sinfo", "squeue",
              "scancel", "munged", "munge"]
    missing = [exe for exe in needed if _which(exe) is None]
    if not missing:
        return
    if not install:
        raise SlurmUnavailable(f"SLURM/MUNGE not installed (missing: {', '.join(missing)})")
    if os.geteuid() != 0:
        raise SlurmUnavailable(
            f"SLURM/MUNGE not installed (missing: {', '.join(missing)}) and not root, "
            "so slurm/tests/install.sh cannot apt-get them")
    if shutil.which("apt-get") is None:
        raise SlurmUnavailable(
            f"SLURM/MUNGE not installed (missing: {', '.join(missing)}) and no apt-get")
    proc = subprocess.run(["bash", str(INSTALL_SH)], capture_output=True, text=True,
                          timeout=900)
    if proc.returncode != 0:
        tail = " | ".join((proc.stdout + proc.stderr).strip().splitlines()[-5:])
        raise SlurmUnavailable(f"slurm/tests/install.sh failed (status {proc.returncode}): {tail}")
    still = [exe for exe in needed if _which(exe) is None]
    if still:
        raise SlurmUnavailable(f"still missing after install: {', '.join(still)}")


def _die_with_parent() -> None:
    """In a daemon before exec: SIGTERM it when this harness process dies, however it dies
    (a test run killed by a CI timeout must not leave daemons behind)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _machine() -> tuple[int, int]:
    """(CPUs, RealMemory in MiB) of this machine, as slurmd itself reports them."""
    cpus, mem = os.cpu_count() or 1, 1024
    try:
        out = subprocess.run([_which("slurmd") or "slurmd", "-C"], capture_output=True,
                             text=True, timeout=30).stdout
        cpus = int(re.search(r"\bCPUs=(\d+)", out).group(1))
        mem = int(re.search(r"\bRealMemory=(\d+)", out).group(1))
    except Exception:  # noqa: BLE001 - fall back to what Python sees
        try:
            mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
        except (ValueError, OSError):
            pass
    return cpus, mem


def parse_kv(text: str) -> dict[str, str]:
    """``scontrol show ... -o`` output (``Key=Value Key=Value``) as a dict."""
    out: dict[str, str] = {}
    for m in re.finditer(r"(\w[\w:/]*)=(\S*)", text):
        out.setdefault(m.group(1), m.group(2))
    return out


class LocalSlurm:
    """munged + slurmctld + slurmd (one or two nodes) on localhost, under a temp dir.

    ``nodes``: compute nodes wanted (2 needs a slurmd that can run twice on one host; the
    cluster falls back to 1 and records why in :attr:`notes`). ``cpus_per_node`` defaults to
    this machine's CPUs (each node reports them all: the nodes share the host).
    ``gpus_per_node``: a count-only ``gpu`` GRES on every node (no device files), so that
    partition queries and GPU requests behave as on a GPU cluster; nothing uses a GPU.
    """

    def __init__(self, nodes: int = 2, cpus_per_node: int | None = None,
                 gpus_per_node: int = 2, partition: str = "debug",
                 root: str | os.PathLike | None = None, keep: bool = False,
                 cred_expire: int = 10):
        self.requested_nodes = nodes
        cpus, mem = _machine()
        self.cpus_per_node = cpus_per_node or cpus
        self.mem_per_node = max(256, mem // max(nodes, 1))
        self.gpus_per_node = gpus_per_node
        self.partition = partition
        self.cred_expire = cred_expire
        self.keep = keep
        # Short root: the MUNGE socket path must stay well under 108 bytes.
        self.root = Path(root) if root else Path(tempfile.mkdtemp(prefix="icl-slurm-", dir="/tmp"))
        self.procs: dict[str, subprocess.Popen] = {}
        self.node_names: list[str] = []
        self.notes: list[str] = []
        self.host = socket.gethostname().split(".")[0]
        self.conf = self.root / "etc" / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.sock"
        self.env = dict(os.environ)
        self.env["SLURM_CONF"] = str(self.conf)
        self.env["PATH"] = os.pathsep.join([self.env.get("PATH", ""), *SBIN])
        for var in list(self.env):  # a surrounding SLURM job must not leak into ours
            if var.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")) and var != "SLURM_CONF":
                del self.env[var]

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> "LocalSlurm":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout: float = 90) -> None:
        for sub in ("etc", "munge", "state", "spool", "run", "log", "jobs"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)  # job steps run as root anyway; logs readable
        os.chmod(self.root / "munge", 0o700)
        self._start_munge(timeout)
        names = ["n1", "n2"][: max(1, min(self.requested_nodes, 2))]
        ports = {name: _free_port() for name in names}
        self._write_conf(names, ports)
        self._start("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        self._wait(lambda: self._ok(["scontrol", "ping"], "UP"), timeout,
                   "slurmctld did not come up", "slurmctld")
        started = []
        for name in names:
            self._start(f"slurmd-{name}", [_which("slurmd"), "-D", "-f", str(self.conf), "-N", name])
            started.append(name)
            try:
                self._wait(lambda n=name: self._node_ready(n), timeout / 2,
                           f"slurmd for node {name} did not register", f"slurmd-{name}")
            except RuntimeError as e:
                if name == names[0]:
                    raise
                # Second slurmd on one host refused: fall back to one node.
                self.notes.append(f"second compute node unavailable ({e}); running with 1 node")
                self._stop_proc(f"slurmd-{name}")
                started.remove(name)
                self._write_conf(started, ports)
                self.run(["scontrol", "reconfigure"], check=False)
                break
        self.node_names = started

    def _start_munge(self, timeout: float) -> None:
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        d = self.root / "munge"
        self._start("munged", [
            _which("munged"), "--foreground", "--force",
            f"--socket={self.munge_socket}", f"--key-file={key}",
            f"--pid-file={d / 'munged.pid'}", f"--log-file={self.root / 'log' / 'munged.log'}",
            f"--seed-file={d / 'munged.seed'}", "--num-threads=4",
        ])
        self._wait(lambda: self._munge_ok(), timeout, "munged did not come up", "munged")

    def _munge_ok(self) -> bool:
        if not self.munge_socket.exists():
            return False
        enc = subprocess.run([_which("munge"), "-n", "-S", str(self.munge_socket)],
                             capture_output=True, timeout=10)
        if enc.returncode != 0:
            return False
        dec = subprocess.run([_which("unmunge") or "unmunge", "-S", str(self.munge_socket)],
                             input=enc.stdout, capture_output=True, timeout=10)
        return dec.returncode == 0

    def _write_conf(self, names: list[str], ports: dict[str, int]) -> None:
        r = self.root
        if not hasattr(self, "_ctld_port"):
            self._ctld_port = _free_port()
        gres = f" Gres=gpu:{self.gpus_per_node}" if self.gpus_per_node else ""
        lines = [
            "# Written by slurm/tests/cluster.py for a throwaway test cluster.",
            "ClusterName=icltest",
            f"SlurmctldHost={self.host}(127.0.0.1)",
            f"SlurmctldPort={self._ctld_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # cred_expire also sets how long a requeued job waits before it may start
            # again (default 120 s); short here so requeue tests stay quick.
            f"AuthInfo=socket={self.munge_socket},cred_expire={self.cred_expire}",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}/%n",
            f"SlurmctldPidFile={r / 'run' / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'run'}/slurmd-%n.pid",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={r / 'log'}/slurmd-%n.log",
            f"PlugStackConfig={r / 'etc' / 'plugstack.conf'}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            # No cgroups: containers often cannot delegate them; linuxproc tracks a job's
            # processes through their parent ids, which is enough to clean up after it.
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "SwitchType=switch/none",
            "MpiDefault=none",
            "SchedulerType=sched/backfill",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SlurmdParameters=config_overrides",
            "ReturnToService=2",
            "JobRequeue=1",
            "KillWait=10",
            "MinJobAge=3600",
            "InactiveLimit=0",
            "SlurmdTimeout=60",
            "BatchStartTimeout=30",
            "GresTypes=gpu",
            "MailProg=/bin/true",
        ]
        for name in names:
            lines.append(
                f"NodeName={name} NodeHostname={self.host} NodeAddr=127.0.0.1 Port={ports[name]}"
                f" CPUs={self.cpus_per_node} RealMemory={self.mem_per_node}{gres} State=UNKNOWN")
        lines.append(f"PartitionName={self.partition} Nodes={','.join(names)} Default=YES "
                     "MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")
        (r / "etc" / "plugstack.conf").write_text("")
        # Fake GPUs: plain files stand in for the device files (SLURM only needs a path
        # per GPU to number them); nothing ever opens them.
        (r / "dev").mkdir(exist_ok=True)
        for i in range(self.gpus_per_node):
            (r / "dev" / f"gpu{i}").touch()
        files = ",".join(str(r / "dev" / f"gpu{i}") for i in range(self.gpus_per_node))
        (r / "etc" / "gres.conf").write_text(
            f"AutoDetect=off\nName=gpu File={files}\n" if self.gpus_per_node else "")
        for name in names:
            (r / "spool" / name).mkdir(parents=True, exist_ok=True)

    def _start(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.stdout", "ab")
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=self.env,
                                            start_new_session=True, preexec_fn=_die_with_parent)
        log.close()

    def _wait(self, ready, timeout: float, what: str, proc: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            p = self.procs.get(proc)
            if p is not None and p.poll() is not None:
                raise RuntimeError(f"{what}: {proc} exited with status {p.returncode}; "
                                   f"{self.log_tail(proc)}")
            try:
                if ready():
                    return
            except (subprocess.SubprocessError, OSError):
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{what} within {timeout:.0f}s; {self.log_tail(proc)}")

    def log_tail(self, proc: str, lines: int = 8) -> str:
        texts = []
        for path in (self.root / "log" / f"{proc}.stdout", self.root / "log" / f"{proc}.log"):
            if path.exists():
                texts += path.read_text(errors="replace").strip().splitlines()[-lines:]
        return "log: " + " | ".join(texts[-lines:]) if texts else "(no log)"

    def _ok(self, cmd: list[str], needle: str) -> bool:
        p = self.run(cmd, check=False, timeout=15)
        return p.returncode == 0 and needle in p.stdout

    def _node_ready(self, name: str) -> bool:
        p = self.run(["sinfo", "-h", "-N", "-n", name, "-o", "%T"], check=False, timeout=15)
        state = p.stdout.strip().lower()
        return p.returncode == 0 and state.startswith(("idle", "mix", "alloc"))

    def stop(self) -> None:
        """Cancel every job of this cluster, stop its daemons by pid, kill job leftovers."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            try:
                jobs = self.run(["squeue", "-h", "-o", "%i"], check=False, timeout=15).stdout.split()
                if jobs:
                    self.run(["scancel", *jobs], check=False, timeout=15)
                    deadline = time.monotonic() + 40
                    while time.monotonic() < deadline and self.run(
                            ["squeue", "-h", "-o", "%i"], check=False, timeout=15).stdout.strip():
                        time.sleep(1)
            except (subprocess.SubprocessError, OSError):
                pass
        for name in [n for n in self.procs if n.startswith("slurmd")] + ["slurmctld", "munged"]:
            self._stop_proc(name)
        self.kill_leftovers()
        if not self.keep:
            shutil.rmtree(self.root, ignore_errors=True)

    def _stop_proc(self, name: str, grace: float = 15) -> None:
        p = self.procs.pop(name, None)
        if p is None or p.poll() is not None:
            return
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=10)

    def leftover_pids(self) -> list[int]:
        """Processes whose environment names this cluster's ``SLURM_CONF``, other than the
        daemons and their helpers (slurmctld's slurmscriptd): what jobs started and left."""
        marker = f"SLURM_CONF={self.conf}".encode()
        daemons = {os.getpid(), *(p.pid for p in self.procs.values())}
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) in daemons:
                continue
            try:
                environ = (entry / "environ").read_bytes()
                if marker not in environ.split(b"\0"):
                    continue
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid not in daemons:
                found.append(int(entry.name))
        return found

    def kill_leftovers(self) -> list[int]:
        pids = self.leftover_pids()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        return pids

    # ------------------------------------------------------------------ client helpers
    def run(self, cmd: list[str], check: bool = True, timeout: float = 60,
            **kw) -> subprocess.CompletedProcess:
        """Run a command against this cluster (``SLURM_CONF`` set), capturing text output."""
        p = subprocess.run(cmd, capture_output=True, text=True, env=kw.pop("env", self.env),
                           timeout=timeout, **kw)
        if check and p.returncode != 0:
            raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({p.returncode}): "
                               f"{p.stderr.strip() or p.stdout.strip()}")
        return p

    def sbatch(self, args: list[str], **kw) -> str:
        """Submit with ``sbatch --parsable ARGS``; return the job id."""
        out = self.run(["sbatch", "--parsable", *args], **kw).stdout.strip()
        return out.split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job -o JOB`` as a dict (JobState, RestartCnt, ExitCode, ...)."""
        p = self.run(["scontrol", "show", "job", "-o", str(job_id)], check=False, timeout=15)
        return parse_kv(p.stdout) if p.returncode == 0 else {}

    def wait_job(self, job_id: str, timeout: float, states=FINAL_STATES,
                 poll: float = 1.0) -> dict[str, str]:
        """Wait until the job is in one of ``states``; return its record. Raises on timeout."""
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(poll)
        raise TimeoutError(f"job {job_id} not in {sorted(states)} after {timeout:.0f}s: "
                           f"state {info.get('JobState')} ({info.get('Reason')})")


def _selftest(args) -> int:
    ensure_slurm(install=not args.no_install)
    t0 = time.monotonic()
    with LocalSlurm(nodes=args.nodes, keep=args.keep) as slurm:
        print(f"cluster up in {time.monotonic() - t0:.1f}s under {slurm.root}: "
              f"nodes {slurm.node_names}", *slurm.notes, sep="\n  ")
        print(slurm.run(["sinfo", "-N", "-o", "%N %T %c %G"]).stdout.strip())
        out = slurm.root / "jobs" / "selftest-%j.out"
        job = slurm.sbatch([f"--nodes={len(slurm.node_names)}", f"--output={out}",
                            "--wrap", "srun hostname; srun printenv SLURMD_NODENAME"])
        info = slurm.wait_job(job, timeout=60)
        text = Path(str(out).replace("%j", job)).read_text()
        print(f"job {job}: {info.get('JobState')} exit {info.get('ExitCode')}\n{text.strip()}")
        ok = info.get("JobState") == "COMPLETED" and all(n in text for n in slurm.node_names)
    print(f"selftest {'passed' if ok else 'FAILED'} in {time.monotonic() - t0:.1f}s")
    return 0 if ok else 1


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _up(args) -> int:
    ensure_slurm(install=not args.no_install)
    # Stop cleanly on Ctrl-C and on `kill PID` (a background shell job ignores SIGINT).
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    with LocalSlurm(nodes=args.nodes, keep=args.keep) as slurm:
        print(f"export SLURM_CONF={slurm.conf}", *slurm.notes, sep="\n")
        print("cluster up; Ctrl-C stops it", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["selftest", "up"])
    parser.add_argument("--nodes", type=int, default=2, choices=[1, 2])
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs)")
    parser.add_argument("--no-install", action="store_true", help="never apt-get")
    args = parser.parse_args(argv)
    try:
        return _selftest(args) if args.command == "selftest" else _up(args)
    except SlurmUnavailable as e:
        print(f"skipped: {e}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
