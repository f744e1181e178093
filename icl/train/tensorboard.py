"""TensorBoard event files of a run, kept equal to its ``metrics.csv``.

Every run directory holds one event file (``events.out.tfevents.*``) beside its
``metrics.csv``: every column as a scalar (tags grouped for TensorBoard's dashboard:
``train/train_loss``, ``eval/icl_acc``, ``attention/attn_L0_induction``, ``timing/wall_s``;
a column a new evaluator adds lands under ``eval/``) and the per-head attention scores of
``attention.npz`` as histograms over heads (``heads/L0_induction``). TensorBoard names a run
by its directory, so ``tensorboard --logdir STORAGE/NAME`` shows one run per model, named by
its grid cell (``t003_num_classes=100_weight_decay=0.1_seed=0/run``).

Why rebuild rather than append across processes: a resumed run drops the rows written after
its checkpoint and trains them again; appending would show those steps twice. So the first
write in a process (a start, a resume) rebuilds the file from the rows the run holds, and
later evaluations are appended. A rebuild writes into a temporary folder first and replaces
the old file only when the new one is complete; a crash in between leaves at most a stray
temporary (removed by the next rebuild) or no event file, and the next open rebuilds anyway.

Written synchronously (no writer thread per model; a flush puts every event on disk) by
whichever writer is importable, looked up at the first write, not at import: tensorboardX's
``EventsWriter`` (it comes with ``ray[tune]``), else the ``tensorboard`` package's record
writer (what ``torch.utils.tensorboard`` writes with; the GPU machines have it, not
tensorboardX). With neither, training goes on without event files and says so once.
"""

from __future__ import annotations

import functools
import os
import shutil
import socket
import struct
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Sequence

import numpy as np

from icl.layout import EVENTS_GLOB, EVENTS_PREFIX, TB_REBUILD_PREFIX
from icl.metrics import ATTN_STATS, STEP, WALL_S, group
from icl.train.hparams import hparams_summaries, with_peak_icl


@dataclass(frozen=True)
class Writer:
    """What writing and reading event files takes, from one package."""

    package: str
    events_writer: Callable[[str], Any]  # file prefix -> an object with write_event, flush, close
    event_pb2: ModuleType
    summary_pb2: ModuleType
    histogram: Callable[..., Any]  # (tag, values, bins) -> a Summary holding one histogram


