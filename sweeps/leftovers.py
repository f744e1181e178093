"""What a killed driver's embedded Ray leaves running, and its removal by the next driver.

A driver stopped by SIGINT or SIGTERM shuts its embedded Ray down. One killed by SIGKILL
cannot: its raylet and GCS follow it, but Ray's two agents (``ray::DashboardAgent``,
``ray::RuntimeEnvAgent``) live on as orphans, under names that say nothing about the sweep.
Every process of a Ray instance keeps its log files open in that instance's session
directory (``/tmp/ray/session_<time>_<pid>``, unique), so the driver records it, with the
host, in ``STORAGE/NAME/.icl-sweep-ray.json`` once it holds the experiment's lock, and
removes the record after ``ray.shutdown()``. The next driver of the experiment, once it
holds the lock (so that driver is gone), ends the processes of the recorded session on this
host and forgets it.

Why the record alone is never enough to kill anything: it is a file in the experiment
directory, and whoever can write there (or sent you the directory) can name any process.
A process is ended only if all of these hold:

- the recorded session directory is a Ray session directory (``session_<date>_<time>_<pid>``,
  by name), a real directory owned by this user, and not the session of this driver's own Ray;
- it holds the owner mark the recording driver wrote into it (``icl-sweep-owner.json``, a file
  owned by this user: Ray makes session directories writable by everyone, but nobody else
  can make a file that is ours), naming this experiment's resolved path and the random nonce
  that is also in the record, so a record cannot point at another experiment's Ray, or at a
  Ray that icl-sweep did not start;
- the process belongs to this user, is not this process or pid 1, runs a Ray program by its
  command line (``ray::...``, ``raylet``, ``gcs_server``, a script of the ``ray`` package), and
  names that session directory in its command line or holds a file in it open.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import stat
from pathlib import Path
from typing import Any

from icl.io import atomic_write
from icl.layout import RAY_OWNER_MARK as OWNER, ExperimentDir
from sweeps.procs import kill_pids, ray_processes_of

SESSION_NAME = re.compile(r"^session_\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d_\d+_\d+$")



def record(exp_dir: Path, session: str) -> None:
    """Note this driver's embedded Ray in the experiment and mark the Ray session as this
    experiment's (call while holding the experiment's lock)."""
    nonce = secrets.token_hex(16)
    owner = {"experiment": str(Path(exp_dir).resolve()), "nonce": nonce, "driver_pid": os.getpid()}
    atomic_write(Path(session) / OWNER, json.dumps(owner) + "\n")
    text = json.dumps({"session_dir": session, "host": socket.gethostname(), "driver_pid": os.getpid(), "nonce": nonce})
    atomic_write(ExperimentDir(exp_dir).ray_record, text + "\n")


def forget(exp_dir: Path) -> None:
    ExperimentDir(exp_dir).ray_record.unlink(missing_ok=True)


def _not_ours(session: Any, exp_dir: Path, nonce: Any, own_session: str | None) -> str:
    """Why the recorded ``session`` is not provably this experiment's embedded Ray ('' if it is)."""
    if not isinstance(session, str) or not os.path.isabs(session) or not SESSION_NAME.match(Path(session).name):
        return "it does not name a Ray session directory"
    if own_session and os.path.realpath(session) == os.path.realpath(own_session):
        return "it names this driver's own Ray"
    try:
        st = os.lstat(session)
    except OSError:
        return "that directory is gone"
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        return "that directory is not a directory of this user"
    mark = Path(session) / OWNER
    try:
        mst = os.lstat(mark)
        if not stat.S_ISREG(mst.st_mode) or mst.st_uid != os.getuid():
            return "its owner mark is not a file of this user"
        owner = json.loads(mark.read_text())
    except (OSError, ValueError):
        return "it holds no owner mark of icl-sweep"
    if not isinstance(owner, dict) or owner.get("experiment") != str(Path(exp_dir).resolve()) \
            or not isinstance(nonce, str) or owner.get("nonce") != nonce:
        return "its owner mark names another experiment"
    return ""


def stop_leftovers(exp_dir: Path, own_session: str | None = None) -> str:
    """End what a dead driver's embedded Ray left on this host (call while holding the
    experiment's lock; ``own_session``: this driver's Ray, never touched); returns a line
    saying what was done, or '' if nothing was left."""
    path = ExperimentDir(exp_dir).ray_record
    try:
        left = json.loads(path.read_text())
        session = left["session_dir"]
    except FileNotFoundError:
        return ""
    except (OSError, ValueError, KeyError, TypeError):  # torn or unreadable: nothing to go by
        path.unlink(missing_ok=True)
        return ""
    path.unlink(missing_ok=True)
    if left.get("host") != socket.gethostname():
        return f"a driver killed on {left.get('host')} may have left its Ray ({session}) running there"
    why = _not_ours(session, exp_dir, left.get("nonce"), own_session)
    if why == "that directory is gone":  # a reboot cleared it: nothing of it can be running
        return ""
    if why:
        return f"ignored the record of a previous driver's Ray in {path.name} ({why}); nothing was stopped"
    pids = ray_processes_of(session)
    kill_pids(pids)
    if not pids:
        return ""
    return (f"stopped {len(pids)} process(es) left by the embedded Ray of a killed driver "
            f"(pid {left.get('driver_pid')}, {session}): {', '.join(map(str, sorted(pids)))}")
