"""A run's TensorBoard event file: appended during a process, rebuilt from the run's rows at
its first write in a process (a resume), and left consistent by a rebuild that crashed; the
same with either writer package (each tested where it is installed); without one, a run
says so once and writes none. (The file of a real resumed run is checked in
test_train_run.py; a training without tensorboardX in tests/benchmarks/test_gpu_session.py.)"""

from pathlib import Path

import numpy as np
import pytest

from icl.train import tensorboard
from icl.layout import EVENTS_GLOB, TB_REBUILD_PREFIX
from icl.train.tensorboard import WRITERS, EventLog, load_writer, read_events, tag


@pytest.fixture(params=WRITERS)
def package(request, monkeypatch) -> str:
    """Every event file of the test written (and read) with this package's writer."""
    chosen = load_writer(request.param)
    if chosen is None:
        pytest.skip(f"{request.param} is not installed here")
    monkeypatch.setattr(tensorboard, "writer", lambda: chosen)
    return request.param


def rows(steps: list[int]) -> tuple[list[dict[str, float]], list[np.ndarray]]:
    made = [{"step": s, "train_loss": 1.0 / s, "icl_acc": s / 1000, "attn_L0_induction": 0.5, "wall_s": s / 10}
            for s in steps]
    heads = [np.full((2, 4, 5), s / 1000, dtype=np.float32) for s in steps]
    return made, heads


def series(run: Path, name: str) -> list[tuple[int, float]]:
    return read_events(run)[name]


def test_tags_group_the_columns() -> None:
    assert [tag(c) for c in ("train_loss", "lr", "icl_acc", "ciwl_acc", "attn_L3_prev_tok", "wall_s")] == [
        "train/train_loss", "train/lr", "eval/icl_acc", "eval/ciwl_acc", "attention/attn_L3_prev_tok", "timing/wall_s"]


def test_appends_within_a_process_and_rebuilds_on_a_resume(tmp_path: Path, package: str) -> None:
    log = EventLog(tmp_path)
    log.sync(*rows([10, 20]))
    log.sync(*rows([10, 20, 30]))  # an evaluation: appended to the same file
    (first,) = tmp_path.glob(EVENTS_GLOB)
    assert [s for s, _ in series(tmp_path, "eval/icl_acc")] == [10, 20, 30]
    log.close()

    # the next process resumes from the step-20 checkpoint: step 30 is dropped, then trained again
    again = EventLog(tmp_path)
    again.sync(*rows([10, 20]))
    again.sync(*rows([10, 20, 30, 40]))
    again.close()
    assert len(list(tmp_path.glob(EVENTS_GLOB))) == 1
    assert series(tmp_path, "eval/icl_acc") == [(s, np.float32(s / 1000)) for s in (10, 20, 30, 40)]
    assert [(s, h.num, h.max) for s, h in series(tmp_path, "heads/L1_induction")] == [
        (s, 4, np.float32(s / 1000)) for s in (10, 20, 30, 40)]


def test_a_crashed_rebuild_leaves_nothing_the_next_one_keeps(tmp_path: Path, package: str) -> None:
    log = EventLog(tmp_path)
    log.sync(*rows([10, 20, 30]))
    log.close()
    # killed while rebuilding: a half-written temporary; and a stray older event file
    (tmp_path / f"{TB_REBUILD_PREFIX}123-abc").mkdir()
    (tmp_path / f"{TB_REBUILD_PREFIX}123-abc" / "events.out.tfevents.1.host").write_bytes(b"\x00" * 7)
    (tmp_path / "events.out.tfevents.0.other").write_bytes(next(tmp_path.glob(EVENTS_GLOB)).read_bytes())
    resumed = EventLog(tmp_path)
    resumed.sync(*rows([10, 20]))
    resumed.close()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(TB_REBUILD_PREFIX)] == []
    assert len(list(tmp_path.glob(EVENTS_GLOB))) == 1
    assert [s for s, _ in series(tmp_path, "train/train_loss")] == [10, 20]


def test_without_a_writer_runs_say_so_once_and_write_no_events(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(tensorboard, "writer", lambda: None)
    tensorboard.say_no_writer.cache_clear()
    for run in ("a", "b"):  # two runs of one process (a pack), each recording twice
        log = EventLog(tmp_path / run)
        log.sync(*rows([10]))
        log.sync(*rows([10, 20]))
        log.close()
    assert capsys.readouterr().err.count("no TensorBoard events are written") == 1
    assert list(tmp_path.rglob(EVENTS_GLOB)) == []
    with pytest.raises(ModuleNotFoundError, match="pip install tensorboard"):
        read_events(tmp_path / "a")
