"""Finding and ending processes of this user by what they carry (Linux ``/proc``).

Why by a marker and not by name: Ray's processes retitle themselves (``ray::DashboardAgent``)
and outlive a killed parent as orphans, and other Ray users may share the machine. A
process started with a unique value in its environment (every child inherits it) or a
unique path on its command line is found exactly, and nothing else is touched.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

PROC = Path("/proc")


def _pids() -> list[int]:
    try:
        return [int(p.name) for p in PROC.iterdir() if p.name.isdigit()]
    except OSError:  # no /proc (not Linux): nothing can be found
        return []


def pids_with_env(name: str, value: str) -> list[int]:
    """Processes (not this one) whose environment has ``name=value``."""
    entry = f"{name}={value}".encode()
    found = []
    for pid in _pids():
        if pid == os.getpid():
            continue
        try:
            environ = (PROC / str(pid) / "environ").read_bytes()
        except OSError:  # gone, or another user's
            continue
        if entry in environ.split(b"\0"):
            found.append(pid)
    return found


def pids_mentioning(text: str) -> list[int]:
    """Processes (not this one) whose command line or environment contains ``text`` (a unique
    temporary path: a Ray temp dir appears in its daemons' arguments and, through
    ``RAY_TMPDIR``, in the environment of everything they start)."""
    needle = text.encode()
    found = []
    for pid in _pids():
        if pid == os.getpid():
            continue
        try:
            if needle in (PROC / str(pid) / "cmdline").read_bytes() or needle in (PROC / str(pid) / "environ").read_bytes():
                found.append(pid)
        except OSError:
            continue
    return found


def with_descendants(pids: list[int]) -> list[int]:
    """``pids`` and every process below them in the process tree (collect before killing:
    orphans leave the tree)."""
    children: dict[int, list[int]] = {}
    for pid in _pids():
        try:
            stat = (PROC / str(pid) / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(pid)
    out, todo = [], list(pids)
    while todo:
        pid = todo.pop()
        if pid not in out:
            out.append(pid)
            todo.extend(children.get(pid, []))
    return out


def kill_pids(pids: list[int]) -> None:
    """SIGKILL each of ``pids`` that still exists."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
