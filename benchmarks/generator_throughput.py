"""Throughput of the training-sequence generator: sequences/s at batch 32.

For each image size (default 105 and 28 px) and augmentation setting it times
  index   - ``StudyData.train_batch(step)``: the seeded generator for the step plus the
            vectorised sampling of classes, labels and exemplars ([B, 9] index tensors);
  render  - the same plus ``bank.render``: gathering the pixels into a float32
            ``[B, 9, S, S]`` batch (what the model consumes).
Each case runs for ``--seconds`` of wall time after a warm-up; the figure is the batch size
over the median wall time per batch, with the mean-based rate beside it, plus the process CPU
time per batch (``cpu ms/batch``, summed over torch's threads): on a machine shared with other
jobs the CPU time is the steadier figure, and with ``--threads 1`` it is the work per batch.

    python benchmarks/generator_throughput.py                       # CPU, 105 and 28 px
    python benchmarks/generator_throughput.py --device cuda --json gen.json

Needs the Omniglot data (``ICL_DATA_DIR``) and builds the decoded-image cache for each size on
first use (``ICL_CACHE_DIR``, ~360 MB at 105 px).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

from icl.config import build_config
from icl.data import load_data
from icl.machine import synchronize


def time_case(fn, device: torch.device, seconds: float, warmup: int = 20) -> tuple[list[float], float]:
    """Wall seconds of each timed batch, and the process CPU seconds per batch over them all."""
    for i in range(warmup):
        fn(i)
    synchronize(device)
    times: list[float] = []
    start, cpu0 = time.perf_counter(), time.process_time()
    step = warmup
    while time.perf_counter() - start < seconds or len(times) < 20:
        t0 = time.perf_counter()
        fn(step)
        synchronize(device)
        times.append(time.perf_counter() - t0)
        step += 1
    return times, (time.process_time() - cpu0) / len(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[105, 28], help="image sizes in px")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--seconds", type=float, default=2.0, help="timed wall seconds per case")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON")
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    # (augment, num_classes): no augmentation at the paper's 1600 classes; augmentation at the
    # same 1600 (isolates the extra pixel gather) and at its maximum of 12,800 classes.
    settings = [(False, 1600), (True, 1600), (True, 12800)]
    env = {
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "batch": args.batch,
        "loadavg_start": os.getloadavg()[0],
    }
    rows = []
    for size in args.sizes:
        for augment, classes in settings:
            cfg = build_config("paper", {"data.image_size": size, "data.augment": augment,
                                         "data.num_classes": classes, "train.batch_size": args.batch})
            data = load_data(cfg, device)  # builds the cache for this size on first use

            def index(step: int) -> None:
                data.train_batch(step)

            def render(step: int) -> None:
                b = data.train_batch(step)
                data.bank.render(b.classes, b.exemplars)

            for mode, fn in (("index", index), ("render", render)):
                times, cpu = time_case(fn, device, args.seconds)
                med, mean = statistics.median(times), statistics.fmean(times)
                rows.append({
                    "image_size": size, "augment": augment, "num_classes": classes, "mode": mode,
                    "batches": len(times), "ms_per_batch_median": med * 1e3,
                    "seq_per_s": args.batch / med, "seq_per_s_mean": args.batch / mean,
                    "steps_per_s": 1 / med, "cpu_ms_per_batch": cpu * 1e3,
                    "seq_per_cpu_s": args.batch / cpu if cpu > 0 else float("inf"),
                })
            del data
    env["loadavg_end"] = os.getloadavg()[0]

    print(f"generator throughput, batch {args.batch}, {env['device']}, torch {env['torch']}, "
          f"{env['torch_threads']} threads / {env['cpu_count']} CPUs, "
          f"load avg {env['loadavg_start']:.1f} -> {env['loadavg_end']:.1f}")
    header = (f"{'px':>4} {'augment':>7} {'classes':>7} {'mode':>6} {'ms/batch':>9} {'seq/s':>9} "
              f"{'seq/s(mean)':>11} {'steps/s':>8} {'cpu ms/batch':>12} {'seq/cpu-s':>10}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['image_size']:>4} {('on' if r['augment'] else 'off'):>7} {r['num_classes']:>7} {r['mode']:>6} "
              f"{r['ms_per_batch_median']:>9.3f} {r['seq_per_s']:>9.0f} {r['seq_per_s_mean']:>11.0f} "
              f"{r['steps_per_s']:>8.0f} {r['cpu_ms_per_batch']:>12.3f} {r['seq_per_cpu_s']:>10.0f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "results": rows}, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
