"""A real multi-node Ray cluster: the session's head plus a worker node started with
``ray start --address`` on this machine. The worker is killed (SIGKILL to all its
processes) while trials run on it; they are retried on the head from their checkpoints and
the sweep's results equal the uninterrupted reference."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
from sweep_helpers import STEPS, read_results, short_tmpdir, start_cli, wait_for, without_timing
from sweep_raynodes import RayNode

from sweeps import results as res
from sweeps.spec import expand, load_spec

TRIALS = expand(load_spec("smoke"))


@pytest.mark.ray_cluster
def test_trials_finish_on_the_head_when_a_worker_node_dies(
    ray_head: RayNode, driver_env: dict, reference: pd.DataFrame, tmp_path: Path
) -> None:
    root = short_tmpdir("icl-rayworker-")
    worker = RayNode(root / "worker", ray_head.env, num_cpus=2, head_address=ray_head.address).start()
    try:
        exp = tmp_path / "smoke"
        log = tmp_path / "driver.log"
        # 4 trials of 1 CPU on 2 + 2 CPUs: two of them must run on the worker node
        driver = start_cli(["smoke", "--storage", str(tmp_path), "--address", ray_head.address, "--no-analysis"], driver_env, log)

        def on_worker_between_checkpoints() -> list[str]:
            pids = set(worker.pids())
            hit = []
            for t in TRIALS:
                tries = res.attempts(exp, t)
                run = res.run_dir(exp, t)
                if tries and tries[-1]["pid"] in pids and 0 < run.latest_step() < STEPS:
                    hit.append(t.trial_id)
            return hit

        assert wait_for(lambda: bool(on_worker_between_checkpoints()), 180), log.read_text()[-3000:]
        victims = on_worker_between_checkpoints()
        worker_node = {res.attempts(exp, t)[-1]["node_id"] for t in TRIALS if t.trial_id in victims}
        worker.kill()  # the node is lost: raylet, agents and the trials' processes

        assert driver.wait(timeout=240) == 0, log.read_text()[-4000:]
        text = log.read_text()
        assert "4/4 models finished, 0 failed" in text
        pd.testing.assert_frame_equal(without_timing(read_results(exp)), without_timing(reference))
        for t in TRIALS:
            if t.trial_id in victims:
                tries = res.attempts(exp, t)
                last = tries[-1]
                assert last["node_id"] not in worker_node, tries  # finished on the head
                assert last["resumed_from_step"] >= 100, tries  # from its checkpoint
        assert not worker.pids()
    finally:
        worker.stop()
        shutil.rmtree(root, ignore_errors=True)
