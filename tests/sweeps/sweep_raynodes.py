"""Real Ray nodes for the sweep tests: ``ray start --block`` in a process session of its own.

Why not ``ray.init()`` in the test process: the sweep drivers under test are separate
processes (they are killed with SIGKILL in some tests) and must join a cluster by address,
as on a real cluster. Each node gets its own temporary directory and its own free ports, so
several nodes (and other Ray users of this machine) coexist; ``stop()`` kills exactly the
process group the node was started in.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from sweeps.procs import kill_pids, pids_mentioning, with_descendants

READY = "Ray runtime started"


def free_port() -> int:
    """A port the kernel hands out now: from its ephemeral range, never a worker range below."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ephemeral_low() -> int:
    """The lowest port the kernel hands out for port 0 (``free_port``, Ray's own components)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def free_port_range(width: int = 200) -> tuple[int, int]:
    """A run of ``width`` ports, every one free right now (worker processes bind them), between
    Ray's default worker ports (10002-19999, an embedded Ray's) and the kernel's ephemeral range:
    no port a component of this or another node is given can fall inside it (two test sessions
    at once start nodes at once). Where the kernel hands out nearly every port, no range is safe
    from it: any free one in 20000-50000, as before."""
    low_end, high_end = 20000, ephemeral_low() - width
    if high_end <= low_end:
        high_end = 50000
    for _ in range(200):
        low = low_end + int.from_bytes(os.urandom(2), "big") % (high_end - low_end)
        if all(_bindable(port) for port in range(low, low + width)):
            return low, low + width - 1
    raise RuntimeError("no free port range")


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class RayNode:
    """One Ray node (head, or worker joining ``head_address``) owned by this test session."""

    def __init__(self, root: Path, env: dict[str, str], *, num_cpus: int, head_address: str | None = None) -> None:
        self.root = root
        self.env = env
        self.num_cpus = num_cpus
        self.head_address = head_address
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.log = root / "ray-start.log"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 90.0) -> "RayNode":
        self.root.mkdir(parents=True, exist_ok=True)
        low, high = free_port_range()
        cmd = [
            str(Path(sys.executable).with_name("ray")),
            "start",
            "--block",
            f"--num-cpus={self.num_cpus}",
            "--num-gpus=0",
            f"--temp-dir={self.root / 'tmp'}",
            f"--node-manager-port={free_port()}",
            f"--object-manager-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
            f"--min-worker-port={low}",
            f"--max-worker-port={high}",
            "--object-store-memory=200000000",
            "--disable-usage-stats",
        ]
        if self.head_address is None:
            cmd += ["--head", f"--port={self.port}", "--include-dashboard=false"]
        else:
            cmd += [f"--address={self.head_address}"]
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.root
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if READY in self.log.read_text():
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        text = self.log.read_text()
        self.stop()
        raise RuntimeError(f"ray start failed:\n{text[-3000:]}")

    def pids(self) -> list[int]:
        """Processes of this node: those that name its directory or hold a file there open
        (Ray's agents and workers retitle themselves ``ray::...``), and their descendants."""
        return with_descendants(pids_mentioning(str(self.root)))

    def kill(self) -> None:
        """SIGKILL every process of this node: a node lost without warning."""
        doomed = self.pids()  # before anything dies: orphans leave the process tree
        kill_pids(doomed)
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=30)
        kill_pids(self.pids())

    def stop(self) -> None:
        """End the node for good (test teardown): SIGKILL its processes, found by pid."""
        self.kill()
        self.proc = None
