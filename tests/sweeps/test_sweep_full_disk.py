"""``icl-sweep`` on a full disk: the experiment's storage on a small tmpfs made by the test.

Promise (the README's error boundary): one ``error:`` line naming the path, or the end-of-
sweep summary with the trials that stopped; never a traceback; after space is freed the
same command continues the experiment.
"""

from __future__ import annotations

import time
from pathlib import Path

from disk_helpers import fill

from sweep_helpers import read_results, run_cli, start_cli, wait_for

SPEC = """name: disk
base: tiny
overrides:
  train.steps: {steps}
  train.eval_every: 50
  train.checkpoint_every: 100
  train.threads: 1
grid:
  seed: [0]
resources: {{cpu: 1, gpu: 0}}
max_failures: 0
storage: unused
"""


def spec(tmp_path: Path, steps: int) -> Path:
    path = tmp_path / "disk.yaml"
    path.write_text(SPEC.format(steps=steps))
    return path


def error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


def test_a_sweep_started_on_a_full_disk_is_one_error_line_naming_the_path(tmpfs, ray_head, driver_env: dict,
                                                                          tmp_path: Path):
    disk = tmpfs("2m")
    filler = fill(disk)
    args = [str(spec(tmp_path, 100)), "--storage", str(disk), "--address", ray_head.address, "--no-analysis"]
    proc = run_cli(args, driver_env)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    line = error_line(proc.stderr)
    assert "No space left on device" in line and "free space" in line and f"cannot write {disk}" in line
    filler.unlink()
    proc = run_cli(args, driver_env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert read_results(disk / "disk")["step"].max() == 100


def test_a_disk_filling_up_during_a_sweep_stops_its_trials_with_a_summary(
    tmpfs, ray_head, driver_env: dict, tmp_path: Path
):
    disk = tmpfs("8m")
    args = [str(spec(tmp_path, 600)), "--storage", str(disk), "--address", ray_head.address, "--no-analysis"]
    log = tmp_path / "driver.log"
    driver = start_cli(args, driver_env, log)
    try:
        first = lambda: any((disk / "disk").glob("t000*/run/checkpoints/step_000000100"))  # noqa: E731
        assert wait_for(first, timeout=240), log.read_text()[-3000:]
        filler = fill(disk)
        driver.wait(timeout=300)
    finally:
        driver.kill()
    text = log.read_text()
    assert driver.returncode in (1, 2) and "Traceback" not in text, text[-3000:]
    assert "icl-sweep: 0/1 models finished" in text and "No space left on device" in text, text[-3000:]
    filler.unlink()
    time.sleep(1)
    proc = run_cli(args, driver_env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert read_results(disk / "disk")["step"].max() == 600
