"""What a sweep will cost, before it starts: ``icl-sweep SPEC --dry-run --estimate``.

The rate is measured with the engine the trials use: a few steps of the first pack
(``PackedTrainer``: a warm-up step, then at least 2 steps and 2 s) on the device the trials would get here
(``train.device``, ``auto``: a GPU if there is one), with the trial's CPU threads. On a CPU a
large pack is measured as a pack of one and scaled by the pack's size (CPU time grows about
linearly with the models; the paper preset's ResNet takes seconds per model-step), and the
evaluation on 64 sequences per set, scaled to ``eval.n_sequences``; on a GPU the whole pack
and the full sets are timed. ``--rate-from FILE`` takes the training rate from a
``benchmarks/throughput.py --json`` file instead (it must have measured the same model and
pack size; it times training steps only, so evaluation and checkpoint time are left out).
Disk is measured too: a real checkpoint of one model (weights, AdamW state, logs) and the
growth of its logs (``metrics.csv``, ``attention.npz``, TensorBoard events) per evaluation.

A trial (a pack) then takes ``steps x step time + evaluations x models x evaluation time +
checkpoints x models x checkpoint time``; the sweep's wall time schedules the trials on as
many slots as the spec's resources and ``max_concurrent`` allow on this machine
(``--num-cpus``/``--num-gpus`` to plan another size), assuming trials running side by side
do not slow each other (on a shared GPU they do: the estimate also says how long if they
take turns). GPU-hours are what the trials reserve: their hours x ``resources.gpu``.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from icl.config import Config, replace
from icl.errors import UserError
from icl.inputs import read_text
from icl.metrics import STEP
from icl.train.progress import format_duration
from sweeps.experiment import Experiment
from sweeps.progress import concurrency, finish_time
from sweeps.ray_session import machine_cpus
from sweeps.spec import PackSpec, Resources

CPU_EVAL_SEQUENCES = 64  # per evaluation set when timing an evaluation on a CPU
MIN_TIMED_S = 2.0  # time at least 2 steps and this long (or MAX_TIMED_STEPS steps)
MAX_TIMED_STEPS = 200


@dataclass
class Measured:
    """One pack's costs on one device."""

    source: str  # where the rate comes from, in words
    device: str
    step_s: float  # seconds per training step of a pack of ``models`` models
    models: int
    linear: bool  # step time grows linearly with the models (CPU), else taken as constant (GPU)
    eval_s: float | None  # seconds per evaluation of one model (None: not known)
    checkpoint_s: float | None  # seconds to write one model's checkpoint
    checkpoint_bytes: int
    log_bytes_per_eval: int  # metrics.csv + attention.npz + events, per model and evaluation

    def pack_step_s(self, k: int) -> float:
        return self.step_s * k / self.models if self.linear else self.step_s


@dataclass
class Plan:
    """The estimate of a whole sweep."""

    measured: Measured
    model_steps: int
    trial_s: list[float]  # each trial's (pack's) time
    slots: int
    wall_s: float
    wall_turns_s: float | None  # trials sharing a GPU taking turns (None: no GPU shared)
    gpu_hours: float | None
    disk_peak: int
    disk_after: int
    logs: int


