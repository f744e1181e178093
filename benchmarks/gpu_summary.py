"""The lines of ``summary.txt`` (benchmarks/gpu_session.sh) that put a result against its target.

    python benchmarks/gpu_summary.py throughput NAME FILE.json       K = 1 and the pack, against TARGETS[NAME]
    python benchmarks/gpu_summary.py train METRICS.csv START END [BENCH.json]   START, END: epoch seconds
    python benchmarks/gpu_summary.py tests PYTEST.log

Targets (issues 12 and 19), model-steps/s on one H100/H200, where the published JAX code
trains 72 steps/s: frozen 12-layer K = 1 >= 500, packed >= 10,000; ResNet ``paper`` K = 1
>= 200, K = 15 >= 1,500; ``icl-train`` end to end within 10 % of the benchmark's K = 1 rate.
"""

from __future__ import annotations

import csv
import json
import sys

PUBLISHED = 72.0  # steps/s, the published JAX code on one H100
TARGETS = {"frozen": (500, 10_000), "resnet": (200, 1_500)}  # (K = 1, packed)
END_TO_END = 0.9  # icl-train's rate over the benchmark's, at least


def against(value: float, target: float, device: str) -> str:
    if device == "cpu":
        return f"(target >= {target:,} is a GPU's)"
    return f"(target >= {target:,}: {'met' if value >= target else 'NOT met'})"


def alone_rate(r: dict) -> float:
    """Model-steps/s of the trainer on one model (the unpacked figure of a pack's run)."""
    return r["unpacked_steps_per_s"] if r["pack"] > 1 else r["trainer_steps_per_s"]


def throughput(name: str, path: str) -> list[str]:
    r = json.load(open(path))
    device = r["machine"].get("gpu", r["device"])
    about = (f"{' '.join([r['config'], *r['overrides']])} on {device}, torch {r['versions']['torch']}, "
             f"CUDA graph {r['cuda_graph']}, {r['repeats']} rounds of {r['steps_per_block']} steps")
    k1, (t1, tk) = alone_rate(r), TARGETS[name]
    lines = [f"{name} K=1: {k1:,.1f} model-steps/s {against(k1, t1, r['device'])}; {k1 / PUBLISHED:.1f}x the published "
             f"72 steps/s; baseline {r['baseline_steps_per_s']:,.1f}; {about}"]
    if r["pack"] > 1:
        packed = r["trainer_steps_per_s"]
        eager = f"; eager {r['eager_steps_per_s']:,.0f} (graph/eager {r['graph_vs_eager']:.2f})" if "eager_steps_per_s" in r else ""
        lines.append(f"{name} K={r['pack']}: {packed:,.0f} model-steps/s {against(packed, tk, r['device'])}; "
                     f"packed/unpacked {r['packed_vs_unpacked']:.1f}{eager}")
    return lines


def train(path: str, start: str, end: str, bench: str | None = None) -> list[str]:
    rows = list(csv.DictReader(open(path)))
    outside = float(end) - float(start)
    steps, wall = int(rows[-1]["step"]), float(rows[-1]["wall_s"])
    evals = sum(float(r["eval_s"]) for r in rows)
    rate = steps / wall
    line = (f"icl-train end to end: {steps:,} steps, {len(rows)} evaluations ({evals:.1f} s): {rate:,.1f} steps/s by "
            f"its wall_s ({wall:.1f} s), {steps / outside:,.1f} from outside ({outside:.1f} s, "
            f"start-up included)")
    try:
        r = json.load(open(bench))
        k1 = alone_rate(r)
        ok = "met" if rate >= END_TO_END * k1 else "NOT met"
        line += f"; {rate / k1:.2f} of the benchmark's K=1 {k1:,.1f} (target >= {END_TO_END}: {ok})"
    except (TypeError, OSError, KeyError, ValueError):
        line += "; no benchmark figure to compare with"
    return [line]


def tests(path: str) -> list[str]:
    counts = [line.strip("= \n") for line in open(path) if " in " in line and any(
        w in line for w in ("passed", "failed", "skipped", "error", "no tests ran"))]
    return [f"tests (pytest -m cuda): {counts[-1] if counts else 'no result line (cut short?)'}"]


def main(argv: list[str]) -> int:
    kind, *args = argv
    for line in {"throughput": throughput, "train": train, "tests": tests}[kind](*args):
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
