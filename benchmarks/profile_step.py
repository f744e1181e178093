"""What one training step asks of the device, from torch.profiler: busy time, top kernels, launches.

    python benchmarks/profile_step.py --config paper [--set k=v ...] [--pack K] [--device cuda]
                                      [--steps 10] [--no-graph] [--json FILE] [--trace FILE]

It profiles ``--steps`` steps of the trainer exactly as the training loop runs them (a pack
of ``--pack`` models; on CUDA the whole step replayed as one CUDA graph unless
``--no-graph`` or ``train.cuda_graph=false``) after a warm-up, and reports per step:

- ``wall_ms``: host wall time (the step rate's inverse);
- ``device_busy_ms``: the union of the device's kernel and copy intervals (on the CPU: the
  profiler's CPU time of the operators) — wall minus busy is the time the device sat idle;
- ``launches``: kernels (and copies) launched, from the profiler's device events;
- the top kernels by total device time, with their share of the busy time, grouped into
  families (BatchNorm, convolution, matmul, AdamW, copies/casts, ...).

The figures go to stdout and, with ``--json``, to a file (``benchmarks/gpu_session.sh`` runs
it for the frozen 12-layer config and the ResNet ``paper`` preset).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))

from throughput import pack_configs, resolve  # noqa: E402

from icl.config import load_config  # noqa: E402
from icl.data import load_data  # noqa: E402
from icl.machine import synchronize  # noqa: E402
from icl.train.step import PackedTrainer  # noqa: E402

FAMILIES = [  # (family, regex over the kernel name), first match wins
    ("batchnorm", r"batch_norm|batchnorm|bn_fw|bn_bw|welford"),
    ("convolution", r"conv|implicit_gemm|cudnn|xmma|wgrad|dgrad|fprop"),
    ("max-pool", r"max_pool|maxpool"),
    ("matmul", r"gemm|matmul|cutlass|sm90|sm80|ampere|hopper|bmm|addmm"),
    ("adamw", r"adam|lerp|addcmul|addcdiv|sqrt"),
    ("copy/cast", r"copy|cast|to_copy|memcpy|memset|fill"),
    ("softmax/layernorm", r"softmax|layer_norm|layernorm"),
    ("sampling", r"searchsorted|sort|radix|gather|index|scatter|hash|bitwise|xor|remainder"),
]


def family(name: str) -> str:
    lower = name.lower()
    for fam, pattern in FAMILIES:
        if re.search(pattern, lower):
            return fam
    return "other elementwise"


def union_ms(intervals: list[tuple[float, float]]) -> float:
    """Total length (ms) of the union of [start, end) intervals given in microseconds."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if a > end:
            total += b - a
            end = b
        elif b > end:
            total += b - end
            end = b
    return total / 1e3


def measure(args: argparse.Namespace) -> dict:
    device = resolve(args.device)
    cfg = load_config(args.config, [*args.overrides, f"train.device={device}"])
    trainer = PackedTrainer.fresh(pack_configs(cfg, args.pack, [0.0, 1e-3]), load_data(cfg, device),
                                  cuda_graph=not args.no_graph)
    total = args.warmup + args.steps
    trainer.run(1, args.warmup)  # warm-up (and, on CUDA, the graph's capture)
    synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        trainer.run(args.warmup + 1, total)
        synchronize(device)
        wall = time.perf_counter() - t0
    if args.trace:
        prof.export_chrome_trace(str(args.trace))
    events = prof.events()
    if device.type == "cuda":
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        spans = [(e.time_range.start, e.time_range.end) for e in kernels]
        durations = [(e.name, e.device_time) for e in kernels]
    else:  # the CPU's operators, top level only (their children are inside them)
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU and e.cpu_parent is None]
        spans = [(e.time_range.start, e.time_range.end) for e in kernels]
        durations = [(e.name, e.cpu_time_total) for e in kernels]
    busy = union_ms(spans)
    by_name: dict[str, float] = defaultdict(float)
    by_family: dict[str, float] = defaultdict(float)
    for name, us in durations:
        by_name[name] += us / 1e3
        by_family[family(name)] += us / 1e3
    n = args.steps
    summed = sum(by_name.values()) or 1.0
    return {
        "config": args.config,
        "overrides": args.overrides,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "pack": args.pack,
        "graph": trainer.graphed,
        "steps": n,
        "wall_ms_per_step": 1e3 * wall / n,
        "model_steps_per_s": n * args.pack / wall,
        "device_busy_ms_per_step": busy / n,
        "device_idle_fraction": max(0.0, 1 - busy / (1e3 * wall)),
        "launches_per_step": len(kernels) / n,
        "families_ms_per_step": {k: v / n for k, v in sorted(by_family.items(), key=lambda kv: -kv[1])},
        "families_share": {k: v / summed for k, v in sorted(by_family.items(), key=lambda kv: -kv[1])},
        "top_kernels": [
            {"name": name[:120], "ms_per_step": ms / n, "share": ms / summed}
            for name, ms in sorted(by_name.items(), key=lambda kv: -kv[1])[: args.top]
        ],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="paper")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--pack", type=int, default=1)
    p.add_argument("--device", default="auto")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--no-graph", action="store_true", help="eager steps even on CUDA (train.cuda_graph=false)")
    p.add_argument("--json", type=Path)
    p.add_argument("--trace", type=Path, help="also write the profiler's trace (chrome://tracing, Perfetto)")
    args = p.parse_args(argv)
    r = measure(args)
    print(f"{' '.join([r['config'], *r['overrides']])}, pack {r['pack']} on {r['device']} (graph: {r['graph']}): "
          f"{r['wall_ms_per_step']:.2f} ms/step wall, {r['device_busy_ms_per_step']:.2f} ms busy "
          f"({100 * r['device_idle_fraction']:.0f}% idle), {r['launches_per_step']:.0f} launches/step, "
          f"{r['model_steps_per_s']:.1f} model-steps/s")
    for fam, share in r["families_share"].items():
        print(f"  {fam:18s} {100 * share:5.1f}%  {r['families_ms_per_step'][fam]:.3f} ms/step")
    for k in r["top_kernels"][:8]:
        print(f"    {100 * k['share']:5.1f}%  {k['ms_per_step']:.3f} ms  {k['name']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(r, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