class RecordEventsWriter:
    """tensorboardX's ``EventsWriter`` over the ``tensorboard`` package's ``RecordWriter``: the
    same file name, the same version record first, synchronous."""

    def __init__(self, prefix: str):
        from tensorboard.compat.proto import event_pb2
        from tensorboard.summary.writer.record_writer import RecordWriter

        path = f"{prefix}.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}"
        self.records = RecordWriter(open(path, "wb"))
        self.write_event(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

    def write_event(self, event: Any) -> None:
        self.records.write(event.SerializeToString())

    def flush(self) -> None:
        self.records.flush()

    def close(self) -> None:
        self.records.close()


WRITERS = ("tensorboardX", "tensorboard")  # in the order they are tried


@functools.cache
def load_writer(package: str) -> Writer | None:
    """The event writer of ``package`` (one of ``WRITERS``), or None if it cannot be imported."""
    try:
        if package == "tensorboardX":
            from tensorboardX.event_file_writer import EventsWriter
            from tensorboardX.proto import event_pb2, summary_pb2
            from tensorboardX.summary import histogram

            return Writer(package, EventsWriter, event_pb2, summary_pb2, histogram)
        from tensorboard.compat.proto import event_pb2, summary_pb2
        from torch.utils.tensorboard.summary import histogram

        return Writer(package, RecordEventsWriter, event_pb2, summary_pb2, histogram)
    except ImportError:
        return None


def writer() -> Writer | None:
    """The first writer this process can import, or None."""
    return next(filter(None, map(load_writer, WRITERS)), None)


@functools.cache
def say_no_writer() -> None:
    """Once per process: why a run has no (or a stale) event file."""
    print("note: no TensorBoard events are written (neither tensorboardX nor tensorboard can be imported; "
          "pip install tensorboard); metrics.csv holds every row", file=sys.stderr)


def tag(column: str) -> str:
    """The TensorBoard tag of a ``metrics.csv`` column: the column under its group."""
    return f"{group(column)}/{column}"


class EventLog:
    """The event file of one run directory; :meth:`sync` makes it hold exactly ``rows``."""

    def __init__(self, run_dir: Path):
        self.dir = Path(run_dir)
        self.writer: Any = None  # the open file's writer (Writer.events_writer)
        self.steps: list[int] = []  # the steps of the rows in the file, in order
        self.hparams: dict[str, Any] = {}  # the run's HParams (icl.train.hparams), set when it opens

    def sync(self, rows: Sequence[dict[str, float]], heads: Sequence[np.ndarray]) -> None:
        """Append the rows the file lacks, or rebuild it if its rows are not a prefix of
        ``rows`` (a resume) or this process has not written it yet. Without a writer, nothing."""
        if writer() is None:
            say_no_writer()
            return
        rows = with_peak_icl(rows)  # eval/peak_icl_acc: a metric of the HParams summary
        steps = [int(r[STEP]) for r in rows]
        if self.writer is not None and steps[: len(self.steps)] == self.steps:
            now = time.time()
            for row, h in zip(rows[len(self.steps) :], heads[len(self.steps) :]):
                self._write(self.writer, row, h, now)
            self.writer.flush()
        else:
            self._rebuild(rows, heads)
        self.steps = steps

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def _rebuild(self, rows: Sequence[dict[str, float]], heads: Sequence[np.ndarray]) -> None:
        self.close()
        self.dir.mkdir(parents=True, exist_ok=True)
        for stale in self.dir.glob(f"{TB_REBUILD_PREFIX}*"):  # a crashed rebuild's
            shutil.rmtree(stale, ignore_errors=True)
        tmp = self.dir / f"{TB_REBUILD_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        events = writer().events_writer(str(tmp / EVENTS_PREFIX))
        # wall times as the run spent them (wall_s), ending now
        start = time.time() - float(rows[-1].get(WALL_S, 0.0)) if rows else time.time()
        for proto in hparams_summaries(self.hparams) if self.hparams else ():  # first: the run's cell
            w = writer()
            events.write_event(w.event_pb2.Event(wall_time=start, summary=w.summary_pb2.Summary.FromString(proto)))
        for row, h in zip(rows, heads):
            self._write(events, row, h, start + float(row.get(WALL_S, 0.0)))
        events.flush()
        (new,) = tmp.iterdir()
        for old in self.dir.glob(EVENTS_GLOB):
            old.unlink()
        os.replace(new, self.dir / new.name)  # the open file moves with it
        tmp.rmdir()
        self.writer = events

    @staticmethod
    def _write(events: Any, row: dict[str, float], heads: np.ndarray | None, wall_time: float) -> None:
        w = writer()
        step = int(row[STEP])
        values = [w.summary_pb2.Summary.Value(tag=tag(k), simple_value=float(v)) for k, v in row.items() if k != STEP]
        if heads is not None and np.size(heads):
            h = np.asarray(heads, dtype=np.float64)  # [L, H, len(ATTN_STATS)]
            for layer in range(h.shape[0]):
                for s, stat in enumerate(ATTN_STATS):
                    values.append(w.histogram(f"heads/L{layer}_{stat}", h[layer, :, s], bins="auto").value[0])
        summary = w.summary_pb2.Summary(value=values)
        events.write_event(w.event_pb2.Event(wall_time=wall_time, step=step, summary=summary))


def read_events(run_dir: Path) -> dict[str, list[tuple[int, Any]]]:
    """Every series in a run directory's event files: tag -> [(step, value)] in file order,
    a float for a scalar, the ``HistogramProto`` for a histogram. For tests and notebooks
    (TensorBoard itself is not a dependency; either writer's package reads them)."""
    if writer() is None:
        raise ModuleNotFoundError("reading TensorBoard events needs tensorboardX or tensorboard; pip install tensorboard")
    event_pb2 = writer().event_pb2
    out: dict[str, list[tuple[int, Any]]] = {}
    for path in sorted(Path(run_dir).glob(EVENTS_GLOB)):
        data = path.read_bytes()
        pos = 0
        while pos + 12 <= len(data):
            (n,) = struct.unpack("Q", data[pos : pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + n])
            pos += 12 + n + 4  # length, its crc, the event, its crc
            for v in event.summary.value:
                value = v.simple_value if v.HasField("simple_value") else v.histo
                out.setdefault(v.tag, []).append((event.step, value))
    return out
