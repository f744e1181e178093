"""Not collected by the suite (no ``test_`` prefix): the run that
``test_sweep_cleanup.py`` starts and aborts. It starts the session's Ray cluster, says so in
the file ``ICL_ABORT_MARKER`` names (with its session's mark and the node's folder), and
waits to be killed."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path


def test_holds_a_cluster_until_aborted(ray_head) -> None:
    started = {"session": os.environ["ICL_TEST_SESSION"], "root": str(ray_head.root)}
    Path(os.environ["ICL_ABORT_MARKER"]).write_text(json.dumps(started))
    time.sleep(300)