def counts(cfg: Config) -> tuple[int, int]:
    """(evaluations, checkpoints) of one run: every eval_every / checkpoint_every step and
    the last."""
    t = cfg.train
    evals = t.steps // t.eval_every + (t.steps % t.eval_every != 0)
    ckpts = t.steps // t.checkpoint_every + (t.steps % t.checkpoint_every != 0)
    return evals, ckpts


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(pack: PackSpec, cfgs: Sequence[Config], train: bool = True) -> Measured:
    """Time ``train`` steps, an evaluation and a checkpoint of ``pack`` (``cfgs``: its members'
    configs with runtime paths) here, and measure a checkpoint's and an evaluation's bytes."""
    import torch

    from icl.data import load_data
    from icl.train.evaluate import evaluate
    from icl.train.loop import evaluation_row, resolve_device
    from icl.train.step import PackedTrainer
    from icl.train.rundir import RunDir, RunState

    cfg = cfgs[0]
    device = resolve_device(cfg.train.device)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    on_cpu = device.type == "cpu"
    timed = cfgs[:1] if on_cpu else list(cfgs)
    n_eval = min(cfg.eval.n_sequences, CPU_EVAL_SEQUENCES) if on_cpu else cfg.eval.n_sequences
    small = replace(cfg, **{"eval.n_sequences": n_eval})
    trainer = PackedTrainer.fresh(timed, load_data(small, device))

    step_s, n = float("nan"), 0
    if train:
        trainer.run(1, 1)  # warm-up: allocations, caches, a CUDA graph's capture
        _sync(device)
        n, at = 2, 1
        while True:
            t0 = time.perf_counter()
            loss, _ = trainer.run(at + 1, at + n)
            float(loss.sum())
            _sync(device)
            elapsed = time.perf_counter() - t0
            at += n
            if elapsed >= MIN_TIMED_S or n >= MAX_TIMED_STEPS:
                break
            n = min(MAX_TIMED_STEPS, max(2 * n, math.ceil(n * MIN_TIMED_S / max(elapsed, 1e-6))))
        step_s = elapsed / n

    t0 = time.perf_counter()
    metrics, heads = evaluate(trainer.models[0], trainer.datas[0], small)
    _sync(device)
    eval_s = (time.perf_counter() - t0) * cfg.eval.n_sequences / n_eval

    with tempfile.TemporaryDirectory(prefix="icl-estimate-") as tmp:
        run = RunDir(tmp)
        run.open(cfg)
        row = evaluation_row(cfg, cfg.train.eval_every, cfg.train.eval_every, 1.0, 0.0, 0.0, metrics, 1.0, eval_s, 1.0)
        state = RunState(step=row[STEP], rows=[row], heads=[heads])

        def log_bytes() -> int:
            return sum(f.stat().st_size for f in run.log_files())

        files = run.record(state)
        one = log_bytes()
        t0 = time.perf_counter()
        saved = run.checkpoint(cfg, state, files, trainer.pack.state_dict(0), trainer.optimizer_state(0, state.step))
        checkpoint_s = time.perf_counter() - t0
        checkpoint_bytes = sum(f.stat().st_size for f in saved.iterdir())
        state.rows.append({**row, STEP: 2 * row[STEP]})
        state.heads.append(heads)
        run.record(state)
        per_eval = log_bytes() - one
        run.close()

    threads = torch.get_num_threads() if on_cpu else None
    where = f"{device.type}" + (f", {threads} thread{'s' if threads > 1 else ''}" if threads else f" ({torch.cuda.get_device_name(device)})")
    k, m = len(cfgs), len(timed)
    source = (f"measured here: {n} step(s) of {'the whole' if m == k else f'{m} of the {k} models of'} pack "
              f"{pack.pack_id} on {where}" + (f", scaled x{k / m:g} (CPU time grows with the models)" if m < k else "")
              + (f"; one evaluation on {n_eval} of {cfg.eval.n_sequences} sequences per set, scaled"
                 if n_eval < cfg.eval.n_sequences else ""))
    return Measured(source, device.type, step_s, m, on_cpu, eval_s, checkpoint_s, checkpoint_bytes, per_eval)


def read_benchmark(path: Path) -> tuple[float, str, int, dict[str, Any], int, dict[str, Any]]:
    """A ``benchmarks/throughput.py --json`` file's rate (model-steps/s: finite, > 0), device,
    pack size, model, batch size and the whole document; UserError saying what is wrong."""
    try:
        bench = json.loads(read_text(path, "--rate-from file"))
        rate, device, bench_k = float(bench["trainer_steps_per_s"]), str(bench["device"]), int(bench["pack"])
        model, batch = bench["model"], int(bench["batch_size"])
        if not isinstance(model, dict):
            raise TypeError("model is not a mapping")
    except UserError as e:
        raise UserError(f"--rate-from: {e}") from None
    except (ValueError, KeyError, TypeError, AttributeError, OverflowError) as e:
        raise UserError(f"--rate-from {path}: not a benchmarks/throughput.py --json file ({type(e).__name__}: {e})") from None
    if not math.isfinite(rate) or rate <= 0:
        raise UserError(f"--rate-from {path}: trainer_steps_per_s must be a positive number, got {rate}; "
                        "measure it again with benchmarks/throughput.py --json")
    if bench_k < 1 or batch < 1:
        raise UserError(f"--rate-from {path}: pack and batch_size must be at least 1, got {bench_k} and {batch}")
    return rate, device, bench_k, model, batch, bench


