"""Training throughput: the naive baseline vs the project's trainer, side by side, in one run.

    python benchmarks/throughput.py --config CFG --device cpu|cuda [--pack K] [--steps N] --json FILE

Methods (all train the same model, ``icl.model.build_model(cfg)``, with AdamW):

- ``baseline``: ``benchmarks/baseline.py`` — host-side numpy sampling one sequence at a
  time, images gathered on the host and copied to the device every step, eager step,
  ``loss.item()`` every step;
- ``trainer``: the project's training step as ``icl-train`` runs it, a pack of one
  (``icl.train.step.PackedTrainer``: device-resident images and counter-based on-device
  sampling, no host synchronisation inside the step loop, bf16 autocast on CUDA when
  ``train.precision=bf16``), with the device-side loss accumulation of the training loop;
- ``packed`` (``--pack K`` > 1): the same trainer with K models, seeds ``seed .. seed+K-1``
  and weight decays cycling through ``--weight-decays`` (a seeds x weight-decay grid); one
  packed step counts as K model-steps. ``trainer`` is then the "unpacked" figure: the
  same models trained one at a time.

Timing: after ``--warmup`` steps of each method, ``--repeats`` rounds; in each round every
method runs a block of ``--steps`` steps, one method after the other (interleaved, so a
busy machine slows all of them alike), with a device synchronisation at the block's ends.
The figure per method is the median over rounds of model-steps/s; ``ratio`` =
trainer / baseline (the packed trainer when ``--pack`` > 1; then ``packed_vs_unpacked`` =
packed / unpacked trainer too). The best block per method (``*_best_*``, ``ratio_of_best``)
is reported as well: on a machine shared with other work it is the least disturbed one.
On the CPU, ``cpu_time`` holds the same figures per second of this process's CPU time
(``time.process_time``), which does not count the time other processes hold the cores:
with ``--threads 1`` the steadiest comparison on a busy machine. Evaluation and checkpointing are not timed (they are the
same for every method, and run every few thousand steps).

On CUDA the trainer replays its whole step as one captured CUDA graph, as the training loop
does (``train.cuda_graph``, the default); ``--eager`` runs the same step eagerly instead.
``--compile`` wraps the trainer's loss and optimiser update in ``torch.compile``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from baseline import NaiveBaseline  # noqa: E402

from icl.config import Config, load_config, replace  # noqa: E402
from icl.data import load_data  # noqa: E402
from icl.errors import UserError  # noqa: E402
from icl.machine import synchronize  # noqa: E402
from icl.train.step import PackedTrainer  # noqa: E402

DEFAULT_WEIGHT_DECAYS = (0.0, 3e-4, 1e-3, 3e-3, 1e-2)  # STUDY.md's grid


class Method:
    """A named way to run ``n`` training steps (``steps(n)``); ``models`` model-steps per step;
    ``check()`` runs after a block (the trainers read their accumulated loss there, as they
    would at an evaluation)."""

    def __init__(self, name: str, models: int, steps: Callable[[int], None], check: Callable[[], None] = lambda: None):
        self.name, self.models, self.steps, self.check = name, models, steps, check
        self.rates: list[float] = []
        self.cpu_rates: list[float] = []  # per second of this process's CPU time

    def block(self, n: int, device: torch.device) -> float:
        synchronize(device)
        t0, c0 = time.perf_counter(), time.process_time()
        self.steps(n)
        synchronize(device)
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        self.check()
        self.last_cpu_rate = n * self.models / max(dc, 1e-9)
        return n * self.models / dt


def resolve(device: str) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    d = torch.device(device)
    if d.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but no CUDA device is available here; use --device cpu")
    return d


def finite(name: str, value: float) -> None:
    if not np.isfinite(value):
        raise RuntimeError(f"{name}: training loss is not finite ({value})")


def baseline_method(cfg: Config, device: torch.device) -> Method:
    base = NaiveBaseline(cfg, device)
    last = [0.0]

    def steps(n: int) -> None:
        for _ in range(n):
            last[0] = base.step()

    return Method("baseline", 1, steps, lambda: finite("baseline", last[0]))


def pack_configs(cfg: Config, k: int, weight_decays: list[float]) -> list[Config]:
    return [
        replace(cfg, **{"seed": cfg.seed + i, "optim.weight_decay": weight_decays[i % len(weight_decays)]})
        for i in range(k)
    ]


def trainer_method(cfg: Config, device: torch.device, k: int, weight_decays: list[float], compile: bool,
                   graph: bool, name: str) -> Method:
    """The training loop's segments (``PackedTrainer.run``, without evaluations) over a pack of
    ``k`` models: on CUDA one captured graph replayed per step unless ``graph`` is False."""
    trainer = PackedTrainer.fresh(pack_configs(cfg, k, weight_decays), load_data(cfg, device),
                                  compile=compile, cuda_graph=graph)
    t = [0]
    sums: list[torch.Tensor] = []

    def steps(n: int) -> None:
        sums[:] = [trainer.run(t[0] + 1, t[0] + n)[0]]
        t[0] += n

    return Method(name, k, steps, lambda: finite(name, float(sums[0].sum())))


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version(), "torch": torch.__version__,
                                  "numpy": np.__version__, "cuda": torch.version.cuda}
    try:
        out["ray"] = importlib.metadata.version("ray")
    except importlib.metadata.PackageNotFoundError:
        out["ray"] = None
    return out


def machine(device: torch.device) -> dict[str, object]:
    info: dict[str, object] = {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                               "torch_threads": torch.get_num_threads()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        info["cpu"] = platform.processor() or platform.machine()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        info["load_average"] = os.getloadavg()
    except OSError:
        pass
    return info


def measure(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve(args.device)
    if args.pack < 1:
        raise UserError(f"--pack must be >= 1, got {args.pack}")
    cfg = load_config(args.config, [*args.overrides, f"train.device={device}"])
    options = dict(weight_decays=args.weight_decays, compile=args.compile)
    graph = device.type == "cuda" and not args.eager
    methods = [baseline_method(cfg, device), trainer_method(cfg, device, 1, name="trainer", graph=graph, **options)]
    if args.pack > 1:
        methods.append(trainer_method(cfg, device, args.pack, name="packed", graph=graph, **options))
    if args.also_eager and graph:  # the same fastest trainer without its CUDA graph, in the same rounds
        methods.append(trainer_method(cfg, device, args.pack, name="eager", graph=False, **options))
    for m in methods:  # warm-up (allocator, compilation, caches)
        debug = args.sync_debug and device.type == "cuda" and m.name != "baseline"
        if debug:  # list every host synchronisation inside the trainer's steps (the baseline has them by design)
            torch.cuda.set_sync_debug_mode("warn")
        m.block(args.warmup, device)
        if debug:
            torch.cuda.set_sync_debug_mode("default")
    rounds = []
    for r in range(args.repeats):
        order = methods if r % 2 == 0 else methods[::-1]  # alternate who goes first
        rates = {m.name: m.block(args.steps, device) for m in order}
        for m in methods:
            m.rates.append(rates[m.name])
            m.cpu_rates.append(m.last_cpu_rate)
        rounds.append(rates)
        if not args.quiet:
            print(f"round {r + 1}/{args.repeats}: " + ", ".join(f"{m.name} {rates[m.name]:.1f}" for m in methods)
                  + " model-steps/s", flush=True)
    med = {m.name: statistics.median(m.rates) for m in methods}
    best = {m.name: max(m.rates) for m in methods}  # the block least disturbed by other processes
    fast = "packed" if args.pack > 1 else "trainer"
    bs = cfg.train.batch_size
    result = {
        "config": args.config,
        "overrides": args.overrides,
        "device": str(device),
        "pack": args.pack,
        "weight_decays": args.weight_decays[: args.pack] if args.pack > 1 else None,
        "compile": args.compile,
        "cuda_graph": device.type == "cuda" and not args.eager,
        "precision": cfg.train.precision if device.type == "cuda" else "fp32",
        "batch_size": bs,
        "model": {"embedder": cfg.model.embedder, "layers": cfg.model.layers, "d_model": cfg.model.d_model,
                  "image_size": cfg.data.image_size, "num_classes": cfg.data.num_classes},
        "steps_per_block": args.steps,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "baseline_steps_per_s": med["baseline"],
        "trainer_steps_per_s": med[fast],
        "baseline_sequences_per_s": med["baseline"] * bs,
        "trainer_sequences_per_s": med[fast] * bs,
        "ratio": med[fast] / med["baseline"],
        "ratio_per_round": [r[fast] / r["baseline"] for r in rounds],
        "baseline_best_steps_per_s": best["baseline"],
        "trainer_best_steps_per_s": best[fast],
        "ratio_of_best": best[fast] / best["baseline"],
        "blocks_model_steps_per_s": {m.name: m.rates for m in methods},
        "versions": versions(),
        "machine": machine(device),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }
    if device.type == "cpu":  # CPU time ignores the time other processes take the cores away
        cpu = {m.name: statistics.median(m.cpu_rates) for m in methods}
        result["cpu_time"] = {
            "baseline_steps_per_s": cpu["baseline"], "trainer_steps_per_s": cpu[fast],
            "ratio": cpu[fast] / cpu["baseline"],
            "ratio_per_round": [f / b for f, b in zip(next(m for m in methods if m.name == fast).cpu_rates,
                                                       methods[0].cpu_rates)],
            "blocks_model_steps_per_s": {m.name: m.cpu_rates for m in methods},
            **({"unpacked_steps_per_s": cpu["trainer"], "packed_vs_unpacked": cpu["packed"] / cpu["trainer"]}
               if args.pack > 1 else {}),
        }
    if "eager" in med:
        result["eager_steps_per_s"] = med["eager"]
        result["graph_vs_eager"] = med[fast] / med["eager"]
    if args.pack > 1:
        result["unpacked_steps_per_s"] = med["trainer"]
        result["packed_vs_unpacked"] = med["packed"] / med["trainer"]
        result["packed_vs_unpacked_of_best"] = best["packed"] / best["trainer"]
    return result


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="preset (tiny, demo, paper) or YAML path")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. --set model.embedder=frozen (repeatable)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--pack", type=int, default=1, help="models per packed step (K); 1 = the plain trainer")
    p.add_argument("--steps", type=int, default=20, help="steps per timing block")
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds of blocks")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per method first")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--weight-decays", type=float, nargs="+", default=list(DEFAULT_WEIGHT_DECAYS))
    p.add_argument("--compile", action="store_true", help="torch.compile the trainer")
    p.add_argument("--eager", action="store_true",
                   help="CUDA: run the trainer's steps eagerly, not as the captured CUDA graph (the default)")
    p.add_argument("--also-eager", action="store_true",
                   help="CUDA: also time the (packed) trainer without its CUDA graph, in the same rounds")
    p.add_argument("--sync-debug", action="store_true",
                   help="CUDA: warn at every host synchronisation during the trainers' warm-up steps")
    p.add_argument("--json", type=Path, default=None, help="write the result here")
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        result = measure(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    fast = "packed (K=%d)" % args.pack if args.pack > 1 else "trainer"
    if "cpu_time" in result:
        c = result["cpu_time"]
        print(f"per CPU-second: baseline {c['baseline_steps_per_s']:.1f}, {'packed' if args.pack > 1 else 'trainer'} "
              f"{c['trainer_steps_per_s']:.1f}, ratio {c['ratio']:.2f}"
              + (f", packed/unpacked {c['packed_vs_unpacked']:.2f}" if args.pack > 1 else ""))
    print(f"{args.config} on {result['device']}: baseline {result['baseline_steps_per_s']:.1f} steps/s, "
          f"{fast} {result['trainer_steps_per_s']:.1f} model-steps/s, ratio {result['ratio']:.2f}"
          + (f", packed/unpacked {result['packed_vs_unpacked']:.2f} (unpacked {result['unpacked_steps_per_s']:.1f})"
             if args.pack > 1 else ""))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
