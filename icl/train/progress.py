"""A one-line progress display for a terminal: steps, rate, ETA, latest ICL/IWL.

Silent when stderr is not a terminal (batch jobs, Ray workers): logs stay clean and the
metrics files are the record.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from icl.metrics import ICL, IWL, TRAIN_LOSS


def format_duration(seconds: float) -> str:
    """``H:MM:SS``; past a day ``Nd HH:MM:SS`` (a sweep's ETA, a cost estimate)."""
    seconds = int(max(seconds, 0))
    days, seconds = divmod(seconds, 86400)
    h, rest = divmod(seconds, 3600)
    clock = f"{h}:{rest // 60:02d}:{rest % 60:02d}"
    return f"{days}d {h:02d}:{rest // 60:02d}:{rest % 60:02d}" if days else clock


class Progress:
    def __init__(self, total: int, enabled: bool, every_s: float = 0.5):
        self.total = total
        self.enabled = enabled
        self.every_s = every_s
        self.last_draw = 0.0
        self.start = time.perf_counter()
        self.start_step: int | None = None
        self.row: dict[str, float] | None = None
        self.note = ""

    def tick(self, step: int) -> None:
        if self.enabled and time.perf_counter() - self.last_draw >= self.every_s:
            self._draw(step)

    def update(self, step: int, row: dict[str, float] | None, checkpoint: Path | None) -> None:
        if self.start_step is None:
            self.start_step, self.start = step, time.perf_counter()
        self.row = row or self.row
        if checkpoint is not None:
            self.note = f" | ckpt {step}"
        if self.enabled:
            self._draw(step)

    def _draw(self, step: int) -> None:
        self.last_draw = now = time.perf_counter()
        done = step - (self.start_step or 0)
        rate = done / max(now - self.start, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else float("nan")
        text = f"step {step:,}/{self.total:,} ({100 * step / self.total:5.1f}%) | {rate:7.1f} steps/s"
        if rate > 0 and done:
            text += f" | ETA {format_duration(eta)}"
        if self.row:
            r = self.row
            text += f" | loss {r[TRAIN_LOSS]:.3f} | ICL {r[ICL]:.3f} | IWL {r[IWL]:.3f}"
        sys.stderr.write("\r" + text + self.note + "\x1b[K")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()
