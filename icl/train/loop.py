"""The training loop: every run is a pack of K >= 1 models, trained, evaluated, checkpointed.

    train_packed(cfgs, out_dirs) -> one last metrics row per model
    train(cfg, out_dir)          -> the last metrics row   (a pack of one)

Model ``k`` writes ``out_dirs[k]`` (:class:`~icl.train.rundir.RunDir`): ``config.yaml``,
``metrics.csv`` (one row per evaluation), ``attention.npz``, its TensorBoard event file and
``checkpoints/``. Calling again on the same directories resumes from each run's newest
intact checkpoint; because a training batch is a pure function of (seed, step) and every piece of state is
checkpointed, a resumed run reproduces an uninterrupted one exactly (on CPU; timing
columns aside), and a run directory can be resumed in a pack of any size.

The loop is one state machine over *segments*: a segment trains the live models standing at
one step up to a target (the last step, or the step of the next model ahead), through
*stretches* from one evaluation step to the next (``train.eval_every``), each without a
single host synchronisation; then, between stretches, come the one host read of the
accumulated losses (divergence), evaluation, the metrics row, checkpoints (every
``train.checkpoint_every`` and at the end of what is trained), progress and the caller's
``on_eval``. Each run's newest checkpoint is read once, when the call starts; from one
segment to the next a model is carried in memory (its weights, buffers, AdamW moments and
logs: the numbers its checkpoint holds), and a run is finished when its state says so. Timing: ``wall_s`` is the pack's wall time (training plus
every model's evaluation: the models share the process), ``steps_per_s`` excludes
evaluation; both count the device's work: the clock is read at a segment's end only after the
device has finished the steps queued on it (one wait per segment, none per step).

Resuming models that stand at different steps (a crash between two models' saves, a model
trained in another pack before): the ones furthest behind train as a smaller pack up to the
next model's step, then all continue together.

Divergence: a model whose loss becomes non-finite stops being evaluated and saved (its
last good checkpoint stays); the others train to the end; then :class:`TrainingDiverged`
(:class:`PackTrainingDiverged` for ``train_packed``) is raised.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from icl.config import Config, check_packable
from icl.data import StudyData, load_data
from icl.errors import UserError
from icl.machine import resolve_device, synchronize
from icl.metrics import EVAL_S, LR, SEQUENCES, SEQUENCES_PER_S, STEP, STEPS_PER_S, TRAIN_ACC, TRAIN_LOSS, WALL_S
from icl.model.footprint import check_fits
from icl.schedule import lr_at
from icl.train.adamw import Moments
from icl.train.evaluate import evaluate
from icl.train.precision import check_precision
from icl.train.progress import Progress
from icl.train.rundir import Restored, RunDir, RunState
from icl.train.stack import initial_model
from icl.train.step import PackedTrainer, data_for

# on_eval(k, row, checkpoint_dir or None): model k's row, after its files are written.
OnEval = Callable[[int, dict[str, float], "Path | None"], None]


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; the run stops and keeps its last good checkpoint."""


class PackTrainingDiverged(TrainingDiverged):
    """Some models of a pack diverged; the others finished. ``results[k]`` is model ``k``'s
    last row (None for a diverged model); ``diverged[k]`` says what happened to model ``k``."""

    def __init__(self, message: str, results: list[dict[str, float] | None], diverged: dict[int, str]):
        super().__init__(message)
        self.results = results
        self.diverged = diverged


def divergence_message(run: RunDir, first: int, last: int) -> str:
    """Why a run stopped on a non-finite loss, and what it kept."""
    kept = run.latest_checkpoint()
    kept = f"the last good checkpoint {kept} is kept" if kept else "no checkpoint had been written"
    return (f"training loss became non-finite between steps {first} and {last}; the run stopped and {kept}; "
            "lower optim.lr or raise optim.warmup_steps")


def evaluation_row(
    cfg: Config, step: int, since_eval: int, train_loss: float, correct: float, lr: float,
    metrics: dict[str, float], train_s: float, eval_s: float, wall_s: float,
) -> dict[str, float]:
    """One ``metrics.csv`` row: training statistics since the last evaluation, the
    evaluation metrics, and timing (the training rate excludes evaluation time)."""
    b = cfg.train.batch_size
    return {
        STEP: step,
        SEQUENCES: step * b,
        TRAIN_LOSS: train_loss,
        TRAIN_ACC: correct / (since_eval * b),
        LR: lr,
        **metrics,
        STEPS_PER_S: since_eval / train_s,
        SEQUENCES_PER_S: since_eval * b / train_s,
        EVAL_S: eval_s,
        WALL_S: wall_s,
    }


