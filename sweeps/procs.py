"""Finding and ending processes of this user by what they carry (Linux ``/proc``).

Why by a marker and not by name: Ray's processes retitle themselves (``ray::DashboardAgent``,
which also overwrites part of what ``/proc`` shows of their environment) and outlive a
killed parent as orphans, and other Ray users may share the machine. A process is found
exactly by a unique path it was started with or holds open (a Ray session directory: its
daemons name it in their arguments, every Ray process keeps its logs there open), or by a
unique value in its environment (for processes that do not retitle themselves), and
nothing else is touched.

:func:`ray_processes_of` is what the sweep driver kills by (``sweeps.leftovers``): only
processes of this user that run a Ray program and name or hold open a file of one session
directory. The broader :func:`pids_mentioning` and :func:`pids_with_env` are for the test
suite's cleanup of the folders and environment values it made itself.
"""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

PROC = Path("/proc")
# A Ray program, by the first words of its command line: a retitled worker or agent
# (ray::IDLE, ray::DashboardAgent), Ray's daemons, or a script of the ray package.
RAY_PROGRAM = re.compile(r"^ray::|/ray/core/src/ray/(raylet/raylet|gcs/gcs_server)$|/ray/[\w/]+\.py$")


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
            if (needle in (proc / "cmdline").read_bytes() or needle in (proc / "environ").read_bytes()
                    or _holds_open(proc, lambda target: text in target)):
                found.append(pid)
        except OSError:  # gone, or another user's
            continue
    return found


def _is_ray_program(argv: list[str]) -> bool:
    return any(RAY_PROGRAM.search(arg) for arg in argv[:4])


def ray_processes_of(session: str) -> list[int]:
    """Processes of this user (never this one, pid 1 or a process another user owns) that run a
    Ray program and name ``session`` (a directory) in their arguments or hold a file below it
    open: the processes of that Ray session on this host."""
    root = os.path.realpath(session).rstrip("/")
    inside = root + "/"
    found = []
    for pid in _pids():
        if pid in (0, 1, os.getpid()):
            continue
        proc = PROC / str(pid)
        try:
            if os.stat(proc).st_uid != os.getuid():
                continue
            argv = [a.decode(errors="replace") for a in (proc / "cmdline").read_bytes().split(b"\0") if a]
            if not argv or not _is_ray_program(argv):
                continue
            if (any(inside in a or a.endswith(root) for a in argv)
                    or _holds_open(proc, lambda target: target.startswith(inside))):
                found.append(pid)
        except OSError:  # gone, or another user's
            continue
    return found


def _holds_open(proc: Path, match) -> bool:
    """Whether the process ``proc`` (its /proc folder) holds open a file whose path ``match``es
    (raises OSError when it is gone or another user's)."""
    for fd in list((proc / "fd").iterdir()):
        try:
            if match(os.readlink(fd)):
                return True
        except OSError:  # closed meanwhile
            continue
    return False


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
