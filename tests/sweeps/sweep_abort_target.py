"""Not collected by the suite (no ``test_`` prefix): the run that
``test_sweep_cleanup.py`` starts and aborts. It starts the session's Ray cluster, says so in
the file ``ICL_ABORT_MARKER`` names (with its session's mark), and waits to be killed."""

from __future__ import annotations

import os
import time
from pathlib import Path


def test_holds_a_cluster_until_aborted(ray_head) -> None:
    Path(os.environ["ICL_ABORT_MARKER"]).write_text(os.environ["ICL_TEST_SESSION"])
    time.sleep(300)
