"""The training loop of one run (one cell of the study), resumable and exact.

    train(cfg, out_dir) -> the last metrics row

``out_dir`` receives ``config.yaml`` (fully resolved), ``metrics.csv`` (one row per
evaluation), ``attention.npz`` (per-head diagnostics per evaluation) and
``checkpoints/``. Calling ``train`` again on the same directory resumes from the newest
intact checkpoint; because a training batch is a pure function of (seed, step) and every
piece of state is checkpointed, a resumed run reproduces an uninterrupted one exactly
(on CPU; timing columns aside). Checkpoints coincide with evaluations
(``checkpoint_every`` is a multiple of ``eval_every``), so ``on_eval`` can hand each one to
a sweep driver with the row it belongs to.

The loop keeps the device busy: no host synchronisation inside a step; training loss and
accuracy accumulate on the device and are read at evaluation time, which is also when a
non-finite loss is detected (before any checkpoint could save the damage).
"""

from __future__ import annotations

import csv
import io
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from icl.config import Config, build_config, read_yaml, science_dict
from icl.data import StudyData, load_data
from icl.errors import UserError
from icl.io import atomic_write
from icl.model import SequenceModel, build_model
from icl.train import checkpoint as ckpt
from icl.train.evaluate import ATTN_STATS, autocast, evaluate
from icl.train.optim import lr_at, make_optimizer, set_lr
from icl.train.progress import Progress

OnEval = Callable[[dict[str, float], "Path | None"], None]
TIMING_COLUMNS = ("steps_per_s", "sequences_per_s", "eval_s", "wall_s")


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; the run stops and keeps its last good checkpoint."""


@dataclass
class RunState:
    """What a checkpoint restores besides model and optimiser."""

    step: int = 0
    wall_s: float = 0.0
    rows: list[dict[str, float]] = field(default_factory=list)
    heads: list[np.ndarray] = field(default_factory=list)  # per evaluation: [L, H, 5]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"train.device={name} but no CUDA device is available; use train.device=auto or cpu")
    return device


# --------------------------------------------------------------------------- run directory


def config_differences(a: Config, b: Config) -> list[str]:
    sa, sb = science_dict(a), science_dict(b)
    return [f"{k}: {sa[k]!r} there, {sb[k]!r} here" for k in sa if sa[k] != sb.get(k)]


def prepare_run_dir(cfg: Config, out_dir: Path) -> None:
    """Check ``out_dir`` may hold this run (refuse a different run's directory without
    touching it), then write ``config.yaml``."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} is a file, not a directory")
    config_path = out_dir / "config.yaml"
    if config_path.exists():
        try:
            saved = build_config(read_yaml(config_path))
        except UserError as e:
            raise UserError(f"{out_dir} holds an unreadable run config ({e}); choose another --out") from None
        diff = config_differences(saved, cfg)
        if diff:
            raise UserError(
                f"{out_dir} holds a run with a different config ({'; '.join(diff[:4])}); "
                "resume it with the same config or choose another --out"
            )
    elif out_dir.is_dir() and any(p.name != "checkpoints" for p in out_dir.iterdir()):
        raise UserError(f"--out {out_dir} is not empty and holds no run (no config.yaml); choose a new directory")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(config_path, cfg.to_yaml().encode())
    except OSError as e:
        raise UserError(f"cannot write to {out_dir} ({e.strerror}); choose a writable --out") from None


def metrics_csv(rows: list[dict[str, float]]) -> bytes:
    if not rows:
        return b""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue().encode()


def attention_npz(state: RunState) -> bytes:
    buf = io.BytesIO()
    steps = np.array([int(r["step"]) for r in state.rows], dtype=np.int64)
    heads = np.stack(state.heads).astype(np.float32) if state.heads else np.zeros((0, 0, 0, len(ATTN_STATS)), np.float32)
    np.savez_compressed(buf, step=steps, heads=heads, stats=np.array(ATTN_STATS))
    return buf.getvalue()


def write_logs(out_dir: Path, state: RunState) -> dict[str, bytes]:
    files = {"metrics.csv": metrics_csv(state.rows), "attention.npz": attention_npz(state)}
    for name, data in files.items():
        atomic_write(out_dir / name, data)
    return files


def divergence_message(ckpt_root: Path, first: int, last: int) -> str:
    """Why a run stopped on a non-finite loss, and what it kept."""
    have = ckpt.list_checkpoints(ckpt_root)
    kept = f"the last good checkpoint {have[-1]} is kept" if have else "no checkpoint had been written"
    return (f"training loss became non-finite between steps {first} and {last}; the run stopped and {kept}; "
            "lower optim.lr or raise optim.warmup_steps")


def evaluation_row(
    cfg: Config, step: int, since_eval: int, train_loss: float, correct: float, lr: float,
    metrics: dict[str, float], train_s: float, eval_s: float, wall_s: float,
) -> dict[str, float]:
    """One ``metrics.csv`` row: training statistics since the last evaluation, the
    evaluation metrics, and timing (training rate excludes evaluation time)."""
    b = cfg.train.batch_size
    return {
        "step": step,
        "sequences": step * b,
        "train_loss": train_loss,
        "train_acc": correct / (since_eval * b),
        "lr": lr,
        **metrics,
        "steps_per_s": since_eval / train_s,
        "sequences_per_s": since_eval * b / train_s,
        "eval_s": eval_s,
        "wall_s": wall_s,
    }


def log_evaluation(out_dir: Path, state: RunState, row: dict[str, float], heads: np.ndarray) -> dict[str, bytes]:
    """Append an evaluation to the run's state and rewrite its logs; returns their bytes."""
    state.rows.append(row)
    state.heads.append(heads)
    state.step = int(row["step"])
    return write_logs(out_dir, state)


