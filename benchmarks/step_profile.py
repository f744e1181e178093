"""Where a training step's time goes: data, forward, backward, optimiser, and evaluation.

    python benchmarks/step_profile.py --preset tiny demo paper [--device cpu] [--steps N] [--json FILE]

For each preset it times ``--steps`` real training steps (after a warm-up), phase by phase
with device synchronisation between phases (so phases add up; the trainer itself never
synchronises inside a step), and one full evaluation on the fixed sets, amortised over
the preset's ``eval_every``. Steps/s is also measured without the phase barriers, through
the trainer's own step (``PackedTrainer.step``, a pack of one as ``icl-train`` runs it).
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from icl.config import load_config
from icl.data import load_data
from icl.train.evaluate import evaluate
from icl.train.loop import resolve_device
from icl.train.pack import PackedTrainer


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def profile(preset: str, device_name: str, steps: int) -> dict:
    cfg = load_config(preset, [f"train.device={device_name}"])
    device = resolve_device(cfg.train.device)
    data = load_data(cfg, device)
    trainer = PackedTrainer.fresh([cfg], data)
    trainer.optimizer.schedule(1, 2 * steps + 3)
    for t in range(1, 4):  # warm-up
        trainer.step(t)
    phases = dict.fromkeys(["data", "forward", "backward", "optimizer"], 0.0)
    for t in range(4, steps + 4):  # the phases of PackedTrainer.step, with a barrier after each
        sync(device)
        t0 = time.perf_counter()
        images, labels = trainer.batch(t - 1)
        sync(device)
        t1 = time.perf_counter()
        losses, _ = trainer.losses(images, labels)
        sync(device)
        t2 = time.perf_counter()
        grad = trainer.gradient(losses)
        sync(device)
        t3 = time.perf_counter()
        trainer.optimizer.step(t, grad)
        sync(device)
        t4 = time.perf_counter()
        for k, dt in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            phases[k] += dt
    sync(device)
    t0 = time.perf_counter()
    for t in range(steps + 4, 2 * steps + 4):
        trainer.step(t)
    sync(device)
    steps_per_s = steps / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    evaluate(trainer.models[0], data, cfg)
    sync(device)
    eval_s = time.perf_counter() - t0
    per_step = {k: v / steps for k, v in phases.items()}
    per_step["evaluation"] = eval_s / cfg.train.eval_every
    total = sum(per_step.values())
    return {
        "preset": preset,
        "device": str(device),
        "steps_per_s": steps_per_s,
        "eval_s": eval_s,
        "eval_every": cfg.train.eval_every,
        "fractions": {k: v / total for k, v in per_step.items()},
        "ms_per_step": {k: 1e3 * v for k, v in per_step.items()},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", nargs="+", default=["tiny", "demo", "paper"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    results = []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print(f"{'preset':8} {'steps/s':>9} | {'data':>6} {'fwd':>6} {'bwd':>6} {'optim':>6} {'eval':>6}  (share of a step, eval amortised)")
    for preset in args.preset:
        r = profile(preset, args.device, args.steps)
        results.append(r)
        f = r["fractions"]
        print(f"{preset:8} {r['steps_per_s']:9.2f} | " + " ".join(f"{100 * f[k]:5.1f}%" for k in
              ("data", "forward", "backward", "optimizer", "evaluation")) + f"   eval {r['eval_s']:.2f} s / {r['eval_every']} steps")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"torch": torch.__version__, "results": results}, fh, indent=1)


if __name__ == "__main__":
    main()
