"""A run directory's books: open it for a config, restore, record an evaluation, checkpoint.

Its paths and names are :class:`icl.layout.RunLayout`'s (the layout is drawn there), which
:class:`RunDir` extends with what reads and writes them for the training engine (open,
restore, record an evaluation, checkpoint) and the sweep (latest step, finished, install a
checkpoint Ray restored, the metrics table). The analysis reads run directories through
:class:`~icl.layout.RunLayout` alone: it needs no torch.
"""

from __future__ import annotations

import csv
import io
import math
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from icl.config import Config, build_config, read_yaml, science_dict
from icl.errors import UserError
from icl.io import atomic_write, remove_stale_temporaries
from icl.layout import ATTENTION, CHECKPOINTS, CONFIG, METRICS, RunLayout, checkpoint_step
from icl.metrics import ATTN_STATS, STEP
from icl.train import checkpoint as ckpt
from icl.train.hparams import hparam_values
from icl.train.tensorboard import EventLog


@dataclass
class RunState:
    """What a run has logged so far; with the model and optimiser, what a checkpoint restores."""

    step: int = 0
    wall_s: float = 0.0
    rows: list[dict[str, float]] = field(default_factory=list)
    heads: list[np.ndarray] = field(default_factory=list)  # per evaluation: [L, H, 5]

    @property
    def last_row(self) -> dict[str, float]:
        return self.rows[-1] if self.rows else {}


@dataclass
class Restored:
    """A run as its newest intact checkpoint left it."""

    path: Path
    state: RunState
    model: dict[str, Any]  # the model's state_dict
    optimizer: dict[str, Any]  # a torch.optim.AdamW state_dict


def config_differences(a: Config, b: Config) -> list[str]:
    sa, sb = science_dict(a), science_dict(b)
    return [f"{k}: {sa[k]!r} there, {sb[k]!r} here" for k in sa if sa[k] != sb.get(k)]