def save_checkpoint(
    out_dir: Path, cfg: Config, state: RunState, files: dict[str, bytes], model_state: dict, optimizer_state: dict
) -> Path:
    """Checkpoint the run at ``state.step`` with everything a resume needs."""
    payload = {
        "step": state.step,
        "model": model_state,
        "optimizer": optimizer_state,
        "rng": ckpt.rng_state(),
        "wall_s": state.wall_s,
        "science": science_dict(cfg),
    }
    return ckpt.save(out_dir / "checkpoints", state.step, payload, files, keep=cfg.train.keep_checkpoints)


# --------------------------------------------------------------------------- the loop


def restore(loaded: ckpt.Loaded, cfg: Config, model: SequenceModel, optimizer: torch.optim.Optimizer) -> RunState:
    saved = loaded.state.get("science")
    if saved is not None and saved != science_dict(cfg):
        diff = [k for k in saved if saved[k] != science_dict(cfg).get(k)]
        raise UserError(f"checkpoint {loaded.path} was made with a different config ({', '.join(diff[:4])})")
    model.load_state_dict(loaded.state["model"])
    optimizer.load_state_dict(loaded.state["optimizer"])
    ckpt.set_rng_state(loaded.state["rng"])
    rows = list(csv.DictReader(io.StringIO(loaded.files["metrics.csv"].decode())))
    with np.load(io.BytesIO(loaded.files["attention.npz"])) as z:
        heads = list(z["heads"])
    return RunState(
        step=loaded.step,
        wall_s=float(loaded.state["wall_s"]),
        rows=[{k: _number(v) for k, v in r.items()} for r in rows],
        heads=heads,
    )


def _number(text: str) -> float | int:
    value = float(text)
    return int(value) if value.is_integer() and "." not in text and "e" not in text.lower() else value


def initial_model(cfg: Config, device: torch.device | str = "cpu") -> SequenceModel:
    """The model run ``cfg`` starts from, seeded by ``cfg.seed`` alone: a run trained alone,
    in a pack or in a benchmark starts from the same weights."""
    torch.manual_seed(cfg.seed)
    return build_model(cfg).to(device)


def train_step(model: SequenceModel, optimizer: torch.optim.Optimizer, data: StudyData, step: int, cfg: Config):
    """One AdamW update on the batch of ``step``; returns (loss, number correct) on device."""
    batch = data.train_batch(step)
    images = data.bank.render(batch.classes, batch.exemplars)
    with autocast(cfg, images.device):
        logits = model(images, batch.labels)
    loss = F.cross_entropy(logits.float(), batch.targets)  # at the query only
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    correct = (logits.detach().argmax(-1) == batch.targets).sum()
    return loss.detach(), correct


def train(cfg: Config, out_dir: Path | str, *, on_eval: OnEval | None = None, progress: bool | None = None) -> dict[str, float]:
    """Train (or resume) the run in ``out_dir``; returns the last metrics row."""
    out_dir = Path(out_dir)
    prepare_run_dir(cfg, out_dir)
    t = cfg.train
    device = resolve_device(t.device)
    if t.threads:
        torch.set_num_threads(t.threads)
    data = load_data(cfg, device)
    model = initial_model(cfg, device)
    optimizer = make_optimizer(model, cfg.optim)
    ckpt_root = out_dir / "checkpoints"
    ckpt.remove_temporaries(ckpt_root)
    loaded = ckpt.load_latest(ckpt_root)
    state = restore(loaded, cfg, model, optimizer) if loaded else RunState()
    write_logs(out_dir, state)
    if state.step >= t.steps:
        return state.rows[-1] if state.rows else {}

    model.train()
    bar = Progress(t.steps, enabled=sys.stderr.isatty() if progress is None else progress)
    bar.update(state.step, state.rows[-1] if state.rows else None, None)
    loss_sum = torch.zeros((), device=device)
    correct_sum = torch.zeros((), device=device, dtype=torch.long)
    since_eval, seg_start = 0, time.perf_counter()
    for step in range(state.step + 1, t.steps + 1):
        lr = lr_at(step, cfg.optim, t.steps)
        set_lr(optimizer, lr)
        loss, correct = train_step(model, optimizer, data, step - 1, cfg)
        loss_sum += loss
        correct_sum += correct
        since_eval += 1
        if step % t.eval_every and step != t.steps:
            bar.tick(step)
            continue
        train_loss = float(loss_sum) / since_eval  # the one host sync per evaluation
        if not math.isfinite(train_loss):
            bar.close()
            raise TrainingDiverged(divergence_message(ckpt_root, step - since_eval, step))
        train_s = time.perf_counter() - seg_start
        t0 = time.perf_counter()
        metrics, heads = evaluate(model, data, cfg)
        eval_s = time.perf_counter() - t0
        state.wall_s += train_s + eval_s
        row = evaluation_row(cfg, step, since_eval, train_loss, float(correct_sum), lr, metrics, train_s, eval_s,
                             state.wall_s)
        files = log_evaluation(out_dir, state, row, heads)
        saved = None
        if step % t.checkpoint_every == 0 or step == t.steps:
            saved = save_checkpoint(out_dir, cfg, state, files, model.state_dict(), optimizer.state_dict())
        bar.update(step, row, saved)
        if on_eval is not None:
            on_eval(row, saved)
        loss_sum.zero_()
        correct_sum.zero_()
        since_eval, seg_start = 0, time.perf_counter()
    bar.close()
    return state.rows[-1]


__all__ = ["train", "TrainingDiverged", "TIMING_COLUMNS", "resolve_device"]
