"""Not collected by the suite (no ``test_`` prefix): the run that
``test_sweep_cleanup.py`` starts and aborts. It starts the session's Ray cluster, says so in
the file ``ICL_ABORT_MARKER`` names (with its session's mark and the node's folder), and
waits to be killed. SIGUSR1 writes where each of its threads is to the marker's ``.stacks``
file (the test asks for it when the run does not end after its signal; pytest captures stderr)."""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import time
from pathlib import Path

STACKS = open(os.environ["ICL_ABORT_MARKER"] + ".stacks", "a")  # noqa: SIM115 (open while the run lives)
faulthandler.register(signal.SIGUSR1, file=STACKS, all_threads=True)


def test_holds_a_cluster_until_aborted(ray_head) -> None:
    started = {"session": os.environ["ICL_TEST_SESSION"], "root": str(ray_head.root)}
    Path(os.environ["ICL_ABORT_MARKER"]).write_text(json.dumps(started))
    time.sleep(300)
