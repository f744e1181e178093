"""Finding and ending processes of this user by what they carry (Linux ``/proc``).

Why by a marker and not by name: Ray's processes retitle themselves (``ray::DashboardAgent``,
which also overwrites part of what ``/proc`` shows of their environment) and outlive a
killed parent as orphans, and other Ray users may share the machine. A process is found
exactly by a unique path it was started with or holds open (a Ray session directory: its
daemons name it in their arguments, every Ray process keeps its logs there open), or by a
unique value in its environment (for processes that do not retitle themselves), and
nothing else is touched.
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
    """Processes (not this one) whose command line, environment or an open file's path
    contains ``text`` (a unique path: a Ray session or temp directory appears in its daemons'
    arguments, and every Ray process, retitled ones too, keeps its log files there open)."""
    needle = text.encode()
    found = []
    for pid in _pids():
        if pid == os.getpid():
            continue
        proc = PROC / str(pid)
        try:
            if needle in (proc / "cmdline").read_bytes() or needle in (proc / "environ").read_bytes():
                found.append(pid)
                continue
            fds = list((proc / "fd").iterdir())
        except OSError:  # gone, or another user's
            continue
        for fd in fds:
            try:
                if text in os.readlink(fd):
                    found.append(pid)
                    break
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