def from_benchmark(path: Path, cfg: Config, k: int, measured: Measured) -> Measured:
    """The training rate of a ``benchmarks/throughput.py --json`` file, checked against the
    pack it stands for; evaluation and checkpoint time are unknown (the benchmark times
    training steps only); disk stays as measured here."""
    rate, device, bench_k, model, batch, bench = read_benchmark(path)
    want = {"embedder": cfg.model.embedder, "layers": cfg.model.layers, "d_model": cfg.model.d_model,
            "image_size": cfg.data.image_size}
    wrong = [f"{key} {model.get(key)!r} there, {value!r} here" for key, value in want.items() if model.get(key) != value]
    if batch != cfg.train.batch_size:
        wrong.append(f"batch_size {batch} there, {cfg.train.batch_size} here")
    if device.startswith("cuda") and bench.get("precision") != cfg.train.precision:
        wrong.append(f"precision {bench.get('precision')} there, {cfg.train.precision} here")
    if bench_k != k:
        wrong.append(f"pack {bench_k} there, {k} here")
    if cfg.train.device != "auto" and cfg.train.device.split(":")[0] != device.split(":")[0]:
        wrong.append(f"device {device} there, train.device={cfg.train.device} here")
    if wrong:
        raise UserError(
            f"--rate-from {path} measured another setup ({'; '.join(wrong)}); run benchmarks/throughput.py "
            f"--config ... --pack {k} --json FILE with the spec's model"
        )
    return Measured(
        f"from {path}: {rate:.1f} model-steps/s, pack {k} on {device}"
        + (f" ({bench['machine']['gpu']})" if isinstance(bench.get("machine"), dict) and bench["machine"].get("gpu") else "")
        + "; training steps only (evaluation and checkpoint time not included)",
        device.split(":")[0], k / rate, k, False, None, None, measured.checkpoint_bytes, measured.log_bytes_per_eval,
    )


def plan(exp: Experiment, m: Measured, cpus: float, gpus: float) -> Plan:
    """The sweep's time, GPU-hours and disk from one pack's measurement."""
    spec, packs = exp.spec, exp.packs
    trial_s, model_steps, peak, after, logs = [], 0, 0, 0, 0
    for p in packs:
        cfg = p.configs[0]
        k, steps = len(p.trial_ids), cfg.train.steps
        evals, ckpts = counts(cfg)
        seconds = steps * m.pack_step_s(k)
        seconds += evals * k * (m.eval_s or 0.0) + ckpts * k * (m.checkpoint_s or 0.0)
        trial_s.append(seconds)
        model_steps += k * steps
        kept = min(cfg.train.keep_checkpoints, ckpts)
        ray_copies = ckpts if spec.checkpoint_keep is None else min(spec.checkpoint_keep, ckpts)
        logs += k * evals * m.log_bytes_per_eval
        peak += k * (kept + ray_copies) * m.checkpoint_bytes
        after += k * (kept + 1) * m.checkpoint_bytes
    need = spec.resources
    on_gpu = m.device == "cuda"
    slots = concurrency(need if on_gpu else Resources(cpu=need.cpu), cpus, gpus, spec.max_concurrent)
    slots = min(slots, len(packs))
    wall = finish_time([], trial_s, slots)
    turns = None
    if on_gpu and 0 < need.gpu < 1:  # trials sharing a GPU, if they share its throughput too
        turns = finish_time([], trial_s, max(1, min(slots, math.floor(gpus + 1e-9))))
    gpu_hours = sum(trial_s) * need.gpu / 3600 if on_gpu and need.gpu > 0 else None
    return Plan(m, model_steps, trial_s, slots, wall, turns, gpu_hours, peak + logs, after + logs, logs)