# --------------------------------------------------------------------------- entry points


def train(cfg: Config, out_dir: Path | str, *, on_eval: Callable[[dict[str, float], "Path | None"], None] | None = None,
          progress: bool | None = None) -> dict[str, float]:
    """Train (or resume) the run in ``out_dir``: a pack of one. Returns the last metrics row."""
    hook = None if on_eval is None else (lambda k, row, saved: on_eval(row, saved))
    try:
        return train_packed([cfg], [out_dir], on_eval=hook, progress=progress)[0]
    except PackTrainingDiverged as e:
        raise TrainingDiverged(e.diverged[0]) from None


def train_packed(
    cfgs: Sequence[Config],
    out_dirs: Sequence[Path | str],
    *,
    on_eval: OnEval | None = None,
    progress: bool | None = None,
) -> list[dict[str, float]]:
    """Train (or resume) K runs as one pack; model ``k`` writes ``out_dirs[k]``. Returns each
    model's last metrics row.

    ``on_eval(k, row, checkpoint_dir)`` is called for every model at every evaluation, after
    its files are written (``checkpoint_dir`` is None when no checkpoint was saved).
    Raises :class:`PackTrainingDiverged` at the end if some models diverged.
    """
    cfgs = list(cfgs)
    runs = [RunDir(d) for d in out_dirs]
    if len(runs) != len(cfgs):
        raise UserError(f"train_packed got {len(cfgs)} configs but {len(runs)} run directories")
    if len({r.path.resolve() for r in runs}) != len(runs):
        raise UserError("every model of a pack needs its own run directory; some are repeated")
    check_packable(cfgs)
    t = cfgs[0].train
    device = resolve_device(t.device)
    check_precision(cfgs[0], device)
    check_fits(cfgs[0], device, models=len(cfgs))  # before anything is written or allocated
    if t.threads:
        torch.set_num_threads(t.threads)
    shared = load_data(cfgs[0], device)  # missing or wrong data: refused before a run directory is made
    datas = [data_for(cfg, shared) for cfg in cfgs]
    for cfg, run in zip(cfgs, runs):
        run.open(cfg)

    try:
        results, diverged = _train_all(cfgs, runs, datas, device, on_eval, progress)
    finally:
        for run in runs:
            run.close()
    if diverged:
        names = "; ".join(f"model {k} ({runs[k].path}): {msg}" for k, msg in sorted(diverged.items()))
        raise PackTrainingDiverged(
            f"{len(diverged)} of {len(cfgs)} packed models diverged, the others finished: {names}", results, diverged
        )
    return [r if r is not None else {} for r in results]


def _train_all(cfgs: list[Config], runs: list[RunDir], datas: list[StudyData], device: torch.device,
               on_eval: OnEval | None, progress: bool | None) -> tuple[list[dict[str, float] | None], dict[int, str]]:
    """Segments until every model is finished or diverged: each model's last row (None if it
    diverged) and why each diverged model stopped. Each run's checkpoint is read once; a
    model trained in one segment is carried to the next in memory."""
    steps = cfgs[0].train.steps
    members = [Member(k, cfgs[k], runs[k], datas[k], run.restore(cfgs[k])) for k, run in enumerate(runs)]
    for m in members:
        if m.restored is not None and m.restored.state.step >= steps:  # finished: refresh its logs, as a resume does
            m.state, m.restored = m.restored.state, None
            m.run.record(m.state)
    while True:
        todo = [m for m in members if not m.diverged and m.step < steps]
        if not todo:
            break
        start = min(m.step for m in todo)
        ahead = [m.step for m in todo if m.step > start]
        segment = Segment([m for m in todo if m.step == start], device, start, stop=min(ahead) if ahead else steps,
                          on_eval=on_eval, progress=progress)
        segment.run()
    return [None if m.diverged else m.state.last_row for m in members], {m.k: m.diverged for m in members if m.diverged}


# --------------------------------------------------------------------------- the state machine


@dataclass
class Member:
    """One model of a pack being trained: where it logs, what it has logged, and where it
    stands: its checkpoint as read when the call started (``restored``), or, once it has
    trained in this call, its weights and moments in memory (``carried``)."""

    k: int  # index in the caller's lists
    cfg: Config
    run: RunDir
    data: StudyData
    restored: Restored | None
    state: RunState | None = None
    carried: tuple[dict[str, torch.Tensor], Moments] | None = None
    diverged: str = ""  # why it stopped, once it has

    @property
    def step(self) -> int:
        if self.state is not None:
            return self.state.step
        return self.restored.state.step if self.restored else 0


