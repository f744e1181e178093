"""What a killed driver's embedded Ray leaves running, and its removal by the next driver.

A driver stopped by SIGINT or SIGTERM shuts its embedded Ray down. One killed by SIGKILL
cannot: its raylet and GCS follow it, but Ray's two agents (``ray::DashboardAgent``,
``ray::RuntimeEnvAgent``) live on as orphans, under names that say nothing about the
sweep. So the driver marks its embedded Ray: a unique value in ``ICL_SWEEP_RAY`` in its
environment before ``ray.init`` (every Ray process inherits it), recorded with the host in
``STORAGE/NAME/.icl-sweep-ray.json`` once the driver holds the experiment's lock, and
removed after ``ray.shutdown()``. The next driver of the experiment, once it holds the lock
(so that driver is gone), ends the recorded Ray's processes on this host and forgets it.
"""

from __future__ import annotations

import json
import os
import socket
import uuid
from pathlib import Path

from icl.io import atomic_write
from sweeps.procs import kill_pids, pids_with_env, with_descendants

RECORD = ".icl-sweep-ray.json"
TAG_ENV = "ICL_SWEEP_RAY"


def mark_embedded_ray() -> str:
    """A unique mark in this process's environment, inherited by the Ray it starts next."""
    tag = uuid.uuid4().hex
    os.environ[TAG_ENV] = tag
    return tag


def record(exp_dir: Path, tag: str) -> None:
    """Note this driver's embedded Ray in the experiment (call while holding its lock)."""
    text = json.dumps({"tag": tag, "host": socket.gethostname(), "driver_pid": os.getpid()})
    atomic_write(Path(exp_dir) / RECORD, text + "\n")


def forget(exp_dir: Path) -> None:
    (Path(exp_dir) / RECORD).unlink(missing_ok=True)


def stop_leftovers(exp_dir: Path) -> str:
    """End what a dead driver's embedded Ray left on this host (call while holding the
    experiment's lock); returns a line saying what was done, or '' if nothing was left."""
    path = Path(exp_dir) / RECORD
    try:
        left = json.loads(path.read_text())
    except FileNotFoundError:
        return ""
    except (OSError, ValueError):  # torn or unreadable: nothing to go by
        path.unlink(missing_ok=True)
        return ""
    if left.get("host") != socket.gethostname():
        path.unlink(missing_ok=True)
        return (f"a driver killed on {left.get('host')} may have left its Ray running there "
                f"(processes with {TAG_ENV}={left.get('tag')} in their environment)")
    pids = with_descendants(pids_with_env(TAG_ENV, str(left.get("tag"))))
    kill_pids(pids)
    path.unlink(missing_ok=True)
    if not pids:
        return ""
    return (f"stopped {len(pids)} process(es) left by the embedded Ray of a killed driver "
            f"(pid {left.get('driver_pid')}): {', '.join(map(str, sorted(pids)))}")