def format_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def report(exp: Experiment, p: Plan, cpus: float, gpus: float) -> list[str]:
    """The estimate's lines for the dry run."""
    spec, trials, packs = exp.spec, exp.models, exp.packs
    m = p.measured
    cfg = trials[0].config
    evals, ckpts = counts(cfg)
    k = len(packs[0].trial_ids)
    steps = cfg.train.steps
    need = spec.resources
    lines = [f"estimate:   rate {m.source}"]
    lines.append(f"  model-steps  {p.model_steps:,} ({len(trials)} models x {steps:,} steps) in {len(packs)} trials")
    per = (f"  a trial      {m.pack_step_s(k):.3g} s per step of its {k} model{'s' if k > 1 else ''} "
           f"({k / m.pack_step_s(k):.3g} model-steps/s)")
    if m.eval_s is not None:
        per += f"; {evals} evaluations x {k} at {m.eval_s:.3g} s; {ckpts} checkpoints x {k} at {m.checkpoint_s:.2g} s"
    lines.append(per + f": {format_duration(max(p.trial_s))}")
    where = f"this machine: {cpus:g} CPUs, {gpus:g} GPUs" + ("" if m.device == "cuda" else ", trials on the CPU")
    wall = f"  wall time    {format_duration(p.wall_s)} at {p.slots} trial{'s' if p.slots > 1 else ''} at a time ({where})"
    if p.slots > 1:
        wall += ", if trials side by side do not slow each other"
    if p.wall_turns_s is not None and p.wall_turns_s > p.wall_s:
        wall += f"; {format_duration(p.wall_turns_s)} if trials sharing a GPU take turns"
    lines.append(wall)
    if p.gpu_hours is not None:
        lines.append(f"  GPU-hours    {p.gpu_hours:,.1f} ({len(packs)} trials x {need.gpu:g} GPU each)")
    elif need.gpu > 0:
        lines.append(f"  GPU-hours    not estimated: the trials reserve {need.gpu:g} GPU each but the rate is from "
                     f"{m.device}; run --estimate on a GPU machine or give --rate-from a GPU benchmark JSON")
    else:
        lines.append("  GPU-hours    none (resources.gpu is 0)")
    ray_copies = "all" if spec.checkpoint_keep is None else str(spec.checkpoint_keep)
    lines.append(
        f"  disk         {format_bytes(p.disk_peak)} at the peak, {format_bytes(p.disk_after)} after: a checkpoint is "
        f"{format_bytes(m.checkpoint_bytes)}, {cfg.train.keep_checkpoints} kept per model + Ray's copies "
        f"({ray_copies} of the {ckpts} until the sweep ends, then 1); logs {format_bytes(p.logs)} "
        f"({evals} evaluations x {format_bytes(m.log_bytes_per_eval)} per model)"
    )
    return lines


def estimate(exp: Experiment, *, rate_from: Path | None = None, num_cpus: int | None = None,
             num_gpus: int | None = None) -> list[str]:
    """Measure (or read) the rate of the first pack and plan the sweep; the lines to print."""
    import torch

    first = exp.with_runtime_paths().packs[0]
    cfgs = first.configs
    if rate_from is not None:
        read_benchmark(rate_from)  # a bad file is refused before the (slow) measurement
    measured = measure(first, cfgs, train=rate_from is None)
    if rate_from is not None:
        measured = from_benchmark(rate_from, cfgs[0], len(cfgs), measured)
    cpus = num_cpus if num_cpus is not None else machine_cpus()
    gpus = num_gpus if num_gpus is not None else (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    if rate_from is not None and measured.device == "cuda" and num_gpus is None and not gpus:
        gpus = 1  # planning for the benchmark's machine: at least its one GPU
    return report(exp, plan(exp, measured, cpus, gpus), cpus, gpus)