class RunDir(RunLayout):
    """One run's directory (it need not exist yet): its layout, and its books."""

    def __init__(self, path: Path | str):
        super().__init__(path)
        self.events = EventLog(self.path)

    # ------------------------------------------------------------------ opening

    def open(self, cfg: Config) -> None:
        """Make the directory hold run ``cfg``: refuse another run's directory (or a folder of
        other files) without touching it, write ``config.yaml``, drop half-written checkpoints."""
        out = self.path
        if out.exists() and not out.is_dir():
            raise UserError(f"--out {out} is a file, not a directory")
        config_path = self.config
        if config_path.exists():
            self.check_config(cfg)
        elif out.is_dir() and any(p.name != CHECKPOINTS for p in out.iterdir()):
            raise UserError(f"--out {out} is not empty and holds no run (no {CONFIG}); choose a new directory")
        try:
            out.mkdir(parents=True, exist_ok=True)
            atomic_write(config_path, cfg.to_yaml().encode())
        except OSError as e:
            raise UserError(f"cannot write to {out} ({e.strerror}); choose a writable --out") from None
        remove_stale_temporaries(out)  # of the logs' atomic writes, left by a killed run
        self.events.hparams = hparam_values(cfg)
        if self.checkpoints_dir.is_dir():
            for p in self.checkpoints_dir.glob(f"{ckpt.TEMP_PREFIX}*"):  # never valid: a crash's leftovers
                shutil.rmtree(p, ignore_errors=True)

    def check_config(self, cfg: Config, advice: str = "resume it with the same config or choose another --out") -> None:
        """UserError (ending in ``advice``) if the run's ``config.yaml`` is unreadable or
        describes another run than ``cfg`` (edited by hand, or another experiment's); nothing
        if there is none yet."""
        out, config_path = self.path, self.path / CONFIG
        if not config_path.exists():
            return
        try:
            saved = build_config(read_yaml(config_path))
        except UserError as e:
            raise UserError(f"{out} holds an unreadable run config ({e}); {advice}") from None
        diff = config_differences(saved, cfg)
        if diff:
            raise UserError(f"{out} holds a run with a different config ({'; '.join(diff[:4])}); {advice}")

    # ------------------------------------------------------------------ checkpoints

    def latest_step(self) -> int:
        """Step of the newest checkpoint directory (0: none); by name, not verified."""
        found = self.checkpoints()
        return (checkpoint_step(found[-1].name) or 0) if found else 0

    def latest_checkpoint(self) -> Path | None:
        found = self.checkpoints()
        return found[-1] if found else None

    def restore(self, cfg: Config) -> Restored | None:
        """The run as its newest intact checkpoint left it; corrupt checkpoints are reported on
        stderr and skipped. None if there is none; UserError if none of several is intact or
        the checkpoint belongs to another config."""
        found = self.checkpoints()
        problems = []
        for path in reversed(found):
            try:
                loaded = ckpt.load(path, required=(METRICS, ATTENTION))
                state = _run_state(loaded)
            except ValueError as e:  # damaged, or not a checkpoint of this trainer: never unpickled
                problems.append(f"{path.name}: {e}")
                print(f"warning: checkpoint {path} is corrupt ({e}); trying the previous one", file=sys.stderr)
                continue
            self._check_science(loaded, cfg)
            return Restored(loaded.path, state, loaded.state["model"], loaded.state["optimizer"])
        if found:
            raise UserError(
                f"no intact checkpoint in {self.checkpoints_dir} ({'; '.join(problems)}); move the run "
                "directory away to start over"
            )
        return None

    @staticmethod
    def _check_science(loaded: ckpt.Loaded, cfg: Config) -> None:
        saved = loaded.state.get("science")
        if saved is not None:
            # a key the checkpoint predates counts as its default (what the run trained with)
            now, defaults = science_dict(cfg), science_dict(Config())
            diff = [k for k in now if saved.get(k, defaults.get(k)) != now[k]]
            if diff:
                raise UserError(f"checkpoint {loaded.path} was made with a different config ({', '.join(diff[:4])})")

    def checkpoint(self, cfg: Config, state: RunState, files: dict[str, bytes],
                   model_state: dict[str, Any], optimizer_state: dict[str, Any]) -> Path:
        """Checkpoint the run at ``state.step`` with ``files`` (its logs, as :meth:`record`
        returned them); keep the newest ``train.keep_checkpoints``."""
        payload = {
            "step": state.step,
            "model": model_state,
            "optimizer": optimizer_state,
            "wall_s": state.wall_s,
            "science": science_dict(cfg),
        }
        self.checkpoints_dir.mkdir(parents=True, exist_ok=True)
        saved = ckpt.write(self.checkpoint_dir(state.step), state.step, payload, files)
        for old in self.checkpoints()[: -cfg.train.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        return saved

    def install(self, src: Path) -> Path | None:
        """Copy checkpoint directory ``src`` (one Ray restored) into this run if it is newer than
        this run's newest checkpoint (a run directory moved or lost); returns where, or None."""
        step = ckpt.step_of(Path(src))
        if step is None:
            raise UserError(f"{src} is not a checkpoint directory (no readable manifest)")
        if step <= self.latest_step():
            return None
        return ckpt.copy(Path(src), self.checkpoint_dir(step))

    # ------------------------------------------------------------------ logs

    def record(self, state: RunState) -> dict[str, bytes]:
        """Rewrite the logs from ``state``; returns their bytes (a checkpoint keeps them too).
        The TensorBoard events follow: appended during a run, rebuilt on its first record in a
        process (a start or resume), so they never hold a step twice or miss one."""
        files = {METRICS: metrics_csv(state.rows), ATTENTION: attention_npz(state)}
        for name, data in files.items():
            atomic_write(self.path / name, data)
        self.events.sync(state.rows, state.heads)
        return files

    def close(self) -> None:
        """Close the event file (the other logs are written whole by every record)."""
        self.events.close()

    def metrics_table(self) -> tuple[list[str], list[list[str]]]:
        """Header and rows of ``metrics.csv`` as text; missing file -> no rows; a torn last
        line (a file being written by another process) is dropped."""
        try:
            text = self.metrics.read_bytes().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return [], []
        rows = list(csv.reader(io.StringIO(text)))
        if not rows:
            return [], []
        header, body = rows[0], rows[1:]
        complete = text.endswith("\n")
        body = [r for i, r in enumerate(body) if len(r) == len(header) and (complete or i < len(body) - 1)]
        return header, body

    def last_logged_step(self) -> int | None:
        """The last evaluated step in ``metrics.csv`` (None: no evaluation yet)."""
        header, rows = self.metrics_table()
        if not rows or STEP not in header:
            return None
        try:
            return int(float(rows[-1][header.index(STEP)]))
        except (ValueError, OverflowError):  # a damaged table: the checkpoint's copy restores it
            return None

    def finished(self, steps: int) -> bool:
        """Has the run logged its evaluation of step ``steps`` (its last)?"""
        return (self.last_logged_step() or 0) >= steps


def metrics_csv(rows: list[dict[str, float]]) -> bytes:
    """The rows as CSV; columns in order of first appearance (a run resumed by a newer version
    gains its new metrics, left empty in the older rows)."""
    if not rows:
        return b""
    buf = io.StringIO()
    columns = list(dict.fromkeys(key for row in rows for key in row))
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue().encode()


def attention_npz(state: RunState) -> bytes:
    buf = io.BytesIO()
    steps = np.array([int(r[STEP]) for r in state.rows], dtype=np.int64)
    heads = np.stack(state.heads).astype(np.float32) if state.heads else np.zeros((0, 0, 0, len(ATTN_STATS)), np.float32)
    np.savez_compressed(buf, step=steps, heads=heads, stats=np.array(ATTN_STATS))
    return buf.getvalue()


def _run_state(loaded: ckpt.Loaded) -> RunState:
    """The logs a checkpoint holds, checked: one metrics row per evaluation up to its step,
    numbers only, and per-head scores ``[E, L, H, 5]`` for the same evaluations; ValueError
    (a damaged checkpoint) otherwise."""
    try:
        text = loaded.files[METRICS].decode("utf-8")
        rows = [{k: _number(v) for k, v in r.items()} for r in csv.DictReader(io.StringIO(text))]
        steps = [int(r["step"]) for r in rows]
        ordered = all(None not in r for r in rows) and steps == sorted(set(steps))
    except (UnicodeDecodeError, ValueError, TypeError, AttributeError, KeyError, OverflowError, csv.Error) as e:
        raise ValueError(f"its {METRICS} is not a table of numbers with a step column ({type(e).__name__})") from None
    if not ordered or (rows and steps[-1] != loaded.step):
        raise ValueError(f"its {METRICS} does not end at step {loaded.step} with one row per evaluation")
    try:
        with np.load(io.BytesIO(loaded.files[ATTENTION]), allow_pickle=False) as z:
            heads = np.asarray(z["heads"])
    except Exception as e:  # noqa: BLE001 - numpy's errors on bytes that are not an npz
        raise ValueError(f"its {ATTENTION} is unreadable ({type(e).__name__})") from None
    if heads.ndim != 4 or heads.shape[0] != len(rows) or heads.shape[3] != len(ATTN_STATS) \
            or not np.issubdtype(heads.dtype, np.floating):
        raise ValueError(f"its {ATTENTION} holds heads of shape {heads.shape}, not one [layers, heads, "
                         f"{len(ATTN_STATS)}] array per row of {METRICS}")
    wall = loaded.state.get("wall_s", 0.0)
    return RunState(step=loaded.step, wall_s=float(wall), rows=rows, heads=list(heads))


def _number(text: str) -> float | int:
    if not text:
        return math.nan  # a metric this row predates
    value = float(text)
    return int(value) if value.is_integer() and "." not in text and "e" not in text.lower() else value