class Segment:
    """Models standing at the same step, trained together from ``start`` to ``stop`` with an
    evaluation at every ``train.eval_every`` step and at ``stop``."""

    def __init__(self, members: list[Member], device: torch.device, start: int, stop: int, *,
                 on_eval: OnEval | None, progress: bool | None):
        self.members, self.start, self.stop = members, start, stop
        self.train_cfg = members[0].cfg.train
        self.on_eval = on_eval
        models = [initial_model(m.cfg, device) for m in members]  # as each run starts
        self.trainer = PackedTrainer(models, [m.cfg for m in members], [m.data for m in members])
        for i, m in enumerate(members):
            if m.carried is not None:  # trained in an earlier segment of this call
                self.trainer.put(i, m.carried)
                continue
            m.state = m.restored.state if m.restored else RunState()
            if m.restored:
                try:
                    self.trainer.load_state(i, m.restored.model, m.restored.optimizer, start)
                except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as e:  # weights of another model
                    why = " ".join(str(e).split())[:300]
                    raise UserError(f"checkpoint {m.restored.path} does not fit the model of this config ({why}); "
                                    "move it out of checkpoints/ to resume from the previous one") from None
                m.restored = None  # read once: what it held is the trainer's now
            m.run.record(m.state)  # the logs as of the checkpoint (drops rows a crash left after it)
        first = members[0].state
        self.bar = Progress(self.train_cfg.steps, enabled=sys.stderr.isatty() if progress is None else progress)
        self.bar.update(start, first.rows[-1] if first.rows else None, None)

    def boundaries(self) -> list[int]:
        """The steps at which this segment evaluates: eval steps, the last step, ``stop``."""
        t = self.train_cfg
        return sorted({s for s in range(self.start + 1, self.stop + 1) if s % t.eval_every == 0} | {self.stop})

    def run(self) -> list[Member]:
        """Train and evaluate up to ``stop``; returns the members (``state`` and ``diverged`` set)."""
        trainer = self.trainer
        for model in trainer.models:
            model.train()
        alive = list(range(trainer.k))
        step = self.start
        for boundary in self.boundaries():
            first, seg_start = step + 1, time.perf_counter()
            loss_sum, correct_sum = trainer.run(first, boundary, tick=self.bar.tick)
            synchronize(trainer.device)  # the steps just queued are part of the training time
            train_s = time.perf_counter() - seg_start
            step = boundary
            alive = self.evaluate(step, boundary - first + 1, alive, loss_sum, correct_sum, train_s)
            if not alive:
                break
        self.bar.close()
        for i in alive:  # on to the next segment, in memory
            self.members[i].carried = self.trainer.carry(i)
        return self.members

    def evaluate(self, step: int, since: int, alive: list[int], loss_sum: torch.Tensor, correct_sum: torch.Tensor,
                 train_s: float) -> list[int]:
        """Everything between two stretches of training: divergence, evaluation, rows, checkpoints, progress,
        ``on_eval``. Returns the models still alive."""
        t = self.train_cfg
        losses = [x / since for x in loss_sum.tolist()]  # the one host sync per evaluation
        corrects = correct_sum.tolist()
        for i in list(alive):
            if not math.isfinite(losses[i]):
                m = self.members[i]
                m.diverged = divergence_message(m.run, step - since, step)
                alive.remove(i)
        evals = {}
        for i in alive:
            t0 = time.perf_counter()
            metrics, heads = evaluate(self.trainer.models[i], self.members[i].data, self.members[i].cfg)
            evals[i] = (metrics, heads, time.perf_counter() - t0)
        wall = train_s + sum(e[2] for e in evals.values())
        save = step % t.checkpoint_every == 0 or step == self.stop
        lr = lr_at(step, self.members[0].cfg.optim, t.steps)
        for i in alive:
            m, (metrics, heads, eval_s) = self.members[i], evals[i]
            m.state.wall_s += wall
            row = evaluation_row(m.cfg, step, since, losses[i], corrects[i], lr, metrics, train_s, eval_s,
                                 m.state.wall_s)
            m.state.rows.append(row)
            m.state.heads.append(heads)
            m.state.step = step
            files = m.run.record(m.state)
            saved = None
            if save:
                saved = m.run.checkpoint(m.cfg, m.state, files, self.trainer.pack.state_dict(i),
                                         self.trainer.optimizer_state(i, step))
            if i == alive[0]:
                self.bar.update(step, row, saved)
            if self.on_eval is not None:
                self.on_eval(m.k, row, saved)
        return alive


__all__ = ["train", "train_packed", "TrainingDiverged", "PackTrainingDiverged"]
