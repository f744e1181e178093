"""What a killed driver's embedded Ray leaves running, and its removal by the next driver.

A driver stopped by SIGINT or SIGTERM shuts its embedded Ray down. One killed by SIGKILL
cannot: its raylet and GCS follow it, but Ray's two agents (``ray::DashboardAgent``,
``ray::RuntimeEnvAgent``) live on as orphans, under names that say nothing about the sweep.
Every process of a Ray instance keeps its log files open in that instance's session
directory (``/tmp/ray/session_<time>_<pid>``, unique), so the driver records it, with the
host, in ``STORAGE/NAME/.icl-sweep-ray.json`` once it holds the experiment's lock, and
removes the record after ``ray.shutdown()``. The next driver of the experiment, once it
holds the lock (so that driver is gone), ends the processes of the recorded session on this
host (``sweeps.procs.pids_mentioning``) and forgets it.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from icl.io import atomic_write
from icl.layout import ExperimentDir
from sweeps.procs import kill_pids, pids_mentioning, with_descendants


def session_dir() -> str | None:
    """The session directory of the Ray this process started (None: not known)."""
    import ray

    node = getattr(ray._private.worker, "_global_node", None)  # no public API names it
    return node.get_session_dir_path() if node is not None else None


def record(exp_dir: Path, session: str) -> None:
    """Note this driver's embedded Ray in the experiment (call while holding its lock)."""
    text = json.dumps({"session_dir": session, "host": socket.gethostname(), "driver_pid": os.getpid()})
    atomic_write(ExperimentDir(exp_dir).ray_record, text + "\n")


def forget(exp_dir: Path) -> None:
    ExperimentDir(exp_dir).ray_record.unlink(missing_ok=True)


def stop_leftovers(exp_dir: Path) -> str:
    """End what a dead driver's embedded Ray left on this host (call while holding the
    experiment's lock); returns a line saying what was done, or '' if nothing was left."""
    path = ExperimentDir(exp_dir).ray_record
    try:
        left = json.loads(path.read_text())
        session = str(left["session_dir"])
    except FileNotFoundError:
        return ""
    except (OSError, ValueError, KeyError, TypeError):  # torn or unreadable: nothing to go by
        path.unlink(missing_ok=True)
        return ""
    path.unlink(missing_ok=True)
    if left.get("host") != socket.gethostname():
        return f"a driver killed on {left.get('host')} may have left its Ray ({session}) running there"
    if "session_" not in Path(session).name:  # never match a broad path
        return ""
    pids = with_descendants(pids_mentioning(session))
    kill_pids(pids)
    if not pids:
        return ""
    return (f"stopped {len(pids)} process(es) left by the embedded Ray of a killed driver "
            f"(pid {left.get('driver_pid')}, {session}): {', '.join(map(str, sorted(pids)))}")
